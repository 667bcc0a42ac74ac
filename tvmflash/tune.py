"""MetaSchedule auto-tuning of the fused kernel (``tvmflash tune``).

Per kernel variant: one task per candidate tile shape (``space``: the tile is part of the
TensorIR definition), each task the fused function specialised to the measured shape, searched
by MetaSchedule's evolutionary search with an XGBoost cost model over the schedule's other knobs.
Candidates are compiled the way ``build`` compiles (pass options, tvmflash's tirx pipeline, and
the device code: nvcc's machine code where ``build`` embeds it, ``export_candidate``) and run on
this machine or on an RPC tracker's device.

Faults: a candidate that fails to build, to run or runs past the timeout is logged to
``<work_dir>/failures.log`` and skipped; a tile whose design space cannot be generated is
skipped; the cost model cannot abort the run (``GuardedCostModel``). Every measured candidate is
appended to the JSON database in ``work_dir`` as soon as its batch finishes, so a run killed at
any point resumes from the records it committed (``repair_database`` drops a line cut short by
the kill) and measures only the trials still missing.

At the end the best record of each tile goes to ``tuning_logs/<target>/<key>/`` (with
``tuning.json``) and the best schedule as Python to ``schedules/<target>/<key>.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import _compat, nvcc, records
from ._compat import ms, tvm
from .space import Shape, Space, default_shape, softmax_scale, space_for, workload
from .spec import KernelSpec

#: Test hook, faults separated by ";": ``raise:PATTERN`` fails the build of every candidate whose
#: scheduled TensorIR contains PATTERN, ``hang:PATTERN`` makes its run sleep past the runner's
#: timeout, ``space:BMxBN`` makes the design space of that tile raise.
FAULT_ENV = "TVMFLASH_TUNE_FAULT"
_HANG_MARKER = "tvmflash_fault_hang"


def _faults() -> list[tuple[str, str]]:
    out = []
    for item in os.environ.get(FAULT_ENV, "").split(";"):
        action, _, pattern = item.strip().partition(":")
        if action in ("raise", "hang", "space") and pattern:
            out.append((action, pattern))
    return out


# -- measurement: build, arguments, run (these run in MetaSchedule's worker processes) --


def _fault(mod) -> str | None:
    faults = [(a, p) for a, p in _faults() if a in ("raise", "hang")]
    if not faults:
        return None
    script = mod.script()
    for action, pattern in faults:
        if pattern in script:
            return action
    return None


def build_candidate(mod, target, _params=None, pass_config=None):
    """``LocalBuilder``'s f_build: compile as ``build.compile_lowered`` does."""
    fault = _fault(mod)
    if fault == "raise":
        raise RuntimeError(f"{FAULT_ENV}: injected build failure")
    if fault == "hang":  # a marker function the runner looks for
        marker = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0)).with_attr("global_symbol", _HANG_MARKER)
        mod = tvm.IRModule({**{gv.name_hint: f for gv, f in mod.functions.items()}, _HANG_MARKER: marker})
    with tvm.transform.PassContext(config=pass_config or {}), _compat.cuda_source_modules():
        return tvm.compile(mod, target=target, tir_pipeline=_compat.TIR_PIPELINE).mod


def candidate_device_code(spec: KernelSpec) -> tuple[str, tuple[str, ...]]:
    """(form, archs) of the device code that ``build`` embeds for ``spec`` by default, which
    candidates are measured with: ('fatbin', the target's archs) where nvcc is found, else
    ('source', ()) (NVRTC compiles it where it is loaded, as it would ``build``'s module)."""
    from .build import _device_code_form

    form = _device_code_form(spec, "auto", None) if spec.is_cuda else "host"
    if form != "fatbin":
        return form, ()
    return form, nvcc.default_archs(_compat.cuda_arch(spec.tvm_target))


