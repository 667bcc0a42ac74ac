"""Spec -> scheduled TensorIR -> compiled module -> ``<key>.so`` + ``<key>.json`` manifest.

Which schedule serves a spec:
  fused, cpu       -> ``schedule_cpu.schedule_fused_cpu``
  fused, cuda      -> ``schedule_cuda.schedule_fused_cuda`` (tensor cores: head dims 64 and
                      128, ``schedule_cuda.HEAD_DIMS``), else
                      ``schedule_cuda_simple.schedule_fused_cuda_simple``
  standard, cpu    -> ``schedule_cpu.schedule_standard_cpu``
  standard, cuda   -> TVM's stock GPU rules (``s_tir.dlight``), per function

A fused spec with a tuning record in ``tuning_logs/`` (``tvmflash tune``) replays the record's
trace of that schedule function instead of applying its hand config (``records``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

from . import _compat, records
from . import definition as D
from . import nvcc
from ._compat import tvm
from .spec import KernelSpec

MANIFEST_VERSION = 1


@dataclass
class Lowered:
    """A scheduled IRModule plus what produced it (recorded in the manifest)."""

    spec: KernelSpec
    mod: tvm.IRModule  # scheduled
    before: tvm.IRModule  # the TensorIR as defined, before scheduling
    schedule: str  # which schedule function
    config: dict = field(default_factory=dict)
    entry: tuple = ("main",)  # the module's functions, in call order
    pass_config: dict = field(default_factory=dict)  # PassContext options the schedule needs
    tuning: dict = field(default_factory=dict)  # tuned record used, or why none (manifest)


def lower(spec: KernelSpec) -> Lowered:
    """The scheduled TensorIR for ``spec``."""
    target = spec.tvm_target
    if spec.algorithm == "fused":
        cfg, apply, name, pass_config = _fused_schedule(spec, target)
        if spec.shape is None:
            func, sch, tuning = records.schedule_from_log(spec, name)
        else:  # tuning logs hold dynamic-shape workloads
            func, sch, tuning = None, None, {"reason": "static shape: tuning logs are for dynamic shapes"}
        if sch is not None:
            config = tuning.pop("config")
        else:
            tuning = {"source": "hand config", **tuning}
            func = D.fused_attention(spec, cfg.block_m, cfg.block_n)
            if spec.shape is not None:  # every extent known: bound checks and index arithmetic fold away
                func = D.specialize_shape(func, spec.shape_dims)
            sch = apply(func, cfg)
            config = dataclasses.asdict(cfg)
        return Lowered(spec, sch.mod, tvm.IRModule({"main": func}), name, config, ("main",), pass_config, tuning)

    before = D.standard_attention(spec)
    entry = (D.STD_QK, D.STD_SOFTMAX, D.STD_PV)
    if _compat.is_cuda(target):
        mod, rules = _schedule_standard_dlight(before, target)
        return Lowered(spec, mod, before, "s_tir.dlight (stock GPU rules)", {"rules": rules}, entry)
    from .schedule_cpu import default_cpu_config, schedule_standard_cpu

    cfg = default_cpu_config(spec.head_dim)
    mod = schedule_standard_cpu(before, cfg)
    return Lowered(spec, mod, before, "schedule_cpu.schedule_standard_cpu", dataclasses.asdict(cfg), entry)


def planned_tile(spec: KernelSpec) -> tuple[int, int]:
    """(block_m, block_n) that ``build(spec)`` will use (fused): the tuned record's tile, else the
    hand config's. Reads no database and compiles nothing."""
    cfg, _, name, _ = _fused_schedule(spec, spec.tvm_target)
    return records.planned_tile(spec, name) or (cfg.block_m, cfg.block_n)


def _fused_schedule(spec: KernelSpec, target):
    """(config, apply(func, config) -> Schedule, name, PassContext options) for a fused spec."""
    if not _compat.is_cuda(target):
        from . import schedule_cpu

        return (schedule_cpu.default_cpu_config(spec.head_dim), schedule_cpu.schedule_fused_cpu,
                "schedule_cpu.schedule_fused_cpu", {})
    from . import schedule_cuda

    if schedule_cuda.supports(spec):
        return (schedule_cuda.default_config(target, spec.head_dim),
                lambda func, cfg: schedule_cuda.schedule_fused_cuda(func, cfg, spec.dtype),
                "schedule_cuda.schedule_fused_cuda", schedule_cuda.pass_config(spec))
    from . import schedule_cuda_simple

    return (schedule_cuda_simple.default_simple_config(spec.head_dim), schedule_cuda_simple.schedule_fused_cuda_simple,
            "schedule_cuda_simple.schedule_fused_cuda_simple", {})


def _schedule_standard_dlight(mod: tvm.IRModule, target) -> tuple[tvm.IRModule, dict]:
    """Each function gets the first stock dlight rule that schedules it."""
    from tvm.s_tir import dlight as dl

    rules = [
        ("Matmul", dl.gpu.Matmul()),
        ("GEMV", dl.gpu.GEMV()),
        ("Reduction", dl.gpu.Reduction()),
        ("GeneralReduction", dl.gpu.GeneralReduction()),
        ("Fallback", dl.gpu.Fallback()),
    ]
    out, used = {}, {}
    for gv, func in mod.functions.items():
        single = tvm.IRModule({gv.name_hint: func})
        for rule_name, rule in rules:
            try:
                with target:
                    scheduled = dl.ApplyDefaultSchedule(rule)(single)
            except Exception:  # a stock rule that matches but cannot finish: try the next one
                continue
            f = scheduled[gv.name_hint]
            if f.attrs is not None and "tirx.is_scheduled" in f.attrs:
                out[gv.name_hint], used[gv.name_hint] = f, rule_name
                break
        else:  # pragma: no cover - Fallback schedules every function
            raise RuntimeError(f"no dlight rule scheduled {gv.name_hint}")
    return tvm.IRModule(out), used


