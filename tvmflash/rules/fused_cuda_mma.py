"""The FlashAttention CUDA schedule (sm_80+): tensor cores, shared-memory tiles, one kernel.

Schedule primitives applied to the fused TensorIR of ``definition.fused_attention``:

- one thread block per (batch, head, query tile); ``num_warps`` warps split the query rows
  (FlashAttention-2: each warp owns ``block_m / num_warps`` rows, no inter-warp reduction);
- Q, K, V tiles staged in dynamic shared memory, loaded with cooperative vector loads; K and V
  by cp.async one K/V tile ahead of the tile computed (a 2-stage software pipeline,
  ``FlashConfig.stages``, ``_pipeline_kv_loop``);
- S = Q K^T and acc_o += P V tensorized with ldmatrix + mma.sync (m16n8k16, fp32 accumulate);
  the accumulators (``acc_s``, ``acc_o``) live in mma fragments (warp scope) for the whole loop;
- the online softmax runs on the fragments (FlashAttention-2): each thread exponentiates the
  scores it holds; row max and row sum are reduced per thread (``rfactor``) and then across the
  four lanes of a row through shared memory; P is written straight into the A-operand fragment
  of the second GEMM. Only the running max/sum state is kept one row per thread;
- acc_o is rescaled by alpha in place on its fragment layout (``transform_block_layout``);
- the epilogue stores acc_o through shared memory, normalised by l_i, to global memory.

Each GEMM's loop nest is first ``blockize``d into a block of its own: inside that block the GEMM is
a clean stage pipeline, so ``cache_read`` / ``compute_at`` / ``decompose_reduction`` apply even
though the K/V loop around it carries the softmax state (which makes the tile block itself no
stage pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import definition as D
from .._compat import Schedule, ms, tirx
from ..compiler.derive import PARTIAL_ACC, PARTIAL_STATE
from ..spec import KernelSpec
from . import mma_intrinsics as I
from .base import COMMON_INSTRUCTIONS, ScheduleRule, Space, bind_grid, dynamic_shared_memory_target

#: PassContext options the schedule needs at compile time. CSE would hide threadIdx.x inside
#: let-bound indices of the fragment rescale, which LowerWarpMemory then cannot lower.
#: ``use_async_copy``: the K/V loads of the software pipeline (``_pipeline_kv_loop``) become
#: cp.async (InjectPTXAsyncCopy rewrites only the stores under the pipeline's async scope).
PASS_CONFIG = {"tirx.disable_cse_tir": True, "tirx.use_async_copy": True}

#: The any-length build's extra: every loop nest of up to 1024 constant steps gets
#: ``#pragma unroll`` (``explicit_unroll`` off: nvcc unrolls, the TIR stays small). The fragments
#: are register arrays indexed by those loops; where nvcc left one rolled they went to local
#: memory (the head-dim-64 causal any-length build with its tuned 128x128 tile did). The even
#: builds are left to nvcc, which unrolls them itself and runs them faster without the pragmas
#: (docs/performance.md).
UNROLL_CONFIG = {"tirx.UnrollLoop": {"auto_max_step": 1024, "explicit_unroll": False}}


@dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and mapping of the tensor-core schedule.

    block_m:   query rows per thread block: num_warps * 32 (each warp two 16-row mma tiles) or
               num_warps * 16 (one tile a warp: half the accumulator registers per thread, what
               head dim 256 needs). The running softmax state is one row per thread either way:
               with 16 rows a warp, half the threads hold none.
    block_n:   keys per K/V tile.
    num_warps: warps per thread block; each owns block_m / num_warps query rows.
    vec:       elements per vectorised global load / store (8 halves = 16 bytes).
    stages:    the K/V software pipeline: 2, the K and V tiles are loaded with cp.async one
               tile ahead of the tile computed (``_pipeline_kv_loop``); 1, synchronous loads.
    kv_buffers: shared-memory buffers each of K and V (stages 2; always 1 with stages 1).
               1: FlashAttention-2's order, K of tile j+1 is issued once S = Q K^T of tile j has
               read K, V of tile j+1 once P V has; K's load overlaps the softmax and P V, V's
               is waited for with K's before S = Q K^T (TVM keeps one wait per stage, docs/tvm-0.27.md);
               2: double buffers, both loads of tile j+1 overlap all of tile j (more shared
               memory: 107 instead of 69 KiB at head dim 128).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    vec: int = 8
    stages: int = 2
    kv_buffers: int = 1

    def __post_init__(self):
        if self.block_m not in (self.num_warps * 32, self.num_warps * 16):
            raise ValueError(f"block_m: expected num_warps * 32 = {self.num_warps * 32} or num_warps * 16 = "
                             f"{self.num_warps * 16}, got {self.block_m}")
        if self.block_n % 16:
            raise ValueError(f"block_n: expected a multiple of 16, got {self.block_n}")
        if self.stages not in (1, 2):
            raise ValueError(f"stages: expected 1 or 2, got {self.stages!r}")
        if self.kv_buffers not in (1, 2):
            raise ValueError(f"kv_buffers: expected 1 or 2, got {self.kv_buffers!r}")
        if self.stages == 1 and self.rows_per_warp == 16:
            raise ValueError("stages: synchronous K/V loads (stages=1) with 16 rows a warp do not compile in TVM "
                             "0.27 (LowerWarpMemory: 'Cannot access address of warp memory directly'): expected "
                             f"stages=2 for block_m={self.block_m}, num_warps={self.num_warps}")
        if self.stages == 1:  # no pipeline: nothing to double-buffer
            object.__setattr__(self, "kv_buffers", 1)

    @property
    def rows_per_warp(self) -> int:
        """Query rows each warp owns: 32 or 16."""
        return self.block_m // self.num_warps


#: Head dims the tensor-core schedule serves: multiples of the 16-wide mma k step whose
#: accumulator fits the register file. Up to 128 a warp owns 32 query rows; at 256 it owns 16
#: (``_rows_per_warp``), as in FlashAttention-2, so that acc_o is 128 floats a thread.
HEAD_DIMS = (32, 64, 96, 128, 256)


def _rows_per_warp(head_dim: int) -> int:
    """Query rows a warp owns: 16 above head dim 128 (the accumulator's registers), else 32."""
    return 16 if head_dim > 128 else 32


#: (factor, offset) of the Q, K, V tiles' rows in shared memory: a row stride of 8 mod 64
#: elements (16 bytes past a multiple of 128) keeps ldmatrix free of bank conflicts.
ROW_ALIGN = (64, 8)


def _bind_rows(sch: Schedule, loop, config: FlashConfig):
    """One query row per thread: row = ty * 32 + tx (with 16 rows a warp, the threads past
    block_m hold no row: the split's predicate)."""
    ty, tx = sch.split(loop, factors=[config.num_warps, 32])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _cooperative(sch: Schedule, block, config: FlashConfig, vectorize: bool = True):
    """All threads of the block copy a 2-D tile together, ``vec`` elements per access."""
    loops = sch.get_loops(block)
    rows, cols = loops[-2:]
    extent = sch.get(cols).extent
    if int(extent) & (int(extent) - 1):
        # A row length that is no power of two (head dim 96): the vectors are split off the row
        # first, since the analyzer cannot prove that a vector of the fused (row, col) loop stays
        # in one row, and would leave the copy scalar (and synchronous).
        cols, vec = sch.split(cols, factors=[None, config.vec])
        _, ty, tx = sch.split(sch.fuse(rows, cols), factors=[None, config.num_warps, 32])
    else:
        _, ty, tx, vec = sch.split(sch.fuse(rows, cols), factors=[None, config.num_warps, 32, config.vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    if vectorize:
        sch.vectorize(vec)


def _tile16(sch: Schedule, block, ndim: int):
    """Split the last ``ndim`` loops of ``block`` by 16 and move the 16s innermost."""
    loops = sch.get_loops(block)[-ndim:]
    outer, inner = [], []
    for loop in loops:
        o, i = sch.split(loop, factors=[None, 16])
        outer.append(o)
        inner.append(i)
    sch.reorder(*outer, *inner)
    return outer, inner


def _read_index(sch: Schedule, block, prefix: str) -> int:
    """Index in ``block``'s read regions of the buffer whose name starts with ``prefix``
    (set_scope renames buffers, e.g. ``Q_tile`` -> ``Q_tile_shared_dyn``)."""
    for idx, region in enumerate(sch.get(block).reads):
        src = region.source
        name = getattr(src, "name", None) or src.buffer.name
        if name.startswith(prefix):
            return idx
    raise KeyError(f"{prefix} is not read by block {sch.get(block).name_hint}")


def _fragment_map(i, j):
    """[rows, cols] -> [rows/16, cols/16, thread, local]: 16x16 tiles in mma fragment layout."""
    thread, local = I.fragment_layout(i % 16, j % 16)
    return (i // 16, j // 16, thread, local)


def _fragment_map_t(i, j):
    """As ``_fragment_map``, with the 16x16 tiles stored column-major."""
    thread, local = I.fragment_layout(i % 16, j % 16)
    return (j // 16, i // 16, thread, local)


def _mma_gemm(sch: Schedule, name: str, a: str, b: str, load_a: str, load_b: str, config: FlashConfig):
    """Tile the GEMM block ``name`` (loops m, n, k; in a scope block of its own) for mma: warps
    over m, A and B fragments ldmatrix'ed from shared memory per 16-wide k step, reduction
    decomposed. Returns (update block, init block); the caller tensorizes both once the
    accumulator's scope and layout are set."""
    warp_rows = config.rows_per_warp // 16
    gemm = sch.get_sblock(name)
    (mo, no, ko), (mi, _, _) = _tile16(sch, gemm, 3)
    unit = sch.blockize(mi)  # one 16x16x16 mma per instance
    ty, mw = sch.split(mo, factors=[config.num_warps, warp_rows])
    sch.reorder(ty, ko, no, mw)
    sch.bind(ty, "threadIdx.y")
    loads = []
    # A fragments for the whole k step (reused across n), B fragments one n tile at a time
    # (4 registers live instead of block_n / 4 or head_dim / 4)
    for operand, intrin, at in ((a, load_a, ko), (b, load_b, no)):
        if intrin is not None:  # None: the operand already sits in fragments
            loads.append((sch.cache_read(unit, _read_index(sch, unit, operand), "warp"), intrin, at))
    for frag, intrin, at in loads:
        sch.compute_at(frag, at)
        r, c = sch.get_loops(frag)[-2:]
        ro, ri = sch.split(r, factors=[None, 16])
        co, ci = sch.split(c, factors=[None, 16])
        sch.reorder(ro, co, ri, ci)
        sch.transform_layout(frag, ("write", 0), _fragment_map)
        sch.tensorize(ri, intrin)
    sch.decompose_reduction(unit, ko)
    inner = sch.get_sblock(name)
    return inner, sch.get_sblock(name + "_init")


def _store_fragments(sch: Schedule, name: str, intrin: str, config: FlashConfig):
    """Copy accumulator fragments to shared memory, 16x16 at a time, each warp its rows."""
    warp_rows = config.rows_per_warp // 16
    block = sch.get_sblock(name)
    (mo, _), (mi, _) = _tile16(sch, block, 2)
    ty, _ = sch.split(mo, factors=[config.num_warps, warp_rows])
    sch.bind(ty, "threadIdx.y")
    sch.tensorize(mi, intrin)


def _split_rows(sch: Schedule, loop, config: FlashConfig):
    """Rows in the mma fragment layout: (warp, row tile of the warp, half of the 16, row % 8)."""
    return sch.split(loop, factors=[config.num_warps, None, 2, 8])


def _split_keys(sch: Schedule, loop):
    """Keys in the mma fragment layout: (16-key tile, half of the 16, lane % 4, register pair)."""
    return sch.split(loop, factors=[None, 2, 4, 2])


def _bind_lanes(sch: Schedule, ty, row8, quad):
    """Warp -> threadIdx.y; (row % 8, key quad) -> the lane, 4 * (row % 8) + quad: the thread
    that holds those elements in a 16x16 fragment."""
    sch.bind(ty, "threadIdx.y")
    sch.bind(sch.fuse(row8, quad), "threadIdx.x")


def _to_lanes(sch: Schedule, rows, keys):
    """Order split (row, key) loops (``_split_rows``, ``_split_keys``) so that each thread runs
    over the elements of its own registers, and bind the warp and the lane."""
    ty, mw, half_i, row8 = rows
    no, half_j, quad, pair = keys
    sch.reorder(ty, row8, quad, mw, half_i, no, half_j, pair)
    _bind_lanes(sch, ty, row8, quad)


def _on_fragments(sch: Schedule, name: str, config: FlashConfig):
    """An element-wise stage over the (row, key) tile, run on the fragment layout: each warp
    takes its own rows, as the GEMMs do, and each thread visits only the scores in its registers."""
    i, j = sch.get_loops(name)[-2:]
    _to_lanes(sch, _split_rows(sch, i, config), _split_keys(sch, j))


def _row_reduce_on_fragments(sch: Schedule, name: str, config: FlashConfig):
    """Row reduction ``name`` (max or sum over the keys of a fragment-layout tile): each thread
    reduces the elements it holds (``rfactor`` over the 4 lanes that share a row), the 4 partials
    of a row meet in shared memory and one thread per row combines them."""
    block = sch.get_sblock(name)
    i, j = sch.get_loops(block)[-2:]
    _split_rows(sch, i, config)
    quad = _split_keys(sch, j)[2]
    partial = sch.rfactor(quad, factor_axis=0)
    loops = sch.get_loops(partial)[-8:]
    _to_lanes(sch, loops[:4], loops[4:])
    # partials accumulate in registers, then go to shared memory once
    publish = sch.cache_write(partial, 0, "local")
    sch.set_scope(publish, 0, "shared.dyn")
    quad, row = sch.get_loops(publish)[-2:]
    ty, mw, half_i, row8 = _split_rows(sch, row, config)
    sch.reorder(ty, row8, quad, mw, half_i)
    _bind_lanes(sch, ty, row8, quad)
    loops = sch.get_loops(block)
    row = sch.fuse(*loops[-5:-1])  # (ty, mw, half_i, row8) -> the row; the quad loop stays
    _bind_rows(sch, row, config)


#: The K/V loop body as InjectSoftwarePipeline sees it (scope blocks flattened): the loads' key
#: offset (``kv_load``), the K load, the V load, the masks' key offset (``kv0``), S = Q K^T (init,
#: GEMM), then the softmax and acc_o += P V: 22 statements. The pass checks the annotations'
#: length against it.
KV_LOOP_BODY = 22
_KV_LOAD, _K, _V, _S_GEMM = 0, 1, 2, 5
_LOADS = (_KV_LOAD, _K, _V)


def _kv_loop_body(config: FlashConfig) -> int:
    """``KV_LOOP_BODY``, less one where a warp owns 16 rows: the state update (the last two
    statements) then runs under the row predicate of ``_bind_rows``, one guarded statement."""
    return KV_LOOP_BODY - (config.rows_per_warp == 16)


def _pipeline_kv_loop(sch: Schedule, config: FlashConfig):
    """Software-pipeline the K/V loop (``config.stages`` 2): the K and V loads are stage 0 and
    asynchronous, the rest stage 1, so tile j+1's loads are in flight while tile j is computed.

    The K/V tile count must be >= 1 for it (``compiler.derive._kv_tile_count``): else TVM 0.27 guards
    the pipeline's prologue and epilogue by conditions that contain __syncthreads, and ThreadSync
    refuses them ("Cannot insert syncs inside condition")."""
    if config.stages == 1:
        return
    n = _kv_loop_body(config)
    body = list(range(n))
    if config.kv_buffers == 1:
        # A load issued after the last reader of its buffer in the body needs no second buffer
        # (InjectSoftwarePipeline versions a buffer only if a stage-0 write precedes a stage-1 read).
        for i in _LOADS:
            body.remove(i)
        at = body.index(_S_GEMM) + 1
        body[at:at] = [_KV_LOAD, _K]
        body.append(_V)
    kb = sch.get_loops(D.K_LOAD)[0]
    sch.annotate(kb, "software_pipeline_stage", [0 if i in _LOADS else 1 for i in range(n)])
    sch.annotate(kb, "software_pipeline_order", [body.index(i) for i in range(n)])
    sch.annotate(kb, "software_pipeline_async_stages", [0])


def tensor_cores_serve(spec: KernelSpec) -> bool:
    """A fused CUDA spec whose dtype and head dim the mma.sync tiles take."""
    return spec.algorithm == "fused" and spec.is_cuda and spec.dtype in I.MMA_DTYPES and spec.head_dim in HEAD_DIMS


def _one_kv_tile_at_16_rows(spec: KernelSpec) -> bool:
    """A static shape whose keys fit one K/V tile of a 16-rows-a-warp hand config: the K/V loop
    of one trip leaves the software pipeline no steady state, and TVM 0.27's LowerWarpMemory
    then fails on the fragments as with ``stages=1`` ("Cannot access address of warp memory
    directly"). The registry's next rule (one thread per row) serves those few keys."""
    if spec.shape is None:
        return False
    config = _hand_config(spec.head_dim)
    return config.rows_per_warp == 16 and spec.shape[2] <= config.block_n


def _hand_config(head_dim: int) -> FlashConfig:
    """Hand-chosen tiles: 128x64 with 4 warps (FlashAttention-2's for sm_80/sm_90 forward), and
    at head dim 256 64x64 with 4 warps of 16 rows (acc_o in registers; the tile of ``TILES_256``
    the H200 measurements favour, docs/performance.md)."""
    if head_dim <= 128:
        return FlashConfig(block_m=128, block_n=64, num_warps=4)
    return FlashConfig(block_m=64, block_n=64, num_warps=4)


def _knobs(bm: int, bn: int) -> dict:
    # halves per global load/store: 16 or 8 bytes; the K/V pipeline: cp.async one tile ahead
    # into one buffer each (FlashAttention-2's order) or two, or synchronous loads
    return {"vec": (8, 4), "stages": (2, 1), "kv_buffers": (1, 2)}


def _knobs_16(bm: int, bn: int) -> dict:
    # 16 rows a warp: the pipelined loads only (FlashConfig refuses stages=1 there)
    return {**_knobs(bm, bn), "stages": (2,)}


#: The tiles tuning tries (block_m = 32 * num_warps). Left out, as they fail to compile: 64x128
#: (StorageRewrite aliases an f16 and an f32 shared.dyn buffer, docs/tvm-0.27.md) and block_n = 16
#: ("Cannot access address of warp memory directly"). VerifyGPUCode drops what exceeds the GPU's
#: shared memory.
TILES = ((128, 64), (128, 32), (128, 96), (128, 128), (64, 64), (64, 32))

#: The tiles at head dim 256 (16 rows a warp: 8 or 4 warps): K/V tiles of 64 or 32 keys, as
#: FlashAttention-2; wider ones leave no registers for S beside acc_o.
TILES_256 = ((128, 64), (128, 32), (64, 64), (64, 32))


@dataclass(frozen=True)
class FusedCudaMma(ScheduleRule):
    """The fused kernel on tensor cores (ldmatrix + mma.sync), sm_80 and newer."""

    name: ClassVar[str] = "fused_cuda_mma"
    config_type: ClassVar[type] = FlashConfig
    even_builds: ClassVar[bool] = True
    trace_instructions: ClassVar[frozenset] = COMMON_INSTRUCTIONS | {
        "Annotate", "Bind", "Blockize", "CacheRead", "CacheWrite", "ComputeAt", "DecomposeReduction", "Fuse",
        "RFactor", "Reorder", "SetScope", "Split", "StorageAlign", "Tensorize", "TransformBlockLayout",
        "TransformLayout", "Unroll", "UnsafeHideBufferAccess", "Vectorize"}
    trace_annotations: ClassVar[frozenset] = frozenset(
        {"software_pipeline_stage", "software_pipeline_order", "software_pipeline_async_stages"})

    def supports(self, spec: KernelSpec) -> bool:
        return tensor_cores_serve(spec) and not spec.splits and not _one_kv_tile_at_16_rows(spec)

    def default_config(self, spec: KernelSpec) -> FlashConfig:
        return _hand_config(spec.head_dim)

    def pass_config(self, spec: KernelSpec) -> dict:
        """``PASS_CONFIG``; ``UNROLL_CONFIG`` too unless the build is the even one."""
        return {**PASS_CONFIG, **({} if spec.even else UNROLL_CONFIG)}

    def prepare(self, spec: KernelSpec) -> None:
        I.intrinsics(spec.dtype)

    def trace_intrinsics(self, spec: KernelSpec) -> frozenset:
        return frozenset(I.intrinsics(spec.dtype).values())

    def space(self, spec: KernelSpec) -> Space:
        rows = _rows_per_warp(spec.head_dim)
        return Space(
            name=self.name,
            tiles=TILES_256 if rows == 16 else TILES,
            knobs=_knobs_16 if rows == 16 else _knobs,
            config=lambda bm, bn, **kw: FlashConfig(block_m=bm, block_n=bn, num_warps=bm // rows, **kw),
            schedule=self.apply,
            postprocs=lambda: [ms.postproc.VerifyGPUCode()],
            target=dynamic_shared_memory_target,
        )

    def apply(self, func: tirx.PrimFunc, config: FlashConfig) -> Schedule:
        return schedule_tiles(func, config)


def schedule_tiles(func: tirx.PrimFunc, config: FlashConfig, partial: bool = False) -> Schedule:
    """The tensor-core schedule of the tile block of ``func``: the rolling update's function, or
    with ``partial`` the split-K update's, whose tile block (one more grid axis, the key chunk)
    ends in the chunk's partial state instead of the epilogue (the combine is left unscheduled)."""
    sch = Schedule(func)
    intrin = I.intrinsics(_dtype(func))
    static_o = partial and _head_dim(func) <= 128
    # Step 1. One thread block per (batch, head, query tile) (and key chunk).
    if partial:
        b, h, qb, c = sch.get_loops(D.TILE)
        sch.bind(sch.fuse(qb, c), "blockIdx.x")
        sch.bind(h, "blockIdx.y")
        sch.bind(b, "blockIdx.z")
    else:
        bind_grid(sch)

    # Step 2. Where each tile lives. Q, K, V in shared memory; S, P and the accumulators in mma
    # fragments (registers, the tensor cores' layout) for the whole K/V loop; the running max
    # and sum one row per thread in registers; what crosses between the two thread mappings
    # (the new max, alpha, the partial row reductions) in shared memory.
    for block in (D.Q_LOAD, D.K_LOAD, D.V_LOAD, D.RUNNING_MAX, D.ALPHA, D.O_STAGE):
        # (a partial's O stage is small enough to fit in the dead K tile, which the mma store's
        # access pointer refuses as it refuses the Q tile (``_o_stage_fits_in_q``): static
        # shared memory is not merged with the dynamic, where the two fit in 48 KB)
        sch.set_scope(block, 0, "shared" if static_o and block == D.O_STAGE else "shared.dyn")
    for block in (D.INIT_M, D.INIT_L, D.ROW_MAX, D.ROW_SUM, D.L_UPDATE):
        sch.set_scope(block, 0, "local")
    # (S stores its 16x16 tiles in another order than acc_s and P: StorageRewrite would otherwise
    # reuse the source of an element-wise copy in place, and LowerWarpMemory cannot lower a warp
    # buffer that aliases another.)
    for block, layout in ((D.S_STORE, _fragment_map_t), (D.P_EXP, _fragment_map), (D.P_CAST, _fragment_map)):
        sch.set_scope(block, 0, "warp")
        sch.transform_layout(block, ("write", 0), layout)

    # Pad the ldmatrix operands' rows by 16 bytes against shared-memory bank conflicts.
    for name in (D.Q_LOAD, D.K_LOAD, D.V_LOAD):
        sch.storage_align(name, 0, axis=0, factor=ROW_ALIGN[0], offset=ROW_ALIGN[1])

    # Step 3. Cooperative, vectorised loads of the Q, K and V tiles.
    for name in (D.Q_LOAD, D.K_LOAD, D.V_LOAD):
        _cooperative(sch, name, config)

    # Step 4. S = Q K^T on tensor cores, the accumulator in mma fragments.
    _mma_gemm(sch, D.S_GEMM, "Q_tile", "K_tile", intrin["load_a"], intrin["load_b_trans"], config)
    sch.set_scope(D.S_GEMM, 0, "warp")
    sch.transform_layout(D.S_GEMM, ("write", 0), _fragment_map)
    sch.tensorize(sch.get_loops(sch.get_sblock(D.S_GEMM))[-3], intrin["mma_trans_b"])
    sch.tensorize(sch.get_loops(sch.get_sblock(D.S_GEMM + "_init"))[-2], intrin["fill"])

    # Step 5. The online softmax on the fragments (FlashAttention-2): element-wise stages run on
    # the fragment layout, each thread on the scores it holds; row max and row sum are reduced
    # per thread and then across the four lanes of a row; the running state, one row per thread.
    for name in (D.S_STORE, D.P_EXP, D.P_CAST):
        _on_fragments(sch, name, config)
    for name in (D.ROW_MAX, D.ROW_SUM):
        _row_reduce_on_fragments(sch, name, config)
    for name, row in ((D.INIT_M, 0), (D.INIT_L, 0), (D.RUNNING_MAX, 1), (D.ALPHA, 1), (D.L_UPDATE, 1),
                      (D.STATE_UPDATE, 1), (PARTIAL_STATE if partial else D.LSE_STORE, 0)):
        _bind_rows(sch, sch.get_loops(name)[row], config)
    if not partial:
        # the epilogue reads l_i with the store's thread mapping: a shared copy
        o_store = sch.get_sblock(D.O_STORE)
        l_copy = sch.cache_read(o_store, _read_index(sch, o_store, "l_i"), "shared.dyn")
        _bind_rows(sch, sch.get_loops(l_copy)[-1], config)

    # Step 6. acc_o lives in mma fragments for the whole K/V loop: zero-filled once, rescaled by
    # alpha in place (its thread/register layout made explicit), then acc_o += P V with P
    # taken straight from the registers the softmax left it in.
    sch.set_scope(D.INIT_O, 0, "warp")
    sch.transform_layout(D.INIT_O, ("write", 0), _fragment_map)
    (mo, _), (mi, _) = _tile16(sch, D.INIT_O, 2)
    ty, _ = sch.split(mo, factors=[config.num_warps, config.rows_per_warp // 16])
    sch.bind(ty, "threadIdx.y")
    sch.tensorize(mi, intrin["fill"])
    o_gemm, o_init = _mma_gemm(sch, D.O_GEMM, "P_tile", "V_tile", None, intrin["load_b"], config)
    # the update does not read alpha (only the init does): drop it so the mma pattern matches
    sch.unsafe_hide_buffer_access(o_gemm, "read", [_read_index(sch, o_gemm, "alpha")])
    sch.tensorize(sch.get_loops(o_gemm)[-3], intrin["mma"])
    sch.transform_block_layout(o_init, lambda i, j: I.fragment_layout(i, j))
    tx, local = sch.get_loops(o_init)[-2:]
    sch.bind(tx, "threadIdx.x")
    sch.unroll(local)

    # Step 7. Epilogue: fragments -> shared memory -> normalised by l_i -> global memory.
    _store_fragments(sch, D.O_STAGE, I.store_shared_static() if static_o else intrin["store_shared"], config)
    if partial and not static_o:
        # the O stage in dynamic shared memory: rows padded until it is larger than the K and V
        # tiles (which it would otherwise be placed in, as in the Q tile below)
        sch.storage_align(_tensorized(sch, D.O_STAGE), 0, axis=0, factor=_o_stage_row(func, config), offset=0)
    elif _o_stage_fits_in_q(func):
        # StorageRewrite would place the float32 O stage in the dead float16 Q tile, which
        # the mma store's access pointer refuses (docs/tvm-0.27.md, section 4): padded rows
        # make the stage larger than the Q tile.
        sch.storage_align(_tensorized(sch, D.O_STAGE), 0, axis=0, factor=32, offset=8)
    _cooperative(sch, PARTIAL_ACC if partial else D.O_STORE, config, vectorize=False)

    # Step 8. The K/V loads run ahead of the tile computed, asynchronously (cp.async).
    _pipeline_kv_loop(sch, config)
    return sch


def _tensorized(sch: Schedule, name: str):
    """The outer block ``tensorize`` left of block ``name`` (its annotations are the ones kept)."""
    return sch.get_sblock(name + "_o")


def _o_stage_fits_in_q(func: tirx.PrimFunc) -> bool:
    """Whether the O stage (float32, head_dim per row) fits in the Q tile's allocation (float16,
    rows padded by ``ROW_ALIGN``): at head dim 32 it does, from 64 on it does not."""
    d = int(func.params[0].ty.shape[-1])
    factor, offset = ROW_ALIGN
    return 4 * d <= 2 * (d + (offset - d) % factor)


def _head_dim(func: tirx.PrimFunc) -> int:
    return int(func.params[0].ty.shape[-1])


def _o_stage_row(func: tirx.PrimFunc, config: FlashConfig) -> int:
    """Floats a row of the O stage takes so that it is larger than a K or V allocation (float16
    rows padded by ``ROW_ALIGN``, ``kv_buffers`` tiles): a multiple of 8 of at least the head dim."""
    d = _head_dim(func)
    factor, offset = ROW_ALIGN
    kv_bytes = 2 * config.block_n * (d + (offset - d) % factor) * config.kv_buffers
    row = max(d, kv_bytes // (4 * config.block_m) + 1)
    return -(-row // 8) * 8


def _dtype(func: tirx.PrimFunc) -> str:
    """The dtype of q (the first argument): the operands' dtype, which picks the intrinsics."""
    return str(func.params[0].ty.dtype)


RULE = FusedCudaMma()
