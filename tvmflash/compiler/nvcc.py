"""nvcc and ptxas on a kernel's CUDA source: the fatbin or PTX that ``build`` embeds, the PTX and
the ptxas resource report (registers, spills, stack, shared memory) that ``inspect`` prints.

None of this needs a GPU, only the CUDA toolkit's compiler. nvcc is found through
``$TVMFLASH_NVCC``, then ``PATH``, then ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

NVCC_ENV = "TVMFLASH_NVCC"

#: The flags TVM 0.27 gives NVRTC when it compiles a CUDA module at load time
#: (tvm/support/nvcc.py), so an embedded binary is the code the source would have become.
FLAGS = (
    "-O3",
    "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--ptxas-options=--register-usage-level=10,-v",
)

_ARCH = re.compile(r"^sm_(\d+)([a-z]?)$")


def find_nvcc() -> str | None:
    """Path of nvcc, or None when there is none."""
    explicit = os.environ.get(NVCC_ENV)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise FileNotFoundError(f"{NVCC_ENV}: expected the path of an executable nvcc, got {explicit!r}")
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def require_nvcc(purpose: str) -> str:
    """nvcc's path, or FileNotFoundError saying what needs it and where it was looked for."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError(
            f"nvcc: {purpose} needs the CUDA compiler (nvcc, CUDA toolkit >= 12); looked in ${NVCC_ENV}, "
            f"PATH, $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin, found none"
        )
    return nvcc


