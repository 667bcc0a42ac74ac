"""CUDA builds without a GPU: the schedules apply, CUDA source is generated, nvcc compiles it."""

import json
import re
import subprocess

import pytest
import tvm

from tvmflash import KernelSpec, build, lower
from tvmflash.compiler import passes
from tvmflash.rules import fused_cuda_mma as S
from tvmflash.tuning import records

from conftest import NVCC
from helpers import cuda_source, spec_id

#: the mma.sync kernel is what these tests read at the H100 target too (``without_hopper``)
pytestmark = pytest.mark.usefixtures("without_hopper")

VARIANTS = [
    dict(head_dim=64, dtype="float16", causal=False, group=1),
    dict(head_dim=128, dtype="float16", causal=True, group=1),
    dict(head_dim=128, dtype="bfloat16", causal=False, group=4),
    dict(head_dim=64, dtype="bfloat16", causal=True, group=8),
]
#: The other head dims, one target each (the targets' code differs in the arch only)
OTHER_HEAD_DIMS = [
    dict(head_dim=32, dtype="float16", causal=True, group=2, target="nvidia/nvidia-a100"),
    dict(head_dim=96, dtype="bfloat16", causal=False, group=1, target="nvidia/nvidia-h100"),
    dict(head_dim=256, dtype="float16", causal=True, group=1, target="nvidia/nvidia-a100"),
    dict(head_dim=256, dtype="bfloat16", causal=False, group=4, target="nvidia/nvidia-h100"),
]
CASES = [{**v, "target": t} for t in ("nvidia/nvidia-a100", "nvidia/nvidia-h100") for v in VARIANTS] + OTHER_HEAD_DIMS


@pytest.mark.parametrize("variant", CASES, ids=lambda v: spec_id(KernelSpec(**v)))
def test_fused_kernel_builds_for_cuda(tmp_path, variant):
    spec = KernelSpec(**variant)
    so, manifest = build(spec, tmp_path, device_code="source")  # the CUDA is what is checked
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    kernels = dict(_kernels(cu))
    assert len(kernels) == 1, f"the fused attention is one kernel, got {sorted(kernels)}"
    # no global buffer besides q, k, v, o, lse: S and P never leave the chip
    pointers = re.findall(r"\* __restrict__ (\w+)_ptr", next(iter(kernels.values())))
    assert sorted(pointers) == ["K", "LSE", "O", "Q", "V"]
    # every variant here runs on tensor cores, bfloat16 through tvmflash's own intrinsics
    ptx_type = {"float16": "f16", "bfloat16": "bf16"}[spec.dtype]
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32" in cu and "ldmatrix" in cu
    # K and V arrive by cp.async where the config (hand or tuned) pipelines the K/V loop: 16-byte
    # copies bypass L1 (.cg), narrower ones (vec 4: 8 bytes) cannot (.ca)
    config = json.loads(open(manifest).read())["schedule"]["config"]
    copy = {8: "cp.async.cg.shared.global", 4: "cp.async.ca.shared.global"}.get(config["vec"], "cp.async")
    assert (copy in cu) == (config["stages"] == 2), config


def _kernels(cu: str):
    """(name, parameter list) of each __global__ function (declarations and definitions)."""
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', cu)


def test_standard_goes_through_global_memory(tmp_path):
    spec = KernelSpec(128, target="nvidia/nvidia-a100", algorithm="standard")
    build(spec, tmp_path, device_code="source")
    kernels = dict(_kernels((tmp_path / (spec.key + ".cu")).read_text()))
    for stage in ("qk", "softmax", "pv"):
        assert any(name.startswith(stage) for name in kernels), f"no {stage} kernel in {sorted(kernels)}"
    writes_s = [n for n, params in kernels.items() if n.startswith("qk") and "S_ptr" in params]
    reads_p = [n for n, params in kernels.items() if n.startswith("pv") and "P_ptr" in params]
    assert writes_s and reads_p, "S and P must be global buffers in the standard algorithm"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("target", ["nvidia/nvidia-a100", "nvidia/nvidia-h100"])
