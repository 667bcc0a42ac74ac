"""Tuning logs: ``tuning_logs/<target>/<key>/`` and ``schedules/<target>/<key>.py``.

``tvmflash tune`` writes, per kernel variant, a pruned MetaSchedule JSON database (the best record
of each tile shape it tuned: ``database_workload.json.xz`` + ``database_tuning_record.json.xz``) and
``tuning.json`` (the rule, measured shape, device, versions, trials, the config and time of each
tile, best first). ``build`` takes the first tile's config (``best_entry``: tuning.json alone) and
replays that tile's record (``load_record``, ``replay``) on the dynamic-shape function.

A log is input from a file, and a trace is a program: ``check_trace`` lets through only the
instructions, annotations and tensor intrinsics that the rule's own schedule produces, and
refuses the rest, naming the record.

``$TVMFLASH_TUNING_LOGS`` moves the logs (``off`` or an empty value: never use tuned records);
the default is the ``tuning_logs/`` directory of the source checkout tvmflash runs from (none
for an installed wheel).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import json
import lzma
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import _compat
from .._compat import ms
from ..spec import KernelSpec, target_id

METADATA = "tuning.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
XZ = ".xz"  # committed logs hold the two database files xz-compressed
FAILED_RUN = 1e9  # MetaSchedule stores failed candidates with a run time of 1e10 s
_REPO = Path(__file__).resolve().parents[2]


class LogError(ValueError):
    """A tuning log (or a work dir's database) that cannot be used as it is; says which file."""


class UntrustedTrace(LogError):
    """A trace holding what its rule's schedule never produces: refused, never replayed."""


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
    return _root(os.environ.get("TVMFLASH_TUNING_LOGS"))


@functools.lru_cache(maxsize=64)
def _root(env: str | None) -> Path | None:
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env)
    repo = _checkout()
    return repo / "tuning_logs" if repo else None


def schedules_root() -> Path | None:
    repo = _checkout()
    return repo / "schedules" if repo else None


def variant_dir(root: Path, spec: KernelSpec) -> Path:
    return Path(root) / target_id(spec.target) / spec.key


def log_specs(spec: KernelSpec) -> tuple[KernelSpec, ...]:
    """The specs whose tuning log serves ``spec``, in order: its own; for an even build, then the
    general build's (the same schedule: the trace names blocks and tiles, never a bound check; at
    the measured static shape both builds fold to one kernel where the lengths are tile
    multiples, as the default 4096 is for every tile but 96)."""
    return (spec, spec.replace(even=False)) if spec.even else (spec,)


# -- reading ------------------------------------------------------------------------------------


def log_stamp(spec: KernelSpec) -> tuple:
    """(inode, size, modification time) of each ``tuning.json`` that could serve ``spec``: a
    cache of what they say stays current while this does not change (``tvmflash tune`` renames a
    new log into place: a new file)."""
    root = logs_root()
    if root is None:
        return ()
    stamps = []
    for path in _meta_paths(spec, root):
        try:
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


@functools.lru_cache(maxsize=1024)
def _meta_paths(spec: KernelSpec, root: Path) -> tuple[str, ...]:
    return tuple(str(variant_dir(root, candidate) / METADATA) for candidate in log_specs(spec))


@dataclass
class Entry:
    """The best tile of a variant's log, from ``tuning.json``: what ``build`` will use."""

    spec: KernelSpec  # the spec the log was tuned for (an even build's may be the general one's)
    vdir: Path
    meta: dict
    config: dict  # the rule's config at that tile (tile and knobs)

    @property
    def tile(self) -> tuple[int, int]:
        return int(self.config["block_m"]), int(self.config["block_n"])


def best_entry(spec: KernelSpec, rule) -> tuple[Entry | None, str]:
    """(the first tile of the log that serves ``spec`` built by ``rule``, "") or (None, why there
    is none). Reads ``tuning.json`` only: no database, no compile."""
    root = logs_root()
    if root is None:
        return None, "tuned records are off (TVMFLASH_TUNING_LOGS)"
    whys = []
    for candidate in log_specs(spec):
        vdir = variant_dir(root, candidate)
        if not (vdir / METADATA).exists():
            whys.append(f"no tuning log for {candidate.key} in {vdir.parent}")
            continue
        entry, why = read_entry(vdir, candidate, rule)
        if entry is not None:
            return entry, ""
        whys.append(why)
    return None, "; ".join(whys)


