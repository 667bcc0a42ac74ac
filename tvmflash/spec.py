"""What a kernel is: a frozen ``KernelSpec`` whose ``key`` names every artifact built from it.

Describe -> build -> load are separate steps (as FlashInfer's JitSpec): the spec holds only
compile-time choices. Batch, both sequence lengths, the number of heads and ``softmax_scale``
are runtime values, so one built kernel serves all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from . import _compat

ALGORITHMS = ("fused", "standard")
DTYPES = ("float16", "bfloat16")
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
_DTYPE_SHORT = {"float16": "f16", "bfloat16": "bf16"}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "bf16": "bfloat16"}


def canonical_dtype(dtype) -> str:
    """'float16' / 'bfloat16' from a string, numpy/ml_dtypes dtype or torch dtype."""
    name = str(dtype)
    name = name.replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    return name


def numpy_dtype(dtype: str):
    """The numpy dtype of 'float16' / 'bfloat16' (``ml_dtypes.bfloat16``) / 'float32'."""
    import numpy as np

    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def target_id(target) -> str:
    """The short target part of a key: ``sm80`` / ``sm90a`` for CUDA, ``cpu_<mcpu>`` for llvm.
    Keys name files: anything but letters, digits, '_' and '-' becomes '_' (a target's mcpu is
    the user's text)."""
    t = _compat.make_target(target)
    if _compat.is_cuda(t):
        tid = _compat.cuda_arch(t).replace("_", "")
    elif t.kind.name == "llvm":
        mcpu = t.attrs.get("mcpu", None)
        tid = f"cpu_{mcpu}" if mcpu else "cpu"
    else:
        tid = t.kind.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(tid)).lstrip("-") or "target"


