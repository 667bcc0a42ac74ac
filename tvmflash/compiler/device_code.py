"""The device-code step: what a CUDA module carries for the GPU, and how it gets there.

TVM 0.27 generates CUDA source; a module of kind "cuda" holds (fmt, function table, code).
Built where no CUDA driver is loaded, the module keeps fmt "cuda" and the source, and the
runtime compiles it with the global function tvm_callback_cuda_compile (NVRTC by default)
when the library is *loaded*; where a driver is loaded, that compile runs already at build
time, for whatever arch Target.current() or the local GPU names. tvmflash builds every CUDA
module the first way (``cuda_source_modules``) and, to embed machine code, rewrites the
module's record in the library binary to (fmt "fatbin" or "ptx", nvcc's output): the runtime
loads such a record with cuModuleLoadData and calls no compiler.

Library binary layout (tvm-ffi src/ffi/extra/library_module.cc): <nbytes: u64> <import tree:
two vec<u64>> then per module <kind: str> [<payload: bytes> unless kind is "_lib"]; str, bytes
and vec are a u64 count followed by the items. The "cuda" payload is <fmt: str> <function
table> <code: bytes> (CUDA module SaveToBytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct

from .. import _compat
from .._compat import TVM_VERSION
from ..spec import KernelSpec
from . import nvcc

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


@contextlib.contextmanager
def cuda_source_modules():
    """Within: CUDA codegen keeps the source in the module (compiles nothing), GPU or not.
    An environment variable, so process-wide while it lasts: another thread building CUDA with
    TVM at that moment keeps its source too (its module still works; it compiles when loaded)."""
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous


def _u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def _with_len(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def parse_library_bin(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """(import tree bytes, [(kind, payload)]) of a library binary; payload None for "_lib"."""
    body = blob[8 : 8 + _u64(blob, 0)]
    offset = 0
    indptr_len = _u64(body, offset)
    offset += 8 + 8 * indptr_len
    offset += 8 + 8 * _u64(body, offset)  # child indices
    tree, modules = body[:offset], []
    for _ in range(indptr_len - 1):
        n = _u64(body, offset)
        kind = body[offset + 8 : offset + 8 + n].decode()
        offset += 8 + n
        payload = None
        if kind != "_lib":
            n = _u64(body, offset)
            payload = body[offset + 8 : offset + 8 + n]
            offset += 8 + n
        modules.append((kind, payload))
    if offset != len(body):
        raise RuntimeError(f"library binary: {len(body) - offset} bytes left after the last module")
    return tree, modules


def cuda_record(payload: bytes) -> tuple[str, bytes]:
    """(fmt, code) of a "cuda" module payload. The function table between them is not parsed:
    the code is found as the payload's tail, its length prefix checked against the size left."""
    n = _u64(payload, 0)
    fmt = payload[8 : 8 + n].decode()
    # the code is the last bytes field: scan for the length prefix that ends exactly at the tail
    for start in range(8 + n, len(payload) - 7):
        if _u64(payload, start) == len(payload) - start - 8:
            return fmt, payload[start + 8 :]
    raise RuntimeError("CUDA module record: no code field found")


def _replace_cuda_code(blob: bytes, source: str, fmt: str, code: bytes) -> bytes:
    tree, modules = parse_library_bin(blob)
    parts, replaced = [tree], 0
    for kind, payload in modules:
        parts.append(_with_len(kind.encode()))
        if payload is None:
            continue
        if kind == "cuda":
            n = _u64(payload, 0)
            tail = _with_len(source.encode())
            if payload[8 : 8 + n] != b"cuda" or not payload.endswith(tail):
                raise RuntimeError(
                    "CUDA module record: expected fmt 'cuda' and the generated source as its code "
                    f"(TVM {TVM_VERSION}); got fmt {payload[8:8 + n].decode()!r}"
                )
            payload = _with_len(fmt.encode()) + payload[8 + n : len(payload) - len(tail)] + _with_len(code)
            replaced += 1
        parts.append(_with_len(payload))
    if replaced != 1:
        raise RuntimeError(f"library binary: expected one CUDA module, found {replaced}")
    body = b"".join(parts)
    return _with_len(body)


def pack_imports_with_device_code(source: str, fmt: str, code: bytes):
    """An ``fpack_imports`` for ``Module.export_library``: the imports as TVM packs them, with the
    CUDA module's source replaced by ``code`` (``fmt`` 'fatbin' or 'ptx'), as a C file."""
    from tvm.runtime import _ffi_api as runtime_api

    def fpack_imports(mod, is_system_lib, symbol_prefix, workspace_dir):
        if is_system_lib:
            raise NotImplementedError("device code: a system-lib export keeps the CUDA source")
        blob = bytes(runtime_api.ModulePackImportsToTensor(mod).numpy())
        blob = _replace_cuda_code(blob, source, fmt, code)
        path = os.path.join(workspace_dir, "devc.c")
        with open(path, "w") as fh:
            fh.write('#ifdef __cplusplus\nextern "C" {\n#endif\n')
            fh.write(f'__attribute__((visibility("default"))) extern const unsigned char {LIBRARY_BIN_SYMBOL}[];\n')
            fh.write(f"const unsigned char {LIBRARY_BIN_SYMBOL}[{len(blob)}] = {{\n")
            for i in range(0, len(blob), 32):
                fh.write(",".join(str(b) for b in blob[i : i + 32]) + ",\n")
            fh.write('};\n#ifdef __cplusplus\n}\n#endif\n')
        return path

    return fpack_imports


def read_library_bin(so_path: str) -> bytes:
    """The library binary embedded in an exported module (reads the symbol; runs no TVM loader,
    so it works for a CUDA module on a machine without a GPU)."""
    import ctypes

    lib = ctypes.CDLL(os.path.abspath(so_path))
    try:
        start = ctypes.addressof(ctypes.c_uint8.in_dll(lib, LIBRARY_BIN_SYMBOL))
    except ValueError:
        raise ValueError(f"path: expected a TVM module with imports, {so_path} has no {LIBRARY_BIN_SYMBOL}") from None
    nbytes = ctypes.c_uint64.from_address(start).value
    return ctypes.string_at(start, 8 + nbytes)


def embedded_cuda_code(so_path: str) -> tuple[str, bytes]:
    """(fmt, code) of the CUDA module inside an exported library: ('cuda', source),
    ('fatbin', ...) or ('ptx', ...)."""
    _, modules = parse_library_bin(read_library_bin(so_path))
    for kind, payload in modules:
        if kind == "cuda":
            return cuda_record(payload)
    raise ValueError(f"path: expected a module with a CUDA import, {so_path} has {[k for k, _ in modules]}")


# -- what a built module embeds --


DEVICE_CODE_FORMS = ("auto", "fatbin", "ptx", "source")


def device_code_form(spec: KernelSpec, device_code: str, device_archs) -> str:
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


def embed_device_code(spec: KernelSpec, source: str, form: str, asked: str, device_archs):
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
    return entry, pack_imports_with_device_code(source, form, code)


def device_source(ex, spec: KernelSpec) -> str:
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
