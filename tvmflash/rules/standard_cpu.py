"""The standard attention (S and P through global memory) on the CPU: the three functions of
``definition.standard_attention``, each with parallel outer loops and vectorised inner loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import definition as D
from .._compat import Schedule
from ..spec import KernelSpec
from .base import StandardRule
from .fused_cpu import vectorize_inner


@dataclass(frozen=True)
class StandardCpuConfig:
    vec: int = 16  # lanes of the vectorised P V loop


@dataclass(frozen=True)
class StandardCpu(StandardRule):
    """Algorithm 0 on the CPU: one schedule per function, none tuned."""

    name: ClassVar[str] = "standard_cpu"
    config_type: ClassVar[type] = StandardCpuConfig

    def supports(self, spec: KernelSpec) -> bool:
        return spec.algorithm == "standard" and spec.tvm_target.kind.name == "llvm"

    def default_config(self, spec: KernelSpec) -> StandardCpuConfig:
        return StandardCpuConfig()

    def apply(self, mod, config: StandardCpuConfig) -> Schedule:
        """A Schedule of the module of the three scheduled functions."""
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
                vectorize_inner(sch, pv, config.vec)
                sch.decompose_reduction(pv, j)
                b, i, h, d = sch.get_loops(D.STD_O_CAST)
                sch.parallel(sch.fuse(b, i))
            out[name] = sch.mod["main"]
        return Schedule(type(mod)(out))


RULE = StandardCpu()
