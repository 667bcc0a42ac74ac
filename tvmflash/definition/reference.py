"""Float64 reference attention (numpy), the ground truth every kernel is checked against."""

from __future__ import annotations

import math

import numpy as np


def attention_reference(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                        softcap: float = 0.0, window_size=(-1, -1), alibi_slopes=None, seqused_k=None):
    """softmax(Q K^T * scale) V in float64, FlashAttention layout and semantics; with ``softcap``
    > 0 the scaled scores are soft-capped first, ``softcap * tanh(s / softcap)``.
    ``window_size`` (left, right): row i sees keys i + seq_k - seq_q - left .. i + seq_k - seq_q
    + right, -1 unbounded (FlashAttention-2's sliding window; causal is right 0).
    ``alibi_slopes`` (heads,) or (batch, heads): the scaled (and capped) score of (i, j) gets
    -slope * |i + seq_k - seq_q - j| (FlashAttention-2's ALiBi).

    q: [batch, seq_q, heads, d]; k, v: [batch, seq_k, heads_kv, d] (heads % heads_kv == 0).
    Causal is aligned bottom-right: row i sees keys j <= i + seq_k - seq_q.
    ``seqused_k`` (batch,) ints: batch b has only its first ``seqused_k[b]`` keys (a KV cache's
    filled length; FlashAttention-2's ``seqused_k``), its causal and window alignment to that
    length.
    Returns (out [batch, seq_q, heads, d], lse [batch, heads, seq_q], natural log); rows that see
    no key give out = 0 and lse = -inf.
    """
    if seqused_k is not None:  # each sequence on its own keys
        used = [int(n) for n in np.asarray(seqused_k).reshape(-1)]
        slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
        parts = [attention_reference(
            np.asarray(q)[i:i + 1], np.asarray(k)[i:i + 1, :n], np.asarray(v)[i:i + 1, :n], causal=causal,
            softmax_scale=softmax_scale, softcap=softcap, window_size=window_size,
            alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[i:i + 1]))
            for i, n in enumerate(used)]
        return np.concatenate([o for o, _ in parts]), np.concatenate([l for _, l in parts])
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    rows = np.arange(sq)[:, None] + sk - sq  # the key on each row's diagonal
    cols = np.arange(sk)[None, :]
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), (b, h))[:, :, None, None]
        s = s - slopes * np.abs(rows - cols)
    left, right = window_size
    right = 0 if causal else right
    if right >= 0:
        s = np.where(cols <= rows + right, s, -np.inf)
    if left >= 0:
        s = np.where(cols >= rows - left, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk > 0 else np.full((b, h, sq, 1), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.einsum("bhij,bjhd->bihd", np.where(l > 0, p / np.where(l > 0, l, 1.0), 0.0), v)
        lse = np.where(l[..., 0] > 0, m_safe[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)), -np.inf)
    return out, lse


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    """``attention_reference`` on packed sequences (FlashAttention-2's ``flash_attn_varlen_func``
    layout): q [total_q, heads, d], k, v [total_k, heads_kv, d], sequence b at rows
    ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` of q and the same of k by ``cu_seqlens_k``; each
    sequence on its own (causal, window and ALiBi aligned to its lengths). ``alibi_slopes``
    (heads,) or (batch, heads); the other keywords as ``attention_reference``'s.
    Returns (out [total_q, heads, d], lse [heads, total_q])."""
    cq = [int(n) for n in np.asarray(cu_seqlens_q).reshape(-1)]
    ck = [int(n) for n in np.asarray(cu_seqlens_k).reshape(-1)]
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    slopes = kwargs.pop("alibi_slopes", None)
    slopes = None if slopes is None else np.asarray(slopes, dtype=np.float64)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, lse = attention_reference(
            q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
            alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b:b + 1]), **kwargs)
        outs.append(o[0])
        lses.append(lse[0])
    h, d = q.shape[1], q.shape[2]
    out = np.concatenate(outs) if outs else np.zeros((0, h, d))
    lse = np.concatenate(lses, axis=1) if lses else np.zeros((h, 0))
    return out, lse
