"""Plain attention ("Algorithm 0") as one TensorIR function: the definition every kernel derives from.

Each step is a block over whole rows, in the order a textbook writes it, with S and P as
full (seq_q x seq_k) intermediates:

    S      = Q K^T                          block "S"        (a reduction over the head dim)
    score  = score_mod(S)                   block "score"    (identity, or e.g. a softcap)
    m      = rowmax(masked(score))          block "row_max"  (max from -inf)
    P      = exp2((masked(score) - m) * c)  block "P"        (c = sm_scale * log2(e))
    l      = rowsum(P)                      block "row_sum"
    P_lo   = P in the input dtype           block "P_cast"   (the second GEMM's operand)
    acc    = P_lo V                         block "PV"
    O      = acc / l,  lse = m * c + log2(l) (natural log)   blocks "O", "lse"

The division by l is written after P V ((P / l) V == (P V) / l row by row), the max is taken
on the scores before the scale (max(c s) == c max(s) for c > 0) and exponentials are base 2.
Rows that see no key give O = 0 and lse = -inf. ``compiler.derive`` turns this function into
FlashAttention's online softmax (rolling update) and into FlashDecoding's split (split-K
update); nothing of the online form is written here.

Layout and mask as the other definitions: q, o [batch, seq_q, heads, head_dim]; k, v [batch,
seq_k, heads_kv, head_dim]; lse [batch, heads, seq_q]; causal aligned bottom-right (``mask``).
The mask has no key-padding term: every key of Algorithm 0 exists; tiling adds that term. A
sliding window (``KernelSpec.window``) adds the bounds of ``mask.visible`` on the runtime
``window_left`` and ``window_right`` (``window_left`` alone with causal, whose bound is the
window's right edge at 0); the derivation reads them to skip the key tiles outside the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .._compat import T, fast_tvmscript, tirx
from ..spec import KernelSpec
from .mask import LN2, LOG2E, NEG_INF, finite, masked

__all__ = ["NOMINAL_CAP", "NOMINAL_WINDOW", "RAW", "alibi_geometric_slopes", "SOFTCAP", "ScoreMod", "plain_attention", "softcap"]

@dataclass(frozen=True)
class ScoreMod:
    """What the softmax sees of a raw score ``s``: ``score(s, sm_scale, cap)``, and the constant
    its base-2 exponential multiplies by, ``exp_scale(sm_scale)``. ``cap`` is the function's
    runtime ``softcap`` parameter, which only a mod with ``runtime_cap`` reads (the others'
    functions have no such parameter). ``scaled``: the score includes ``sm_scale`` (its
    exponential multiplies by log2(e) only)."""

    name: str
    score: Callable
    exp_scale: Callable
    runtime_cap: bool = False
    scaled: bool = False


#: Raw scores, the scale inside exp2 (FlashAttention-2's form).
RAW = ScoreMod("raw", lambda s, sm_scale, cap: s, lambda sm_scale: sm_scale * tirx.const(LOG2E, "float32"))


def _capped(s, sm_scale, cap):
    """Gemma-2's logit soft-capping of the scaled score: cap * tanh(s * sm_scale / cap)."""
    return cap * tirx.tanh(s * sm_scale / cap)


#: Gemma-2's attention logit cap: the cap a softcap kernel is tuned and benchmarked with (its
#: schedule does not depend on the value; a measurement needs one).
NOMINAL_CAP = 50.0

#: The window edge a sliding-window kernel is tuned with (its schedule does not depend on it; the
#: tuning lengths are a few thousand keys, so a window of 1024 leaves tiles to skip and to mask).
NOMINAL_WINDOW = 1024


def alibi_geometric_slopes(heads: int):
    """ALiBi's slopes 2^(-8 i / heads), i = 1 .. heads (Press et al. 2022), float32: the slopes an
    ALiBi kernel is tuned and benchmarked with."""
    import numpy as np

    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)


#: Soft-capping with the cap a runtime argument (``KernelSpec.softcap``), then exp2 of the capped
#: score times log2(e).
SOFTCAP = ScoreMod("softcap", _capped, lambda sm_scale: tirx.const(LOG2E, "float32"), runtime_cap=True,
                   scaled=True)


def softcap(cap: float) -> ScoreMod:
    """Soft-capping with a cap fixed at compile time (the derivation's tests: a variant written
    here only, which the derivation carries)."""
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap: expected a positive finite cap, got {cap!r}")
    cap_c = tirx.const(float(cap), "float32")
    return ScoreMod(f"softcap({cap:g})", lambda s, sm_scale, _: _capped(s, sm_scale, cap_c),
                    lambda sm_scale: tirx.const(LOG2E, "float32"), scaled=True)


