"""``attention_with_kvcache``: attention over a KV cache, FlashAttention-2's ``flash_attn_with_kvcache``.

The kernel is the one ``attention`` runs, built with per-sequence key counts
(``KernelSpec.seqused_k``): k and v are the whole cache, each sequence sees its first
``cache_seqlens[b] + seqlen_new`` keys and its causal diagonal sits at that length. New keys
and values are written into the cache first, in place.
"""

from __future__ import annotations

from . import validate as V
from .api import kernel_for, spec_for, splits_for


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False,
                           num_splits: int = 0, softcap: float = 0.0, window_size=(-1, -1), alibi_slopes=None):
    """Attention of q over a KV cache, as FlashAttention-2's ``flash_attn_with_kvcache``.

    q: [batch, seqlen_q, heads, head_dim], seqlen_q small (a decode step, a few draft tokens, a
    prompt chunk). k_cache, v_cache: [batch, seqlen_cache, heads_kv, head_dim], the cache's
    capacity. cache_seqlens: the keys each sequence holds before this call, an int or (batch,)
    int32, on the device of q or (q on a GPU) on the CPU, which saves a synchronisation.
    k, v: optional [batch, seqlen_new, heads_kv, head_dim], written into the cache at
    ``cache_seqlens`` (in place) before the attention, which then covers old and new keys:
    sequence b sees its first ``cache_seqlens[b] + seqlen_new`` keys.
    causal (default True, as decoding needs; FlashAttention's default is False): aligned
    bottom-right per sequence, query row i sees keys j <= i + cache_seqlens[b] + seqlen_new -
    seqlen_q. softmax_scale, softcap, window_size, alibi_slopes, num_splits, return_lse: as
    ``attention``'s, window and ALiBi aligned per sequence like causal.
    block_table (a paged cache) is not supported yet: pass a contiguous cache.
    Returns out [batch, seqlen_q, heads, head_dim], and with ``return_lse`` also lse [batch,
    heads, seqlen_q] (float32, natural log; -inf for rows that see no key).

    The lengths are checked on the host: a write or a read past the cache is refused with an
    error, never run. Lengths on the GPU are copied back for it (the call waits for the GPU);
    lengths on the CPU (a serving loop's scheduler holds them) are not, and go to the GPU
    asynchronously.
    """
    causal = V.check_bool(causal, "causal")
    return_lse = V.check_bool(return_lse, "return_lse")
    if block_table is not None:
        raise NotImplementedError("block_table: a paged KV cache is not supported yet; pass contiguous k_cache and "
                                  "v_cache [batch, seqlen_cache, heads_kv, head_dim] and block_table=None")
    kind, device, dtype, (b, sq, h, capacity, hk, d) = V.check_qkv(q, k_cache, v_cache,
                                                                   names=("q", "k_cache", "v_cache"))
    if kind not in ("torch", "numpy"):
        raise TypeError(f"k_cache: expected torch tensors or numpy arrays (the cache is written in place), got {kind}")
    V.check_no_grad(kind, q, k_cache, v_cache)
    new = _check_new(k, v, kind, device, dtype, b, hk, d)
    held, lengths = _lengths(cache_seqlens, kind, device, b)
    for i, n in enumerate(held):
        if n < 0:
            raise ValueError(f"cache_seqlens: expected lengths >= 0, got cache_seqlens[{i}] = {n}")
        if n + new > capacity:
            raise ValueError(
                f"cache_seqlens: expected cache_seqlens[b] + seqlen_new <= seqlen_cache = {capacity} (the cache's "
                f"capacity), got cache_seqlens[{i}] = {n} with seqlen_new = {new}")
    if new:
        _append((k_cache, v_cache), (k, v), lengths, kind)
    used = lengths + new if kind == "torch" else (lengths + new).astype("int32")
    cap = V.check_softcap(softcap)
    window = V.check_window(window_size, causal)
    spec, _ = spec_for(q, k_cache, v_cache, causal=causal, softcap=bool(cap), window=window,
                       alibi=alibi_slopes is not None)
    spec = spec.replace(seqused_k=True)
    V.check_scale(softmax_scale, d)
    num_splits = V.check_num_splits(num_splits)
    longest = max(held, default=0) + new
    splits = splits_for(spec, b, sq, longest, h, num_splits, window)
    if splits:
        V.check_split_partials(splits, b, sq, h, d)
        spec = spec.replace(splits=splits)
    return kernel_for(spec, sq, capacity)(q, k_cache, v_cache, softmax_scale=softmax_scale, return_lse=return_lse,
                                          softcap=cap, window_size=window if spec.window else None,
                                          alibi_slopes=alibi_slopes, seqused_k=used)


