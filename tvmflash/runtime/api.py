"""The public entry point: ``attention(q, k, v, causal=..., softmax_scale=..., return_lse=...)``."""

from __future__ import annotations

import functools

from ..builder import build_for, plan
from ..spec import KernelSpec
from . import validate as V
from .cache import get_kernel


@functools.lru_cache(maxsize=None)
def target_for(device: str) -> str:
    """The target of the GPU holding the inputs (tag where TVM has one), or 'cpu'."""
    if device == "cpu":
        return "cpu"
    import torch

    major, minor = torch.cuda.get_device_capability(int(device.split(":")[1]))
    tags = {(8, 0): "nvidia/nvidia-a100", (9, 0): "nvidia/nvidia-h100"}
    if (major, minor) in tags:
        return tags[(major, minor)]
    return '{"kind": "cuda", "arch": "sm_%d%d"}' % (major, minor)


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None, return_lse: bool = False,
              algorithm: str = "fused", static_shape: bool = False, softcap: float = 0.0,
              window_size=(-1, -1), alibi_slopes=None, num_splits: int = 0):
    """softmax(q k^T * softmax_scale) v, FlashAttention's layout and semantics.

    q: [batch, seqlen_q, heads, head_dim]; k, v: [batch, seqlen_k, heads_kv, head_dim] with
    heads a multiple of heads_kv (GQA/MQA). float16 or bfloat16; accumulation in float32.
    causal: mask aligned to the bottom-right corner (FlashAttention >= 2.1).
    softmax_scale: default 1/sqrt(head_dim).
    Runs on the inputs' device: numpy arrays and CPU torch tensors on the CPU kernel, CUDA torch
    tensors on the GPU kernel; the kernel is built once per spec and cached (``TVMFLASH_CACHE``).
    On a GPU, lengths that are multiples of the kernel's tile run its even build (no bound checks).
    Returns the same kind of array, and with ``return_lse`` also lse [batch, heads, seqlen_q]
    (float32, natural log; -inf for rows that see no key).
    static_shape: compile (once, cached) a kernel for exactly this shape: bound checks and
    index arithmetic fold away; a new shape builds anew.
    softcap: logit soft-capping (Gemma-2, FlashAttention-2's ``softcap``): the scaled scores
    become ``softcap * tanh(scores / softcap)`` before the softmax; 0 (default) is off. The cap
    is a runtime value: one kernel serves every cap.
    window_size: (left, right), FlashAttention-2's sliding window (Mistral, Gemma-2): query i
    sees keys i + seqlen_k - seqlen_q - left .. i + seqlen_k - seqlen_q + right; -1 is
    unbounded, (-1, -1) (default) no window. With ``causal`` the right edge is 0. Key tiles
    outside the window are skipped, so the time falls with the window. The edges are runtime
    values: one kernel serves every window.
    alibi_slopes: ALiBi (FlashAttention-2's ``alibi_slopes``): (heads,) or (batch, heads) float32;
    the scaled score of (i, j) gets -slope * |i + seqlen_k - seqlen_q - j|. None (default): off.
    num_splits: FlashDecoding (FlashAttention-2's ``num_splits``): the keys of each query tile
    cut into this many chunks run in parallel, their partial results combined by a second kernel.
    0 (default): on a GPU, short queries (decode: at most ``DECODE_ROWS`` rows) get a count from
    the GPU's size and the batch, heads and keys (``splits_for``), the rest none; 1: no split.
    """
    causal = V.check_bool(causal, "causal")
    static_shape = V.check_bool(static_shape, "static_shape")
    return_lse = V.check_bool(return_lse, "return_lse")
    cap = V.check_softcap(softcap)
    window = V.check_window(window_size, causal)
    spec, (b, sq, sk, h) = spec_for(q, k, v, causal=causal, algorithm=algorithm, softcap=bool(cap), window=window,
                                    alibi=alibi_slopes is not None)
    V.check_no_grad(V.array_kind(q, "q"), q, k, v)
    V.check_scale(softmax_scale, spec.head_dim)
    num_splits = V.check_num_splits(num_splits)
    if static_shape:
        if num_splits > 1:
            raise ValueError(f"num_splits: a split kernel has any shape, got num_splits={num_splits} with "
                             "static_shape=True")
        spec = spec.replace(shape=(b, sq, sk, h))
    elif algorithm == "fused":
        spec = with_splits(spec, b, sq, sk, h, num_splits, window)
    elif num_splits > 1:
        raise ValueError(f"num_splits: the fused algorithm only, got algorithm={algorithm!r}")
    return kernel_for(spec, sq, sk)(q, k, v, softmax_scale=softmax_scale, return_lse=return_lse, softcap=cap,
                                    window_size=window if spec.window else None, alibi_slopes=alibi_slopes)


