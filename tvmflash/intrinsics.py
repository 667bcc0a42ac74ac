"""Tensor-core intrinsics for the CUDA schedule.

float16 uses TVM's registered ldmatrix / mma.sync intrinsics (``tvm.s_tir.tensor_intrin.cuda``).
tvmflash registers what TVM lacks: the rescale of an mma accumulator fragment by a per-row
factor (``acc_o *= alpha`` of the online softmax), which works on the fragment layout in place.
"""

from __future__ import annotations

from ._compat import T, s_tir

from tvm.s_tir.tensor_intrin import cuda as _cuda  # registers TVM's mma intrinsics

MMA_DTYPES = ("float16",)

WARP = 32
LOCAL = 8  # fp32 accumulator elements per thread of a 16x16 fragment


def fragment_layout(i, j):
    """(thread, local) holding element (i, j) of a 16x16 mma accumulator / operand fragment."""
    return _cuda.shared_16x16_to_ldmatrix_32x8_layout(i, j)


def fragment_row(thread, local):
    """Row of the 16x16 fragment element held by (thread, local)."""
    return 8 * (local % 4 // 2) + thread // 4


def _rescale_intrin(scale_scope: str):
    # The block this matches is the init of a decomposed reduction, whose read set TVM leaves
    # empty; the description declares the same (empty) reads so that tensorize matches it.
    @T.prim_func(s_tir=True)
    def desc(c: T.handle, s: T.handle) -> None:
        C = T.match_buffer(c, (WARP, LOCAL), "float32", scope="warp", offset_factor=1)
        S = T.match_buffer(s, (16,), "float32", scope=scale_scope, offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("rescale"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    thread, local = T.meta_var(fragment_layout(i, j))
                    T.reads()
                    T.writes(C[thread, local])
                    C[thread, local] = C[thread, local] * S[i]

    @T.prim_func(s_tir=True)
    def impl(c: T.handle, s: T.handle) -> None:
        C = T.match_buffer(c, (WARP, LOCAL), "float32", scope="warp", offset_factor=1)
        S = T.match_buffer(s, (16,), "float32", scope=scale_scope, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], S[0:16])
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for local in T.unroll(LOCAL):
                    C[tx, local] = C[tx, local] * S[fragment_row(tx, local)]

    return desc, impl


RESCALE_SHARED_DYN = "tvmflash_mma_rescale_rows_shared_dyn"
s_tir.TensorIntrin.register(RESCALE_SHARED_DYN, *_rescale_intrin("shared.dyn"), override=True)


def intrinsics(dtype: str) -> dict:
    if dtype != "float16":
        raise NotImplementedError(f"dtype: expected one of {MMA_DTYPES} for the tensor-core schedule, got {dtype}")
    return {
        "load_a": _cuda.LDMATRIX_f16_A_DYN_INTRIN,
        "load_b_trans": _cuda.LDMATRIX_f16_B_TRANS_DYN_INTRIN,  # B given as [n, k] (K_tile)
        "load_b": _cuda.LDMATRIX_f16_B_DYN_INTRIN,  # B given as [k, n] (V_tile)
        "mma_trans_b": _cuda.MMA_f16f16f32_TRANS_B_INTRIN,
        "mma": _cuda.MMA_f16f16f32_INTRIN,
        "fill": _cuda.MMA_fill_16x16_f32_INTRIN,
        "store_shared": _cuda.MMA_store_16x16_f32_shared_dyn_INTRIN,
        "rescale": RESCALE_SHARED_DYN,
    }
