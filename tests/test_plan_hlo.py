"""The collectives of optimized HLO (parallel/hlo.py): programs compiled here, where the counts and sizes follow from
the program's shapes, and hand-written text in the forms TPU and GPU compilers emit."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from parallel.hlo import OPS, collectives, shape_bytes


def _mesh():
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def _stats(count, size, loops=0, branches=0, unknown=0):
  return {"count": count, "bytes": size, "in_loops": loops, "in_branches": branches, "in_unknown_loops": unknown}


def _nonzero(result):
  return {op: stats for op, stats in result.items() if stats["count"]}


# ---------------------------------------------------------------------------------------------------------
# Compiled by XLA:CPU on the 8 emulated devices.


def _scan_of_psums(outer: int, inner: int, width: int) -> str:
  """A psum of f32[width] in a scan of `inner` steps inside a scan of `outer` steps. The carry feeds the psum, so
  XLA can neither hoist it out of the loops nor fold the steps together."""

  def step(c, x):
    return jnp.cos(c) + lax.psum(c * x, "x"), None

  def outer_step(c, xs):
    return lax.scan(step, c, xs)[0], None

  def f(xs):
    return lax.scan(outer_step, xs[0, 0], xs)[0]

  g = jax.jit(jax.shard_map(f, mesh=_mesh(), in_specs=P(), out_specs=P(), check_vma=False))
  return g.lower(jax.ShapeDtypeStruct((outer, inner, width), jnp.float32)).compile().as_text()


@pytest.mark.fast
def test_a_psum_inside_nested_scans_runs_once_per_trip():
  outer, inner, width = 3, 5, 24
  hlo = _scan_of_psums(outer, inner, width)
  # The text holds the psum once; the step runs it outer x inner times.
  assert len(re.findall(r" all-reduce\(", hlo)) == 1
  runs = outer * inner
  assert _nonzero(collectives(hlo)) == {"all-reduce": _stats(runs, runs * width * 4, loops=runs)}


def test_trip_counts_read_from_the_loop_counter_agree_with_xla():
  """TPU's optimized HLO has no known_trip_count: without it the count comes from the loop's counter, and must be
  the one XLA:CPU worked out."""
  hlo = _scan_of_psums(3, 5, 24)
  assert hlo.count('"known_trip_count"') == 2
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", hlo)
  assert '"known_trip_count"' not in stripped
  assert collectives(stripped) == collectives(hlo)


def test_a_matmul_with_sharded_weights_gathers_them():
  batch, d, f = 16, 64, 32
  mesh = _mesh()
  rows = NamedSharding(mesh, P("x", None))
  # FSDP: the batch and the weight's rows are split over the devices, so each device gathers the whole weight.
  matmul = jax.jit(lambda x, w: x @ w, in_shardings=(rows, rows), out_shardings=rows)
  hlo = matmul.lower(jax.ShapeDtypeStruct((batch, d), jnp.float32), jax.ShapeDtypeStruct((d, f), jnp.float32))
  assert _nonzero(collectives(hlo.compile().as_text())) == {"all-gather": _stats(1, d * f * 4)}


def test_permute_and_all_to_all_carry_their_operand():
  rows, width = 8 * 8, 6

  def f(x):
    y = lax.ppermute(x, "x", [(i, (i + 1) % 8) for i in range(8)])
    return lax.all_to_all(y, "x", 0, 0, tiled=True)

  g = jax.jit(jax.shard_map(f, mesh=_mesh(), in_specs=P("x"), out_specs=P("x")))
  hlo = g.lower(jax.ShapeDtypeStruct((rows, width), jnp.float32)).compile().as_text()
  shard = rows // 8 * width * 4
  once = _stats(1, shard)
  assert _nonzero(collectives(hlo)) == {"all-to-all": once, "collective-permute": once}


# ---------------------------------------------------------------------------------------------------------
# Written by hand in the forms XLA's TPU and GPU compilers print.


def _hlo(text: str) -> str:
  """HLO text from lines wrapped to fit this file: a line indented 4 or more spaces continues the one above."""
  return re.sub(r"\n {4,}", " ", text)


_SYNTHETIC = _hlo("""
HloModule synthetic, is_scheduled=true, entry_computation_layout={(f32[64,32]{1,0})->f32[16,32]{1,0}}

