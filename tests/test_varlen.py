"""``attention_varlen``: packed variable-length sequences, on the CPU (numerics against the float64
reference) and on a CUDA GPU (marker ``gpu``)."""

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, attention_varlen_reference
from tvmflash.compiler.derive import NotRepairable, rolling_update, split_k_update
from tvmflash.definition.plain import plain_attention
from helpers import assert_close_to_reference

torch = pytest.importorskip("torch")


def _packed(rng, lengths_q, lengths_k, heads, group, head_dim, dtype=torch.float16, device="cpu"):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k) of sequences with these lengths, packed."""
    cq = torch.tensor(np.concatenate([[0], np.cumsum(lengths_q)]), dtype=torch.int32)
    ck = torch.tensor(np.concatenate([[0], np.cumsum(lengths_k)]), dtype=torch.int32)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    q = torch.randn(int(cq[-1]), heads, head_dim, generator=g).to(dtype).to(device)
    k = torch.randn(int(ck[-1]), heads // group, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(int(ck[-1]), heads // group, head_dim, generator=g).to(dtype).to(device)
    return q, k, v, cq.to(device), ck.to(device)


def _check(q, k, v, cq, ck, causal, **kw):
    lq, lk = (np.diff(c.cpu().numpy()) for c in (cq, ck))
    out, lse = tvmflash.attention_varlen(q, k, v, cq, ck, int(lq.max(initial=0)), int(lk.max(initial=0)),
                                         causal=causal, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    slopes = kw.get("alibi_slopes")
    ref = attention_varlen_reference(
        q.float().cpu().numpy(), k.float().cpu().numpy(), v.float().cpu().numpy(), cq.cpu().numpy(), ck.cpu().numpy(),
        causal=causal, **{n: kw[n] for n in ("window_size", "softcap", "softmax_scale") if n in kw},
        alibi_slopes=None if slopes is None else slopes.cpu().numpy())
    assert_close_to_reference(out.float().cpu().numpy(), lse.cpu().numpy(), *ref, str(q.dtype).replace("torch.", ""))
    return out, lse


@pytest.mark.parametrize("lengths_q, lengths_k, heads, group, causal", [
    ((5, 0, 70, 3, 129), (7, 4, 90, 1, 129), 4, 1, False),  # an empty sequence, odd lengths
    ((5, 0, 70, 3, 129), (7, 4, 90, 1, 129), 8, 4, True),  # causal per sequence, GQA 4; more queries than keys
    ((1, 1, 1), (300, 2, 77), 8, 8, True),  # one query each (decode-like), MQA-like group 8
    ((33,), (33,), 2, 1, True),  # a single sequence: the dense kernel's case
])
def test_varlen_matches_the_reference(rng, lengths_q, lengths_k, heads, group, causal):
    """Each sequence attends to its own keys only, causal aligned bottom-right per sequence, rows
    of one sequence never written by another's tile."""
    _check(*_packed(rng, lengths_q, lengths_k, heads, group, 64), causal)


def test_varlen_variants_numpy_and_bf16(rng):
    """Window, softcap and ALiBi (per batch) aligned per sequence; numpy inputs; bfloat16."""
    q, k, v, cq, ck = _packed(rng, (9, 40, 1), (20, 40, 65), 4, 2, 64)
    slopes = torch.rand(3, 4, dtype=torch.float32)
    _check(q, k, v, cq, ck, True, window_size=(7, 0), softcap=3.0, alibi_slopes=slopes)
    _check(q, k, v, cq, ck, False, window_size=(5, 3), softmax_scale=0.2)
    out = tvmflash.attention_varlen(q.numpy(), k.numpy(), v.numpy(), cq.numpy(), ck.numpy(), 40, 65)
    assert isinstance(out, np.ndarray) and out.shape == tuple(q.shape)
    qb, kb, vb, _, _ = _packed(rng, (9, 40, 1), (20, 40, 65), 4, 2, 128, dtype=torch.bfloat16)
    _check(qb, kb, vb, cq, ck, True)


def test_varlen_edges(rng):
    """No key at all (an empty k: nothing is read), zero-length sequences, and bounds far above
    the longest sequence (the kernel runs on the longest the prefix sums hold: no idle tiles, no
    overflow in a window's arithmetic)."""
    q, k, v, cq, ck = _packed(rng, (5, 3), (0, 0), 4, 1, 64)
    out, lse = tvmflash.attention_varlen(q, k, v, cq, ck, 5, 16, return_lse=True)
    assert not out.any() and bool(torch.isneginf(lse).all())
    q, k, v, cq, ck = _packed(rng, (9, 3), (4, 6), 4, 2, 64)  # (the window kernel of the variants' test)
    out, lse = tvmflash.attention_varlen(q, k, v, cq, ck, 2**31 - 10, 2**31 - 1, window_size=(-1, 2), return_lse=True)
    ref = attention_varlen_reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), cq.numpy(), ck.numpy(),
                                     window_size=(-1, 2))
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")


