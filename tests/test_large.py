"""Tensors past int32 indexing: the kernels index with int32, so a batch whose tensors exceed 2^31
elements runs as several launches on views of consecutive sequences, each from its own base
pointers (``Kernel._batch_chunk``). On the CPU the limit is lowered to exercise the parts; on the
GPU (marker ``gpu``) batch 64 x 32k keys x 8 kv heads x 128, 2^31 elements a tensor, runs."""

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec
from tvmflash.runtime import kernel as K
from helpers import assert_close_to_reference

torch = pytest.importorskip("torch")


def _recorded(spec, seen):
    """The process's kernel for ``spec``, its launches' batches appended to ``seen``."""
    kernel = tvmflash.get_kernel(spec)
    fns = kernel._functions
    if not getattr(fns[0], "recording", False):
        def record(*args):
            seen.append(int(args[0].shape[0]))
            return record.inner(*args)

        record.recording, record.inner = True, fns[0]
        kernel._functions = [record, *fns[1:]]
    return kernel


@pytest.fixture
def seen(monkeypatch):
    """The batch of each launch, once the kernels' int32 limit is lowered to three sequences of
    33 keys x 2 kv heads x 64 (``low``)."""
    class Launches(list):
        pass

    launches = Launches()
    launches.low = lambda: monkeypatch.setattr(K, "INT32_MAX", 3 * 33 * 2 * 64)
    yield launches
    for kernel in tvmflash.runtime.cache._loaded.values():  # (later tests get the kernels unwrapped)
        if getattr(kernel._functions[0], "recording", False):
            kernel._functions = [kernel._functions[0].inner, *kernel._functions[1:]]


def _qkv(seed=0, batch=7, seq_q=5, seq_k=33):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, 4, 64, generator=g).half()
    k, v = (torch.randn(batch, seq_k, 2, 64, generator=g).half() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("splits", [0, 2])
def test_a_batch_past_int32_runs_in_parts_with_the_same_result(seen, splits):
    """Seven sequences where three fit: launches of 2, 2 and 3 sequences (equal as may be), bitwise the result of
    one launch (torch and numpy arrays; the prefill and the split kernel)."""
    q, k, v = _qkv()
    kernel = _recorded(KernelSpec(64, causal=True, group=2, splits=splits), seen)
    one = kernel(q, k, v, return_lse=True)
    assert seen == [7]
    seen.low()
    seen.clear()
    parts = kernel(q, k, v, return_lse=True)
    assert seen == [2, 2, 3]
    assert torch.equal(parts[0], one[0]) and torch.equal(parts[1], one[1])
    seen.clear()
    assert np.array_equal(kernel(q.numpy(), k.numpy(), v.numpy()), one[0].numpy()) and seen == [2, 2, 3]


def test_the_kvcache_api_runs_in_parts(seen):
    """A contiguous KV cache of seven sequences whose capacity passes the limit: appended, then
    attended in parts, against the reference."""
    q, kc, vc = _qkv(1, seq_q=1)
    k_new, v_new = (torch.randn(7, 1, 2, 64).half() for _ in range(2))
    lengths = torch.tensor([0, 5, 32, 1, 7, 20, 3], dtype=torch.int32)
    _recorded(KernelSpec(64, causal=True, group=2, seqused_k=True), seen)
    seen.low()
    got, lse = tvmflash.attention_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lengths, num_splits=1,
                                               return_lse=True)
    assert seen == [2, 2, 3]
    ref = tvmflash.attention_reference(q.float().numpy(), kc.float().numpy(), vc.float().numpy(), causal=True,
                                       seqused_k=(lengths + 1).numpy())
    assert_close_to_reference(got.float().numpy(), lse.numpy(), *ref, "float16")


def test_what_cannot_run_in_parts_is_refused(seen):
    """One sequence past the limit, a paged cache's pages past it, the standard algorithm: each
    an error naming q, k and the limit, before any launch."""
    seen.low()
    q, k, v = _qkv(seq_k=200)  # one sequence's keys: 200 x 2 x 64 > 3 x 33 x 2 x 64
    with pytest.raises(ValueError, match=r"q, k: .* int32: expected at most 12,672 elements per sequence .* got "
                                         r"one sequence's \(25,600\)"):
        tvmflash.attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"expected at most 3 sequences .* of the standard algorithm"):
        tvmflash.attention(q, k, v, algorithm="standard")
    pages = torch.zeros(100, 16, 2, 64).half()
    with pytest.raises(ValueError, match=r"got the pages of k \(204,800\)"):
        tvmflash.attention_with_kvcache(q[:, :1], pages, pages.clone(), cache_seqlens=torch.zeros(7, dtype=torch.int32),
                                        block_table=torch.zeros(7, 3, dtype=torch.int32))
    assert seen == []


@pytest.mark.gpu
def test_batch_64_by_32k_keys_runs_on_the_gpu():
    """The inference issue's refused case: q [64, 1, 32, 128], k, v [64, 32768, 8, 128] float16
    (2^31 elements each), on the split decode kernel and the KV-cache API: each sequence's result
    as the kernel gives it for that sequence alone."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(64, 1, 32, 128, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(64, 32768, 8, 128, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(64, 32768, 8, 128, device="cuda", dtype=torch.float16, generator=g)
    out = tvmflash.attention(q, k, v, num_splits=4)
    lengths = torch.full((64,), 32768, dtype=torch.int32)
    cached = tvmflash.attention_with_kvcache(q, k, v, cache_seqlens=lengths, causal=False, num_splits=4)
    for b in (0, 31, 32, 63):  # each side of the launch boundary
        alone = tvmflash.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], num_splits=4)
        assert torch.equal(out[b:b + 1], alone) and torch.equal(cached[b:b + 1], alone), b
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2).float(), k[b:b + 1].transpose(1, 2).float(), v[b:b + 1].transpose(1, 2).float(),
            enable_gqa=True).transpose(1, 2)
        assert (alone.float() - ref).abs().max() < 2e-3, b
