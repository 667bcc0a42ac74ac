"""The search: MetaSchedule's evolutionary search over a rule's design space, one task per tile.

tvmflash's extensions of MetaSchedule 0.27, each for a gap met in tuning:

- ``MutateCategorical``: mutates ``sample_categorical`` decisions (0.27 mutates only those that
  feed unroll annotations);
- ``SkipMeasured``: leaves out what the work dir's database holds already, so a resumed run
  measures only the trials still missing, within one trial budget for all tasks;
- ``GuardedCostModel``: a feature-extractor failure on one candidate never ends the run;
- ``CommitMeasured``: commits each measured candidate to the database as soon as its batch
  finishes, except those the runner could not measure because it was unreachable (an RPC
  tracker down): they are not measurements, and a resumed run measures them;
- ``Progress``: a progress bar, and every failed candidate logged to ``failures.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _compat
from .._compat import ms, tvm
from ..rules import Space
from ..spec import KernelSpec
from . import measure, records
from .space import Shape, workload


@tvm.ir.utils.derived_object
class MutateCategorical(ms.mutator.PyMutator):
    """Change one ``sample_categorical`` decision of a trace. (MetaSchedule 0.27 has no mutator
    for these in general: MutateUnroll takes only those that feed unroll annotations.)"""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._rng = random.Random(seed)

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, trace, _):
        insts = [i for i in trace.insts if i.kind.name == "SampleCategorical" and len(i.attrs[0]) > 1]
        if not insts:
            return None
        inst = self._rng.choice(insts)
        old = int(trace.decisions[inst])
        new = self._rng.choice([d for d in range(len(inst.attrs[0])) if d != old])
        return trace.with_decision(inst, new, remove_postproc=True)

    def clone(self):
        return MutateCategorical(self._rng.randrange(2**31))


@tvm.ir.utils.derived_object
class SkipMeasured(ms.search_strategy.PySearchStrategy):
    """A search strategy minus the candidates the database already holds, within a trial budget
    shared by all tasks of a run.

    MetaSchedule 0.27's evolutionary search remembers only what it measured in this session: run
    again in the same work dir it measures earlier candidates again. This wrapper drops them
    (by the structural hash of the scheduled module) and tells the inner strategy they are
    done; the inner one gets extra trial budget for them, so they never count as trials.
    ``budget`` (a one-element list, shared) caps the candidates handed out, so a run measures
    exactly the trials asked for (the task scheduler alone can overshoot by a partial batch).
    """

    def __init__(self, inner, measured=(), budget=None, max_rounds: int = 16):
        self.inner = inner
        self.measured = set(measured)
        self.budget = budget if budget is not None else [1 << 30]
        self.max_rounds = max_rounds
        self.skipped = 0

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.inner.pre_tuning(max_trials + len(self.measured), num_trials_per_iter, design_spaces, database,
                              cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        if self.budget[0] <= 0:
            return None
        for _ in range(self.max_rounds):
            candidates = self.inner.generate_measure_candidates()
            if candidates is None:
                return None
            fresh, old = [], []
            for cand in candidates:
                (old if _compat.structural_hash(cand.sch.mod) in self.measured else fresh).append(cand)
            if old:
                self.skipped += len(old)
                self.inner.notify_runner_results(
                    old, [ms.runner.RunnerResult(None, "measured in an earlier session") for _ in old])
            if fresh or not candidates:
                fresh = fresh[: self.budget[0]]
                self.budget[0] -= len(fresh)
                return fresh
        return None

    def notify_runner_results(self, measure_candidates, results) -> None:
        for cand, res in zip(measure_candidates, results):
            if not measure.unreachable(res.error_msg):  # not measured: a resumed run measures it
                self.measured.add(_compat.structural_hash(cand.sch.mod))
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return SkipMeasured(self.inner.clone(), self.measured, self.budget, self.max_rounds)


def scheduled_hash(record) -> int:
    """Structural hash of the module a record measured (its trace replayed on its workload)."""
    sch = _compat.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return _compat.structural_hash(sch.mod)


@tvm.ir.utils.derived_object
class GuardedCostModel(ms.cost_model.PyCostModel):
    """A cost model whose failures never end tuning. MetaSchedule 0.27's feature extractor
    raises on some candidates that built and ran fine (docs/tvm-0.27.md), and an exception
    there aborts the whole run: here such candidates are left out of training and ranked last."""

    def __init__(self, inner, log=None):
        self.inner = inner
        self.log = log or (lambda msg: None)

    def load(self, path: str) -> None:
        self.inner.load(path)

    def save(self, path: str) -> None:
        self.inner.save(path)

    def update(self, context, candidates, results) -> None:
        try:
            self.inner.update(context, candidates, results)
            return
        except Exception as err:  # noqa: BLE001 - any failure: retry without the bad ones
            self.log(f"cost model update failed ({records.first_line(err)}); retrying without unfit candidates")
        good = [i for i, c in enumerate(candidates) if self._extracts(context, c)]
        if good:
            try:
                self.inner.update(context, [candidates[i] for i in good], [results[i] for i in good])
            except Exception as err:  # noqa: BLE001
                self.log(f"cost model update failed again, skipped: {records.first_line(err)}")

    def predict(self, context, candidates):
        try:
            return self.inner.predict(context, candidates)
        except Exception as err:  # noqa: BLE001
            self.log(f"cost model prediction failed ({records.first_line(err)}); ranking unfit candidates last")
        scores = np.zeros(len(candidates), dtype="float64")
        for i, cand in enumerate(candidates):
            try:
                scores[i] = float(self.inner.predict(context, [cand])[0])
            except Exception:  # noqa: BLE001
                scores[i] = -1.0
        return scores

    def _extracts(self, context, candidate) -> bool:
        try:
            self.inner.extractor.extract_from(context, [candidate])
            return True
        except Exception:  # noqa: BLE001
            return False


@tvm.ir.utils.derived_object
class Progress(ms.measure_callback.PyMeasureCallback):
    """Feeds a tqdm bar (trials, best TFLOP/s, ETA) and logs every failed candidate."""

    def __init__(self, bar, tiles, flops: float, failures: Path, best_secs: float = math.inf, best_tile=None):
        self.bar = bar
        self.tiles = tiles
        self.flops = flops
        self.failures = failures
        self.best_secs = best_secs
        self.best_tile = best_tile
        self.measured = 0
        self.failed = 0
        self._show()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        try:
            tile = self.tiles[task_id]
            for build, run in zip(builder_results, runner_results):
                error = build.error_msg or run.error_msg
                if measure.unreachable(error):
                    continue  # not a measurement (``CommitMeasured``)
                if error:
                    self._failed(tile, error)
                    continue
                secs = [float(s) for s in run.run_secs]
                mean = sum(secs) / len(secs)
                if mean < self.best_secs:
                    self.best_secs, self.best_tile = mean, tile
            self.measured += len(measure_candidates)
            self.bar.update(len(measure_candidates))
            self._show()
        except Exception as err:  # noqa: BLE001 - progress reporting must not end tuning
            self.bar.write(f"progress callback: {records.first_line(err)}")

    def _failed(self, tile, error: str) -> None:
        self.failed += 1
        log_failure(self.failures, tile, error)
        self.bar.write(f"  skipped a candidate of tile {tile[0]}x{tile[1]}: {records.first_line(error)}")

    def _show(self) -> None:
        if self.best_tile is None:
            self.bar.set_postfix_str("best -")
        else:
            tflops = self.flops / self.best_secs / 1e12
            self.bar.set_postfix_str(f"best {tflops:.3g} TFLOP/s ({self.best_tile[0]}x{self.best_tile[1]})")


def log_failure(path: Path, tile, error: str) -> None:
    """Append a failed candidate (or a failed validation) to ``failures.log``."""
    with open(path, "a") as fh:
        fh.write(f"--- {records.now()} tile {tile[0]}x{tile[1]}\n{error.rstrip()}\n")


# -- the work directory -------------------------------------------------------------------


def repair_database(work_dir: str | os.PathLike) -> int:
    """Drop lines of the JSON database that a killed run cut short (they would stop the whole
    database from loading). Returns the number of lines dropped."""
    dropped = 0
    workloads = Path(work_dir) / records.WORKLOADS
    n_workloads = None
    for path in (workloads, Path(work_dir) / records.RECORDS):
        if not path.exists():
            continue
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise records.LogError(f"{path}: not a text file ({records.first_line(err)})") from None
        keep = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if path.name == records.RECORDS and (not isinstance(obj, list) or not isinstance(obj[0], int)
                                                 or n_workloads is None or obj[0] >= n_workloads):
                dropped += 1
                continue
            keep.append(line)
        if path == workloads:
            n_workloads = len(keep)
        text = "".join(line + "\n" for line in keep)
        if text != raw:
            tmp = path.with_suffix(".repair")
            tmp.write_text(text)
            os.replace(tmp, path)
    return dropped


def measured_records(db, mods) -> list[list]:
    """The records of each workload in ``mods`` (failed ones included)."""
    hashes = {records.workload_hash(m): i for i, m in enumerate(mods)}
    out: list[list] = [[] for _ in mods]
    for rec in db.get_all_tuning_records():
        i = hashes.get(records.workload_hash(rec.workload.mod))
        if i is not None and _compat.structural_equal(rec.workload.mod, mods[i]):
            out[i].append(rec)
    return out


# -- tasks and the search --------------------------------------------------------------------


MS_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def logs_to(directory: Path):
    """MetaSchedule's log (task tables, per-task search logs) to ``directory/tuning.log``, only
    warnings to the console (the progress bar says the rest). Restored afterwards. (MetaSchedule's
    own ``get_loggers_from_work_dir`` prints every iteration to stdout and fails on a second call
    in a process under pytest's log capture.)"""
    directory.mkdir(parents=True, exist_ok=True)
    ms_logger = logging.getLogger(MS_LOGGER)
    saved = (ms_logger.level, ms_logger.propagate, list(ms_logger.handlers))
    file_handler = logging.FileHandler(directory / "tuning.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    ms_logger.handlers = [file_handler, console]
    ms_logger.setLevel(logging.DEBUG)
    ms_logger.propagate = False
    try:
        yield
    finally:
        file_handler.close()
        ms_logger.level, ms_logger.propagate, ms_logger.handlers = saved[0], saved[1], saved[2]


def _reason(error_msg: str) -> str:
    """The runner's own words after ``measure.UNREACHABLE``."""
    text = str(error_msg)
    return text[text.index(measure.UNREACHABLE):].splitlines()[0] if measure.UNREACHABLE in text else text


class RunnerUnreachable(ConnectionError):
    """The runner could not measure a whole batch (an RPC tracker or server down)."""


@tvm.ir.utils.derived_object
class CommitMeasured(ms.measure_callback.PyMeasureCallback):
    """MetaSchedule's ``AddToDatabase``, minus the candidates the runner never reached: a
    candidate that failed to build or run is committed as failed (run time 1e10 s, as
    ``AddToDatabase`` does), one whose runner was unreachable is not committed at all, and a
    batch of nothing else ends the search (``RunnerUnreachable``): resumed, the run measures
    them."""

    def __init__(self, database):
        self.database = database

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        ctx = task_scheduler.tasks_[task_id].ctx
        workload, missed = None, []
        for cand, build, run in zip(measure_candidates, builder_results, runner_results):
            if build.error_msg is None and measure.unreachable(run.error_msg):
                missed.append(run.error_msg)
                continue
            if workload is None:
                workload = self.database.commit_workload(ctx.mod)
            secs = [float(s) for s in run.run_secs] if (build.error_msg is None and run.error_msg is None
                                                        and run.run_secs) else [1e10]
            self.database.commit_tuning_record(ms.database.TuningRecord(
                cand.sch.trace, workload, secs, ctx.target, cand.args_info))
        if missed and len(missed) == len(measure_candidates):
            raise RunnerUnreachable(_reason(missed[0]))


@dataclass
class Task:
    tile: tuple[int, int]
    mod: tvm.IRModule
    ctx: ms.TuneContext


def make_tasks(spec: KernelSpec, space: Space, target, tiles, shape: Shape, seed, db, budget: list,
               log) -> tuple[list, dict]:
    """One task per tile (``Task``), and {tile: why} of the tiles whose design space fails (a
    failing tile is skipped, never fatal)."""
    tasks, skipped = [], {}
    for tile, task_seed in zip(tiles, ms.utils.fork_seed(seed, n=len(tiles))):
        mod = workload(spec, tile, shape)
        earlier = measured_records(db, [mod])[0]
        mutators = {MutateCategorical(task_seed): 1.0} if space.apply is not None else {}
        ctx = _compat.tune_context(
            mod=mod,
            target=target,
            space_generator=ms.space_generator.ScheduleFn(space.sch_fn(tile), sch_rules=[],
                                                         postprocs=space.postprocs(), mutator_probs=mutators),
            search_strategy=SkipMeasured(
                ms.search_strategy.EvolutionarySearch(
                    population_size=64, init_min_unmeasured=min(16, space.size(tile)), init_measured_ratio=0.25,
                    genetic_num_iters=3, max_fail_count=8),
                measured={scheduled_hash(rec) for rec in earlier}, budget=budget),
            task_name=f"tile_{tile[0]}x{tile[1]}",
            rand_state=task_seed,
            num_threads=os.cpu_count() or 1,
            logger=logging.getLogger(f"{MS_LOGGER}.tvmflash.tile_{tile[0]}x{tile[1]}"),
        )
        try:
            if not ctx.generate_design_space():
                raise ValueError("no design space")
        except Exception as err:  # noqa: BLE001
            skipped[tile] = records.first_line(err)
            log(f"tile {tile[0]}x{tile[1]}: skipped, its design space fails: {skipped[tile]}")
            continue
        tasks.append(Task(tile, mod, ctx))
    if not tasks:
        raise ValueError(f"tiles: no tile of {tiles} has a valid design space ({skipped})")
    return tasks, skipped


def run_search(spec: KernelSpec, tasks: list, db, remaining: int, work_dir: Path, shape: Shape, options
               ) -> tuple[int, int]:
    """MetaSchedule's gradient task scheduler over the tasks, ``remaining`` trials; returns
    (measured, failed). ``options``: the run's ``TuneOptions``."""
    from tqdm import tqdm

    tiles = [t.tile for t in tasks]
    best_secs, best_tile = math.inf, None
    for tile, recs in zip(tiles, measured_records(db, [t.mod for t in tasks])):
        for rec in recs:
            secs = records.mean_run_secs(rec)
            if secs < min(best_secs, records.FAILED_RUN):
                best_secs, best_tile = secs, tile
    per_iter = options.trials_per_iter or max(1, min(16, math.ceil(remaining / len(tasks))))
    cores = max(1, os.cpu_count() or 1)
    bar = tqdm(total=remaining, desc=spec.key, unit="trial", disable=not options.progress, dynamic_ncols=True)
    callback = Progress(bar, tiles, shape.flops(spec), work_dir / "failures.log", best_secs, best_tile)
    try:
        ms.tune_tasks(
            tasks=[t.ctx for t in tasks],
            task_weights=[1.0] * len(tasks),
            work_dir=str(work_dir),
            max_trials_global=remaining,
            num_trials_per_iter=per_iter,
            builder=measure.make_builder(spec, min(cores, per_iter), options.build_timeout),
            runner=measure.make_runner(spec, options.rpc_tracker, options.rpc_key, options.run_timeout),
            database=db,
            cost_model=GuardedCostModel(ms.cost_model.XGBModel(num_tuning_cores=cores, adaptive_training=True),
                                        log=bar.write),
            measure_callbacks=[
                CommitMeasured(db),
                ms.measure_callback.RemoveBuildArtifact(),
                ms.measure_callback.UpdateCostModel(),
                callback,
            ],
            task_scheduler="gradient",
        )
    except Exception as err:  # a callback's exception comes back through TVM's FFI as its message
        if measure.UNREACHABLE in str(err):
            raise RunnerUnreachable(
                f"rpc_tracker: {_reason(err).replace(measure.UNREACHABLE, 'the runner could not be reached')}; "
                f"the candidates it was given are not recorded: run the same command again to measure them"
            ) from None
        raise
    finally:
        bar.close()
    return callback.measured, callback.failed