def _check_new(k, v, kind: str, device: str, dtype: str, batch: int, heads_kv: int, head_dim: int) -> int:
    """seqlen_new of the new keys and values (0 where none are given), after checking them."""
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{missing}: expected new keys and values together, got {given} without {missing}")
    if k is None:
        return 0
    for name, x in (("k", k), ("v", v)):
        if V.array_kind(x, name) != kind:
            raise TypeError(f"{name}: expected the same kind of array as q ({kind}), got {V.array_kind(x, name)}")
        if V.dtype_of(x) != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of q), got {V.dtype_of(x)}")
        if V.device_of(x, kind, name) != device:
            raise ValueError(f"{name}: expected device {device} (the device of q), got {V.device_of(x, kind, name)}")
        shape = tuple(int(n) for n in x.shape)
        if len(shape) != 4 or shape[0] != batch or shape[2:] != (heads_kv, head_dim):
            raise ValueError(f"{name}: expected [batch {batch}, seqlen_new, heads_kv {heads_kv}, head_dim {head_dim}] "
                             f"(those of q and the cache), got {list(shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    return int(k.shape[1])


def _lengths(cache_seqlens, kind: str, device: str, batch: int):
    """(the lengths as Python ints, as (batch,) int32 on the device of q). From an int, (batch,)
    int32 on q's device (read back: on a GPU, a synchronisation), or (torch, with q on a GPU)
    (batch,) int32 on the CPU, read without one and copied to the GPU asynchronously."""
    if isinstance(cache_seqlens, bool) or not (isinstance(cache_seqlens, int) or hasattr(cache_seqlens, "shape")):
        raise TypeError(f"cache_seqlens: expected an int or ({batch},) int32, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        held = [cache_seqlens] * batch
        if kind == "torch":
            import torch

            return held, torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
        import numpy as np

        return held, np.full((batch,), cache_seqlens, dtype=np.int32)
    if kind == "torch" and device != "cpu" and V.array_kind(cache_seqlens, "cache_seqlens") == "torch" \
            and cache_seqlens.device.type == "cpu":
        host = V.check_lengths(cache_seqlens, "cache_seqlens", kind, "cpu", batch)
        return [int(n) for n in host.tolist()], host.pin_memory().to(device, non_blocking=True)
    lengths = V.check_lengths(cache_seqlens, "cache_seqlens", kind, device, batch)
    return [int(n) for n in (lengths.cpu() if kind == "torch" else lengths).tolist()], lengths


def _append(caches, news, lengths, kind: str) -> None:
    """cache[b, lengths[b] + t] = new[b, t] for each (cache, new), in place: one index_copy_ each
    on the cache's rows (batch * seqlen_cache of them) where the cache is contiguous."""
    batch, seqlen_new = int(news[0].shape[0]), int(news[0].shape[1])
    capacity = int(caches[0].shape[1])
    if kind == "torch":
        import torch

        rows = lengths.long() + torch.arange(0, batch * capacity, capacity, device=lengths.device)
        if seqlen_new > 1:
            rows = (rows[:, None] + torch.arange(seqlen_new, device=lengths.device)[None, :]).reshape(-1)
        for cache, new in zip(caches, news):
            if cache.is_contiguous():
                cache.view(batch * capacity, *cache.shape[2:]).index_copy_(0, rows, new.reshape(-1, *new.shape[2:]))
            else:
                cache[rows // capacity, rows % capacity] = new.reshape(-1, *new.shape[2:])
    else:
        import numpy as np

        cols = lengths.astype(np.int64)[:, None] + np.arange(seqlen_new)[None, :]
        for cache, new in zip(caches, news):
            cache[np.arange(batch)[:, None], cols] = new
