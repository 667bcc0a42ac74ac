"""What a schedule rule is: the contract between the registry and one family of kernels.

A rule serves the specs its ``supports`` accepts (TVM's dlight rules: first match wins, in the
registry's order) and owns everything build and tune need of that family:

- ``default_config(spec)``: the hand config, a frozen dataclass of the schedule's tunables;
- ``definition(spec, tile)``: the TensorIR it schedules (the fused definition at the tile,
  (block_m, block_n) of a config, specialised to a static shape where the spec has one);
- ``apply(func, config) -> Schedule``: the schedule, applied by primitives;
- ``pass_config(spec)``: the PassContext options its kernels compile with (the same for build
  and for tuning's candidates);
- ``space(spec)``: its MetaSchedule design space (``Space``), or None where it is not tuned;
- ``prepare(spec)``: what must happen before one of its traces replays (tensor intrinsics);
- ``trace_instructions`` / ``trace_annotations`` / ``trace_intrinsics``: what a tuning log's
  trace of this rule may contain: a trace is input from a file, and replay refuses the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .. import definition as D
from ..compiler.derive import derived_attention, split_k_update
from ..definition.plain import plain_attention
from .._compat import Schedule, tirx, tvm
from ..spec import KernelSpec

#: Instructions every traced schedule holds (block and loop lookups, MetaSchedule's marker before
#: postprocessors' instructions).
COMMON_INSTRUCTIONS = frozenset({"GetSBlock", "GetLoops", "EnterPostproc"})


class ScheduleRule:
    """Base of the rules: subclasses set the class attributes and implement ``supports``,
    ``default_config`` and ``apply``. Instances are frozen dataclasses without state."""

    #: the rule's name in manifests and tuning logs
    name: ClassVar[str] = ""
    #: the frozen dataclass of the schedule's tunables
    config_type: ClassVar[type] = type(None)
    #: the scheduled module's functions, in call order
    entry: ClassVar[tuple[str, ...]] = ("main",)
    #: whether a spec of any shape also has an even build (lengths multiples of the tile: no
    #: bound checks, FlashAttention-2's ``Is_even_MN``) that ``attention`` picks where it can
    even_builds: ClassVar[bool] = False
    #: whether the rule schedules the split-K function of a spec with ``splits`` (FlashDecoding);
    #: ``rule_for`` gives split specs only to rules that say so
    split_builds: ClassVar[bool] = False
    trace_instructions: ClassVar[frozenset] = frozenset()
    trace_annotations: ClassVar[frozenset] = frozenset()
    #: the tirx pipeline its modules compile with: None, tvmflash's (``compiler.TIR_PIPELINE``,
    #: TVM's s_tir passes for scheduled TensorIR); "tirx" for a kernel written in TIRx
    tir_pipeline: ClassVar[str | None] = None

    def supports(self, spec: KernelSpec) -> bool:
        raise NotImplementedError

    def default_config(self, spec: KernelSpec):
        raise NotImplementedError

    def apply(self, func, config) -> Schedule:
        raise NotImplementedError

    def scheduled(self, spec: KernelSpec, func, config) -> tvm.IRModule:
        """The module ``build`` compiles for ``spec``: ``func`` (``definition``'s) scheduled by
        ``apply`` with ``config``. A rule whose kernel is written rather than scheduled (TIRx)
        returns that kernel here."""
        with spec.tvm_target:  # as TVM's dlight rules read it
            return self.apply(func, config).mod

    def definition(self, spec: KernelSpec, tile):
        """The TensorIR this rule schedules for ``spec`` at ``tile`` (``self.tile(config)``): by
        default Algorithm 0 derived into the online softmax tiled (block_m, block_n) (split over
        the keys where ``spec.splits`` asks: ``split_k_update``), with every extent bound for a static
        shape (bound checks fold away). A tuning workload is this function specialised to the
        measured shape, so the definition may depend on the tile only."""
        if spec.splits:  # FlashDecoding: the split-K update's function
            func = split_k_update(plain_attention(spec), *tile, spec.splits, even=spec.even, pack_gqa=True)
        else:
            func = derived_attention(spec, *tile)
        return func if spec.shape is None else D.specialize_shape(func, spec.shape_dims)

    def pass_config(self, spec: KernelSpec) -> dict:
        return {}

    def space(self, spec: KernelSpec) -> "Space | None":
        return None

    def prepare(self, spec: KernelSpec) -> None:
        """Before a trace of this rule replays (e.g. register the intrinsics it tensorizes with)."""

    def trace_intrinsics(self, spec: KernelSpec) -> frozenset:
        """Tensor intrinsics a trace of this rule may tensorize with."""
        return frozenset()

    def tile(self, config) -> tuple[int, int]:
        """(block_m, block_n): the query and key tile of the definition."""
        return int(config.block_m), int(config.block_n)

    def config_from_dict(self, d: dict):
        """The config a manifest or tuning log records (``config_dict``)."""
        fields = {f.name for f in dataclasses.fields(self.config_type)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config: {self.name} has no tunables {unknown} (expected {sorted(fields)})")
        return self.config_type(**d)

    def config_dict(self, config) -> dict:
        return dataclasses.asdict(config)

    def has_even_build(self, spec: KernelSpec) -> bool:
        """Whether ``spec`` (an any-length build) also has an even build (not with per-sequence
        key counts or packed sequences: those are runtime values, so no length is known to be a
        tile multiple)."""
        return (self.even_builds and spec.shape is None and not spec.even and not spec.seqused_k
                and not spec.varlen)

    def build_at(self, spec: KernelSpec, tile, seq_q: int, seq_k: int) -> KernelSpec:
        """The build of ``spec`` that runs lengths (seq_q, seq_k) with ``tile``: the even one
        where ``spec`` has it and the tile divides both lengths, else ``spec``."""
        return spec.replace(even=True) if self.has_even_build(spec) and tile_divides(tile, seq_q, seq_k) else spec

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


class StandardRule(ScheduleRule):
    """A rule of the standard algorithm: the three functions of ``definition.standard_attention``
    (S and P in global memory), no tile, not tuned."""

    entry: ClassVar[tuple[str, ...]] = (D.STD_QK, D.STD_SOFTMAX, D.STD_PV)

    def tile(self, config):
        return None

    def definition(self, spec: KernelSpec, tile):
        return D.standard_attention(spec)


def tile_divides(tile, seq_q: int, seq_k: int) -> bool:
    """Whether both lengths are multiples of the tile (block_m, block_n): an even build runs them."""
    return tile is not None and seq_q % tile[0] == 0 and seq_k % tile[1] == 0


@dataclass(frozen=True)
class Space:
    """The design space of one rule, for one spec.

    The tile (block_m, block_n) is part of the TensorIR definition (the online-softmax loop runs
    over K/V tiles of ``block_n`` keys for a query tile of ``block_m`` rows), so each candidate
    tile is a tuning *task* of its own. Inside a task the other knobs are searched in one of two
    ways:

    - traced (``apply`` given): the schedule applies in place to MetaSchedule's schedule and its
      knobs only reach primitives as arguments; each knob is ``sch.sample_categorical`` over its
      candidates, the trace records the decision, MetaSchedule mutates and replays it;
    - enumerated: the schedule builds its own Schedule from the function, so no random variable
      of MetaSchedule's schedule can reach it; every combination of knob values becomes a design
      space of its own, and MetaSchedule picks among them.

    (A knob sampled with ``sample_categorical`` whose *value* is read back in Python and passed on
    as a plain int would not do: the trace would hold the value used the first time.) Either way
    tuned and hand-config builds run the same schedule: the hand config is one point of the space.

    name:      the rule.
    tiles:     candidate (block_m, block_n): one tuning task each.
    knobs:     (block_m, block_n) -> {config field: candidate values} for the other knobs.
    config:    (block_m, block_n, **knob values) -> the rule's config.
    schedule:  (func, config) -> Schedule: the rule's ``apply`` (enumerated knobs).
    apply:     (sch, config) -> None, in place; given: knobs are traced.
    postprocs: () -> fresh MetaSchedule postprocessors for one task.
    target:    the build target -> the target the postprocessors check candidates against.
    """

    name: str
    tiles: tuple[tuple[int, int], ...]
    knobs: Callable[[int, int], dict[str, tuple]]
    config: Callable[..., Any]
    schedule: Callable[[tirx.PrimFunc, Any], Any]
    apply: Callable[[Any, Any], None] | None = None
    postprocs: Callable[[], list] = field(default=lambda: [])
    target: Callable[[Any], Any] = field(default=lambda t: t)

    def sch_fn(self, tile: tuple[int, int]) -> Callable:
        """The ``ms.space_generator.ScheduleFn`` function of the task of ``tile``."""
        bm, bn = tile
        knobs = self.knobs(bm, bn)
        if self.apply is not None:

            def sample(sch):
                values = {}
                for name, candidates in knobs.items():
                    values[name] = sch.sample_categorical(
                        candidates=list(candidates), probs=[1.0 / len(candidates)] * len(candidates)
                    )
                self.apply(sch, self.config(bm, bn, **values))

            return sample

        def enumerate_spaces(sch):
            func = sch.mod["main"]
            return [self.schedule(func, config) for config in self.configs(tile)]

        return enumerate_spaces

    def configs(self, tile: tuple[int, int]) -> list:
        """Every config of one task, each once (knob values that a config ignores, such as the
        K/V buffer count of a kernel with no pipeline, give the same config)."""
        knobs = self.knobs(*tile)
        names = list(knobs)
        configs = []
        for values in itertools.product(*(knobs[n] for n in names)):
            config = self.config(*tile, **dict(zip(names, values)))
            if config not in configs:
                configs.append(config)
        return configs

    def size(self, tile: tuple[int, int]) -> int:
        """Distinct schedules of one task."""
        if self.apply is not None:  # traced knobs: every combination of decisions
            return math.prod(len(v) for v in self.knobs(*tile).values())
        return len(self.configs(tile))


#: Shared memory one thread block may opt in to (dynamic shared memory), per CUDA arch. TVM's
#: target tags give the 48 KB static limit, which VerifyGPUCode would hold every tensor-core
#: candidate (hand config included) to.
SHARED_MEMORY_OPT_IN = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448,
                        "sm_90a": 232448}


def dynamic_shared_memory_target(target):
    """``target`` with the arch's opt-in shared memory per block (``SHARED_MEMORY_OPT_IN``)."""
    arch = str(target.attrs["arch"])
    limit = SHARED_MEMORY_OPT_IN.get(arch)
    if limit is None:
        return target
    attrs = dict(target.export())
    attrs["max_shared_memory_per_block"] = limit
    return tvm.target.Target(attrs)


def bind_grid(sch: Schedule):
    """One thread block per (query tile, head, batch) on a 3-D grid (blockIdx.x, .y, .z), as
    FlashAttention-2 launches: each block reads its coordinates directly, where one fused
    blockIdx.x over symbolic extents would cost integer divisions in every address. Batch and
    heads are then capped at 65535 (``runtime.kernel.GRID_YZ_MAX``, checked at call time)."""
    b, h, qb = sch.get_loops(D.TILE)
    sch.bind(qb, "blockIdx.x")
    sch.bind(h, "blockIdx.y")
    sch.bind(b, "blockIdx.z")
