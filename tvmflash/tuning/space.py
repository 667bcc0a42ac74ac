"""The problem a tuning run measures: the shape, the scale, and the workload of one tile.

A rule's design space (``rules.base.Space``) says what is searched; this module says on what.
Measuring needs a workload with concrete shapes (MetaSchedule allocates its arguments from the
buffer shapes, and has no way to pass the float ``sm_scale``): ``workload`` specialises the
dynamic-shape function to the measured shape and scale. The schedules never read a shape (split
factors are tile sizes or ``None``), so a trace found on the specialised function replays on the
dynamic one that ``build`` compiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import definition as D
from .._compat import tirx, tvm
from ..definition.plain import NOMINAL_CAP, NOMINAL_WINDOW, alibi_geometric_slopes
from ..rules import Space, rule_for
from ..spec import KernelSpec

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
        elif param.name == "softcap":  # the cap is a runtime value: tuned at a nominal one
            binding[param] = tirx.const(NOMINAL_CAP, "float32")
        elif param.name in ("window_left", "window_right"):  # likewise the window's edges
            binding[param] = tirx.const(NOMINAL_WINDOW, "int32")
    return func.specialize(binding)


def variant_values(spec: KernelSpec, batch: int, heads: int, window: int = NOMINAL_WINDOW) -> dict:
    """The runtime values of a variant kernel's call as ``attention`` takes them (``softcap``,
    ``window_size``, ``alibi_slopes`` as numpy): the nominal ones the workload binds, ``window``
    for the window's edges."""
    import numpy as np

    values = {}
    if spec.softcap:
        values["softcap"] = NOMINAL_CAP
    if spec.window:
        values["window_size"] = (window, 0 if spec.causal else window)
    if spec.alibi:
        values["alibi_slopes"] = np.ascontiguousarray(np.broadcast_to(alibi_geometric_slopes(heads), (batch, heads)))
    return values


def variant_args(spec: KernelSpec, values: dict, device) -> tuple[list, list]:
    """(the input buffers after lse, the scalars after sm_scale) of a built kernel's module for
    ``variant_values``, in the kernel's signature order."""
    named = {"softcap": values.get("softcap"), "alibi_slopes": values.get("alibi_slopes")}
    named["window_left"], named["window_right"] = values.get("window_size", (None, None))
    buffers = [tvm.runtime.tensor(named[name], device) for name in spec.input_buffers]
    return buffers, [named[name] for name in spec.scalar_params[1:]]


def workload(spec: KernelSpec, tile: tuple[int, int], shape: Shape, scale: float | None = None) -> tvm.IRModule:
    """The tuning task of one tile shape: the fused function specialised to ``shape`` and
    ``scale`` (default 1/sqrt(head_dim)), as MetaSchedule normalises a PrimFunc (a ``main``
    with a global symbol)."""
    scale = softmax_scale(spec) if scale is None else scale
    func = specialise(rule_for(spec).definition(spec, tuple(tile)), shape, scale)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


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


def space_for(spec: KernelSpec) -> Space:
    """The design space of the rule that builds ``spec`` (``rules.rule_for``)."""
    rule = rule_for(spec)
    space = rule.space(spec)
    if space is None:
        raise NotImplementedError(f"spec: rule {rule.name} (which builds {spec.key}) has no tuning space")
    return space