def test_every_head_dim_takes_the_tensor_cores(target, dtype):
    """Each supported head dim is served by the tensor-core rule, the plain schedule by none."""
    from tvmflash.rules import rule_for
    from tvmflash.spec import SUPPORTED_HEAD_DIMS

    rules = {d: rule_for(KernelSpec(d, dtype, target=target)).name for d in SUPPORTED_HEAD_DIMS}
    assert rules == {d: "fused_cuda_mma" for d in SUPPORTED_HEAD_DIMS}


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("head_dim, rows, spills", [(32, 32, 0), (96, 32, None), (256, 16, 0)])
def test_new_head_dims_compile_with_their_tiles_in_registers(head_dim, rows, spills):
    """Head dims 32 and 96 (warps of 32 rows) and 256 (warps of 16 rows: half the accumulator a
    thread) compile for sm_80 and sm_90 with cp.async loads and their fragments in registers: no
    spills at 32 and 256, at most ``SPILL_BUDGET`` bytes at 96 (255 registers); the hand config."""
    from tvmflash.compiler import nvcc

    spills = SPILL_BUDGET if spills is None else spills
    spec = KernelSpec(head_dim, causal=True, target="nvidia/nvidia-a100")
    config = S.RULE.default_config(spec)
    assert config.block_m // config.num_warps == rows
    cu = cuda_source(spec, config)
    assert f"__launch_bounds__({32 * config.num_warps})" in cu and "cp.async.cg.shared.global" in cu
    for arch, kernels in nvcc.resources(cu, ["sm_80", "sm_90"]).items():
        for r in kernels.values():
            assert r.spill_stores <= spills and r.stack_frame <= spills, (arch, r)


def test_sixteen_rows_a_warp_need_the_pipelined_loads():
    """TVM 0.27 cannot compile synchronous K/V loads with 16 rows a warp: the config says so, and
    the 16-row space (head dim 256) does not offer them."""
    from tvmflash.tuning import space as SP

    with pytest.raises(ValueError, match=r"stages: synchronous K/V loads \(stages=1\) with 16 rows a warp"):
        S.FlashConfig(block_m=64, block_n=64, num_warps=4, stages=1)
    assert S.FlashConfig(block_m=128, block_n=64, num_warps=4, stages=1).stages == 1
    space = SP.space_for(KernelSpec(256, target="nvidia/nvidia-h100"))
    assert all(c.stages == 2 and c.block_m == 16 * c.num_warps for t in space.tiles for c in space.configs(t))


def test_softcap_kernel_builds_for_cuda():
    """A softcap kernel on tensor cores: the cap is a kernel parameter after sm_scale, the scores
    go through tanh on the fragments."""
    spec = KernelSpec(128, causal=True, softcap=True, target="nvidia/nvidia-h100")
    cu = cuda_source(spec)
    (params,) = dict(_kernels(cu)).values()
    assert re.search(r"float sm_scale, float softcap", params), params
    assert "tanhf(" in cu and "mma.sync.aligned.m16n8k16" in cu


def test_window_kernel_runs_its_inside_tiles_unmasked(causal=True):
    """A sliding window on tensor cores: the edges are int32 kernel parameters, and the K/V loop
    splits in three (``compiler.passes.unmask_full_kv_tiles``): the first tiles with the window's
    left edge in them masked, the tiles wholly inside it unmasked, the last ones (the right edge,
    the diagonal) masked. (Causal, Mistral's case; the non-causal window's two edges are the
    derivation's test.)"""
    spec = KernelSpec(64, causal=causal, window=True, target="nvidia/nvidia-h100")
    loops, func = _loops_after_unmask(spec)
    scalars = [(p.name, str(p.ty.dtype)) for p in func.params if p.name.startswith("window")]
    assert scalars == [("window_left", "int32")] + ([] if causal else [("window_right", "int32")]), scalars
    masks = {name: _live_masks(loop.body) for name, loop in loops.items()}
    assert set(masks) == {"kb", "kb_inside", "kb_masked"}, masks
    assert masks["kb_inside"] == 0 and masks["kb"] > 0 and masks["kb_masked"] > 0, masks


