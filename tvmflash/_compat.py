"""Everything that depends on TVM's version lives here (TVM 0.27: ``tvm.s_tir`` / ``tvm.tirx``).

The rest of the package imports TVM names from this module only, so a TVM upgrade that moves
names again is a change to one file.
"""

from __future__ import annotations

import json
import os
import shutil

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule

__all__ = [
    "T",
    "Schedule",
    "s_tir",
    "tirx",
    "tvm",
    "TVM_VERSION",
    "TVM_FFI_VERSION",
    "make_target",
    "host_cpu_target",
    "is_cuda",
    "cuda_arch",
    "ensure_cuda_headers",
]

TVM_VERSION: str = tvm.__version__
try:
    import tvm_ffi

    TVM_FFI_VERSION: str = tvm_ffi.__version__
except Exception:  # pragma: no cover - tvm_ffi always ships with TVM 0.27
    TVM_FFI_VERSION = "unknown"

#: Short names accepted wherever a target is asked for.
TARGET_ALIASES = {
    "cpu": "cpu",
    "llvm": "cpu",
    "a100": "nvidia/nvidia-a100",
    "h100": "nvidia/nvidia-h100",
    "sm80": "nvidia/nvidia-a100",
    "sm90": "nvidia/nvidia-h100",
}


def host_cpu_target() -> tvm.target.Target:
    """The llvm target for this machine's CPU, with every core."""
    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1})


def make_target(target) -> tvm.target.Target:
    """A ``tvm.target.Target`` from a tag (``nvidia/nvidia-a100``), an alias (``cpu``, ``a100``,
    ``h100``), a JSON string or dict, or a Target. TVM 0.27 rejects old ``"llvm -mcpu=..."`` strings."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if not isinstance(target, str):
        raise TypeError(f"target: expected a str, dict or tvm.target.Target, got {type(target).__name__}")
    name = TARGET_ALIASES.get(target.strip().lower(), target.strip())
    if name == "cpu":
        return host_cpu_target()
    if name.startswith("{"):
        try:
            return tvm.target.Target(json.loads(name))
        except json.JSONDecodeError as err:
            raise ValueError(f"target: not valid JSON ({err}): {target!r}") from None
    try:
        return tvm.target.Target(name)
    except Exception as err:  # TVM raises its own error types
        raise ValueError(
            f"target: expected 'cpu', a TVM tag such as 'nvidia/nvidia-a100' or a JSON dict, "
            f"got {target!r} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def cuda_arch(target: tvm.target.Target) -> str:
    """``sm_80``-style arch of a CUDA target."""
    return str(target.attrs["arch"])


def _register_pipeline() -> str:
    """TVM's s_tir pipeline with LowerWarpMemory run until every warp-scope buffer is lowered.

    TVM 0.27's LowerWarpMemory rewrites one warp-scope allocation of a nest and leaves the ones
    inside it 32x oversized, so an mma fragment written through a pointer offset by the lane
    (ldmatrix, mma) and read back without it (mma fill/store) disagree. Each extra run lowers
    the next allocation; a kernel here holds fewer than eight.
    """
    from tvm.s_tir import pipeline as s_pipeline
    from tvm.tirx import compilation_pipeline

    def factory():
        pipeline, finalize_host, _ = s_pipeline.default_s_tir_pipeline()

        def finalize_device():
            return tvm.ir.transform.Sequential(
                [tirx.transform.LowerWarpMemory()] * 8 + [tirx.transform.StmtSimplify(), tirx.transform.LowerIntrin()]
            )

        return pipeline, finalize_host, finalize_device

    compilation_pipeline.PIPELINE_MAP["tvmflash"] = factory
    return "tvmflash"


#: The tirx pipeline name for kernels with several mma fragment buffers.
TIR_PIPELINE = _register_pipeline()


def ensure_cuda_headers() -> None:
    """NVRTC needs the CUDA headers; TVM finds them through CUDA_PATH. When nvcc is a symlink
    (``/usr/local/bin/nvcc``) TVM's own search misses them, so point CUDA_PATH at the toolkit."""
    if os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME"):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.isdir(os.path.join(cand, "include")):
            os.environ["CUDA_PATH"] = cand
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(root, "include")):
            os.environ["CUDA_PATH"] = root


def lower_to_device(mod: tvm.IRModule, target: tvm.target.Target, pass_config: dict | None = None) -> tvm.IRModule:
    """The scheduled ``mod`` taken through the tirx pipeline ``tvm.compile`` runs (``TIR_PIPELINE``),
    up to code generation: kernels split from the host code, shared memory merged and reused.
    This is the TIR the CUDA source is printed from (what ``tvm.tirx.build`` does before codegen)."""
    host = tvm.target.Target("llvm") if tvm.runtime.enabled("llvm") else tvm.target.Target("c")
    mod = tirx.transform.BindTarget(target.with_host(host))(mod)
    pipeline, _, _ = tirx.get_tir_pipeline(TIR_PIPELINE)
    with tvm.transform.PassContext(config=pass_config or {}):
        return pipeline(mod)
