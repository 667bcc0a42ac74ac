"""The TensorIR algorithms on the CPU (llvm) against the float64 reference."""

import math

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, get_kernel
from tvmflash.definition import attention_reference

from helpers import assert_close_to_reference, make_qkv


def run(spec, q, k, v, **kw):
    return get_kernel(spec)(q, k, v, return_lse=True, **kw)


@pytest.mark.parametrize("algorithm", ["fused", "standard"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(rng, algorithm, dtype, head_dim, causal):
    q, k, v = make_qkv(rng, 2, 113, 77, 4, 4, head_dim, dtype)
    spec = KernelSpec(head_dim, dtype, causal=causal, algorithm=algorithm)
    out, lse = run(spec, q, k, v)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    assert out.shape == q.shape and lse.shape == (2, 4, 113)
    assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize(
    "seq_q, seq_k",
    [(1, 1), (1, 37), (37, 1), (37, 37), (113, 501), (501, 113), (1023, 1023)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_not_tile_multiples(rng, seq_q, seq_k, causal):
    q, k, v = make_qkv(rng, 1, seq_q, seq_k, 2, 2, 64, "float16")
    out, lse = run(KernelSpec(64, causal=causal), q, k, v)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=causal), "float16")


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(rng, group, causal):
    q, k, v = make_qkv(rng, 2, 70, 90, 8, 8 // group, 64, "float16")
    out, lse = run(KernelSpec(64, causal=causal, group=group), q, k, v)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=causal), "float16")


@pytest.mark.parametrize("algorithm", ["fused", "standard"])
def test_fully_masked_rows_give_zero_and_neg_inf(rng, algorithm):
    # causal, bottom-right aligned, seq_q > seq_k: the first seq_q - seq_k rows see no key
    q, k, v = make_qkv(rng, 1, 50, 20, 2, 2, 64, "float16")
    out, lse = run(KernelSpec(64, causal=True, algorithm=algorithm), q, k, v)
    assert not np.isnan(out.astype(np.float32)).any() and not np.isnan(lse).any()
    assert (out[:, :30] == 0).all()
    assert np.isneginf(lse[:, :, :30]).all()
    assert np.isfinite(lse[:, :, 30:]).all()
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_large_logits_are_stable(rng, dtype):
    # logits in the hundreds: exp overflows without the running max
    q, k, v = make_qkv(rng, 1, 64, 200, 2, 2, 64, dtype, scale=40.0)
    out, lse = run(KernelSpec(64, dtype), q, k, v)
    ref_out, ref_lse = attention_reference(q, k, v)
    assert np.abs(ref_lse).max() > 100
    assert_close_to_reference(out, None, ref_out, ref_lse, dtype)
    finite = np.isfinite(ref_lse)
    # lse ~ 1e2..1e3 here: float32 keeps ~7 digits
    assert np.allclose(lse[finite], ref_lse[finite], rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("softmax_scale", [0.05, 0.5])
def test_softmax_scale_is_a_runtime_argument(rng, softmax_scale):
    q, k, v = make_qkv(rng, 1, 40, 60, 2, 2, 64, "float16")
    spec = KernelSpec(64)
    out, lse = run(spec, q, k, v, softmax_scale=softmax_scale)
    ref = attention_reference(q, k, v, softmax_scale=softmax_scale)
    assert_close_to_reference(out, lse, *ref, "float16")
    default, _ = run(spec, q, k, v)
    assert_close_to_reference(default, None, attention_reference(q, k, v, softmax_scale=1 / math.sqrt(64))[0],
                              None, "float16")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_equals_standard(rng, causal, head_dim):
    q, k, v = make_qkv(rng, 2, 97, 131, 4, 2, head_dim, "float16")
    fused = run(KernelSpec(head_dim, causal=causal, group=2), q, k, v)
    standard = run(KernelSpec(head_dim, causal=causal, group=2, algorithm="standard"), q, k, v)
    np.testing.assert_allclose(fused[0].astype(np.float32), standard[0].astype(np.float32), atol=4e-3)
    np.testing.assert_allclose(fused[1], standard[1], atol=1e-4)


@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_other_head_dims(rng, head_dim):
    q, k, v = make_qkv(rng, 1, 45, 70, 2, 1, head_dim, "bfloat16")
    out, lse = run(KernelSpec(head_dim, "bfloat16", causal=True, group=2), q, k, v)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "bfloat16")


def test_attention_api_numpy_and_torch(rng):
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv(rng, 2, 60, 80, 4, 2, 64, "float16")
    out = tvmflash.attention(q, k, v, causal=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    ref_out, ref_lse = attention_reference(q, k, v, causal=True)
    assert_close_to_reference(out, None, ref_out, ref_lse, "float16")
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for x in (q, k, v))
    tout, tlse = tvmflash.attention(tq, tk, tv, causal=True, return_lse=True)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.bfloat16 and tout.shape == tq.shape
    bq, bk, bv = (x.float().numpy() for x in (tq, tk, tv))
    assert_close_to_reference(tout.float().numpy(), tlse.numpy(), *attention_reference(bq, bk, bv, causal=True),
                              "bfloat16")


def test_out_buffers_are_written_in_place(rng):
    q, k, v = make_qkv(rng, 1, 33, 33, 2, 2, 64, "float16")
    out = np.full(q.shape, np.nan, np.float16)
    lse = np.full((1, 2, 33), np.nan, np.float32)
    kernel = get_kernel(KernelSpec(64))
    got, got_lse = kernel(q, k, v, out=out, lse=lse, return_lse=True)
    assert got is out and got_lse is lse
    assert_close_to_reference(out, lse, *attention_reference(q, k, v), "float16")


def test_non_contiguous_inputs_are_copied(rng):
    q, k, v = make_qkv(rng, 1, 40, 50, 4, 4, 64, "float16")
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # same values, heads-major
    assert not qt.flags["C_CONTIGUOUS"]
    out = tvmflash.attention(qt, k, v)
    assert_close_to_reference(out, None, *attention_reference(q, k, v), "float16")


def test_empty_batch_and_queries(rng):
    for b, sq in ((0, 10), (1, 0)):
        q, k, v = make_qkv(rng, b, sq, 12, 2, 2, 64, "float16")
        out, lse = tvmflash.attention(q, k, v, return_lse=True)
        assert out.shape == q.shape and lse.shape == (b, 2, sq)


def test_no_keys_gives_zero_and_neg_inf(rng):
    q, k, v = make_qkv(rng, 1, 5, 0, 2, 2, 64, "float16")
    out, lse = tvmflash.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_deterministic_over_repeated_calls(rng):
    q, k, v = make_qkv(rng, 1, 100, 150, 4, 1, 64, "float16")
    kernel = get_kernel(KernelSpec(64, causal=True, group=4))
    first, first_lse = kernel(q, k, v, return_lse=True)
    for _ in range(100):
        out, lse = kernel(q, k, v, return_lse=True)
        assert out.tobytes() == first.tobytes() and lse.tobytes() == first_lse.tobytes()


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_pytorch(rng, where, value):
    """A NaN or Inf in an input poisons exactly the outputs PyTorch's attention poisons (same NaN
    pattern as SDPA in float32), the rest stays right, and nothing hangs or crashes."""
    torch = pytest.importorskip("torch")
    q, k, v = make_qkv(rng, 1, 70, 90, 2, 2, 64, "float16")
    arrays = {"q": q, "k": k, "v": v}
    arrays[where][0, 5, 1, 7] = value
    out = tvmflash.attention(arrays["q"], arrays["k"], arrays["v"])
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).transpose(1, 2) for x in (arrays["q"], arrays["k"], arrays["v"]))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    finite = np.isfinite(ref)
    assert finite.any()
    np.testing.assert_allclose(out[finite].astype(np.float64), ref[finite], atol=2e-3, rtol=0)


