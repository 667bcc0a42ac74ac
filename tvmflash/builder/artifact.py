"""A built kernel on disk: ``<key>.so`` (the runtime module), ``<key>.json`` (its manifest) and,
for CUDA, ``<key>.cu`` (the generated source, for reading).

The manifest records the spec, the rule and config that built it, the tuning record used (or why
none), the TensorIR before and after scheduling, the device code embedded, the versions, and the
size and SHA-256 of the module and the source (``files``): ``verify`` checks a built kernel
against them before anything loads it. Every file is written under a temporary name and renamed
into place, under a per-key lock (``key_lock``) that also clears what a killed build left.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import hashlib
import json
import os
import re
import tempfile
import time

from .. import _compat
from ..compiler import device_code as DC
from ..spec import KernelSpec
from ..version import __version__
from .lower import Lowered, compile_lowered, lower
from .plan import plan

MANIFEST_VERSION = 2
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def manifest(lowered: Lowered, build_seconds: float) -> dict:
    spec = lowered.spec
    return {
        "manifest_version": MANIFEST_VERSION,
        "key": spec.key,
        "spec": spec.to_dict(),
        "target": json.loads(str(spec.tvm_target)) if str(spec.tvm_target).startswith("{") else str(spec.tvm_target),
        "functions": list(lowered.entry),
        "arguments": _argument_layout(spec),
        "schedule": {"source": "hand config", "rule": lowered.rule, "config": lowered.config, **lowered.tuning},
        "tvm_version": _compat.TVM_VERSION,
        "tvm_ffi_version": _compat.TVM_FFI_VERSION,
        "tvmflash_version": _version(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 3),
    }


#: The kernel arguments of the variants (``KernelSpec.input_buffers``, ``scalar_params``).
_VARIANT_ARGUMENTS = {
    "alibi_slopes": "[batch, heads] float32: the scaled score of (i, j) gets -slope * |i + seqlen_k - seqlen_q - j|",
    "seqused_k": "[batch] int32 <= seqlen_k: batch b sees its first seqused_k[b] keys, causal and window "
                 "aligned to that length",
    "block_table": "[batch, max_pages] int32: key j of batch b at row j % page_size of page block_table[b, j // "
                   "page_size] of k, v [num_pages, page_size, heads_kv, head_dim]",
    "cu_seqlens_q": "[batch + 1] int32: prefix sums of the sequences' query rows in the packed q, out",
    "cu_seqlens_k": "[batch + 1] int32: prefix sums of the sequences' keys in the packed k, v",
    "max_seqlen_q": "int32 >= every sequence's query rows: the grid's query tiles",
    "max_seqlen_k": "int32 >= every sequence's keys",
    "softcap": "float32 > 0: scores become softcap * tanh(scores / softcap)",
    "window_left": "int32 >= 0: row i sees keys from i + seqlen_k - seqlen_q - window_left",
    "window_right": "int32 >= 0: row i sees keys up to i + seqlen_k - seqlen_q + window_right",
}


def _argument_layout(spec: KernelSpec) -> dict:
    d = spec.head_dim
    if spec.varlen:
        layout = {
            "q": f"[total_q, heads, {d}] {spec.dtype}",
            "k": f"[total_k, heads / {spec.group}, {d}] {spec.dtype}",
            "v": f"[total_k, heads / {spec.group}, {d}] {spec.dtype}",
            "out": f"[total_q, heads, {d}] {spec.dtype}",
            "lse": "[heads, total_q] float32 (natural log)",
        }
    else:
        layout = {
            "q": f"[batch, seqlen_q, heads, {d}] {spec.dtype}",
            "k": f"[batch, seqlen_k, heads / {spec.group}, {d}] {spec.dtype}",
            "v": f"[batch, seqlen_k, heads / {spec.group}, {d}] {spec.dtype}",
            "out": f"[batch, seqlen_q, heads, {d}] {spec.dtype}",
            "lse": "[batch, heads, seqlen_q] float32 (natural log)",
        }
    return {
        **layout,
        **{name: _VARIANT_ARGUMENTS[name] for name in spec.input_buffers},
        "softmax_scale": "float32, default 1/sqrt(head_dim)",
        **{name: _VARIANT_ARGUMENTS[name] for name in spec.scalar_params[1:]},
    }


def _version() -> str:
    return __version__


def build(spec: KernelSpec, out_dir: str | os.PathLike, *, device_code: str = "auto",
          device_archs=None) -> tuple[str, str]:
    """Compile ``spec`` and write ``out_dir/<key>.so`` and ``out_dir/<key>.json`` (and, for CUDA,
    ``<key>.cu``).

    device_code (CUDA targets): what the module carries for the GPU.
      'fatbin' - nvcc machine code for ``device_archs`` plus PTX of the first arch: loading needs
                 only the CUDA driver.
      'ptx'    - nvcc PTX of the first arch: the driver JIT-compiles it when loaded.
      'source' - the CUDA source: TVM compiles it with NVRTC when loaded (needs cuda-bindings
                 and the CUDA headers there).
      'auto'   - 'fatbin' when nvcc is found here, else 'source'.
    device_archs: e.g. ('sm_80', 'sm_90') or 'sm_80,sm_90'; default: the target's arch, plus
    sm_90 for a target below it (``nvcc.default_archs``).

    Every file is written under a temporary name and renamed into place, so a reader (or a
    second process building the same key) never sees a half-written artifact.
    """
    out_dir = os.fspath(out_dir)
    DC.device_code_form(spec, device_code, device_archs)  # the arguments, before anything slow
    os.makedirs(out_dir, exist_ok=True)
    with key_lock(out_dir, checked_key(spec)):
        return build_locked(spec, out_dir, device_code=device_code, device_archs=device_archs)


def checked_key(spec: KernelSpec) -> str:
    """``spec.key``, which names files: ValueError unless it is letters, digits, '_' and '-'."""
    key = spec.key
    if not _KEY.fullmatch(key):
        raise ValueError(f"spec: its key {key!r} would not be a plain file name")
    return key


@contextlib.contextmanager
def key_lock(directory: str, key: str):
    """The exclusive lock of ``key`` in ``directory`` (``<key>.lock``, never followed if it is a
    symbolic link); within it, the temporary files a killed build of the key left are removed."""
    path = os.path.join(directory, key + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        if os.path.islink(path):
            raise PermissionError(f"lock: expected a file, got a symbolic link at {path}; refusing to follow it") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(key)}.*")):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_atomic(directory: str, key: str, suffix: str, data: bytes, final: str, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # mkstemp makes 0600; a shared output directory must be readable
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def build_locked(spec: KernelSpec, out_dir: str, *, device_code: str = "auto", device_archs=None):
    """``build``, with ``key_lock`` held by the caller."""
    key = checked_key(spec)
    form = DC.device_code_form(spec, device_code, device_archs)
    t0 = time.perf_counter()
    lowered = lower(spec)
    ex = compile_lowered(lowered)
    source = DC.device_source(ex, spec)
    device, pack_imports = (DC.embed_device_code(spec, source, form, device_code, device_archs)
                            if spec.is_cuda else (None, None))
    so_path = os.path.join(out_dir, key + ".so")
    json_path = os.path.join(out_dir, key + ".json")
    cu_path = os.path.join(out_dir, key + ".cu")
    fd, tmp_so = tempfile.mkstemp(prefix=f".{key}.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        ex.mod.export_library(tmp_so, fpack_imports=pack_imports)
        os.chmod(tmp_so, 0o644)
        info = manifest(lowered, time.perf_counter() - t0)
        if device is not None:
            info["device_code"] = device
        info["tir"] = {"before": lowered.before.script(), "after": lowered.mod.script()}
        info["source"] = source
        info["files"] = {"so": _digest(tmp_so)}
        if spec.is_cuda:  # the CUDA source beside the module, for reading
            info["files"]["cu"] = {"bytes": len(source.encode()), "sha256": hashlib.sha256(source.encode()).hexdigest()}
            _write_atomic(out_dir, key, ".cu", source.encode(), cu_path)
        # the manifest first, then the module: a module is never beside another module's manifest
        _write_atomic(out_dir, key, ".json", json.dumps(info, indent=1).encode(), json_path)
        os.replace(tmp_so, so_path)
    finally:
        if os.path.exists(tmp_so):
            os.unlink(tmp_so)
    return so_path, json_path


def spec_identity(spec: KernelSpec) -> dict:
    """What makes two specs the same kernel: their fields, the target as TVM reads it."""
    return {**spec.to_dict(), "target": str(spec.tvm_target)}


def read_manifest(json_path: str) -> dict:
    """The manifest at ``json_path``; ValueError naming the file if it is not one."""
    try:
        with open(json_path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"path: {json_path} is not a kernel manifest (not JSON: {err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
        raise ValueError(f"path: {json_path} is not a kernel manifest (no spec)")
    return manifest


def check_files(base: str, manifest: dict) -> None:
    """ValueError unless ``<base>.so`` has the size and SHA-256 its manifest records (checked
    before the module is loaded: a damaged or replaced module is refused, never run)."""
    so = base + ".so"
    recorded = (manifest.get("files") or {}).get("so")
    if not recorded:
        raise ValueError(f"path: the manifest of {so} records no checksum of it (built by tvmflash before "
                         f"{_version()}, manifest version {manifest.get('manifest_version')}): rebuild it")
    if os.path.getsize(so) != recorded["bytes"]:
        raise ValueError(f"path: {so} is {os.path.getsize(so)} bytes, its manifest says {recorded['bytes']}: "
                         f"damaged or replaced; rebuild it")
    if _digest(so)["sha256"] != recorded["sha256"]:
        raise ValueError(f"path: {so} does not match the SHA-256 its manifest records: damaged or replaced; "
                         f"rebuild it")


def verify(base: str, spec: KernelSpec) -> str | None:
    """None if ``<base>.so`` + ``<base>.json`` is what building ``spec`` now would give: built by
    this TVM and tvmflash, for this very spec, by the rule and config its plan names now, module
    (and source) matching the manifest's checksums. Else why not."""
    json_path = base + ".json"
    if not (os.path.exists(json_path) and os.path.exists(base + ".so")):
        return "not built"
    try:
        m = read_manifest(json_path)
        if m.get("manifest_version") != MANIFEST_VERSION:
            return f"manifest version {m.get('manifest_version')}, this tvmflash writes {MANIFEST_VERSION}"
        for field, now in (("tvm_version", _compat.TVM_VERSION), ("tvm_ffi_version", _compat.TVM_FFI_VERSION),
                           ("tvmflash_version", _version())):
            if m.get(field) != now:
                return f"built with {field} {m.get(field)}, this is {now}"
        if m.get("key") != spec.key or spec_identity(KernelSpec.from_dict(m["spec"])) != spec_identity(spec):
            return f"the manifest describes {m.get('key')} ({m['spec']}), not {spec.key}"
        p = plan(spec)
        schedule = m.get("schedule", {})
        planned = json.loads(json.dumps(p.rule.config_dict(p.config)))  # as the manifest holds it
        if schedule.get("rule") != p.rule.name or schedule.get("config") != planned:
            return (f"built by rule {schedule.get('rule')} with {schedule.get('config')}; the plan now is rule "
                    f"{p.rule.name} with {planned}")
        check_files(base, m)
        cu = base + ".cu"
        recorded = m["files"].get("cu")
        if recorded and not (os.path.exists(cu) and _digest(cu)["sha256"] == recorded["sha256"]):
            return f"{cu} is missing or does not match its manifest"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return str(err)
    return None
