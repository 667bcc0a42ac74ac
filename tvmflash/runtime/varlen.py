"""``attention_varlen``: packed variable-length batches, FlashAttention-2's ``flash_attn_varlen_func``.

The kernel is the fused one built with ``KernelSpec.varlen``: Algorithm 0 reads each sequence's
rows of the packed q, k, v through the prefix sums, and the derivation carries that into the
tiles (``compiler.derive``): one program per (sequence, head, query tile), key tiles past the
sequence's keys never visited, query tiles past its rows storing nothing.
"""

from __future__ import annotations

from . import validate as V
from .api import cached_spec, kernel_for, target_for


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, softmax_scale: float | None = None, return_lse: bool = False,
                     softcap: float = 0.0, window_size=(-1, -1), alibi_slopes=None):
    """Attention over a batch of sequences of different lengths packed without padding, as
    FlashAttention-2's ``flash_attn_varlen_func``.

    q: [total_q, heads, head_dim]; k, v: [total_k, heads_kv, head_dim] (GQA/MQA as ``attention``).
    cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 prefix sums: sequence b is rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of k
    and v, starting at 0 and ending at total_q (total_k). On the device of q or (q on a GPU) on
    the CPU, which saves a synchronisation. max_seqlen_q, max_seqlen_k: ints at least the longest
    sequence's rows and keys (the grid is planned on them).
    causal (default False, as FlashAttention's), window_size and alibi_slopes ((heads,) or
    (batch, heads) float32) are aligned bottom-right per sequence: row i of sequence b sees key j
    <= i + seqlen_k(b) - seqlen_q(b). softmax_scale, softcap: as ``attention``'s.
    Returns out [total_q, heads, head_dim], and with ``return_lse`` also lse [heads, total_q]
    (float32, natural log; -inf for rows that see no key).

    The prefix sums are checked on the host (a read or a write past q, k, v is refused with an
    error, never run): on a GPU the call then waits for the copy back, unless they are on the CPU.
    """
    causal = V.check_bool(causal, "causal")
    return_lse = V.check_bool(return_lse, "return_lse")
    _, device, dtype, (_, _, h, _, hk, d) = V.check_packed(q, k, v)
    cap = V.check_softcap(softcap)
    window = V.check_window(window_size, causal)
    V.check_scale(softmax_scale, d)
    max_q = V.check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_k = V.check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    causal_k, windowed = V.window_kind(window, max_q, max_k)
    spec = cached_spec(head_dim=d, dtype=dtype, causal=causal_k, group=h // hk, target=target_for(device),
                       softcap=bool(cap), window=windowed, alibi=alibi_slopes is not None, varlen=True)
    return kernel_for(spec, max_q, max_k).call_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, softmax_scale=softmax_scale, return_lse=return_lse,
        softcap=cap, window_size=window if spec.window else None, alibi_slopes=alibi_slopes)