def export_candidate(mod, form: str = "source", archs: tuple[str, ...] = ()) -> str:
    """``LocalBuilder``'s f_export: a tar of the candidate (MetaSchedule's default), its CUDA
    source replaced by nvcc's fatbin for ``archs`` when ``form`` is 'fatbin', compiled with
    ``build``'s flags. Candidates are then measured as the machine code ``build`` ships: on the
    H100, NVRTC's code for the same source (what a source module becomes when loaded) ran 5-15%
    slower and ranked the configs differently (NOTES.md)."""
    from tvm.support.tar import tar

    pack = None
    if form == "fatbin":
        source = next((m.inspect_source() for m in mod.imports if m.kind == "cuda"), None)
        if source is not None:
            code, _ = nvcc.compile_source(source, "fatbin", archs, ptx_arch=archs[0])
            pack = _compat.pack_imports_with_device_code(source, "fatbin", code)
    elif form not in ("source", "host"):
        raise ValueError(f"form: expected 'fatbin', 'source' or 'host', got {form!r}")
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod." + tar.output_format)
    mod.export_library(path, fcompile=tar, fpack_imports=pack)
    return path


def _builder(spec: KernelSpec, max_workers: int, timeout: float):
    """The ``LocalBuilder`` of candidates: compiled and exported as ``build`` does."""
    form, archs = candidate_device_code(spec)
    return ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=timeout, initializer=build_worker_init,
                                   f_build=partial(build_candidate, pass_config=_pass_config(spec)),
                                   f_export=partial(export_candidate, form=form, archs=archs))


FRAGMENT_INDEX_MAP = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def build_worker_init() -> None:
    """Each build worker: register the fragment layout that CUDA codegen looks up by name when it
    lowers the mma store intrinsic. TVM registers it when its intrinsics module is imported
    (about a minute, and LocalBuilder starts new workers every batch); the workers only compile
    already tensorized modules and never import that module, so the registrations cannot clash."""
    import tvm_ffi

    if tvm_ffi.get_global_func(FRAGMENT_INDEX_MAP, allow_missing=True) is not None:
        return

    def index_map(ind):
        return tvm.runtime.convert(list(fragment_lane_register(ind[0], ind[1])))

    tvm_ffi.register_global_func(FRAGMENT_INDEX_MAP, index_map)