def read_entry(vdir: Path, spec: KernelSpec, rule) -> tuple[Entry | None, str]:
    """(the first tile of the log in ``vdir``, tuned for ``spec`` with ``rule``, "") or (None, why
    it serves none)."""
    vdir = Path(vdir)
    try:
        meta = read_meta(vdir)
        logged = meta.get("rule", meta.get("schedule"))
        if logged != rule.name:
            return None, f"the log in {vdir} was tuned for rule {logged!r}, this build uses {rule.name!r}"
        if not meta.get("tiles"):
            return None, f"the log in {vdir} holds no tile"
        config = dict(meta["tiles"][0]["config"])
        rule.config_from_dict(config)  # a config of this rule
        return Entry(spec, vdir, meta, config), ""
    except (OSError, LogError, KeyError, TypeError, ValueError) as err:
        return None, f"the tuning log in {vdir} could not be read ({type(err).__name__}: {first_line(err)})"


def read_meta(vdir: Path) -> dict:
    path = Path(vdir) / METADATA
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LogError(f"{path}: not a JSON text ({first_line(err)})") from None
    if not isinstance(meta, dict):
        raise LogError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


@dataclass
class TunedRecord:
    """A log's record of one tile, ready to replay."""

    spec: KernelSpec
    tile: tuple[int, int]
    config: dict  # the rule's config at that record (tile and knobs)
    record: object  # ms.database.TuningRecord
    run_secs: float
    database: str  # the log directory
    workload: str  # structural hash of the measured workload
    measured: dict = field(default_factory=dict)  # shape, device, trials: from tuning.json

    def describe(self) -> dict:
        """The manifest's ``schedule`` entry."""
        return {
            "source": "tuned record",
            "database": self.database,
            "workload": self.workload,
            "run_ms": round(self.run_secs * 1e3, 6),
            **self.measured,
        }


def load_record(spec: KernelSpec, rule, entry: Entry) -> TunedRecord:
    """The record of ``entry``'s tile: its workload rebuilt from the current definition (the
    measured shape and scale from tuning.json) and looked up by structural hash. LogError when
    the database cannot be read or holds no record of that workload (a definition changed since
    tuning), naming the log."""
    from .space import Shape, workload

    meta = entry.meta
    try:
        shape = Shape(**meta["shape"])
        scale = float(meta["softmax_scale"])
    except (KeyError, TypeError, ValueError) as err:
        raise LogError(f"{entry.vdir / METADATA}: no measured shape and scale ({first_line(err)})") from None
    rule.prepare(spec)  # the records' traces name the rule's tensor intrinsics
    db = open_database(entry.vdir)
    mod = workload(entry.spec, entry.tile, shape, scale)  # as measured: the log's own spec
    record = db.query_tuning_record(mod, entry.spec.tvm_target, "main") if db.has_workload(mod) else None
    if record is None:
        raise LogError(f"no record in {entry.vdir} matches the current TensorIR definition at tile "
                       f"{entry.tile[0]}x{entry.tile[1]} (changed since tuning?)")
    secs = mean_run_secs(record)
    if not secs < FAILED_RUN:
        raise LogError(f"the record in {entry.vdir} of tile {entry.tile[0]}x{entry.tile[1]} is a failed run")
    return TunedRecord(spec, entry.tile, dict(entry.config), record, secs, str(entry.vdir), workload_hash(mod),
                       {"measured": {"shape": meta["shape"], "device": meta.get("device"),
                                     "trials": meta.get("trials"), "date": meta.get("date")}})


