"""Tensor-core intrinsics for the CUDA schedule.

float16 uses TVM's registered ldmatrix / mma.sync intrinsics (``tvm.s_tir.tensor_intrin.cuda``;
importing it registers them, slowly, the first time in a process). TVM ships none for
bfloat16: this module registers its own (``tvmflash_*_bf16``), the same m16n8k16 shapes and
fragment layout, with bf16 operands and float32 accumulation.
"""

from __future__ import annotations

from .._compat import fast_tvmscript

MMA_DTYPES = ("float16", "bfloat16")
WARP = 32
FRAGMENT = 8  # elements of a 16x16 tile per thread


def _cuda():
    """TVM's CUDA intrinsics module; importing it registers them (slow: imported on first use,
    so building a spec the tensor-core schedule does not serve never pays for it)."""
    with fast_tvmscript():
        from tvm.s_tir.tensor_intrin import cuda

    return cuda


#: The accumulator store into static shared memory (TVM registers the dynamic one only).
STORE_SHARED_STATIC = "tvmflash_mma_store_16x16_f32_shared"


def store_shared_static() -> str:
    """``STORE_SHARED_STATIC``, registered once per process."""
    from tvm.s_tir import TensorIntrin

    if STORE_SHARED_STATIC not in _registered:
        TensorIntrin.register(STORE_SHARED_STATIC, *_cuda().get_mma_store_intrin("float32", FRAGMENT, "shared", True))
        _registered[STORE_SHARED_STATIC] = {}
    return STORE_SHARED_STATIC


def fragment_layout(i, j):
    """(thread, local) holding element (i, j) of a 16x16 mma accumulator / operand fragment."""
    return _cuda().shared_16x16_to_ldmatrix_32x8_layout(i, j)


def intrinsics(dtype: str) -> dict:
    """Names of the registered intrinsics the schedule tensorizes with, for operands of ``dtype``."""
    if dtype not in MMA_DTYPES:
        raise NotImplementedError(f"dtype: expected one of {MMA_DTYPES} for the tensor-core schedule, got {dtype}")
    cuda = _cuda()
    common = {
        "fill": cuda.MMA_fill_16x16_f32_INTRIN,
        "store_shared": cuda.MMA_store_16x16_f32_shared_dyn_INTRIN,
    }
    if dtype == "float16":
        return {
            "load_a": cuda.LDMATRIX_f16_A_DYN_INTRIN,
            "load_b_trans": cuda.LDMATRIX_f16_B_TRANS_DYN_INTRIN,  # B given as [n, k] (K_tile)
            "load_b": cuda.LDMATRIX_f16_B_DYN_INTRIN,  # B given as [k, n] (V_tile)
            "mma_trans_b": cuda.MMA_f16f16f32_TRANS_B_INTRIN,
            "mma": cuda.MMA_f16f16f32_INTRIN,
            **common,
        }
    return {**_register_16bit("bfloat16", "bf16"), **common}


_registered: dict[str, dict] = {}


def _register_16bit(dtype: str, ptx_type: str) -> dict:
    """Register (once per process) ldmatrix and mma.sync m16n8k16 intrinsics for a 16-bit
    ``dtype`` other than float16, accumulating in float32. Operands use the fragment layout of
    ``fragment_layout`` (TVM's float16 intrinsics use the same), so the schedule is unchanged."""
    if dtype in _registered:
        return _registered[dtype]
    from tvm.s_tir import TensorIntrin

    t = ptx_type
    names = {
        "load_a": f"tvmflash_ldmatrix_{t}_a_dyn",
        "load_b_trans": f"tvmflash_ldmatrix_{t}_b_trans_dyn",
        "load_b": f"tvmflash_ldmatrix_{t}_b_dyn",
        "mma_trans_b": f"tvmflash_mma_{t}{t}f32_trans_b",
        "mma": f"tvmflash_mma_{t}{t}f32",
    }
    # A [m, k] and B^T [n, k]: ldmatrix as stored; B [k, n]: ldmatrix .trans
    TensorIntrin.register(names["load_a"], *_ldmatrix(dtype, transpose=False, row_blocks=False), override=True)
    TensorIntrin.register(names["load_b_trans"], *_ldmatrix(dtype, transpose=False, row_blocks=True), override=True)
    TensorIntrin.register(names["load_b"], *_ldmatrix(dtype, transpose=True, row_blocks=False), override=True)
    TensorIntrin.register(names["mma_trans_b"], *_mma(dtype, ptx_type, b_is_nk=True), override=True)
    TensorIntrin.register(names["mma"], *_mma(dtype, ptx_type, b_is_nk=False), override=True)
    _registered[dtype] = names
    return names