FileNames
1 "train.py"

FileLocations
1 {file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=1}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[]{:T(128)} parameter(0)
  %y = f32[]{:T(128)} parameter(1)
  ROOT %sum = f32[]{:T(128)} add(%x, %y)
}

%never_called (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %all-reduce.dead = f32[1024]{0} all-reduce(%p), channel_id=90, replica_groups={{0,1,2,3}}, to_apply=%add
}

%start_computation (param_0: bf16[2,32,32]) -> (bf16[2,32,32], bf16[2,32,128], s32[2], u32[]) {
  %param_0 = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} parameter(0)
  %all-gather.1 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)} all-gather(%param_0), channel_id=6,
      replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={2}, use_global_device_ids=true,
      frontend_attributes={chain_id="6"}
  ROOT %custom-call.1 = (bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)},
      s32[2]{0:S(4)}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.1 (param_0.1: bf16[2,32,32], param_1.1: bf16[2,32,128], param_2.1: s32[2], param_3.1: u32[],
      param_4.1: f32[8,8]) -> (f32[8,8], bf16[2,32,32], bf16[2,32,128], s32[2], u32[]) {
  %param_0.1 = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} parameter(0)
  %param_1.1 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} parameter(1)
  %all-gather.2 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} all-gather(%param_0.1), channel_id=6,
      replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={2}, use_global_device_ids=true,
      frontend_attributes={chain_id="6"}
  %param_2.1 = s32[2]{0:S(4)} parameter(2)
  %param_3.1 = u32[]{:S(2)} parameter(3)
  %param_4.1 = f32[8,8]{1,0:T(8,128)} parameter(4)
  %negate.1 = f32[8,8]{1,0:T(8,128)} negate(%param_4.1)
  ROOT %tuple.1 = (f32[8,8]{1,0:T(8,128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)},
      bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) tuple(%negate.1, %param_0.1,
      %all-gather.2, %param_2.1, %param_3.1)
}

%done_computation (param_0.2: bf16[2,32,32], param_1.2: bf16[2,32,128], param_2.2: s32[2],
      param_3.2: u32[]) -> bf16[2,32,128] {
  %param_0.2 = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} parameter(0)
  %param_1.2 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} parameter(1)
  %all-gather.3 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)} all-gather(%param_0.2), channel_id=6,
      replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={2}, use_global_device_ids=true,
      frontend_attributes={chain_id="6"}
  %param_2.2 = s32[2]{0:S(4)} parameter(2)
  %param_3.2 = u32[]{:S(2)} parameter(3)
  ROOT %custom-call.2 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} custom-call(%param_0.2, %param_1.2, %all-gather.3,
      %param_2.2, %param_3.2), custom_call_target="AsyncCollectiveDone"
}