def _alibi(x, slope, row, col, seq_q, seq_k):
    """The scaled score ``x`` with ALiBi's bias (Press et al. 2022; FlashAttention-2's
    ``alibi_slopes``): minus the slope times the distance to the row's diagonal key,
    |row + seq_k - seq_q - col|. The distance is taken between the two positions in float32
    (exact below 2^24), so that a kernel converts each row's and each column's position once,
    not every score's."""
    diag = tirx.Cast("float32", row + seq_k - seq_q)
    return x - slope * tirx.abs(diag - tirx.Cast("float32", col))


def plain_attention(spec: KernelSpec, score_mod: ScoreMod | None = None) -> tirx.PrimFunc:
    """Algorithm 0 for ``spec`` (its dtype, head dim, group and causal flag): q, k, v, o, lse
    buffers and ``sm_scale``, as the fused kernels take them, and ``softcap`` after them where
    the score mod reads it, and the window's ``window_left`` (and, not causal, ``window_right``,
    int32) where ``spec.window``; ``alibi_slopes`` [batch, heads] float32 after lse where
    ``spec.alibi`` (the scaled score plus ALiBi's bias, ``_alibi``). ``score_mod`` defaults to
    the spec's: ``SOFTCAP`` with ``spec.softcap``, else ``RAW``."""
    mod = score_mod or (SOFTCAP if spec.softcap else RAW)
    if spec.softcap and not mod.runtime_cap:
        raise ValueError(f"score_mod: a spec with softcap=True takes the runtime cap (SOFTCAP), got {mod.name}")
    func = _plain(spec, mod)
    keep = set(spec.scalar_params) | set(spec.input_buffers) | ({"softcap"} if mod.runtime_cap else set())
    for name in ("softcap", "window_left", "window_right", "max_seqlen_q", "max_seqlen_k"):
        if name not in keep:
            func = without_param(func, name)
    for name in ("alibi_slopes", "seqused_k", "block_table", "cu_seqlens_q", "cu_seqlens_k"):
        if name not in keep:
            func = without_buffer(func, name)
    return func


def without_buffer(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    """``func`` less its buffer parameter ``name``, which its body does not read."""
    keep = [p for p in func.params if p.name != name]
    if len(keep) == len(func.params):
        raise ValueError(f"name: the function has no parameter {name!r}")
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)


