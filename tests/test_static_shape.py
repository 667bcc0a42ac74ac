"""Static-shape kernels (KernelSpec.shape / attention(static_shape=True)): same numbers as the
dynamic kernel, a key per shape, a clear error for any other shape."""

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, get_kernel
from tvmflash.cli import main

from helpers import make_qkv


def test_static_shape_matches_dynamic_kernel(rng):
    q, k, v = make_qkv(rng, 2, 77, 130, 4, 2, 64, "float16")  # odd lengths: the last tiles are partial
    dyn = tvmflash.attention(q, k, v, causal=True)
    static = tvmflash.attention(q, k, v, causal=True, static_shape=True)
    np.testing.assert_array_equal(static, dyn)


def test_key_names_the_shape():
    spec = KernelSpec(64, causal=True, group=2, shape=(2, 77, 130, 4))
    assert "_b2q77k130h4_" in spec.key
    assert KernelSpec.from_dict(spec.to_dict()) == spec


def test_other_shapes_are_refused(rng):
    kern = get_kernel(KernelSpec(64, shape=(1, 64, 64, 2)))
    q, k, v = make_qkv(rng, 1, 65, 64, 2, 2, 64, "float16")
    with pytest.raises(ValueError, match=r"q, k: kernel .* compiled for q \[1, 64, 2, 64\]"):
        kern(q, k, v)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shape=(1, 64, 64)), "shape: expected"),
    (dict(shape=(1, 64, 64, 0)), "shape: expected"),
    (dict(shape=(1, 64, 64, 3), group=2), "not a multiple of the GQA group"),
    (dict(shape=(1, 64, 64, 2), algorithm="standard"), "static shapes are for the fused"),
])
def test_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelSpec(64, **kwargs)


def test_cli_build_with_shape(tmp_path, capsys):
    assert main(["build", "--target", "cpu", "--head-dim", "64", "--shape", "1,100,100,2", "-o", str(tmp_path)]) == 0
    assert list(tmp_path.glob("fwd_f16_d64_g1_b1q100k100h2_*.so"))
    assert main(["build", "--target", "cpu", "--head-dim", "64", "--shape", "1,100", "-o", str(tmp_path)]) == 2
    assert "--shape: expected" in capsys.readouterr().err