def fragment_lane_register(i, j):
    """(lane, register) holding element (i, j) of a 16x16 m16n8k16 accumulator / ldmatrix
    fragment (PTX ISA)."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


_HOST_ARRAYS: dict = {}  # per runner worker: the same inputs for every candidate


def _host_array(index: int, dtype: str, shape) -> np.ndarray:
    key = (index, dtype, tuple(shape))
    if key not in _HOST_ARRAYS:
        from .kernel import _numpy_dtype

        rng = np.random.default_rng(index)
        _HOST_ARRAYS[key] = rng.standard_normal(shape, dtype="float32").astype(_numpy_dtype(dtype))
    return _HOST_ARRAYS[key]


def _arrays(args_info, alloc_repeat: int, make):
    """Normal random q, k, v (and outputs): no inf/NaN/denormal in the timing, unlike random bits."""
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for index, (kind, dtype, shape) in enumerate(args_info):
            if kind != "TENSOR":
                raise NotImplementedError(f"argument: expected a tensor, got {kind}")
            args.append(make(_host_array(index, dtype, shape)))
        repeated.append(args)
    return repeated


def alloc_arguments(device, args_info, alloc_repeat):
    return _arrays(args_info, alloc_repeat, lambda a: tvm.runtime.tensor(a, device))


def alloc_arguments_rpc(session, device, args_info, alloc_repeat):
    return _arrays(args_info, alloc_repeat, lambda a: tvm.runtime.tensor(a, device))


def run_evaluator(rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    if rt_mod.implements_function(_HANG_MARKER, query_imports=True):
        time.sleep(3600)
    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def run_evaluator_rpc(session, rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


# -- search --------------------------------------------------------------------------------


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
        for cand in measure_candidates:
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
    raises on some candidates that built and ran fine (TVM-0.27-NOTES.md), and an exception
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
            self.log(f"cost model update failed ({_first_line(err)}); retrying without unfit candidates")
        good = [i for i, c in enumerate(candidates) if self._extracts(context, c)]
        if good:
            try:
                self.inner.update(context, [candidates[i] for i in good], [results[i] for i in good])
            except Exception as err:  # noqa: BLE001
                self.log(f"cost model update failed again, skipped: {_first_line(err)}")

    def predict(self, context, candidates):
        try:
            return self.inner.predict(context, candidates)
        except Exception as err:  # noqa: BLE001
            self.log(f"cost model prediction failed ({_first_line(err)}); ranking unfit candidates last")
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
            self.bar.write(f"progress callback: {_first_line(err)}")

    def _failed(self, tile, error: str) -> None:
        self.failed += 1
        _log_failure(self.failures, tile, error)
        self.bar.write(f"  skipped a candidate of tile {tile[0]}x{tile[1]}: {_first_line(error)}")

    def _show(self) -> None:
        if self.best_tile is None:
            self.bar.set_postfix_str("best -")
        else:
            tflops = self.flops / self.best_secs / 1e12
            self.bar.set_postfix_str(f"best {tflops:.3g} TFLOP/s ({self.best_tile[0]}x{self.best_tile[1]})")


def _first_line(err) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the message; Python tracebacks too
    return (lines[-1] if lines else type(err).__name__)[:200]


# -- the work directory --------------------------------------------------------------------


def repair_database(work_dir: str | os.PathLike) -> int:
    """Drop lines of the JSON database that a killed run cut short (they would stop the whole
    database from loading). Returns the number of lines dropped."""
    dropped = 0
    workloads = Path(work_dir) / records.WORKLOADS
    n_workloads = None
    for path in (workloads, Path(work_dir) / records.RECORDS):
        if not path.exists():
            continue
        raw = path.read_text()
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


def _measured(db, mods) -> list[list]:
    """The records of each workload in ``mods`` (failed ones included)."""
    hashes = {records.workload_hash(m): i for i, m in enumerate(mods)}
    out: list[list] = [[] for _ in mods]
    for rec in db.get_all_tuning_records():
        i = hashes.get(records.workload_hash(rec.workload.mod))
        if i is not None and _compat.structural_equal(rec.workload.mod, mods[i]):
            out[i].append(rec)
    return out


# -- tuning ----------------------------------------------------------------------------------


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


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker: expected HOST:PORT such as 127.0.0.1:9190, got {text!r}")
    return host, int(port)


def tune(spec: KernelSpec, *, trials: int, work_dir: str | os.PathLike, shape: Shape | None = None,
         tiles=None, seed: int | None = None, rpc_tracker: str | None = None, rpc_key: str | None = None,
         logs_dir: str | os.PathLike | None = None, schedules_dir: str | os.PathLike | None = None,
         trials_per_iter: int | None = None, build_timeout: float = 120.0, run_timeout: float = 30.0,
         progress: bool = True, log=print) -> TuneResult:
    """Tune ``spec`` for ``trials`` measured candidates in total (those already in ``work_dir``
    count), then export the best record of each tile (``logs_dir=None``: no export)."""
    # Step 1. Check the arguments before anything slow.
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: expected a positive int, got {trials!r}")
    if (rpc_tracker is None) != (rpc_key is None):
        raise ValueError(f"rpc_key: expected --rpc-tracker and --rpc-key together, got tracker={rpc_tracker!r}, "
                         f"key={rpc_key!r}")
    if rpc_tracker is not None:
        parse_tracker(rpc_tracker)
    space = space_for(spec)
    tiles = [tuple(t) for t in (tiles or space.tiles)]
    unknown = [t for t in tiles if t not in space.tiles]
    if unknown:
        raise ValueError(f"tiles: expected a subset of {list(space.tiles)} ({space.name}), got {unknown}")
    shape = shape or default_shape(spec)
    if shape.heads != shape.heads_kv * spec.group:
        raise ValueError(f"shape: expected heads = heads_kv * {spec.group} (GQA group), got {shape.heads} / "
                         f"{shape.heads_kv}")

    # Step 2. The work dir's database, repaired if a killed run cut a line short.
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    repaired = repair_database(work_dir)
    if repaired:
        log(f"work dir: dropped {repaired} damaged database line(s) left by an interrupted run")
    space.prepare()  # first: reading a database of tensorized records needs their intrinsics registered
    db = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    target = space.target(spec.tvm_target)
    if candidate_device_code(spec)[0] == "source":  # the runner's workers compile them with NVRTC: it
        _compat.ensure_cuda_headers()                 # needs the CUDA headers

    with _logs(work_dir / "logs"):
        # Step 3. One task per tile; a tile whose design space fails is skipped, never fatal.
        budget = [0]  # trials left, shared by the tasks' search strategies
        tasks, skipped = _tasks(spec, space, target, tiles, shape, seed, db, budget, log)

        # Step 4. Measure what is missing.
        done = sum(len(recs) for recs in _measured(db, [t.mod for t in tasks]))
        budget[0] = trials - done
        measured_now = failed_now = 0
        if budget[0] > 0:
            if done:
                log(f"resuming: {done} trial(s) already in {work_dir}, {budget[0]} to go")
            measured_now, failed_now = _search(spec, tasks, db, budget[0], work_dir, shape, rpc_tracker, rpc_key,
                                               trials_per_iter, build_timeout, run_timeout, progress)
            if measured_now < trials - done:
                log(f"search space exhausted after {measured_now} new trial(s) (every distinct candidate measured)")

    # Step 5. The fastest record of each tile that computes the right thing; exported.
    result = TuneResult(spec, shape, str(work_dir), 0, measured_now, failed_now, skipped_tiles=skipped,
                        repaired=repaired)
    can_validate = _can_run_here(spec)
    all_recs = _measured(db, [t.mod for t in tasks])
    result.trials = sum(len(recs) for recs in all_recs)
    measured = [sorted((r for r in recs if records.mean_run_secs(r) < records.FAILED_RUN), key=records.mean_run_secs)
                for recs in all_recs]
    if any(measured) and not can_validate:
        log("records exported unvalidated: this machine has no GPU to check them on")
    # MetaSchedule measured each candidate on the workload specialised to the measured shape;
    # build compiles the any-shape kernel (the even build where the lengths allow), whose ranking
    # can differ, and serves every length. The best few of each tile (and the hand config) are
    # timed as build makes them, at the measured shape and at the other ranking lengths.
    from .build import _fused_schedule

    hand = _fused_schedule(spec, spec.tvm_target)[0]
    best_tiles = sorted((i for i, ok in enumerate(measured) if ok), key=lambda i: records.mean_run_secs(measured[i][0]))
    pool = [(i, rec) for i in best_tiles[:RERANK_TILES]
            for rec in _rerank_pool(space, tasks[i], measured[i], hand)] if can_validate else []
    deployed = {}  # id(record) -> {seq_len: seconds}, all ranking lengths timed
    if len(pool) > 1:
        shapes = rank_shapes(spec, shape)
        log(f"timing {len(pool)} candidates as build compiles them (any shape) at "
            f"seqlen {', '.join(str(s.seq_q) for s in shapes)}")
        try:
            times = deployed_times(spec, shapes, [(tasks[i].tile, rec) for i, rec in pool], build_timeout)
            deployed = {id(rec): {s.seq_q: t for s, t in zip(shapes, secs)} for (_, rec), secs in zip(pool, times)
                        if max(secs) < records.FAILED_RUN}
        except Exception as err:  # noqa: BLE001 - never fatal: the workload times rank them then
            log(f"timing the built kernels failed ({_first_line(err)}); ranking on the workload times")
    for i, (task, ok) in enumerate(zip(tasks, measured)):
        ranked = sorted(ok, key=lambda r: (geomean(deployed[id(r)].values()) if id(r) in deployed else math.inf,
                                           records.mean_run_secs(r)))
        tile = TileResult(task.tile, None, math.inf, why_not="no candidate ran")
        for rec in ranked[:VALIDATE_TRIES]:
            why = validate_record(spec, task.tile, rec) if can_validate else None
            if why is None:
                static, secs_at = records.mean_run_secs(rec), deployed.get(id(rec), {})
                if secs_at:  # the exported record's run time: as built, at the measured shape
                    rec = ms.database.TuningRecord(rec.trace, rec.workload, [secs_at[shape.seq_q]], rec.target,
                                                   rec.args_info)
                tile = TileResult(task.tile, identify_config(space, task.tile, rec, task.mod),
                                  records.mean_run_secs(rec), rec, validated=can_validate, workload_secs=static,
                                  secs_at=secs_at)
                break
            tile.why_not = f"its fastest records compute wrong results ({why})"
            _log_failure(work_dir / "failures.log", task.tile, f"validation: {why}")
            log(f"tile {task.tile[0]}x{task.tile[1]}: a record is fast but fails validation: {why}")
        result.tiles.append(tile)
    if logs_dir is not None and result.best is not None:
        _export(result, space, target, Path(logs_dir), schedules_dir, rpc_tracker, shape.flops(spec))
    return result


@dataclass
class _Task:
    tile: tuple[int, int]
    mod: tvm.IRModule
    ctx: ms.TuneContext


def _tasks(spec, space: Space, target, tiles, shape: Shape, seed, db, budget: list, log) -> tuple[list, dict]:
    tasks, skipped = [], {}
    for tile, task_seed in zip(tiles, ms.utils.fork_seed(seed, n=len(tiles))):
        mod = workload(spec, tile, shape)
        earlier = _measured(db, [mod])[0]
        mutators = {MutateCategorical(task_seed): 1.0} if space.apply is not None else {}
        ctx = _compat.tune_context(
            mod=mod,
            target=target,
            space_generator=ms.space_generator.ScheduleFn(_faulty(space.sch_fn(tile), tile), sch_rules=[],
                                                         postprocs=space.postprocs(), mutator_probs=mutators),
            search_strategy=SkipMeasured(
                ms.search_strategy.EvolutionarySearch(
                    population_size=64, init_min_unmeasured=min(16, space.size(tile)), init_measured_ratio=0.25,
                    genetic_num_iters=3, max_fail_count=8),
                measured={scheduled_hash(rec) for rec in earlier}, budget=budget),
            task_name=f"tile_{tile[0]}x{tile[1]}",
            rand_state=task_seed,
            num_threads=os.cpu_count() or 1,
            logger=logging.getLogger(f"{_MS_LOGGER}.tvmflash.tile_{tile[0]}x{tile[1]}"),
        )
        try:
            if not ctx.generate_design_space():
                raise ValueError("no design space")
        except Exception as err:  # noqa: BLE001
            skipped[tile] = _first_line(err)
            log(f"tile {tile[0]}x{tile[1]}: skipped, its design space fails: {skipped[tile]}")
            continue
        tasks.append(_Task(tile, mod, ctx))
    if not tasks:
        raise ValueError(f"tiles: no tile of {tiles} has a valid design space ({skipped})")
    return tasks, skipped


def _search(spec, tasks: list, db, remaining: int, work_dir: Path, shape: Shape, rpc_tracker, rpc_key,
            trials_per_iter, build_timeout: float, run_timeout: float, progress: bool) -> tuple[int, int]:
    """MetaSchedule's gradient task scheduler over the tasks; returns (measured, failed)."""
    from tqdm import tqdm

    tiles = [t.tile for t in tasks]
    best_secs, best_tile = math.inf, None
    for tile, recs in zip(tiles, _measured(db, [t.mod for t in tasks])):
        for rec in recs:
            secs = records.mean_run_secs(rec)
            if secs < min(best_secs, records.FAILED_RUN):
                best_secs, best_tile = secs, tile
    per_iter = trials_per_iter or max(1, min(16, math.ceil(remaining / len(tasks))))
    cores = max(1, os.cpu_count() or 1)
    bar = tqdm(total=remaining, desc=spec.key, unit="trial", disable=not progress, dynamic_ncols=True)
    callback = Progress(bar, tiles, shape.flops(spec), work_dir / "failures.log", best_secs, best_tile)
    try:
        ms.tune_tasks(
            tasks=[t.ctx for t in tasks],
            task_weights=[1.0] * len(tasks),
            work_dir=str(work_dir),
            max_trials_global=remaining,
            num_trials_per_iter=per_iter,
            builder=_builder(spec, min(cores, per_iter), build_timeout),
            runner=_runner(spec, rpc_tracker, rpc_key, run_timeout),
            database=db,
            cost_model=GuardedCostModel(ms.cost_model.XGBModel(num_tuning_cores=cores, adaptive_training=True),
                                        log=bar.write),
            measure_callbacks=[
                ms.measure_callback.AddToDatabase(),
                ms.measure_callback.RemoveBuildArtifact(),
                ms.measure_callback.UpdateCostModel(),
                callback,
            ],
            task_scheduler="gradient",
        )
    finally:
        bar.close()
    return callback.measured, callback.failed


