"""The fused FlashAttention forward in TensorIR, written by hand: the derivation's oracle.

The kernels no longer build from this function: ``compiler.derive.rolling_update`` derives the
same function (node for node, name for name) from plain attention (``plain``), and the tests
check the two are equal. Its block names below are the schedule rules' API, which the derived
function keeps.

FlashAttention (Dao et al. 2022), FlashAttention-2 (Dao 2023):

    for each K/V tile j:                      # online softmax (Milakov & Gimelshein 2018)
        S      = Q_tile K_tile^T                  (mask: key padding, causal)
        m_new  = max(m_i, rowmax(S))
        P      = exp((S - m_new) * scale)
        alpha  = exp((m_i - m_new) * scale)
        l_i    = alpha * l_i + rowsum(P)
        acc_o  = alpha * acc_o + P V_tile
        m_i    = m_new
    O = acc_o / l_i,   lse = m_i * scale + log(l_i)

The running max is kept on raw scores and the scale applied inside the exponential (valid for
scale > 0, as FlashAttention-2 does); exponentials are base 2 with log2(e) folded into the scale.
The tile's row max and row sum are plain reductions (identity init), so ``rfactor`` can split
them across threads; the running state is then updated elementwise. The rescaled accumulator
update (acc_o) is a reduction block whose ``init`` is the rescale, so every block of the tile is
a spatial or reduction block that schedule primitives accept. Tiles
(``Q_tile``, ``K_tile``, ``V_tile``, ``acc_s``, ``acc_o``, ``m_i``, ``l_i``) are buffers of the
"tile" block: S and P never exist outside it. Schedules choose where they live (registers,
shared memory, tensor-core fragments) and how the loops map to hardware.

Layout, as FlashAttention: q, o  [batch, seqlen_q, heads, head_dim];
k, v [batch, seqlen_k, heads_kv, head_dim] with heads = heads_kv * group; lse [batch, heads,
seqlen_q] in float32, natural log. Rows with no visible key (causal with seqlen_q > seqlen_k)
give O = 0 and lse = -inf.
"""

from __future__ import annotations

from .._compat import T, fast_tvmscript, tirx
from ..spec import KernelSpec
from .mask import LN2, LOG2E, NEG_INF, finite, guarded, masked

__all__ = [
    "TILE", "Q_LOAD", "K_LOAD", "V_LOAD", "INIT_M", "INIT_L", "INIT_O", "S_GEMM_TILE",
    "O_GEMM_TILE", "ROW_MAX_TILE", "ROW_SUM_TILE", "EPILOGUE", "S_GEMM", "S_STORE", "ROW_MAX",
    "RUNNING_MAX", "ALPHA", "P_EXP", "P_CAST", "ROW_SUM", "L_UPDATE", "STATE_UPDATE", "O_GEMM",
    "O_STAGE", "O_STORE", "LSE_STORE", "KV_LOOP_VAR", "fused_attention",
    "specialize_shape", "shape_binding",
]

# TIR block names are API: schedules and tests look blocks up by these names.
TILE = "tile"
Q_LOAD = "Q_load"
K_LOAD = "K_load"
V_LOAD = "V_load"
INIT_M = "init_m"
INIT_L = "init_l"
INIT_O = "init_o"
S_GEMM_TILE = "S_gemm_tile"  # scope blocks: each GEMM and the epilogue in a block of its own
O_GEMM_TILE = "O_gemm_tile"
ROW_MAX_TILE = "row_max_tile"  # ... and the two row reductions (rfactor needs a clean scope)
ROW_SUM_TILE = "row_sum_tile"
EPILOGUE = "epilogue"
S_GEMM = "S_gemm"
S_STORE = "S_store"
ROW_MAX = "row_max"  # m_tile = rowmax(S): a plain reduction
RUNNING_MAX = "running_max"  # m_new = max(m_i, m_tile)
ALPHA = "alpha"
P_EXP = "P_exp"
P_CAST = "P_cast"
ROW_SUM = "row_sum"  # l_tile = rowsum(P): a plain reduction
L_UPDATE = "l_update"  # l_new = alpha * l_i + l_tile
STATE_UPDATE = "state_update"  # m_i, l_i = m_new, l_new
O_GEMM = "O_gemm"
O_STAGE = "O_stage"
O_STORE = "O_store"
LSE_STORE = "lse_store"

