"""Attention in TensorIR, the semantics every kernel is tested against.

- ``plain``: plain attention ("Algorithm 0") in one function, S and P over all keys: what
  ``compiler.derive`` derives every fused kernel from (variants such as ``softcap`` go here).
- ``fused``: the FlashAttention forward written by hand (the derivation's test oracle), tiled by
  (block_m, block_n), the online softmax over K/V tiles; its block names are the schedules' API.
- ``standard``: the standard algorithm as three kernels (qk, softmax, pv) with S and P in global memory.
- ``mask``: the visibility rule and the masked-score form both build on.
- ``reference``: float64 numpy attention, the ground truth of the tests.
"""

from .fused import *  # noqa: F401,F403 - fused_attention and its block names
from .mask import LN2, LOG2E, NEG_INF, finite, is_masked_score, masked, visible  # noqa: F401
from .plain import plain_attention, softcap  # noqa: F401
from .reference import attention_reference, attention_varlen_reference  # noqa: F401
from .standard import *  # noqa: F401,F403 - standard_attention and its block names