_MS_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def _logs(directory: Path):
    """MetaSchedule's log (task tables, per-task search logs) to ``directory/tuning.log``, only
    warnings to the console (the progress bar says the rest). Restored afterwards. (MetaSchedule's
    own ``get_loggers_from_work_dir`` prints every iteration to stdout and fails on a second call
    in a process under pytest's log capture.)"""
    directory.mkdir(parents=True, exist_ok=True)
    ms_logger = logging.getLogger(_MS_LOGGER)
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


def _faulty(sch_fn, tile):
    """``sch_fn``, raising for a tile named by a ``space:`` fault (test hook)."""
    if ("space", f"{tile[0]}x{tile[1]}") not in _faults():
        return sch_fn

    def broken(sch):
        raise RuntimeError(f"{FAULT_ENV}: injected design-space failure for tile {tile[0]}x{tile[1]}")

    return broken


VALIDATE_TRIES = 3  # records per tile tried, fastest first
#: Max |out - reference| a record may reach on the validation shape (P and O rounded to dtype).
VALIDATE_TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}
RERANK_PER_TILE = 3  # records per tile timed as build compiles them (the fastest on the workload) ...
RERANK_TILES = 2  # ... in the tiles whose best workload times are the lowest


def _rerank_pool(space: Space, task, ok: list, hand) -> list:
    """The records of one tile worth timing as ``build`` compiles them: the ``RERANK_PER_TILE``
    fastest on the workload, and the hand config's (``hand``) where the search measured it."""
    pool = list(ok[:RERANK_PER_TILE])
    if (hand.block_m, hand.block_n) == tuple(task.tile) and len(ok) > len(pool):
        target = _compat.structural_hash(space.schedule(task.mod["main"], hand).mod)
        pool += [rec for rec in ok[RERANK_PER_TILE:] if scheduled_hash(rec) == target][:1]
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


