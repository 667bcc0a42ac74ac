"""Tensor-core intrinsics for the CUDA schedule.

float16 uses TVM's registered ldmatrix / mma.sync intrinsics (``tvm.s_tir.tensor_intrin.cuda``;
importing it registers them, about a minute the first time in a process). bfloat16 needs
intrinsics TVM does not ship (open work).
"""

from __future__ import annotations

MMA_DTYPES = ("float16",)


def _cuda():
    """TVM's CUDA intrinsics module; importing it registers them (slow: imported on first use,
    so building a spec the tensor-core schedule does not serve never pays for it)."""
    from tvm.s_tir.tensor_intrin import cuda

    return cuda


def fragment_layout(i, j):
    """(thread, local) holding element (i, j) of a 16x16 mma accumulator / operand fragment."""
    return _cuda().shared_16x16_to_ldmatrix_32x8_layout(i, j)


def intrinsics(dtype: str) -> dict:
    if dtype != "float16":
        raise NotImplementedError(f"dtype: expected one of {MMA_DTYPES} for the tensor-core schedule, got {dtype}")
    cuda = _cuda()
    return {
        "load_a": cuda.LDMATRIX_f16_A_DYN_INTRIN,
        "load_b_trans": cuda.LDMATRIX_f16_B_TRANS_DYN_INTRIN,  # B given as [n, k] (K_tile)
        "load_b": cuda.LDMATRIX_f16_B_DYN_INTRIN,  # B given as [k, n] (V_tile)
        "mma_trans_b": cuda.MMA_f16f16f32_TRANS_B_INTRIN,
        "mma": cuda.MMA_f16f16f32_INTRIN,
        "fill": cuda.MMA_fill_16x16_f32_INTRIN,
        "store_shared": cuda.MMA_store_16x16_f32_shared_dyn_INTRIN,
    }
