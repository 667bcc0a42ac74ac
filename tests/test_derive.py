"""FlashAttention and FlashDecoding derived from Algorithm 0 (``compiler.derive``), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close_to_reference, make_qkv, run_fused, spec_id
from tvmflash import definition as D
from tvmflash._compat import tirx, tvm
from tvmflash.compiler import derive
from tvmflash.definition.plain import plain_attention, softcap
from tvmflash.rules import rule_for
from tvmflash.spec import KernelSpec

SPECS = [
    KernelSpec(64, causal=True, target="nvidia/nvidia-a100"),
    KernelSpec(128, target="nvidia/nvidia-a100", even=True),
    KernelSpec(64, "bfloat16", causal=True, group=4, target="nvidia/nvidia-a100", even=True),
    KernelSpec(128, group=8, target="cpu"),
    KernelSpec(96, causal=True, target="cpu"),
]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("tile", [(128, 64), (64, 32), (16, 128)])
def test_the_derivation_is_the_fused_kernels_definition(spec, tile):
    """Algorithm 0 through the rolling update is the fused function the rules schedule, node for
    node and name for name: so the shipped kernels' CUDA is unchanged (test_shipped_kernels)."""
    derived = derive.derived_attention(spec, *tile)
    tvm.ir.assert_structural_equal(derived, D.fused_attention(spec, *tile), map_free_vars=True)
    assert derived.script() == D.fused_attention(spec, *tile).script()
    rule = rule_for(spec)
    tvm.ir.assert_structural_equal(rule.definition(spec, tile), derived, map_free_vars=True)


def _buffers(func) -> list:
    import tvm_ffi

    out = []

    tvm_ffi.structural_walk(func.body, [(tvm.s_tir.SBlock, lambda b: out.extend(b.alloc_buffers))])
    return out


def test_the_derived_function_keeps_s_and_p_in_tiles():
    spec = KernelSpec(64, causal=True)
    plain = plain_attention(spec)
    names = lambda f: [str(x) for b in _buffers(f) for x in b.ty.shape]  # noqa: E731
    assert "seq_k" in names(plain)  # S and P of Algorithm 0 span the keys
    derived = derive.derived_attention(spec, 64, 32)
    assert "seq_k" not in names(derived) and "seq_q" not in names(derived)
    tile_blocks = [b for b in derive._leaf_blocks(derived) if b.name_hint == D.TILE]
    assert len(tile_blocks) == 1  # one kernel: one program per query tile


def _softcap_reference(q, k, v, cap, causal):
    qf, kf, vf = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kf, vf = np.repeat(kf, group, axis=2), np.repeat(vf, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", qf, kf) * q.shape[-1] ** -0.5
    s = cap * np.tanh(s / cap)
    if causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vf)
    return out, (m[..., 0] + np.log(p.sum(-1)))


@pytest.mark.parametrize("causal", [False, True])
def test_a_softcap_in_the_plain_definition_alone_gives_a_correct_kernel(rng, causal):
    """The variant is written in Algorithm 0 only; the derivation and the CPU rule are unchanged.
    Logits are scaled up so that the cap bends them (else softcap ~ identity)."""
    spec = KernelSpec(64, causal=causal, group=2)
    rule = rule_for(spec)
    config = rule.default_config(spec)
    func = derive.rolling_update(plain_attention(spec, softcap(5.0)), *rule.tile(config))
    q, k, v = make_qkv(rng, 2, 77, 101, 4, 2, 64, spec.dtype, scale=4.0)
    out, lse = run_fused(rule.apply(func, config).mod, spec, q, k, v)
    ref_out, ref_lse = _softcap_reference(q, k, v, 5.0, causal)
    assert_close_to_reference(out, lse, ref_out, ref_lse, spec.dtype)
    plain_out, _ = run_fused(rule.apply(rule.definition(spec, rule.tile(config)), config).mod, spec, q, k, v)
    assert np.abs(plain_out.astype(np.float64) - ref_out).max() > 0.05  # the cap matters here


def _run(func, q, k, v, scale, *extra):
    ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    b, sq, h, _ = q.shape
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in (q, k, v)]
    args += [tvm.runtime.tensor(np.zeros_like(q)), tvm.runtime.tensor(np.zeros((b, h, sq), "float32"))]
    ex["main"](*args, np.float32(scale), *extra)
    return args[3].numpy(), args[4].numpy()


