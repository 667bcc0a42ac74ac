"""The standard attention (S and P through global memory) on CUDA: TVM's stock dlight rules.

Each of the three functions of ``definition.standard_attention`` gets the first of TVM's stock
GPU rules that schedules it (``Matmul`` for Q K^T; ``Fallback`` for the softmax and P V): the
honest baseline of what TVM does for attention without fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._compat import Schedule, tvm
from ..spec import KernelSpec
from .base import StandardRule


@dataclass(frozen=True)
class DlightConfig:
    rules: tuple = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")  # tried in order


@dataclass(frozen=True)
class StandardCuda(StandardRule):
    """Algorithm 0 on CUDA, scheduled by ``s_tir.dlight``; not tuned."""

    name: ClassVar[str] = "standard_cuda"
    config_type: ClassVar[type] = DlightConfig

    def supports(self, spec: KernelSpec) -> bool:
        return spec.algorithm == "standard" and spec.is_cuda

    def default_config(self, spec: KernelSpec) -> DlightConfig:
        return DlightConfig()

    def config_from_dict(self, d: dict) -> DlightConfig:
        return DlightConfig(rules=tuple(d.get("rules", DlightConfig.rules)))

    def apply(self, mod: tvm.IRModule, config: DlightConfig) -> Schedule:
        """A Schedule of the module whose functions each got the first stock rule that
        schedules them; the target is the one current (``with target:``, as dlight reads it)."""
        from tvm.s_tir import dlight as dl

        target = tvm.target.Target.current(allow_none=False)
        out = {}
        for gv, func in mod.functions.items():
            single = tvm.IRModule({gv.name_hint: func})
            for rule_name in config.rules:
                try:
                    with target:
                        scheduled = dl.ApplyDefaultSchedule(getattr(dl.gpu, rule_name)())(single)
                except Exception:  # a stock rule that matches but cannot finish: try the next one
                    continue
                f = scheduled[gv.name_hint]
                if f.attrs is not None and "tirx.is_scheduled" in f.attrs:
                    out[gv.name_hint] = f
                    break
            else:  # pragma: no cover - Fallback schedules every function
                raise RuntimeError(f"no dlight rule scheduled {gv.name_hint}")
        return Schedule(tvm.IRModule(out))


RULE = StandardCuda()