def test_window_kernels_build_where_a_part_never_runs_and_where_guards_need_the_window():
    """A static shape of one query tile leaves the window's inside part empty (left out, as the
    two-way split does: LowerWarpMemory fails on the unused fragment copies); a tuning workload
    (static shape, nominal window) keeps the pipeline's guards in each part unless they are
    proved before the split ("Cannot insert syncs inside condition")."""
    from tvmflash.compiler import compile_module
    from tvmflash.tuning import space as SP

    spec = KernelSpec(64, causal=True, window=True, target="nvidia/nvidia-h100")
    assert "__global__" in cuda_source(spec.replace(shape=(1, 128, 128, 4)))
    rule = S.RULE
    rule.prepare(spec)
    config = rule.default_config(spec)
    mod = SP.workload(spec, rule.tile(config), SP.default_shape(spec))
    compile_module(rule.apply(mod["main"], config).mod, spec.tvm_target, rule.pass_config(spec))


def test_a_d256_static_shape_of_one_kv_tile_builds_on_the_next_rule():
    """At 16 rows a warp a K/V loop of one trip fails in TVM's LowerWarpMemory, so the tensor-core
    rule leaves a static shape whose keys fit one tile to the one-thread-per-row rule; one more key
    and it is the tensor-core rule's again."""
    from tvmflash.rules import rule_for

    one = KernelSpec(256, causal=True, target="nvidia/nvidia-h100", shape=(1, 300, 64, 2))
    assert rule_for(one).name == "fused_cuda_plain"
    assert "__global__" in cuda_source(one)
    assert rule_for(one.replace(shape=(1, 300, 65, 2))).name == "fused_cuda_mma"
    assert rule_for(one.replace(shape=None)).name == "fused_cuda_mma"


def test_alibi_kernel_builds_for_cuda():
    """ALiBi on tensor cores: the slopes are a float32 buffer of the kernel, read by the score."""
    spec = KernelSpec(128, alibi=True, target="nvidia/nvidia-h100")
    cu = cuda_source(spec)
    (params,) = dict(_kernels(cu)).values()
    assert "float* __restrict__ alibi_slopes_ptr" in params, params
    assert "alibi_slopes_ptr[" in cu and "mma.sync.aligned.m16n8k16" in cu


def _loops_after_unmask(spec):
    """({name: For} of the K/V loops, the kernel) right after ``tvmflash.UnmaskFullKVTiles``
    (hand config)."""
    from tvmflash.compiler import lower_to_device

    with records.tuning_logs_off():
        lowered = lower(spec)
    after = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "tvmflash.UnmaskFullKVTiles":
                after["func"] = next(iter(mod.functions.values()))

    lower_to_device(lowered.mod, spec.tvm_target, lowered.pass_config, instruments=[Capture()])
    loops = {}
    _kv_loops(after["func"].body, loops)
    return loops, after["func"]


def test_lowered_tir_keeps_block_names():
    """The definition's block names survive the schedule (the tensorized GEMMs as ``<name>_o``)."""
    lowered = lower(KernelSpec(32, target="nvidia/nvidia-a100"))
    script = lowered.mod.script()
    for name in ("tile", "row_max", "running_max", "row_sum", "O_store", "lse_store"):
        assert f'T.sblock("{name}")' in script, name
    for name in ("S_gemm", "O_gemm"):  # tensorized
        assert f'T.sblock("{name}_o")' in script, name


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_tensor_core_kernel_within_register_budget(tmp_path, arch):
    """The generated CUDA is valid for nvcc as well as NVRTC, and the tensor-core kernel keeps
    its tiles in registers. Since the softmax moved onto the fragments (S, P f32 and P f16 in
    registers beside acc_o), ptxas spills a few cold scalars at 255 registers; the bound below
    keeps that from growing unnoticed (docs/performance.md). The hand config, so that the bound
    follows the schedule: a tuned record may pick another load width."""
    spec = KernelSpec(128, causal=True, target="nvidia/nvidia-a100")
    with records.tuning_logs_off():
        build(spec, tmp_path, device_code="source")  # ptxas runs below, on the source
    cu = tmp_path / (spec.key + ".cu")
    res = subprocess.run(
        [NVCC, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(cu)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"Used \d+ registers", res.stderr), res.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stderr)]
    assert spills and max(spills) <= SPILL_BUDGET, res.stderr
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", res.stderr)]
    assert frames and max(frames) <= SPILL_BUDGET, res.stderr


