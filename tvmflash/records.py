"""Tuning logs in the repository: ``tuning_logs/<target>/<key>/`` and ``schedules/<target>/<key>.py``.

``tvmflash tune`` writes, per kernel variant, a pruned MetaSchedule JSON database (the best record
of each tile shape it tuned: ``database_workload.json.xz`` + ``database_tuning_record.json.xz``) and
``tuning.json`` (measured shape, device, versions, trials, the time of each tile). ``build``
asks ``lookup`` for the fastest record whose workload still matches the TensorIR definition and
replays its trace on the dynamic-shape function; without one it uses the hand config and says why.

``$TVMFLASH_TUNING_LOGS`` moves the logs (``off`` or an empty value: never use tuned records);
the default is the ``tuning_logs/`` directory of the source checkout tvmflash runs from (none
for an installed wheel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import _compat
from ._compat import ms, tvm
from .spec import KernelSpec, target_id

METADATA = "tuning.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
XZ = ".xz"  # committed logs hold the two database files xz-compressed
FAILED_RUN = 1e9  # MetaSchedule stores failed candidates with a run time of 1e10 s
_REPO = Path(__file__).resolve().parent.parent


@functools.cache
def _checkout() -> Path | None:
    """The source checkout tvmflash runs from (an editable install), if it does (looked up once:
    ``logs_root`` is read on every GPU ``attention`` call)."""
    return _REPO if (_REPO / "pyproject.toml").exists() and (_REPO / "tuning_logs").is_dir() else None


_OFF = [False]  # set by ``tuning_logs_off``


@contextlib.contextmanager
def tuning_logs_off():
    """Within: no tuned record is used (``logs_root`` is None), as with TVMFLASH_TUNING_LOGS=off."""
    before, _OFF[0] = _OFF[0], True
    try:
        yield
    finally:
        _OFF[0] = before


def logs_root() -> Path | None:
    """Where tuning logs are read from and written to (None: tuned records are off)."""
    if _OFF[0]:
        return None
    env = os.environ.get("TVMFLASH_TUNING_LOGS")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env)
    repo = _checkout()
    return repo / "tuning_logs" if repo else None


def schedules_root() -> Path | None:
    repo = _checkout()
    return repo / "schedules" if repo else None


def variant_dir(root: Path, spec: KernelSpec) -> Path:
    return Path(root) / target_id(spec.target) / spec.key


@dataclass
class TunedRecord:
    """The best record of a variant's log, ready to replay."""

    spec: KernelSpec
    tile: tuple[int, int]
    config: dict  # the schedule's config at that record (tile and knobs)
    record: object  # ms.database.TuningRecord
    run_secs: float
    database: str  # the log directory
    workload: str  # structural hash of the measured workload
    measured: dict = field(default_factory=dict)  # shape, device, trials: from tuning.json

    def apply(self, func) -> _compat.Schedule:
        """The record's trace replayed on ``func`` (the dynamic-shape definition at this tile)."""
        sch = _compat.Schedule(func)
        self.record.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch

    def describe(self) -> dict:
        """The manifest's ``schedule`` entry."""
        return {
            "source": "tuned record",
            "database": self.database,
            "workload": self.workload,
            "run_ms": round(self.run_secs * 1e3, 6),
            **self.measured,
        }


def mean_run_secs(record) -> float:
    secs = [float(s) for s in (record.run_secs or [])]
    return sum(secs) / len(secs) if secs else float("inf")