def check_trace(rule, spec: KernelSpec, trace, where: str) -> None:
    """UntrustedTrace unless every instruction of ``trace`` is one ``rule``'s schedule produces:
    its instruction kinds, annotation keys (an annotation such as ``pragma_import_llvm`` links
    foreign code into the kernel) and tensor intrinsics. ``where`` names the record."""
    allowed_intrinsics = None
    for inst in trace.insts:
        kind = inst.kind.name
        if kind not in rule.trace_instructions:
            raise UntrustedTrace(f"{where}: the trace holds a {kind} instruction, which rule {rule.name} never "
                                 f"writes (expected {sorted(rule.trace_instructions)}); refusing to replay it")
        if kind == "Annotate":
            key = str(inst.attrs[0])
            if key not in rule.trace_annotations:
                raise UntrustedTrace(f"{where}: the trace annotates {key!r}, which rule {rule.name} never writes "
                                     f"(expected {sorted(rule.trace_annotations)}); refusing to replay it")
        if kind == "Tensorize":
            if allowed_intrinsics is None:
                allowed_intrinsics = rule.trace_intrinsics(spec)
            name = str(inst.attrs[0])
            if name not in allowed_intrinsics:
                raise UntrustedTrace(f"{where}: the trace tensorizes with {name!r}, which rule {rule.name} never "
                                     f"uses (expected {sorted(allowed_intrinsics)}); refusing to replay it")


def replay(rule, spec: KernelSpec, trace, func, where: str) -> _compat.Schedule:
    """``trace`` replayed on ``func`` (a PrimFunc or a module), after ``check_trace``."""
    check_trace(rule, spec, trace, where)
    sch = _compat.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def mean_run_secs(record) -> float:
    secs = [float(s) for s in (record.run_secs or [])]
    return sum(secs) / len(secs) if secs else float("inf")


def workload_hash(mod) -> str:
    return f"{_compat.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def open_database(directory: Path, create: bool = False) -> ms.database.JSONDatabase:
    """The JSON database in ``directory``: a work dir's plain files, or a committed log's
    xz-compressed ones (read into memory from a scratch copy, deleted at once: query it, never
    commit to it). Each line is checked first (``check_database``): TVM's own reader fails on a
    damaged one with an error that names no file."""
    directory = Path(directory)
    if not create and (directory / (WORKLOADS + XZ)).exists():
        with tempfile.TemporaryDirectory(prefix="tvmflash-log-") as scratch:
            for name in (WORKLOADS, RECORDS):
                path = directory / (name + XZ)
                try:
                    data = lzma.decompress(path.read_bytes())
                except (lzma.LZMAError, OSError) as err:
                    raise LogError(f"{path}: not an xz file ({first_line(err)})") from None
                (Path(scratch) / name).write_bytes(data)
            check_database(scratch, shown=directory)
            return _open(scratch, False, shown=directory)
    if not create:
        check_database(directory)
    return _open(directory, create, shown=directory)


def _open(directory, create: bool, shown) -> ms.database.JSONDatabase:
    try:
        return ms.database.JSONDatabase(path_workload=str(Path(directory) / WORKLOADS),
                                        path_tuning_record=str(Path(directory) / RECORDS), allow_missing=create)
    except Exception as err:  # TVM raises its own error types, naming no file or line
        raise LogError(f"{_bad_line(directory, shown) or shown}: TVM cannot read the database "
                       f"({first_line(err)})") from None


def _bad_line(directory, shown) -> str | None:
    """'<file>, line N' of the first workload or record that MetaSchedule cannot parse."""
    workloads = []
    for name in (WORKLOADS, RECORDS):
        path = Path(directory) / name
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if name == WORKLOADS:
                    workloads.append(ms.database.Workload.from_json(obj))
                else:
                    ms.database.TuningRecord.from_json(obj[1], workloads[obj[0]])
            except Exception:  # noqa: BLE001 - any failure: this is the line
                return f"{Path(shown) / name}, line {number}"
    return None


def open_work_database(work_dir) -> ms.database.JSONDatabase:
    """A tuning work dir's JSON database (created where missing), checked line by line first."""
    check_database(work_dir)
    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    except Exception as err:  # TVM's own error names no file
        raise LogError(f"{_bad_line(work_dir, work_dir) or work_dir}: TVM cannot read the work dir's database "
                       f"({first_line(err)})") from None