#: Bytes of spill stores / stack the tensor-core kernel may use (head dim 128 causal, hand config,
#: the plain flags above): a few cold scalars spill at the fast tile, as in FlashAttention-2's own
#: kernel; the bound keeps it from growing unnoticed (the figures: docs/performance.md).
SPILL_BUDGET = 80


@pytest.mark.parametrize("head_dim, causal", [(64, False), (64, True), (128, False), (128, True), (256, False),
                                              (256, True)])
def test_only_boundary_tiles_pay_for_the_mask(head_dim, causal):
    """The K/V loop of the pipelined kernel (its steady state; the last tile runs after it) keeps
    no key-bound mask, and causal splits it in two: tiles below the diagonal without the mask,
    the diagonal tiles with it (``compiler.passes.unmask_full_kv_tiles``). The any-length build,
    hand config; the masks stay where they are due: in the masked loop and in the last tile."""
    spec = KernelSpec(head_dim, causal=causal, target="nvidia/nvidia-h100")
    loops, func = _loops_after_unmask(spec)
    masks = {name: _live_masks(loop.body) for name, loop in loops.items()}
    assert masks.get("kb") == 0, masks  # the unmasked tiles
    if causal:
        assert masks.get("kb_masked", 0) > 0, masks  # the diagonal tiles
        terms = [t for c, _ in passes.mask_conditions(loops["kb_masked"].body) for t in passes.and_terms(c)
                 if not isinstance(t, tvm.tirx.IntImm)]
        assert not any("seq_k" in str(t) and " < seq_k" in str(t) for t in terms), terms  # key bound dropped
    else:
        assert set(masks) == {"kb"}, masks
    assert _live_masks(func.body) > sum(masks.values())  # the last tile's


def _live_masks(stmt) -> int:
    """Masks (``Select(visible, s, -inf)``) in ``stmt`` whose condition is not constant true."""
    from tvm import tirx

    conds = [c for c, _ in passes.mask_conditions(stmt)]
    return sum(any(not isinstance(t, tirx.IntImm) for t in passes.and_terms(c)) for c in conds)


def _kv_loops(stmt, found: dict):
    """{loop variable name: For} of the loops over K/V tiles (``kb``, ``kb_masked``)."""
    from tvm import tirx

    if isinstance(stmt, tirx.For) and stmt.loop_var.name.startswith("kb"):
        found[stmt.loop_var.name] = stmt
        return
    for child in (getattr(stmt, "seq", None) or [getattr(stmt, "body", None), getattr(stmt, "then_case", None),
                                                 getattr(stmt, "else_case", None)]):
        if child is not None:
            _kv_loops(child, found)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_any_length_build_keeps_its_fragments_in_registers(tmp_path, monkeypatch):
    """The any-length build asks nvcc to unroll its fragment loops (``UNROLL_CONFIG`` in its rule's
    pass config); the even build leaves them to nvcc. Without the pragmas nvcc left loops of the
    head-dim-64 causal any-length build with a 128x128 tile (the committed sm90a record's) rolled,
    and its fragments went to local memory (a 1904-byte stack frame)."""
    from tvmflash.compiler import nvcc

    config = S.FlashConfig(128, 128, 4, vec=4)
    sources = {even: cuda_source(KernelSpec(64, causal=True, even=even, target="nvidia/nvidia-h100"), config)
               for even in (False, True)}
    assert "#pragma unroll" in sources[False] and "#pragma unroll" not in sources[True]
    frame = nvcc.resources(sources[False], ["sm_90"])["sm_90"]["main_kernel"].stack_frame
    assert frame <= SPILL_BUDGET, f"{frame} bytes of stack frame"


