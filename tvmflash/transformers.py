"""tvmflash as a Hugging Face transformers attention implementation (``AttentionInterface``).

    import tvmflash.transformers
    tvmflash.transformers.register()                      # as "tvm_attention"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="tvm_attention")
    cache = tvmflash.transformers.KVCache()               # optional: decode on the KV-cache kernel
    model.generate(ids, past_key_values=cache, ...)

transformers treats an implementation whose name contains "flash" as a FlashAttention variant
and tries to import it, hence "tvm_attention". Each attention call runs one of tvmflash's APIs on
the layer's (query, key, value) after the cache update:

- a batch without padding (transformers passes no mask): ``attention``, causal where the layer
  is (bottom-right aligned, so a decode step sees every cached key);
- keys that are the filled rows of a ``KVCache`` layer (a decode step, or a prefill, on a
  cache whose rows are tvmflash's layout, (batch, capacity, heads_kv, head_dim)):
  ``attention_with_kvcache`` on the whole buffer with the filled length, no copy of the keys;
- a padded batch (the 2D mask transformers builds for FlashAttention: some 0s): the valid
  tokens packed and ``attention_varlen`` on them, as FlashAttention's integration unpads.

Forward only (tvmflash has no backward): under ``torch.no_grad()``, as ``generate`` runs.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .runtime.api import attention
from .runtime.kvcache import attention_with_kvcache
from .runtime.varlen import attention_varlen

__all__ = ["NAME", "KVCache", "KVCacheLayer", "attention_forward", "register"]

#: The implementation name ``register`` uses by default.
NAME = "tvm_attention"


def register(name: str = NAME) -> str:
    """Register tvmflash with transformers' ``AttentionInterface`` (and the 2D padding mask that
    FlashAttention's implementations get with ``AttentionMaskInterface``) under ``name``;
    returns the name, for ``attn_implementation=``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if "flash" in name:
        raise ValueError(f"name: transformers imports a FlashAttention package for names containing 'flash', got "
                         f"{name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                      softcap=None, sliding_window=None, is_causal=None, **kwargs):
    """One layer's attention, as transformers calls an implementation: query [batch, heads,
    q_len, head_dim], key and value [batch, heads_kv, kv_len, head_dim] (the cache already
    updated), ``attention_mask`` None or a 2D [batch, kv_len] padding mask (shorter than the keys
    where a static cache holds more rows than are filled: the keys past it are left out, as
    FlashAttention's integration does). Packed sequences (transformers' ``cu_seq_lens_q/k``
    with ``max_length_q/k``) run ``attention_varlen``. Returns (out [batch, q_len, heads,
    head_dim], None)."""
    if dropout:
        raise ValueError(f"dropout: tvmflash runs inference only (no dropout), got {dropout}")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions: tvmflash never materialises the attention weights")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("s_aux: tvmflash has no attention sinks (gpt-oss); use another implementation")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected None or a 2D [batch, kv_len] padding mask (the one "
                         f"tvmflash.transformers.register sets up), got shape {tuple(attention_mask.shape)}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    q = query.transpose(1, 2)
    window = (-1, -1)
    if sliding_window:  # transformers' window: a token sees itself and the sliding_window - 1 before it
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    common = dict(softmax_scale=scaling, softcap=float(softcap or 0.0), window_size=window)
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed(q, key, value, kwargs, causal, common), None
    # a static cache hands over all its rows: those past the mask (or, with no mask, past the
    # last position) are not filled
    filled = attention_mask.shape[1] if attention_mask is not None else _positions(kwargs.get("position_ids"))
    if filled is not None and filled < key.shape[2]:
        key, value = key[:, :, :filled], value[:, :, :filled]
    if attention_mask is not None and not _all_valid(attention_mask):
        return _padded(q, key, value, attention_mask, causal, common), None
    cache = _cache_buffers(key, value)
    if cache is not None:
        k_cache, v_cache, filled = cache
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=filled, causal=causal, **common)
    else:
        out = attention(q, key.transpose(1, 2), value.transpose(1, 2), causal=causal, **common)
    return out, None


def _per_forward(read):
    """``read(x)``, a value that waits for the GPU, taken once per tensor: transformers hands every
    layer of a forward the same mask and position tensors, so one wait a forward, not one a layer
    (the last tensor is kept, so its identity stays its own)."""
    last = [None, None]

    def cached(x):
        if x is not last[0]:
            last[:] = [x, read(x)]
        return last[1]

    return cached


#: Whether a 2D padding mask has no padding.
_all_valid = _per_forward(lambda mask: bool(mask.all()))


@_per_forward
def _positions(position_ids):
    """The rows a batch without padding has filled: one past its last position (None: unknown)."""
    if position_ids is None or position_ids.numel() == 0:
        return None
    return int(position_ids.max()) + 1


