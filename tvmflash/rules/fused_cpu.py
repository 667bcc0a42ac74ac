"""CPU (llvm) schedule of the fused TensorIR: parallel over tiles, vectorised inner loops.

A real schedule, not the default lowering: it lets users without a GPU run tvmflash and lets CI
prove the algorithm's numerics on the same TensorIR the GPU schedule transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import definition as D
from .._compat import Schedule, tirx
from ..compiler.derive import COMBINE_ACC, PARTIAL_ACC, SPLIT_COMBINE
from ..spec import KernelSpec
from .base import COMMON_INSTRUCTIONS, ScheduleRule, Space


@dataclass(frozen=True)
class CpuConfig:
    """Tile sizes and knobs of the CPU schedule.

    block_m, block_n: the query / key tile (baked into the TensorIR definition).
    vec:    lanes of the innermost vectorised loops.
    unroll: ``pragma_auto_unroll_max_step`` of each parallel task (0: leave unrolling to LLVM).
    grain:  consecutive query tiles per parallel task (neighbours share K/V in cache).

    The knobs (vec, unroll, grain) may also be random variables of ``sch.sample_categorical``
    (MetaSchedule tuning, ``FusedCpu.space``): they only ever reach schedule primitives as
    arguments, so a tuning trace replays them.
    """

    block_m: int = 32
    block_n: int = 64
    vec: int = 16
    unroll: int = 0
    grain: int = 1


def vectorize_inner(sch: Schedule, block, lanes) -> None:
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


def apply_in_place(sch: Schedule, config: CpuConfig) -> None:
    """The fused CPU schedule, applied in place to ``sch`` (a Schedule of
    ``definition.fused_attention(spec, config.block_m, config.block_n)``)."""
    # Step 1. Parallel tasks of ``grain`` consecutive (batch, head, query tile)s.
    # (batch, head, query tile), and the key chunk of a split-K function (``KernelSpec.splits``)
    tile_loops = sch.get_loops(D.TILE)
    split = len(tile_loops) == 4
    task, _ = sch.split(sch.fuse(*tile_loops), factors=[None, config.grain])
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
    vectorize_inner(sch, s_gemm, config.vec)  # before decompose: vectorize wants a reduction block
    sch.decompose_reduction(s_gemm, d)

    # Step 4. acc_o = alpha * acc_o + P V: key loop outside, head_dim loop innermost, vectorised.
    o_gemm = sch.get_sblock(D.O_GEMM)
    i, d, j = sch.get_loops(o_gemm)[-3:]
    sch.reorder(i, j, d)
    vectorize_inner(sch, o_gemm, config.vec)
    # (No decompose_reduction: init_o also writes acc_o, so the tile holds two writers of it and
    # the primitive refuses; the rescale stays behind `if j == 0`, hoisted by LLVM.)

    # Step 5. Element-wise stages over head_dim or keys: vectorise the inner loop.
    for name in (D.Q_LOAD, D.V_LOAD, D.INIT_O, D.O_STAGE, PARTIAL_ACC if split else D.O_STORE, D.S_STORE, D.P_EXP,
                 D.P_CAST):
        vectorize_inner(sch, name, config.vec)
    if split:
        # the combine: parallel over (batch, head, query row)
        for name in (COMBINE_ACC, SPLIT_COMBINE):
            loops = sch.get_loops(name)
            sch.parallel(sch.fuse(*loops[:3]))



def _knobs(d: int):
    def knobs(bm: int, bn: int) -> dict:
        # every vectorised loop runs over head_dim or block_n: offer lane counts dividing both
        lanes = tuple(v for v in (4, 8, 16, 32) if v <= min(bn, d) and min(bn, d) % v == 0)
        return {"vec": lanes, "unroll": (0, 16, 64), "grain": (1, 2, 4)}

    return knobs


@dataclass(frozen=True)
class FusedCpu(ScheduleRule):
    """The fused kernel on the CPU (llvm): parallel tiles, vectorised inner loops."""

    name: ClassVar[str] = "fused_cpu"
    split_builds: ClassVar[bool] = True
    config_type: ClassVar[type] = CpuConfig
    trace_instructions: ClassVar[frozenset] = COMMON_INSTRUCTIONS | {
        "Annotate", "DecomposeReduction", "Fuse", "Parallel", "Reorder", "SampleCategorical", "Split",
        "TransformLayout", "Vectorize"}
    trace_annotations: ClassVar[frozenset] = frozenset({"pragma_auto_unroll_max_step"})

    def supports(self, spec: KernelSpec) -> bool:
        return spec.algorithm == "fused" and spec.tvm_target.kind.name == "llvm"

    def default_config(self, spec: KernelSpec) -> CpuConfig:
        return CpuConfig(block_m=32, block_n=64 if spec.head_dim <= 128 else 32)

    def apply(self, func: tirx.PrimFunc, config: CpuConfig) -> Schedule:
        sch = Schedule(func)
        apply_in_place(sch, config)
        return sch

    def space(self, spec: KernelSpec) -> Space:
        return Space(
            name=self.name,
            tiles=tuple((bm, bn) for bm in (16, 32, 64) for bn in (32, 64, 128)),
            knobs=_knobs(spec.head_dim),
            config=lambda bm, bn, **kw: CpuConfig(block_m=bm, block_n=bn, **kw),
            schedule=self.apply,
            apply=apply_in_place,
        )


RULE = FusedCpu()