%inner_body (inner.param: (s32[], bf16[2,32,32], f32[8,8])) -> (s32[], bf16[2,32,32], f32[8,8]) {
  %inner.param = (s32[]{:T(128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0:T(8,128)}) parameter(0)
  %inner.i = s32[]{:T(128)} get-tuple-element(%inner.param), index=0
  %inner.i.copy = s32[]{:T(128)S(6)} copy(%inner.i)
  %inner.one = s32[]{:T(128)} constant(1)
  %inner.next = s32[]{:T(128)} add(%inner.i.copy, %inner.one)
  %inner.w = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%inner.param), index=1
  %inner.x = f32[8,8]{1,0:T(8,128)} get-tuple-element(%inner.param), index=2
  %async-collective-start = (bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)},
      s32[2]{0:S(4)}, u32[]{:S(2)}) fusion(%inner.w), kind=kCustom, output_to_operand_aliasing={{0}: (0, {})},
      calls=%start_computation
  %gte.0 = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%async-collective-start), index=0
  %gte.1 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%async-collective-start), index=1
  %gte.2 = s32[2]{0:S(4)} get-tuple-element(%async-collective-start), index=2
  %gte.3 = u32[]{:S(2)} get-tuple-element(%async-collective-start), index=3
  %fusion.1 = (f32[8,8]{1,0:T(8,128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)},
      s32[2]{0:S(4)}, u32[]{:S(2)}) fusion(%gte.0, %gte.1, %gte.2, %gte.3, %inner.x), kind=kCustom,
      calls=%async_collective_fusion.1,
      backend_config={"continuation_config":{"operand_original_start":"4","operand_original_end":"5"}}
  %gte.4 = f32[8,8]{1,0:T(8,128)} get-tuple-element(%fusion.1), index=0
  %gte.5 = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%fusion.1), index=1
  %gte.6 = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%fusion.1), index=2
  %gte.7 = s32[2]{0:S(4)} get-tuple-element(%fusion.1), index=3
  %gte.8 = u32[]{:S(2)} get-tuple-element(%fusion.1), index=4
  %async-collective-done = bf16[2,32,128]{1,0,2:T(2,128)(2,1)S(1)} fusion(%gte.5, %gte.6, %gte.7, %gte.8),
      kind=kCustom, calls=%done_computation
  ROOT %inner.result = (s32[]{:T(128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)},
      f32[8,8]{1,0:T(8,128)}) tuple(%inner.next, %inner.w, %gte.4)
}

%inner_condition (inner.cparam: (s32[], bf16[2,32,32], f32[8,8])) -> pred[] {
  %inner.limit = s32[]{:T(128)} constant(5)
  %inner.cparam = (s32[]{:T(128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0:T(8,128)}) parameter(0)
  %inner.ci = s32[]{:T(128)} get-tuple-element(%inner.cparam), index=0
  ROOT %inner.lt = pred[]{:T(512)} compare(%inner.ci, %inner.limit), direction=LT
}

%outer_body (outer.param: (s32[], bf16[2,32,32], f32[8,8], f32[8,16])) -> (s32[], bf16[2,32,32], f32[8,8],
      f32[8,16]) {
  %outer.param = (s32[], bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %outer.i = s32[] get-tuple-element(%outer.param), index=0
  %outer.one = s32[] constant(1)
  %outer.next = s32[] add(%outer.i, %outer.one)
  %outer.w = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} get-tuple-element(%outer.param), index=1
  %outer.x = f32[8,8]{1,0} get-tuple-element(%outer.param), index=2
  %outer.shard = f32[8,16]{1,0} get-tuple-element(%outer.param), index=3
  %zero = s32[]{:T(128)} constant(0)
  %zero.copy = s32[]{:T(128)} copy(%zero)
  %inner.init = (s32[]{:T(128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0:T(8,128)}) tuple(%zero.copy,
      %outer.w, %outer.x)
  %inner.loop = (s32[]{:T(128)}, bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0:T(8,128)}) while(%inner.init),
      condition=%inner_condition, body=%inner_body
  %inner.out = f32[8,8]{1,0} get-tuple-element(%inner.loop), index=2
  %all-gather-start = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%outer.shard), channel_id=8,
      replica_groups={{0,1,2,3}}, dimensions={0}, use_global_device_ids=true
  %all-gather-done = f32[32,16]{1,0} all-gather-done(%all-gather-start)
  ROOT %outer.result = (s32[], bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0},
      f32[8,16]{1,0}) tuple(%outer.next, %outer.w, %inner.out, %outer.shard)
}