def _packed(q, key, value, kwargs, causal, common):
    """Sequences packed into one row by transformers (``cu_seq_lens_q/k``, ``max_length_q/k``)
    through ``attention_varlen``."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q: packed sequences lie in one batch row, got batch {q.shape[0]}")
    cu_q, cu_k = (kwargs[n].to(torch.int32) for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    out = attention_varlen(q[0], key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                           int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), causal=causal, **common)
    return out[None]


def _padded(q, key, value, mask, causal, common):
    """Attention of a padded batch through ``attention_varlen``: each sequence's valid keys (the
    mask's 1s) and its queries (the last q_len positions' 1s) packed, the result scattered back
    (zeros at the padding)."""
    batch, q_len, heads, head_dim = q.shape
    mask = mask.bool()
    rows_q, rows_k = mask[:, -q_len:].reshape(-1), mask.reshape(-1)
    keys, values = (x.transpose(1, 2).reshape(-1, *x.shape[1:2], head_dim) for x in (key, value))
    lengths = torch.stack([mask[:, -q_len:].sum(1), mask.sum(1)]).to("cpu", torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(1, dtype=torch.int32), (1, 0))
    packed = attention_varlen(q.reshape(-1, heads, head_dim)[rows_q], keys[rows_k], values[rows_k], cu[0], cu[1],
                              int(lengths[0].max()), int(lengths[1].max()), causal=causal, **common)
    out = q.new_zeros(batch * q_len, heads, head_dim)
    out[rows_q] = packed
    return out.view(batch, q_len, heads, head_dim)


def _cache_buffers(key, value):
    """(k buffer, v buffer, filled rows) where key and value are the filled rows of ``KVCache``
    layer buffers ([batch, capacity, heads_kv, head_dim], contiguous), else None."""
    out = []
    for x in (key, value):
        rows = x.transpose(1, 2)
        base = rows._base
        if (base is None or base.dim() != 4 or not base.is_contiguous() or rows.data_ptr() != base.data_ptr()
                or rows.stride() != base.stride() or rows.shape[0] != base.shape[0] or rows.shape[2:] != base.shape[2:]):
            return None
        out.append(base)
    return out[0], out[1], int(key.shape[2])


class KVCacheLayer(CacheLayerMixin):
    """One layer's keys and values in tvmflash's layout, [batch, capacity, heads_kv, head_dim],
    grown by doubling; ``keys``/``values`` are the filled rows as transformers' [batch, heads_kv,
    seq_len, head_dim] views of it (which ``attention_forward`` recognises)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = True

    def __init__(self, **kwargs):
        super().__init__()
        self.k_buf = self.v_buf = None
        self.filled = 0
        self.keys = self.values = None
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _views(self):
        self.keys = self.k_buf[:, : self.filled].transpose(1, 2)
        self.values = self.v_buf[:, : self.filled].transpose(1, 2)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads_kv, new, head_dim = key_states.shape
        need = self.filled + new
        if self.k_buf is None or need > self.k_buf.shape[1]:
            capacity = max(need, 2 * (0 if self.k_buf is None else self.k_buf.shape[1]), 256)
            bufs = []
            for old in (self.k_buf, self.v_buf):
                buf = key_states.new_empty(batch, capacity, heads_kv, head_dim)
                if old is not None:
                    buf[:, : self.filled] = old[:, : self.filled]
                bufs.append(buf)
            self.k_buf, self.v_buf = bufs
        self.k_buf[:, self.filled : need] = key_states.transpose(1, 2)
        self.v_buf[:, self.filled : need] = value_states.transpose(1, 2)
        self.filled = need
        self._views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected a count <= 0 (tokens to drop from the end), got "
                             f"{tokens_to_remove}")
        if self.filled:
            self.filled = max(self.filled + tokens_to_remove, 0)
            self._views()

    def _select(self, index) -> None:
        if self.k_buf is not None:
            self.k_buf, self.v_buf = (buf[index].contiguous() for buf in (self.k_buf, self.v_buf))
            self._views()

    def reorder_cache(self, beam_idx) -> None:
        self._select(beam_idx.to(self.k_buf.device) if self.k_buf is not None else beam_idx)

    def batch_select_indices(self, indices) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.k_buf is not None:
            self._select(torch.arange(self.k_buf.shape[0], device=self.k_buf.device).repeat_interleave(repeats))

    def offload(self):
        pass

    def prefetch(self):
        pass


def KVCache() -> Cache:
    """A transformers ``Cache`` whose layers are ``KVCacheLayer``s (one made per decoder layer as
    the model first updates it): pass it as ``past_key_values`` so that decode steps run
    tvmflash's KV-cache kernel on it."""
    return Cache(layer_class_to_replicate=KVCacheLayer)
