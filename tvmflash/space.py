"""The design spaces MetaSchedule searches: one entry per schedule function, all knobs in one place.

The tile shape (block_m, block_n) is part of the TensorIR definition (the online-softmax loop
runs over K/V tiles of ``block_n`` keys for a query tile of ``block_m`` rows), so it cannot be a
sampled knob of one schedule: each candidate tile is a tuning *task* of its own, a workload
``definition.fused_attention(spec, block_m, block_n)``. Inside a task the schedule function's
other knobs are searched, in one of two ways:

- traced: the schedule can be applied in place to MetaSchedule's schedule (``apply``), and its
  knobs only reach schedule primitives as arguments. Each knob is then ``sch.sample_categorical``
  over its candidates and the random variable goes into the config: the trace records the
  decision, MetaSchedule mutates it and replays the schedule (``schedule_cpu``);
- enumerated: the schedule function builds its own Schedule from the function
  (``schedule_cuda.schedule_fused_cuda``), so no random variable of MetaSchedule's schedule can
  reach it. Every combination of knob values becomes a design space of its own (the schedule
  function called with a plain config); MetaSchedule picks among them.

(A knob sampled with ``sample_categorical`` whose *value* is read back in Python and passed on as
a plain int would not do: the trace would hold the value used the first time, so a mutated
decision replays the same schedule and the record names a decision that was never applied.)

Either way tuned and hand-config builds run the same schedule function: the hand config is one
point of the space (``tests/test_tune.py`` checks that).

Measuring needs a workload with concrete shapes (MetaSchedule allocates its arguments from the
buffer shapes, and has no way to pass the float ``sm_scale``): ``workload`` specialises the
dynamic-shape function to the measured shape and scale. The schedules never read a shape (split
factors are tile sizes or ``None``), so a trace found on the specialised function replays on the
dynamic one that ``build`` compiles.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from . import definition as D
from ._compat import tirx, tvm
from .spec import KernelSpec

#: Names of the buffer shape variables of ``definition.fused_attention`` (matched from q, k, v).
SHAPE_VARS = ("batch", "seq_q", "seq_k", "heads", "heads_kv")


@dataclass(frozen=True)
class Shape:
    """The problem size a tuning run measures (the built kernel stays dynamic)."""

    batch: int
    seq_q: int
    seq_k: int
    heads: int
    heads_kv: int

    def __post_init__(self):
        for name in SHAPE_VARS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.heads % self.heads_kv:
            raise ValueError(f"heads: expected a multiple of heads_kv = {self.heads_kv}, got {self.heads}")

    def flops(self, spec: KernelSpec) -> float:
        """4 * batch * heads * seq_q * seq_k * head_dim, halved for causal (FlashAttention's count)."""
        f = 4.0 * self.batch * self.heads * self.seq_q * self.seq_k * spec.head_dim
        return f / 2 if spec.causal else f

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in SHAPE_VARS}