%outer_condition (outer.cparam: (s32[], bf16[2,32,32], f32[8,8], f32[8,16])) -> pred[] {
  %outer.cparam = (s32[], bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %outer.ci = s32[] get-tuple-element(%outer.cparam), index=0
  %outer.limit = s32[] constant(3)
  ROOT %outer.lt = pred[] compare(%outer.ci, %outer.limit), direction=LT
}

%open_body (open.param: (s32[], s32[], f32[256])) -> (s32[], s32[], f32[256]) {
  %open.param = (s32[], s32[], f32[256]{0}) parameter(0)
  %open.i = s32[] get-tuple-element(%open.param), index=0
  %open.n = s32[] get-tuple-element(%open.param), index=1
  %open.one = s32[] constant(1)
  %open.next = s32[] add(%open.i, %open.one)
  %open.v = f32[256]{0} get-tuple-element(%open.param), index=2
  %collective-permute-start = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%open.v), channel_id=1,
      source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %collective-permute-done = f32[256]{0} collective-permute-done(%collective-permute-start)
  ROOT %open.result = (s32[], s32[], f32[256]{0}) tuple(%open.next, %open.n, %collective-permute-done)
}

%open_condition (open.cparam: (s32[], s32[], f32[256])) -> pred[] {
  %open.cparam = (s32[], s32[], f32[256]{0}) parameter(0)
  %open.ci = s32[] get-tuple-element(%open.cparam), index=0
  %open.cn = s32[] get-tuple-element(%open.cparam), index=1
  ROOT %open.lt = pred[] compare(%open.ci, %open.cn), direction=LT
}

%scatter_fusion (p0: f32[64,32]) -> f32[16,32] {
  %p0 = f32[64,32]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[16,32]{1,0} reduce-scatter(%p0), channel_id=3, replica_groups={{0,1,2,3}},
      dimensions={0}, to_apply=%add
}

%wrapped_reduce_scatter (param.w: f32[64,32]) -> f32[16,32] {
  %param.w = f32[64,32]{1,0} parameter(0)
  ROOT %reduce-scatter.2 = f32[16,32]{1,0} reduce-scatter(%param.w), channel_id=7, replica_groups={{0,1,2,3}},
      dimensions={0}, to_apply=%add
}

%all-reduce-scatter.1 (input: bf16[512,1024]) -> bf16[128,1024] {
  %input = bf16[512,1024]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-reduce.2 = bf16[512,1024]{1,0:T(8,128)(2,1)} all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}},
      use_global_device_ids=true, to_apply=%add
  %partition-id = u32[] partition-id()
  %rows = u32[] constant(128)
  %offset = u32[]{:T(128)} multiply(%partition-id, %rows)
  %origin = u32[] constant(0)
  ROOT %dynamic-slice = bf16[128,1024]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.2, %offset, %origin),
      dynamic_slice_sizes={128,1024}
}

%branch_0 (b0: f32[4]) -> f32[4] {
  %b0 = f32[4]{0} parameter(0)
  ROOT %all-to-all.1 = f32[4]{0} all-to-all(%b0), channel_id=11, replica_groups={{0,1,2,3}}, dimensions={0}
}

%branch_1 (b1: f32[4]) -> f32[4] {
  %b1 = f32[4]{0} parameter(0)
  ROOT %collective-broadcast.1 = f32[4]{0} collective-broadcast(%b1), channel_id=12, replica_groups={{0,1,2,3}}
}

