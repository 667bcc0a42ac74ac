"""The Hopper forward kernel (sm_90a), written in TVM 0.27's TIRx layer: TMA, mbarriers, wgmma.

The rule ``fused_hopper`` serves dense fused specs of head dim 64 and 128 for sm_90a targets
(``nvidia/nvidia-h100``, which the H100 and H200 run); the variants, static shapes and the
split, paged and packed forms stay with ``fused_cuda_mma``.

Not derived from the TensorIR definition by schedule primitives: TensorIR's schedules stop at
mma.sync (no wgmma, TMA or warp specialization among its intrinsics and primitives), so this
kernel is written out in TIRx, as FlashAttention-3 is in CUTLASS, and is tested against the
float64 reference of the definition (``definition.reference``) like every other kernel. Its
semantics are Algorithm 0's (``definition.plain``):
the same arguments, layout and results as the derived kernels (q, o [batch, seq_q, heads, d],
k, v [batch, seq_k, heads_kv, d], lse [batch, heads, seq_q] in natural log, rows that see no key
give 0 and -inf, causal aligned bottom-right).

The program of one CTA, a tile of ``block_m`` query rows of one head:

- warpgroup 0, the producer, gives its registers away (``setmaxnreg.dec``) and one thread of it
  drives the TMA engine: the Q tile once, then K and V tiles of ``block_n`` keys into a ring of
  ``stages`` buffers, each guarded by a "full" mbarrier (the TMA's byte count completes it) and
  an "empty" one (the consumers' warps arrive when they are done with the stage);
- warpgroups 1 .. block_m / 64, the consumers, take registers (``setmaxnreg.inc``), 64 query
  rows each: S = Q K^T by wgmma with both operands in shared memory, the online softmax on the
  wgmma accumulator's fragments (each thread holds 2 rows; row max and sum across the 4 lanes
  of a row by shuffles; exp2 with log2(e) folded into the scale), O rescaled in registers, then
  O += P V by wgmma with P from registers (the S accumulator converted to 16-bit pairs is the
  A operand's register layout) and V in shared memory read MN-major;
- the epilogue divides by the row sums and stores O and lse from registers, rows past seq_q left
  out.

Tiles are 128-byte swizzled: a row of d elements is d / 64 column chunks of 128 bytes, each
chunk a [rows, 64] block (the TMA box) whose 8-row groups are the swizzle atoms. A wgmma
descriptor addresses a chunk; a k16 step advances 32 bytes inside it.

Rows past seq_q and keys past seq_k come from the TMA's zero fill (the box stays whole, so the
barrier's byte count is the same for every tile); key tiles that hold keys past seq_k or past
the causal diagonal are masked, the others run without a mask; key tiles wholly above the
diagonal are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._compat import cuda_arch, tvm
from ..definition.mask import LN2, LOG2E
from ..spec import KernelSpec
from .base import ScheduleRule

__all__ = ["HopperConfig", "RULE", "FusedHopper", "hopper_attention"]

#: 128-byte swizzle (CUtensorMapSwizzle and the wgmma descriptor's layout type)
_SWIZZLE_128B = 3
_L2_PROMO_128B = 2
_TMA_4D = "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"

# An empty asm with the register as an in-out operand: keeps the compiler from moving reads or
# writes of a wgmma accumulator across the wgmma's asynchronous window (CUTLASS's
# warpgroup_fence_operand; the wheel's T.cuda.wgmma.noop_barrier does not generate code).
_FENCE_SRC = r"""
__device__ __forceinline__ void tvmflash_fence(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
"""
_EX2_SRC = r"""
__device__ __forceinline__ float tvmflash_ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
"""
_ST2_SRC = {
    "float16": r"""
__device__ __forceinline__ void tvmflash_st2(half* p, float lo, float hi) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
}
""",
    "bfloat16": r"""