def deployed_times(spec: KernelSpec, shapes: list[Shape], candidates: list, build_timeout: float = 120.0,
                   reps: int = 10) -> list[list[float]]:
    """Seconds per call of each (tile, record)'s kernel as ``build`` compiles it, at each shape:
    the trace replayed on the any-shape definition (the even build where a shape's lengths are
    tile multiples, as ``attention`` picks it), exported as ``build`` exports it
    (``export_candidate``). Compiled in parallel; at each shape timed in turn (``reps`` rounds
    of one ``time_evaluator`` sample each) so that clock drift is shared. A candidate that fails
    to build or run gets ``records.FAILED_RUN``."""
    from . import definition as D

    def even(tile, shape):
        return spec.is_cuda and shape.seq_q % tile[0] == 0 and shape.seq_k % tile[1] == 0

    keys = sorted({(i, even(tile, sh)) for i, (tile, _) in enumerate(candidates) for sh in shapes})
    mods = []
    for i, is_even in keys:
        tile, rec = candidates[i]
        sch = _compat.Schedule(D.fused_attention(spec.replace(even=is_even), *tile))
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        mods.append(sch.mod)
    builder = _builder(spec, max(1, min(len(mods), os.cpu_count() or 1)), build_timeout)
    built = dict(zip(keys, builder.build([ms.builder.BuilderInput(m, spec.tvm_target) for m in mods])))
    dev = tvm.cuda(0) if spec.is_cuda else tvm.cpu()
    loaded = {}
    for key, res in built.items():
        if res.error_msg is None:
            try:
                loaded[key] = tvm.runtime.load_module(res.artifact_path)
            except Exception:  # noqa: BLE001 - ranked last
                pass
    out = [[records.FAILED_RUN] * len(shapes) for _ in candidates]
    for s_idx, shape in enumerate(shapes):
        b, sq, sk, h, d = shape.batch, shape.seq_q, shape.seq_k, shape.heads, spec.head_dim
        # q, k, v as the runner measured the workload with (``_host_array``)
        args = [tvm.runtime.tensor(_host_array(i, spec.dtype, s), dev)
                for i, s in enumerate(((b, sq, h, d), (b, sk, shape.heads_kv, d), (b, sk, shape.heads_kv, d)))]
        args += [tvm.runtime.empty((b, sq, h, d), spec.dtype, dev), tvm.runtime.empty((b, h, sq), "float32", dev),
                 d**-0.5]
        timers, samples = {}, {}
        for i, (tile, _) in enumerate(candidates):
            mod = loaded.get((i, even(tile, shape)))
            if mod is None:
                continue
            try:
                f = mod.time_evaluator("main", dev, number=5, repeat=1)
                f(*args)  # warm up
                timers[i], samples[i] = f, []
            except Exception:  # noqa: BLE001 - ranked last
                pass
        for _ in range(reps):
            for i, f in timers.items():
                samples[i].append(f(*args).mean)
        for i in samples:
            out[i][s_idx] = float(np.median(samples[i]))
        del args
    return out


