"""``attention_with_kvcache``: attention over a KV cache with per-sequence lengths, on the CPU
(numerics against the float64 reference) and on a CUDA GPU (marker ``gpu``)."""

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, attention_reference
from tvmflash.compiler.derive import rolling_update, split_k_update
from tvmflash.definition.plain import plain_attention
from helpers import assert_close_to_reference

torch = pytest.importorskip("torch")


def _cache(rng, batch, capacity, heads_kv, head_dim, dtype=torch.float16, device="cpu"):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    kc = torch.randn(batch, capacity, heads_kv, head_dim, generator=g).to(dtype).to(device)
    vc = torch.randn(batch, capacity, heads_kv, head_dim, generator=g).to(dtype).to(device)
    return kc, vc


def _expected_cache(cache, new, lengths):
    out = cache.clone()
    if new is not None:
        for b, n in enumerate(lengths.tolist()):
            out[b, n:n + new.shape[1]] = new[b]
    return out


def _check(q, kc, vc, k, v, lengths, causal, **kw):
    """Run the cache API, then check the cache was appended to and the result against the
    reference on each sequence's keys."""
    new = 0 if k is None else k.shape[1]
    want_k, want_v = _expected_cache(kc, k, lengths), _expected_cache(vc, v, lengths)
    out, lse = tvmflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, causal=causal,
                                               return_lse=True, **kw)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    ref = attention_reference(q.float().cpu().numpy(), kc.float().cpu().numpy(), vc.float().cpu().numpy(),
                              causal=causal, seqused_k=(lengths.cpu() + new).numpy(),
                              **{n: kw[n] for n in ("window_size", "softcap") if n in kw},
                              alibi_slopes=None if kw.get("alibi_slopes") is None else kw["alibi_slopes"].cpu().numpy())
    dtype = str(q.dtype).replace("torch.", "")
    assert_close_to_reference(out.float().cpu().numpy(), lse.cpu().numpy(), *ref, dtype)
    return out, lse


