"""MetaSchedule tuning runs end to end on the CPU (llvm): the CLI killed and resumed, faulty
candidates, wrong records, an RPC tracker, and build from the logs they write. They share one
tuned work dir (``tuned_work``), each test on a copy of it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from tvmflash import KernelSpec, lower
from tvmflash import _compat
from tvmflash import definition as D
from tvmflash._compat import Schedule, ms, structural_equal, tvm
from tvmflash.tuning import TuneOptions, measure, rank, records, search, tune
from tvmflash.tuning import space as SP

from helpers import check_numerics

REPO = Path(__file__).resolve().parent.parent


# -- real tuning runs on the CPU ---------------------------------------------------------------


def _tune_cmd(work, logs, sched, trials, *extra):
    return [sys.executable, "-m", "tvmflash.cli", "tune", "--target", "cpu", "--head-dim", "32",
            "--seqlen", "128", "--heads", "2", "--tiles", "32x64", "--trials", str(trials), "--trials-per-iter", "2",
            "--work-dir", str(work), "--logs-dir", str(logs), "--schedules-dir", str(sched), "--seed", "0", *extra]


def _record_lines(work):
    path = Path(work) / records.RECORDS
    return path.read_text().splitlines() if path.exists() else []


TRIALS = 4  # of the killed and resumed run: 2 per batch (--trials-per-iter), killed after the first


@pytest.fixture(scope="session")
def tuned_work(tmp_path_factory):
    """One `tvmflash tune` run on the CPU, SIGKILLed mid-run and resumed: the work dir every
    end-to-end tuning test starts from (each on its own copy), and what the runs printed. (Session
    scope: made once however the tests of this module are ordered among others'.)"""
    tmp_path = tmp_path_factory.mktemp("tuned")
    work, logs, sched = tmp_path / "work", tmp_path / "logs", tmp_path / "schedules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_tune_cmd(work, logs, sched, TRIALS), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.time() + 600
            while len(_record_lines(work)) < 2:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no record committed in 10 minutes"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its build/run workers
            proc.wait()
    committed = _record_lines(work)
    with open(work / records.RECORDS, "a") as fh:  # as if killed in the middle of a write
        fh.write(committed[-1][: len(committed[-1]) // 2])
    res = subprocess.run(_tune_cmd(work, logs, sched, TRIALS), capture_output=True, text=True, env=env, timeout=900)
    return types.SimpleNamespace(work=work, logs=logs, sched=sched, committed=committed, res=res)


def _copy_work(tuned_work, tmp_path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(tuned_work.work, work, ignore=shutil.ignore_patterns("logs"))
    return work


@pytest.mark.slow
def test_tune_killed_resumed_then_built(tuned_work, monkeypatch, rng):
    """`tvmflash tune` end to end: SIGKILL mid-run, resume (no committed record lost, a record
    cut by the kill dropped, nothing measured twice, exactly --trials in all), export, build from
    the log, correct on lengths never measured."""
    work, logs, sched, committed, res = (tuned_work.work, tuned_work.logs, tuned_work.sched, tuned_work.committed,
                                         tuned_work.res)
    assert 2 <= len(committed) < TRIALS
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "dropped 1 damaged database line" in res.stdout
    assert f"resuming: {len(committed)} trial(s) already" in res.stdout
    assert f"{TRIALS} trials in the work dir ({TRIALS - len(committed)} new, 0 of them failed)" in res.stdout
    assert "TFLOP/s" in res.stderr and "trial" in res.stderr  # the progress bar
    lines = _record_lines(work)
    assert lines[: len(committed)] == committed and len(lines) == TRIALS
    db = ms.database.JSONDatabase(work_dir=str(work), allow_missing=False)
    hashes = [search.scheduled_hash(rec) for rec in db.get_all_tuning_records()]
    assert len(set(hashes)) == TRIALS, "a candidate was measured twice"

    spec = KernelSpec(32)
    vdir = records.variant_dir(logs, spec)
    meta = json.loads((vdir / records.METADATA).read_text())
    assert meta["trials"] == TRIALS and meta["rule"] == "fused_cpu"
    assert meta["shape"] == {"batch": 8, "seq_q": 128, "seq_k": 128, "heads": 2, "heads_kv": 2}
    assert meta["tvm_version"] == _compat.TVM_VERSION and meta["tvm_ffi_version"] == _compat.TVM_FFI_VERSION
    assert len(records.open_database(vdir)) == 1  # pruned: best per tile
    # run_ms: the exported record's time as build compiles it (timed after the search, here on the
    # CPU); workload_ms: MetaSchedule's time of that record, one of the work dir's
    (exported,) = records.open_database(vdir).get_all_tuning_records()
    assert meta["tiles"][0]["run_ms"] == pytest.approx(records.mean_run_secs(exported) * 1e3, rel=1e-5)
    measured = [records.mean_run_secs(r) * 1e3 for r in db.get_all_tuning_records()]
    assert any(meta["tiles"][0]["workload_ms"] == pytest.approx(ms, rel=1e-5) for ms in measured), measured

    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(logs))
    lowered = lower(spec)
    assert lowered.tuning["source"] == "tuned record" and lowered.config == meta["tiles"][0]["config"]
    check_numerics(lowered.mod, spec, rng, seq_q=300, seq_k=41, heads=3)
    # the readable schedule is the same schedule, and says where it comes from
    text = (sched / records.target_id("cpu") / f"{spec.key}.py").read_text()
    assert "Generated by `tvmflash tune`" in text and f"tuning_logs/{records.target_id('cpu')}/{spec.key}/" in text
    scope: dict = {}
    exec(text, scope)
    sch = Schedule(D.fused_attention(spec, 32, 64))
    scope["apply"](sch)
    assert structural_equal(sch.mod, lowered.mod)


@tvm.ir.utils.derived_object
class _FaultyBuilder(ms.builder.PyBuilder):
    """The tuner's builder, except that candidates whose TensorIR holds ``fail`` fail to build
    and those holding ``hang`` are noted (``hangs``: their artifacts) for ``_FaultyRunner``."""

    def __init__(self, inner, fail: str, hang: str, hangs: set):
        self.inner, self.fail, self.hang, self.hangs = inner, fail, hang, hangs

    def build(self, build_inputs):
        scripts = [inp.mod.script() for inp in build_inputs]
        real = [i for i, text in enumerate(scripts) if self.fail not in text]
        results = [ms.builder.BuilderResult(None, "injected build failure (test)") for _ in build_inputs]
        for i, res in zip(real, self.inner.build([build_inputs[i] for i in real])):
            results[i] = res
            if self.hang in scripts[i] and res.error_msg is None:
                self.hangs.add(res.artifact_path)
        return results


@tvm.ir.utils.derived_object
class _FaultyRunner(ms.runner.PyRunner):
    """The tuner's runner, except that noted candidates run on a runner whose evaluator sleeps
    past the timeout (a hanging kernel)."""

    def __init__(self, inner, hanging, hangs: set):
        self.inner, self.hanging, self.hangs = inner, hanging, hangs

    def run(self, runner_inputs):
        stuck = [i for i, inp in enumerate(runner_inputs) if inp.artifact_path in self.hangs]
        fine = [i for i in range(len(runner_inputs)) if i not in stuck]
        futures = [None] * len(runner_inputs)
        for group, runner in ((stuck, self.hanging), (fine, self.inner)):
            if group:
                for i, fut in zip(group, runner.run([runner_inputs[i] for i in group])):
                    futures[i] = fut
        return futures


@pytest.mark.slow
def test_faulty_candidates_are_skipped_never_fatal(tuned_work, tmp_path, monkeypatch):
    """A candidate whose build raises, one whose run hangs past the timeout and a tile whose
    design space raises: each logged and skipped, the others tuned (faults injected by wrapping
    the tuner's builder, runner and design space; production code has no fault hooks)."""
    import cloudpickle

    import tune_faults
    from tvmflash.tuning import tuner as tune_mod

    cloudpickle.register_pickle_by_value(tune_faults)  # the runner's workers cannot import tests/
    hangs: set = set()
    make_builder, make_runner, space_for = measure.make_builder, measure.make_runner, tune_mod.space_for
    monkeypatch.setattr(measure, "make_builder", lambda *a, **kw: _FaultyBuilder(
        make_builder(*a, **kw), "acc_s = T.sblock_alloc_buffer((16, 32))", "acc_s = T.sblock_alloc_buffer((32, 32))",
        hangs))
    monkeypatch.setattr(measure, "make_runner", lambda spec, tracker, key, timeout: _FaultyRunner(
        make_runner(spec, tracker, key, timeout),
        ms.runner.LocalRunner(timeout_sec=timeout, f_run_evaluator=tune_faults.hang), hangs))
    monkeypatch.setattr(tune_mod, "space_for", lambda spec: tune_faults.broken_space(space_for(spec), (64, 64)))
    work = _copy_work(tuned_work, tmp_path)
    spec = KernelSpec(32)
    done = len(_record_lines(work))
    res = tune(spec, TuneOptions(trials=done + 3, work_dir=work, shape=SP.Shape(8, 128, 128, 2, 2),
                                 tiles=[(16, 32), (32, 32), (32, 64), (64, 64)], trials_per_iter=1, run_timeout=2,
                                 logs_dir=tmp_path / "logs", progress=False, seed=0), log=lambda msg: None)
    # the task scheduler's first round gives each task one trial
    assert res.measured_now == 3 and res.failed_now == 2
    assert "injected design-space failure" in res.skipped_tiles[(64, 64)]
    by_tile = {t.tile: t for t in res.tiles}
    assert by_tile[(16, 32)].record is None and by_tile[(32, 32)].record is None
    assert res.best.tile == (32, 64) and res.best.run_secs < records.FAILED_RUN
    failures = (work / "failures.log").read_text()
    assert "tile 16x32" in failures and "injected build failure" in failures
    assert "tile 32x32" in failures and "Timeout" in failures
    meta = json.loads((records.variant_dir(tmp_path / "logs", spec) / records.METADATA).read_text())
    assert [t["config"]["block_n"] for t in meta["tiles"]] == [64]


@pytest.mark.slow
def test_wrong_records_never_reach_the_logs(tuned_work, tmp_path, monkeypatch):
    """The fastest record failing validation, the next one is exported instead (the work dir's
    records: nothing new is measured)."""
    real, calls = rank.validate_record, []

    def first_is_wrong(spec, tile, record):
        calls.append(records.mean_run_secs(record))
        return "wrong on purpose (test)" if len(calls) == 1 else real(spec, tile, record)

    monkeypatch.setattr(rank, "validate_record", first_is_wrong)
    work = _copy_work(tuned_work, tmp_path)
    spec = KernelSpec(32)
    res = tune(spec, TuneOptions(trials=TRIALS, work_dir=work, shape=SP.Shape(8, 128, 128, 2, 2), tiles=[(32, 64)],
                                 logs_dir=tmp_path / "logs", progress=False, seed=0), log=lambda msg: None)
    assert res.measured_now == 0
    # tried in the order of their times as built; the second one tried is exported
    assert len(calls) == 2 and calls[0] != calls[1]
    assert res.best.workload_secs == calls[1] and res.best.validated
    meta = json.loads((records.variant_dir(tmp_path / "logs", spec) / records.METADATA).read_text())
    assert meta["tiles"][0]["workload_ms"] == pytest.approx(calls[1] * 1e3, rel=1e-5) and meta["tiles"][0]["validated"]
    assert "validation: wrong on purpose (test)" in (work / "failures.log").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tune_through_rpc_tracker(tuned_work, tmp_path, monkeypatch, rng):
    """Measured by an RPC server registered with a tracker, both on loopback (free ports): the
    work dir's run resumed there, one more trial. First with no tracker behind the address: the
    run stops with a clear error and records nothing (such candidates once counted against the
    budget as failed and were never measured on resume)."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    work = _copy_work(tuned_work, tmp_path)
    spec = KernelSpec(32)
    before = _record_lines(work)
    closed = socket.socket()  # answers, then hangs up: no tracker behind it (fails at once, no retries)
    closed.bind(("127.0.0.1", 0))
    closed.listen(8)
    threading.Thread(target=lambda: [closed.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
    dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(search.RunnerUnreachable, match=rf"rpc_tracker: the runner could not be reached \(RPC tracker "
                                                       rf"{dead}, key 'tvmflash-test'"):
        tune(spec, TuneOptions(trials=TRIALS + 1, work_dir=work, shape=SP.Shape(8, 128, 128, 2, 2), tiles=[(32, 64)],
                               rpc_tracker=dead, rpc_key="tvmflash-test", trials_per_iter=1, run_timeout=1,
                               progress=False, seed=0), log=lambda msg: None)
    assert _record_lines(work) == before
    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    procs = [tracker.proc]
    server = None
    try:
        port = _free_port()
        server = Server(host="127.0.0.1", port=port, port_end=port + 1, tracker_addr=("127.0.0.1", tracker.port),
                        key="tvmflash-test", silent=True)
        procs.append(server.proc)
        res = tune(spec, TuneOptions(trials=TRIALS + 1, work_dir=work, shape=SP.Shape(8, 128, 128, 2, 2), tiles=[(32, 64)],
                                     rpc_tracker=f"127.0.0.1:{tracker.port}", rpc_key="tvmflash-test",
                                     logs_dir=tmp_path / "logs", progress=False, seed=0), log=lambda msg: None)
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()
    assert not any(p.is_alive() for p in procs), "the RPC server or tracker outlived the test"
    assert res.measured_now == 1 and res.failed_now == 0 and res.best.run_secs < records.FAILED_RUN
    meta = json.loads((records.variant_dir(tmp_path / "logs", spec) / records.METADATA).read_text())
    assert meta["device"] == f"RPC device via tracker 127.0.0.1:{tracker.port}" and meta["trials"] == TRIALS + 1
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "logs"))
    lowered = lower(spec)
    assert lowered.tuning["source"] == "tuned record"
    check_numerics(lowered.mod, spec, rng)