@pytest.mark.parametrize("target", ["nvidia/nvidia-a100", "nvidia/nvidia-h100"])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_schedule(tmp_path, target, causal):
    """head_dim 128, float16: the tensor-core schedule (ldmatrix + mma.sync), fragments lowered
    to registers (TVM's LowerWarpMemory run until none is left 32x oversized: the software
    pipeline's epilogue holds its own copies of the Q/K/V fragments, ``..._warp_ptr_1``)."""
    spec = KernelSpec(128, causal=causal, group=2, target=target)
    _, manifest = build(spec, tmp_path, device_code="source")
    assert json.loads(open(manifest).read())["schedule"]["rule"] == "fused_cuda_mma"
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    assert "mma.sync.aligned.m16n8k16" in cu and "ldmatrix" in cu
    arrays = {name: int(n) for name, n in re.findall(r"alignas\(\d+\) \w+ (\w+_warp_ptr\w*)\[(\d+)\]", cu)}
    assert arrays, "no fragment arrays found"
    # per thread: acc_o 2x8 fragments x 8 floats, acc_s 2x4 x 8, operand fragments <= 64
    assert arrays["acc_o_warp_ptr"] == 128 and arrays["acc_s_warp_ptr"] == 64, arrays
    assert max(arrays.values()) <= 128, arrays
    # the softmax runs on the fragments: P is handed to the second GEMM in registers
    # (no ldmatrix of P from shared memory), 64 halves per thread
    assert arrays.get("P_tile_warp_ptr") == 64, arrays
    assert "P_tile_shared" not in cu


def test_plain_schedule_binds_query_rows_to_threads():
    """The plain CUDA schedule gives each thread one query row in every stage, including the
    row reductions that sit in scope blocks of their own (binding the key loop there instead
    compiles, and computes garbage: caught only on a GPU before this test)."""
    from tvmflash.rules import fused_cuda_plain as P

    spec = KernelSpec(32, target="nvidia/nvidia-a100")
    config = P.RULE.default_config(spec)
    script = P.RULE.apply(P.RULE.definition(spec, P.RULE.tile(config)), config).mod.script()
    for scope in ("row_max_tile", "row_sum_tile"):
        body = script[script.index(f'T.sblock("{scope}")'):][:600]
        bound = re.search(r"for (\w+) in T\.thread_binding\(\d+, thread=\"threadIdx\.x\"\)", body)
        assert bound and bound.group(1) == "i", body


@pytest.mark.xfail(
    strict=True,
    raises=tvm.error.InternalError,
    reason="TVM 0.27: software-pipelining a loop whose trip count may be 0 guards the pipeline's "
    "prologue and epilogue with conditions, and ThreadSync then refuses the __syncthreads they need: "
    "'Cannot insert syncs inside condition'. Workaround taken: the K/V tile count is clamped to >= 1 "
    "(compiler.derive._kv_tile_count; a tile with no visible key is wholly masked)",
)
def test_software_pipeline_needs_a_tile_count_of_at_least_one(monkeypatch):
    """Reproducer: the pipelined schedule on the definition without the clamp (the causal tile
    count max(ceildiv(last_key, block_n), 0) can be 0; TVM cannot prove the non-causal one >= 1)."""
    from tvmflash._compat import tirx
    from tvmflash.compiler import derive

    monkeypatch.setattr(derive, "_kv_tile_count", lambda last_key, BN, first=None: tirx.ceildiv(last_key, BN))
    try:
        cuda_source(KernelSpec(128, target="nvidia/nvidia-a100"), S.FlashConfig(stages=2))
    except tvm.error.InternalError as err:  # any other failure is a real one
        assert "Cannot insert syncs inside condition" in str(err), str(err)[-500:]
        raise


def _kernel_body(spec, cfg) -> str:
    """The kernel's CUDA as ``build`` compiles ``spec`` with ``cfg`` (its rule's pass config)."""
    cu = cuda_source(spec, cfg)
    return cu[cu.index("__global__"):]


_WAIT = r"cp_async_wait_group_async_wait_group_(\d)\(\);"