@pytest.mark.parametrize("head_dim, group, seq_q, seq_k, causal, dtype", [
    (64, 2, 113, 77, True, "float16"), (64, 2, 113, 77, False, "bfloat16"),
    (32, 1, 1, 200, False, "float16"), (128, 4, 70, 70, True, "bfloat16"),
])
def test_softcap_matches_the_capped_reference(rng, dtype, causal, head_dim, group, seq_q, seq_k):
    """Logit soft-capping (Gemma-2, FlashAttention-2's ``softcap``): one kernel, the cap given at
    call time; large logits, so the cap changes the result (checked against the uncapped one)."""
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, 4 * group, 4, head_dim, dtype, scale=3.0)
    for cap in (4.0, 30.0):
        out, lse = tvmflash.attention(q, k, v, causal=causal, softcap=cap, return_lse=True, softmax_scale=0.3)
        ref_out, ref_lse = attention_reference(q, k, v, causal=causal, softcap=cap, softmax_scale=0.3)
        assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)
    raw, _ = attention_reference(q, k, v, causal=causal, softmax_scale=0.3)
    assert np.abs(out.astype(np.float64) - raw).max() > 0.05
    assert get_kernel(KernelSpec(head_dim, dtype, causal=causal, group=group, softcap=True)).spec.softcap


