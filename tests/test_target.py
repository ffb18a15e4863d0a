"""The target a program is compiled for: TPU slice names, and the per-platform choices it makes."""

import jax
import jax.numpy as jnp
import pytest

from model.attend import resolve
from parallel.target import TargetError, parse_tpu_name
from settings.load import load_config_file
from tests.helpers import small_config


@pytest.mark.fast
@pytest.mark.parametrize(
  "name,family,shape,chips,wrap,jax_name",
  [
    # Cloud TPU names: v4 and v5p count TensorCores (two per megacore chip), v5e and v6e count chips.
    ("v5p-128", "v5p", (4, 4, 4), 64, (True, True, True), "v5:4x4x4"),
    ("v5p-8", "v5p", (2, 2, 1), 4, (False, False, False), "v5:2x2x1"),
    ("v4-32", "v4", (2, 2, 4), 16, (False, False, False), "v4:2x2x4"),
    ("v4-64", "v4", (2, 4, 4), 32, (False, False, False), "v4:2x4x4"),
    ("v4-256", "v4", (4, 4, 8), 128, (True, True, True), "v4:4x4x8"),
    ("v5litepod-16", "v5e", (4, 4), 16, (False, False, False), "v5e:4x4"),
    ("v5e-8", "v5e", (2, 4), 8, (False, False, False), "v5e:2x4"),
    ("v6e-256", "v6e", (16, 16), 256, (True, True, False), "v6e:16x16"),
    ("v6e-128", "v6e", (8, 16), 128, (False, True, False), "v6e:8x16"),
    # JAX's names count chips along each side.
    ("v5p:4x4x4", "v5p", (4, 4, 4), 64, (True, True, True), "v5:4x4x4"),
    ("v5e:2x2", "v5e", (2, 2), 4, (False, False, False), "v5e:2x2"),
    ("v4:2x2x4", "v4", (2, 2, 4), 16, (False, False, False), "v4:2x2x4"),
  ],
)
def test_tpu_names_give_the_slice_cloud_tpu_makes(name, family, shape, chips, wrap, jax_name):
  tpu = parse_tpu_name(name)
  assert (tpu.family, tpu.shape, tpu.chips, tpu.wrap, tpu.jax_name) == (family, shape, chips, wrap, jax_name)
  assert tpu.chips_per_host == (min(shape[0], 2), min(shape[1], 2), 1)
  # The two forms name the same slice.
  assert parse_tpu_name(tpu.cloud_name) == tpu


@pytest.mark.fast
@pytest.mark.parametrize(
  "name,message",
  [
    ("h100:8", "unknown TPU family 'h100'"),
    ("v5p-96", "not a power-of-two slice"),
    ("v5e:4x4x4", "a v5e slice has 2 sides"),
    ("tpu", "not a TPU name"),
  ],
)
def test_bad_topology_names_are_one_line(name, message):
  with pytest.raises(TargetError, match=message) as e:
    parse_tpu_name(name)
  assert "\n" not in str(e.value)


@pytest.mark.fast
def test_each_platform_resolves_auto_to_its_own_kernels():
  """model.attention=auto and moe.dropless_impl=auto follow the target's platform, whatever backend plans it."""
  from model.moe import resolve_dropless

  assert resolve("auto", "tpu", 2048, jnp.bfloat16) == "splash"
  assert resolve("auto", "gpu", 2048, jnp.bfloat16) == "cudnn"
  assert resolve("auto", "cpu", 256, jnp.bfloat16) == "xla" and resolve("auto", "cpu", 2048, jnp.bfloat16) == "chunked"
  assert resolve_dropless("auto", "cpu") == "buffer"
  assert resolve_dropless("auto", "tpu") == "ragged"


def _lowered_step_text(cfg, mesh) -> str:
  from trainer.experiment import build

  exp = build(cfg, cfg.data.vocab_size, mesh)
  return exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), exp.abstract_frozen()).as_text()


