"""On a CUDA GPU (marker ``gpu``; skipped cleanly without one)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, build

pytestmark = pytest.mark.gpu


def _torch_reference(q, k, v, causal, dtype=None, softcap=0.0, window_size=(-1, -1), alibi_slopes=None):
    """SDPA in the given dtype (None: float64) with the bottom-right causal mask (and the scores
    soft-capped with ``softcap`` > 0, ALiBi's bias, the sliding window (left, right))."""
    import torch

    dt = dtype or torch.float64
    s = _scores(q, k, causal, window_size, alibi_slopes, softcap, dt)
    vt = v.to(dt).transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], 1)
    p = torch.softmax(s.float() if dtype else s, dim=-1).nan_to_num(0.0).to(dt)
    return (p @ vt).transpose(1, 2)


def _scores(q, k, causal, window=(-1, -1), alibi_slopes=None, softcap=0.0, dtype=None):
    """The scaled scores in ``dtype`` (None: float64), capped, biased and masked as
    ``_torch_reference`` takes them (FlashAttention-2's semantics)."""
    import torch

    dt = dtype or torch.float64
    group = q.shape[2] // k.shape[2]
    qt, kt = q.to(dt).transpose(1, 2), k.to(dt).transpose(1, 2).repeat_interleave(group, 1)
    s = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    diag = torch.arange(sq, device=q.device)[:, None] + sk - sq  # each row's diagonal key
    cols = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt).expand(q.shape[0], q.shape[2])[:, :, None, None]
        s = s - slopes * (diag - cols).abs().to(dt)
    left, right = window
    right = 0 if causal else right
    if right >= 0:
        s = s.masked_fill(cols > diag + right, float("-inf"))
    if left >= 0:
        s = s.masked_fill(cols < diag - left, float("-inf"))
    return s


@pytest.mark.parametrize("algorithm", ["fused", "standard"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim, group, seq_q, seq_k", [
    (64, 1, 113, 501), (128, 4, 1023, 1023), (128, 8, 300, 37),
    (128, 2, 256, 512), (64, 1, 512, 128),  # tile multiples: the even kernel
    (32, 2, 100, 77), (96, 2, 200, 333), (256, 2, 130, 257),  # tensor cores (256: 16 rows a warp)
    (96, 1, 128, 192), (256, 4, 256, 128),  # ... and their even kernels
])
def test_matches_reference_flash_rule(algorithm, dtype, causal, head_dim, group, seq_q, seq_k):
    """FlashAttention's rule: our error against float64 at most 2x that of plain low precision."""
    import torch

    torch.manual_seed(seq_q * 7 + seq_k + head_dim + group)
    dt = getattr(torch, dtype)
    q = torch.randn(2, seq_q, 8, head_dim, device="cuda", dtype=dt)
    k = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    out, lse = tvmflash.attention(q, k, v, causal=causal, return_lse=True, algorithm=algorithm)
    torch.cuda.synchronize()
    if algorithm == "fused":  # the even build where the lengths are multiples of the tile
        from tvmflash.builder import plan
        from tvmflash.runtime.api import kernel_for, spec_for

        spec = spec_for(q, k, v, causal=causal)[0]
        even = (head_dim, seq_q, seq_k) in {(128, 256, 512), (64, 512, 128), (96, 128, 192), (256, 256, 128)}
        # (a rule without even builds, the Hopper one, runs every length on its one kernel)
        assert kernel_for(spec, seq_q, seq_k).spec.even == (even and plan(spec).rule.has_even_build(spec))
    ref = _torch_reference(q, k, v, causal)
    plain = _torch_reference(q, k, v, causal, dtype=dt)
    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * plain_err + 1e-5, f"max error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e}"
    assert lse.shape == (2, 8, seq_q) and lse.dtype == torch.float32


def test_bitwise_identical_over_100_calls():
    import torch

    q = torch.randn(2, 513, 8, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 700, 2, 128, device="cuda", dtype=torch.float16)
    first = tvmflash.attention(q, k, k, causal=True)
    for _ in range(100):
        assert torch.equal(tvmflash.attention(q, k, k, causal=True), first)