def test_softcap_zero_is_the_plain_kernel(rng):
    q, k, v = make_qkv(rng, 1, 40, 50, 2, 2, 64, "float16")
    assert np.array_equal(tvmflash.attention(q, k, v, softcap=0.0), tvmflash.attention(q, k, v))
    assert np.array_equal(tvmflash.attention(q, k, v, softcap=0), tvmflash.attention(q, k, v))


def test_the_reference_window_and_alibi_are_the_definitions():
    """The float64 reference's window and ALiBi against the semantics spelled out per score
    (FlashAttention-2's): row i sees key j iff diag - left <= j <= diag + right, diag = i +
    seq_k - seq_q, and the score gets -slope * |diag - j|."""
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 1, 6, 9, 2, 1, 32, "float16")
    slopes = np.array([0.5, 0.25], np.float32)
    out, lse = attention_reference(q, k, v, window_size=(2, 1), alibi_slopes=slopes, softmax_scale=0.2)
    for h in range(2):
        for i in range(6):
            diag = i + 9 - 6
            keys = [j for j in range(9) if diag - 2 <= j <= diag + 1]
            s = np.array([0.2 * q[0, i, h].astype(np.float64) @ k[0, j, 0].astype(np.float64)
                          - slopes[h] * abs(diag - j) for j in keys])
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[0, i, h], (p / p.sum()) @ v[0, keys, 0].astype(np.float64), atol=1e-12)
            np.testing.assert_allclose(lse[0, h, i], s.max() + np.log(p.sum()), atol=1e-12)


@pytest.mark.parametrize("seq_q, seq_k, causal, window", [
    (113, 301, False, (40, 17)), (301, 113, True, (25, -1)), (200, 200, False, (0, 0)),
    (70, 500, False, (-1, 3)), (150, 90, True, (10, 0)),  # rows that see no key
])
def test_window_matches_the_windowed_reference(rng, seq_q, seq_k, causal, window):
    """A sliding window (FlashAttention-2's ``window_size``): one kernel for every window, the
    edges given at call time (two kernels here, causal or not, GQA); rows with no key in their
    window give 0 and lse -inf."""
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, 4, 2, 64, "float16")
    out, lse = tvmflash.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=causal, window_size=window), "float16")
    other = (window[0] + 7, window[1]) if window[0] >= 0 else (window[0], window[1] + 7)
    out2, lse2 = tvmflash.attention(q, k, v, causal=causal, window_size=other, return_lse=True)
    assert_close_to_reference(out2, lse2, *attention_reference(q, k, v, causal=causal, window_size=other), "float16")


def test_windows_that_bound_nothing_run_the_plain_kernels(rng):
    """(-1, -1), edges wider than the keys, and (-1, 0) (causal: FlashAttention-2 does the same)
    take the kernels without a window, bit for bit."""
    from tvmflash.runtime.api import spec_for

    q, k, v = make_qkv(rng, 1, 40, 50, 2, 2, 64, "float16")
    plain, causal = tvmflash.attention(q, k, v), tvmflash.attention(q, k, v, causal=True)
    assert np.array_equal(tvmflash.attention(q, k, v, window_size=(-1, -1)), plain)
    assert np.array_equal(tvmflash.attention(q, k, v, window_size=(49, 39)), plain)
    assert np.array_equal(tvmflash.attention(q, k, v, window_size=(-1, 0)), causal)
    assert np.array_equal(tvmflash.attention(q, k, v, causal=True, window_size=(1000, -1)), causal)
    assert not spec_for(q, k, v, window=(49, 39))[0].window
    assert spec_for(q, k, v, window=(48, 39))[0].window


