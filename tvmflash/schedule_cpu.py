"""CPU (llvm) schedule of the fused TensorIR: parallel over tiles, vectorised inner loops.

A real schedule, not the default lowering: it lets users without a GPU run tvmflash and lets CI
prove the algorithm's numerics on the same TensorIR the GPU schedule transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import definition as D
from ._compat import Schedule, tirx


@dataclass(frozen=True)
class CpuConfig:
    """Tile sizes and knobs of the CPU schedule.

    block_m, block_n: the query / key tile (baked into the TensorIR definition).
    vec:    lanes of the innermost vectorised loops.
    unroll: ``pragma_auto_unroll_max_step`` of each parallel task (0: leave unrolling to LLVM).
    grain:  consecutive query tiles per parallel task (neighbours share K/V in cache).

    The knobs (vec, unroll, grain) may also be random variables of ``sch.sample_categorical``
    (MetaSchedule tuning, ``tvmflash.space``): they only ever reach schedule primitives as
    arguments, so a tuning trace replays them.
    """

    block_m: int = 32
    block_n: int = 64
    vec: int = 16
    unroll: int = 0
    grain: int = 1


def default_cpu_config(head_dim: int) -> CpuConfig:
    return CpuConfig(block_m=32, block_n=64 if head_dim <= 128 else 32)


def _vectorize_inner(sch: Schedule, block, lanes) -> None:
    """Split the innermost loop of ``block`` (a name or handle) by ``lanes`` (when it divides)
    and vectorise it. ``lanes`` may be a sampled random variable: the design space offers only
    lane counts that divide every vectorised extent, so both take the same steps."""
    loop = sch.get_loops(block)[-1]
    if isinstance(lanes, int):
        extent = sch.get(loop).extent
        if not (isinstance(extent, tirx.IntImm) and extent.value % lanes == 0):
            sch.vectorize(loop)
            return
    _, loop = sch.split(loop, factors=[None, lanes])
    sch.vectorize(loop)


def schedule_fused_cpu(func: tirx.PrimFunc, config: CpuConfig) -> Schedule:
    sch = Schedule(func)
    apply_fused_cpu(sch, config)
    return sch


def apply_fused_cpu(sch: Schedule, config: CpuConfig) -> None:
    """The fused CPU schedule, applied in place to ``sch`` (a Schedule of
    ``definition.fused_attention(spec, config.block_m, config.block_n)``)."""
    # Step 1. Parallel tasks of ``grain`` consecutive (batch, head, query tile)s.
    b, h, qb = sch.get_loops(D.TILE)
    task, _ = sch.split(sch.fuse(b, h, qb), factors=[None, config.grain])
    sch.parallel(task)
    sch.annotate(task, "pragma_auto_unroll_max_step", config.unroll)

    # Step 2. (S_store stays a separate copy: the K/V loop carries m_i and l_i, so the tile is
    # not a stage pipeline and compute_inline refuses to inline it.)

    # Step 3. S = Q K^T: store K_tile transposed ([head_dim, block_n]) so the key loop is
    # contiguous, then accumulate over head_dim with the key loop innermost and vectorised.
    sch.transform_layout(D.K_LOAD, ("write", 0), lambda j, d: (d, j))
    s_gemm = sch.get_sblock(D.S_GEMM)
    i, j, d = sch.get_loops(s_gemm)[-3:]
    sch.reorder(i, d, j)
    _vectorize_inner(sch, s_gemm, config.vec)  # before decompose: vectorize wants a reduction block
    sch.decompose_reduction(s_gemm, d)

    # Step 4. acc_o = alpha * acc_o + P V: key loop outside, head_dim loop innermost, vectorised.
    o_gemm = sch.get_sblock(D.O_GEMM)
    i, d, j = sch.get_loops(o_gemm)[-3:]
    sch.reorder(i, j, d)
    _vectorize_inner(sch, o_gemm, config.vec)
    # (No decompose_reduction: init_o also writes acc_o, so the tile holds two writers of it and
    # the primitive refuses; the rescale stays behind `if j == 0`, hoisted by LLVM.)

    # Step 5. Element-wise stages over head_dim or keys: vectorise the inner loop.
    for name in (D.Q_LOAD, D.V_LOAD, D.INIT_O, D.O_STAGE, D.O_STORE, D.S_STORE, D.P_EXP, D.P_CAST):
        _vectorize_inner(sch, name, config.vec)


def schedule_standard_cpu(mod, config: CpuConfig):
    """Schedule the three functions of the standard algorithm: parallel outer loops,
    vectorised inner loops. Returns the scheduled IRModule."""
    out = {}
    for gv, func in mod.functions.items():
        name = gv.name_hint
        sch = Schedule(func)
        if name == D.STD_QK:
            b, h, i, j, d = sch.get_loops(D.STD_QK)
            sch.parallel(sch.fuse(b, h))
            sch.decompose_reduction(D.STD_QK, d)
        elif name == D.STD_SOFTMAX:
            for blk in (D.STD_ROW_MAX, D.STD_ROW_SUM, D.STD_P, D.STD_LSE):
                b, h = sch.get_loops(blk)[:2]
                sch.parallel(sch.fuse(b, h))
        else:
            pv = sch.get_sblock(D.STD_PV)
            b, i, h, d, j = sch.get_loops(pv)
            sch.reorder(b, i, h, j, d)
            sch.parallel(sch.fuse(b, i))
            _vectorize_inner(sch, pv, config.vec)
            sch.decompose_reduction(pv, j)
            b, i, h, d = sch.get_loops(D.STD_O_CAST)
            sch.parallel(sch.fuse(b, i))
        out[name] = sch.mod["main"]
    return type(mod)(out)
