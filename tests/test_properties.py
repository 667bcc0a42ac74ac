"""Property tests (hypothesis) of the CPU path: any batch, heads, GQA ratio, lengths, mask and
scale give fused == standard == float64 reference within the dtype tolerance."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvmflash import KernelSpec, get_kernel
from tvmflash.definition import attention_reference

from helpers import assert_close_to_reference, make_qkv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    heads_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    seq_q=st.integers(1, 700),
    seq_k=st.integers(1, 700),
    causal=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.01, 1.0)),
    seed=st.integers(0, 2**31),
)
def test_fused_standard_reference_agree(batch, heads_kv, group, seq_q, seq_k, causal, scale, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, batch, seq_q, seq_k, heads_kv * group, heads_kv, 64, "float16")
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    results = {}
    for algorithm in ("fused", "standard"):
        kernel = get_kernel(KernelSpec(64, causal=causal, group=group, algorithm=algorithm))
        out, lse = kernel(q, k, v, softmax_scale=scale, return_lse=True)
        assert_close_to_reference(out, lse, ref_out, ref_lse, "float16")
        results[algorithm] = out.astype(np.float32)
    np.testing.assert_allclose(results["fused"], results["standard"], atol=4e-3)