def workload_hash(mod) -> str:
    return f"{_compat.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def open_database(directory: Path, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database in ``directory``: a work dir's plain files, or a committed log's
    xz-compressed ones (read into memory from a scratch copy, deleted at once: query it, never
    commit to it)."""
    directory = Path(directory)
    if not create and (directory / (WORKLOADS + XZ)).exists():
        import lzma
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tvmflash-log-") as scratch:
            for name in (WORKLOADS, RECORDS):
                (Path(scratch) / name).write_bytes(lzma.decompress((directory / (name + XZ)).read_bytes()))
            return open_database(scratch)  # JSONDatabase reads both files when it is created
    return ms.database.JSONDatabase(
        path_workload=str(directory / WORKLOADS),
        path_tuning_record=str(directory / RECORDS),
        allow_missing=create,
    )


def _compress(directory: Path) -> None:
    """Replace the database files of ``directory`` by their xz form (a tenth of the size: the
    logs travel with the source tree)."""
    import lzma

    for name in (WORKLOADS, RECORDS):
        path = Path(directory) / name
        (Path(directory) / (name + XZ)).write_bytes(lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
        path.unlink()


def lookup(spec: KernelSpec, schedule: str, root: Path | None = None) -> tuple[TunedRecord | None, str]:
    """(the fastest matching record, "") or (None, why there is none) for ``spec`` built with
    the schedule function ``schedule``."""
    root = logs_root() if root is None else Path(root)
    if root is None:
        return None, "tuned records are off (TVMFLASH_TUNING_LOGS)"
    vdir = variant_dir(root, spec)
    if not (vdir / METADATA).exists():
        return None, f"no tuning log for {spec.key} in {vdir.parent}"
    return load_variant(vdir, spec, schedule)


def load_variant(vdir: Path, spec: KernelSpec, schedule: str) -> tuple[TunedRecord | None, str]:
    """``lookup`` in one log directory: each tile's workload is rebuilt from the current
    definition (the measured shape and scale from tuning.json) and looked up by structural
    hash; the first tile of tuning.json (``tune`` lists them best first) whose record matches
    wins."""
    from .space import Shape, workload

    vdir = Path(vdir)
    meta_path = vdir / METADATA
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("schedule") != schedule:
            return None, f"the log in {vdir} tuned {meta.get('schedule')}, this build uses {schedule}"
        shape = Shape(**meta["shape"])
        if spec.is_cuda and schedule == "schedule_cuda.schedule_fused_cuda":
            from . import intrinsics  # the records' traces name TVM's mma/ldmatrix intrinsics

            intrinsics.intrinsics(spec.dtype)
        db = open_database(vdir)
        best = None
        for entry in meta["tiles"]:
            tile = (entry["config"]["block_m"], entry["config"]["block_n"])
            mod = workload(spec, tile, shape, meta["softmax_scale"])
            record = db.query_tuning_record(mod, spec.tvm_target, "main") if db.has_workload(mod) else None
            if record is None:
                continue
            secs = mean_run_secs(record)
            if secs < FAILED_RUN:
                best = TunedRecord(
                    spec, tile, dict(entry["config"]), record, secs, str(vdir), workload_hash(mod),
                    {"measured": {"shape": meta["shape"], "device": meta.get("device"), "trials": meta.get("trials"),
                                  "date": meta.get("date")}},
                )
                break
    except Exception as err:  # a damaged log must not break build: fall back, say why
        return None, f"the tuning log in {vdir} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if best is None:
        return None, f"no record in {vdir} matches the current TensorIR definition (changed since tuning?)"
    return best, ""


def _log_specs(spec: KernelSpec) -> tuple[KernelSpec, ...]:
    """The specs whose tuning log serves ``spec``, in order: its own; for an even build, then the
    general build's (the same schedule: the trace names blocks and tiles, never a bound check; at
    the measured static shape both builds fold to one kernel where the lengths are tile
    multiples, as the default 4096 is for every tile but 96)."""
    return (spec, spec.replace(even=False)) if spec.even else (spec,)


def schedule_from_log(spec: KernelSpec, schedule: str):
    """For ``build``: (the dynamic-shape function at the record's tile, its Schedule with the
    record's trace replayed, the manifest's schedule entry), or (None, None, {"tuning": why}).
    Never raises: a log that does not replay falls back to the hand config, saying why."""
    from . import definition as D
    from .space import space_for

    whys = []
    for candidate in _log_specs(spec):
        tuned, why = lookup(candidate, schedule)
        if tuned is not None:
            break
        whys.append(why)
    if tuned is None:
        return None, None, {"tuning": "; ".join(whys)}
    try:
        space_for(spec).prepare()
        func = D.fused_attention(spec, *tuned.tile)
        return func, tuned.apply(func), {**tuned.describe(), "config": tuned.config}
    except Exception as err:  # noqa: BLE001
        return None, None, {"tuning": f"the record in {tuned.database} does not replay "
                                      f"({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]})"}


def planned_tile(spec: KernelSpec, schedule: str) -> tuple[int, int] | None:
    """The tile of the record ``build`` would replay for ``spec`` (the fastest of its log, or of
    the general build's for an even spec), from ``tuning.json`` alone: no database, no compile.
    None: no log of ``schedule``. (A stale log still names a tile here; build then falls back to
    the hand config, which ``Kernel.accepts`` checks again.)"""
    root = logs_root()
    if root is None:
        return None
    for candidate in _log_specs(spec):
        try:
            meta = json.loads((variant_dir(root, candidate) / METADATA).read_text())
            if meta.get("schedule") == schedule and meta.get("tiles"):
                config = meta["tiles"][0]["config"]
                return int(config["block_m"]), int(config["block_n"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def write_variant(root: Path, spec: KernelSpec, meta: dict, records: list) -> Path:
    """Replace ``root/<target>/<key>/`` with a pruned database of ``records`` (one per workload)
    and ``meta``. Written beside it and renamed into place: a reader never sees half a log."""
    vdir = variant_dir(root, spec)
    vdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = vdir.parent / f".{spec.key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    db = open_database(tmp, create=True)
    for rec in records:
        workload = db.commit_workload(rec.workload.mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
    del db  # the database's files are complete once it is gone
    _compact_workloads(tmp / WORKLOADS)
    _compress(tmp)
    (tmp / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    old = vdir.parent / f".{spec.key}.old-{os.getpid()}"
    if vdir.exists():
        vdir.rename(old)
    tmp.rename(vdir)
    if old.exists():
        shutil.rmtree(old)
    return vdir


def _compact_workloads(path: Path) -> None:
    """Re-encode each workload of a JSON database without the indentation TVM writes (half the
    size; the database reads it back unchanged). A workload is base64 of an 8-byte length and the
    JSON text of the IRModule."""
    import base64
    import struct

    lines = []
    for line in path.read_text().splitlines():
        shash, blob = json.loads(line)
        raw = base64.b64decode(blob)
        (n,) = struct.unpack("<Q", raw[:8])
        text = json.dumps(json.loads(raw[8 : 8 + n]), separators=(",", ":")).encode()
        lines.append(json.dumps([shash, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()]))
    path.write_text("".join(line + "\n" for line in lines))


def write_schedule_py(path: Path, spec: KernelSpec, schedule: str, entry: dict, meta: dict, trace) -> Path:
    """The best trace as readable Python (``trace.as_python()``) with what it was measured on."""
    cfg = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
    shape = meta["shape"]
    lines = [
        f'"""{spec.key}: the fastest schedule `tvmflash tune` found ({meta["date"][:10]}, {meta["trials"]} trials).',
        "",
        f"{schedule}({cfg})",
        f"{entry['run_ms']:.4f} ms, {entry['tflops']:.3f} TFLOP/s at batch {shape['batch']}, seqlen "
        f"{shape['seq_q']}/{shape['seq_k']}, {shape['heads']}/{shape['heads_kv']} heads, on {meta['device']}",
        f"(TVM {meta['tvm_version']}, tvm-ffi {meta['tvm_ffi_version']}).",
        "",
        f"`tvmflash build` replays the record in tuning_logs/{target_id(spec.target)}/{spec.key}/, not this file;",
        "`tvmflash tune` regenerates it.",
        '"""',
        "",
        "",
        f"def apply(sch):  # sch: a tvm.s_tir.Schedule of definition.fused_attention(spec, "
        f"{entry['config']['block_m']}, {entry['config']['block_n']})",
    ]
    lines += ["    " + line for line in trace.as_python(remove_postproc=False)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def config_dict(config) -> dict:
    return dataclasses.asdict(config)
