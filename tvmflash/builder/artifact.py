"""A built kernel on disk: ``<key>.so`` (the runtime module), ``<key>.json`` (its manifest) and,
for CUDA, ``<key>.cu`` (the generated source, for reading).

The manifest records the spec, the rule and config that built it, the tuning record used (or why
none), the TensorIR before and after scheduling, the device code embedded, and the versions.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time

from .. import _compat
from ..compiler import device_code as DC
from ..spec import KernelSpec
from .lower import Lowered, compile_lowered, lower

MANIFEST_VERSION = 1


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
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 3),
    }


def _argument_layout(spec: KernelSpec) -> dict:
    d = spec.head_dim
    return {
        "q": f"[batch, seqlen_q, heads, {d}] {spec.dtype}",
        "k": f"[batch, seqlen_k, heads / {spec.group}, {d}] {spec.dtype}",
        "v": f"[batch, seqlen_k, heads / {spec.group}, {d}] {spec.dtype}",
        "out": f"[batch, seqlen_q, heads, {d}] {spec.dtype}",
        "lse": "[batch, heads, seqlen_q] float32 (natural log)",
        "softmax_scale": "float32, default 1/sqrt(head_dim)",
    }


def build(spec: KernelSpec, out_dir: str | os.PathLike, *, device_code: str = "auto",
          device_archs=None) -> tuple[str, str]:
    """Compile ``spec`` and write ``out_dir/<key>.so`` and ``out_dir/<key>.json``.

    device_code (CUDA targets): what the module carries for the GPU.
      'fatbin' - nvcc machine code for ``device_archs`` plus PTX of the first arch: loading needs
                 only the CUDA driver.
      'ptx'    - nvcc PTX of the first arch: the driver JIT-compiles it when loaded.
      'source' - the CUDA source: TVM compiles it with NVRTC when loaded (needs cuda-bindings
                 and the CUDA headers there).
      'auto'   - 'fatbin' when nvcc is found here, else 'source'.
    device_archs: e.g. ('sm_80', 'sm_90') or 'sm_80,sm_90'; default: the target's arch, plus
    sm_90 for a target below it (``nvcc.default_archs``).

    Both files are written under temporary names and renamed into place, so a reader (or a
    second process building the same key) never sees a half-written artifact.
    """
    out_dir = os.fspath(out_dir)
    form = DC.device_code_form(spec, device_code, device_archs)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    lowered = lower(spec)
    ex = compile_lowered(lowered)
    source = DC.device_source(ex, spec)
    device, pack_imports = (DC.embed_device_code(spec, source, form, device_code, device_archs)
                            if spec.is_cuda else (None, None))
    so_path = os.path.join(out_dir, spec.key + ".so")
    json_path = os.path.join(out_dir, spec.key + ".json")
    fd, tmp_so = tempfile.mkstemp(prefix=f".{spec.key}.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        ex.mod.export_library(tmp_so, fpack_imports=pack_imports)
        info = manifest(lowered, time.perf_counter() - t0)
        if device is not None:
            info["device_code"] = device
        info["tir"] = {"before": lowered.before.script(), "after": lowered.mod.script()}
        info["source"] = source
        fd, tmp_json = tempfile.mkstemp(prefix=f".{spec.key}.", suffix=".json", dir=out_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh, indent=1)
        for tmp in (tmp_so, tmp_json):
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable
        if spec.is_cuda:  # the CUDA source beside the module, for reading
            with open(os.path.join(out_dir, spec.key + ".cu"), "w") as fh:
                fh.write(info["source"])
        os.replace(tmp_json, json_path)
        os.replace(tmp_so, so_path)
    finally:
        if os.path.exists(tmp_so):
            os.unlink(tmp_so)
    return so_path, json_path