#: The K/V loop's variable. A name the compiler relies on: ``compiler.passes.unmask_full_kv_tiles``
#: finds the loop over K/V tiles by it.
KV_LOOP_VAR = "kb"


@fast_tvmscript()
def fused_attention(spec: KernelSpec, block_m: int, block_n: int) -> tirx.PrimFunc:
    """The FlashAttention forward as one TensorIR function, tiled block_m x block_n.

    Arguments of the function: q, k, v, o, lse (buffers, see the module docstring) and
    ``sm_scale`` (float32, the softmax scale applied to Q K^T).
    """
    D = spec.head_dim
    dtype = spec.dtype
    G = spec.group
    causal = spec.causal
    even = spec.even  # lengths are tile multiples: no bound checks, no key-padding mask
    BM = block_m
    BN = block_n
    neg_inf = tirx.const(NEG_INF, "float32")
    zero_f = tirx.const(0.0, "float32")

    @T.prim_func(s_tir=True)
    def main(
        q_h: T.handle,  # [batch, seq_q, heads, head_dim]
        k_h: T.handle,  # [batch, seq_k, heads_kv, head_dim]
        v_h: T.handle,  # [batch, seq_k, heads_kv, head_dim]
        o_h: T.handle,  # [batch, seq_q, heads, head_dim]
        lse_h: T.handle,  # [batch, heads, seq_q], float32, natural log
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_k = T.int32()
        heads = T.int32()
        heads_kv = T.int32()
        Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dtype)
        K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dtype)
        V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dtype)
        O = T.match_buffer(o_h, (batch, seq_q, heads, D), dtype)
        LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32")

        for b, h, qb in T.grid(batch, heads, T.ceildiv(seq_q, BM)):
            with T.sblock(TILE):
                vb, vh, vqb = T.axis.remap("SSS", [b, h, qb])
                T.reads(
                    Q[vb, vqb * BM : vqb * BM + BM, vh, 0:D],
                    K[vb, 0:seq_k, vh // G, 0:D],
                    V[vb, 0:seq_k, vh // G, 0:D],
                )
                T.writes(O[vb, vqb * BM : vqb * BM + BM, vh, 0:D], LSE[vb, vh, vqb * BM : vqb * BM + BM])
                Q_tile = T.sblock_alloc_buffer((BM, D), dtype)
                K_tile = T.sblock_alloc_buffer((BN, D), dtype)
                V_tile = T.sblock_alloc_buffer((BN, D), dtype)
                acc_s = T.sblock_alloc_buffer((BM, BN), "float32")
                S_tile = T.sblock_alloc_buffer((BM, BN), "float32")
                P_f32 = T.sblock_alloc_buffer((BM, BN), "float32")
                P_tile = T.sblock_alloc_buffer((BM, BN), dtype)
                acc_o = T.sblock_alloc_buffer((BM, D), "float32")
                O_tile = T.sblock_alloc_buffer((BM, D), "float32")
                m_i = T.sblock_alloc_buffer((BM,), "float32")
                m_tile = T.sblock_alloc_buffer((BM,), "float32")
                m_new = T.sblock_alloc_buffer((BM,), "float32")
                l_tile = T.sblock_alloc_buffer((BM,), "float32")
                l_new = T.sblock_alloc_buffer((BM,), "float32")
                l_i = T.sblock_alloc_buffer((BM,), "float32")
                alpha = T.sblock_alloc_buffer((BM,), "float32")

                # -- load the query tile (rows past seq_q read as zero) --
                for i, d in T.grid(BM, D):
                    with T.sblock(Q_LOAD):
                        vi, vd = T.axis.remap("SS", [i, d])
                        Q_tile[vi, vd] = guarded(even, vqb * BM + vi < seq_q, Q[vb, vqb * BM + vi, vh, vd], dtype)
                # -- running state --
                for i in range(BM):
                    with T.sblock(INIT_M):
                        vi = T.axis.remap("S", [i])
                        m_i[vi] = neg_inf
                for i in range(BM):
                    with T.sblock(INIT_L):
                        vi = T.axis.remap("S", [i])
                        l_i[vi] = zero_f
                for i, d in T.grid(BM, D):
                    with T.sblock(INIT_O):
                        vi, vd = T.axis.remap("SS", [i, d])
                        acc_o[vi, vd] = zero_f

                # Causal: K/V tiles wholly above the diagonal are never visited. (The loop
                # variable is named ``KV_LOOP_VAR``: the compiler finds the loop by it and runs the
                # tiles that need no mask without one.)
                for kb in T.serial(_num_kv_tiles(vqb, seq_q, seq_k, BM, BN, causal)):
                    # first key of this tile, bound twice: once for the loads and once for the
                    # masks, so that a software pipeline can run the loads a tile ahead
                    kv_load: T.let[T.int32] = kb * BN
                    # -- load K and V tiles (keys past seq_k read as zero, masked below) --
                    for j, d in T.grid(BN, D):
                        with T.sblock(K_LOAD):
                            vj, vd = T.axis.remap("SS", [j, d])
                            K_tile[vj, vd] = guarded(even, kv_load + vj < seq_k, K[vb, kv_load + vj, vh // G, vd], dtype)
                    for j, d in T.grid(BN, D):
                        with T.sblock(V_LOAD):
                            vj, vd = T.axis.remap("SS", [j, d])
                            V_tile[vj, vd] = guarded(even, kv_load + vj < seq_k, V[vb, kv_load + vj, vh // G, vd], dtype)
                    kv0: T.let[T.int32] = kb * BN
                    # -- S = Q K^T (in a block of its own: a clean GEMM scope for schedules) --
                    with T.sblock(S_GEMM_TILE):
                        for i, j, d in T.grid(BM, BN, D):
                            with T.sblock(S_GEMM):
                                vi, vj, vd = T.axis.remap("SSR", [i, j, d])
                                with T.init():
                                    acc_s[vi, vj] = zero_f
                                acc_s[vi, vj] = acc_s[vi, vj] + T.Cast("float32", Q_tile[vi, vd]) * T.Cast(
                                    "float32", K_tile[vj, vd]
                                )
                    # -- S leaves the GEMM's accumulators (on GPUs: fragments -> shared memory) --
                    for i, j in T.grid(BM, BN):
                        with T.sblock(S_STORE):
                            vi, vj = T.axis.remap("SS", [i, j])
                            S_tile[vi, vj] = acc_s[vi, vj]
                    # -- online softmax on raw scores; the scale is applied inside exp2, as in
                    #    FlashAttention-2 (max(s * c) == c * max(s) for c > 0) --
                    with T.sblock(ROW_MAX_TILE):
                        for i, j in T.grid(BM, BN):
                            with T.sblock(ROW_MAX):
                                vi, vj = T.axis.remap("SR", [i, j])
                                with T.init():  # the max reducer's identity (rfactor knows it)
                                    m_tile[vi] = T.min_value("float32")
                                m_tile[vi] = T.max(m_tile[vi], masked(S_tile[vi, vj], vqb * BM + vi, kv0 + vj, seq_q, seq_k, causal, even))
                    for i in range(BM):
                        with T.sblock(RUNNING_MAX):
                            vi = T.axis.remap("S", [i])
                            m_new[vi] = T.max(m_i[vi], m_tile[vi])
                    for i in range(BM):
                        with T.sblock(ALPHA):
                            vi = T.axis.remap("S", [i])
                            alpha[vi] = T.exp2((m_i[vi] - finite(m_new[vi])) * (sm_scale * T.float32(LOG2E)))
                    for i, j in T.grid(BM, BN):
                        with T.sblock(P_EXP):
                            vi, vj = T.axis.remap("SS", [i, j])
                            P_f32[vi, vj] = T.exp2(
                                (masked(S_tile[vi, vj], vqb * BM + vi, kv0 + vj, seq_q, seq_k, causal, even) - finite(m_new[vi]))
                                * (sm_scale * T.float32(LOG2E))
                            )
                    with T.sblock(ROW_SUM_TILE):
                        for i, j in T.grid(BM, BN):
                            with T.sblock(ROW_SUM):
                                vi, vj = T.axis.remap("SR", [i, j])
                                with T.init():
                                    l_tile[vi] = zero_f
                                l_tile[vi] = l_tile[vi] + P_f32[vi, vj]
                    for i in range(BM):
                        with T.sblock(L_UPDATE):
                            vi = T.axis.remap("S", [i])
                            l_new[vi] = l_i[vi] * alpha[vi] + l_tile[vi]
                    # -- P in the input dtype for the second GEMM (after the row sum: the float32 P
                    #    then dies as its copy is made, which keeps registers free) --
                    for i, j in T.grid(BM, BN):
                        with T.sblock(P_CAST):
                            vi, vj = T.axis.remap("SS", [i, j])
                            P_tile[vi, vj] = T.Cast(dtype, P_f32[vi, vj])
                    # acc_o = alpha * acc_o + P V: likewise, in a GEMM scope of its own
                    with T.sblock(O_GEMM_TILE):
                        for i, d, j in T.grid(BM, D, BN):
                            with T.sblock(O_GEMM):
                                vi, vd, vj = T.axis.remap("SSR", [i, d, j])
                                with T.init():
                                    acc_o[vi, vd] = acc_o[vi, vd] * alpha[vi]
                                acc_o[vi, vd] = acc_o[vi, vd] + T.Cast("float32", P_tile[vi, vj]) * T.Cast(
                                    "float32", V_tile[vj, vd]
                                )
                    for i in range(BM):
                        with T.sblock(STATE_UPDATE):
                            vi = T.axis.remap("S", [i])
                            m_i[vi] = m_new[vi]
                            l_i[vi] = l_new[vi]

                # -- epilogue: normalise, write O and lse (rows with no visible key: 0, -inf) --
                with T.sblock(EPILOGUE):
                    for i, d in T.grid(BM, D):  # the accumulator leaves its registers
                        with T.sblock(O_STAGE):
                            vi, vd = T.axis.remap("SS", [i, d])
                            O_tile[vi, vd] = acc_o[vi, vd]
                    for i, d in T.grid(BM, D):
                        with T.sblock(O_STORE):
                            vi, vd = T.axis.remap("SS", [i, d])
                            if even or vqb * BM + vi < seq_q:
                                O[vb, vqb * BM + vi, vh, vd] = T.Cast(
                                    dtype,
                                    T.Select(l_i[vi] == zero_f, zero_f, O_tile[vi, vd] / l_i[vi]),
                                )
                    for i in range(BM):
                        with T.sblock(LSE_STORE):
                            vi = T.axis.remap("S", [i])
                            if even or vqb * BM + vi < seq_q:
                                LSE[vb, vh, vqb * BM + vi] = T.Select(
                                    l_i[vi] == zero_f,
                                    neg_inf,
                                    (m_i[vi] * (sm_scale * T.float32(LOG2E)) + T.log2(l_i[vi])) * T.float32(LN2),
                                )

    return main


def specialize_shape(func: tirx.PrimFunc, dims: dict) -> tirx.PrimFunc:
    """``func`` with its buffer shape variables (``batch``, ``seq_q``, ``seq_k``, ``heads``,
    ``heads_kv``) bound to ``dims``; ``sm_scale`` stays a parameter."""
    return func.specialize(shape_binding(func, dims))


def shape_binding(func: tirx.PrimFunc, dims: dict) -> dict:
    """{buffer parameter: a buffer of concrete shape} for ``PrimFunc.specialize``."""
    binding = {}
    for param in func.params:
        ty = getattr(param, "ty", None)
        if isinstance(ty, tirx.BufferType):
            shape = []
            for extent in ty.shape:
                if isinstance(extent, tirx.Var):
                    if extent.name not in dims:
                        raise ValueError(f"shape: no value for the shape variable {extent.name!r} of {param.name}")
                    shape.append(dims[extent.name])
                else:
                    shape.append(int(extent))
            binding[param] = tirx.decl_buffer(shape, ty.dtype, param.name)
    return binding


def _num_kv_tiles(qb, seq_q, seq_k, BM: int, BN: int, causal: bool):
    """K/V tiles query tile ``qb`` must visit. Causal (bottom-right): row r sees keys
    c <= r + seq_k - seq_q, so the tile's last row bounds the keys it needs.

    At least one: a tile with no visible key (causal, seq_q > seq_k; or seq_k == 0) is wholly
    masked and leaves O = 0, lse = -inf as no tile would. The bound lets TVM's software pipeliner
    prove its prologue and epilogue run (else it guards them by conditions, and ThreadSync
    refuses the __syncthreads inside: "Cannot insert syncs inside condition")."""
    if not causal:
        return tirx.max(tirx.ceildiv(seq_k, BN), 1)
    last_key = tirx.min(seq_k, (qb + 1) * BM + seq_k - seq_q)
    return tirx.max(tirx.ceildiv(last_key, BN), 1)