@fast_tvmscript()
def _ldmatrix(dtype: str, transpose: bool, row_blocks: bool):
    """(description, implementation) of one ``ldmatrix.x4`` of a 16x16 shared.dyn tile into a
    warp fragment. Each lane gives the address of one 8-element row of the four 8x8 matrices:
    ``row_blocks=False`` orders the matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) column-block
    first (A [m, k], and B [k, n] with ``transpose``); ``row_blocks=True`` row-block first (B
    stored [n, k], where the n halves are the two mma's of the 16x16 tile)."""
    from tvm.runtime import convert
    from tvm.script import tirx as T

    layout = fragment_layout  # a closure variable, as TVMScript resolves names in the prim_func

    def lane_offset(tx, stride):
        if row_blocks:  # lanes 0-7: rows 0-7 cols 0-7, 8-15: rows 0-7 cols 8-15, 16-31: rows 8-15
            return stride * (tx % 8) + 8 * ((tx % 16) // 8) + stride * 8 * (tx // 16)
        return stride * (tx % 16) + 8 * (tx // 16)  # lanes 0-15: rows, cols 0-7; 16-31: cols 8-15

    @T.prim_func(s_tir=True)
    def desc(warp_h: T.handle, shared_h: T.handle) -> None:
        shared = T.match_buffer(shared_h, (16, 16), dtype, align=64, offset_factor=16, scope="shared.dyn")
        warp = T.match_buffer(warp_h, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:WARP, 0:FRAGMENT])
            for r, c in T.grid(16, 16):
                with T.sblock("shared_warp"):
                    vr, vc = T.axis.remap("SS", [r, c])
                    thread, local = T.meta_var(layout(vr, vc))
                    T.reads(shared[vr, vc])
                    T.writes(warp[thread, local])
                    warp[thread, local] = shared[vr, vc]

    @T.prim_func(s_tir=True)
    def impl(warp_h: T.handle, shared_h: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_h, (16, 16), dtype, align=64, offset_factor=16, scope="shared.dyn",
                                strides=[s0, s1])
        warp = T.match_buffer(warp_h, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:WARP, 0:FRAGMENT])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.ldmatrix(
                    transpose, 4, ".b16", warp.data, warp.elem_offset + convert(FRAGMENT) * tx,
                    shared.access_ptr("r"), lane_offset(tx, s0), dtype=dtype))

    return desc, impl


@fast_tvmscript()
def _mma(dtype: str, ptx_type: str, b_is_nk: bool):
    """(description, implementation) of C[16, 16] += A[16, 16] B[16, 16] (float32 C) as two
    ``mma.sync.m16n8k16.row.col``, one per 8-column half of C. B's fragment is given as B[k, n]
    or, with ``b_is_nk``, as B^T[n, k] (both hold the same registers: ldmatrix put them there)."""
    from tvm.runtime import convert
    from tvm.script import tirx as T
    from tvm.tirx import Cast

    layout = fragment_layout  # a closure variable, as TVMScript resolves names in the prim_func

    def b_index(k, n):
        return layout(n, k) if b_is_nk else layout(k, n)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, FRAGMENT), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:FRAGMENT], A[0:WARP, 0:FRAGMENT], B[0:WARP, 0:FRAGMENT])
            T.writes(C[0:WARP, 0:FRAGMENT])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(layout(vi, vj))
                    ta, la = T.meta_var(layout(vi, vk))
                    tb, lb = T.meta_var(b_index(vk, vj))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] = C[tc, lc] + Cast("float32", A[ta, la]) * Cast("float32", B[tb, lb])

    half = convert(FRAGMENT // 2)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (WARP, FRAGMENT), dtype, align=64, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, FRAGMENT), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:FRAGMENT], A[0:WARP, 0:FRAGMENT], B[0:WARP, 0:FRAGMENT])
            T.writes(C[0:WARP, 0:FRAGMENT])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                # columns 0-7 of C: B's first 4 registers; columns 8-15: the next 4
                T.evaluate(T.ptx_legacy.mma(
                    "m16n8k16", "row", "col", ptx_type, ptx_type, "fp32",
                    A.data, A.elem_offset + tx * convert(FRAGMENT),
                    B.data, B.elem_offset + tx * convert(FRAGMENT),
                    C.data, C.elem_offset + tx * convert(FRAGMENT),
                    False, dtype="float32"))
                T.evaluate(T.ptx_legacy.mma(
                    "m16n8k16", "row", "col", ptx_type, ptx_type, "fp32",
                    A.data, A.elem_offset + tx * convert(FRAGMENT),
                    B.data, B.elem_offset + tx * convert(FRAGMENT) + half,
                    C.data, C.elem_offset + tx * convert(FRAGMENT) + half,
                    False, dtype="float32"))

    return desc, impl
