"""Inputs and tolerances shared by the tests."""

import numpy as np

from tvmflash.spec import numpy_dtype

# Tolerance per dtype, against the float64 reference on the same (rounded) inputs.
TOLERANCE = {
    # P and O are rounded to float16 (2^-11 relative) as in FlashAttention; |O| <~ 3 here.
    "float16": dict(max_abs=4e-3, rel_norm=1e-3),
    # bfloat16 keeps 8 mantissa bits (2^-8 relative): the same budget, 8x wider.
    "bfloat16": dict(max_abs=3e-2, rel_norm=8e-3),
}
LSE_ATOL = 1e-4  # lse is accumulated in float32 throughout


def make_qkv(rng, batch, seq_q, seq_k, heads, heads_kv, head_dim, dtype, scale=1.0):
    dt = numpy_dtype(dtype)
    q = (rng.standard_normal((batch, seq_q, heads, head_dim)) * scale).astype(dt)
    k = rng.standard_normal((batch, seq_k, heads_kv, head_dim)).astype(dt)
    v = rng.standard_normal((batch, seq_k, heads_kv, head_dim)).astype(dt)
    return q, k, v


def assert_close_to_reference(out, lse, ref_out, ref_lse, dtype):
    out = np.asarray(out, dtype=np.float64)
    assert not np.isnan(out).any(), "NaN in the output"
    tol = TOLERANCE[dtype]
    err = np.abs(out - ref_out).max() if out.size else 0.0
    assert err <= tol["max_abs"], f"max |out - ref| = {err:.3e} > {tol['max_abs']:.0e} ({dtype})"
    norm = np.linalg.norm(ref_out)
    if norm > 0:
        rel = np.linalg.norm(out - ref_out) / norm
        assert rel <= tol["rel_norm"], f"|out - ref| / |ref| = {rel:.3e} > {tol['rel_norm']:.0e} ({dtype})"
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        assert not np.isnan(lse).any(), "NaN in lse"
        assert (np.isneginf(lse) == np.isneginf(ref_lse)).all(), "lse is -inf on other rows than the reference"
        finite = np.isfinite(ref_lse)
        if finite.any():
            lerr = np.abs(lse[finite] - ref_lse[finite]).max()
            assert lerr <= LSE_ATOL, f"max |lse - ref| = {lerr:.3e} > {LSE_ATOL:.0e}"


def cuda_source(spec, config=None) -> str:
    """The device source ``build`` compiles for ``spec`` (with ``config``: that config of its rule
    under the rule's schedule and pass config), through the one compile path."""
    from tvmflash.builder import compile_lowered, lower
    from tvmflash.compiler import device_source
    from tvmflash.tuning import records

    with records.tuning_logs_off():
        lowered = lower(spec, config)
    return device_source(compile_lowered(lowered), spec)


def spec_id(spec) -> str:
    """A test id for ``spec`` that names no host: its key with the target as given ('cpu')."""
    from tvmflash.spec import target_id

    key = spec.key
    tid = target_id(spec.target)
    return key[: -len(tid)] + spec.target.replace("/", "-") if key.endswith(tid) else key


# -- scheduled fused modules on this CPU (the tuning tests) --


def run_fused(mod, spec, q, k, v):
    """Compile a scheduled fused module for this CPU (the one compile path) and run it (default
    softmax scale)."""
    from tvmflash import _compat
    from tvmflash._compat import tvm
    from tvmflash.compiler import compile_module
    from tvmflash.rules import rule_for

    ex = compile_module(mod, _compat.host_cpu_target(), rule_for(spec).pass_config(spec))
    b, sq, h, d = q.shape
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in (q, k, v)]
    args += [tvm.runtime.tensor(np.zeros_like(q)), tvm.runtime.tensor(np.zeros((b, h, sq), "float32"))]
    ex["main"](*args, d ** -0.5)
    return args[3].numpy(), args[4].numpy()


def check_numerics(mod, spec, rng, seq_q=113, seq_k=77, heads=4):
    """The module on lengths that are no tile multiples (the dynamic function), against float64."""
    from tvmflash.definition import attention_reference

    q, k, v = make_qkv(rng, 2, seq_q, seq_k, heads, heads // spec.group, spec.head_dim, spec.dtype)
    out, lse = run_fused(mod, spec, q, k, v)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=spec.causal), spec.dtype)
