"""Which rule, config and record build a spec: decided once, here, before anything is built.

``plan(spec)`` reads the registry (``rules.rule_for``) and the tuning log's ``tuning.json``
(``records.best_entry``) and nothing else: no database, no compile. ``lower`` builds what the
plan says, so the tile a plan names is the tile of the kernel built. ``build_for`` is the choice
``attention`` makes per call between a spec's any-length build and its even build.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import rules
from ..rules import ScheduleRule
from ..rules.base import tile_divides
from ..spec import KernelSpec
from ..tuning import records


@dataclass(frozen=True)
class Plan:
    """What builds ``spec``: ``rule`` with ``config``, from a tuning log (``entry``) or the
    rule's hand config (``why``: why no log serves it)."""

    spec: KernelSpec
    rule: ScheduleRule
    config: object
    source: str  # "tuned record", "hand config" (or "given config": ``lower(spec, config)``)
    why: str = ""
    entry: records.Entry | None = None

    @property
    def tile(self) -> tuple[int, int] | None:
        return self.rule.tile(self.config)


def plan(spec: KernelSpec) -> Plan:
    """The plan of ``spec``, made once per spec, tuning log (root and modification time) and
    registry state: ``attention`` asks on every call."""
    root = records.logs_root()
    return _plan(spec, None if root is None else str(root), records.log_stamp(spec), rules.generation())


@functools.lru_cache(maxsize=None)
def _plan(spec: KernelSpec, logs: str | None, stamp: tuple, generation: int) -> Plan:
    rule = rules.rule_for(spec)
    if rule.space(spec) is None:
        return Plan(spec, rule, rule.default_config(spec), "hand config")
    if spec.shape is not None:  # tuning logs hold dynamic-shape workloads
        return Plan(spec, rule, rule.default_config(spec), "hand config",
                    "static shape: tuning logs are for dynamic shapes")
    entry, why = records.best_entry(spec, rule)
    if entry is None:
        return Plan(spec, rule, rule.default_config(spec), "hand config", why)
    return Plan(spec, rule, rule.config_from_dict(entry.config), "tuned record", entry=entry)


def build_for(spec: KernelSpec, seq_q: int, seq_k: int) -> KernelSpec:
    """The build of ``spec`` that runs lengths (seq_q, seq_k): its even build where the rule has
    one and the even build's planned tile divides both lengths, else ``spec`` itself. (Before any
    kernel is built: lengths the tile does not divide never build the even one.)"""
    if seq_q <= 0 or seq_k <= 0:
        return spec
    even = _even_of(spec, rules.generation())
    return even if even is not None and tile_divides(plan(even).tile, seq_q, seq_k) else spec


@functools.lru_cache(maxsize=1024)
def _even_of(spec: KernelSpec, generation: int) -> KernelSpec | None:
    """``spec``'s even build (``rule.build_at``'s), or None where its rule has none; once per spec
    and registry state."""
    return spec.replace(even=True) if rules.rule_for(spec).has_even_build(spec) else None
