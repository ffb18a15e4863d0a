"""Every parallel layout computes the same training run; shardings and collectives are what each layout promises."""

import re

import jax
import numpy as np
import pytest

from parallel.hlo import collectives
from parallel.mesh import MeshError, mesh_shape
from parallel.partition import bytes_per_device
from tests.helpers import VOCAB, mesh_for, packed_batch, run_steps, small_config
from trainer.experiment import build

LAYOUTS = {
  "data8": {"mesh.data": 8},
  "fsdp8": {"mesh.fsdp": 8},
  "tensor4_data2": {"mesh.tensor": 4, "mesh.data": 2},
  "data2_fsdp2_tensor2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
  "data8_zero1": {"mesh.data": 8, "optim.zero_stage": 1},
  "data8_zero2": {"mesh.data": 8, "optim.zero_stage": 2},
  # The chunked kernels and a named remat policy, against the single-device run's xla attention and plain loss.
  "data2_fsdp2_tensor2_chunked": {
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    "model.attention": "chunked",
    "model.attention_block": 4,
    "model.loss_chunk": 4,
    "model.remat": "save_projections",
  },
}


def layout_config(layout: str, **extra):
  # d_model 64 and 4 kv heads so that every weight dimension divides 8-way and 4-way axes.
  return small_config(**{"model.d_model": 64, "model.num_kv_heads": 4, **LAYOUTS.get(layout, {}), **extra})


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [packed_batch(rng, 8, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device_run(batches):
  return run_steps(layout_config("single"), batches)


# The fast tests take the 3-D layout: data, fsdp and tensor axes at once.
@pytest.mark.parametrize(
  "layout", [pytest.param(k, marks=pytest.mark.fast) if k == "data2_fsdp2_tensor2" else k for k in LAYOUTS]
)
def test_layout_reproduces_single_device_training(layout, batches, single_device_run):
  want_losses, want_params, _ = single_device_run
  losses, params, exp = run_steps(layout_config(layout), batches)
  assert exp.mesh.devices.size == 8
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _experiment(layout: str):
  cfg = layout_config(layout)
  return build(cfg, VOCAB, mesh_for(cfg))


def _state_bytes(exp):
  state = exp.abstract_state()
  return bytes_per_device(state.params, exp.shardings.params), bytes_per_device(
    state.opt_state, exp.shardings.opt_state
  )


@pytest.mark.fast
def test_bytes_per_device_follow_the_layout():
  single_params, single_opt = _state_bytes(_experiment("single"))
  fsdp_params, fsdp_opt = _state_bytes(_experiment("fsdp8"))
  zero1_params, zero1_opt = _state_bytes(_experiment("data8_zero1"))
  data_params, data_opt = _state_bytes(_experiment("data8"))
  assert data_params == single_params and data_opt == single_opt  # plain data parallel replicates everything
  # FSDP: about 1/8 of parameters and optimizer state (norm scales are too small to be worth sharding).
  assert fsdp_params / single_params == pytest.approx(1 / 8, rel=0.05)
  assert fsdp_opt / single_opt == pytest.approx(1 / 8, rel=0.05)
  # ZeRO-1: all parameters, about 1/8 of the optimizer state.
  assert zero1_params == single_params
  assert zero1_opt / single_opt == pytest.approx(1 / 8, rel=0.05)


def _collectives(layout: str) -> tuple[dict[str, int], str]:
  """Executions of each collective per step, and the HLO."""
  exp = _experiment(layout)
  hlo = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile().as_text()
  return {op: stats["count"] for op, stats in collectives(hlo).items()}, hlo


def test_data_parallel_all_reduces_gradients_and_gathers_nothing():
  counts, _ = _collectives("data8")
  assert counts["all-reduce"] >= 1 and counts["all-gather"] == 0 and counts["all-to-all"] == 0


@pytest.mark.fast
def test_fsdp_gathers_weights_inside_the_layer_loop():
  counts, hlo = _collectives("fsdp8")
  assert counts["all-gather"] >= 2
  # Gradients leave the backward pass reduced and sliced to each device's shard. XLA:CPU has no
  # ReduceScatterCreator pass (GPU and TPU do), so here that reduction is an all-reduce feeding a slice.
  assert counts["all-reduce"] + counts["reduce-scatter"] >= 1
  # A dense layer's loop gathers weights and reduces their gradients, and moves no activation: the batch stays
  # split as it came. (The embedding lookup's all-to-alls, outside the loop, move the looked-up rows.)
  in_loops = {op: stats["in_loops"] for op, stats in collectives(hlo).items() if stats["in_loops"]}
  assert set(in_loops) <= {"all-gather", "all-reduce", "reduce-scatter"}, in_loops


@pytest.mark.fast
def test_tensor_parallel_all_reduces_activations_and_never_gathers_weights():
  counts, hlo = _collectives("tensor4_data2")
  # Megatron: one all-reduce after attention-out and one after MLP-down per layer, forward and backward.
  assert counts["all-reduce"] >= 4
  assert counts["all-gather"] == 0


def test_zero1_gathers_updated_parameters_and_zero2_scatters_gradients():
  zero1, _ = _collectives("data8_zero1")
  assert zero1["all-gather"] >= 1 and zero1["all-reduce"] >= 1
  zero2, _ = _collectives("data8_zero2")
  assert zero2["all-gather"] >= 1


def test_mesh_errors_name_the_problem():
  cfg = small_config(**{"mesh.data": 3})
  with pytest.raises(MeshError, match=r"covers 3 devices but there are 8"):
    mesh_shape(cfg.mesh, 8)
  with pytest.raises(MeshError, match=r"does not divide the 8 devices"):
    mesh_shape(small_config(**{"mesh.data": -1, "mesh.tensor": 3}).mesh, 8)
  assert mesh_shape(small_config(**{"mesh.data": -1, "mesh.tensor": 2}).mesh, 8)["data"] == 4


def test_kv_heads_not_divisible_by_tensor_axis():
  cfg = small_config(**{"mesh.tensor": 4, "mesh.data": 2, "model.num_kv_heads": 2})
  with pytest.raises(MeshError, match=r"blocks\.attn\.wk_DxKxH has size 2 on its 'kv_heads' axis, not divisible"):
    build(cfg, VOCAB, mesh_for(cfg))


def test_batch_not_divisible_by_data_axes():
  cfg = small_config(**{"mesh.data": 8, "train.global_batch_size": 12})
  with pytest.raises(MeshError, match=r"batch of 12 sequences per microbatch .* does not split over the 8 devices"):
    build(cfg, VOCAB, mesh_for(cfg))


def test_vocab_is_padded_to_split_over_the_tensor_axis():
  cfg = small_config(
    **{
      "mesh.tensor": 8,
      "model.vocab_multiple": 12,
      "model.d_model": 64,
      "model.num_heads": 8,
      "model.num_kv_heads": 8,
      "model.mlp_dim": 64,
    }
  )
  exp = build(cfg, VOCAB, mesh_for(cfg))
  assert exp.model_cfg.vocab_size == 216  # lcm(12, 8) = 24; 200 rounded up


def test_fsdp_gathers_weights_in_the_compute_dtype(tmp_path):
  """bf16 compute under fsdp=8: every weight all-gather moves bf16, forward and backward (the LM head's gradient
  dy @ W once gathered an fp32 copy). Read right after SPMD partitioning, where GSPMD has placed the collectives:
  XLA:CPU later widens every bf16 collective to f32 (it has none in bf16), which GPU and TPU do not."""
  cfg = layout_config("fsdp8", **{"model.compute_dtype": "bfloat16"})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  options = {"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"}
  exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile(compiler_options=options)
  (dump,) = tmp_path.glob("*train_step*after_spmd-partitioning*.txt")
  hlo = dump.read_text()
  gathered = re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", hlo)
  float_gathers = [dtype for dtype in gathered if dtype.startswith(("f", "bf"))]
  # q, k, v, o, MLP gate, up, down: forward and again in the backward pass; the tied head's embedding.
  assert len(float_gathers) >= 2 * 7 + 1, gathered
  assert set(float_gathers) == {"bf16"}, gathered
  # The head's weight gradient is made from activations alone and keeps fp32, its reduction over the batch too
  # (on CPU the gradient is computed as [d_model, vocab] and transposed after the reduction).
  vocab, d_model = exp.model_cfg.vocab_size, exp.model_cfg.d_model
  assert re.search(rf"= f32\[({vocab},{d_model}|{d_model},{vocab})\]\S* all-reduce\(", hlo)
