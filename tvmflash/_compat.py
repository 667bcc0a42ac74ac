"""TVM-version shims (TVM 0.27: ``tvm.s_tir`` / ``tvm.tirx``, tvm-ffi 0.1).

The rest of the package takes TVM's names from here, so a TVM upgrade that moves names again
is a change to this file: the renamed modules, target construction (tags and JSON only), the
CUDA headers NVRTC needs, and a TuneContext that does not import every target's intrinsics.
tvmflash's own compiler passes and pipeline are not shims: they live in ``tvmflash.compiler``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import linecache
import os
import shutil
import sys

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm_ffi import structural_equal, structural_hash

__all__ = [
    "T",
    "Schedule",
    "ms",
    "structural_equal",
    "structural_hash",
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
    "fast_tvmscript",
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
    return _target_from_str(target)


@functools.lru_cache(maxsize=None)
def _target_from_str(target: str) -> tvm.target.Target:
    """``make_target`` of a string, once per string: specs name their target by string, and a
    spec's key and kind are read on every ``attention`` call (a Target is immutable)."""
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


def tune_context(mod, target, space_generator, search_strategy, task_name: str, rand_state: int,
                 num_threads: int, logger) -> "ms.TuneContext":
    """``ms.TuneContext(...)`` without the import it starts with: TVM 0.27's constructor first
    imports ``tvm.s_tir.tensor_intrin``, registering the tensor intrinsics of every target
    (slow, once per process), which a CPU design space never uses. A design space
    that tensorizes registers its own intrinsics (``rules.mma_intrinsics``)."""
    from tvm.s_tir.meta_schedule import _ffi_api as ms_api
    from tvm.s_tir.meta_schedule.logging import get_logging_func

    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        ms_api.TuneContext, mod, target, space_generator, search_strategy, task_name, num_threads, rand_state,
        get_logging_func(logger),
    )
    ms_api.TuneContextInitialize(ctx)
    return ctx


def _frames(context: int = 1) -> list:
    """``inspect.stack()`` without its per-frame module lookup: the frames, file, line, function
    and the line's text (TVMScript reads only these)."""
    out, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno) if context > 0 else ""
        out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None,
                                     0 if line else None))
        frame = frame.f_back
    return out


@contextlib.contextmanager
def fast_tvmscript():
    """Within: TVMScript's ``@T.prim_func`` gets its caller frames from ``_frames``. TVM 0.27's
    parser calls ``inspect.stack()``, which looks up the module of every frame by scanning
    ``sys.modules``: with torch and pytest loaded that is most of the time of parsing a function
    (and of importing TVM's tensor intrinsics, a few hundred functions)."""
    original, inspect.stack = inspect.stack, _frames
    try:
        yield
    finally:
        inspect.stack = original