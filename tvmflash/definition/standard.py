"""The standard attention ("Algorithm 0") in TensorIR: three functions, S and P in global memory.

``qk`` writes S = Q K^T (float32) to global memory, ``softmax`` reads S, applies the scale and
the mask, and writes P (input dtype) and the log-sum-exp, ``pv`` reads P and writes O = P V. It
is the honest baseline: each step a separate kernel over global memory. Layout and mask as the
fused definition (``fused``).
"""

from __future__ import annotations

from .._compat import T, fast_tvmscript, tirx, tvm
from ..spec import KernelSpec
from .mask import LN2, LOG2E, NEG_INF, finite, visible

__all__ = [
    "STD_QK", "STD_SOFTMAX", "STD_PV", "STD_ROW_MAX", "STD_ROW_SUM", "STD_P", "STD_LSE",
    "STD_O_CAST", "standard_attention",
]

# Blocks of the standard algorithm's three functions.
STD_QK = "qk"
STD_SOFTMAX = "softmax"
STD_PV = "pv"
STD_ROW_MAX = "row_max"
STD_ROW_SUM = "row_sum"
STD_P = "P"
STD_LSE = "lse"
STD_O_CAST = "O_cast"




@fast_tvmscript()
def standard_attention(spec: KernelSpec) -> tvm.IRModule:
    """Three TensorIR functions: ``qk``, ``softmax`` and ``pv`` (see the module docstring)."""
    D = spec.head_dim
    dtype = spec.dtype
    G = spec.group
    causal = spec.causal
    neg_inf = tirx.const(NEG_INF, "float32")
    zero_f = tirx.const(0.0, "float32")

    @T.prim_func(s_tir=True)
    def qk(
        q_h: T.handle,  # [batch, seq_q, heads, head_dim]
        k_h: T.handle,  # [batch, seq_k, heads_kv, head_dim]
        s_h: T.handle,  # [batch, heads, seq_q, seq_k], float32: Q K^T, unscaled
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_k = T.int32()
        heads = T.int32()
        heads_kv = T.int32()
        Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dtype)
        K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dtype)
        S = T.match_buffer(s_h, (batch, heads, seq_q, seq_k), "float32")
        for b, h, i, j, d in T.grid(batch, heads, seq_q, seq_k, D):
            with T.sblock(STD_QK):
                vb, vh, vi, vj, vd = T.axis.remap("SSSSR", [b, h, i, j, d])
                with T.init():
                    S[vb, vh, vi, vj] = zero_f
                S[vb, vh, vi, vj] = S[vb, vh, vi, vj] + T.Cast("float32", Q[vb, vi, vh, vd]) * T.Cast(
                    "float32", K[vb, vj, vh // G, vd]
                )

    def scaled(S, sm_scale, b, h, i, j):
        """S in log2 units, masked: read by each softmax stage (no extra pass over S)."""
        seq_q, seq_k = S.shape[2], S.shape[3]
        return tirx.Select(
            visible(i, j, seq_q, seq_k, causal),
            S[b, h, i, j] * (sm_scale * tirx.const(LOG2E, "float32")),
            neg_inf,
        )

    @T.prim_func(s_tir=True)
    def softmax(
        s_h: T.handle,  # [batch, heads, seq_q, seq_k], float32: Q K^T, unscaled
        p_h: T.handle,  # [batch, heads, seq_q, seq_k], dtype
        lse_h: T.handle,  # [batch, heads, seq_q], float32, natural log
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_k = T.int32()
        heads = T.int32()
        S = T.match_buffer(s_h, (batch, heads, seq_q, seq_k), "float32")
        P = T.match_buffer(p_h, (batch, heads, seq_q, seq_k), dtype)
        LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32")
        row_max = T.alloc_buffer((batch, heads, seq_q), "float32")
        row_sum = T.alloc_buffer((batch, heads, seq_q), "float32")
        for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
            with T.sblock(STD_ROW_MAX):
                vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                with T.init():
                    row_max[vb, vh, vi] = neg_inf
                row_max[vb, vh, vi] = T.max(row_max[vb, vh, vi], scaled(S, sm_scale, vb, vh, vi, vj))
        for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
            with T.sblock(STD_ROW_SUM):
                vb, vh, vi, vj = T.axis.remap("SSSR", [b, h, i, j])
                with T.init():
                    row_sum[vb, vh, vi] = zero_f
                row_sum[vb, vh, vi] = row_sum[vb, vh, vi] + T.exp2(
                    scaled(S, sm_scale, vb, vh, vi, vj) - finite(row_max[vb, vh, vi])
                )
        for b, h, i, j in T.grid(batch, heads, seq_q, seq_k):
            with T.sblock(STD_P):
                vb, vh, vi, vj = T.axis.remap("SSSS", [b, h, i, j])
                P[vb, vh, vi, vj] = T.Cast(
                    dtype,
                    T.Select(
                        row_sum[vb, vh, vi] == zero_f,
                        zero_f,
                        T.exp2(scaled(S, sm_scale, vb, vh, vi, vj) - finite(row_max[vb, vh, vi])) / row_sum[vb, vh, vi],
                    ),
                )
        for b, h, i in T.grid(batch, heads, seq_q):
            with T.sblock(STD_LSE):
                vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                LSE[vb, vh, vi] = T.Select(
                    row_sum[vb, vh, vi] == zero_f,
                    neg_inf,
                    (row_max[vb, vh, vi] + T.log2(row_sum[vb, vh, vi])) * T.float32(LN2),
                )

    @T.prim_func(s_tir=True)
    def pv(
        p_h: T.handle,  # [batch, heads, seq_q, seq_k], dtype
        v_h: T.handle,  # [batch, seq_k, heads_kv, head_dim]
        o_h: T.handle,  # [batch, seq_q, heads, head_dim]
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_k = T.int32()
        heads = T.int32()
        heads_kv = T.int32()
        P = T.match_buffer(p_h, (batch, heads, seq_q, seq_k), dtype)
        V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dtype)
        O = T.match_buffer(o_h, (batch, seq_q, heads, D), dtype)
        acc = T.alloc_buffer((batch, heads, seq_q, D), "float32")
        for b, h, i, d, j in T.grid(batch, heads, seq_q, D, seq_k):
            with T.sblock(STD_PV):
                vb, vh, vi, vd, vj = T.axis.remap("SSSSR", [b, h, i, d, j])
                with T.init():
                    acc[vb, vh, vi, vd] = zero_f
                acc[vb, vh, vi, vd] = acc[vb, vh, vi, vd] + T.Cast("float32", P[vb, vh, vi, vj]) * T.Cast(
                    "float32", V[vb, vj, vh // G, vd]
                )
        for b, i, h, d in T.grid(batch, seq_q, heads, D):
            with T.sblock(STD_O_CAST):
                vb, vi, vh, vd = T.axis.remap("SSSS", [b, i, h, d])
                O[vb, vi, vh, vd] = T.Cast(dtype, acc[vb, vh, vi, vd])

    return tvm.IRModule({STD_QK: qk, STD_SOFTMAX: softmax, STD_PV: pv})
