"""The public entry point: ``attention(q, k, v, causal=..., softmax_scale=..., return_lse=...)``."""

from __future__ import annotations

from ..builder import build_for
from ..spec import KernelSpec
from . import validate as V
from .cache import get_kernel


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
              window_size=(-1, -1), alibi_slopes=None):
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
    if static_shape:
        spec = spec.replace(shape=(b, sq, sk, h))
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


def kernel_for(spec: KernelSpec, seq_q: int, seq_k: int):
    """The loaded kernel that runs ``spec`` at these lengths: a CUDA fused kernel of any shape
    comes in two builds, as FlashAttention-2's ``Is_even_MN``, an even one (no bound checks, no
    key-padding mask) for lengths that are multiples of its tile and the general one for the
    rest (``builder.build_for``: the plan's tile decides, before anything is built)."""
    return get_kernel(build_for(spec, seq_q, seq_k))