def _can_run_here(spec: KernelSpec) -> bool:
    return tvm.cuda(0).exist if spec.is_cuda else True


def validate_record(spec: KernelSpec, tile, record) -> str | None:
    """None if ``record``'s schedule, replayed on the dynamic-shape function and built as
    ``build`` builds, matches the float64 reference on a shape it was never measured on (lengths
    no tile multiple, seqlen_q != seqlen_k); else what is wrong. MetaSchedule measures time only:
    this keeps a fast but wrong candidate out of the logs."""
    import tempfile

    from . import definition as D
    from .kernel import _numpy_dtype
    from .reference import attention_reference

    b, sq, sk, hk, d = 1, 200, 333, 2, spec.head_dim
    h = hk * spec.group
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(_numpy_dtype(spec.dtype)) for s in ((b, sq, h, d), (b, sk, hk, d),
                                                                                 (b, sk, hk, d)))
    try:
        sch = _compat.Schedule(D.fused_attention(spec, *tile))
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        with tvm.transform.PassContext(config=_pass_config(spec)), _compat.cuda_source_modules():
            ex = tvm.compile(sch.mod, target=spec.tvm_target, tir_pipeline=_compat.TIR_PIPELINE)
        with tempfile.TemporaryDirectory() as tmp:
            ex.export_library(os.path.join(tmp, "candidate.so"))
            func = tvm.runtime.load_module(os.path.join(tmp, "candidate.so"))["main"]
            dev = tvm.cuda(0) if spec.is_cuda else tvm.cpu()
            out = tvm.runtime.empty((b, sq, h, d), spec.dtype, dev)
            lse = tvm.runtime.empty((b, h, sq), "float32", dev)
            func(*(tvm.runtime.tensor(x, dev) for x in (q, k, v)), out, lse, d**-0.5)
            out, lse = out.numpy().astype(np.float64), lse.numpy().astype(np.float64)
    except Exception as err:  # noqa: BLE001
        return f"it does not build or run here: {_first_line(err)}"
    ref, ref_lse = attention_reference(q, k, v, causal=spec.causal)
    err = float(np.abs(out - ref).max())
    finite = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max()) if finite.any() else 0.0
    if not (err <= VALIDATE_TOLERANCE[spec.dtype] and lse_err <= 1e-3):  # NaN fails too
        return (f"max |out - ref| = {err:.2e} (tolerance {VALIDATE_TOLERANCE[spec.dtype]:.0e}), "
                f"max |lse - ref| = {lse_err:.2e} (tolerance 1e-03)")
    return None