ENTRY %main (big: f32[64,32], grad: bf16[512,1024], w: bf16[2,32,32], x: f32[8,8], shard: f32[8,16], v: f32[256],
      n: s32[], which: s32[], small: f32[4], flags: pred[16], tokens: bf16[32,8], out: bf16[64,8],
      sizes: s64[4]) -> f32[16,32] {
  %big = f32[64,32]{1,0} parameter(0)
  %grad = bf16[512,1024]{1,0:T(8,128)(2,1)} parameter(1)
  %w = bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)} parameter(2)
  %x = f32[8,8]{1,0} parameter(3)
  %shard = f32[8,16]{1,0} parameter(4)
  %v = f32[256]{0} parameter(5)
  %n = s32[] parameter(6)
  %which = s32[] parameter(7)
  %small = f32[4]{0} parameter(8)
  %flags = pred[16]{0} parameter(9)
  %tokens = bf16[32,8]{1,0} parameter(10)
  %out = bf16[64,8]{1,0} parameter(11)
  %sizes = s64[4]{0} parameter(12)
  %after-all = token[] after-all()
  %start = s32[] constant(0)
  %outer.init = (s32[], bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0}, f32[8,16]{1,0}) tuple(%which, %w, %x,
      %shard)
  %outer.loop = (s32[], bf16[2,32,32]{1,0,2:T(2,128)(2,1)S(1)}, f32[8,8]{1,0}, f32[8,16]{1,0}) while(%outer.init),
      condition=%outer_condition, body=%outer_body,
      backend_config={"known_trip_count":{"n":"3"}}
  %open.init = (s32[], s32[], f32[256]{0}) tuple(%start, %n, %v)
  %open.loop = (s32[], s32[], f32[256]{0}) while(%open.init), condition=%open_condition, body=%open_body
  %fusion.rs = f32[16,32]{1,0} fusion(%big), kind=kCustom, calls=%scatter_fusion
  %async-start = ((f32[64,32]{1,0}), f32[16,32]{1,0}, s32[]) async-start(%big), calls=%wrapped_reduce_scatter
  %async-done = f32[16,32]{1,0} async-done(%async-start), calls=%wrapped_reduce_scatter
  %fusion.ars = bf16[128,1024]{1,0:T(8,128)(2,1)} fusion(%grad), kind=kCustom, calls=%all-reduce-scatter.1,
      backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  %branched = f32[4]{0} conditional(%which, %small, %small), branch_computations={%branch_0, %branch_1}
  %all-reduce-start = f32[8,8]{1,0} all-reduce-start(%x), channel_id=20, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-done = f32[8,8]{1,0} all-reduce-done(%all-reduce-start)
  %variadic = (f32[4]{0}, pred[16]{0}, /*index=2*/bf16[32,8]{1,0}) all-reduce(%small, %flags, /*index=2*/%tokens),
      channel_id=21, replica_groups={{0,1,2,3}}, to_apply=%add
  %ragged = bf16[64,8]{1,0} ragged-all-to-all(%tokens, %out, %sizes, %sizes, %sizes, %sizes), channel_id=22,
      replica_groups={{0,1,2,3}}
  ROOT %result = f32[16,32]{1,0} add(%fusion.rs, %async-done)
}
""")


@pytest.mark.fast
def test_synthetic_tpu_and_gpu_forms():
  gathered = 2 * 32 * 128 * 2  # the async collective fusion's all-gather result, bf16[2,32,128]
  assert _nonzero(collectives(_SYNTHETIC)) == {
    # all-reduce-start f32[8,8] once; the variadic all-reduce f32[4] + pred[16] + bf16[32,8] once.
    "all-reduce": _stats(2, 8 * 8 * 4 + (4 * 4 + 16 + 32 * 8 * 2)),
    # TPU's async collective fusion (start, continuation, done) in the inner loop: 5 trips (its counter) x 3 outer
    # trips (known_trip_count: the outer counter starts from a parameter); GPU's all-gather-start of f32[32,16] in
    # the outer loop: 3 trips.
    "all-gather": _stats(15 + 3, 15 * gathered + 3 * 32 * 16 * 4, loops=18),
    # In a fusion and behind an async-start, f32[64,32] each; TPU's all-reduce-scatter fusion of bf16[512,1024].
    "reduce-scatter": _stats(3, 2 * 64 * 32 * 4 + 512 * 1024 * 2),
    # One conditional's two branches, each once, flagged: one of the two runs.
    "all-to-all": _stats(1, 16, branches=1),
    "collective-broadcast": _stats(1, 16, branches=1),
    "ragged-all-to-all": _stats(1, 32 * 8 * 2),
    # A loop bounded by a parameter: trips unknown, counted once and flagged.
    "collective-permute": _stats(1, 256 * 4, loops=1, unknown=1),
  }
  assert list(collectives(_SYNTHETIC)) == list(OPS)


def test_computations_nothing_calls_are_not_counted():
  # %never_called holds an all-reduce of f32[1024]; once ENTRY calls it, it counts.
  call = "  %called = f32[1024]{0} call(%v), to_apply=%never_called\n"
  reached = _SYNTHETIC.replace("  ROOT %result", call + "  ROOT %result")
  before, after = collectives(_SYNTHETIC)["all-reduce"], collectives(reached)["all-reduce"]
  assert (after["count"] - before["count"], after["bytes"] - before["bytes"]) == (1, 1024 * 4)


def test_sparsecore_computations_end_with_their_thread():
  """v5p programs (mixtral_8x7b's dropless MoE) offload scatters to SparseCore: those computations close with
  `}, execution_thread="sparsecore"`, ENTRY reaches them through an asynchronous `call-start`, and an instruction's
  attributes may continue on a line that starts `}}, `. The computations after them still parse and count."""
  text = _hlo("""
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}, execution_thread="sparsecore"