__device__ __forceinline__ void tvmflash_st2(nv_bfloat16* p, float lo, float hi) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}
""",
}


@dataclass(frozen=True)
class HopperConfig:
    """The Hopper kernel's tunables.

    block_m:        query rows a CTA (64 per consumer warpgroup).
    block_n:        keys a K/V tile (the first wgmma's N).
    stages:         K/V buffers in the TMA ring.
    producer_regs:  registers a producer thread keeps (``setmaxnreg.dec``).
    consumer_regs:  registers a consumer thread takes (``setmaxnreg.inc``); with the producer's,
                    at most 64K a CTA (one CTA an SM).
    """

    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    producer_regs: int = 24
    consumer_regs: int = 240

    @property
    def consumers(self) -> int:
        return self.block_m // 64

    def check(self, head_dim: int) -> None:
        """Raise ValueError for a config the kernel cannot run."""
        if self.block_m not in (64, 128, 192):
            raise ValueError(f"block_m: expected 64, 128 or 192 (64 rows a consumer warpgroup), got {self.block_m}")
        if self.block_n % 16 or not 16 <= self.block_n <= 256:
            raise ValueError(f"block_n: expected a multiple of 16 in 16 .. 256 (the wgmma's N), got {self.block_n}")
        if head_dim % 64:
            raise ValueError(f"head_dim: expected a multiple of 64 (128-byte rows of the TMA box), got {head_dim}")
        if self.stages < 1:
            raise ValueError(f"stages: expected at least 1, got {self.stages}")
        threads = 128 * (1 + self.consumers)
        if self.producer_regs * 128 + self.consumer_regs * 128 * self.consumers > 65536:
            raise ValueError(f"consumer_regs: {self.consumers} x 128 x {self.consumer_regs} + 128 x "
                             f"{self.producer_regs} registers pass 64K ({threads} threads)")
        if self.smem_bytes(head_dim) > 227 * 1024:
            raise ValueError(f"stages: {self.smem_bytes(head_dim)} bytes of shared memory pass 227 KB")

    def smem_bytes(self, head_dim: int) -> int:
        return 2 * head_dim * (self.block_m + 2 * self.stages * self.block_n) + 1024


def hopper_attention(spec: KernelSpec, cfg: HopperConfig):
    """The TIRx PrimFunc of the Hopper kernel for ``spec`` (dense, any lengths) with ``cfg``."""
    from tvm.backend.cuda.lang import MBarrier, TMABar
    from tvm.backend.cuda.tile_primitive.tma_utils import mma_shared_layout
    from tvm.script import tirx as T

    cfg.check(spec.head_dim)
    D, G, causal, dt = spec.head_dim, spec.group, spec.causal, spec.dtype
    ab = {"float16": "f16", "bfloat16": "bf16"}[dt]
    BM, BN, ST, NWG = cfg.block_m, cfg.block_n, cfg.stages, cfg.consumers
    NC = D // 64  # 128-byte column chunks of a row
    S_ACC, O_ACC = BN // 2, D // 2  # accumulator floats a thread
    MMA_S = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{ab}.{ab}"
    MMA_O = f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ab}.{ab}"
    Q_BYTES, KV_BYTES = BM * D * 2, BN * D * 2
    # descriptor offsets, in 16-byte units
    Q_CHUNK16, KV_CHUNK16, KV_STAGE16 = BM * 8, BN * 8, BN * 8 * NC
    WG_ROWS16 = 64 * 8  # 64 rows of one chunk
    CONSUMER_WARPS = 4 * NWG
    log2e = T.float32(LOG2E)
    ln2 = T.float32(LN2)
    neg_inf = T.float32(float("-inf"))
    st2 = _ST2_SRC[dt]

    q_layout = mma_shared_layout(dt, _SWIZZLE_128B, (NC, BM, 64))
    kv_layout = mma_shared_layout(dt, _SWIZZLE_128B, (ST, NC, BN, 64))

    @T.inline
    def encode(tensor_map, data, rows, heads_, batch, box_rows):
        """The TMA map of a [batch, rows, heads_, D] tensor: dims innermost first (d, head, row,
        batch), strides in bytes of dims 1..3, box one 128-byte chunk of a row x ``box_rows``."""
        T.call_packed("runtime.cuTensorMapEncodeTiled", tensor_map, dt, 4, data,
                      D, heads_, rows, batch,
                      T.int64(D * 2), T.Cast("int64", heads_) * (D * 2), T.Cast("int64", rows) * heads_ * (D * 2),
                      64, 1, box_rows, 1, 1, 1, 1, 1, 0, _SWIZZLE_128B, _L2_PROMO_128B, 0)

    @T.inline
    def retire(acc, n, empty, stage, lane):
        """Wait for the warpgroup's wgmma group, fence its accumulator, release the stage."""
        T.ptx.wgmma.commit_group.sync.aligned()
        T.ptx.wgmma.wait_group.sync.aligned(0)
        for i in T.unroll(n):
            T.cuda.func_call("tvmflash_fence", acc[i], source_code=_FENCE_SRC)
        if lane == 0:
            empty.arrive(stage)

    # fmt: off
    @T.prim_func
    def main(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle,
             sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_k = T.int32()
        heads = T.int32()
        heads_kv = T.int32()
        Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dt, align=16)
        K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dt, align=16)
        V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dt, align=16)
        O = T.match_buffer(o_h, (batch, seq_q, heads, D), dt, align=16)
        LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32", align=16)
        q_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        k_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        v_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode(q_map, Q.data, seq_q, heads, batch, BM)
        encode(k_map, K.data, seq_k, heads_kv, batch, BN)
        encode(v_map, V.data, seq_k, heads_kv, batch, BN)
        T.device_entry()
        T.attr({"tirx.launch_bounds_min_blocks_per_sm": 1})
        bx, head, b = T.cta_id([(seq_q + BM - 1) // BM, heads, batch])
        wg = T.warpgroup_id([1 + NWG])
        tid = T.thread_id_in_wg([128])
        pool = T.SMEMPool()
        Q_s = pool.alloc((NC, BM, 64), dt, align=1024, layout=q_layout)
        K_s = pool.alloc((ST, NC, BN, 64), dt, align=1024, layout=kv_layout)
        V_s = pool.alloc((ST, NC, BN, 64), dt, align=1024, layout=kv_layout)
        q_full = TMABar(pool, 1)
        k_full = TMABar(pool, ST)
        v_full = TMABar(pool, ST)
        k_empty = MBarrier(pool, ST)
        v_empty = MBarrier(pool, ST)
        pool.commit()
        q_full.init(1)  # (one thread of the CTA initialises)
        k_full.init(1)
        v_full.init(1)
        k_empty.init(CONSUMER_WARPS)
        v_empty.init(CONSUMER_WARPS)
        T.ptx.fence.mbarrier_init.release.cluster()
        T.cuda.cta_sync()
        # causal: longest query tiles first (the grid's first CTAs start first)
        mb = T.meta_var((((seq_q + BM - 1) // BM) - 1 - bx) if causal else bx)
        hk = T.meta_var(head // G)
        # key tiles this query tile sees: all, or (causal) up to its last row's diagonal
        n_all = T.meta_var((seq_k + BN - 1) // BN)
        n_tiles = T.meta_var(T.max(T.min(n_all, ((mb + 1) * BM + seq_k - seq_q + BN - 1) // BN), 0)
                             if causal else n_all)
        if wg == 0:
            T.ptx["setmaxnreg.dec.sync.aligned.u32"](cfg.producer_regs)
            if tid == 0:
                q_full.arrive(0, tx_count=Q_BYTES)
                for c in T.unroll(NC):
                    T.ptx[_TMA_4D](Q_s.ptr_to([c, 0, 0]), T.address_of(q_map), c * 64, head, mb * BM, b,
                                   q_full.ptr_to([0]))
                for n in T.serial(n_tiles):
                    k_empty.wait(n % ST, ((n // ST) % 2) ^ 1)
                    k_full.arrive(n % ST, tx_count=KV_BYTES)
                    for c in T.unroll(NC):
                        T.ptx[_TMA_4D](K_s.ptr_to([n % ST, c, 0, 0]), T.address_of(k_map), c * 64, hk, n * BN, b,
                                       k_full.ptr_to([n % ST]))
                    v_empty.wait(n % ST, ((n // ST) % 2) ^ 1)
                    v_full.arrive(n % ST, tx_count=KV_BYTES)
                    for c in T.unroll(NC):
                        T.ptx[_TMA_4D](V_s.ptr_to([n % ST, c, 0, 0]), T.address_of(v_map), c * 64, hk, n * BN, b,
                                       v_full.ptr_to([n % ST]))
        else:
            T.ptx["setmaxnreg.inc.sync.aligned.u32"](cfg.consumer_regs)
            s = T.alloc_local((S_ACC,), "float32")
            o = T.alloc_local((O_ACC,), "float32")
            p = T.alloc_local((S_ACC // 2,), "uint32")
            m = T.alloc_local((2,), "float32")  # row max, in units of the scaled log2 score
            l = T.alloc_local((2,), "float32")  # this thread's share of the row sum
            mx = T.alloc_local((2,), "float32")
            alpha = T.alloc_local((2,), "float32")
            mu = T.alloc_local((2,), "float32")
            desc_q: T.uint64
            desc_k: T.uint64
            desc_v: T.uint64
            scale = T.meta_var(sm_scale * log2e)
            warp = T.meta_var(tid // 32)
            lane = T.meta_var(tid % 32)
            # this thread's rows of the CTA's tile: r and r + 8
            row0 = T.meta_var(mb * BM + (wg - 1) * 64 + warp * 16 + lane // 4)
            for i in T.unroll(O_ACC):
                o[i] = T.float32(0)
            for r in T.unroll(2):
                m[r] = neg_inf
                l[r] = T.float32(0)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_q), Q_s.ptr_to([0, 0, 0]), 1, 64, _SWIZZLE_128B)
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_k), K_s.ptr_to([0, 0, 0, 0]), 1, 64,
                                                  _SWIZZLE_128B)
            # V as the B operand of O += P V is MN-major: LBO the next 64 columns (chunk), SBO the
            # next 8 keys
            T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_v), V_s.ptr_to([0, 0, 0, 0]), KV_CHUNK16, 64,
                                                  _SWIZZLE_128B)
            q_full.wait(0, 0)
            for n in T.serial(n_tiles):
                stage = T.meta_var(n % ST)
                phase = T.meta_var((n // ST) % 2)
                # S = Q K^T
                for i in T.unroll(S_ACC):
                    s[i] = T.float32(0)
                for i in T.unroll(S_ACC):
                    T.cuda.func_call("tvmflash_fence", s[i], source_code=_FENCE_SRC)
                k_full.wait(stage, phase)
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(D // 16):
                    T.ptx[MMA_S](
                        *[s[i] for i in range(S_ACC)],
                        desc_q + T.Cast("uint64", (kk // 4) * Q_CHUNK16 + (wg - 1) * WG_ROWS16 + (kk % 4) * 2),
                        desc_k + T.Cast("uint64", stage * KV_STAGE16 + (kk // 4) * KV_CHUNK16 + (kk % 4) * 2),
                        T.ptx.pred(T.int32(1)), 1, 1, 0, 0)
                retire(s, S_ACC, k_empty, stage, lane)
                # the mask, on the tiles that hold keys past seq_k or past a row's diagonal
                if (n + 1) * BN > seq_k or (causal and (n + 1) * BN - 1 > mb * BM + seq_k - seq_q):
                    for j in T.unroll(BN // 8):
                        for e in T.unroll(4):
                            col = T.meta_var(n * BN + j * 8 + (lane % 4) * 2 + e % 2)
                            row = T.meta_var(row0 + (e // 2) * 8)
                            if col >= seq_k or (causal and col > row + seq_k - seq_q):
                                s[j * 4 + e] = neg_inf
                # the online softmax on the fragments: this thread's two rows
                for r in T.unroll(2):
                    mx[r] = T.max(s[r * 2], s[r * 2 + 1])
                    for j in T.unroll(1, BN // 8):
                        mx[r] = T.max(mx[r], T.max(s[j * 4 + r * 2], s[j * 4 + r * 2 + 1]))
                    mx[r] = T.max(mx[r], T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx[r], 1, 32))
                    mx[r] = T.max(mx[r], T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx[r], 2, 32))
                    mx[r] = T.max(m[r], mx[r] * scale)
                    # a row that has seen no key yet keeps exponents finite
                    mu[r] = T.Select(mx[r] == neg_inf, T.float32(0), mx[r])
                    alpha[r] = T.cuda.func_call("tvmflash_ex2", m[r] - mu[r], source_code=_EX2_SRC,
                                                return_type="float32")
                    m[r] = mx[r]
                    l[r] = l[r] * alpha[r]
                for j in T.unroll(BN // 8):
                    for e in T.unroll(4):
                        s[j * 4 + e] = T.cuda.func_call("tvmflash_ex2", s[j * 4 + e] * scale - mu[e // 2],
                                                        source_code=_EX2_SRC, return_type="float32")
                        l[e // 2] = l[e // 2] + s[j * 4 + e]
                for j in T.unroll(D // 8):
                    for e in T.unroll(4):
                        o[j * 4 + e] = o[j * 4 + e] * alpha[e // 2]
                # P in 16-bit pairs: the S accumulator's layout is the A operand's
                for i in T.unroll(S_ACC // 2):
                    T.ptx[f"cvt.rn.{ab}x2.f32"](p[i], s[2 * i + 1], s[2 * i])
                # O += P V
                v_full.wait(stage, phase)
                for i in T.unroll(O_ACC):
                    T.cuda.func_call("tvmflash_fence", o[i], source_code=_FENCE_SRC)
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(BN // 16):
                    T.ptx[MMA_O](
                        *[o[i] for i in range(O_ACC)], p[kk * 4], p[kk * 4 + 1], p[kk * 4 + 2], p[kk * 4 + 3],
                        desc_v + T.Cast("uint64", stage * KV_STAGE16 + kk * 128),
                        T.ptx.pred(T.int32(1)), 1, 1, 1)
                retire(o, O_ACC, v_empty, stage, lane)
            # the epilogue: the row sums across the row's 4 lanes, O / l, lse
            for r in T.unroll(2):
                l[r] = l[r] + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), l[r], 1, 32)
                l[r] = l[r] + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), l[r], 2, 32)
                alpha[r] = T.Select(l[r] == T.float32(0), T.float32(0), T.float32(1) / l[r])
            for r in T.unroll(2):
                if row0 + r * 8 < seq_q:
                    for j in T.unroll(D // 8):
                        T.cuda.func_call("tvmflash_st2", O.ptr_to([b, row0 + r * 8, head, j * 8 + (lane % 4) * 2]),
                                         o[j * 4 + r * 2] * alpha[r], o[j * 4 + r * 2 + 1] * alpha[r],
                                         source_code=st2)
                    if lane % 4 == 0:
                        LSE[b, head, row0 + r * 8] = T.Select(l[r] == T.float32(0), neg_inf,
                                                              (m[r] + T.log2(l[r])) * ln2)
    # fmt: on
    return main


#: head dims the kernel has tiles for (a row a whole number of 128-byte chunks; 256 needs its own
#: tiles and register split)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class FusedHopper(ScheduleRule):
    """The Hopper kernel as a rule: written, not scheduled (``scheduled`` returns the TIRx
    kernel), compiled through TVM's ``tirx`` pipeline. ``definition`` stays the base rule's:
    Algorithm 0 derived into the online softmax at the kernel's tile, the function the kernel
    computes (what ``explain`` counts the traffic of and the tests hold it to)."""

    name: ClassVar[str] = "fused_hopper"
    config_type: ClassVar[type] = HopperConfig
    tir_pipeline: ClassVar[str | None] = "tirx"

    def supports(self, spec: KernelSpec) -> bool:
        return (spec.algorithm == "fused" and spec.is_cuda and cuda_arch(spec.tvm_target) == "sm_90a"
                and spec.head_dim in HEAD_DIMS and spec.shape is None and not spec.even
                and not (spec.softcap or spec.window or spec.alibi or spec.splits or spec.seqused_k
                         or spec.paged or spec.varlen))

    def default_config(self, spec: KernelSpec) -> HopperConfig:
        return HopperConfig()

    def scheduled(self, spec: KernelSpec, func, config: HopperConfig) -> tvm.IRModule:
        return tvm.IRModule({"main": hopper_attention(spec, config)})


RULE = FusedHopper()
