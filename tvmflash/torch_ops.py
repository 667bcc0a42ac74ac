"""``torch.ops.tvmflash.attention_fwd``: tvmflash as a PyTorch custom op (opt-in: importing this
module registers it).

    import tvmflash.torch_ops
    out, lse = torch.ops.tvmflash.attention_fwd(q, k, v, causal=True)

The op has a real kernel for CPU and CUDA tensors (``tvmflash.attention``, which builds and
caches the kernel for the spec on first use) and a fake implementation that gives the output
shapes and dtypes, so ``torch.compile(fullgraph=True)`` traces through it without running it.

Forward only, until a backward exists: called on tensors that require grad with grad mode on,
it raises NotImplementedError (its autograd registration refuses to record it), so no result
is ever silently detached from the graph. Under ``torch.no_grad()`` or on detached tensors it
runs.
"""

from __future__ import annotations

import torch

from .runtime.api import attention
from .runtime.kvcache import attention_with_kvcache
from .runtime.varlen import attention_varlen

__all__ = ["attention_fwd", "attention_kvcache_fwd", "attention_varlen_fwd"]

_DTYPES = (torch.float16, torch.bfloat16)


@torch.library.custom_op("tvmflash::attention_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  softmax_scale: float | None = None, softcap: float = 0.0, window_left: int = -1,
                  window_right: int = -1, alibi_slopes: torch.Tensor | None = None, num_splits: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) = softmax(q k^T * softmax_scale) v, as ``tvmflash.attention(..., return_lse=True)``.

    q: [batch, seqlen_q, heads, head_dim]; k, v: [batch, seqlen_k, heads_kv, head_dim], float16 or
    bfloat16. out: like q; lse: [batch, heads, seqlen_q] float32, natural log. softcap: 0 (off)
    or the logit cap. window_left, window_right: ``attention``'s ``window_size`` (-1 unbounded).
    alibi_slopes: (heads,) or (batch, heads) float32, or None. num_splits: ``attention``'s (0
    chooses, 1 never splits the keys).
    """
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True, softcap=softcap,
                     window_size=(window_left, window_right), alibi_slopes=alibi_slopes, num_splits=num_splits)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal=False, softmax_scale=None, softcap=0.0, window_left=-1, window_right=-1,
                        alibi_slopes=None, num_splits=0):
    return _fake(q, k, v, ("q", "k", "v"))


def _fake(q, k, v, names):
    # Only what can be checked without specialising symbolic sizes: ranks and dtypes. The real
    # kernel checks the rest (validate.check_qkv) when it runs.
    nq, nk, nv = names
    for name, x in ((nq, q), (nk, k), (nv, v)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 [batch, seqlen, heads, head_dim], got rank {x.dim()} "
                             f"with shape {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected dtype float16 or bfloat16, got {str(q.dtype).replace('torch.', '')}")
    for name, x in ((nk, k), (nv, v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {str(q.dtype).replace('torch.', '')} (the dtype of q), "
                            f"got {str(x.dtype).replace('torch.', '')}")
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("tvmflash::attention_kvcache_fwd", mutates_args=("k_cache", "v_cache"),
                         device_types=("cpu", "cuda"))
def attention_kvcache_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                          v: torch.Tensor | None, cache_seqlens: torch.Tensor, causal: bool = True,
                          softmax_scale: float | None = None, softcap: float = 0.0, window_left: int = -1,
                          window_right: int = -1, alibi_slopes: torch.Tensor | None = None, num_splits: int = 0,
                          block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) = ``tvmflash.attention_with_kvcache(..., return_lse=True)``: k and v (when given)
    written into k_cache and v_cache at cache_seqlens (in place, which the op's schema records),
    then attention over each sequence's keys. cache_seqlens: (batch,) int32; block_table: a paged
    cache's (batch, max_pages) int32, or None."""
    return attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=causal,
                                  softmax_scale=softmax_scale, return_lse=True, softcap=softcap,
                                  window_size=(window_left, window_right), alibi_slopes=alibi_slopes,
                                  num_splits=num_splits, block_table=block_table)


@attention_kvcache_fwd.register_fake
def _attention_kvcache_fwd_fake(q, k_cache, v_cache, k, v, cache_seqlens, causal=True, softmax_scale=None,
                                softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None, num_splits=0,
                                block_table=None):
    _fake(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))  # ranks and dtypes
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype int32, got {str(cache_seqlens.dtype).replace('torch.', '')}")
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("tvmflash::attention_varlen_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                         softmax_scale: float | None = None, softcap: float = 0.0, window_left: int = -1,
                         window_right: int = -1, alibi_slopes: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) = ``tvmflash.attention_varlen(..., return_lse=True)``: q [total_q, heads, head_dim],
    k, v [total_k, heads_kv, head_dim] packed, cu_seqlens_q / cu_seqlens_k (batch + 1,) int32
    prefix sums. out: like q; lse: [heads, total_q] float32, natural log."""
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            softmax_scale=softmax_scale, return_lse=True, softcap=softcap,
                            window_size=(window_left, window_right), alibi_slopes=alibi_slopes)


@attention_varlen_fwd.register_fake
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               softmax_scale=None, softcap=0.0, window_left=-1, window_right=-1, alibi_slopes=None):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected rank 3 [total_tokens, heads, head_dim] (packed sequences), got rank "
                             f"{x.dim()} with shape {tuple(x.shape)}")
    _fake(q[None], k[None], v[None], ("q", "k", "v"))  # dtypes
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if x.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {str(x.dtype).replace('torch.', '')}")
    total_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total_q), dtype=torch.float32)


def _refuse(ctx, inputs, output):
    raise NotImplementedError(
        "tvmflash's ops (attention_fwd, attention_varlen_fwd) have no backward pass yet, and an input requires "
        "grad; call them under torch.no_grad() (or on detached tensors) for inference")


def _no_backward(ctx, grad_out, grad_lse):  # pragma: no cover - never recorded: _refuse raises first
    raise NotImplementedError("tvmflash's ops have no backward pass yet")


attention_fwd.register_autograd(_no_backward, setup_context=_refuse)
attention_varlen_fwd.register_autograd(_no_backward, setup_context=_refuse)