@pytest.mark.parametrize("seq_q, new, heads, group, causal, lengths, num_splits", [
    (1, 1, 8, 4, True, (0, 36, 512), 0),  # decode: lengths 1, 37 and 513 after the append
    (1, 1, 8, 8, True, (200, 3, 0), 3),  # MQA-like group 8, split in 3, a sequence of one key
    (5, 5, 4, 1, True, (0, 100, 508), 0),  # five new tokens at once (speculative decoding)
    (6, 0, 4, 4, False, (1, 37, 513), 2),  # no append, not causal
    (37, 2, 4, 1, True, (0, 37, 300), 0),  # more queries than some sequences have keys: rows see none
])
def test_kvcache_matches_the_reference(rng, seq_q, new, heads, group, causal, lengths, num_splits):
    """Awkward lengths (1, 37, 513, a sequence with fewer keys than queries), GQA groups 1/4/8,
    causal on and off, the keys appended in place first, split and not."""
    kc, vc = _cache(rng, 3, 520, heads // group, 64)
    q = torch.from_numpy(rng.standard_normal((3, seq_q, heads, 64))).to(torch.float16)
    k, v = (torch.from_numpy(rng.standard_normal((3, new, heads // group, 64))).to(torch.float16)
            for _ in range(2)) if new else (None, None)
    _check(q, kc, vc, k, v, torch.tensor(lengths, dtype=torch.int32), causal, num_splits=num_splits)


def test_kvcache_int_lengths_numpy_and_variants(rng):
    """cache_seqlens as an int, numpy arrays (written in place too), and a window and a softcap
    aligned per sequence."""
    kc, vc = (x.numpy() for x in _cache(rng, 2, 130, 2, 64))
    q = rng.standard_normal((2, 3, 4, 64)).astype(np.float16)
    k, v = (rng.standard_normal((2, 3, 2, 64)).astype(np.float16) for _ in range(2))
    out = tvmflash.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=90)
    assert np.array_equal(kc[:, 90:93], k) and np.array_equal(vc[:, 90:93], v)
    ref = attention_reference(q, kc, vc, causal=True, seqused_k=[93, 93])
    assert_close_to_reference(out, None, ref[0], None, "float16")
    kt, vt = _cache(rng, 2, 130, 2, 64)
    lengths = torch.tensor([7, 120], dtype=torch.int32)
    _check(torch.from_numpy(q), kt, vt, None, None, lengths, True, window_size=(20, 0), softcap=5.0)
    _check(torch.from_numpy(q), kt, vt, None, None, lengths, True, alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05]))
    out = tvmflash.attention_with_kvcache(torch.from_numpy(q), kt, vt, cache_seqlens=np.int32(50))  # a numpy int
    assert torch.equal(out, tvmflash.attention_with_kvcache(torch.from_numpy(q), kt, vt, cache_seqlens=50))


def test_kvcache_bad_input_is_refused(rng):
    """Each bad argument gets an error naming it, before anything is written or run."""
    kc, vc = _cache(rng, 2, 64, 2, 64)
    q = torch.zeros(2, 1, 4, 64, dtype=torch.float16)
    k = torch.zeros(2, 1, 2, 64, dtype=torch.float16)
    lengths = torch.tensor([3, 63], dtype=torch.int32)
    before = kc.clone()

    def refused(exc, pattern, *args, **kw):
        kw.setdefault("cache_seqlens", lengths)
        with pytest.raises(exc, match=pattern):
            tvmflash.attention_with_kvcache(q, kc, vc, *args, **kw)

    refused(ValueError, r"cache_seqlens: .*<= seqlen_cache = 64.*cache_seqlens\[1\] = 63 with seqlen_new = 2",
            torch.zeros(2, 2, 2, 64, dtype=torch.float16), torch.zeros(2, 2, 2, 64, dtype=torch.float16))
    refused(ValueError, r"cache_seqlens: .*cache_seqlens\[0\] = 65", cache_seqlens=torch.tensor([65, 1], dtype=torch.int32))
    refused(ValueError, r"cache_seqlens: expected lengths >= 0, got cache_seqlens\[1\] = -1",
            cache_seqlens=torch.tensor([1, -1], dtype=torch.int32))
    refused(TypeError, r"cache_seqlens: expected dtype int32, got int64", cache_seqlens=torch.tensor([1, 2]))
    refused(ValueError, r"cache_seqlens: expected shape \(2,\)", cache_seqlens=torch.tensor([1], dtype=torch.int32))
    refused(TypeError, r"cache_seqlens: expected an int", cache_seqlens=True)
    refused(ValueError, r"v: expected new keys and values together, got k without v", k)
    refused(ValueError, r"k: expected \[batch 2, seqlen_new, heads_kv 2, head_dim 64\]",
            torch.zeros(2, 1, 4, 64, dtype=torch.float16), torch.zeros(2, 1, 4, 64, dtype=torch.float16))
    refused(TypeError, r"k: expected dtype float16", k.bfloat16(), k.bfloat16())
    with pytest.raises(ValueError, match=r"k_cache: expected batch 2 \(the batch of q\), got 1"):
        tvmflash.attention_with_kvcache(q, kc[:1], vc[:1], cache_seqlens=1)
    # the scalars are checked before the new keys are written
    refused(ValueError, r"softmax_scale", k, k, softmax_scale=-1.0)
    refused(ValueError, r"window_size", k, k, window_size=(-1, 5))
    refused(ValueError, r"alibi_slopes: expected shape", k, k, alibi_slopes=torch.zeros(3))
    wide_k, wide_v = _cache(rng, 2, 128, 2, 64)
    with pytest.raises(ValueError, match=r"k_cache: expected a contiguous cache"):
        tvmflash.attention_with_kvcache(q, wide_k[:, ::2], wide_v[:, ::2], cache_seqlens=1)
    assert torch.equal(kc, before)


def test_a_seqused_kernel_takes_lengths_and_only_it(rng):
    """``KernelSpec(seqused_k=True)``: the key names it, it has no even build, its kernel
    refuses a call without lengths and a plain kernel one with them."""
    spec = KernelSpec(64, causal=True, seqused_k=True)
    assert "kvlen" in spec.key and spec.input_buffers == ("seqused_k",)
    with pytest.raises(ValueError, match="seqused_k: for the fused algorithm with any shape and no even build"):
        KernelSpec(64, seqused_k=True, even=True)
    from tvmflash import rules

    assert not rules.rule_for(spec.replace(target="nvidia/nvidia-a100")).has_even_build(
        spec.replace(target="nvidia/nvidia-a100"))
    q = rng.standard_normal((1, 2, 2, 64)).astype(np.float16)
    k = rng.standard_normal((1, 9, 2, 64)).astype(np.float16)
    with pytest.raises(ValueError, match=r"seqused_k: kernel .* expected \(1,\) int32, got None"):
        tvmflash.get_kernel(spec)(q, k, k)
    with pytest.raises(ValueError, match="seqused_k: kernel .* has none"):
        tvmflash.get_kernel(KernelSpec(64, causal=True))(q, k, k, seqused_k=np.array([3], np.int32))


@pytest.mark.parametrize("derive", ["rolling", "split"])
def test_the_derived_kernel_visits_only_a_sequences_key_tiles(derive):
    """The sequence's key count reaches the derived loop bound (through one variable bound a tile,
    not a load per key), so the key tiles past it are never visited."""
    plain = plain_attention(KernelSpec(64, causal=True, seqused_k=True))
    func = rolling_update(plain, 16, 16) if derive == "rolling" else split_k_update(plain, 16, 16, 3)
    text = func.script()
    assert "kv_used: T.let[T.int32] = seqused_k[vb]" in text
    loop = next(line for line in text.splitlines() if "for kb in" in line)
    assert "kv_used" in loop and "seqused_k" not in loop
    body = text[text.index("for kb in"):]
    assert "seqused_k[" not in body  # the mask reads the variable too


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("seq_q, new, group, head_dim, lengths, num_splits", [
    (1, 1, 4, 128, (0, 36, 4000, 1), 0),  # decode, split by the heuristic
    (1, 1, 8, 64, (511, 12, 100, 2000), 1),  # one program per query tile
    (16, 16, 4, 128, (0, 1000, 30, 3000), 0),  # a 16-row speculative step
    (100, 100, 2, 128, (0, 37, 1500, 600), 0),  # a prompt chunk: the prefill tensor-core kernel
    (3, 0, 1, 256, (5, 700, 64, 1), 0),  # head dim 256, no append
])
@pytest.mark.parametrize("lengths_on", ["cuda", "cpu"])
def test_kvcache_on_the_gpu(rng, dtype, seq_q, new, group, head_dim, lengths, num_splits, lengths_on):
    """On the GPU's kernels (split decode and prefill on tensor cores) against the reference;
    the lengths on the GPU or on the CPU (no synchronisation)."""
    dt = getattr(torch, dtype)
    heads = 8
    kc, vc = _cache(rng, 4, 4096, heads // group, head_dim, dt, "cuda")
    q = torch.from_numpy(rng.standard_normal((4, seq_q, heads, head_dim))).to(dt).cuda()
    k, v = (torch.from_numpy(rng.standard_normal((4, new, heads // group, head_dim))).to(dt).cuda()
            for _ in range(2)) if new else (None, None)
    _check(q, kc, vc, k, v, torch.tensor(lengths, dtype=torch.int32, device=lengths_on), True, num_splits=num_splits)


def test_the_kvcache_torch_op(rng):
    """``torch.ops.tvmflash.attention_kvcache_fwd``: opcheck (its schema says it writes the caches),
    the same result as the function, and torch.compile(fullgraph=True) through the fake."""
    import tvmflash.torch_ops  # noqa: F401  (registers the ops)

    op = torch.ops.tvmflash.attention_kvcache_fwd
    kc, vc = _cache(rng, 2, 40, 2, 64)
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 64))).to(torch.float16)
    k, v = (torch.from_numpy(rng.standard_normal((2, 1, 2, 64))).to(torch.float16) for _ in range(2))
    lengths = torch.tensor([3, 30], dtype=torch.int32)
    result = torch.library.opcheck(op.default, (q, kc.clone(), vc.clone(), k, v, lengths), {})
    assert set(result.values()) == {"SUCCESS"}, result
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = op(q, kc, vc, k, v, lengths)
    want, want_lse = tvmflash.attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lengths, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(kc, kc2)

    def step(q, kc, vc, k, v, lengths):
        return op(q, kc, vc, k, v, lengths)[0] * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc3, vc3 = kc2.clone(), vc2.clone()
    assert torch.equal(compiled(q, kc3, vc3, k, v, lengths + 1), step(q, kc2, vc2, k, v, lengths + 1))
    assert torch.equal(kc3, kc2)


def _paged(rng, cache, page_size, table=None, spare=3):
    """``cache`` (batch, capacity, ...) cut into pages of ``page_size`` rows, stored in shuffled
    order (or ``table``'s) with ``spare`` unused pages: (pages, block_table)."""
    batch, capacity = cache.shape[:2]
    per = -(-capacity // page_size)
    pad = per * page_size - capacity
    padded = torch.cat([cache, cache.new_zeros(batch, pad, *cache.shape[2:])], 1) if pad else cache
    if table is None:
        table = torch.from_numpy(rng.permutation(batch * per + spare)).to(torch.int32)[: batch * per].reshape(batch, per)
    pages = cache.new_zeros(batch * per + spare, page_size, *cache.shape[2:])
    pages[table.reshape(-1).long()] = padded.reshape(batch * per, page_size, *cache.shape[2:])
    return pages, table


def _dense(pages, table):
    return pages[table.long()].reshape(table.shape[0], -1, *pages.shape[2:])


@pytest.mark.parametrize("seq_q, new, heads, group, causal, lengths, page_size, num_splits", [
    (1, 1, 8, 4, True, (0, 36, 512), 16, 0),  # decode: lengths 1, 37 and 513, partly filled last pages
    (1, 1, 8, 8, True, (200, 3, 0), 7, 3),  # a page size that divides nothing, split in 3
    (5, 5, 4, 1, True, (14, 100, 508), 16, 0),  # the new tokens cross a page boundary
    (6, 0, 4, 4, False, (1, 37, 513), 256, 2),  # no append, not causal, big pages
])
def test_paged_kvcache_matches_the_reference(rng, seq_q, new, heads, group, causal, lengths, page_size, num_splits):
    """A paged cache (pages shuffled, spare pages, partly filled last pages): appended in place
    into the right pages, and attention as over the contiguous cache the table describes."""
    kc, vc = _cache(rng, 3, 520, heads // group, 64)
    kp, table = _paged(rng, kc, page_size)
    vp, _ = _paged(rng, vc, page_size, table)
    q = torch.from_numpy(rng.standard_normal((3, seq_q, heads, 64))).to(torch.float16)
    k, v = (torch.from_numpy(rng.standard_normal((3, new, heads // group, 64))).to(torch.float16)
            for _ in range(2)) if new else (None, None)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    out, lse = tvmflash.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lengths, block_table=table,
                                               causal=causal, return_lse=True, num_splits=num_splits)
    kd, vd = _dense(kp, table), _dense(vp, table)
    assert torch.equal(kd[:, :520], _expected_cache(kc, k, lengths)) and torch.equal(vd[:, :520], _expected_cache(vc, v, lengths))
    ref = attention_reference(q.numpy(), kd.numpy(), vd.numpy(), causal=causal, seqused_k=(lengths + new).numpy())
    assert_close_to_reference(out.float().numpy(), lse.numpy(), *ref, "float16")


def test_paged_block_table_is_checked_where_read(rng):
    """Entries of the pages a sequence fills must be pages of the cache (an error naming the
    entry otherwise); entries past them are never read, so padding such as -1 is fine."""
    kc, vc = _cache(rng, 2, 64, 2, 64)
    kp, table = _paged(rng, kc, 16)
    vp, _ = _paged(rng, vc, 16, table)
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 64))).to(torch.float16)
    lengths = torch.tensor([20, 3], dtype=torch.int32)  # pages 2 and 1 of 4
    padded = table.clone()
    padded[0, 2:], padded[1, 1:] = -1, 10 ** 6
    want = tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table)
    assert torch.equal(tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=padded), want)
    bad = table.clone()
    bad[0, 1] = kp.shape[0]
    with pytest.raises(ValueError, match=r"block_table: expected page numbers in \[0, 11\) .* for the 2 pages sequence "
                                         r"0 fills, got block_table\[0, 1\] = 11"):
        tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=bad)
    with pytest.raises(TypeError, match="block_table: expected dtype int32, got int64"):
        tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table: expected shape \(2, max_pages\)"):
        tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table[:1])
    with pytest.raises(ValueError, match=r"cache_seqlens: .*<= max_pages \* page_size = 64"):
        tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=torch.tensor([64, 1], dtype=torch.int32),
                                        k=q[:, :, :2], v=q[:, :, :2], block_table=table)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("seq_q, new, group, head_dim, lengths", [
    (1, 1, 4, 128, (0, 36, 4000, 1)),  # decode, split
    (16, 16, 4, 128, (0, 1000, 30, 3000)),  # 16 new tokens
    (100, 100, 2, 64, (0, 37, 1500, 600)),  # a prompt chunk: the prefill kernel
])
def test_paged_kvcache_on_the_gpu(rng, page_size, seq_q, new, group, head_dim, lengths):
    heads = 8
    kc, vc = _cache(rng, 4, 4096, heads // group, head_dim, torch.float16, "cuda")
    kp, table = _paged(rng, kc, page_size)
    vp, _ = _paged(rng, vc, page_size, table)
    q = torch.from_numpy(rng.standard_normal((4, seq_q, heads, head_dim))).to(torch.float16).cuda()
    k, v = (torch.from_numpy(rng.standard_normal((4, new, heads // group, head_dim))).to(torch.float16).cuda()
            for _ in range(2))
    lengths = torch.tensor(lengths, dtype=torch.int32)
    out, lse = tvmflash.attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lengths.cuda(),
                                               block_table=table.cuda(), return_lse=True)
    kd, vd = _dense(kp, table.cuda()), _dense(vp, table.cuda())
    assert torch.equal(kd[:, :4096], _expected_cache(kc, k, lengths))
    assert torch.equal(vd[:, :4096], _expected_cache(vc, v, lengths))
    ref = attention_reference(q.float().cpu().numpy(), kd.float().cpu().numpy(), vd.float().cpu().numpy(),
                              causal=True, seqused_k=(lengths + new).numpy())
    assert_close_to_reference(out.float().cpu().numpy(), lse.cpu().numpy(), *ref, "float16")


def test_the_kvcache_ops_fake_names_the_cache_and_takes_a_table(rng):
    """Under torch.compile's fake tensors the op checks ranks and dtypes by the cache's names;
    the op reaches the paged cache through ``block_table``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import tvmflash.torch_ops  # noqa: F401

    op = torch.ops.tvmflash.attention_kvcache_fwd
    with FakeTensorMode():
        q = torch.empty(2, 1, 4, 64, dtype=torch.float16)
        lengths = torch.zeros(2, dtype=torch.int32)
        with pytest.raises(ValueError, match=r"^k_cache: expected rank 4"):
            op(q, torch.empty(2, 8, 64, dtype=torch.float16), torch.empty(2, 8, 2, 64, dtype=torch.float16), None,
               None, lengths)
        with pytest.raises(TypeError, match=r"^v_cache: expected dtype float16"):
            op(q, torch.empty(2, 8, 2, 64, dtype=torch.float16), torch.empty(2, 8, 2, 64, dtype=torch.bfloat16), None,
               None, lengths)
    kc, vc = _cache(rng, 2, 64, 2, 64)
    kp, table = _paged(rng, kc, 16)
    vp, _ = _paged(rng, vc, 16, table)
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 64))).to(torch.float16)
    lengths = torch.tensor([20, 3], dtype=torch.int32)
    out, _ = op(q, kp, vp, None, None, lengths, block_table=table)
    assert torch.equal(out, tvmflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table))