@pytest.mark.parametrize("kv_buffers", [1, 2])
@pytest.mark.parametrize("even, causal", [(False, False), (True, True)])
def test_kv_tiles_are_loaded_one_tile_ahead_with_cp_async(kv_buffers, even, causal):
    """The K/V loop is a 2-stage software pipeline (dynamic trip count): K and V of tile 0 are
    issued before the loop; in the loop, tile j+1's loads are in flight while tile j is computed;
    the last tile is computed after the loop. One buffer each (FlashAttention-2's order): K of
    tile j+1 is issued after S = Q K^T of tile j, V after P V; the wait before S covers both.
    Two buffers: both issued at the top, each wait lets one group (tile j+1's) stay in flight.
    Causal: the loop comes in two parts, the tiles below the diagonal and the diagonal ones
    (``compiler.passes.unmask_full_kv_tiles``), each pipelined the same way."""
    kernel = _kernel_body(KernelSpec(128, causal=causal, even=even, target="nvidia/nvidia-a100"),
                          S.FlashConfig(stages=2, kv_buffers=kv_buffers))
    loops = [m.start() for m in re.finditer(r"for \(int kb\w* = ", kernel)]
    assert len(loops) == (2 if causal else 1), loops
    assert kernel[:loops[0]].count("ptx_cp_async_legacy") == 2  # K and V of tile 0
    waits = re.findall(_WAIT, kernel)
    assert waits == (["0"] if kv_buffers == 1 else ["1"]) * len(loops) + ["0"], waits
    last_wait = [m.start() for m in re.finditer(_WAIT, kernel)][-1]
    for start, end in zip(loops, loops[1:] + [last_wait]):
        body = kernel[start:end]  # one loop, up to the next one or to the last tile's wait
        copies = [m.start() for m in re.finditer(r"ptx_cp_async_legacy\w*\(buf_dyn_shmem_ptr", body)]
        mmas = [m.start() for m in re.finditer(r"mma\.sync", body)]
        commits = [m.start() for m in re.finditer(r"commit_group\(\);", body)]
        wait = re.search(_WAIT, body).start()
        # one buffer each: K and V are issued at two places, each its own commit group; two: together
        assert len(copies) == 2 and len(commits) == (2 if kv_buffers == 1 else 1), (copies, commits)
        # a barrier follows the wait, before anyone reads the tile
        assert body[wait:wait + 200].split(";")[1].strip() == "__syncthreads()", body[wait:wait + 200]
        if kv_buffers == 1:
            first_gemm_end = max(m for m in mmas if m < copies[0])
            assert wait < first_gemm_end < copies[0] < copies[1], "K after S = Q K^T"
            assert max(mmas) < copies[1], "V after P V"
        else:
            assert copies[1] < wait < min(mmas), "both loads issued before the wait and the GEMMs"


def test_pipelined_static_causal_workload_compiles():
    """The static-shape workload MetaSchedule measures, causal and pipelined: InjectSoftwarePipeline
    leaves a wait count it could not prove (``if_then_else(True & True, 0, 0)``), which CUDA
    codegen refuses; ``compiler.passes.constant_async_waits`` makes every count a constant. (Three
    waits: the K/V loop's two parts, below the diagonal and on it, and the last tile.)"""
    from tvmflash.compiler import compile_module, device_source
    from tvmflash.tuning import space as SP

    spec = KernelSpec(128, causal=True, target="nvidia/nvidia-h100")
    func = SP.workload(spec, (128, 64), SP.Shape(4, 4096, 4096, 16, 16))["main"]
    sch = S.RULE.apply(func, S.FlashConfig(stages=2))
    cu = device_source(compile_module(sch.mod, spec.tvm_target, S.RULE.pass_config(spec)), spec)
    assert re.findall(_WAIT, cu[cu.index("__global__"):]) == ["0", "0", "0"]


def test_synchronous_kv_loads_without_pipeline():
    """stages 1: plain vector loads of K and V, no cp.async anywhere."""
    kernel = _kernel_body(KernelSpec(128, target="nvidia/nvidia-a100"), S.FlashConfig(stages=1))
    assert "cp.async" not in kernel and "cp_async" not in kernel
    assert S.FlashConfig(stages=1, kv_buffers=2) == S.FlashConfig(stages=1, kv_buffers=1)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("head_dim, dtype, group, target", [
    (128, "float16", 4, "nvidia/nvidia-h100"), (256, "bfloat16", 2, "nvidia/nvidia-a100")])
