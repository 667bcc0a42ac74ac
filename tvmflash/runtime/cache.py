"""The kernel cache: ``$TVMFLASH_CACHE`` (default ``~/.cache/tvmflash``), one ``<key>.so`` +
``<key>.json`` per spec, built once and loaded by every later process.

Two processes asking for the same key at once: an exclusive file lock per key makes one build
while the other waits, then loads what the first wrote (artifacts appear by atomic rename).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading

from .. import _compat
from ..builder import build
from ..spec import KernelSpec
from .kernel import Kernel, load

_loaded: dict[str, Kernel] = {}
_lock = threading.Lock()


def cache_dir() -> str:
    path = os.environ.get("TVMFLASH_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "tvmflash")
    return path


def _fresh(json_path: str) -> bool:
    """A cached artifact is reused only if this TVM version built it."""
    try:
        with open(json_path) as fh:
            return json.load(fh).get("tvm_version") == _compat.TVM_VERSION
    except (OSError, ValueError):
        return False


def ensure_built(spec: KernelSpec, directory: str | None = None) -> str:
    """``<directory>/<key>`` (add .so / .json; default directory: the cache), built first unless
    this TVM version built it. Loads nothing, so it serves a CUDA spec on a machine without a GPU
    (``tvmflash inspect``)."""
    key = spec.key
    directory = directory or cache_dir()
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, key)
    with open(base + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not (os.path.exists(base + ".so") and _fresh(base + ".json")):
                build(spec, directory)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return base


def get_kernel(spec: KernelSpec) -> Kernel:
    """The loaded kernel for ``spec``: from this process, else the cache directory, else built."""
    key = spec.key
    with _lock:
        if key in _loaded:
            return _loaded[key]
        kernel = load(ensure_built(spec) + ".so")
        _loaded[key] = kernel
        return kernel