@pytest.mark.parametrize("seq_q,seq_k,causal,group,parts", [
    (1, 1000, False, 4, 4),  # decode, GQA
    (1, 5, False, 1, 8),  # more chunks than key tiles: empty chunks
    (3, 77, True, 2, 3),  # a few new tokens, causal
    (16, 300, True, 1, 5),
])
def test_split_k_update_gives_flash_decoding(rng, seq_q, seq_k, causal, group, parts):
    spec = KernelSpec(64, causal=causal, group=group)
    func = derive.split_k_update(plain_attention(spec), 16, 32, parts)
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, 4, 4 // group, 64, spec.dtype)
    out, lse = _run(func, q, k, v, 64 ** -0.5)
    assert_close_to_reference(out, lse, *D.attention_reference(q, k, v, causal=causal), spec.dtype)


@pytest.mark.parametrize("seq_q,seq_k,causal,heads,group,block_m", [
    (1, 1000, False, 8, 4, 16),  # decode: one K/V head's 4 query heads in a tile's rows
    (5, 300, True, 6, 3, 16),  # a group that leaves a tile's last row idle (5 rows of 3 heads)
    (7, 77, True, 8, 8, 16),  # two query rows a tile of 8 heads, the causal bound per row
    (2, 200, False, 4, 4, 2),  # a group larger than the tile: not packed
])
def test_split_k_update_packs_a_gqa_group_into_a_tile(rng, seq_q, seq_k, causal, heads, group, block_m):
    """``pack_gqa``: one program per K/V head and key chunk, its group's query heads in the
    tile's rows, so each K/V tile is read once per group; the numerics are Algorithm 0's."""
    spec = KernelSpec(64, causal=causal, group=group)
    func = derive.split_k_update(plain_attention(spec), block_m, 32, 3, pack_gqa=True)
    tile = next(b for b in derive._leaf_blocks(func) if b.name_hint == D.TILE)
    packed = group <= block_m
    assert str(tile.iter_vars[1].dom.extent) == ("heads_kv" if packed else "heads")
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, heads, heads // group, 64, spec.dtype)
    out, lse = _run(func, q, k, v, 64 ** -0.5)
    assert_close_to_reference(out, lse, *D.attention_reference(q, k, v, causal=causal), spec.dtype)


def test_split_k_update_carries_a_softcap(rng):
    spec = KernelSpec(64, causal=True)
    func = derive.split_k_update(plain_attention(spec, softcap(5.0)), 8, 32, 4)
    q, k, v = make_qkv(rng, 1, 2, 333, 2, 2, 64, spec.dtype, scale=4.0)
    out, lse = _run(func, q, k, v, 64 ** -0.5)
    assert_close_to_reference(out, lse, *_softcap_reference(q, k, v, 5.0, True), spec.dtype)


# -- refusals: chains the repair cannot prove ---------------------------------------------------


def _edit(func, block: str, value=None, init=None):
    """``func`` with ``block``'s store value (a function of the old store) or init value replaced."""
    import tvm_ffi

    def on_block(b):
        if b.name_hint != block:
            return b
        body = b.body if value is None else tirx.BufferStore(b.body.buffer, value(b.body), b.body.indices)
        ini = b.init if init is None else tirx.BufferStore(b.init.buffer, init, b.init.indices)
        return tvm.s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, body, ini, b.alloc_buffers,
                                b.match_buffers, b.annotations)

    return tvm_ffi.structural_map(func, [(tvm.s_tir.SBlock, on_block)])


def _loads(e, name):
    import tvm_ffi

    out = []
    tvm_ffi.structural_walk(e, [(tvm.ir.TensorLoad, lambda x: out.append(x) if x.source.name == name else None)])
    return out[0]


def _m(st):
    return _loads(st.value, "m")


def _row_sum_of(plain):
    return next(b.body.buffer for b in derive._leaf_blocks(plain) if b.name_hint == "row_sum")


