"""Context parallelism: a sequence split over mesh.context computes one device's loss and gradients."""

import jax
import numpy as np
import optax
import pytest

from objectives.losses import next_token_sums
from parallel import context
from parallel.hlo import collectives
from parallel.rules import traced_under
from settings import ConfigError
from tests.helpers import VOCAB, mesh_for, packed_batch, run_steps, small_config
from tests.test_pipeline import _permutes_in_branches
from trainer.experiment import build

SEQ_LEN = 32
# Packed rows (several documents each), a sliding window shorter than the documents, GQA (4 heads over 2 kv heads).
BASE = {"data.seq_len": SEQ_LEN, "model.sliding_window": 5, "model.num_kv_heads": 2, "train.global_batch_size": 4}
LAYOUTS = {
  "context2": {"mesh.context": 2},
  "context4": {"mesh.context": 4},
  "context2_fsdp2": {"mesh.context": 2, "mesh.fsdp": 2},
  "context2_tensor2": {"mesh.context": 2, "mesh.tensor": 2},
  "context4_fsdp2": {"mesh.context": 4, "mesh.fsdp": 2},
  "context4_tensor2": {"mesh.context": 4, "mesh.tensor": 2},
}


def _loss_and_grads(cfg, batch):
  """The step's loss (nll / tokens) and its gradients on `batch`, laid out as the train step lays it out."""
  exp = build(cfg, VOCAB, mesh_for(cfg))
  params = exp.init_state().params

  def loss_and_grads(params, batch):
    batch = context.balance(batch, context.size())

    def loss(p):
      (nll_sum, _, tokens), _ = next_token_sums(exp.graphdef, p, batch)
      return nll_sum / tokens

    return jax.value_and_grad(loss)(params)

  fn = jax.jit(traced_under(exp.mesh, loss_and_grads), in_shardings=(exp.shardings.params, exp.batch_sharding))
  compiled = fn.lower(params, jax.device_put(batch, exp.batch_sharding)).compile()
  loss, grads = compiled(params, jax.device_put(batch, exp.batch_sharding))
  counts = {op: stats["count"] for op, stats in collectives(compiled.as_text()).items()}
  return float(loss), jax.device_get(grads), counts


@pytest.fixture(scope="module")
def batch():
  return packed_batch(np.random.default_rng(0), 4, SEQ_LEN, docs_per_row=3)


@pytest.fixture(scope="module")
def one_device(batch):
  return _loss_and_grads(small_config(**BASE), batch)


