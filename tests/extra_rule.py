"""A schedule rule in one file, as a new kernel family would add one (``test_architecture``).

It claims causal CPU kernels of head dim 64 and schedules the fused definition its own way:
small query tiles, a parallel loop over them, element-wise loops vectorised; a design
space over the tile and the vector width for ``tvmflash tune``.
"""

from dataclasses import dataclass
from typing import ClassVar

from tvmflash import definition as D
from tvmflash._compat import Schedule
from tvmflash.rules.base import COMMON_INSTRUCTIONS, ScheduleRule, Space


@dataclass(frozen=True)
class SmallTileConfig:
    block_m: int = 16
    block_n: int = 32
    vec: int = 8


def _in_place(sch, config) -> None:
    b, h, qb = sch.get_loops(D.TILE)
    sch.parallel(sch.fuse(b, h, qb))
    for name in (D.Q_LOAD, D.S_STORE, D.P_EXP):
        _, loop = sch.split(sch.get_loops(name)[-1], factors=[None, config.vec])
        sch.vectorize(loop)


@dataclass(frozen=True)
class SmallTileCpu(ScheduleRule):
    name: ClassVar[str] = "test_small_tile_cpu"
    config_type: ClassVar[type] = SmallTileConfig
    trace_instructions: ClassVar[frozenset] = COMMON_INSTRUCTIONS | {"Fuse", "Parallel", "SampleCategorical",
                                                                     "Split", "Vectorize"}

    def supports(self, spec) -> bool:
        return (spec.algorithm == "fused" and spec.tvm_target.kind.name == "llvm" and spec.head_dim == 64
                and spec.causal)

    def default_config(self, spec) -> SmallTileConfig:
        return SmallTileConfig()

    def apply(self, func, config) -> Schedule:
        sch = Schedule(func)
        _in_place(sch, config)
        return sch

    def space(self, spec) -> Space:
        return Space(name=self.name, tiles=((16, 32), (32, 32)), knobs=lambda bm, bn: {"vec": (4, 8)},
                     config=lambda bm, bn, **kw: SmallTileConfig(bm, bn, **kw), schedule=self.apply,
                     apply=_in_place)


RULE = SmallTileCpu()
