"""Load a built kernel (``<key>.so`` + ``<key>.json``) and call it on arrays.

``Kernel`` takes numpy arrays (CPU kernels), PyTorch tensors (CPU or CUDA, passed to TVM
zero-copy through DLPack) and TVM tensors, checks them against the manifest before launching,
and returns the same kind of array it was given.
"""

from __future__ import annotations

import os
import re

from .. import _compat
from .._compat import tvm
from ..compiler import nvcc
from ..spec import KernelSpec, numpy_dtype
from . import validate as V


#: Largest element count an int32-indexed TensorIR buffer can address.
INT32_MAX = 2**31 - 1
#: CUDA's limit on gridDim.y and gridDim.z, where the fused CUDA kernel puts heads and batch
#: (``rules.base.bind_grid``).
GRID_YZ_MAX = 65535


class Kernel:
    """A loaded attention kernel. Call it as ``kernel(q, k, v)``; see ``__call__``."""

    def __init__(self, module, manifest: dict, path: str | None = None):
        self.module = module
        self.manifest = manifest
        self.path = path
        self.spec = KernelSpec.from_dict(manifest["spec"])
        self._functions = [module[name] for name in manifest["functions"]]

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def tile(self) -> tuple[int, int] | None:
        """(block_m, block_n) of a fused kernel: the query and key tile of its definition."""
        config = self.manifest["schedule"].get("config", {})
        if "block_m" in config and "block_n" in config:
            return int(config["block_m"]), int(config["block_n"])
        return None

    def accepts(self, seq_q: int, seq_k: int) -> bool:
        """Whether the lengths suit the kernel: any, except for an even kernel (tile multiples)."""
        if not self.spec.even:
            return True
        if self.tile is None:
            raise ValueError(f"path: the manifest of even kernel {self.key} names no tile (block_m, block_n)")
        block_m, block_n = self.tile
        return seq_q % block_m == 0 and seq_k % block_n == 0

    def __repr__(self) -> str:
        return f"Kernel({self.key}, schedule={self.manifest['schedule']['source']!r}, path={self.path!r})"

    # -- inspection --
    def cuda_source(self) -> str:
        """The generated CUDA C (LLVM IR for a CPU kernel)."""
        return self.manifest.get("source", "")

    def tir(self, before: bool = False) -> str:
        """The TensorIR after scheduling (``before=True``: as defined, before scheduling)."""
        return self.manifest["tir"]["before" if before else "after"]

    def ptx(self, arch: str | None = None) -> str:
        """PTX of the CUDA source (nvcc -ptx) for ``arch`` (default: the target's). Needs nvcc."""
        return manifest_ptx(self.manifest, arch)

    def resources(self, archs=None) -> dict:
        """{arch: {kernel name: nvcc.Resources}}: registers, spill stores/loads, stack frame and
        static shared memory from ptxas -v, for ``archs`` (default: the embedded fatbin's archs,
        else the target's arch plus sm_90 below it). Needs nvcc unless the build recorded them."""
        return manifest_resources(self.manifest, archs)[0]

    # -- calling --
    def __call__(self, q, k, v, out=None, lse=None, softmax_scale=None, return_lse: bool = False,
                 softcap: float = 0.0, window_size=None, alibi_slopes=None, seqused_k=None, block_table=None):
        """Attention of q [batch, seq_q, heads, d] over k, v [batch, seq_k, heads_kv, d].

        ``out`` / ``lse`` are optional buffers to write into (shapes [batch, seq_q, heads, d] and
        [batch, heads, seq_q], float32). Returns ``out``, or ``(out, lse)`` with ``return_lse``.
        lse is the natural-log log-sum-exp of the scaled (and capped) scores. ``softcap``: the
        cap of a kernel built with ``KernelSpec(softcap=True)`` (> 0), else 0. ``window_size``:
        (left, right) of a kernel built with ``KernelSpec(window=True)`` (-1 = unbounded; right 0
        or -1 for a causal one), else None. ``alibi_slopes``: (heads,) or (batch, heads) float32
        of a kernel built with ``KernelSpec(alibi=True)``, else None. ``seqused_k``: (batch,)
        int32, the keys each sequence uses (each at most seq_k), of a kernel built with
        ``KernelSpec(seqused_k=True)``, else None. ``block_table``: (batch, max_pages) int32, the
        pages of each sequence's keys in a paged k, v (num_pages, page_size, heads_kv, d), of a
        kernel built with ``KernelSpec(paged=page_size)``, else None; its entries are trusted to be
        pages of k (``attention_with_kvcache`` checks them).
        """
        spec = self.spec
        if spec.varlen:
            raise ValueError(f"q: kernel {self.key} takes packed sequences (built with varlen=True): call "
                             "kernel.call_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)")
        kind, device, dtype, (b, sq, h, sk, hk, d) = V.check_qkv(
            q, k, v, head_dim=spec.head_dim, dtype=spec.dtype, group=spec.group, paged=spec.paged
        )
        if spec.paged and block_table is None:
            raise ValueError(f"block_table: kernel {self.key} reads a paged cache: expected ({b}, max_pages) int32, "
                             "got None")
        if block_table is not None and not spec.paged:
            raise ValueError(f"block_table: kernel {self.key} has no paged cache (built with paged=False): expected "
                             "None")
        table = V.check_block_table(block_table, kind, device, b) if spec.paged else None
        if spec.paged:
            if sk != spec.paged:
                raise ValueError(f"k: kernel {self.key} reads pages of {spec.paged} rows: expected k [num_pages, "
                                 f"{spec.paged}, {hk}, {d}], got {list(_shape(k))}")
            sk = int(block_table.shape[1]) * sk  # the keys the table can address
        return_lse = V.check_bool(return_lse, "return_lse")
        V.check_no_grad(kind, q, k, v)
        self._check_device(device)
        scale = V.check_scale(softmax_scale, d)
        cap = self._cap(softcap)
        values = {"sm_scale": scale, "softcap": cap, **self._window_args(window_size, sq, sk)}
        scalars = tuple(values[name] for name in spec.scalar_params)
        slopes = self._slopes(alibi_slopes, kind, device, b, h)
        if spec.seqused_k and seqused_k is None:
            raise ValueError(f"seqused_k: kernel {self.key} takes each sequence's key count: expected ({b},) int32, "
                             "got None")
        if seqused_k is not None and not spec.seqused_k:
            raise ValueError(f"seqused_k: kernel {self.key} has none (built with seqused_k=False): expected None")
        used = V.check_lengths(seqused_k, "seqused_k", kind, device, b) if spec.seqused_k else None
        if spec.shape is not None and (b, sq, sk, h) != spec.shape:
            eb, esq, esk, eh = spec.shape
            raise ValueError(
                f"q, k: kernel {self.key} is compiled for q [{eb}, {esq}, {eh}, {d}] and k, v "
                f"[{eb}, {esk}, {eh // spec.group}, {d}] only (a static shape), got q {list(_shape(q))} "
                f"and k {list(_shape(k))}"
            )
        if not self.accepts(sq, sk):
            block_m, block_n = self.tile
            raise ValueError(
                f"seq_q, seq_k: kernel {self.key} is even (no bound checks): expected seq_q a multiple of "
                f"block_m={block_m} and seq_k a multiple of block_n={block_n}, got seq_q {sq} and seq_k {sk}"
            )
        # (no key at all: every row sees none, and nothing is launched: a kernel that maps k for
        # the TMA engine cannot describe an empty one)
        launched = b * sq * h > 0 and (sk > 0 or spec.algorithm != "fused")
        if spec.algorithm == "standard" and b * h * sq * sk > INT32_MAX:
            raise ValueError(
                f"seq_q, seq_k: the standard algorithm's S has batch*heads*seq_q*seq_k = {b * h * sq * sk:,} "
                f"elements, more than its int32 indexing allows ({INT32_MAX:,}); the fused algorithm has no S"
            )
        parts = self._batch_parts(kind, b, sq, h, sk, hk, d, k) if launched else []
        if launched and spec.is_cuda and spec.algorithm == "fused" and h > GRID_YZ_MAX:
            raise ValueError(f"q: the fused CUDA kernel launches one block row per head: expected heads <= "
                             f"{GRID_YZ_MAX} (gridDim.y), got {h}")
        o_shape, lse_shape = (b, sq, h, d), (b, h, sq)
        arrays, out, lse = _outputs(kind, device, dtype, out, lse, o_shape, lse_shape, (q, k, v))
        for lo, hi in parts:
            # sequences lo .. hi: views from their own base pointers (one launch where all fit)
            part = (lambda x: x) if hi - lo == b else (lambda x, s=slice(lo, hi): x[s])
            paged = spec.paged  # (a paged cache's pages are shared by all sequences: passed whole)
            qt, kt, vt = (arrays.to_tvm(x) for x in (part(q), k if paged else part(k), v if paged else part(v)))
            o_part, l_part = part(out), part(lse)
            ot, lt = arrays.to_tvm(o_part, output=True), arrays.to_tvm(l_part, output=True)
            inputs = tuple(arrays.to_tvm(part(x)) for x in (slopes, used, table) if x is not None)
            if spec.algorithm == "fused":
                self._functions[0](qt, kt, vt, ot, lt, *inputs, *scalars)
            else:
                self._run_standard(arrays, qt, kt, vt, ot, lt, scale, (b, h, sq, sk))
            arrays.finish(ot, o_part)
            arrays.finish(lt, l_part)
        if not launched and b * sq * h > 0:
            arrays.no_keys(out, lse)
        return (out, lse) if return_lse else out

    def _batch_parts(self, kind: str, b: int, sq: int, h: int, sk: int, hk: int, d: int, k) -> list:
        """[(first, end)] of the sequences each launch takes: all of them where every tensor it
        indexes (and a split kernel's partials) fits int32 indexing and, on CUDA, gridDim.z; else
        consecutive parts as equal as may be, each within those (a fused kernel of any shape on
        torch or numpy arrays: views of the batch). ValueError where one sequence's tensors do not
        fit, or a paged cache's pages."""
        spec = self.spec
        q_shape = (b, sq, h, d)
        per_seq = max(sq * h, 0 if spec.paged else sk * hk) * d
        parts = spec.splits * sq * h * d
        pool = int(k.shape[0]) * int(k.shape[1]) * hk * d if spec.paged else 0
        if max(per_seq, pool) > INT32_MAX:
            what = f"the pages of k ({pool:,})" if pool > INT32_MAX else f"one sequence's ({per_seq:,})"
            raise ValueError(
                f"q, k: the kernels index q, k, v, o with int32: expected at most {INT32_MAX:,} elements per "
                f"sequence and in a paged cache, got {what} (q {list(q_shape)}, k "
                f"{list(_shape(k))})")
        if parts > INT32_MAX:
            V.check_split_partials(spec.splits, 1, sq, h, d)
        fit = min(INT32_MAX // per_seq, INT32_MAX // parts if parts else b)
        if spec.is_cuda and spec.algorithm == "fused":
            fit = min(fit, GRID_YZ_MAX)
        if fit >= b:
            return [(0, b)]
        if spec.algorithm != "fused" or spec.shape is not None or kind not in ("torch", "numpy"):
            raise ValueError(
                f"q, k: the kernels index q, k, v, o with int32 and launch at most {GRID_YZ_MAX} sequences: "
                f"expected at most {fit} sequences of q {list(q_shape)}, k {list(_shape(k))} in one call of "
                f"the {spec.algorithm} algorithm{' at a static shape' if spec.shape else ''} on {kind} arrays (the "
                "fused one of any shape on torch or numpy arrays runs more as several launches)")
        # (equal parts: a last launch of a few sequences would leave the GPU idle)
        n = -(-b // fit)
        ends = [b * (i + 1) // n for i in range(n)]
        return list(zip([0, *ends[:-1]], ends))

    def call_varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, out=None,
                    lse=None, softmax_scale=None, return_lse: bool = False, softcap: float = 0.0, window_size=None,
                    alibi_slopes=None):
        """Attention of packed sequences (a kernel built with ``KernelSpec(varlen=True)``): q
        [total_q, heads, d], k, v [total_k, heads_kv, d], sequence b at rows cu_seqlens_q[b] ..
        cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of k, v ((batch + 1,)
        int32 prefix sums, checked here on the host); max_seqlen_q / max_seqlen_k at least the
        longest sequence's. ``out`` [total_q, heads, d] and ``lse`` [heads, total_q] float32 are
        optional buffers to write into; the other arguments as ``__call__``'s, aligned per
        sequence. Returns ``out``, or ``(out, lse)`` with ``return_lse``."""
        spec = self.spec
        if not spec.varlen:
            raise ValueError(f"cu_seqlens_q: kernel {self.key} takes [batch, seqlen, heads, head_dim] arrays (built "
                             "with varlen=False): call kernel(q, k, v)")
        kind, device, dtype, (_, tq, h, tk, hk, d) = V.check_packed(q, k, v, head_dim=spec.head_dim, dtype=spec.dtype,
                                                                    group=spec.group)
        return_lse = V.check_bool(return_lse, "return_lse")
        V.check_no_grad(kind, q, k, v)
        self._check_device(device)
        max_q = V.check_max_seqlen(max_seqlen_q, "max_seqlen_q")
        max_k = V.check_max_seqlen(max_seqlen_k, "max_seqlen_k")
        cq, long_q = V.check_prefix_sums(cu_seqlens_q, "cu_seqlens_q", kind, device, tq, max_q, "max_seqlen_q")
        b = int(cq.shape[0]) - 1
        ck, long_k = V.check_prefix_sums(cu_seqlens_k, "cu_seqlens_k", kind, device, tk, max_k, "max_seqlen_k", b + 1)
        # the kernel gets the longest sequences the prefix sums hold, the caller's bounds are checked
        # only: a loose bound would launch idle query tiles and widen the window arithmetic
        max_q, max_k = long_q, long_k
        scale = V.check_scale(softmax_scale, d)
        cap = self._cap(softcap)
        values = {"sm_scale": scale, "softcap": cap, **self._window_args(window_size, max_q, max_k),
                  "max_seqlen_q": max_q, "max_seqlen_k": max_k}
        scalars = tuple(values[name] for name in spec.scalar_params)
        slopes = self._slopes(alibi_slopes, kind, device, b, h)
        # (no key at all: nothing to read, every row sees none; the kernel's loads, clamped inside
        # k, would read an empty one)
        launched = b > 0 and tq * h > 0 and tk > 0
        if launched and spec.is_cuda and max(b, h) > GRID_YZ_MAX:
            raise ValueError(f"cu_seqlens_q: the fused CUDA kernel launches one block row per head and sequence: "
                             f"expected at most {GRID_YZ_MAX} of each (gridDim.y, gridDim.z), got {b} sequences and "
                             f"{h} heads")
        o_shape, lse_shape = (tq, h, d), (h, tq)
        arrays, out, lse = _outputs(kind, device, dtype, out, lse, o_shape, lse_shape, (q, k, v))
        if launched:
            qt, kt, vt = (arrays.to_tvm(x) for x in (q, k, v))
            ot, lt = arrays.to_tvm(out, output=True), arrays.to_tvm(lse, output=True)
            inputs = tuple(arrays.to_tvm(x) for x in (slopes, cq, ck) if x is not None)
            self._functions[0](qt, kt, vt, ot, lt, *inputs, *scalars)
            arrays.finish(ot, out)
            arrays.finish(lt, lse)
        elif tq * h > 0:
            arrays.no_keys(out, lse)
        return (out, lse) if return_lse else out

    def _check_device(self, device: str) -> None:
        want = "cuda" if self.spec.is_cuda else "cpu"
        if device.split(":")[0] != want:
            raise ValueError(f"q: expected a {want} array for kernel {self.key}, got one on {device}")

    def _cap(self, softcap) -> float:
        """The checked cap: > 0 for a kernel built with a softcap, 0 for one without."""
        cap = V.check_softcap(softcap)
        if self.spec.softcap and not cap:
            raise ValueError(f"softcap: kernel {self.key} is built with a softcap: expected a cap > 0, got {softcap!r}")
        if cap and not self.spec.softcap:
            raise ValueError(f"softcap: kernel {self.key} has none (built with softcap=False): expected 0, got "
                             f"{softcap!r}")
        return cap

    def _slopes(self, alibi_slopes, kind: str, device: str, b: int, h: int):
        """ALiBi's checked [batch, heads] slopes for a kernel built with ALiBi, else None."""
        if self.spec.alibi and alibi_slopes is None:
            raise ValueError(f"alibi_slopes: kernel {self.key} is built with ALiBi: expected (heads,) or (batch, heads) "
                             "float32 slopes, got None")
        if alibi_slopes is not None and not self.spec.alibi:
            raise ValueError(f"alibi_slopes: kernel {self.key} has no ALiBi (built with alibi=False): expected None")
        return V.check_alibi(alibi_slopes, kind, device, b, h) if self.spec.alibi else None

    def _window_args(self, window_size, seq_q: int, seq_k: int) -> dict:
        """The window's int32 edges, ``window_left`` and ``window_right`` (the kernel of a causal
        window takes the left one only); none for a kernel without a window (which accepts only
        None, or the window its mask already is)."""
        spec = self.spec
        if not spec.window:
            if window_size is not None and V.check_window(window_size, spec.causal) != (-1, 0 if spec.causal else -1):
                raise ValueError(f"window_size: kernel {self.key} has no window (built with window=False): expected "
                                 f"None or (-1, {0 if spec.causal else -1}), got {tuple(window_size)!r}")
            return {}
        if window_size is None:
            raise ValueError(f"window_size: kernel {self.key} is built with a window: expected (left, right), got None")
        left, right = V.window_bounds(V.check_window(window_size, spec.causal), seq_q, seq_k)
        return {"window_left": left, "window_right": right}

    def _run_standard(self, arrays, qt, kt, vt, ot, lt, scale, shape):
        """The three kernels of the standard algorithm, S and P in device memory."""
        qk, softmax, pv = self._functions
        s = arrays.to_tvm(arrays.empty(shape, "float32"))
        p = arrays.to_tvm(arrays.empty(shape, self.spec.dtype))
        qk(qt, kt, s)
        softmax(s, p, lt, scale)
        pv(p, vt, ot)


def _outputs(kind: str, device: str, dtype: str, out, lse, o_shape, lse_shape, inputs):
    """(arrays, out, lse): the caller's out and lse checked (shape, dtype, device, no overlap with
    the inputs), or new ones."""
    if out is not None:
        V.check_out(out, "out", kind, device, o_shape, dtype)
    if lse is not None:
        V.check_out(lse, "lse", kind, device, lse_shape, "float32")
    V.check_no_overlap({"out": out, "lse": lse}, dict(zip("qkv", inputs)), kind)
    arrays = _Arrays(kind, device)
    out = arrays.empty(o_shape, dtype) if out is None else out
    lse = arrays.empty(lse_shape, "float32") if lse is None else lse
    return arrays, out, lse


#: The alignment the kernels' data may assume, in bytes (TVM allocates at 64; its CPU code loads
#: vectors aligned so, and a misaligned pointer faults inside TVM's thread pool).
ALIGNMENT = 64


class _Arrays:
    """Allocation and conversion for one kind of array (numpy, torch or tvm)."""

    def __init__(self, kind: str, device: str):
        self.kind = kind
        self.device = device

    def empty(self, shape, dtype: str):
        if self.kind == "torch":
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        if self.kind == "numpy":
            import numpy as np

            return np.empty(shape, dtype=numpy_dtype(dtype))
        return tvm.runtime.empty(shape, dtype, _tvm_device(self.device))

    def to_tvm(self, x, output: bool = False):
        """What the kernel gets for ``x``: torch tensors zero-copy where compact and aligned, else
        a compact, aligned copy (an output's copy is written back by ``finish``); numpy arrays
        copied into TVM tensors."""
        if self.kind == "torch":
            import torch

            if x.is_contiguous() and x.data_ptr() % ALIGNMENT == 0:
                return x
            if output:
                return torch.empty_like(x, memory_format=torch.contiguous_format)
            return x.clone(memory_format=torch.contiguous_format)
        if self.kind == "numpy":
            import numpy as np

            return tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu())
        return x

    def no_keys(self, out, lse) -> None:
        """The result of rows that see no key: out 0, lse -inf (nothing launched)."""
        if self.kind == "tvm":
            import numpy as np

            out.copyfrom(np.zeros(out.shape, numpy_dtype(str(out.dtype))))
            lse.copyfrom(np.full(lse.shape, -np.inf, np.float32))
        else:
            out[...] = 0
            lse[...] = float("-inf")

    def finish(self, t, dst) -> None:
        """Copy a result back where the kernel wrote a staging copy (numpy, or a torch output
        that was not compact and aligned)."""
        if self.kind == "numpy":
            dst[...] = t.numpy()
        elif self.kind == "torch" and t is not dst:
            dst.copy_(t)


def _tvm_device(device: str):
    if device == "cpu":
        return tvm.cpu()
    return tvm.cuda(int(device.split(":")[1]))


def _cuda_source(manifest: dict, what: str) -> str:
    """The CUDA source of a CUDA kernel's manifest; NotImplementedError for a CPU kernel."""
    spec = KernelSpec.from_dict(manifest["spec"])
    if not spec.is_cuda:
        raise NotImplementedError(
            f"{what}: expected a CUDA kernel, got {spec.key} (target {spec.target}); PTX and ptxas "
            f"resources exist for CUDA targets only (build with --target nvidia/nvidia-a100, say)"
        )
    return manifest.get("source", "")


def manifest_ptx(manifest: dict, arch: str | None = None, what: str = "ptx") -> str:
    """PTX of a built CUDA kernel (from its manifest) for ``arch``; default the target's arch."""
    source = _cuda_source(manifest, what)
    arch = arch or _compat.cuda_arch(KernelSpec.from_dict(manifest["spec"]).tvm_target)
    if not isinstance(arch, str) or not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise ValueError(f"arch: expected one CUDA arch such as 'sm_80', got {arch!r}")
    nvcc.require_nvcc(what)
    return nvcc.ptx(source, arch)


def manifest_resources(manifest: dict, archs=None, what: str = "resources") -> tuple[dict, str]:
    """({arch: {kernel: nvcc.Resources}}, where they come from) for a built CUDA kernel: the
    ptxas report of the embedded fatbin where the build recorded one for every arch asked,
    else ptxas -v run now (needs nvcc)."""
    source = _cuda_source(manifest, what)
    device = manifest.get("device_code", {})
    recorded = device.get("resources", {})
    if archs is None:
        archs = tuple(recorded) or nvcc.default_archs(_compat.cuda_arch(KernelSpec.from_dict(manifest["spec"]).tvm_target))
    archs = nvcc.check_archs(archs, "archs")
    if all(a in recorded for a in archs):
        table = {a: {k: nvcc.Resources(**r) for k, r in recorded[a].items()} for a in archs}
        return table, f"ptxas -v of the embedded fatbin, recorded at build (nvcc {device.get('nvcc', '?')})"
    tool = nvcc.require_nvcc(what)
    return nvcc.resources(source, archs), f"ptxas -v now (nvcc {nvcc.nvcc_version(tool)})"


def load(path: str | os.PathLike) -> Kernel:
    """Load ``<key>.so`` (and the ``<key>.json`` manifest beside it). ``path`` may name either
    file or the key without an extension. The module is checked against the size and SHA-256 its
    manifest records before it is loaded (a damaged or replaced one is refused: loading a module
    runs its code). A CUDA module built with nvcc carries a fatbin (or PTX) and loads with the CUDA
    driver alone; one built without nvcc carries the CUDA source, which TVM compiles with NVRTC
    for the GPU present (seconds): the manifest's ``device_code`` says which."""
    from ..builder import artifact

    base = os.fspath(path)
    for ext in (".so", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    so_path, json_path = base + ".so", base + ".json"
    for p, what in ((so_path, "module"), (json_path, "manifest")):
        if not os.path.exists(p):
            raise FileNotFoundError(f"path: expected a built kernel's {what} at {p}, which does not exist")
    manifest = artifact.read_manifest(json_path)
    artifact.check_files(base, manifest)
    spec = KernelSpec.from_dict(manifest["spec"])
    if spec.is_cuda:
        if not tvm.cuda(0).exist:
            raise RuntimeError(f"path: {so_path} is a CUDA kernel ({spec.key}, target {spec.target}): loading it needs "
                               f"a CUDA GPU and its driver, and this machine has none visible ({_no_gpu_why()})")
        _compat.ensure_cuda_headers()
    module = tvm.runtime.load_module(so_path)
    return Kernel(module, manifest, so_path)


def _no_gpu_why() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "tvm.cuda(0).exist is False"


def _shape(x):
    return tuple(int(n) for n in x.shape)
