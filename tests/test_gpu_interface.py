"""On a CUDA GPU (marker ``gpu``): modules built as a GPU-less machine would build them load and
match PyTorch; an embedded fatbin or PTX loads without NVRTC; the custom op on CUDA tensors."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec
from tvmflash.compiler.nvcc import find_nvcc

from helpers import LSE_ATOL, TOLERANCE

pytestmark = pytest.mark.gpu

SPEC = KernelSpec(128, "float16", target="nvidia/nvidia-a100")  # the tensor-core schedule
FORMS = ["fatbin", "ptx", "source"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{form: .so path}: one subprocess that sees no GPU (CUDA_VISIBLE_DEVICES="") builds the
    spec once per form, as a build machine without a GPU would."""
    out = tmp_path_factory.mktemp("gpu-less-build")
    forms = FORMS if find_nvcc() else ["source"]
    code = f"""
        from tvmflash import KernelSpec, build
        spec = KernelSpec(**{SPEC.to_dict()!r})
        for form in {forms!r}:
            so, _ = build(spec, {str(out)!r} + "/" + form, device_code=form)
            print("BUILT", form, so)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {line.split()[1]: line.split()[2] for line in res.stdout.splitlines() if line.startswith("BUILT")}


@pytest.fixture
def nvrtc_forbidden():
    """Within the test, TVM's run-time CUDA compile raises; the callback is restored after."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    original = tvm_ffi.get_global_func(name)

    def refuse(*args):
        raise RuntimeError("the module asked for a run-time CUDA compile (NVRTC)")

    tvm_ffi.register_global_func(name, refuse, override=True)
    try:
        yield
    finally:
        tvm_ffi.register_global_func(name, original, override=True)


def _sdpa_float32(q, k, v, causal):
    """Reference: SDPA in float32 on the GPU, (batch, seqlen, heads, dim) layout, bottom-right
    causal mask; with the lse (natural log) of the scaled scores."""
    import torch

    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    group = qt.shape[1] // kt.shape[1]
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return out.transpose(1, 2), torch.logsumexp(s, dim=-1)


def _check(out, lse, ref, ref_lse):
    tol = TOLERANCE["float16"]
    err = (out.float() - ref).abs().max().item()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    lse_err = (lse - ref_lse).abs().max().item()
    assert err <= tol["max_abs"], f"max |out - sdpa| = {err:.3e} > {tol['max_abs']:.0e}"
    assert rel <= tol["rel_norm"], f"|out - sdpa| / |sdpa| = {rel:.3e} > {tol['rel_norm']:.0e}"
    assert lse_err <= LSE_ATOL, f"max |lse - ref| = {lse_err:.3e} > {LSE_ATOL:.0e}"


@pytest.mark.parametrize("form", FORMS)
def test_gpu_less_build_loads_and_matches_sdpa(built, form, request):
    import torch

    if form not in built:
        pytest.skip(f"device_code={form!r} needs nvcc on the build side; none on PATH")
    if form != "source":
        request.getfixturevalue("nvrtc_forbidden")  # fatbin and PTX load with the driver alone
    kernel = tvmflash.load(built[form])
    assert kernel.manifest["device_code"]["form"] == form
    torch.manual_seed(0)
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 513, 8, 128, device="cuda", dtype=torch.float16)
    v = torch.randn(2, 513, 8, 128, device="cuda", dtype=torch.float16)
    out, lse = kernel(q, k, v, return_lse=True)
    torch.cuda.synchronize()
    _check(out, lse, *_sdpa_float32(q, k, v, causal=False))


def test_fatbin_and_source_builds_agree(built):
    """The same kernel from the embedded fatbin and from NVRTC: both within tolerance of each
    other (compilers may order float operations differently)."""
    import torch

    if "fatbin" not in built:
        pytest.skip("needs nvcc on the build side")
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 257, 4, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    a = tvmflash.load(built["fatbin"])(q, k, v)
    b = tvmflash.load(built["source"])(q, k, v)
    assert (a.float() - b.float()).abs().max().item() <= TOLERANCE["float16"]["max_abs"]


@pytest.mark.parametrize("dtype, head_dim, causal, group", [("float16", 128, True, 4), ("bfloat16", 64, False, 1)])
def test_custom_op_opcheck_on_cuda(dtype, head_dim, causal, group):
    import torch

    import tvmflash.torch_ops  # noqa: F401

    torch.manual_seed(2)
    dt = getattr(torch, dtype)
    q = torch.randn(2, 97, 8, head_dim, device="cuda", dtype=dt)
    k = torch.randn(2, 131, 8 // group, head_dim, device="cuda", dtype=dt)
    v = torch.randn(2, 131, 8 // group, head_dim, device="cuda", dtype=dt)
    result = torch.library.opcheck(torch.ops.tvmflash.attention_fwd.default, (q, k, v), {"causal": causal})
    assert set(result.values()) == {"SUCCESS"}, result
    out, lse = torch.ops.tvmflash.attention_fwd(q, k, v, causal=causal)
    ref, ref_lse = _sdpa_float32(q, k, v, causal)
    tol = TOLERANCE[dtype]
    assert (out.float() - ref).abs().max().item() <= tol["max_abs"]
    assert (lse - ref_lse).abs().max().item() <= LSE_ATOL


def test_custom_op_under_torch_compile_on_cuda():
    import torch

    import tvmflash.torch_ops  # noqa: F401

    def f(q, k, v):
        out, _ = torch.ops.tvmflash.attention_fwd(q, k, v, causal=True)
        return out * 2

    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 200, 4, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), f(q, k, v))
    assert np.isfinite(compiled(q, k, v).float().cpu().numpy()).all()


def test_cuda_views_that_break_vector_alignment_are_copied():
    """CUDA tensor views whose storage offset breaks the kernels' 16-byte vector loads (q, k, v
    and out= here): computed on aligned copies, never an illegal address; the same bits as on
    aligned tensors."""
    import torch

    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 129, 4, 128, device="cuda", dtype=torch.float16) for _ in range(3))

    def misaligned(x):
        buf = torch.empty(x.numel() + 3, device="cuda", dtype=x.dtype)
        view = buf[3:].view(x.shape)
        view.copy_(x)
        assert view.data_ptr() % 16 != 0
        return view

    want, want_lse = tvmflash.attention(q, k, v, causal=True, return_lse=True)
    out = misaligned(torch.zeros_like(want))
    kernel = tvmflash.get_kernel(KernelSpec(128, causal=True, target=tvmflash.runtime.api.target_for("cuda:0")))
    got, lse = kernel(misaligned(q), misaligned(k), misaligned(v), out=out, return_lse=True)
    torch.cuda.synchronize()
    assert got is out and torch.equal(out, want) and torch.equal(lse, want_lse)


def test_cuda_tensors_that_require_grad_are_refused():
    import torch

    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward pass yet"):
        tvmflash.attention(q, q, q)
    with torch.no_grad():
        assert tvmflash.attention(q, q, q).shape == q.shape