@pytest.mark.parametrize(
  "strategy,layout",
  [
    pytest.param("ring", "context2_tensor2", marks=pytest.mark.fast),
    ("all_gather", "context2_fsdp2"),
    ("all_gather", "context4_tensor2"),
    ("ring", "context4_fsdp2"),
    ("all_gather", "context2"),
  ],
)
def test_context_parallel_gives_one_devices_loss_and_gradients(strategy, layout, batch, one_device):
  """Each strategy over context=2 and 4, alone and with fsdp or tensor (each strategy on each of context 2 and 4,
  alone, with fsdp and with tensor): packed documents, a sliding window and GQA as on one device, within 1e-5."""
  loss_1, grads_1, _ = one_device
  cfg = small_config(**BASE, **LAYOUTS[layout], **{"model.context_parallel": strategy})
  loss, grads, counts = _loss_and_grads(cfg, batch)
  assert abs(loss - loss_1) < 1e-5
  for (path, g), g_1 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_1), strict=True):
    np.testing.assert_allclose(g, g_1, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
  # The strategy is the one that ran: the ring passes chunks (forward and backward), all_gather gathers them.
  if strategy == "ring":
    assert counts["collective-permute"] >= 2 * cfg.model.num_layers
  else:
    assert counts["all-gather"] >= cfg.model.num_layers


@pytest.mark.parametrize("strategy", [pytest.param("ring", marks=pytest.mark.fast), "all_gather"])
def test_context_inside_pipeline_stages_gives_one_devices_loss_and_gradients(strategy, batch, one_device):
  """stage=2 x context=2 x data=2: attention's shard_map nested in the pipeline's, the real train step (its own
  `balance`, then the pipeline's microbatches). Its gradients are read from AdamW's first moment, which with
  b1 = 0 and no clipping is the step's gradient; without z-loss the step's objective is the reference's."""
  loss_1, grads_1, _ = one_device
  layout = {"mesh.stage": 2, "mesh.context": 2, "mesh.data": 2, "pipeline.microbatches": 2}
  exact = {"optim.b1": 0.0, "optim.clip_norm": 0.0, "train.z_loss_weight": 0.0}
  cfg = small_config(**BASE, **layout, **exact, **{"model.context_parallel": strategy})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  # A collective-permute in a stage's branch would hang the step (tests/test_pipeline.py): checked before it runs.
  hlo = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile().as_text()
  assert not _permutes_in_branches(hlo), _permutes_in_branches(hlo)
  state, metrics = exp.train_step(exp.init_state(), jax.device_put(batch, exp.batch_sharding), {})
  assert abs(float(metrics["loss"]) - loss_1) < 1e-5
  grads = jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu"))
  for (path, g), g_1 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_1), strict=True):
    np.testing.assert_allclose(g, g_1, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.fast
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_causal_load_balance_gives_every_device_the_same_attended_key_chunks(devices):
  """Counted from the causal mask of a packed row in each layout: the mirrored chunks (d and 2C-1-d) even out the
  work, which the sequence in order does not (device C-1 then attends C times the chunks of device 0)."""
  length = 16 * devices
  balanced = context.attended_chunk_pairs(length, devices)
  assert (balanced == 2 * devices + 1).all(), balanced  # every device: C + 1 pairs on or below the diagonal, + C
  in_order = context.attended_chunk_pairs(length, devices, order=np.arange(length))
  assert in_order.sum() == balanced.sum() and in_order.max() > in_order.min(), in_order


@pytest.mark.fast
def test_balanced_layout_permutes_each_row_once():
  """`balance` lays the batch out as `balanced_order` says, and leaves per-row arrays alone."""
  order = context.balanced_order(16, 4)
  assert sorted(order) == list(range(16)) and list(order[:4]) == [0, 1, 14, 15]  # device 0: chunks 0 and 7
  row = np.arange(32).reshape(2, 16)
  out = context.balance({"inputs": row, "targets": row[:, :, None], "weights": np.arange(2)}, 4)
  np.testing.assert_array_equal(out["inputs"], row[:, order])
  np.testing.assert_array_equal(out["targets"][..., 0], row[:, order])
  np.testing.assert_array_equal(out["weights"], np.arange(2))


@pytest.mark.fast
@pytest.mark.parametrize(
  "overrides,words",
  [
    ({"mesh.context": 4, "data.seq_len": 12}, "data.seq_len=12"),
    ({"mesh.context": 2, "model.attention": "splash"}, "splash"),
    ({"mesh.context": 2, "mesh.rules.length": ""}, "mesh.rules.length"),
    ({"model.context_parallel": "ulysses"}, "context_parallel"),
  ],
)
def test_unsupported_context_layouts_are_one_line(overrides, words):
  """Checked for a TPU target (splash is a TPU kernel) before anything is traced."""
  from parallel.mesh import MESH_AXES, mesh_shape
  from parallel.rules import parse_rules
  from settings.validate import validate, validate_layout

  cfg = small_config(**{**BASE, **overrides})
  with pytest.raises((ConfigError, ValueError)) as error:
    validate(cfg)
    devices = int(np.prod([cfg.mesh[a] for a in MESH_AXES]))
    validate_layout(cfg, mesh_shape(cfg.mesh, devices), parse_rules(cfg.mesh.rules), 1, "tpu")
  assert words in str(error.value) and "\n" not in str(error.value)


def test_train_step_lays_the_batch_out_once_and_trains_as_one_device(batch):
  """The real train step (its own `balance` of the batch), two steps: the losses and the updated parameters."""
  batches = [batch, packed_batch(np.random.default_rng(1), 4, SEQ_LEN, docs_per_row=3)]
  losses_1, params_1, _ = run_steps(small_config(**BASE), batches)
  cfg = small_config(**BASE, **LAYOUTS["context4"], **{"model.context_parallel": "ring"})
  losses, params, _ = run_steps(cfg, batches)
  np.testing.assert_allclose(losses, losses_1, atol=1e-5, rtol=0)
  for p, p_1 in zip(jax.tree.leaves(params), jax.tree.leaves(params_1), strict=True):
    np.testing.assert_allclose(p, p_1, atol=1e-5, rtol=0)