def check_database(directory, shown=None) -> None:
    """LogError naming the file and line of the first line of the JSON database in ``directory``
    that is not what MetaSchedule writes: not UTF-8 text, not JSON, a workload whose base64 or
    length prefix is off, a record that names no workload before it."""
    directory, shown = Path(directory), Path(shown or directory)
    n_workloads = 0
    for name in (WORKLOADS, RECORDS):
        path = directory / name
        if not path.exists():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise LogError(f"{shown / name}: not a text file ({first_line(err)})") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{shown / name}, line {number}"
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise LogError(f"{where}: not JSON ({first_line(err)})") from None
            if name == WORKLOADS:
                _check_workload_line(obj, where)
                n_workloads += 1
            elif not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int) and not isinstance(obj[0], bool)
                      and 0 <= obj[0] < n_workloads and isinstance(obj[1], list)):
                raise LogError(f"{where}: expected [workload index < {n_workloads}, record], got {line[:80]!r}")


def _check_workload_line(obj, where: str) -> None:
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], str)):
        raise LogError(f"{where}: expected [structural hash, base64 IRModule]")
    try:
        raw = base64.b64decode(obj[1], validate=True)
    except (binascii.Error, ValueError) as err:
        raise LogError(f"{where}: the workload is not base64 ({first_line(err)})") from None
    if len(raw) < 8 or struct.unpack("<Q", raw[:8])[0] != len(raw) - 8:
        raise LogError(f"{where}: the workload's length prefix does not match its {max(len(raw) - 8, 0)} bytes")


def first_line(err) -> str:
    """The message of ``err`` in one line: its last non-empty line (TVM's errors end with the
    message), at most 200 characters."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


# -- writing ------------------------------------------------------------------------------------


def _compress(directory: Path) -> None:
    """Replace the database files of ``directory`` by their xz form (a tenth of the size: the
    logs travel with the source tree)."""
    for name in (WORKLOADS, RECORDS):
        path = Path(directory) / name
        (Path(directory) / (name + XZ)).write_bytes(lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
        path.unlink()


def write_variant(root: Path, spec: KernelSpec, meta: dict, records: list) -> Path:
    """Replace ``root/<target>/<key>/`` with a pruned database of ``records`` (one per workload)
    and ``meta``. Written beside it and renamed into place: a reader never sees half a log."""
    vdir = variant_dir(root, spec)
    vdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = vdir.parent / f".{spec.key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    db = _open(tmp, True, shown=tmp)
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
    lines = []
    for line in path.read_text().splitlines():
        shash, blob = json.loads(line)
        raw = base64.b64decode(blob)
        (n,) = struct.unpack("<Q", raw[:8])
        text = json.dumps(json.loads(raw[8 : 8 + n]), separators=(",", ":")).encode()
        lines.append(json.dumps([shash, base64.b64encode(struct.pack("<Q", len(text)) + text).decode()]))
    path.write_text("".join(line + "\n" for line in lines))


def write_schedule_py(path: Path, spec: KernelSpec, rule_name: str, entry: dict, meta: dict, trace,
                      log: str) -> Path:
    """The best trace as readable Python (``trace.as_python()``) with what it was measured on and
    the record it comes from (``log``: the log directory, relative to the repository)."""
    cfg = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
    shape = meta["shape"]
    lines = [
        f'"""{meta["key"]}: the fastest schedule `tvmflash tune` found ({meta["date"][:10]}, {meta["trials"]} trials).',
        "",
        f"Generated by `tvmflash tune` from the best record of {log}/",
        "(do not edit: `build` replays that record, not this file; a retune rewrites both).",
        "",
        f"rule {rule_name}: {cfg}",
        f"{entry['run_ms']:.4f} ms, {entry['tflops']:.3f} TFLOP/s at batch {shape['batch']}, seqlen "
        f"{shape['seq_q']}/{shape['seq_k']}, {shape['heads']}/{shape['heads_kv']} heads, on {meta['device']}",
        f"(TVM {meta['tvm_version']}, tvm-ffi {meta['tvm_ffi_version']}).",
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
