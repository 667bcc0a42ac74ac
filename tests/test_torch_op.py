"""``torch.ops.tvmflash.attention_fwd`` on CPU tensors: opcheck, torch.compile(fullgraph=True),
the fake implementation, and the forward-only contract (grad-requiring inputs refused)."""

import pytest

torch = pytest.importorskip("torch")

import tvmflash  # noqa: E402
import tvmflash.torch_ops  # noqa: E402,F401  (registers the op)
from tvmflash.definition import attention_reference  # noqa: E402

from helpers import assert_close_to_reference  # noqa: E402

OP = torch.ops.tvmflash.attention_fwd


def _qkv(seed, b, sq, sk, h, hk, d, dtype=torch.float16, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(dtype) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


CASES = [
    dict(args=(2, 37, 50, 4, 2, 64), kwargs=dict(causal=True)),
    dict(args=(1, 70, 45, 8, 1, 64), kwargs=dict(softmax_scale=0.3)),
    dict(args=(2, 33, 33, 2, 2, 32), kwargs=dict(), dtype=torch.bfloat16),
    dict(args=(1, 29, 41, 4, 2, 64), kwargs=dict(causal=True, softcap=3.0)),
    dict(args=(1, 40, 61, 4, 2, 64), kwargs=dict(window_left=9, window_right=4)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['args']}-{c['kwargs']}-{c.get('dtype', 'f16')}")
def test_opcheck(case):
    q, k, v = _qkv(0, *case["args"], dtype=case.get("dtype", torch.float16))
    result = torch.library.opcheck(OP.default, (q, k, v), case["kwargs"])
    assert set(result.values()) == {"SUCCESS"}, result


def test_inputs_that_require_grad_are_refused_not_detached():
    """No backward yet: with grad mode on, grad-requiring inputs raise at the call (the op and
    ``attention`` alike) instead of returning a result autograd does not see; under no_grad, or
    detached, they run."""
    q, k, v = _qkv(2, 1, 20, 30, 2, 2, 64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward pass yet"):
        OP(q, k, v)
    with pytest.raises(NotImplementedError, match=r"q, k, v: tvmflash has no backward pass yet"):
        tvmflash.attention(q, k, v)
    with pytest.raises(NotImplementedError, match=r"^k: tvmflash has no backward pass yet"):
        tvmflash.attention(q.detach(), k, v.detach())
    with torch.no_grad():
        out, _ = OP(q, k, v)
        assert torch.equal(out, tvmflash.attention(q, k, v))
    assert torch.equal(out, OP(q.detach(), k.detach(), v.detach())[0])


def test_matches_attention_and_the_reference():
    q, k, v = _qkv(3, 2, 113, 77, 4, 2, 64)
    out, lse = OP(q, k, v, causal=True, softmax_scale=0.2)
    want, want_lse = tvmflash.attention(q, k, v, causal=True, softmax_scale=0.2, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref = attention_reference(*(x.numpy() for x in (q, k, v)), causal=True, softmax_scale=0.2)
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    def f(q, k, v):
        out, lse = OP(q, k, v, causal=True)
        return out.float() * 2 + lse.transpose(1, 2).unsqueeze(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for seed, shape in enumerate([(2, 37, 50, 4, 2, 64), (1, 64, 21, 4, 2, 64)]):
        q, k, v = _qkv(10 + seed, *shape)
        assert torch.equal(compiled(q, k, v), f(q, k, v))


def test_fake_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 17, 8, 128, dtype=torch.bfloat16)
        k = torch.empty(3, 40, 2, 128, dtype=torch.bfloat16)
        out, lse = OP(q, k, k)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert lse.shape == (3, 8, 17) and lse.dtype == torch.float32
        with pytest.raises(ValueError, match=r"q: expected rank 4 \[batch, seqlen, heads, head_dim\], got rank 3"):
            OP(q[0], k, k)
        with pytest.raises(TypeError, match=r"k: expected dtype bfloat16 \(the dtype of q\), got float16"):
            OP(q, k.half(), k)
        with pytest.raises(TypeError, match=r"q: expected dtype float16 or bfloat16, got float32"):
            OP(q.float(), k.float(), k.float())


def test_alibi_passes_through_the_op():
    q, k, v = _qkv(6, 2, 33, 40, 4, 2, 64)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    result = torch.library.opcheck(OP.default, (q, k, v), dict(causal=True, alibi_slopes=slopes))
    assert set(result.values()) == {"SUCCESS"}, result
    out, lse = OP(q, k, v, causal=True, alibi_slopes=slopes)
    ref = attention_reference(*(x.numpy() for x in (q, k, v)), causal=True, alibi_slopes=slopes.numpy())
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")


def test_window_passes_through_the_op():
    q, k, v = _qkv(5, 1, 45, 60, 4, 2, 64)
    out, lse = OP(q, k, v, True, None, 0.0, 12, -1)
    want, want_lse = tvmflash.attention(q, k, v, causal=True, window_size=(12, -1), return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref = attention_reference(*(x.numpy() for x in (q, k, v)), causal=True, window_size=(12, -1))
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")


def test_softcap_passes_through_the_op():
    q, k, v = _qkv(4, 1, 45, 60, 4, 4, 64)
    q = q * 4  # scores large enough for the cap to matter
    out, lse = OP(q, k, v, softcap=2.5)
    want, want_lse = tvmflash.attention(q, k, v, softcap=2.5, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref = attention_reference(*(x.numpy() for x in (q, k, v)), softcap=2.5)
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")