def test_varlen_bad_input_is_refused(rng):
    """Prefix sums that do not start at 0, decrease, miss the packed length, differ in batch or
    are not int32; max_seqlen below the longest sequence; a dense kernel's arrays; each an error
    naming the argument, before anything runs."""
    q, k, v, cq, ck = _packed(rng, (5, 7), (6, 8), 4, 1, 64)

    def call(**kw):
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7, max_seqlen_k=8)
        args.update(kw)
        return tvmflash.attention_varlen(**args)

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    cases = [
        (dict(cu_seqlens_q=i32([1, 5, 12])), ValueError, "cu_seqlens_q: expected prefix sums starting at 0"),
        (dict(cu_seqlens_q=i32([0, 8, 5, 12])), ValueError, "cu_seqlens_q: expected non-decreasing"),
        (dict(cu_seqlens_k=i32([0, 6, 13])), ValueError, "cu_seqlens_k: expected the last prefix sum to be 14"),
        (dict(cu_seqlens_k=i32([0, 6, 8, 14])), ValueError, "cu_seqlens_k: expected shape (3,)"),
        (dict(cu_seqlens_q=cq.long()), TypeError, "cu_seqlens_q: expected dtype int32"),
        (dict(cu_seqlens_q=i32([[0, 5, 12]])), ValueError, "cu_seqlens_q: expected shape (batch + 1,)"),
        (dict(max_seqlen_q=6), ValueError, "max_seqlen_q: expected at least the longest sequence's 7"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected an int in"),
        (dict(max_seqlen_k=8.0), TypeError, "max_seqlen_k: expected an int"),
        (dict(q=q[None]), ValueError, "q: expected rank 3 [total_tokens, heads, head_dim]"),
        (dict(v=v[:13]), ValueError, "v: expected the shape of k"),
        (dict(k=k[:, :3], v=v[:, :3]), ValueError, "k: expected heads_kv dividing"),
    ]
    for kw, err, text in cases:
        with pytest.raises(err) as info:
            call(**kw)
        assert text in str(info.value), (kw, str(info.value))
    kernel = tvmflash.get_kernel(KernelSpec(64, varlen=True))
    with pytest.raises(ValueError, match="takes packed sequences"):
        kernel(q[None], k[None], v[None])
    dense = tvmflash.get_kernel(KernelSpec(64))
    with pytest.raises(ValueError, match="built with varlen=False"):
        dense.call_varlen(q, k, v, cq, ck, 7, 8)


def test_the_derived_kernel_reads_each_sequence_through_its_offsets():
    """The prefix sums reach the derived kernel through four variables bound a tile: the key
    loop's bound (a sequence's keys, and no key tile for a query tile past its rows) and the
    loads and stores read them, not a load of the prefix sums per element. The split form
    refuses packed sequences."""
    plain = plain_attention(KernelSpec(64, causal=True, varlen=True))
    text = rolling_update(plain, 16, 16).script()
    for line in ("q_start: T.let[T.int32] = cu_seqlens_q[vb]", "k_end: T.let[T.int32] = cu_seqlens_k[vb + 1]"):
        assert line in text
    loop = next(line for line in text.splitlines() if "for kb in" in line)
    assert "k_end - k_start" in loop and "vqb * 16 < q_end - q_start" in loop and "cu_seqlens" not in loop
    assert "cu_seqlens" not in text[text.index("k_end: T.let"):].split("\n", 1)[1]
    with pytest.raises(NotRepairable, match="cu_seqlens_q: packed sequences"):
        split_k_update(plain, 16, 16, 2)


def test_the_varlen_torch_op(rng):
    """``torch.ops.tvmflash.attention_varlen_fwd``: opcheck, the same result as the function,
    and torch.compile(fullgraph=True) through the fake."""
    import tvmflash.torch_ops  # noqa: F401  (registers the ops)

    op = torch.ops.tvmflash.attention_varlen_fwd
    q, k, v, cq, ck = _packed(rng, (3, 10), (12, 4), 4, 2, 64)
    result = torch.library.opcheck(op.default, (q, k, v, cq, ck, 10, 12), {"causal": True})
    assert set(result.values()) == {"SUCCESS"}, result
    out, lse = op(q, k, v, cq, ck, 10, 12, causal=True)
    want, want_lse = tvmflash.attention_varlen(q, k, v, cq, ck, 10, 12, causal=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)

    def step(q, k, v):
        return op(q, k, v, cq, ck, 10, 12)[0] * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), step(q, k, v))
    with pytest.raises(Exception, match="q: expected rank 3"):  # (the fake's error, inside dynamo's)
        torch.compile(lambda q: op(q, k, v, cq, ck, 10, 12)[0], fullgraph=True, backend="aot_eager")(q[None])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("lengths_q, lengths_k, group, head_dim, causal", [
    ((1000, 1, 0, 257, 4096), (1000, 3000, 5, 257, 4096), 1, 128, True),  # odd lengths, an empty one
    ((128, 640, 77), (128, 640, 77), 4, 64, False),  # tile multiples, GQA 4
    ((300, 2000), (900, 2000), 8, 128, True),  # more keys than queries, group 8
    ((5, 700), (64, 700), 1, 256, False),  # head dim 256
])
@pytest.mark.parametrize("offsets_on", ["cuda", "cpu"])
def test_varlen_on_the_gpu(rng, dtype, lengths_q, lengths_k, group, head_dim, causal, offsets_on):
    """The GPU's kernel (prefill on tensor cores) against the reference; the prefix sums on the
    GPU or on the CPU (no synchronisation)."""
    q, k, v, cq, ck = _packed(rng, lengths_q, lengths_k, 8, group, head_dim, getattr(torch, dtype), "cuda")
    _check(q, k, v, cq.to(offsets_on), ck.to(offsets_on), causal)