#: case -> (the edit of Algorithm 0, given the function; what the refusal says)
BROKEN = {
    "max from 0": (lambda f: dict(block="row_max", init=tirx.const(0.0, "float32")), "row_max.*start from -inf"),
    "sum from 1": (lambda f: dict(block="row_sum", init=tirx.const(1.0, "float32")), "row_sum.*sum from 0"),
    "sum of P squared": (lambda f: dict(block="row_sum", value=lambda st: st.value.a + st.value.b * st.value.b),
                         "row_sum.*not linear in P"),
    "sum of P plus one": (lambda f: dict(block="row_sum", value=lambda st: st.value.a + (st.value.b + tirx.const(1.0, "float32"))),
                          "row_sum.*not linear in P"),
    "exp of s - 2m": (lambda f: dict(block="P", value=lambda st: tirx.exp2(st.value.args[0] - _m(st))),
                      "'P'.*outside exp2"),
    "m outside the exponential": (lambda f: dict(block="P", value=lambda st: st.value + _m(st)), "'P'.*outside exp2"),
    # P normalised before P V: the product reads the row sum, which is not final inside the loop
    "normalised before P V": (lambda f: dict(block="PV", value=lambda st: st.value.a + st.value.b / _row_sum_of(f)[
        tuple(st.indices[:3])]), "'PV'.*another key reduction"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_chains_the_repair_cannot_prove_are_refused(case):
    plain = plain_attention(KernelSpec(64))
    edit, message = BROKEN[case]
    broken = _edit(plain, **edit(plain))
    with pytest.raises(derive.NotRepairable, match=message):
        derive.rolling_update(broken, 64, 32)
    with pytest.raises(derive.NotRepairable, match=message):
        derive.split_k_update(broken, 64, 32, 2)


def test_split_k_update_checks_its_parts():
    with pytest.raises(ValueError, match="parts: expected an int >= 1, got 0"):
        derive.split_k_update(plain_attention(KernelSpec(64)), 64, 32, 0)


def test_a_runtime_softcap_is_a_parameter_of_the_derived_functions():
    """``KernelSpec(softcap=True)``: Algorithm 0 takes the cap as a scalar after sm_scale, and both
    derived forms carry it (their templates declare every scalar; one Algorithm 0 lacks goes)."""
    spec = KernelSpec(64, causal=True, softcap=True)
    names = lambda f: [p.name for p in f.params][-2:]  # noqa: E731
    assert names(plain_attention(spec)) == ["sm_scale", "softcap"]
    assert names(derive.derived_attention(spec, 32, 32)) == ["sm_scale", "softcap"]
    assert names(derive.split_k_update(plain_attention(spec), 32, 32, 2)) == ["sm_scale", "softcap"]
    assert "softcap" not in [p.name for p in derive.derived_attention(spec.replace(softcap=False), 32, 32).params]
    assert "tanh" in derive.derived_attention(spec, 32, 32).script()
    with pytest.raises(ValueError, match=r"score_mod: a spec with softcap=True takes the runtime cap"):
        plain_attention(spec, softcap(5.0))


# -- a sliding window and ALiBi, written in Algorithm 0 only ------------------------------------


def _tile_count(func, **values) -> int:
    """How many key tiles the derived ``func``'s K/V loop visits with its variables at ``values``
    (the query tile ``vqb``, the lengths, the window)."""
    import tvm_ffi

    loops = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda f: loops.append(f) if f.loop_var.name == D.KV_LOOP_VAR
                                         else None)])
    (loop,) = loops
    names = {}

    def seen(v):
        names.setdefault(v.name, v)

    tvm_ffi.structural_walk(loop.extent, [(tirx.Var, seen)])
    from tvm.sym.analyzer import Analyzer

    binding = {names[n]: tirx.const(x, "int32") for n, x in values.items() if n in names}
    return int(Analyzer().simplify(derive._subst(loop.extent, binding, {})))


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_skips_the_key_tiles_outside_it(causal):
    """The derivation reads the window's bounds off Algorithm 0's mask: a query tile visits the
    key tiles from its first row's left edge to its last row's right edge, not all of them."""
    spec = KernelSpec(64, causal=causal, window=True)
    func = derive.derived_attention(spec, 64, 64)
    full = _tile_count(derive.derived_attention(KernelSpec(64, causal=causal), 64, 64), vqb=40, seq_q=4096,
                       seq_k=4096)
    windowed = _tile_count(func, vqb=40, seq_q=4096, seq_k=4096, window_left=256, window_right=0 if causal else 128)
    assert full == (41 if causal else 64)
    assert windowed == (5 if causal else 7)  # keys 2304 .. 2623 (causal) / 2751 (+128): 64-key tiles 36 .. 40 / 42
    # an unbounded edge (the runtime passes seq_k) visits what the plain kernel visits
    assert _tile_count(func, vqb=40, seq_q=4096, seq_k=4096, window_left=4096, window_right=4096) == full
    assert _tile_count(func, vqb=0, seq_q=100, seq_k=100, window_left=0, window_right=0) == 1