def default_shape(spec: KernelSpec, seqlen: int | None = None, batch: int | None = None,
                  heads: int | None = None) -> Shape:
    """The measured shape: on GPUs batch * seqlen = 16384 tokens and 16 heads (as ``tvmflash
    bench``), on the CPU 1024 tokens and 4 heads; seqlen_q = seqlen_k."""
    gpu = spec.is_cuda
    seqlen = seqlen or (4096 if gpu else 256)
    heads = heads or (16 if gpu else 4)
    batch = batch or max(1, (16384 if gpu else 1024) // seqlen)
    if heads % spec.group:
        raise ValueError(f"heads: expected a multiple of the GQA group {spec.group}, got {heads}")
    return Shape(batch, seqlen, seqlen, heads, heads // spec.group)


def softmax_scale(spec: KernelSpec) -> float:
    """The scale the workload is specialised with (the default, 1/sqrt(head_dim))."""
    return 1.0 / math.sqrt(spec.head_dim)


def specialise(func: tirx.PrimFunc, shape: Shape, scale: float) -> tirx.PrimFunc:
    """``func`` with every buffer shape variable and ``sm_scale`` bound: the form MetaSchedule
    can measure (its argument allocation reads concrete buffer shapes, and it passes no scalars)."""
    binding = D.shape_binding(func, shape.to_dict())
    for param in func.params:
        if param.name == "sm_scale":
            binding[param] = tirx.const(scale, "float32")
    return func.specialize(binding)


def workload(spec: KernelSpec, tile: tuple[int, int], shape: Shape, scale: float | None = None) -> tvm.IRModule:
    """The tuning task of one tile shape: the fused function specialised to ``shape`` and
    ``scale`` (default 1/sqrt(head_dim)), as MetaSchedule normalises a PrimFunc (a ``main``
    with a global symbol)."""
    scale = softmax_scale(spec) if scale is None else scale
    func = specialise(D.fused_attention(spec, *tile), shape, scale)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


@dataclass(frozen=True)
class Space:
    """The design space of one schedule function, for one spec.

    name:     the schedule function, as ``build`` names it in the manifest.
    tiles:    candidate (block_m, block_n): one tuning task each.
    knobs:    (block_m, block_n) -> {config field: candidate values} for the other knobs.
    config:   (block_m, block_n, **knob values) -> the schedule's config dataclass.
    schedule: (func, config) -> Schedule: the hand-config entry point (enumerated knobs).
    apply:    (sch, config) -> None, in place; given: knobs are traced (``sample_categorical``).
    postprocs: () -> fresh MetaSchedule postprocessors for one task.
    prepare:  () -> None, before a trace of this schedule replays (e.g. register tensor
              intrinsics that ``tensorize`` instructions name).
    target:   the build target -> the target the postprocessors check candidates against.
    """

    name: str
    tiles: tuple[tuple[int, int], ...]
    knobs: Callable[[int, int], dict[str, tuple]]
    config: Callable[..., Any]
    schedule: Callable[[tirx.PrimFunc, Any], Any]
    apply: Callable[[Any, Any], None] | None = None
    postprocs: Callable[[], list] = field(default=lambda: [])
    prepare: Callable[[], None] = field(default=lambda: None)
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


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"32x64,64x64"`` -> [(32, 64), (64, 64)]."""
    tiles = []
    for part in text.split(","):
        try:
            bm, bn = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"tiles: expected BLOCK_MxBLOCK_N[,...] such as 32x64,64x64, got {text!r}") from None
        tiles.append((bm, bn))
    return tiles


# ---------------------------------------------------------------------------------------------
# The candidates, one function per schedule module. Add a knob: a config field, its candidates.
# ---------------------------------------------------------------------------------------------


def _cpu_space(spec: KernelSpec) -> Space:
    from . import schedule_cpu as S

    d = spec.head_dim
    tiles = tuple((bm, bn) for bm in (16, 32, 64) for bn in (32, 64, 128))

    def knobs(bm: int, bn: int) -> dict:
        # every vectorised loop runs over head_dim or block_n: offer lane counts dividing both
        lanes = tuple(v for v in (4, 8, 16, 32) if v <= min(bn, d) and min(bn, d) % v == 0)
        return {"vec": lanes, "unroll": (0, 16, 64), "grain": (1, 2, 4)}

    return Space(
        name="schedule_cpu.schedule_fused_cpu",
        tiles=tiles,
        knobs=knobs,
        config=lambda bm, bn, **kw: S.CpuConfig(block_m=bm, block_n=bn, **kw),
        schedule=S.schedule_fused_cpu,
        apply=S.apply_fused_cpu,
    )


def _cuda_space(spec: KernelSpec) -> Space:
    from . import intrinsics as I
    from . import schedule_cuda as S
    from ._compat import ms

    def knobs(bm: int, bn: int) -> dict:
        # halves per global load/store: 16 or 8 bytes; the K/V pipeline: cp.async one tile ahead
        # into one buffer each (FlashAttention-2's order) or two, or synchronous loads
        return {"vec": (8, 4), "stages": (2, 1), "kv_buffers": (1, 2)}

    return Space(
        name="schedule_cuda.schedule_fused_cuda",
        # block_m = 32 * num_warps. Left out, as they fail to compile: 64x128 (StorageRewrite
        # aliases an f16 and an f32 shared.dyn buffer, NOTES.md) and block_n = 16 ("Cannot access
        # address of warp memory directly"). VerifyGPUCode drops what exceeds the GPU's shared memory.
        tiles=((128, 64), (128, 32), (128, 96), (128, 128), (64, 64), (64, 32)),
        knobs=knobs,
        config=lambda bm, bn, **kw: S.FlashConfig(block_m=bm, block_n=bn, num_warps=bm // 32, **kw),
        schedule=lambda func, cfg: S.schedule_fused_cuda(func, cfg, spec.dtype),
        postprocs=lambda: [ms.postproc.VerifyGPUCode()],
        prepare=lambda: I.intrinsics(spec.dtype),
        target=_dynamic_shared_memory_target,
    )


#: Shared memory one thread block may opt in to (dynamic shared memory), per CUDA arch. TVM's
#: target tags give the 48 KB static limit, which VerifyGPUCode would hold every tensor-core
#: candidate (hand config included) to.
SHARED_MEMORY_OPT_IN = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448,
                        "sm_90a": 232448}


def _dynamic_shared_memory_target(target):
    arch = str(target.attrs["arch"])
    limit = SHARED_MEMORY_OPT_IN.get(arch)
    if limit is None:
        return target
    attrs = dict(target.export())
    attrs["max_shared_memory_per_block"] = limit
    return tvm.target.Target(attrs)


def _cuda_simple_space(spec: KernelSpec) -> Space:
    from . import schedule_cuda_simple as S
    from ._compat import ms

    itemsize = 2
    # K and V tiles live in static shared memory: 48 KB at most
    tiles = tuple((bm, bn) for bm in (32, 64, 128) for bn in (16, 32, 64)
                  if 2 * bn * spec.head_dim * itemsize <= 48 * 1024)
    return Space(
        name="schedule_cuda_simple.schedule_fused_cuda_simple",
        tiles=tiles,
        knobs=lambda bm, bn: {},
        config=lambda bm, bn: S.SimpleCudaConfig(block_m=bm, block_n=bn),
        schedule=S.schedule_fused_cuda_simple,
        postprocs=lambda: [ms.postproc.VerifyGPUCode()],
    )


#: Schedule function (as ``build`` names it) -> its design space.
SPACES: dict[str, Callable[[KernelSpec], Space]] = {
    "schedule_cpu.schedule_fused_cpu": _cpu_space,
    "schedule_cuda.schedule_fused_cuda": _cuda_space,
    "schedule_cuda_simple.schedule_fused_cuda_simple": _cuda_simple_space,
}


def space_for(spec: KernelSpec) -> Space:
    """The design space of the schedule that ``build`` uses for ``spec`` (one dispatch: build's)."""
    if spec.algorithm != "fused":
        raise NotImplementedError(f"algorithm: expected 'fused' for tuning, got {spec.algorithm!r}")
    from .build import _fused_schedule

    _, _, name, _ = _fused_schedule(spec, spec.tvm_target)
    if name not in SPACES:
        raise NotImplementedError(f"schedule: no design space for {name} (tvmflash.space.SPACES)")
    return SPACES[name](spec)
