"""tvmflash as a Hugging Face transformers attention implementation ("tvm_attention"): a Llama-style
model built from a config (random weights, no download) generates the same greedy tokens as with
SDPA, through each of tvmflash's APIs: ``attention`` (DynamicCache), ``attention_with_kvcache``
(``tvmflash.transformers.KVCache``) and ``attention_varlen`` (a left-padded batch)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tvmflash.transformers as tt  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _llama(device="cpu", layers=2, hidden=256, heads=4, heads_kv=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads_kv, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.float16).eval()


def _counting(monkeypatch):
    """Count the calls of each tvmflash API the implementation makes."""
    calls = {}
    for name in ("attention", "attention_with_kvcache", "attention_varlen"):
        real = getattr(tt, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(tt, name, counted)
    return calls


def _generate(model, implementation, ids, tokens, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, **kwargs)


#: How far below SDPA's best logit tvmflash's greedy token may be: float16 logits of a random
#: model tie (a gap of 0 seen); the attention itself moves logits by about 1e-3.
TIE = 2e-2


def _greedy_under_sdpa(model, got, mask, prompt):
    """Each token tvmflash generated is SDPA's greedy choice, up to ``TIE``: SDPA's logits on
    tvmflash's sequence (teacher forcing), position by position."""
    model.set_attn_implementation("sdpa")
    full = torch.cat([mask, mask.new_ones(mask.shape[0], got.shape[1] - prompt)], 1)
    with torch.no_grad():
        logits = model(got[:, :-1], attention_mask=full[:, :-1]).logits[:, prompt - 1:].float()
    chosen = logits.gather(-1, got[:, prompt:, None])[..., 0]
    short = logits.max(-1).values - chosen
    assert short.max() <= TIE, short


def _same_tokens(model, ids, tokens, monkeypatch):
    """For each way of calling: tvmflash's greedy tokens are SDPA's (where SDPA's own top two do
    not tie), and the tvmflash API meant for it ran."""
    name = tt.register()
    prompt = ids.shape[1]
    padded = torch.ones_like(ids)
    padded[0, : prompt // 3] = 0  # left padding, as generate pads a batch of prompts
    ones = torch.ones_like(ids)
    for mask, extra, api in ((ones, {}, "attention"), (ones, dict(past_key_values=tt.KVCache()), "attention_with_kvcache"),
                             (padded, {}, "attention_varlen"),
                             (ones, dict(cache_implementation="static"), "attention")):  # (rows past the mask)
        want = _generate(model, "sdpa", ids, tokens, attention_mask=mask)
        calls = _counting(monkeypatch)
        got = _generate(model, name, ids, tokens, attention_mask=mask, **extra)
        monkeypatch.undo()
        assert set(calls) == {api}, (api, calls)
        # one call a layer a forward: the prefill, then each new token but the last
        assert calls[api] == model.config.num_hidden_layers * tokens, calls
        if not torch.equal(got, want):
            _greedy_under_sdpa(model, got, mask, prompt)


def test_a_llama_generates_sdpas_tokens_on_the_cpu(monkeypatch):
    """Two layers, 4 query over 2 kv heads of head dim 64, float16, a batch of two prompts of 11
    tokens, 6 new tokens."""
    model = _llama()
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    _same_tokens(model, ids, 6, monkeypatch)


def test_the_kv_cache_holds_tvmflash_layout_and_is_read_in_place():
    """The cache's layers keep [batch, capacity, heads_kv, head_dim] buffers that grow by
    doubling; the keys transformers sees are views of the filled rows, which the implementation
    hands to ``attention_with_kvcache`` without a copy."""
    layer = tt.KVCacheLayer()
    k = torch.randn(2, 3, 300, 64, dtype=torch.float16)
    keys, values = layer.update(k, k + 1)
    assert layer.k_buf.shape == (2, 300, 3, 64) and torch.equal(keys, k) and layer.get_seq_length() == 300
    keys, values = layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.k_buf.shape == (2, 600, 3, 64) and keys.shape == (2, 3, 301, 64) and torch.equal(keys[:, :, :300], k)
    buffers = tt._cache_buffers(keys, values)
    assert buffers is not None and buffers[0] is layer.k_buf and buffers[2] == 301
    assert tt._cache_buffers(k, k) is None  # a plain (DynamicCache) tensor
    layer.crop(-100)
    assert layer.get_seq_length() == 201 and layer.keys.shape[2] == 201
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.k_buf.shape[0] == 1 and torch.equal(layer.keys, k[1:, :, :201])


def test_packed_sequences_run_varlen():
    """transformers' packed form (one batch row, ``cu_seq_lens_q/k``): each sequence on its own,
    as ``attention_varlen`` gives it."""
    import tvmflash

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 12, 64, generator=g).half() for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out, _ = tt.attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                                  max_length_k=7)
    want = tvmflash.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 7, 7,
                                     causal=True)
    assert torch.equal(out[0], want)


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="name: transformers imports a FlashAttention package"):
        tt.register("tvm_flash")
    q = torch.zeros(1, 2, 3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="dropout: tvmflash runs inference only"):
        tt.attention_forward(None, q, q, q, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="s_aux: tvmflash has no attention sinks"):
        tt.attention_forward(None, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match=r"attention_mask: expected None or a 2D \[batch, kv_len\] padding mask"):
        tt.attention_forward(None, q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool))


@pytest.mark.gpu
def test_a_llama_generates_sdpas_tokens_on_the_gpu(monkeypatch):
    """A small Llama (8 layers, hidden 1024, 16 query over 4 kv heads of head dim 64) on the GPU:
    32 greedy tokens from two prompts of 40 tokens, the same as with SDPA, each way."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = _llama("cuda", layers=8, hidden=1024, heads=16, heads_kv=4)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1)).cuda()
    _same_tokens(model, ids, 32, monkeypatch)
