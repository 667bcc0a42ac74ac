"""MetaSchedule auto-tuning of a kernel variant (``tvmflash tune``): the orchestration.

Per variant: one task per candidate tile of its rule's design space (``rules.base.Space``: the
tile is part of the TensorIR definition), each task the definition specialised to the measured
shape (``space.workload``), searched by MetaSchedule's evolutionary search with an XGBoost cost
model over the rule's other knobs (``search``). Candidates are compiled and exported as ``build``
ships them and run on this machine or on an RPC tracker's device (``measure``). The best records
are then timed as built at several lengths, ranked and validated against the float64 reference
(``rank``), and exported (``records``).

Faults: a candidate that fails to build, to run or runs past the timeout is logged to
``<work_dir>/failures.log`` and skipped; a tile whose design space cannot be generated is
skipped; the cost model cannot abort the run. Every measured candidate is appended to the JSON
database in ``work_dir`` as soon as its batch finishes, so a run killed at any point resumes from
the records it committed (``search.repair_database`` drops a line cut short by the kill) and
measures only the trials still missing; candidates the runner could not reach are not recorded,
and are measured on resume.

At the end the best record of each tile goes to ``tuning_logs/<target>/<key>/`` (with
``tuning.json``) and the best schedule as Python to ``schedules/<target>/<key>.py``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import _compat
from .._compat import ms
from ..rules import Space, rule_for
from ..spec import KernelSpec, target_id
from . import measure, rank, records, search
from .rank import TileResult, TuneResult
from .space import Shape, default_shape, softmax_scale, space_for


@dataclass(frozen=True)
class TuneOptions:
    """How one variant is tuned.

    trials:          measured candidates in all (those already in ``work_dir`` count).
    work_dir:        MetaSchedule's database and logs; a run there resumes.
    shape:           the measured problem (default ``space.default_shape``).
    tiles:           the tiles to tune, a subset of the rule's (default all).
    seed:            MetaSchedule's random seed.
    rpc_tracker:     HOST:PORT of an RPC tracker whose device measures (with ``rpc_key``).
    logs_dir:        where the log is exported (None: not exported).
    schedules_dir:   where the readable best schedule goes (None: not written).
    trials_per_iter: candidates per search round (default min(16, trials / tiles)).
    build_timeout, run_timeout: seconds per candidate.
    progress:        a progress bar on stderr.
    """

    trials: int
    work_dir: str | os.PathLike
    shape: Shape | None = None
    tiles: tuple | None = None
    seed: int | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    logs_dir: str | os.PathLike | None = None
    schedules_dir: str | os.PathLike | None = None
    trials_per_iter: int | None = None
    build_timeout: float = 120.0
    run_timeout: float = 30.0
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials: expected a positive int, got {self.trials!r}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError(f"rpc_key: expected --rpc-tracker and --rpc-key together, got "
                             f"tracker={self.rpc_tracker!r}, key={self.rpc_key!r}")
        if self.rpc_tracker is not None:
            measure.parse_tracker(self.rpc_tracker)
        if self.tiles is not None:
            object.__setattr__(self, "tiles", tuple(tuple(t) for t in self.tiles))


def tune(spec: KernelSpec, options: TuneOptions, log=print) -> TuneResult:
    """Tune ``spec`` as ``options`` say, then export the best record of each tile."""
    # Step 1. Check the arguments before anything slow.
    rule = rule_for(spec)
    space = space_for(spec)
    tiles = list(options.tiles or space.tiles)
    unknown = [t for t in tiles if t not in space.tiles]
    if unknown:
        raise ValueError(f"tiles: expected a subset of {list(space.tiles)} ({space.name}), got {unknown}")
    shape = options.shape or default_shape(spec)
    if shape.heads != shape.heads_kv * spec.group:
        raise ValueError(f"shape: expected heads = heads_kv * {spec.group} (GQA group), got {shape.heads} / "
                         f"{shape.heads_kv}")

    # Step 2. The work dir's database, repaired if a killed run cut a line short.
    work_dir = Path(options.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    repaired = search.repair_database(work_dir)
    if repaired:
        log(f"work dir: dropped {repaired} damaged database line(s) left by an interrupted run")
    rule.prepare(spec)  # first: reading a database of tensorized records needs their intrinsics registered
    db = records.open_work_database(work_dir)
    target = space.target(spec.tvm_target)
    if measure.candidate_device_code(spec)[0] == "source":  # the runner's workers compile them with NVRTC:
        _compat.ensure_cuda_headers()                        # it needs the CUDA headers

    with search.logs_to(work_dir / "logs"):
        # Step 3. One task per tile; a tile whose design space fails is skipped, never fatal.
        budget = [0]  # trials left, shared by the tasks' search strategies
        tasks, skipped = search.make_tasks(spec, space, target, tiles, shape, options.seed, db, budget, log)

        # Step 4. Measure what is missing.
        done = sum(len(recs) for recs in search.measured_records(db, [t.mod for t in tasks]))
        budget[0] = options.trials - done
        measured_now = failed_now = 0
        if budget[0] > 0:
            if done:
                log(f"resuming: {done} trial(s) already in {work_dir}, {budget[0]} to go")
            measured_now, failed_now = search.run_search(spec, tasks, db, budget[0], work_dir, shape, options)
            if measured_now < options.trials - done:
                log(f"search space exhausted after {measured_now} new trial(s) (every distinct candidate measured)")

    # Step 5. The fastest record of each tile that computes the right thing; exported.
    result = TuneResult(spec, shape, str(work_dir), 0, measured_now, failed_now, skipped_tiles=skipped,
                        repaired=repaired)
    result.tiles = best_tiles(spec, rule, space, tasks, db, shape, options, log)
    result.trials = sum(len(recs) for recs in search.measured_records(db, [t.mod for t in tasks]))
    if options.logs_dir is not None and result.best is not None:
        _export(result, space, target, Path(options.logs_dir), options.schedules_dir, options.rpc_tracker,
                shape.flops(spec))
    return result


def best_tiles(spec, rule, space: Space, tasks, db, shape: Shape, options: TuneOptions, log) -> list[TileResult]:
    """Per task, the fastest record as built that validates (``rank``)."""
    can_validate = measure.can_run_here(spec)
    measured = [sorted((r for r in recs if records.mean_run_secs(r) < records.FAILED_RUN), key=records.mean_run_secs)
                for recs in search.measured_records(db, [t.mod for t in tasks])]
    if any(measured) and not can_validate:
        log("records exported unvalidated: this machine has no GPU to check them on")
    hand = rule.default_config(spec)
    best = sorted((i for i, ok in enumerate(measured) if ok), key=lambda i: records.mean_run_secs(measured[i][0]))
    pool = [(i, rec) for i in best[:rank.RERANK_TILES]
            for rec in rank.rerank_pool(space, tasks[i], measured[i], hand)] if can_validate else []
    deployed = {}  # id(record) -> {seq_len: seconds}, all ranking lengths timed
    if len(pool) > 1:
        shapes = rank.rank_shapes(spec, shape)
        log(f"timing {len(pool)} candidates as build compiles them (any shape) at "
            f"seqlen {', '.join(str(s.seq_q) for s in shapes)}")
        try:
            times = measure.deployed_times(spec, shapes, [(tasks[i].tile, rec) for i, rec in pool],
                                           options.build_timeout)
            deployed = {id(rec): {s.seq_q: t for s, t in zip(shapes, secs)} for (_, rec), secs in zip(pool, times)
                        if max(secs) < records.FAILED_RUN}
        except Exception as err:  # noqa: BLE001 - never fatal: the workload times rank them then
            log(f"timing the built kernels failed ({records.first_line(err)}); ranking on the workload times")
    out = []
    for task, ok in zip(tasks, measured):
        ranked = sorted(ok, key=lambda r: (rank.geomean(deployed[id(r)].values()) if id(r) in deployed else math.inf,
                                           records.mean_run_secs(r)))
        tile = TileResult(task.tile, None, math.inf, why_not="no candidate ran")
        for rec in ranked[:rank.VALIDATE_TRIES]:
            why = rank.validate_record(spec, task.tile, rec) if can_validate else None
            if why is None:
                static, secs_at = records.mean_run_secs(rec), deployed.get(id(rec), {})
                if secs_at:  # the exported record's run time: as built, at the measured shape
                    rec = ms.database.TuningRecord(rec.trace, rec.workload, [secs_at[shape.seq_q]], rec.target,
                                                   rec.args_info)
                tile = TileResult(task.tile, rank.identify_config(space, task.tile, rec, task.mod),
                                  records.mean_run_secs(rec), rec, validated=can_validate, workload_secs=static,
                                  secs_at=secs_at)
                break
            tile.why_not = f"its fastest records compute wrong results ({why})"
            search.log_failure(Path(options.work_dir) / "failures.log", task.tile, f"validation: {why}")
            log(f"tile {task.tile[0]}x{task.tile[1]}: a record is fast but fails validation: {why}")
        out.append(tile)
    return out


def _export(result: TuneResult, space: Space, target, logs_dir: Path, schedules_dir, rpc_tracker, flops):
    spec = result.spec
    tiles = sorted((t for t in result.tiles if t.record is not None), key=rank.rank_key)
    meta = {
        "key": spec.key,
        "spec": spec.to_dict(),
        "rule": space.name,
        "target": json.loads(str(target)) if str(target).startswith("{") else str(target),
        "shape": result.shape.to_dict(),
        "softmax_scale": softmax_scale(spec),
        "trials": result.trials,
        "device": measure.device_description(spec, rpc_tracker),
        "device_code": measure.measured_code(spec),
        "tvm_version": _compat.TVM_VERSION,
        "tvm_ffi_version": _compat.TVM_FFI_VERSION,
        "date": records.now(),
        "tiles": [
            {"config": t.config or {"block_m": t.tile[0], "block_n": t.tile[1]},
             "run_ms": round(t.run_secs * 1e3, 6), "tflops": round(flops / t.run_secs / 1e12, 6),
             "workload_ms": round(t.workload_secs * 1e3, 6), "validated": t.validated,
             **({"run_ms_at_seqlen": {str(n): round(secs * 1e3, 6) for n, secs in t.secs_at.items()}}
                if t.secs_at else {})}
            for t in tiles
        ],
    }
    result.log_dir = str(records.write_variant(logs_dir, spec, meta, [t.record for t in tiles]))
    if schedules_dir is not None:
        path = Path(schedules_dir) / target_id(spec.target) / f"{spec.key}.py"
        records.write_schedule_py(path, spec, space.name, meta["tiles"][0], meta, tiles[0].record.trace,
                                  f"tuning_logs/{target_id(spec.target)}/{spec.key}")
        result.schedule_py = str(path)