def test_split_kv_decode_builds_on_tensor_cores(tmp_path, head_dim, dtype, group, target):
    """``KernelSpec(splits=n)`` goes to ``decode_cuda_mma``: the tile kernel of one warp (a 16-row
    tile holding a GQA group's query heads) on mma.sync with cp.async K/V loads, writing the
    partials, and the combine kernel reading them; registers within the budget at head dims up to
    128."""
    from tvmflash.rules import rule_for

    spec = KernelSpec(head_dim, dtype, causal=True, group=group, target=target, splits=4)
    assert rule_for(spec).name == "decode_cuda_mma"
    so, manifest = build(spec, tmp_path)
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    kernels = dict(_kernels(cu))
    assert sorted(kernels) == ["main_kernel", "main_kernel_1"]
    tile = re.findall(r"\* __restrict__ (\w+)_ptr", kernels["main_kernel"])
    assert sorted(tile) == ["K", "Q", "V", "acc_part", "l_part", "m_part"]
    assert "__launch_bounds__(32) main_kernel" in cu and "mma.sync.aligned.m16n8k16" in cu
    assert "cp.async.cg.shared.global" in cu
    resources = json.loads(open(manifest).read())["device_code"]["resources"]
    for kernels_of_arch in resources.values():
        tile_kernel = kernels_of_arch["main_kernel"]
        if head_dim <= 128:
            assert tile_kernel["spill_stores"] == 0, tile_kernel


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("splits, rule, paged", [(4, "decode_cuda_mma", 0), (0, "fused_cuda_mma", 0),
                                                 (4, "decode_cuda_mma", 16)])
def test_per_sequence_key_counts_build_on_tensor_cores(tmp_path, splits, rule, paged):
    """``KernelSpec(seqused_k=True)`` (the KV-cache kernel) on the split decode rule and the
    prefill rule: the tile kernel takes the lengths, tensor cores stay, and the contiguous
    decode kernel keeps 0 spills at head dim 128; paged, the tile loads read the block table
    (one entry per 16 keys: the division folded)."""
    from tvmflash.rules import rule_for

    spec = KernelSpec(128, causal=True, group=4, target="nvidia/nvidia-h100", splits=splits, seqused_k=True,
                      paged=paged)
    assert rule_for(spec).name == rule
    so, manifest = build(spec, tmp_path)
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    tile = dict(_kernels(cu))["main_kernel"]
    assert "seqused_k_ptr" in tile and "mma.sync.aligned.m16n8k16" in cu
    resources = json.loads(open(manifest).read())["device_code"]["resources"]
    if paged:
        assert "block_table_ptr" in tile and "cp.async" in cu and ">> 3" in cu and " / 16" not in cu
    elif splits:
        assert all(k["main_kernel"]["spill_stores"] == 0 for k in resources.values()), resources


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_packed_sequences_build_on_tensor_cores(tmp_path):
    """``KernelSpec(varlen=True)`` (``attention_varlen``'s kernel) on the prefill rule: tensor cores
    and the cp.async K/V pipeline stay, the tile reads the prefix sums four times (the sequence's
    offsets, bound once a tile), and the key loop stops at the sequence's keys (k_end - k_start)."""
    from tvmflash.rules import rule_for

    spec = KernelSpec(128, causal=True, group=4, target="nvidia/nvidia-h100", varlen=True)
    assert rule_for(spec).name == "fused_cuda_mma"
    so, manifest = build(spec, tmp_path)
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    assert "cu_seqlens_k_ptr" in dict(_kernels(cu))["main_kernel"]
    assert "mma.sync.aligned.m16n8k16" in cu and "cp.async" in cu
    assert cu.count("cu_seqlens_q_ptr[") == 2 and cu.count("cu_seqlens_k_ptr[") == 2
    assert "(k_end - k_start)" in cu
    resources = json.loads(open(manifest).read())["device_code"]["resources"]
    # (the offsets live in registers where the dense kernel's lengths are kernel parameters: more
    # spills than its budget, an open item of docs/inference.md; the bound keeps them from growing)
    assert all(r["main_kernel"]["spill_stores"] <= 6 * SPILL_BUDGET for r in resources.values()), resources
