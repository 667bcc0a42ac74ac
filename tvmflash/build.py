"""Spec -> scheduled TensorIR -> compiled module -> ``<key>.so`` + ``<key>.json`` manifest.

Which schedule serves a spec:
  fused, cpu       -> ``schedule_cpu.schedule_fused_cpu``
  fused, cuda      -> ``schedule_cuda.schedule_fused_cuda`` (head dim 128, float16), else
                      ``schedule_cuda_simple.schedule_fused_cuda_simple``
  standard, cpu    -> ``schedule_cpu.schedule_standard_cpu``
  standard, cuda   -> TVM's stock GPU rules (``s_tir.dlight``), per function

A fused spec with a tuning record in ``tuning_logs/`` (``tvmflash tune``) replays the record's
trace of that schedule function instead of applying its hand config (``records``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

from . import _compat, records
from . import definition as D
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
        func, sch, tuning = records.schedule_from_log(spec, name)
        if sch is not None:
            config = tuning.pop("config")
        else:
            tuning = {"source": "hand config", **tuning}
            func = D.fused_attention(spec, cfg.block_m, cfg.block_n)
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
                "schedule_cuda.schedule_fused_cuda", dict(schedule_cuda.PASS_CONFIG))
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
    the CUDA source is generated here and compiled (NVRTC) when the module is loaded."""
    with tvm.transform.PassContext(config=lowered.pass_config):
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


def build(spec: KernelSpec, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Compile ``spec`` and write ``out_dir/<key>.so`` and ``out_dir/<key>.json``.

    Both files are written under temporary names and renamed into place, so a reader (or a
    second process building the same key) never sees a half-written artifact.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    lowered = lower(spec)
    ex = compile_lowered(lowered)
    so_path = os.path.join(out_dir, spec.key + ".so")
    json_path = os.path.join(out_dir, spec.key + ".json")
    fd, tmp_so = tempfile.mkstemp(prefix=f".{spec.key}.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        ex.export_library(tmp_so)
        info = manifest(lowered, time.perf_counter() - t0)
        info["tir"] = {"before": lowered.before.script(), "after": lowered.mod.script()}
        info["source"] = _device_source(ex, spec)
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