@pytest.mark.parametrize("seq_q, seq_k, causal, window", [
    (77, 300, False, (40, 9)), (300, 77, True, (20, 0)), (100, 100, False, (0, 0)), (65, 500, True, (130, 0)),
])
def test_a_window_in_the_plain_definition_gives_correct_kernels(rng, seq_q, seq_k, causal, window):
    """The window written in Algorithm 0 only: the rolling update and the split-K update both
    carry it, and both are right (rows that see no key included)."""
    spec = KernelSpec(64, causal=causal, window=True)
    q, k, v = make_qkv(rng, 2, seq_q, seq_k, 2, 2, 64, spec.dtype)
    ref = D.attention_reference(q, k, v, causal=causal, window_size=window)
    edges = window[:1] if causal else window
    for func in (derive.derived_attention(spec, 32, 32), derive.split_k_update(plain_attention(spec), 16, 32, 3)):
        out, lse = _run(func, q, k, v, 64 ** -0.5, *edges)
        assert_close_to_reference(out, lse, *ref, spec.dtype)


def test_window_and_alibi_are_parameters_of_the_derived_functions():
    """``KernelSpec(window=True)`` adds the window's edges as int32 scalars (the left one only
    with causal); ``alibi=True`` adds the slopes as a buffer after lse; without them the
    signature is the plain kernel's."""
    names = lambda f: [p.name for p in f.params]  # noqa: E731
    base = ["Q", "K", "V", "O", "LSE"]
    assert names(derive.derived_attention(KernelSpec(64, window=True), 32, 32)) == base + [
        "sm_scale", "window_left", "window_right"]
    assert names(derive.derived_attention(KernelSpec(64, causal=True, window=True), 32, 32)) == base + [
        "sm_scale", "window_left"]
    spec = KernelSpec(64, causal=True, alibi=True, softcap=True)
    for func in (plain_attention(spec), derive.derived_attention(spec, 32, 32),
                 derive.split_k_update(plain_attention(spec), 32, 32, 2)):
        assert names(func) == base + ["alibi_slopes", "sm_scale", "softcap"]
    assert names(derive.derived_attention(KernelSpec(64), 32, 32)) == base + ["sm_scale"]


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_in_the_plain_definition_gives_correct_kernels(rng, causal):
    """ALiBi's bias written in Algorithm 0's score only; the derived forms carry the slopes."""
    spec = KernelSpec(64, causal=causal, group=2, alibi=True)
    q, k, v = make_qkv(rng, 2, 70, 130, 4, 2, 64, spec.dtype)
    slopes = (rng.random((2, 4)) * 0.3).astype(np.float32)
    ref = D.attention_reference(q, k, v, causal=causal, alibi_slopes=slopes)
    for func in (derive.derived_attention(spec, 32, 32), derive.split_k_update(plain_attention(spec), 16, 32, 3)):
        ex = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
        args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in (q, k, v)]
        args += [tvm.runtime.tensor(np.zeros_like(q)), tvm.runtime.tensor(np.zeros((2, 4, 70), "float32")),
                 tvm.runtime.tensor(slopes)]
        ex["main"](*args, np.float32(64 ** -0.5))
        assert_close_to_reference(args[3].numpy(), args[4].numpy(), *ref, spec.dtype)
    unbiased = D.attention_reference(q, k, v, causal=causal)[0]
    assert np.abs(args[3].numpy().astype(np.float64) - unbiased).max() > 0.05
