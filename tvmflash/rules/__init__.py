"""The schedule rules, in order: ``rule_for(spec)`` returns the first that supports a spec.

As TVM's dlight (``ApplyDefaultSchedule(Matmul(), GEMV(), ..., Fallback())``): specific rules
first, the general ones after. Each rule is one file exporting ``RULE``; a new kernel (decode, a
Hopper kernel, a head dim) is a new file and a line here. ``register`` adds a rule at run time
(first, unless ``before`` names another), for plugins and tests.

    fused_hopper      fused, sm_90a (H100, H200): TMA, mbarriers, wgmma, warp specialization,
                      written in TIRx (head dims 64 and 128, no variants)
    decode_cuda_mma   fused split over the keys (FlashDecoding, ``KernelSpec.splits``), CUDA,
                      tensor cores
    fused_cuda_mma    fused, CUDA, tensor cores (head dims 32, 64, 96, 128, 256)
    fused_cuda_plain  fused, CUDA, one thread per query row (what no tensor-core rule serves)
    fused_cpu         fused (and split over the keys), llvm
    standard_cuda     standard (S and P in memory), CUDA: TVM's stock dlight rules
    standard_cpu      standard, llvm
"""

from __future__ import annotations

import threading

from ..spec import KernelSpec
from . import decode_cuda_mma, fused_cpu, fused_cuda_mma, fused_cuda_plain, fused_hopper, standard_cpu, standard_cuda
from .base import ScheduleRule, Space

__all__ = ["RULES", "ScheduleRule", "Space", "generation", "register", "rule_for", "rule_named", "unregister"]

#: The registry, first match wins.
RULES: list[ScheduleRule] = [
    fused_hopper.RULE,
    decode_cuda_mma.RULE,
    fused_cuda_mma.RULE,
    fused_cuda_plain.RULE,
    fused_cpu.RULE,
    standard_cuda.RULE,
    standard_cpu.RULE,
]

_lock = threading.Lock()
_generation = [0]  # changes with every register / unregister (caches of a rule's choice key on it)


def generation() -> int:
    """A number that changes whenever the registry does."""
    return _generation[0]


def rule_for(spec: KernelSpec) -> ScheduleRule:
    """The first rule of ``RULES`` that supports ``spec``; NotImplementedError if none does."""
    for rule in list(RULES):
        if (rule.split_builds or not spec.splits) and rule.supports(spec):
            return rule
    raise NotImplementedError(
        f"spec: no schedule rule supports {spec.key} (algorithm {spec.algorithm!r}, target {spec.target!r}, "
        f"head_dim {spec.head_dim}, {spec.dtype}); rules: {[r.name for r in RULES]}")


def rule_named(name: str) -> ScheduleRule:
    """The registered rule called ``name`` (as manifests and tuning logs record it)."""
    for rule in list(RULES):
        if rule.name == name:
            return rule
    raise KeyError(f"rule: expected one of {[r.name for r in RULES]}, got {name!r}")


def register(rule: ScheduleRule, *, before: str | None = None) -> ScheduleRule:
    """Add ``rule`` to the registry: first (it wins over every rule that supports the same
    specs), or right before the rule named ``before``. Returns ``rule``."""
    if not isinstance(rule, ScheduleRule) or not rule.name:
        raise TypeError(f"rule: expected a named ScheduleRule, got {rule!r}")
    with _lock:
        if any(r.name == rule.name for r in RULES):
            raise ValueError(f"rule: a rule named {rule.name!r} is registered already")
        at = 0 if before is None else [r.name for r in RULES].index(rule_named(before).name)
        RULES.insert(at, rule)
        _generation[0] += 1
    return rule


def unregister(rule: ScheduleRule | str) -> None:
    """Remove a rule (or the rule of that name) from the registry."""
    name = rule if isinstance(rule, str) else rule.name
    with _lock:
        RULES[:] = [r for r in RULES if r.name != name]
        _generation[0] += 1
