"""The even build (KernelSpec.even, FlashAttention-2's Is_even_MN): lengths that are multiples of
the tile, no bound checks. The same numbers as the general kernel, a refusal for other lengths,
and ``attention`` choosing between the two on a GPU."""

import re

import numpy as np
import pytest

from tvmflash import KernelSpec, api, get_kernel, lower
from tvmflash.reference import attention_reference

from helpers import assert_close_to_reference, make_qkv


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k, group", [(64, 128, 1), (128, 64, 2), (96, 192, 4)])
def test_even_kernel_matches_general_kernel(rng, causal, seq_q, seq_k, group):
    """On tile multiples the checks the even kernel drops are all true: the same bits."""
    even = get_kernel(KernelSpec(64, causal=causal, group=group, even=True))
    bm, bn = even.tile
    assert seq_q % bm == 0 and seq_k % bn == 0, "the test's lengths must be multiples of the CPU tile"
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, 4, 4 // group, 64, "float16")
    out, lse = even(q, k, v, return_lse=True)
    general = get_kernel(KernelSpec(64, causal=causal, group=group))(q, k, v, return_lse=True)
    np.testing.assert_array_equal(out, general[0])
    np.testing.assert_array_equal(lse, general[1])
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=causal), "float16")


def test_even_kernel_refuses_other_lengths(rng):
    kernel = get_kernel(KernelSpec(64, even=True))
    bm, bn = kernel.tile
    q, k, v = make_qkv(rng, 1, bm + 1, bn, 2, 2, 64, "float16")
    with pytest.raises(ValueError, match=rf"seq_q, seq_k: kernel {kernel.key} is even .* got seq_q {bm + 1} "):
        kernel(q, k, v)
    assert not kernel.accepts(bm, bn + 16) and kernel.accepts(2 * bm, 3 * bn)


def test_spec_even_key_and_conflicts():
    spec = KernelSpec(128, even=True)
    assert spec.key.startswith("fwd_f16_d128_g1_even_cpu")
    assert KernelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="even: for the fused algorithm with any shape"):
        KernelSpec(128, even=True, shape=(1, 128, 128, 2))
    with pytest.raises(ValueError, match="even: for the fused algorithm"):
        KernelSpec(128, even=True, algorithm="standard")
    with pytest.raises(TypeError, match="even: expected a bool"):
        KernelSpec(128, even=1)


def _cuda_source(spec: KernelSpec) -> str:
    from tvmflash.build import compile_lowered, _device_source

    return _device_source(compile_lowered(lower(spec)), spec)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_even_kernel_has_no_bound_checks(head_dim):
    """The general kernel compares rows and keys with seq_q / seq_k; the even one never does
    (the causal diagonal is its only mask). Neither divides to find its block: the grid is 3-D."""
    general = _cuda_source(KernelSpec(head_dim, target="nvidia/nvidia-a100"))
    even = _cuda_source(KernelSpec(head_dim, target="nvidia/nvidia-a100", even=True))
    assert re.search(r"< seq_k\)", general) and re.search(r"< seq_q\)", general)
    assert not re.search(r"< seq_[kq]\)", even), "bound check left in the even kernel"
    for cu in (general, even):
        assert "blockIdx.y" in cu and "blockIdx.z" in cu
        assert not re.search(r"\(\(int\)blockIdx\.\w\) [%/]", cu), "integer division of a block index"


class _FakeKernel:
    def __init__(self, spec, tile=(128, 64)):
        self.spec, self.tile = spec, tile

    def accepts(self, seq_q, seq_k):
        return not self.spec.even or (seq_q % self.tile[0] == 0 and seq_k % self.tile[1] == 0)


@pytest.mark.parametrize("seq_q, seq_k, built, chosen", [
    (4096, 4096, ["even"], "even"),  # tile multiples: the even kernel
    (4096, 4048, ["even", "general"], "general"),  # 16-multiples the tile does not divide: built, refused
    (4008, 4096, ["general"], "general"),  # not even a multiple of 16: the even kernel is never built
    (0, 4096, ["general"], "general"),
])
def test_attention_dispatch(monkeypatch, seq_q, seq_k, built, chosen):
    asked = []

    def fake_get_kernel(spec):
        asked.append("even" if spec.even else "general")
        return _FakeKernel(spec)

    monkeypatch.setattr(api, "get_kernel", fake_get_kernel)
    spec = KernelSpec(128, target="nvidia/nvidia-h100")
    kernel = api._kernel_for(spec, seq_q, seq_k)
    assert asked == built and kernel.spec.even == (chosen == "even")
    asked.clear()
    assert not api._kernel_for(KernelSpec(128), 4096, 4096).spec.even, "CPU kernels stay general"
    assert not api._kernel_for(spec.replace(shape=(1, 4096, 4096, 2)), 4096, 4096).spec.even
