"""The even build (KernelSpec.even, FlashAttention-2's Is_even_MN): lengths that are multiples of
the tile, no bound checks. The same numbers as the general kernel, a refusal for other lengths,
and ``attention`` choosing between the two on a GPU."""

import re

import numpy as np
import pytest

from tvmflash import KernelSpec, get_kernel, lower
from tvmflash.builder import plan
from tvmflash.definition import attention_reference
from tvmflash.runtime import api
from tvmflash.runtime.kernel import Kernel
from tvmflash.tuning import records

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
    with pytest.raises(ValueError, match=rf"seq_q, seq_k: kernel {kernel.key} is even .* multiple of block_m={bm} .* "
                                         rf"got seq_q {bm + 1} "):
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
    from tvmflash.builder import compile_lowered
    from tvmflash.compiler import device_source

    return device_source(compile_lowered(lower(spec)), spec)


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


def _stub_kernel(spec, tile):
    """A Kernel whose manifest says it was built with ``tile`` (nothing to call)."""
    manifest = {"spec": spec.to_dict(), "functions": ["main"],
                "schedule": {"config": {"block_m": tile[0], "block_n": tile[1]}}}
    return Kernel({"main": None}, manifest)


@pytest.mark.parametrize("seq_q, seq_k, chosen", [
    (4096, 4096, "even"),  # tile multiples: the even kernel, nothing else built
    (4096, 4048, "general"),  # the planned tile does not divide: the even one is never built
    (0, 4096, "general"),
])
def test_attention_dispatch(monkeypatch, without_hopper, seq_q, seq_k, chosen):
    """``attention`` picks the build by the plan's tile (the hand config's 128x64 here) before
    anything is built, and asks the cache for that one kernel only (the mma.sync rule's: the
    Hopper rule has no even build)."""
    got = []

    def fake_get_kernel(spec):
        got.append("even" if spec.even else "general")
        return _stub_kernel(spec, (128, 64))

    monkeypatch.setattr(api, "get_kernel", fake_get_kernel)
    spec = KernelSpec(128, target="nvidia/nvidia-h100")
    with records.tuning_logs_off():
        kernel = api.kernel_for(spec, seq_q, seq_k)
        assert got == [chosen] and kernel.spec.even == (chosen == "even")
        assert not api.kernel_for(KernelSpec(128), 4096, 4096).spec.even, "CPU kernels stay general"
        assert not api.kernel_for(spec.replace(shape=(1, 4096, 4096, 2)), 4096, 4096).spec.even


def test_planned_tile_reads_the_log_without_building(monkeypatch):
    """The even build replays the general build's record: its tile comes from that log's
    tuning.json (the committed H100 log of head dim 64 chose 128x128), else the hand config."""
    import json

    spec = KernelSpec(64, target="nvidia/nvidia-h100", even=True)
    meta = json.loads((records.variant_dir(records.logs_root(), spec.replace(even=False)) / records.METADATA)
                      .read_text())
    best = meta["tiles"][0]["config"]
    assert plan(spec).tile == (best["block_m"], best["block_n"]) and plan(spec).source == "tuned record"
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", "off")
    assert plan(spec).tile == (128, 64) and plan(spec).source == "hand config"
