"""``attention_with_kvcache``: attention over a KV cache, FlashAttention-2's ``flash_attn_with_kvcache``.

The kernel is the one ``attention`` runs, built with per-sequence key counts
(``KernelSpec.seqused_k``): k and v are the whole cache, each sequence sees its first
``cache_seqlens[b] + seqlen_new`` keys and its causal diagonal sits at that length. New keys
and values are written into the cache first, in place.
"""

from __future__ import annotations

import numbers

from . import validate as V
from .api import cached_spec, kernel_for, target_for, with_splits


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
    block_table: a paged cache (vLLM's, FlashAttention-2's): k_cache and v_cache are then
    (num_pages, page_size, heads_kv, head_dim), any page size, and key j of sequence b lies at
    row j % page_size of page block_table[b, j // page_size]; (batch, max_pages) int32, on the
    device of q or (q on a GPU) the CPU, as cache_seqlens. Only the entries of the pages a
    sequence fills are read (and checked); the rest may hold anything.
    Returns out [batch, seqlen_q, heads, head_dim], and with ``return_lse`` also lse [batch,
    heads, seqlen_q] (float32, natural log; -inf for rows that see no key).

    The lengths are checked on the host: a write or a read past the cache is refused with an
    error, never run. Lengths on the GPU are copied back for it (the call waits for the GPU);
    lengths on the CPU (a serving loop's scheduler holds them) are not, and go to the GPU
    asynchronously. The caches must be contiguous (they are read and written in place).
    """
    causal = V.check_bool(causal, "causal")
    return_lse = V.check_bool(return_lse, "return_lse")
    paged = block_table is not None
    kind, device, dtype, (b, sq, h, rows, hk, d) = V.check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"),
                                                               paged=paged)
    if kind not in ("torch", "numpy"):
        raise TypeError(f"k_cache: expected torch tensors or numpy arrays (the cache is written in place), got {kind}")
    V.check_no_grad(kind, q, k_cache, v_cache)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _compact(cache, kind):
            raise ValueError(f"{name}: expected a contiguous cache (the kernel reads it in place; a strided one would "
                             f"be copied whole every call), got strides {tuple(cache.strides if kind == 'numpy' else cache.stride())}")
    new = _check_new(k, v, kind, device, dtype, b, hk, d)
    # every argument checked before the cache is written
    cap = V.check_softcap(softcap)
    window = V.check_window(window_size, causal)
    V.check_scale(softmax_scale, d)
    num_splits = V.check_num_splits(num_splits)
    if alibi_slopes is not None:
        V.check_alibi(alibi_slopes, kind, device, b, h)
    held = _lengths(cache_seqlens, kind, device, b)
    table, host_table = _table(block_table, kind, device, b, held, new, k_cache) if paged else (None, None)
    capacity = rows * int(block_table.shape[1]) if paged else rows
    for i, n in enumerate(held):
        if n < 0:
            raise ValueError(f"cache_seqlens: expected lengths >= 0, got cache_seqlens[{i}] = {n}")
        if n + new > capacity:
            where = "max_pages * page_size" if paged else "seqlen_cache"
            raise ValueError(
                f"cache_seqlens: expected cache_seqlens[b] + seqlen_new <= {where} = {capacity} (the cache's "
                f"capacity), got cache_seqlens[{i}] = {n} with seqlen_new = {new}")
    import numpy as np

    # the rows the new keys go to and each sequence's keys, computed here from the checked host
    # copies: each a single copy to the device, no kernels of its own
    if new:
        _append((k_cache, v_cache), (k, v), _rows(held, new, rows, host_table), kind, device)
    used = V.to_device(np.asarray(held, dtype=np.int32) + np.int32(new), kind, device)
    causal_k, windowed = V.window_kind(window, sq, capacity)
    spec = cached_spec(head_dim=d, dtype=dtype, causal=causal_k, group=h // hk, target=target_for(device),
                       softcap=bool(cap), window=windowed, alibi=alibi_slopes is not None, seqused_k=True,
                       paged=rows if paged else 0)
    spec = with_splits(spec, b, sq, max(held, default=0) + new, h, num_splits, window)
    return kernel_for(spec, sq, capacity)(q, k_cache, v_cache, softmax_scale=softmax_scale, return_lse=return_lse,
                                          softcap=cap, window_size=window if spec.window else None,
                                          alibi_slopes=alibi_slopes, seqused_k=used, block_table=table)


def _table(block_table, kind: str, device: str, batch: int, held: list, new: int, k_cache):
    """(the block table on the device of q, its host copy as numpy), after checking that the pages
    each sequence's keys fill (held + new of them) are pages of the cache. (batch, max_pages)
    int32, on q's device (read back: on a GPU, a synchronisation) or, torch with q on a GPU, on
    the CPU (read there, copied asynchronously)."""
    num_pages, page_size = int(k_cache.shape[0]), int(k_cache.shape[1])
    side = V.host_side(block_table, "block_table", kind, device)
    table = V.check_block_table(block_table, kind, side, batch)
    import numpy as np

    host = V.host_array(table, kind)
    max_pages = int(host.shape[1])
    filled = np.minimum(-(-(np.asarray(held, dtype=np.int64) + new) // page_size), max_pages)
    bad = (np.arange(max_pages)[None, :] < filled[:, None]) & ((host < 0) | (host >= num_pages))
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"block_table: expected page numbers in [0, {num_pages}) (the pages of k_cache) for the "
                         f"{int(filled[i])} pages sequence {i} fills, got block_table[{i}, {j}] = {int(host[i, j])}")
    return V.checked_copy(table, host, side, kind, device), host


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


def _lengths(cache_seqlens, kind: str, device: str, batch: int) -> list:
    """cache_seqlens as Python ints, after checking it: an int, (batch,) int32 on q's device (read
    back: on a GPU, a synchronisation), or (torch, q on a GPU) (batch,) int32 on the CPU."""
    if isinstance(cache_seqlens, bool) or not (isinstance(cache_seqlens, numbers.Integral)
                                               or hasattr(cache_seqlens, "shape")):
        raise TypeError(f"cache_seqlens: expected an int or ({batch},) int32, got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, numbers.Integral):
        return [int(cache_seqlens)] * batch
    side = V.host_side(cache_seqlens, "cache_seqlens", kind, device)
    lengths = V.check_lengths(cache_seqlens, "cache_seqlens", kind, side, batch)
    return [int(n) for n in V.host_array(lengths, kind).tolist()]


def _compact(x, kind: str) -> bool:
    if kind == "torch":
        return x.is_contiguous()
    return x.flags["C_CONTIGUOUS"]


def _rows(held: list, new: int, per: int, table=None):
    """The cache rows (of batch * seqlen_cache, or of num_pages * page_size) the new keys of each
    sequence go to, int64: at cache_seqlens[b] + t, in a paged cache in its page."""
    import numpy as np

    at = np.asarray(held, dtype=np.int64)[:, None] + np.arange(new, dtype=np.int64)[None, :]
    if table is None:
        return (at + np.arange(len(held), dtype=np.int64)[:, None] * per).reshape(-1)
    pages = table[np.arange(len(held))[:, None], at // per].astype(np.int64)  # only the pages written to
    return (pages * per + at % per).reshape(-1)


def _append(caches, news, rows, kind: str, device: str) -> None:
    """cache.rows[rows[i]] = new.rows[i] for each (cache, new), in place, where a cache's rows
    are its first two dimensions flattened: one index_copy_ each where the cache is contiguous."""
    if kind == "torch":
        index = V.to_device(rows, kind, device)
        for cache, new in zip(caches, news):  # (contiguous: checked by the caller)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, index, new.reshape(-1, *new.shape[2:]))
    else:
        for cache, new in zip(caches, news):
            per = int(cache.shape[1])
            cache[rows // per, rows % per] = new.reshape(-1, *new.shape[2:])