@pytest.mark.parametrize("causal, batch_slopes, window, cap", [
    (False, False, (-1, -1), 0.0), (True, True, (30, 0), 15.0),
])
def test_alibi_matches_the_biased_reference(rng, causal, batch_slopes, window, cap):
    """ALiBi (FlashAttention-2's ``alibi_slopes``), (heads,) or (batch, heads) float32, alone and
    with a window and a softcap; the bias changes the result (checked against the unbiased one)."""
    q, k, v = make_qkv(rng, 2, 97, 130, 4, 2, 64, "float16", scale=2.0)
    slopes = (rng.random((2, 4) if batch_slopes else (4,)) * 0.2).astype(np.float32)
    out, lse = tvmflash.attention(q, k, v, causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes,
                                  return_lse=True)
    ref = attention_reference(q, k, v, causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes)
    assert_close_to_reference(out, lse, *ref, "float16")
    unbiased = attention_reference(q, k, v, causal=causal, window_size=window, softcap=cap)[0]
    assert np.abs(out.astype(np.float64) - unbiased).max() > 0.05


@pytest.mark.parametrize("seq_q, seq_k, heads, group, causal, num_splits, window", [
    (1, 700, 8, 4, False, 4, (-1, -1)),  # decode, GQA packed
    (5, 513, 6, 3, True, 3, (-1, -1)),  # a group that leaves a tile row idle
    (9, 400, 4, 2, True, 2, (50, 0)),  # a sliding window
])
def test_split_kv_through_attention_on_the_cpu(rng, monkeypatch, seq_q, seq_k, heads, group, causal, num_splits,
                                               window):
    """``attention(num_splits=n)`` runs the split-K function (``KernelSpec.splits``), scheduled by
    the CPU rule: against the float64 reference; ``num_splits=1`` the one-pass kernel."""
    from tvmflash.runtime import api

    used = []
    kernel_for = api.kernel_for
    monkeypatch.setattr(api, "kernel_for", lambda spec, sq, sk: used.append(spec) or kernel_for(spec, sq, sk))
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, heads, heads // group, 64, "float16")
    out, lse = tvmflash.attention(q, k, v, causal=causal, window_size=window, num_splits=num_splits,
                                  return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window)
    assert_close_to_reference(out, lse, ref_out, ref_lse, "float16")
    tvmflash.attention(q, k, v, causal=causal, window_size=window, num_splits=1)
    assert [s.splits for s in used] == [num_splits, 0]


def test_the_split_count_fills_the_gpu_within_bounds(monkeypatch):
    """``splits_for``: none for long queries or on the CPU, ``num_splits`` as asked; else the
    programs (one per K/V head of a packed GQA group) kept within SPLIT_BLOCKS_PER_SM per SM and
    each chunk at least MIN_CHUNK_TILES key tiles."""
    from tvmflash.runtime import api

    monkeypatch.setattr(api, "_sm_count", lambda: 132)
    gpu = KernelSpec(128, group=4, target="nvidia/nvidia-h100")
    assert api.splits_for(gpu, 8, 1, 32768, 32) == 8  # 64 programs: 8 chunks of 64 key tiles
    assert api.splits_for(gpu, 64, 1, 4096, 32) == 1  # 512 programs fill it
    assert api.splits_for(gpu, 1, 1, 300, 32) == 1  # 5 key tiles: one chunk
    assert api.splits_for(gpu, 1, 1, 8192, 32) == 32  # chunks of 4 tiles
    assert api.splits_for(gpu, 4, 100, 4096, 32) == 0  # a prefill: the prefill kernel
    assert api.splits_for(gpu, 4, 100, 4096, 32, num_splits=3) == 3
    assert api.splits_for(gpu, 8, 1, 32768, 32, num_splits=1) == 0
    assert api.splits_for(KernelSpec(128, group=4), 8, 1, 32768, 32) == 0  # the CPU: asked for only
    mqa = KernelSpec(128, group=32, target="nvidia/nvidia-h100")  # a group no tile holds: a program a head
    assert api.splits_for(mqa, 8, 1, 32768, 32) == 2  # 256 programs, 2 chunks each
