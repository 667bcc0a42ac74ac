"""The Hopper kernel (``rules/fused_hopper.py``): which specs it serves, what its CUDA holds, and
(on an sm_90 GPU) its numbers against the float64 reference.

Every GPU check runs in a child process under a timeout: a wrong mbarrier phase hangs the GPU
kernel instead of failing it.
"""

import json
import os
import subprocess
import sys

import pytest

from tvmflash import rules
from tvmflash.compiler import nvcc
from tvmflash.rules.fused_hopper import HopperConfig
from tvmflash.spec import KernelSpec

from conftest import HAS_CUDA, NVCC
from helpers import cuda_source

H100 = "nvidia/nvidia-h100"
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("fields, rule", [
    (dict(head_dim=128), "fused_hopper"),
    (dict(head_dim=64, causal=True, group=8, dtype="bfloat16"), "fused_hopper"),
    (dict(head_dim=128, target="nvidia/nvidia-a100"), "fused_cuda_mma"),  # sm_80: mma.sync
    (dict(head_dim=96), "fused_cuda_mma"),  # no Hopper tiles for these head dims yet
    (dict(head_dim=256), "fused_cuda_mma"),
    (dict(head_dim=128, softcap=True), "fused_cuda_mma"),  # the variants stay with mma.sync
    (dict(head_dim=128, window=True), "fused_cuda_mma"),
    (dict(head_dim=128, alibi=True), "fused_cuda_mma"),
    (dict(head_dim=128, even=True), "fused_cuda_mma"),
    (dict(head_dim=128, shape=(1, 256, 256, 2)), "fused_cuda_mma"),
    (dict(head_dim=128, splits=4), "decode_cuda_mma"),
    (dict(head_dim=128, seqused_k=True), "fused_cuda_mma"),
    (dict(head_dim=128, varlen=True), "fused_cuda_mma"),
])
def test_the_rule_serves_the_dense_h100_specs(fields, rule):
    spec = KernelSpec(**{"target": H100, **fields})
    assert rules.rule_for(spec).name == rule


@pytest.mark.parametrize("fields", [dict(head_dim=128, causal=True), dict(head_dim=64, dtype="bfloat16", group=4)])
def test_cuda_has_wgmma_and_tma_and_compiles_for_sm90a(fields):
    """The CUDA ``build`` ships: wgmma, the TMA's bulk tensor copies, register reallocation;
    nvcc (the flags a fatbin is built with) compiles it for sm_90a within the tests' spill
    bound (a few cold scalars at ``--register-usage-level=10``)."""
    spec = KernelSpec(target=H100, **fields)
    cu = cuda_source(spec)
    ab = {"float16": "f16", "bfloat16": "bf16"}[spec.dtype]
    assert f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{ab}.{ab}" in cu
    assert f"m64n{spec.head_dim}k16" in cu  # O += P V: N is the head dim
    assert "cp.async.bulk.tensor.4d" in cu and "CUtensorMap" in cu
    assert "setmaxnreg.dec" in cu and "setmaxnreg.inc" in cu
    if NVCC is None:
        pytest.skip("needs nvcc")
    res = nvcc.resources(cu, ["sm_90a"])["sm_90a"]
    (kernel,) = res.values()
    assert kernel.spill_stores <= 80 and kernel.stack_frame <= 80, kernel


@pytest.mark.parametrize("config, field", [
    (HopperConfig(block_m=96), "block_m"),
    (HopperConfig(block_n=100), "block_n"),
    (HopperConfig(stages=0), "stages"),
    (HopperConfig(stages=4), "stages"),  # 4 stages of 128-key K and V tiles pass 227 KB at d128
    (HopperConfig(block_m=192, consumer_regs=240), "consumer_regs"),  # 3 x 128 x 240 > 64K
])
def test_bad_config_is_a_clear_error(config, field):
    from tvmflash.builder import lower

    with pytest.raises(ValueError, match=field):
        lower(KernelSpec(128, target=H100), config)


# -- on an sm_90 GPU ----------------------------------------------------------------------------

#: (batch, seq_q, seq_k, heads, heads_kv, head_dim, dtype, causal): odd lengths, one row, one
#: key, seq_q != seq_k both ways (causal rows that see no key), GQA and MQA, bf16
GPU_CASES = [
    (2, 1, 1, 4, 4, 128, "float16", False),
    (1, 37, 513, 4, 1, 64, "float16", True),
    (2, 513, 37, 8, 2, 128, "bfloat16", True),
    (1, 1000, 1000, 4, 4, 128, "float16", True),
    (3, 129, 255, 6, 3, 64, "bfloat16", False),
    (1, 300, 4100, 8, 1, 128, "bfloat16", False),
    (1, 5, 0, 4, 4, 128, "float16", False),  # no key: nothing launched, out 0, lse -inf
]


def _sm90() -> bool:
    if not HAS_CUDA:
        return False
    import torch

    return torch.cuda.get_device_capability(0) == (9, 0)


def _in_child(what: str, case, timeout: float = 240.0) -> dict:
    """``hopper_gpu.py`` ``what`` ``case`` in a child process, its JSON result; a hang fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    try:
        res = subprocess.run([sys.executable, os.path.join(HERE, "hopper_gpu.py"), what, json.dumps(case)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} {case}: no answer in {timeout:.0f} s (a hang: an mbarrier phase?)")
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert res.returncode == 0 and lines, (res.stdout + res.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


SM90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100, H200)")


@pytest.mark.gpu
@SM90
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_numerics_flash_rule(case):
    """``attention`` on the GPU runs the Hopper kernel and meets FlashAttention's rule: max error
    at most 2x a plain PyTorch computation's in the input dtype (and 1e-3), both against the
    float64 reference; lse within 1e-3, -inf on exactly the reference's rows."""
    r = _in_child("numerics", case)
    assert r["rule"] == "fused_hopper", r
    assert r["ok"], r


@pytest.mark.gpu
@SM90
def test_bitwise_identical_over_100_calls():
    r = _in_child("determinism", [1, 1024, 1024, 8, 8, 128, "float16", True])
    assert r["rule"] == "fused_hopper" and r["identical"], r