def test_module_built_without_gpu_loads_in_fresh_process(tmp_path):
    """Build for the A100 target here as a CPU-only machine would, load in a new process."""
    import torch

    spec = KernelSpec(128, target="nvidia/nvidia-a100")
    so, _ = build(spec, tmp_path)
    code = f"""
import torch, tvmflash
kernel = tvmflash.load({so!r})
q = torch.randn(1, 200, 4, 128, device="cuda", dtype=torch.float16)
k = torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.float16)
out = kernel(q, k, k)
ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))
err = (out - ref.transpose(1, 2)).abs().max().item()
print("ERR", err)
assert err < 4e-3, err
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


def test_fully_masked_rows_cuda():
    import torch

    q = torch.randn(1, 50, 2, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 20, 2, 64, device="cuda", dtype=torch.float16)
    out, lse = tvmflash.attention(q, k, k, causal=True, return_lse=True)
    assert (out[:, :30] == 0).all() and torch.isneginf(lse[:, :, :30]).all()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim, seqs", [(128, (1000, 1000)), (128, (4096, 4096)), (64, (300, 77))])
def test_static_shape_kernel_on_gpu(without_hopper, head_dim, seqs, causal):
    """A kernel compiled for one shape (bound checks folded away) passes FlashAttention's error
    rule. On the tensor-core schedule it also gives the dynamic kernel's bits; the plain schedule
    (head dim 64) may contract a multiply-add differently once its loops are unrolled (seen: one
    case of six differs in the last bits)."""
    import torch

    sq, sk = seqs
    torch.manual_seed(0)
    q = torch.randn(2, sq, 8, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(2, sk, 4, head_dim, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    dyn = tvmflash.attention(q, k, v, causal=causal)
    static = tvmflash.attention(q, k, v, causal=causal, static_shape=True)
    ref = _torch_reference(q, k, v, causal)
    plain_err = (_torch_reference(q, k, v, causal, dtype=torch.float16).double() - ref).abs().max().item()
    err = (static.double() - ref).abs().max().item()
    assert err <= 2 * plain_err + 1e-5, f"max error {err:.3e} > 2 x plain float16 error {plain_err:.3e}"
    if head_dim == 128:
        assert torch.equal(static, dyn)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_even_kernel_gives_the_general_kernels_bits(without_hopper, head_dim, causal):
    """attention() runs the even build on tile multiples; the general build gives the same bits."""
    import torch

    from tvmflash import get_kernel
    from tvmflash.runtime.api import kernel_for, target_for

    q = torch.randn(2, 512, 8, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 1024, 4, head_dim, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    spec = KernelSpec(head_dim, causal=causal, group=2, target=target_for("cuda:0"))
    assert kernel_for(spec, 512, 1024).spec.even
    out, lse = tvmflash.attention(q, k, v, causal=causal, return_lse=True)
    general_out, general_lse = get_kernel(spec)(q, k, v, return_lse=True)
    assert torch.equal(out, general_out) and torch.equal(lse, general_lse)
    ref = _torch_reference(q, k, v, causal)
    plain_err = (_torch_reference(q, k, v, causal, dtype=torch.float16).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * plain_err + 1e-5


def test_grid_limits():
    """A batch past gridDim.z runs as several launches (one key a row: out is v exactly); heads
    past gridDim.y are a clear error."""
    import torch

    q = torch.randn(65536, 1, 1, 64, device="cuda", dtype=torch.float16)
    assert torch.equal(tvmflash.attention(q, q, q), q)
    q = torch.randn(1, 1, 65536, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"expected heads <= 65535 \(gridDim.y\), got 65536"):
        tvmflash.attention(q, q, q)


@pytest.mark.parametrize("causal", [False, True])
def test_a_softcap_in_the_plain_definition_alone_on_tensor_cores(tmp_path, causal):
    """Gemma-2's softcap written in Algorithm 0 only, derived by the rolling update and scheduled
    by the unchanged tensor-core rule: correct on the GPU (logits scaled up so the cap bends them)."""
    import torch

    from tvmflash._compat import tvm
    from tvmflash.compiler import compile_module
    from tvmflash.compiler.derive import rolling_update
    from tvmflash.definition.plain import plain_attention, softcap
    from tvmflash.rules import rule_for

    spec = KernelSpec(128, causal=causal, group=2, target="nvidia/nvidia-a100")
    rule = rule_for(spec)
    assert rule.name == "fused_cuda_mma"
    config = rule.default_config(spec)
    rule.prepare(spec)
    func = rolling_update(plain_attention(spec, softcap(5.0)), *rule.tile(config))
    ex = compile_module(rule.apply(func, config).mod, tvm.target.Target(spec.target), rule.pass_config(spec))
    ex.export_library(str(tmp_path / "softcap.so"))
    mod = tvm.runtime.load_module(str(tmp_path / "softcap.so"))
    torch.manual_seed(causal)
    q = 4 * torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 517, 4, 128, device="cuda", dtype=torch.float16)
    v = torch.randn(2, 517, 4, 128, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    lse = torch.empty(2, 8, 300, device="cuda", dtype=torch.float32)
    mod["main"](q, k, v, out, lse, 128 ** -0.5)
    torch.cuda.synchronize()
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1)
    s = 5.0 * torch.tanh((qd @ kd.transpose(-1, -2)) * 128 ** -0.5 / 5.0)
    if causal:
        s = s.masked_fill(~torch.ones(300, 517, dtype=torch.bool, device="cuda").tril(517 - 300), float("-inf"))
    ref = (torch.softmax(s, -1) @ vd).transpose(1, 2)
    assert (out.double() - ref).abs().max().item() < 2e-2
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max().item() < 1e-3


@pytest.mark.parametrize("head_dim", [64, 256])
def test_the_plain_rule_still_serves_where_it_is_the_only_one(without_hopper, head_dim, tmp_path, monkeypatch):
    """With the tensor-core rule out of the registry, the plain one-thread-per-row schedule (the
    fallback for what no tensor-core rule claims) still gives FlashAttention's accuracy."""
    import torch

    from tvmflash import rules
    from tvmflash.rules import fused_cuda_mma

    monkeypatch.setenv("TVMFLASH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(head_dim)
    q = torch.randn(1, 150, 4, head_dim, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 97, 2, head_dim, device="cuda", dtype=torch.float16)
    rules.unregister(fused_cuda_mma.RULE.name)
    try:
        out = tvmflash.attention(q, k, k, causal=True)
        torch.cuda.synchronize()
        from tvmflash.runtime.api import kernel_for, spec_for

        assert kernel_for(spec_for(q, k, k, causal=True)[0], 150, 97).manifest["schedule"]["rule"] == \
            "fused_cuda_plain"
    finally:
        rules.register(fused_cuda_mma.RULE, before="fused_cuda_plain")
    ref = _torch_reference(q, k, k, True)
    plain = _torch_reference(q, k, k, True, dtype=torch.float16)
    assert (out.double() - ref).abs().max().item() <= 2 * (plain.double() - ref).abs().max().item() + 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim, group, seq_q, seq_k", [(128, 2, 300, 517), (256, 1, 128, 256), (64, 4, 77, 33)])
def test_softcap_through_attention_flash_rule(dtype, causal, head_dim, group, seq_q, seq_k):
    """``attention(..., softcap=cap)`` on tensor cores (the cap a runtime value; even builds where
    the lengths are tile multiples): FlashAttention's rule against the capped float64 result."""
    import torch

    torch.manual_seed(head_dim + seq_q)
    dt = getattr(torch, dtype)
    q = 3 * torch.randn(2, seq_q, 8, head_dim, device="cuda", dtype=dt)
    k = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    for cap in (5.0, 50.0):
        out, lse = tvmflash.attention(q, k, v, causal=causal, softcap=cap, return_lse=True)
        torch.cuda.synchronize()
        ref = _torch_reference(q, k, v, causal, softcap=cap)
        plain = _torch_reference(q, k, v, causal, dtype=dt, softcap=cap)
        err = (out.double() - ref).abs().max().item()
        plain_err = (plain.double() - ref).abs().max().item()
        assert err <= 2 * plain_err + 1e-5, f"cap {cap}: max error {err:.3e} > 2 x plain {plain_err:.3e}"
        assert not torch.isnan(out).any() and lse.shape == (2, 8, seq_q)


@pytest.mark.parametrize("dtype, causal, head_dim, group, seq_q, seq_k, window", [
    ("float16", False, 128, 2, 300, 517, (100, 50)),
    ("float16", True, 128, 4, 1023, 1023, (256, 0)),  # masked first tiles, unmasked inside, diagonal
    ("bfloat16", True, 128, 1, 1024, 2048, (300, -1)),  # the even build
    ("float16", False, 128, 1, 512, 1024, (128, 128)),  # the even build, both edges
    ("float16", False, 64, 1, 200, 700, (-1, 30)),  # right edge only
    ("float16", True, 64, 2, 300, 200, (50, 0)),  # rows that see no key
    ("float16", False, 64, 1, 333, 333, (0, 0)),  # each row its diagonal key only
    ("float16", True, 256, 2, 130, 1000, (400, 0)),  # 16 rows a warp
    ("float16", False, 96, 1, 257, 257, (64, 64)),
])
def test_window_through_attention_flash_rule(dtype, causal, head_dim, group, seq_q, seq_k, window):
    """``attention(..., window_size=(left, right))`` on tensor cores: the key tiles outside the
    window skipped and those wholly inside run unmasked, FlashAttention's rule against the
    windowed float64 result, rows that see no key at O = 0 and lse = -inf."""
    import torch

    from tvmflash.runtime.api import kernel_for, spec_for
    from tvmflash.runtime.validate import check_window

    torch.manual_seed(head_dim + seq_q + seq_k)
    dt = getattr(torch, dtype)
    q = torch.randn(2, seq_q, 8, head_dim, device="cuda", dtype=dt)
    k = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    out, lse = tvmflash.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    torch.cuda.synchronize()
    spec = spec_for(q, k, v, causal=causal, window=check_window(window, causal))[0]
    assert spec.window and kernel_for(spec, seq_q, seq_k).manifest["schedule"]["rule"] == "fused_cuda_mma"
    ref = _torch_reference(q, k, v, causal, window_size=window)
    plain = _torch_reference(q, k, v, causal, dtype=dt, window_size=window)
    seen = torch.isfinite(torch.logsumexp(_scores(q, k, causal, window), -1))  # rows with a visible key
    ref, plain = ref.nan_to_num(0.0), plain.nan_to_num(0.0)
    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * plain_err + 1e-5, f"max error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e}"
    assert torch.equal(torch.isfinite(lse), seen)
    assert (out.transpose(1, 2)[~seen] == 0).all()


@pytest.mark.parametrize("dtype, causal, head_dim, group, seq_q, seq_k, batch_slopes, window, softcap", [
    ("float16", False, 128, 2, 300, 517, False, (-1, -1), 0.0),
    ("float16", True, 128, 1, 1024, 1024, True, (-1, -1), 0.0),  # the even build
    ("bfloat16", True, 64, 4, 200, 333, False, (-1, -1), 0.0),
    ("float16", True, 256, 2, 300, 700, True, (128, 0), 30.0),  # Gemma-2's three together
])
def test_alibi_through_attention_flash_rule(dtype, causal, head_dim, group, seq_q, seq_k, batch_slopes, window,
                                            softcap):
    """``attention(..., alibi_slopes=...)``, (heads,) and (batch, heads), alone and with a window
    and a softcap: FlashAttention's rule against the biased float64 result and its lse."""
    import torch

    torch.manual_seed(head_dim + seq_q)
    dt = getattr(torch, dtype)
    q = 2 * torch.randn(2, seq_q, 8, head_dim, device="cuda", dtype=dt)
    k = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(2, seq_k, 8 // group, head_dim, device="cuda", dtype=dt)
    heads = torch.arange(1, 9, device="cuda", dtype=torch.float32)
    slopes = 2.0 ** (-heads)  # ALiBi's geometric slopes for 8 heads
    slopes = torch.stack([slopes, slopes.flip(0)]) if batch_slopes else slopes
    out, lse = tvmflash.attention(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes, return_lse=True)
    torch.cuda.synchronize()
    ref = _torch_reference(q, k, v, causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    plain = _torch_reference(q, k, v, causal, dtype=dt, window_size=window, softcap=softcap, alibi_slopes=slopes)
    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * plain_err + 1e-5, f"max error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e}"
    if not softcap:
        ref_lse = torch.logsumexp(_scores(q, k, causal, window, slopes), -1)
        assert (lse.double() - ref_lse).abs().max().item() < 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_a_d256_static_shape_of_one_kv_tile(causal):
    """``attention(static_shape=True)`` at head dim 256 with keys that fit one K/V tile (served by
    the one-thread-per-row rule): FlashAttention's rule against float64."""
    import torch

    torch.manual_seed(7)
    q = torch.randn(1, 300, 4, 256, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 64, 2, 256, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 64, 2, 256, device="cuda", dtype=torch.float16)
    out = tvmflash.attention(q, k, v, causal=causal, static_shape=True)
    torch.cuda.synchronize()
    ref = _torch_reference(q, k, v, causal)
    plain = _torch_reference(q, k, v, causal, dtype=torch.float16)
    assert (out.double() - ref).abs().max().item() <= 2 * (plain.double() - ref).abs().max().item() + 1e-5


@pytest.mark.parametrize("dtype, causal, head_dim, heads, group, batch, seq_q, seq_k, num_splits, window", [
    ("float16", False, 128, 8, 4, 3, 1, 4096, 0, (-1, -1)),  # decode: the split count chosen
    ("bfloat16", True, 128, 8, 8, 2, 1, 1000, 0, (-1, -1)),
    ("float16", True, 64, 8, 4, 2, 5, 513, 4, (-1, -1)),  # a few rows, bottom-right causal
    ("float16", False, 64, 8, 1, 1, 16, 37, 8, (-1, -1)),  # more chunks than key tiles
    ("bfloat16", False, 96, 8, 2, 2, 3, 777, 3, (-1, -1)),
    ("float16", True, 256, 8, 2, 1, 1, 3000, 0, (-1, -1)),
    ("float16", True, 32, 8, 1, 2, 40, 300, 2, (-1, -1)),  # three query tiles
    ("float16", True, 128, 6, 3, 2, 7, 900, 4, (-1, -1)),  # a group of 3: a tile row idle
    ("bfloat16", True, 128, 8, 4, 2, 3, 2000, 0, (256, 0)),  # a sliding window
    ("float16", True, 64, 8, 2, 1, 12, 5, 2, (-1, -1)),  # rows that see no key
])
def test_split_kv_through_attention_flash_rule(monkeypatch, dtype, causal, head_dim, heads, group, batch, seq_q,
                                               seq_k, num_splits, window):
    """FlashDecoding (``num_splits``, or chosen for short queries): the split-K kernel from
    ``rules.decode_cuda_mma``, FlashAttention's rule against float64, lse against float64's."""
    import torch

    from tvmflash.runtime import api

    used = []
    kernel_for = api.kernel_for
    monkeypatch.setattr(api, "kernel_for", lambda spec, sq, sk: used.append(kernel_for(spec, sq, sk)) or used[-1])
    torch.manual_seed(head_dim + seq_q + seq_k)
    dt = getattr(torch, dtype)
    q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", dtype=dt)
    k = torch.randn(batch, seq_k, heads // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(batch, seq_k, heads // group, head_dim, device="cuda", dtype=dt)
    out, lse = tvmflash.attention(q, k, v, causal=causal, return_lse=True, num_splits=num_splits, window_size=window)
    torch.cuda.synchronize()
    assert used[0].spec.splits >= 1 and used[0].manifest["schedule"]["rule"] == "decode_cuda_mma"
    ref = _torch_reference(q, k, v, causal, window_size=window).nan_to_num(0.0)
    plain = _torch_reference(q, k, v, causal, dtype=dt, window_size=window).nan_to_num(0.0)
    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * plain_err + 1e-5, f"max error {err:.3e} > 2 x plain {dtype} error {plain_err:.3e}"
    ref_lse = torch.logsumexp(_scores(q, k, causal, window), -1)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse.double() - ref_lse)[seen].abs().max().item() < 1e-3