@pytest.mark.fast
def test_the_cpu_program_takes_the_cpu_paths():
  """A bf16 config planned on the CPU keeps its bf16 residuals as uint16 bits (model/layers.py: as_residual, made
  for XLA:CPU's bf16 handling); the TPU test below finds none in the TPU program."""
  from parallel.mesh import make_mesh

  cfg = small_config(**{"model.compute_dtype": "bfloat16", "model.attention": "xla"})
  text = _lowered_step_text(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  assert "bf16>) -> tensor<" in text and "xui16>" in text


def test_tiny_compiles_for_a_tpu_slice_with_splash_attention():
  """`--dry_run --topology v5e:2x2`: tiny's train step compiled by libtpu on this CPU host. auto attention is
  splash there, whose Pallas kernel is a TPU custom call in the compiled program; the CPU's residual and
  backward tricks are absent; the plan reports the slice and its bytes per chip."""
  pytest.importorskip("libtpu", reason="the TPU compiler comes with requirements-dev.txt (jax[tpu])")
  from parallel.target import tpu_target
  from trainer.plan import compile_train_step, describe

  target = tpu_target("v5e:2x2")
  assert (target.platform, target.device_kind, target.chips) == ("tpu", "TPU v5 lite", 4)
  cfg = load_config_file("configs/tiny.py")
  cfg.model.compute_dtype, cfg.mesh.data, cfg.mesh.fsdp = "bfloat16", 1, 4
  # The tests' "highest" default precision asks Mosaic for an fp32 contraction of bf16 operands, which it refuses.
  with jax.default_matmul_precision("default"):
    exp, compiled, seconds = compile_train_step(cfg, target)
  text = compiled.as_text()
  assert exp.model_cfg.platform == "tpu" and exp.model_cfg.attention == "auto"
  assert 'custom_call_target="tpu_custom_call"' in text and "splash" in text
  assert "u16[" not in text
  result = describe(cfg, target, exp, compiled, seconds)
  assert result["attention"] == "splash"
  t = result["target"]
  assert (t["platform"], t["topology"], t["chips"], t["num_slices"]) == ("tpu", "v5e:2x2", 4, 1)
  assert t["hbm_bytes_per_chip"] == 16 << 30 and t["fits"] is True
  # FSDP: every layer's gradients leave the layer loop's backward as a reduce-scatter, none as an all-reduce.
  scatter, reduce = result["collective_details"]["reduce-scatter"], result["collective_details"]["all-reduce"]
  assert scatter["in_loops"] >= cfg.model.num_layers and reduce["bytes"] < scatter["bytes"] / 10
  assert t["total_bytes"] == t["argument_bytes"] + t["output_bytes"] - t["alias_bytes"] + t["temp_bytes"] > 0
  assert t["temp_bytes"] == result["temp_bytes_per_device"]


def test_topology_mistakes_are_one_line_errors():
  """train.py refuses a bad --topology, --topology without --dry_run, and slices the mesh does not split over,
  each in one line and before anything is compiled."""
  import subprocess
  import sys

  def run(*args):
    proc = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir=/nonexistent/never", *args],
      capture_output=True,
      text=True,
      timeout=300,
    )
    return proc.returncode, proc.stderr.strip().splitlines()[-1]

  code, line = run("--dry_run", "--topology", "v7q:2x2")
  assert code == 1 and line.startswith("error: --topology v7q:2x2: unknown TPU family 'v7q'"), line
  code, line = run("--topology", "v5e:2x2")
  assert code == 1 and line == "error: --topology plans for a TPU slice that is not attached; add --dry_run", line
  pytest.importorskip("libtpu", reason="the TPU compiler comes with requirements-dev.txt (jax[tpu])")
  code, line = run("--dry_run", "--topology", "v5e:2x2", "--num_slices", "2")
  assert code == 1 and "the target has 2 slice(s) but config.mesh's dcn_* sizes multiply to 1" in line, line


def test_a_3d_pipeline_compiles_for_a_tpu_slice_without_permutes_in_stage_branches():
  """stage x fsdp x tensor (2 x 2 x 2) on 8 TPU v5e chips: every collective-permute of the TPU program runs on
  all devices (none inside a branch only some stages take, which would deadlock; tests/test_pipeline.py runs
  the same layout on emulated devices)."""
  pytest.importorskip("libtpu", reason="the TPU compiler comes with requirements-dev.txt (jax[tpu])")
  from parallel.hlo import collectives
  from parallel.target import tpu_target
  from trainer.plan import compile_train_step

  cfg = load_config_file("configs/tiny.py")
  cfg.mesh.data, cfg.mesh.stage, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 2, 2, 2
  _, compiled, _ = compile_train_step(cfg, tpu_target("v5e:2x4"))
  permutes = collectives(compiled.as_text())["collective-permute"]
  assert permutes["count"] > 0 and permutes["in_branches"] == 0


def test_a_step_larger_than_the_chip_is_a_one_line_error():
  """libtpu refuses to compile a program that does not fit the chip's memory; the plan says so in one line with the
  compiler's figures and what to change (tiny with 4096 sequences per v5e chip: about 96 GB of temporaries)."""
  pytest.importorskip("libtpu", reason="the TPU compiler comes with requirements-dev.txt (jax[tpu])")
  from parallel.target import tpu_target
  from settings import ConfigError
  from trainer.plan import compile_train_step

  cfg = load_config_file("configs/tiny.py")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.train.global_batch_size = 1, 4, 16_384
  with pytest.raises(ConfigError, match=r"does not fit on TPU v5 lite x 4: RESOURCE_EXHAUSTED: .*grad_accum") as e:
    compile_train_step(cfg, tpu_target("v5e:2x2"))
  assert "\n" not in str(e.value)