def compile_lowered(lowered: Lowered):
    """``tvm.compile`` the scheduled module for the spec's target. No GPU is needed for CUDA:
    the module holds the generated CUDA source (on a GPU machine too), which ``build`` embeds
    as is or compiled by nvcc (``device_code``)."""
    with tvm.transform.PassContext(config=lowered.pass_config), _compat.cuda_source_modules():
        return tvm.compile(lowered.mod, target=lowered.spec.tvm_target, tir_pipeline=_compat.TIR_PIPELINE)


def manifest(lowered: Lowered, build_seconds: float) -> dict:
    spec = lowered.spec
    return {
        "manifest_version": MANIFEST_VERSION,
        "key": spec.key,
        "spec": spec.to_dict(),
        "target": json.loads(str(spec.tvm_target)) if str(spec.tvm_target).startswith("{") else str(spec.tvm_target),
        "functions": list(lowered.entry),
        "arguments": _argument_layout(spec),
        "schedule": {"source": "hand config", "function": lowered.schedule, "config": lowered.config,
                     **lowered.tuning},
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
    form = _device_code_form(spec, device_code, device_archs)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    lowered = lower(spec)
    ex = compile_lowered(lowered)
    source = _device_source(ex, spec)
    device, pack_imports = (_embed_device_code(spec, source, form, device_code, device_archs)
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


DEVICE_CODE_FORMS = ("auto", "fatbin", "ptx", "source")


def _device_code_form(spec: KernelSpec, device_code: str, device_archs) -> str:
    """The form to embed, after checking the arguments; FileNotFoundError if it needs nvcc and
    there is none."""
    if device_code not in DEVICE_CODE_FORMS:
        raise ValueError(f"device_code: expected one of {DEVICE_CODE_FORMS}, got {device_code!r}")
    if not spec.is_cuda:
        if device_code != "auto":
            raise ValueError(f"device_code: expected 'auto' for a CPU target ({spec.target}), got {device_code!r}")
        if device_archs is not None:
            raise ValueError(f"device_archs: expected None for a CPU target ({spec.target}), got {device_archs!r}")
        return "host"
    if device_archs is not None:
        nvcc.check_archs(device_archs, "device_archs")
        if device_code == "source":
            raise ValueError(f"device_archs: expected None with device_code='source' (the source is compiled "
                             f"where it is loaded), got {device_archs!r}")
    if device_code == "auto":
        return "fatbin" if nvcc.find_nvcc() else "source"
    if device_code != "source":
        nvcc.require_nvcc(f"device_code={device_code!r}")
    return device_code


def _embed_device_code(spec: KernelSpec, source: str, form: str, asked: str, device_archs):
    """(manifest entry, fpack_imports for export_library or None) for a CUDA module."""
    if form == "source":
        entry = {"form": "source", "load_needs": "NVRTC (pip install cuda-bindings) and the CUDA headers "
                 "($CUDA_PATH) where it is loaded; compiled there for the GPU present"}
        if asked == "auto":
            entry["why"] = "nvcc not found at build time"
        return entry, None
    tool = nvcc.require_nvcc(f"device_code={form!r}")
    archs = (nvcc.check_archs(device_archs, "device_archs") if device_archs is not None
             else nvcc.default_archs(_compat.cuda_arch(spec.tvm_target)))
    if form == "ptx":
        archs = archs[:1]
    code, log = nvcc.compile_source(source, form, archs, ptx_arch=archs[0], nvcc=tool)
    if form == "ptx":
        code += b"\0"  # the driver reads PTX as a C string
    version = nvcc.nvcc_version(tool)
    entry = {
        "form": form,
        "archs": list(archs),
        "ptx": archs[0].replace("sm_", "compute_"),
        "nvcc": version,
        "flags": list(nvcc.FLAGS),
        "bytes": len(code),
        "sha256": hashlib.sha256(code).hexdigest(),
        "load_needs": f"an NVIDIA driver for CUDA >= {version.split('.')[0]}.0; "
        + ("no compiler" if form == "fatbin" else "the driver JIT-compiles the PTX"),
    }
    if form == "fatbin":
        entry["resources"] = {arch: {k: r.to_dict() for k, r in kernels.items()}
                              for arch, kernels in nvcc.parse_ptxas(log).items()}
    return entry, _compat.pack_imports_with_device_code(source, form, code)


def _device_source(ex, spec: KernelSpec) -> str:
    """The generated device code: CUDA C for a CUDA target, LLVM IR for the CPU."""
    mod = ex.mod
    if spec.is_cuda:
        for imported in mod.imports:
            if imported.kind == "cuda":
                return imported.inspect_source()
        return ""
    try:
        return mod.inspect_source("ll")
    except Exception:
        return ""
