"""Bad input: each error names the argument, with what was expected and what was given."""

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, get_kernel

from helpers import make_qkv


@pytest.fixture
def qkv(rng):
    return make_qkv(rng, 2, 10, 12, 4, 2, 64, "float16")


def check(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_wrong_dtype(qkv):
    q, k, v = qkv
    check(TypeError, r"q: expected dtype float16 or bfloat16, got float32", tvmflash.attention,
          q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    check(TypeError, r"k: expected dtype float16 \(the dtype of q\), got float32", tvmflash.attention,
          q, k.astype(np.float32), v)


def test_kernel_dtype_mismatch(qkv):
    import ml_dtypes

    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in qkv)
    kernel = get_kernel(KernelSpec(64, "float16", group=2))
    check(TypeError, r"q: expected dtype float16 \(the kernel's\), got bfloat16", kernel, q, k, v)


def test_wrong_rank(qkv):
    q, k, v = qkv
    check(ValueError, r"q: expected rank 4 \[batch, seqlen, heads, head_dim\], got rank 3", tvmflash.attention,
          q[0], k, v)


def test_mismatched_batch(qkv):
    q, k, v = qkv
    check(ValueError, r"k: expected batch 2 \(the batch of q\), got 1", tvmflash.attention, q, k[:1], v[:1])


def test_k_v_shapes_differ(qkv):
    q, k, v = qkv
    check(ValueError, r"v: expected the shape of k \(2, 12, 2, 64\), got \(2, 11, 2, 64\)", tvmflash.attention,
          q, k, v[:, :11])


def test_head_dim_mismatch(qkv, rng):
    q, _, _ = qkv
    _, k, v = make_qkv(rng, 2, 10, 12, 4, 2, 32, "float16")
    check(ValueError, r"k: expected head_dim 64 \(the head_dim of q\), got 32", tvmflash.attention, q, k, v)


def test_unsupported_head_dim(rng):
    q, k, v = make_qkv(rng, 1, 4, 4, 2, 2, 48, "float16")
    check(NotImplementedError, r"q: expected head_dim in \(32, 64, 96, 128, 256\), got 48", tvmflash.attention,
          q, k, v)
    check(NotImplementedError, r"head_dim: expected one of", KernelSpec, 48)


def test_kernel_head_dim_not_compiled(rng):
    q, k, v = make_qkv(rng, 1, 4, 4, 2, 2, 128, "float16")
    check(NotImplementedError, r"q: expected head_dim 64 \(the kernel's\), got 128", get_kernel(KernelSpec(64)),
          q, k, v)


def test_heads_not_divisible(rng):
    q, k, v = make_qkv(rng, 1, 4, 4, 6, 4, 64, "float16")
    check(ValueError, r"k: expected heads_kv dividing the query heads 6, got heads_kv 4", tvmflash.attention,
          q, k, v)


def test_kernel_gqa_group_mismatch(qkv):
    q, k, v = qkv  # 4 heads over 2 kv heads: group 2
    check(ValueError, r"k: expected heads_kv = heads / 4 = 1 \(the kernel's GQA group 4\), got 2",
          get_kernel(KernelSpec(64, group=4)), q, k, v)


def test_non_contiguous_last_dim(qkv):
    q, k, v = qkv
    wide = np.zeros(q.shape[:-1] + (128,), q.dtype)
    check(ValueError, r"q: expected a contiguous last dimension \(stride 1\), got stride 2", tvmflash.attention,
          wide[..., ::2], k, v)


def test_mixed_array_kinds(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = qkv
    check(TypeError, r"k: expected the same kind of array as q \(numpy\), got torch", tvmflash.attention,
          q, torch.from_numpy(k), v)


def test_not_an_array(qkv):
    q, k, v = qkv
    check(TypeError, r"q: expected a torch.Tensor, numpy.ndarray or tvm Tensor, got builtins.list",
          tvmflash.attention, q.tolist(), k, v)


def test_bad_out_and_lse(qkv):
    q, k, v = qkv
    kernel = get_kernel(KernelSpec(64, group=2))
    check(ValueError, r"out: expected shape \(2, 10, 4, 64\), got \(2, 10, 4, 32\)", kernel, q, k, v,
          out=np.empty((2, 10, 4, 32), np.float16))
    check(TypeError, r"out: expected dtype float16, got float32", kernel, q, k, v,
          out=np.empty(q.shape, np.float32))
    check(ValueError, r"lse: expected shape \(2, 4, 10\), got \(2, 10, 4\)", kernel, q, k, v,
          lse=np.empty((2, 10, 4), np.float32))
    check(TypeError, r"lse: expected dtype float32, got float16", kernel, q, k, v,
          lse=np.empty((2, 4, 10), np.float16))


def test_bad_softmax_scale_and_causal(qkv):
    q, k, v = qkv
    check(ValueError, r"softmax_scale: expected a finite float > 0, got nan", tvmflash.attention, q, k, v,
          softmax_scale=float("nan"))
    check(TypeError, r"softmax_scale: expected a float or None, got str", tvmflash.attention, q, k, v,
          softmax_scale="0.1")
    check(TypeError, r"causal: expected a bool, got int", tvmflash.attention, q, k, v, causal=1)


def test_kernel_refuses_arrays_on_another_device(qkv):
    # a CUDA kernel given CPU arrays must say so, not crash
    q, k, v = qkv
    from tvmflash.runtime.kernel import Kernel

    class FakeModule:
        def __getitem__(self, name):
            raise AssertionError("must not be called")

    manifest = {"spec": KernelSpec(64, group=2, target="nvidia/nvidia-a100").to_dict(), "functions": []}
    check(ValueError, r"q: expected a cuda array for kernel fwd_f16_d64_g2_sm80, got one on cpu",
          Kernel(FakeModule(), manifest), q, k, v)


def test_spec_errors():
    check(ValueError, r"algorithm: expected one of \('fused', 'standard'\), got 'flash'", KernelSpec, 64,
          algorithm="flash")
    check(TypeError, r"dtype: expected one of \('float16', 'bfloat16'\), got 'float32'", KernelSpec, 64, "float32")
    check(ValueError, r"group: expected a positive int", KernelSpec, 64, group=0)
    check(ValueError, r"target: expected 'cpu', a TVM tag", KernelSpec(64, target="nvidia/no-such-gpu").__getattribute__,
          "key")


def test_load_missing_file(tmp_path):
    check(FileNotFoundError, r"path: expected a built kernel's module at .*nothing.so", tvmflash.load,
          tmp_path / "nothing.so")


def test_softmax_scale_must_be_positive(qkv):
    q, k, v = qkv
    check(ValueError, r"softmax_scale: expected a finite float > 0, got -0.5", tvmflash.attention, q, k, v,
          softmax_scale=-0.5)


def test_standard_refuses_s_beyond_int32_indexing():
    """The standard algorithm's S ([batch, heads, seq_q, seq_k]) is int32-indexed: past 2^31
    elements it would read and write out of bounds (an illegal address on the H100 at 16 heads,
    seqlen 16k). It says so before allocating anything; the fused kernel has no S."""
    kern = get_kernel(KernelSpec(32, target="cpu", algorithm="standard"))
    q = np.zeros((1, 65536, 16, 32), np.float16)  # 16 * 65536^2 elements in S
    with pytest.raises(ValueError, match=r"seq_q, seq_k: .*int32"):
        kern(q, q, q)


def test_bad_softcap(qkv):
    q, k, v = qkv
    check(ValueError, r"softcap: expected a finite float >= 0 \(0 = off\), got -1.0", tvmflash.attention, q, k, v,
          softcap=-1.0)
    check(ValueError, r"softcap: expected a finite float >= 0 \(0 = off\), got nan", tvmflash.attention, q, k, v,
          softcap=float("nan"))
    check(TypeError, r"softcap: expected a float \(0 = off\), got str", tvmflash.attention, q, k, v, softcap="50")
    check(TypeError, r"softcap: expected a float \(0 = off\), got bool", tvmflash.attention, q, k, v, softcap=True)
    check(ValueError, r"softcap: the fused algorithm only .* got algorithm='standard'", tvmflash.attention, q, k, v,
          softcap=30.0, algorithm="standard")
    check(TypeError, r"softcap: expected a bool \(the cap itself is a runtime value\), got float", KernelSpec, 64,
          softcap=50.0)


def test_bad_window_size(qkv):
    q, k, v = qkv
    check(TypeError, r"window_size: expected \(left, right\), two ints \(-1 = unbounded\), got 4", tvmflash.attention,
          q, k, v, window_size=4)
    check(TypeError, r"window_size: expected \(left, right\), two ints \(-1 = unbounded\), got \(1, 2, 3\)",
          tvmflash.attention, q, k, v, window_size=(1, 2, 3))
    check(TypeError, r"window_size: .* got left 2.5 \(float\)", tvmflash.attention, q, k, v, window_size=(2.5, 0))
    check(TypeError, r"window_size: .* got right True \(bool\)", tvmflash.attention, q, k, v, window_size=(2, True))
    check(ValueError, r"window_size: expected left >= 0 or -1 \(unbounded\), got -2", tvmflash.attention, q, k, v,
          window_size=(-2, 0))
    check(ValueError, r"window_size: expected right >= 0 or -1 \(unbounded\), got -5", tvmflash.attention, q, k, v,
          window_size=(3, -5))
    check(ValueError, r"window_size: expected left at most 2147483647 \(int32\) or -1 \(unbounded\), got 2147483648",
          tvmflash.attention, q, k, v, window_size=(2**31, 0))
    check(ValueError, r"window_size: causal attention sees no key right of the diagonal: expected right 0 or -1 "
          r"with causal=True, got right 4", tvmflash.attention, q, k, v, causal=True, window_size=(3, 4))
    check(ValueError, r"window_size: the fused algorithm only, got algorithm='standard'", tvmflash.attention, q, k, v,
          window_size=(3, 3), algorithm="standard")
    check(TypeError, r"window: expected a bool \(the window's size is a runtime value\), got tuple", KernelSpec, 64,
          window=(3, 3))


def test_kernel_window_must_match_its_build(qkv):
    q, k, v = qkv
    windowed, plain = get_kernel(KernelSpec(64, group=2, causal=True, window=True)), get_kernel(KernelSpec(64, group=2))
    check(ValueError, r"window_size: kernel fwd_f16_d64_causal_window_g2_cpu\w* is built with a window: expected "
          r"\(left, right\), got None", windowed, q, k, v)
    check(ValueError, r"window_size: causal attention sees no key right", windowed, q, k, v, window_size=(3, 1))
    check(ValueError, r"window_size: kernel fwd_f16_d64_g2_cpu\w* has no window \(built with window=False\): expected "
          r"None or \(-1, -1\), got \(3, 3\)", plain, q, k, v, window_size=(3, 3))


def test_bad_alibi_slopes(qkv):
    q, k, v = qkv  # batch 2, heads 4
    slopes = np.full(4, 0.5, np.float32)
    check(TypeError, r"alibi_slopes: expected dtype float32, got float16", tvmflash.attention, q, k, v,
          alibi_slopes=slopes.astype(np.float16))
    check(ValueError, r"alibi_slopes: expected shape \(4,\) or \(2, 4\) \(heads, or batch and heads, of q\), got "
          r"\(8,\)", tvmflash.attention, q, k, v, alibi_slopes=np.full(8, 0.5, np.float32))
    check(ValueError, r"alibi_slopes: expected shape .* got \(4, 2\)", tvmflash.attention, q, k, v,
          alibi_slopes=np.full((4, 2), 0.5, np.float32))
    check(TypeError, r"alibi_slopes: expected a torch.Tensor, numpy.ndarray or tvm Tensor, got builtins.list",
          tvmflash.attention, q, k, v, alibi_slopes=[0.5] * 4)
    check(ValueError, r"alibi_slopes: the fused algorithm only, got algorithm='standard'", tvmflash.attention, q, k, v,
          alibi_slopes=slopes, algorithm="standard")
    plain = get_kernel(KernelSpec(64, group=2))
    check(ValueError, r"alibi_slopes: kernel fwd_f16_d64_g2_cpu\w* has no ALiBi \(built with alibi=False\): expected "
          r"None", plain, q, k, v, alibi_slopes=slopes)
    biased = get_kernel(KernelSpec(64, group=2, alibi=True))
    check(ValueError, r"alibi_slopes: kernel fwd_f16_d64_alibi_g2_cpu\w* is built with ALiBi: expected \(heads,\) or "
          r"\(batch, heads\) float32 slopes, got None", biased, q, k, v)
    torch = pytest.importorskip("torch")
    check(TypeError, r"alibi_slopes: expected the same kind of array as q \(numpy\), got torch", tvmflash.attention,
          q, k, v, alibi_slopes=torch.from_numpy(slopes))


def test_kernel_softcap_must_match_its_build(qkv):
    q, k, v = qkv
    capped, plain = get_kernel(KernelSpec(64, group=2, softcap=True)), get_kernel(KernelSpec(64, group=2))
    check(ValueError, r"softcap: kernel fwd_f16_d64_softcap_g2_cpu\w* is built with a softcap: expected a cap > 0, "
          r"got 0", capped, q, k, v)
    check(ValueError, r"softcap: kernel fwd_f16_d64_g2_cpu\w* has none \(built with softcap=False\): expected 0, "
          r"got 20.0", plain, q, k, v, softcap=20.0)


def test_bad_num_splits(qkv):
    q, k, v = qkv
    check(TypeError, r"num_splits: expected an int \(0 = choose, 1 = no split\), got bool", tvmflash.attention, q, k,
          v, num_splits=True)
    check(TypeError, r"num_splits: expected an int .* got float \(2.0\)", tvmflash.attention, q, k, v, num_splits=2.0)
    check(ValueError, r"num_splits: expected 0 \(choose\) to 128, got -1", tvmflash.attention, q, k, v, num_splits=-1)
    check(ValueError, r"num_splits: expected 0 \(choose\) to 128, got 129", tvmflash.attention, q, k, v,
          num_splits=129)
    check(ValueError, r"num_splits: a split kernel has any shape, got num_splits=2 with static_shape=True",
          tvmflash.attention, q, k, v, num_splits=2, static_shape=True)
    check(ValueError, r"num_splits: the fused algorithm only, got algorithm='standard'", tvmflash.attention, q, k, v,
          num_splits=2, algorithm="standard")
    big = make_qkv(np.random.default_rng(0), 1, 4096, 8, 64, 64, 128, "float16")  # 2^25 values of q
    check(ValueError, r"num_splits: the split kernel keeps splits \* batch \* seq_q \* heads \* head_dim = "
          r"4,294,967,296 partial values, more than its int32 indexing allows", tvmflash.attention, *big,
          num_splits=128)
    check(ValueError, r"splits: expected an int >= 0 \(0: no split over the keys\), got -1", KernelSpec, 64,
          splits=-1)
    check(ValueError, r"splits: for the fused algorithm with any shape and no even build, got .*even=True", KernelSpec,
          64, splits=2, even=True)