def spec_for(q, k, v, *, causal: bool = False, algorithm: str = "fused", softcap: bool = False,
             window: tuple[int, int] = (-1, -1), alibi: bool = False):
    """(the any-shape KernelSpec that serves these inputs on their device, (batch, seq_q, seq_k,
    heads)). ``window``: a ``validate.check_window`` window; where it bounds the keys at these
    lengths the spec has a window (causal where its right edge is the diagonal)."""
    _, device, dtype, (b, sq, h, sk, hk, d) = V.check_qkv(q, k, v)
    causal, windowed = V.window_kind(window, sq, sk)
    if windowed and algorithm != "fused":
        raise ValueError(f"window_size: the fused algorithm only, got algorithm={algorithm!r}")
    if alibi and algorithm != "fused":
        raise ValueError(f"alibi_slopes: the fused algorithm only, got algorithm={algorithm!r}")
    spec = KernelSpec(head_dim=d, dtype=dtype, causal=causal, group=h // hk, algorithm=algorithm,
                      target=target_for(device), softcap=softcap, window=windowed, alibi=alibi)
    return spec, (b, sq, sk, h)


#: KernelSpec(**fields), one object per fields: the host path of the cache and varlen APIs builds a
#: spec every call, and a spec's construction checks every field.
cached_spec = functools.lru_cache(maxsize=256)(KernelSpec)


#: Query rows up to which ``attention`` splits the keys by itself on a GPU: one query tile of the
#: split kernel (``rules.decode_cuda_mma``).
DECODE_ROWS = 16

#: Programs of the split kernel (one warp each) an SM should get: the split count doubles while
#: the programs stay at most half of ``SPLIT_BLOCKS_PER_SM`` per SM (measured on the H200,
#: docs/inference.md: more, smaller chunks cost their partials' traffic).
SPLIT_BLOCKS_PER_SM = 4

#: Key tiles a chunk keeps at least: fewer leave the K/V pipeline no steady state and make the
#: partials' traffic count.
MIN_CHUNK_TILES = 4


def splits_for(spec: KernelSpec, batch: int, seq_q: int, seq_k: int, heads: int, num_splits: int = 0,
               window: tuple[int, int] = (-1, -1)) -> int:
    """``KernelSpec.splits`` for these lengths: ``num_splits`` where given (1: none, 0), else,
    for short queries on a GPU, counted on the tile the split kernel is planned with
    (``builder.plan``), the largest power of two whose programs stay within
    ``SPLIT_BLOCKS_PER_SM`` per SM while each chunk keeps ``MIN_CHUNK_TILES`` key tiles (1
    where the query tiles alone fill the GPU); 0 (no split, the prefill kernel) for long
    queries. ``window``: (left, right) of a sliding window, which bounds the keys a query row
    sees, and so the key tiles to share out."""
    if num_splits:
        return 0 if num_splits == 1 else num_splits
    if not spec.is_cuda or seq_q > DECODE_ROWS or spec.shape is not None:
        return 0
    block_m, block_n = plan(spec.replace(splits=1)).tile
    group = spec.group
    if group <= block_m:  # a program per K/V head, its group's query heads packed in its rows
        programs = batch * (heads // group) * -(-seq_q // (block_m // group))
    else:
        programs = batch * heads * -(-seq_q // block_m)
    want = _sm_count() * SPLIT_BLOCKS_PER_SM
    left, right = window
    visible = seq_k if left < 0 else min(seq_k, left + seq_q + (seq_k if right < 0 else right))
    tiles = -(-visible // block_n)
    splits = 1
    while programs * splits * 2 <= want and tiles // (2 * splits) >= MIN_CHUNK_TILES and splits < V.MAX_SPLITS:
        splits *= 2
    return splits


def with_splits(spec: KernelSpec, batch: int, seq_q: int, seq_k: int, heads: int, num_splits: int = 0,
                window: tuple[int, int] = (-1, -1)) -> KernelSpec:
    """``spec`` with the split count ``splits_for`` gives these lengths, after checking one
    sequence's partials fit int32 indexing (``spec`` itself where no split)."""
    splits = splits_for(spec, batch, seq_q, seq_k, heads, num_splits, window)
    if not splits:
        return spec
    V.check_split_partials(splits, 1, seq_q, heads, spec.head_dim)  # (per launch: a big batch launches in parts)
    return spec.replace(splits=splits)


@functools.lru_cache(maxsize=None)
def _sm_count() -> int:
    """SMs of the current CUDA device (132 on an H100/H200 when none is visible)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    except ImportError:
        pass
    return 132


def kernel_for(spec: KernelSpec, seq_q: int, seq_k: int):
    """The loaded kernel that runs ``spec`` at these lengths: a CUDA fused kernel of any shape
    comes in two builds, as FlashAttention-2's ``Is_even_MN``, an even one (no bound checks, no
    key-padding mask) for lengths that are multiples of its tile and the general one for the
    rest (``builder.build_for``: the plan's tile decides, before anything is built)."""
    return get_kernel(build_for(spec, seq_q, seq_k))