def without_param(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    """``func`` less its scalar parameter ``name``, which its body does not read."""
    param = next(p for p in func.params if p.name == name)
    return func.specialize({param: tirx.const(0, str(param.ty.dtype))})


@fast_tvmscript()
def _plain(spec: KernelSpec, mod: ScoreMod) -> tirx.PrimFunc:
    D = spec.head_dim
    dtype = spec.dtype
    G = spec.group
    causal = spec.causal
    neg_inf = tirx.const(NEG_INF, "float32")
    zero_f = tirx.const(0.0, "float32")

    def key(buf, table, b, j, h, d):
        """Key (or value) j of batch b: K[b, j, h, d], or in its page (``table``: the block
        table), or (varlen: ``table`` is cu_seqlens_k) in the packed keys."""
        if spec.varlen:
            return packed(buf, table, b, j, h, d)
        if not spec.paged:
            return buf[b, j, h, d]
        # (the page size a constant, a power of two a shift; the page index kept inside the table's
        # row, so a key past the table is never looked up, and the entry inside the cache, so a
        # bad table read through ``Kernel`` directly gives wrong numbers, never a stray read:
        # ``attention_with_kvcache`` checks the entries)
        page_size, max_pages, num_pages = buf.shape[1], table.shape[1], buf.shape[0]
        page = tirx.min(tirx.floordiv(j, page_size), max_pages - 1)
        entry = tirx.max(tirx.min(table[b, page], num_pages - 1), 0)
        return buf[entry, tirx.floormod(j, page_size), h, d]

    def keys(used, b, seq_k):
        """The keys batch ``b`` has: all of k, its first ``seqused_k[b]``, or (varlen) its own."""
        if spec.varlen:
            return used[b + 1] - used[b]
        return used[b] if spec.seqused_k else seq_k

    def rows(cu_q, b, seq_q):
        """The query rows batch ``b`` has: all of q, or (varlen) its own."""
        return cu_q[b + 1] - cu_q[b] if spec.varlen else seq_q

    def packed(buf, cu, b, pos, h, d):
        """Row ``pos`` of sequence ``b`` in a packed q, k, v (varlen), kept inside the tensor: a
        row past the sequence's belongs to the next one, or lies past the end (the mask or the
        store's guard leaves it out)."""
        return buf[tirx.max(tirx.min(cu[b] + pos, buf.shape[0] - 1), 0), h, d]

    def counts(used, cu_q, cu_k, b, seq_q, seq_k):
        """(query rows, keys) of batch ``b``: the lengths its causal diagonal, window and ALiBi
        align to (``rows``, ``keys``; ``used`` the per-sequence key counts)."""
        return rows(cu_q, b, seq_q), keys(cu_k if spec.varlen else used, b, seq_k)

    def scored(s, slopes, b, h, i, j, n, sm_scale, cap):
        x = mod.score(s, sm_scale, cap)
        if not spec.alibi:
            return x
        return _alibi(x if mod.scaled else x * sm_scale, slopes[b, h], i, j, *n)

    def exp_scale(sm_scale):
        return tirx.const(LOG2E, "float32") if spec.alibi and not mod.scaled else mod.exp_scale(sm_scale)

    def seen(s, i, j, n, left, right):
        # every key of k exists, unless the sequence has fewer (seqused_k, varlen): then a term
        # j < its key count; ``n``: the (rows, keys) of ``counts``
        window = (left, None if causal else right) if spec.window else None
        return masked(s, i, j, *n, causal, not (spec.seqused_k or spec.varlen), window)

    def o_value(acc, l, vb, vh, vi, vd):
        return T.Cast(dtype, T.Select(l[vb, vh, vi] == zero_f, zero_f, acc[vb, vh, vi, vd] / l[vb, vh, vi]))

    def lse_value(m, l, vb, vh, vi, sm_scale):
        return T.Select(l[vb, vh, vi] == zero_f, neg_inf,
                        (m[vb, vh, vi] * exp_scale(sm_scale) + T.log2(l[vb, vh, vi])) * T.float32(LN2))

    def query(buf, cu_q, b, i, h, d):
        """Query row i of batch b: Q[b, i, h, d], or (varlen) in the packed rows."""
        return packed(buf, cu_q, b, i, h, d) if spec.varlen else buf[b, i, h, d]

    def kv_index(table, cu_k):
        """What a key's address reads besides its batch and position: the block table, or
        (varlen) the keys' prefix sums."""
        return cu_k if spec.varlen else table

    @T.prim_func(s_tir=True)
    def main(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle, alibi_h: T.handle,
        seqused_h: T.handle, table_h: T.handle, cu_q_h: T.handle, cu_k_h: T.handle, sm_scale: T.float32,
        softcap: T.float32, window_left: T.int32, window_right: T.int32, max_seqlen_q: T.int32,
        max_seqlen_k: T.int32,
    ):
        T.func_attr({"tirx.noalias": True})
        heads = T.int32()
        heads_kv = T.int32()
        max_pages = T.int32()
        if spec.varlen:  # packed sequences: batch b's rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q
            total_q = T.int32()
            total_k = T.int32()
            batch_p1 = T.int32()
            cu_seqlens_q = T.match_buffer(cu_q_h, (batch_p1,), "int32")
            cu_seqlens_k = T.match_buffer(cu_k_h, (batch_p1,), "int32")
            batch = T.meta_var(batch_p1 - 1)
            seq_q = T.meta_var(max_seqlen_q)
            seq_k = T.meta_var(max_seqlen_k)
            Q = T.match_buffer(q_h, (total_q, heads, D), dtype)
            O = T.match_buffer(o_h, (total_q, heads, D), dtype)
            K = T.match_buffer(k_h, (total_k, heads_kv, D), dtype)
            V = T.match_buffer(v_h, (total_k, heads_kv, D), dtype)
            LSE = T.match_buffer(lse_h, (heads, total_q), "float32")
            block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        else:
            batch = T.int32()
            seq_q = T.int32()
            batch_p1 = T.int32()
            cu_seqlens_q = T.match_buffer(cu_q_h, (batch_p1,), "int32")
            cu_seqlens_k = T.match_buffer(cu_k_h, (batch_p1,), "int32")
            if spec.paged > 0:  # keys in pages: key j of batch b at row j % page_size of page block_table[b, j // page_size]
                num_pages = T.int32()
                K = T.match_buffer(k_h, (num_pages, spec.paged, heads_kv, D), dtype)
                V = T.match_buffer(v_h, (num_pages, spec.paged, heads_kv, D), dtype)
                block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
                seq_k = T.meta_var(max_pages * spec.paged)
            else:
                seq_k = T.int32()
                K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dtype)
                V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dtype)
                block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
            Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dtype)
            O = T.match_buffer(o_h, (batch, seq_q, heads, D), dtype)
            LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32")
        alibi_slopes = T.match_buffer(alibi_h, (batch, heads), "float32")
        seqused_k = T.match_buffer(seqused_h, (batch,), "int32")
        with T.sblock("root"):
            S = T.sblock_alloc_buffer((batch, heads, seq_q, seq_k), "float32")
            Sc = T.sblock_alloc_buffer((batch, heads, seq_q, seq_k), "float32")
            m = T.sblock_alloc_buffer((batch, heads, seq_q), "float32")
            P = T.sblock_alloc_buffer((batch, heads, seq_q, seq_k), "float32")
            l = T.sblock_alloc_buffer((batch, heads, seq_q), "float32")
            P_lo = T.sblock_alloc_buffer((batch, heads, seq_q, seq_k), dtype)
            acc = T.sblock_alloc_buffer((batch, heads, seq_q, D), "float32")
            for b, h, i, j, d in T.grid(batch, heads, seq_q, seq_k, D):
                with T.sblock("S"):
                    vb, vh, vi, vj, vd = T.axis.remap("SSSSR", [b, h, i, j, d])
                    with T.init():
                        S[vb, vh, vi, vj] = zero_f
                    S[vb, vh, vi, vj] = S[vb, vh, vi, vj] + T.Cast("float32", query(Q, cu_seqlens_q, vb, vi, vh, vd)) * T.Cast(
                        "float32", key(K, kv_index(block_table, cu_seqlens_k), vb, vj, vh // G, vd)
                    )
            for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
                with T.sblock("score"):
                    vb, vh, vi, vj = T.axis.remap("SSSS", [b, h, i, j])
                    Sc[vb, vh, vi, vj] = scored(S[vb, vh, vi, vj], alibi_slopes, vb, vh, vi, vj,
                                                counts(seqused_k, cu_seqlens_q, cu_seqlens_k, vb, seq_q, seq_k), sm_scale,
                                                softcap)
            for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
                with T.sblock("row_max"):
                    vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                    with T.init():
                        m[vb, vh, vi] = neg_inf
                    m[vb, vh, vi] = T.max(m[vb, vh, vi], seen(
                        Sc[vb, vh, vi, vj], vi, vj, counts(seqused_k, cu_seqlens_q, cu_seqlens_k, vb, seq_q, seq_k),
                        window_left, window_right))
            for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
                with T.sblock("P"):
                    vb, vh, vi, vj = T.axis.remap("SSSS", [b, h, i, j])
                    P[vb, vh, vi, vj] = T.exp2(
                        (seen(Sc[vb, vh, vi, vj], vi, vj, counts(seqused_k, cu_seqlens_q, cu_seqlens_k, vb, seq_q, seq_k),
                              window_left, window_right) - finite(m[vb, vh, vi])) * exp_scale(sm_scale))
            for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
                with T.sblock("row_sum"):
                    vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                    with T.init():
                        l[vb, vh, vi] = zero_f
                    l[vb, vh, vi] = l[vb, vh, vi] + P[vb, vh, vi, vj]
            for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
                with T.sblock("P_cast"):
                    vb, vh, vi, vj = T.axis.remap("SSSS", [b, h, i, j])
                    P_lo[vb, vh, vi, vj] = T.Cast(dtype, P[vb, vh, vi, vj])
            for b, h, i, d, j in T.grid(batch, heads, seq_q, D, seq_k):
                with T.sblock("PV"):
                    vb, vh, vi, vd, vj = T.axis.remap("SSSSR", [b, h, i, d, j])
                    with T.init():
                        acc[vb, vh, vi, vd] = zero_f
                    acc[vb, vh, vi, vd] = acc[vb, vh, vi, vd] + T.Cast("float32", P_lo[vb, vh, vi, vj]) * T.Cast(
                        "float32", key(V, kv_index(block_table, cu_seqlens_k), vb, vj, vh // G, vd)
                    )
            # (varlen: a sequence's rows past its own are the next sequence's, or past q: not stored)
            for b, h, i, d in T.grid(batch, heads, seq_q, D):
                with T.sblock("O"):
                    vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
                    if spec.varlen:
                        if vi < rows(cu_seqlens_q, vb, seq_q):
                            O[cu_seqlens_q[vb] + vi, vh, vd] = o_value(acc, l, vb, vh, vi, vd)
                    else:
                        O[vb, vi, vh, vd] = o_value(acc, l, vb, vh, vi, vd)
            for b, h, i in T.grid(batch, heads, seq_q):
                with T.sblock("lse"):
                    vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                    if spec.varlen:
                        if vi < rows(cu_seqlens_q, vb, seq_q):
                            LSE[vh, cu_seqlens_q[vb] + vi] = lse_value(m, l, vb, vh, vi, sm_scale)
                    else:
                        LSE[vb, vh, vi] = lse_value(m, l, vb, vh, vi, sm_scale)

    return main