def _log_failure(path: Path, tile, error: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"--- {records.now()} tile {tile[0]}x{tile[1]}\n{error.rstrip()}\n")


def _pass_config(spec: KernelSpec) -> dict:
    from .build import _fused_schedule

    return dict(_fused_schedule(spec, spec.tvm_target)[3])


def _runner(spec: KernelSpec, rpc_tracker: str | None, rpc_key: str | None, timeout: float):
    evaluator = ms.runner.EvaluatorConfig(
        number=3 if spec.is_cuda else 2, repeat=3 if spec.is_cuda else 2,
        min_repeat_ms=100 if spec.is_cuda else 20, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator,
                                     f_alloc_argument=alloc_arguments, f_run_evaluator=run_evaluator)
    host, port = parse_tracker(rpc_tracker)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                       session_timeout_sec=int(math.ceil(timeout))),
        evaluator_config=evaluator, f_alloc_argument=alloc_arguments_rpc, f_run_evaluator=run_evaluator_rpc)


def identify_config(space: Space, tile, record, mod) -> dict | None:
    """The schedule config a record's trace amounts to: the knob values for which the hand
    schedule function builds the same TensorIR. (None: no config does, which would mean the
    trace left the schedule function's path.)"""
    sch = _compat.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    func = mod["main"]
    for config in space.configs(tile):
        if _compat.structural_equal(space.schedule(func, config).mod, sch.mod):
            return records.config_dict(config)
    return None


