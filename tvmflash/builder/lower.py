"""Spec -> scheduled TensorIR: the plan (``plan``) carried out.

``lower(spec)`` takes the plan's rule and config, builds the rule's TensorIR definition, and
schedules it: by replaying the tuning log's trace (checked first, ``records.check_trace``) or by
the rule's own ``apply``. A trace that no longer replays on the current definition gives way to
the record's own config under the rule's schedule, and the manifest says so; the hand config is
used only where no log serves the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._compat import tvm
from ..compiler import compile_module
from ..spec import KernelSpec
from ..tuning import records
from .plan import Plan, plan


@dataclass
class Lowered:
    """A scheduled IRModule plus what produced it (recorded in the manifest)."""

    spec: KernelSpec
    mod: tvm.IRModule  # scheduled
    before: tvm.IRModule  # the TensorIR as defined, before scheduling
    rule: str  # the schedule rule's name
    config: dict = field(default_factory=dict)
    entry: tuple = ("main",)  # the module's functions, in call order
    pass_config: dict = field(default_factory=dict)  # PassContext options the rule's kernels need
    tuning: dict = field(default_factory=dict)  # tuned record used, or why none (manifest)
    tir_pipeline: str | None = None  # the rule's (None: tvmflash's, for scheduled TensorIR)


def lower(spec: KernelSpec, config=None) -> Lowered:
    """The scheduled TensorIR for ``spec``: as planned (``plan``), or with ``config`` (a config
    of the spec's rule, or a dict of one) under the rule's own schedule."""
    p = plan(spec)
    if config is not None:
        config = p.rule.config_from_dict(config) if isinstance(config, dict) else config
        if not isinstance(config, p.rule.config_type):
            raise TypeError(f"config: expected a {p.rule.config_type.__name__} (rule {p.rule.name}), got "
                            f"{type(config).__name__}")
        p = Plan(spec, p.rule, config, "given config")
    rule = p.rule
    before = rule.definition(spec, p.tile)
    mod, tuning = None, {}
    if p.source == "tuned record":
        where = f"the record of tile {p.entry.tile[0]}x{p.entry.tile[1]} in {p.entry.vdir}"
        try:
            tuned = records.load_record(spec, rule, p.entry)
            mod = records.replay(rule, spec, tuned.record.trace, before, where).mod
            tuning = tuned.describe()
        except records.UntrustedTrace:
            raise
        except Exception as err:  # noqa: BLE001 - a stale log: its config, said so
            tuning = {"source": "tuned config",
                      "tuning": f"{where} does not replay ({type(err).__name__}: {records.first_line(err)}); its "
                                f"config is scheduled by rule {rule.name} instead",
                      "database": str(p.entry.vdir)}
    if mod is None:
        mod = rule.scheduled(spec, before, p.config)
        if not tuning:
            tuning = {"source": p.source, **({"tuning": p.why} if p.why else {})}
    if isinstance(before, tvm.tirx.PrimFunc):
        before = tvm.IRModule({"main": before})
    return Lowered(spec, mod, before, rule.name, rule.config_dict(p.config), tuple(rule.entry),
                   dict(rule.pass_config(spec)), tuning, rule.tir_pipeline)


def compile_lowered(lowered: Lowered):
    """``compiler.compile_module`` of the scheduled module, with the rule's pass config and
    pipeline."""
    return compile_module(lowered.mod, lowered.spec.tvm_target, lowered.pass_config, lowered.tir_pipeline)
