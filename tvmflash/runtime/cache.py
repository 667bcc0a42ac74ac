"""The kernel cache: ``$TVMFLASH_CACHE`` (default ``~/.cache/tvmflash``), one ``<key>.so`` +
``<key>.json`` per spec, built once and loaded by every later process.

A cached kernel is code that is loaded into the process, so the cache trusts nothing it finds:
the directory is created private (0700) and refused if another user owns it or others may write
to it; an entry is reused only if its manifest is this TVM's, names the spec asked for and the
rule and config its plan names now, and its module has the size and SHA-256 the manifest records
(``builder.artifact.verify``). Anything else (a damaged, truncated, stale or swapped entry) is
rebuilt. Two processes asking for the same key at once: an exclusive lock per key makes one build
while the other waits, then loads what the first wrote.
"""

from __future__ import annotations

import os
import stat
import threading

from ..builder import artifact
from ..spec import KernelSpec
from .kernel import Kernel, load

_loaded: dict[tuple, Kernel] = {}
_lock = threading.Lock()


def cache_dir() -> str:
    path = os.environ.get("TVMFLASH_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "tvmflash")
    return path


def private_dir(path: str) -> str:
    """``path``, created 0700 where missing; PermissionError if another user owns it or anyone
    else may write to it (a planted module would run in this process)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"TVMFLASH_CACHE: expected a directory of this user's, got {path} (owner uid "
                              f"{st.st_uid}); a cache holds code that is loaded")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"TVMFLASH_CACHE: expected a directory only its owner may write to, got {path} "
                              f"(mode {stat.S_IMODE(st.st_mode):o}); a cache holds code that is loaded (chmod 700)")
    return path


def ensure_built(spec: KernelSpec, directory: str | None = None) -> str:
    """``<directory>/<key>`` (add .so / .json; default directory: the cache), built first unless
    a verified entry is there. Loads nothing, so it serves a CUDA spec on a machine without a GPU
    (``tvmflash inspect``)."""
    directory = private_dir(directory or cache_dir())
    base = os.path.join(directory, artifact.checked_key(spec))
    with artifact.key_lock(directory, spec.key):
        if artifact.verify(base, spec) is not None:
            artifact.build_locked(spec, directory)
    return base


def get_kernel(spec: KernelSpec) -> Kernel:
    """The loaded kernel for ``spec``: from this process, else the cache directory, else built.
    (Per spec and registry state: a rule registered later builds its own.)"""
    from .. import rules

    key = (spec, rules.generation())
    with _lock:
        if key in _loaded:
            return _loaded[key]
        kernel = load(ensure_built(spec) + ".so")
        _loaded[key] = kernel
        return kernel