@dataclass(frozen=True)
class KernelSpec:
    """Compile-time description of one attention kernel.

    head_dim:  size of the last dimension of q, k, v.
    dtype:     'float16' or 'bfloat16' for q, k, v and the output; accumulation is float32.
    causal:    causal mask aligned to the bottom-right corner (FlashAttention >= 2.1), so query
               row i sees keys j <= i + seqlen_k - seqlen_q.
    group:     GQA/MQA group size: query heads per key/value head (1 = multi-head attention).
    algorithm: 'fused' (FlashAttention, one kernel) or 'standard' (S and P through memory).
    target:    'cpu', a TVM tag such as 'nvidia/nvidia-a100', or a target JSON string.
    shape:     None (default): one kernel serves every batch, length and head count. Or
               (batch, seqlen_q, seqlen_k, heads): a kernel compiled for that shape only (fused
               algorithm). With every extent known the compiler drops the bound checks and the
               index arithmetic.
    even:      (fused, any shape) seqlen_q and seqlen_k are multiples of the kernel's tile
               (block_m, block_n): the kernel has no bound checks and no key-padding mask, and
               refuses other lengths (FlashAttention-2's ``Is_even_MN``). ``attention`` picks it by
               itself on a GPU where the lengths allow.
    softcap:   (fused) logit soft-capping, as Gemma-2 and FlashAttention-2: the scaled scores
               become ``cap * tanh(scores / cap)`` before the softmax. The cap is a runtime value
               (``attention(..., softcap=cap)``), as ``softmax_scale`` is; the flag compiles it in.
    window:    (fused) a sliding window, FlashAttention-2's ``window_size=(left, right)``: query
               row i sees keys j with i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k -
               seqlen_q + right (with ``causal``, right is 0). (left, right) are runtime values
               (``attention(..., window_size=...)``); the flag compiles the bounds in, and key
               tiles wholly outside the window are never visited.
    alibi:     (fused) ALiBi, FlashAttention-2's ``alibi_slopes``: the scaled score of (i, j)
               gets the bias -slope * |i + seqlen_k - seqlen_q - j|, the slope per head (and
               batch), a runtime float32 tensor (``attention(..., alibi_slopes=...)``).
    splits:    (fused) FlashDecoding: 0 (default), one program per query tile runs all its keys;
               n >= 1, the keys of each query tile are cut into n chunks, one program each,
               whose partial results a combine merges (``compiler.derive.split_k_update``). For
               short queries over long keys (decode), where query tiles alone leave the GPU idle;
               ``attention`` picks n by itself there (``num_splits``).
    seqused_k: (fused) per-sequence key lengths, FlashAttention-2's ``seqused_k``: batch b sees
               only its first ``seqused_k[b]`` keys (a runtime int32 tensor of shape (batch,)),
               and causal and window alignment is to that length (row i sees keys j <= i +
               seqused_k[b] - seqlen_q). What a KV cache needs (``attention_with_kvcache``): k and
               v hold the cache's capacity, each sequence its own filled length.
    paged:     (with seqused_k) 0 (default), or the page size of a paged KV cache, FlashAttention-2's
               and vLLM's ``block_table``: k and v are (num_pages, paged, heads_kv, head_dim) and
               key j of batch b lies in page ``block_table[b, j // paged]`` at row ``j % paged``;
               the table is a runtime (batch, max_pages) int32 tensor. The page size is compiled
               in (its division folds to shifts, a tile's page lookups to one where pages hold
               whole tiles): one build per page size.
    varlen:    (fused) variable-length batches, FlashAttention-2's ``flash_attn_varlen_func``: q, o
               are packed (total_q, heads, head_dim), k, v (total_k, heads_kv, head_dim), and
               sequence b holds rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` of q and the same
               of k by ``cu_seqlens_k`` (runtime (batch + 1,) int32 prefix sums); lse is (heads,
               total_q). Causal, window and ALiBi are aligned per sequence, as ``seqused_k``'s.
               The longest sequences, ``max_seqlen_q`` and ``max_seqlen_k``, are runtime values
               (the grid's query tiles, the key tiles' bound).
    """

    head_dim: int
    dtype: str = "float16"
    causal: bool = False
    group: int = 1
    algorithm: str = "fused"
    target: str = "cpu"
    shape: tuple | None = None
    even: bool = False
    softcap: bool = False
    window: bool = False
    alibi: bool = False
    splits: int = 0
    seqused_k: bool = False
    paged: int = 0
    varlen: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.shape is not None:
            shape = tuple(self.shape)
            if len(shape) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
                raise ValueError(f"shape: expected (batch, seqlen_q, seqlen_k, heads), positive ints, got {self.shape!r}")
            if shape[3] % self.group:
                raise ValueError(f"shape: heads {shape[3]} is not a multiple of the GQA group {self.group}")
            if self.algorithm != "fused":
                raise ValueError(f"shape: static shapes are for the fused algorithm, got algorithm={self.algorithm!r}")
            object.__setattr__(self, "shape", shape)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int):
            raise TypeError(f"head_dim: expected an int, got {type(self.head_dim).__name__}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise NotImplementedError(
                f"head_dim: expected one of {SUPPORTED_HEAD_DIMS}, got {self.head_dim}"
            )
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group: expected a positive int (query heads per kv head), got {self.group!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(self.causal).__name__}")
        if not isinstance(self.target, str):
            raise TypeError(f"target: expected a str, got {type(self.target).__name__}")
        if not isinstance(self.even, bool):
            raise TypeError(f"even: expected a bool, got {type(self.even).__name__}")
        if not isinstance(self.softcap, bool):
            raise TypeError(f"softcap: expected a bool (the cap itself is a runtime value), got "
                            f"{type(self.softcap).__name__}")
        if self.softcap and self.algorithm != "fused":
            raise ValueError(f"softcap: the fused algorithm only (the standard one has no score step), got "
                             f"algorithm={self.algorithm!r}")
        if not isinstance(self.window, bool):
            raise TypeError(f"window: expected a bool (the window's size is a runtime value), got "
                            f"{type(self.window).__name__}")
        if self.window and self.algorithm != "fused":
            raise ValueError(f"window: the fused algorithm only, got algorithm={self.algorithm!r}")
        if not isinstance(self.alibi, bool):
            raise TypeError(f"alibi: expected a bool (the slopes are a runtime tensor), got "
                            f"{type(self.alibi).__name__}")
        if self.alibi and self.algorithm != "fused":
            raise ValueError(f"alibi: the fused algorithm only, got algorithm={self.algorithm!r}")
        if isinstance(self.splits, bool) or not isinstance(self.splits, int) or self.splits < 0:
            raise ValueError(f"splits: expected an int >= 0 (0: no split over the keys), got {self.splits!r}")
        if self.splits and (self.algorithm != "fused" or self.shape is not None or self.even):
            raise ValueError(f"splits: for the fused algorithm with any shape and no even build, got "
                             f"algorithm={self.algorithm!r}, shape={self.shape!r}, even={self.even!r}")
        if not isinstance(self.seqused_k, bool):
            raise TypeError(f"seqused_k: expected a bool (the lengths are a runtime tensor), got "
                            f"{type(self.seqused_k).__name__}")
        if self.seqused_k and (self.algorithm != "fused" or self.shape is not None or self.even):
            raise ValueError(f"seqused_k: for the fused algorithm with any shape and no even build, got "
                             f"algorithm={self.algorithm!r}, shape={self.shape!r}, even={self.even!r}")
        if isinstance(self.paged, bool) or not isinstance(self.paged, int) or self.paged < 0:
            raise ValueError(f"paged: expected a page size, an int >= 1 (0: not paged), got {self.paged!r}")
        if self.paged and not self.seqused_k:
            raise ValueError("paged: a paged cache holds each sequence's own key count: expected seqused_k=True "
                             f"with paged={self.paged}")
        if not isinstance(self.varlen, bool):
            raise TypeError(f"varlen: expected a bool (the sequences' offsets are runtime tensors), got "
                            f"{type(self.varlen).__name__}")
        if self.varlen and (self.algorithm != "fused" or self.shape is not None or self.even or self.splits
                            or self.seqused_k):
            raise ValueError(f"varlen: for the fused algorithm with any shape, no even build, no split and no "
                             f"seqused_k, got algorithm={self.algorithm!r}, shape={self.shape!r}, even={self.even!r}, "
                             f"splits={self.splits!r}, seqused_k={self.seqused_k!r}")
        if self.even and (self.shape is not None or self.algorithm != "fused"):
            raise ValueError("even: for the fused algorithm with any shape (a static shape folds its bound "
                             f"checks itself), got algorithm={self.algorithm!r}, shape={self.shape!r}")

    @property
    def tvm_target(self):
        return _compat.make_target(self.target)

    @property
    def is_cuda(self) -> bool:
        return _target_is_cuda(self.target)

    @property
    def key(self) -> str:
        """Readable, unique name, e.g. ``fwd_f16_d128_causal_g4_sm80``."""
        parts = ["fwd" if self.algorithm == "fused" else "std", _DTYPE_SHORT[self.dtype], f"d{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.softcap:
            parts.append("softcap")
        if self.window:
            parts.append("window")
        if self.alibi:
            parts.append("alibi")
        if self.seqused_k:
            parts.append(f"paged{self.paged}" if self.paged else "kvlen")
        if self.varlen:
            parts.append("varlen")
        parts.append(f"g{self.group}")
        if self.splits:
            parts.append(f"s{self.splits}")
        if self.shape is not None:
            b, sq, sk, h = self.shape
            parts.append(f"b{b}q{sq}k{sk}h{h}")
        if self.even:
            parts.append("even")
        parts.append(target_id(self.target))
        return "_".join(parts)

    @property
    def input_buffers(self) -> tuple[str, ...]:
        """The kernel's input buffers after q, k, v, o, lse, in its signature's order."""
        return ((("alibi_slopes",) if self.alibi else ()) + (("seqused_k",) if self.seqused_k else ())
                + (("block_table",) if self.paged else ())
                + (("cu_seqlens_q", "cu_seqlens_k") if self.varlen else ()))

    @property
    def scalar_params(self) -> tuple[str, ...]:
        """The kernel's scalar parameters after its buffers, in its signature's order: the
        softmax scale, then the runtime values of its variants."""
        names = ["sm_scale"]
        if self.softcap:
            names.append("softcap")
        if self.window:
            names += ["window_left"] if self.causal else ["window_left", "window_right"]
        if self.varlen:
            names += ["max_seqlen_q", "max_seqlen_k"]
        return tuple(names)

    @property
    def shape_dims(self) -> dict | None:
        """The shape as the definition's shape variables (batch, seq_q, seq_k, heads, heads_kv)."""
        if self.shape is None:
            return None
        b, sq, sk, h = self.shape
        return {"batch": b, "seq_q": sq, "seq_k": sk, "heads": h, "heads_kv": h // self.group}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        if d.get("shape") is not None:
            d["shape"] = tuple(d["shape"])
        return cls(**d)

    def replace(self, **changes) -> "KernelSpec":
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=256)
def _target_is_cuda(target: str) -> bool:
    """Whether the target string names a CUDA target (read once per string: every call of a
    kernel asks)."""
    return _compat.is_cuda(_compat.make_target(target))