def nvcc_version(nvcc: str) -> str:
    """'13.0.88'-style release of an nvcc."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else "unknown"


def check_archs(archs, name: str = "archs") -> tuple[str, ...]:
    """('sm_80', 'sm_90') from a sequence or a comma-separated string; ValueError otherwise."""
    if isinstance(archs, str):
        archs = [a for a in archs.replace(" ", "").split(",") if a]
    archs = tuple(archs)
    bad = [a for a in archs if not isinstance(a, str) or not _ARCH.match(a)]
    if not archs or bad:
        raise ValueError(f"{name}: expected CUDA archs such as 'sm_80,sm_90', got {bad or list(archs)}")
    return archs


def default_archs(target_arch: str) -> tuple[str, ...]:
    """The archs to embed for a target: an sm_80 build also carries sm_90 machine code (A100 and
    H100 from one file); an arch-specific target (sm_90a) runs on its own arch only."""
    (target_arch,) = check_archs([target_arch], "target arch")
    number, suffix = _ARCH.match(target_arch).groups()
    return (target_arch, "sm_90") if int(number) < 90 and not suffix else (target_arch,)


def gencode(archs, ptx_arch: str | None = None) -> list[str]:
    """nvcc -gencode flags: machine code for each arch, and PTX of ``ptx_arch`` (which the driver
    JIT-compiles on a GPU newer than every arch)."""
    flags = []
    for arch in check_archs(archs):
        codes = [arch] + ([arch.replace("sm_", "compute_")] if arch == ptx_arch else [])
        flags += ["-gencode", f"arch={arch.replace('sm_', 'compute_')},code=[{','.join(codes)}]"]
    return flags


def compile_source(source: str, fmt: str, archs, *, ptx_arch: str | None = None,
                   nvcc: str | None = None) -> tuple[bytes, str]:
    """Compile CUDA source with nvcc. fmt: 'fatbin' (machine code per arch, plus PTX of
    ``ptx_arch``), 'cubin' (one arch) or 'ptx' (one arch). Returns (binary, ptxas log)."""
    if fmt not in ("fatbin", "cubin", "ptx"):
        raise ValueError(f"fmt: expected 'fatbin', 'cubin' or 'ptx', got {fmt!r}")
    archs = check_archs(archs)
    if fmt != "fatbin" and len(archs) != 1:
        raise ValueError(f"archs: expected one arch for {fmt}, got {list(archs)}")
    nvcc = nvcc or require_nvcc(f"compiling CUDA to {fmt}")
    if fmt == "fatbin":
        arch_flags = gencode(archs, ptx_arch)
    elif fmt == "ptx":
        arch_flags = [f"--gpu-architecture={archs[0].replace('sm_', 'compute_')}"]
    else:
        arch_flags = [f"--gpu-architecture={archs[0]}"]
    with tempfile.TemporaryDirectory(prefix="tvmflash-nvcc-") as tmp:
        src, out = os.path.join(tmp, "kernel.cu"), os.path.join(tmp, f"kernel.{fmt}")
        with open(src, "w") as fh:
            fh.write(source)
        cmd = [nvcc, f"--{fmt}", *FLAGS, *arch_flags, "-o", out, src]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{(res.stdout + res.stderr)[-4000:]}")
        with open(out, "rb") as fh:
            return fh.read(), res.stdout + res.stderr


def ptx(source: str, arch: str) -> str:
    """The PTX nvcc makes of ``source`` for ``arch`` (sm_80 -> compute_80)."""
    binary, _ = compile_source(source, "ptx", [arch])
    return binary.decode()


# -- ptxas resources --

@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel on one arch. Sizes in bytes. ``shared_static`` is the
    static shared memory; dynamic shared memory (``shared.dyn``) is a launch argument."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_static: int
    barriers: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMPILING = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict[str, dict[str, Resources]]:
    """{arch: {kernel: Resources}} from ``ptxas -v`` output (nvcc -Xptxas -v)."""
    result: dict[str, dict[str, Resources]] = {}
    kernel = arch = frame = None
    for line in log.splitlines():
        if m := _COMPILING.search(line):
            kernel, arch, frame = m.group(1), m.group(2), None
        elif (m := _FRAME.search(line)) and kernel:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and kernel:
            stack, stores, loads = frame or (0, 0, 0)
            smem = re.search(r"(\d+) bytes smem", line)
            barriers = re.search(r"used (\d+) barriers", line)
            result.setdefault(arch, {})[kernel] = Resources(
                kernel, arch, int(m.group(1)), stores, loads, stack,
                int(smem.group(1)) if smem else 0, int(barriers.group(1)) if barriers else 0,
            )
            kernel = None
    return result


def resources(source: str, archs) -> dict[str, dict[str, Resources]]:
    """{arch: {kernel: Resources}}: ptxas -v on ``source`` for each arch."""
    result = {}
    for arch in check_archs(archs):
        _, log = compile_source(source, "cubin", [arch])
        parsed = parse_ptxas(log)
        if arch not in parsed:
            raise RuntimeError(f"ptxas reported no kernel for {arch}; its output was:\n{log[-2000:]}")
        result[arch] = parsed[arch]
    return result


def format_resources(table: dict[str, dict[str, Resources]]) -> str:
    """A plain-text table, one row per (kernel, arch)."""
    head = ("kernel", "arch", "registers", "spill stores", "spill loads", "stack frame", "static smem", "barriers")
    rows = [head]
    for arch, kernels in table.items():
        for r in kernels.values():
            rows.append((r.kernel, r.arch, str(r.registers), f"{r.spill_stores} B", f"{r.spill_loads} B",
                         f"{r.stack_frame} B", f"{r.shared_static} B", str(r.barriers)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# -- fatbin --

FATBIN_MAGIC = 0xBA55ED50


def fatbin_entries(data: bytes) -> list[tuple[str, str]]:
    """[(kind, arch)] of a fatbin: kind 'elf' (machine code) or 'ptx', arch 'sm_80'-style.

    Layout (as nvcc writes it): a 16-byte header (u32 magic, u16 version, u16 header size,
    u64 size of the entries), then entries, each a header (u16 kind: 1 PTX, 2 ELF; u16 version;
    u32 header size; u64 payload size; ...; u32 arch at byte 28) followed by its payload.
    """
    if len(data) < 16:
        raise ValueError(f"data: expected a fatbin (>= 16 bytes), got {len(data)} bytes")
    magic, _, header_size, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"data: expected a fatbin (magic {FATBIN_MAGIC:#x}), got magic {magic:#x}")
    entries, offset, end = [], header_size, header_size + size
    while offset < min(end, len(data)):
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        (arch,) = struct.unpack_from("<I", data, offset + 28)
        entries.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), f"sm_{arch}"))
        offset += entry_header + payload
    return entries