def device_description(spec: KernelSpec, rpc_tracker: str | None) -> str:
    """What the candidates ran on: the GPU name and compute capability, or the CPU model."""
    if spec.is_cuda and rpc_tracker is None:
        dev = tvm.cuda(0)
        if dev.exist:
            return f"{dev.device_name} (sm_{dev.compute_version.replace('.', '')})"
        return "unknown CUDA device"
    if rpc_tracker is not None:
        return f"RPC device via tracker {rpc_tracker}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mcpu = spec.tvm_target.attrs.get("mcpu", "")
    return f"{model} ({mcpu}, {os.cpu_count()} cores)"


def _measured_code(spec: KernelSpec) -> dict | str:
    """tuning.json's ``device_code``: the machine code the candidates were measured as."""
    form, archs = candidate_device_code(spec)
    if form != "fatbin":
        return {"source": "NVRTC where measured", "host": "LLVM"}.get(form, form)
    return {"form": form, "archs": list(archs), "nvcc": nvcc.nvcc_version(nvcc.require_nvcc("tuning")),
            "flags": list(nvcc.FLAGS)}


def _export(result: TuneResult, space: Space, target, logs_dir: Path, schedules_dir, rpc_tracker, flops):
    spec = result.spec
    tiles = sorted((t for t in result.tiles if t.record is not None), key=rank_key)
    meta = {
        "key": spec.key,
        "spec": spec.to_dict(),
        "schedule": space.name,
        "target": json.loads(str(target)) if str(target).startswith("{") else str(target),
        "shape": result.shape.to_dict(),
        "softmax_scale": softmax_scale(spec),
        "trials": result.trials,
        "device": device_description(spec, rpc_tracker),
        "device_code": _measured_code(spec),
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
        path = Path(schedules_dir) / records.target_id(spec.target) / f"{spec.key}.py"
        best = tiles[0]
        records.write_schedule_py(path, spec, space.name, meta["tiles"][0], meta, best.record.trace)
        result.schedule_py = str(path)