%offloaded (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%a), channel_id=2, replica_groups={{0,1}}, to_apply=%add, backend_config={"x":{
}}, metadata={op_name="continued"}
}, execution_thread="sparsecore"

%fused (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  ROOT %ag = f32[16]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

ENTRY %main (v: f32[16], w: f32[8]) -> f32[16] {
  %v = f32[16]{0} parameter(0)
  %w = f32[8]{0} parameter(1)
  %start = ((f32[8]{0}), f32[8]{0}, u32[]) call-start(%w), async_execution_thread="sparsecore",
      to_apply=%offloaded
  %done = f32[8]{0} call-done(%start)
  ROOT %f = f32[16]{0} fusion(%v), kind=kLoop, calls=%fused
}
""")
  assert _nonzero(collectives(text)) == {"all-reduce": _stats(2, 16 * 4 + 8 * 4)}


def test_collectives_between_slices_count_their_sends():
  """Over DCN libtpu lowers a collective to a send and a recv that the multi-slice runtime carries (llama_70b's
  stage-to-stage ppermute, 2 per pipeline tick, and the stage-replicated embedding's gradient psum): each send
  counts as its collective, with the array it sends; a send without the runtime's attributes is no collective."""
  megascale = '_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type'
  text = _hlo(f"""
%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {{
  %p = (s32[], bf16[4,8]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,8]{{1,0}} get-tuple-element(%p), index=1
  %token = token[] after-all()
  %send = (bf16[4,8]{{1,0}}, u32[], token[]) send(%x, %token), channel_id=2, is_host_transfer=true,
      frontend_attributes={{{megascale}="ONE_TO_ONE"}}
  %recv = (bf16[4,8]{{1,0}}, u32[], token[]) recv(%token), channel_id=1, is_host_transfer=true,
      frontend_attributes={{{megascale}="ONE_TO_ONE"}}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true
  %recv-done = (bf16[4,8]{{1,0}}, token[]) recv-done(%recv), channel_id=1, is_host_transfer=true
  %y = bf16[4,8]{{1,0}} get-tuple-element(%recv-done), index=0
  ROOT %r = (s32[], bf16[4,8]{{1,0}}) tuple(%i, %y)
}}

%cond (q: (s32[], bf16[4,8])) -> pred[] {{
  %q = (s32[], bf16[4,8]{{1,0}}) parameter(0)
  ROOT %c = pred[] constant(true)
}}

ENTRY %main (v: f32[16], w: bf16[4,8]) -> f32[16] {{
  %v = f32[16]{{0}} parameter(0)
  %w = bf16[4,8]{{1,0}} parameter(1)
  %zero = s32[] constant(0)
  %t = (s32[], bf16[4,8]{{1,0}}) tuple(%zero, %w)
  %loop = (s32[], bf16[4,8]{{1,0}}) while(%t), condition=%cond, body=%body,
      backend_config={{"known_trip_count":{{"n":"34"}}}}
  %token = token[] after-all()
  %psum = (f32[16]{{0}}, u32[], token[]) send(%v, %token), channel_id=3, is_host_transfer=true,
      frontend_attributes={{{megascale}="ALL_REDUCE",_xla_megascale_reduce_operation="SUM"}}
  %host = (f32[16]{{0}}, u32[], token[]) send(%v, %token), channel_id=4, is_host_transfer=true
  %psum-done = token[] send-done(%psum), channel_id=3, is_host_transfer=true
  ROOT %out = f32[16]{{0}} copy(%v)
}}
""")
  assert _nonzero(collectives(text)) == {
    "collective-permute": _stats(34, 34 * 4 * 8 * 2, loops=34),
    "all-reduce": _stats(1, 16 * 4),
  }


def test_a_counter_that_counts_down_or_up_to_an_inclusive_limit():
  def trips(init, step, direction, limit, op="add"):
    text = f"""
%add (x: f32[], y: f32[]) -> f32[] {{
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %p = (s32[], f32[4]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %step = s32[] constant({step})
  %next = s32[] {op}(%i, %step)
  %v = f32[4]{{0}} get-tuple-element(%p), index=1
  %ar = f32[4]{{0}} all-reduce(%v), channel_id=1, replica_groups={{{{0,1}}}}, to_apply=%add
  ROOT %r = (s32[], f32[4]{{0}}) tuple(%next, %ar)
}}

%cond (q: (s32[], f32[4])) -> pred[] {{
  %q = (s32[], f32[4]{{0}}) parameter(0)
  %limit = s32[] constant({limit})
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %c = pred[] compare(%limit, %j), direction={direction}
}}

ENTRY %main (v0: f32[4]) -> (s32[], f32[4]) {{
  %v0 = f32[4]{{0}} parameter(0)
  %init = s32[] constant({init})
  %t = (s32[], f32[4]{{0}}) tuple(%init, %v0)
  ROOT %loop = (s32[], f32[4]{{0}}) while(%t), condition=%cond, body=%body
}}
"""
    stats = collectives(text)["all-reduce"]
    return None if stats["in_unknown_loops"] else stats["count"]

  # The condition is written `limit ? i`: `limit > i` is `i < limit`.
  assert trips(0, 1, "GT", 7) == 7  # i = 0..6
  assert trips(2, 3, "GT", 11) == 3  # i = 2, 5, 8
  assert trips(2, 3, "GE", 11) == 4  # i = 2, 5, 8, 11
  assert trips(10, 2, "LT", 0, op="subtract") == 5  # i = 10, 8, 6, 4, 2
  assert trips(10, -2, "LE", 0) == 6  # i = 10, 8, ..., 0
  assert trips(5, 1, "GT", 3) == 0  # never entered
  assert trips(0, 1, "EQ", 3) is None  # not a counted loop


@pytest.mark.parametrize(
  "shape, size",
  [
    ("bf16[4,128,256]{2,1,0}", 4 * 128 * 256 * 2),
    ("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", 8 * 128 * 2),  # TPU tiling: logical size
    ("(f32[2], bf16[3,4])", 2 * 4 + 3 * 4 * 2),
    ("(pred[], (s32[2]{0}, token[]))", 1 + 2 * 4),
    ("pred[7]", 7),
    ("token[]", 0),
    ("f32[]", 4),
    ("s4[3]", 2),  # packed: 12 bits
    ("f8e4m3fn[10]", 10),
    ("c64[2]", 16),
    ("f32[<=8]", 32),  # a bounded dynamic dimension at its bound
  ],
)
def test_shape_bytes(shape, size):
  assert shape_bytes(shape) == size


def test_unknown_element_types_and_missing_entry_are_errors():
  with pytest.raises(ValueError, match="unknown HLO element type 'mystery'"):
    shape_bytes("mystery[2]")
  with pytest.raises(ValueError, match="no ENTRY computation"):
    collectives("HloModule m\n\n%f (p: f32[]) -> f32[] {\n  ROOT %p = f32[] parameter(0)\n}\n")
