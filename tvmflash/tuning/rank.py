"""Ranking and validation: which record of a tile ships, checked before it reaches the logs.

MetaSchedule measures each candidate on the workload specialised to the measured shape; ``build``
compiles the any-shape kernel (the even build where the lengths allow), whose ranking can differ,
and serves every length. So the best few of each tile (``rerank_pool``) are timed as ``build``
makes them at the measured shape and at the other ranking lengths (``measure.deployed_times``)
and ranked by their geometric mean (``rank_key``), and a record is exported only if it computes
the right thing on a shape it was never measured on (``validate_record``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from .. import _compat
from .._compat import tvm
from ..compiler import compile_module
from ..definition import attention_reference
from ..rules import Space
from ..spec import KernelSpec, numpy_dtype
from . import measure, records, search
from .space import Shape, variant_args, variant_values


def geomean(values) -> float:
    """The geometric mean of positive numbers (seconds at several lengths: each length counts the
    same, whatever its time)."""
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass
class TileResult:
    tile: tuple[int, int]
    config: dict | None
    run_secs: float
    record: object = None
    validated: bool = False  # checked against the reference on this machine
    why_not: str = ""  # no record: why
    #: MetaSchedule's time of the record on the static-shape workload; run_secs is the time of
    #: the kernel build makes of it (any shape) where this machine could run it, else the same.
    workload_secs: float = math.inf
    #: {seq_len: seconds} of the kernel build makes of it at each of ``rank_shapes`` (same
    #: tokens and heads), where it was timed; the ranking is their geometric mean (``rank_secs``)
    secs_at: dict = field(default_factory=dict)

    @property
    def rank_secs(self) -> float:
        """What tiles are ranked by: the geometric mean of ``secs_at`` where the kernel was
        timed at several lengths, else ``run_secs``."""
        return geomean(self.secs_at.values()) if self.secs_at else self.run_secs


@dataclass
class TuneResult:
    spec: KernelSpec
    shape: Shape
    work_dir: str
    trials: int  # measured in the work dir for these tasks, all sessions
    measured_now: int
    failed_now: int
    tiles: list[TileResult] = field(default_factory=list)
    skipped_tiles: dict = field(default_factory=dict)  # tile -> why
    log_dir: str | None = None
    schedule_py: str | None = None
    repaired: int = 0

    @property
    def best(self) -> TileResult | None:
        ok = [t for t in self.tiles if t.run_secs < records.FAILED_RUN]
        return min(ok, key=rank_key) if ok else None


def rank_key(tile: TileResult) -> tuple[float, float]:
    """Timed at the ranking lengths first (by their geometric mean), then the rest by run time."""
    return (tile.rank_secs if tile.secs_at else math.inf, tile.run_secs)


VALIDATE_TRIES = 3  # records per tile tried, fastest first
#: Max |out - reference| a record may reach on the validation shape (P and O rounded to dtype).
VALIDATE_TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}
#: The window edge a window kernel's candidates are validated with (the validation's lengths are
#: a few hundred keys: the nominal window would mask nothing).
VALIDATE_WINDOW = 50
RERANK_PER_TILE = 3  # records per tile timed as build compiles them (the fastest on the workload) ...
RERANK_TILES = 2  # ... in the tiles whose best workload times are the lowest


def rerank_pool(space: Space, task, ok: list, hand) -> list:
    """The records of one tile worth timing as ``build`` compiles them: the ``RERANK_PER_TILE``
    fastest on the workload, and the hand config's (``hand``) where the search measured it."""
    pool = list(ok[:RERANK_PER_TILE])
    if (hand.block_m, hand.block_n) == tuple(task.tile) and len(ok) > len(pool):
        target = _compat.structural_hash(space.schedule(task.mod["main"], hand).mod)
        pool += [rec for rec in ok[RERANK_PER_TILE:] if search.scheduled_hash(rec) == target][:1]
    return pool


#: Lengths (at the measured shape's tokens and heads) that the best candidates are timed at as
#: built: ``build``'s kernel serves every length, and the bench grid spans these.
RANK_SEQLENS = (1024, 4096, 16384)


def rank_shapes(spec: KernelSpec, shape: Shape) -> list[Shape]:
    """The measured shape first, then (on a GPU, for equal query and key lengths) the other
    ``RANK_SEQLENS`` with the same tokens (batch * seqlen) and heads."""
    shapes = [shape]
    if spec.is_cuda and shape.seq_q == shape.seq_k:
        tokens = shape.batch * shape.seq_q
        shapes += [Shape(max(1, tokens // n), n, n, shape.heads, shape.heads_kv) for n in RANK_SEQLENS
                   if n != shape.seq_q]
    return shapes


def validate_record(spec: KernelSpec, tile, record) -> str | None:
    """None if ``record``'s schedule, replayed on the dynamic-shape function and built as
    ``build`` builds, matches the float64 reference on a shape it was never measured on (lengths
    no tile multiple, seqlen_q != seqlen_k); else what is wrong. MetaSchedule measures time only:
    this keeps a fast but wrong candidate out of the logs."""
    b, sq, sk, hk, d = 1, 200, 333, 2, spec.head_dim
    h = hk * spec.group
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(numpy_dtype(spec.dtype)) for s in ((b, sq, h, d), (b, sk, hk, d),
                                                                                 (b, sk, hk, d)))
    values = variant_values(spec, b, h, window=VALIDATE_WINDOW)  # a window that masks at these lengths
    try:
        mod, pass_config = measure.deployed_module(spec, tile, record.trace)
        ex = compile_module(mod, spec.tvm_target, pass_config)
        with tempfile.TemporaryDirectory() as tmp:
            ex.export_library(os.path.join(tmp, "candidate.so"))
            func = tvm.runtime.load_module(os.path.join(tmp, "candidate.so"))["main"]
            dev = tvm.cuda(0) if spec.is_cuda else tvm.cpu()
            out = tvm.runtime.empty((b, sq, h, d), spec.dtype, dev)
            lse = tvm.runtime.empty((b, h, sq), "float32", dev)
            inputs, scalars = variant_args(spec, values, dev)
            func(*(tvm.runtime.tensor(x, dev) for x in (q, k, v)), out, lse, *inputs, d**-0.5, *scalars)
            out, lse = out.numpy().astype(np.float64), lse.numpy().astype(np.float64)
    except Exception as err:  # noqa: BLE001
        return f"it does not build or run here: {records.first_line(err)}"
    ref, ref_lse = attention_reference(q, k, v, causal=spec.causal, **values)
    err = float(np.abs(out - ref).max())
    finite = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max()) if finite.any() else 0.0
    if not (err <= VALIDATE_TOLERANCE[spec.dtype] and lse_err <= 1e-3):  # NaN fails too
        return (f"max |out - ref| = {err:.2e} (tolerance {VALIDATE_TOLERANCE[spec.dtype]:.0e}), "
                f"max |lse - ref| = {lse_err:.2e} (tolerance 1e-03)")
    return None


def identify_config(space: Space, tile, record, mod) -> dict | None:
    """The schedule config a record's trace amounts to: the knob values for which the hand
    schedule function builds the same TensorIR. (None: no config does, which would mean the
    trace left the schedule function's path.)"""
    sch = _compat.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    func = mod["main"]
    for config in space.configs(tile):
        if _compat.structural_equal(space.schedule(func, config).mod, sch.mod):
            return dataclasses.asdict(config)
    return None
