"""CUDA builds without a GPU: the schedules apply, CUDA source is generated, nvcc compiles it."""

import json
import re
import subprocess

import pytest
import tvm

from tvmflash import KernelSpec, build, lower

from conftest import NVCC

VARIANTS = [
    dict(head_dim=64, dtype="float16", causal=False, group=1),
    dict(head_dim=128, dtype="float16", causal=True, group=1),
    dict(head_dim=128, dtype="bfloat16", causal=False, group=4),
    dict(head_dim=64, dtype="bfloat16", causal=True, group=8),
]


@pytest.mark.parametrize("target", ["nvidia/nvidia-a100", "nvidia/nvidia-h100"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: KernelSpec(**v).key)
def test_fused_kernel_builds_for_cuda(tmp_path, target, variant):
    spec = KernelSpec(**variant, target=target)
    so, manifest = build(spec, tmp_path)
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    kernels = dict(_kernels(cu))
    assert len(kernels) == 1, f"the fused attention is one kernel, got {sorted(kernels)}"
    # no global buffer besides q, k, v, o, lse: S and P never leave the chip
    pointers = re.findall(r"\* __restrict__ (\w+)_ptr", next(iter(kernels.values())))
    assert sorted(pointers) == ["K", "LSE", "O", "Q", "V"]
    # every variant here runs on tensor cores, bfloat16 through tvmflash's own intrinsics
    ptx_type = {"float16": "f16", "bfloat16": "bf16"}[spec.dtype]
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32" in cu and "ldmatrix" in cu


def _kernels(cu: str):
    """(name, parameter list) of each __global__ function (declarations and definitions)."""
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)', cu)


def test_standard_goes_through_global_memory(tmp_path):
    spec = KernelSpec(128, target="nvidia/nvidia-a100", algorithm="standard")
    build(spec, tmp_path)
    kernels = dict(_kernels((tmp_path / (spec.key + ".cu")).read_text()))
    for stage in ("qk", "softmax", "pv"):
        assert any(name.startswith(stage) for name in kernels), f"no {stage} kernel in {sorted(kernels)}"
    writes_s = [n for n, params in kernels.items() if n.startswith("qk") and "S_ptr" in params]
    reads_p = [n for n, params in kernels.items() if n.startswith("pv") and "P_ptr" in params]
    assert writes_s and reads_p, "S and P must be global buffers in the standard algorithm"


def test_lowered_tir_keeps_block_names():
    lowered = lower(KernelSpec(32, target="nvidia/nvidia-a100"))
    script = lowered.mod.script()
    for name in ("tile", "S_gemm", "row_max", "running_max", "row_sum", "O_gemm", "O_store", "lse_store"):
        assert f'T.sblock("{name}")' in script


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_tensor_core_kernel_within_register_budget(tmp_path, arch):
    """The generated CUDA is valid for nvcc as well as NVRTC, and the tensor-core kernel keeps
    its tiles in registers. Since the softmax moved onto the fragments (S, P f32 and P f16 in
    registers beside acc_o), ptxas spills 20 bytes at 255 registers; the bound below keeps that
    from growing unnoticed (the issue's goal is 0: NOTES.md)."""
    spec = KernelSpec(128, causal=True, target="nvidia/nvidia-a100")
    build(spec, tmp_path)
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


#: Bytes of spill stores / stack the tensor-core kernel may use (measured: 20 and 16).
SPILL_BUDGET = 32


@pytest.mark.parametrize("target", ["nvidia/nvidia-a100", "nvidia/nvidia-h100"])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_schedule(tmp_path, target, causal):
    """head_dim 128, float16: the tensor-core schedule (ldmatrix + mma.sync), fragments lowered
    to registers (TVM's LowerWarpMemory run until none is left 32x oversized)."""
    spec = KernelSpec(128, causal=causal, group=2, target=target)
    _, manifest = build(spec, tmp_path)
    assert json.loads(open(manifest).read())["schedule"]["function"] == "schedule_cuda.schedule_fused_cuda"
    cu = (tmp_path / (spec.key + ".cu")).read_text()
    assert "mma.sync.aligned.m16n8k16" in cu and "ldmatrix" in cu
    arrays = {name: int(n) for name, n in re.findall(r"alignas\(\d+\) \w+ (\w+_warp_ptr)\[(\d+)\]", cu)}
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
    script = lower(KernelSpec(32, target="nvidia/nvidia-a100")).mod.script()
    for scope in ("row_max_tile", "row_sum_tile"):
        body = script[script.index(f'T.sblock("{scope}")'):][:600]
        bound = re.search(r"for (\w+) in T\.thread_binding\(\d+, thread=\"threadIdx\.x\"\)", body)
        assert bound and bound.group(1) == "i", body


@pytest.mark.xfail(
    strict=True,
    raises=tvm.error.InternalError,
    reason="TVM 0.27: software-pipelining the K/V loop (dynamic extent) of the tensor-core kernel "
    "guards the pipeline's prologue/epilogue with conditions, and ThreadSync then refuses the "
    "__syncthreads they need: 'Cannot insert syncs inside condition' (NOTES.md, session 2)",
)
def test_software_pipeline_over_kv_loop():
    """Reproducer: the K/V loads as stage 0 (cp.async), the rest as stage 1. The pass sees 21
    statements in the loop body of this schedule (the kv0 binding, the K and V loads first)."""
    from tvmflash import _compat, definition as D, schedule_cuda as S

    spec = KernelSpec(128, target="nvidia/nvidia-a100")
    cfg = S.default_config(spec.tvm_target, 128)
    sch = S.schedule_fused_cuda(D.fused_attention(spec, cfg.block_m, cfg.block_n), cfg)
    kb = sch.get_loops(D.K_LOAD)[0]
    n_body, n_loads = 21, 3
    sch.annotate(kb, "software_pipeline_stage", [0] * n_loads + [1] * (n_body - n_loads))
    sch.annotate(kb, "software_pipeline_order", list(range(n_body)))
    sch.annotate(kb, "software_pipeline_async_stages", [0])
    try:
        with tvm.transform.PassContext(config={**S.PASS_CONFIG, "tirx.use_async_copy": True}):
            tvm.compile(sch.mod, target=spec.tvm_target, tir_pipeline=_compat.TIR_PIPELINE)
    except tvm.error.InternalError as err:  # any other failure is a real one
        assert "Cannot insert syncs inside condition" in str(err), str(err)[-500:]
        raise
