"""Memory traffic and FLOPs counted from the TensorIR (tvmflash/traffic.py) against closed forms.

The closed forms are FlashAttention's accounting, written here from the algorithm, not read from
the IR: the standard qk writes S once (float32), softmax reads S and writes P, pv reads P and V;
the fused kernel reads Q once, K and V once per query tile, writes O and lse once.
"""

import math

import pytest

from tvmflash import definition as D
from tvmflash.analysis import traffic
from tvmflash._compat import T
from tvmflash.spec import KernelSpec

F16, F32 = 2, 4


def shapes(batch, seq_q, seq_k, heads, group):
    return dict(batch=batch, seq_q=seq_q, seq_k=seq_k, heads=heads, heads_kv=heads // group)


def by_name(kernel):
    return {b.name: b for b in kernel.buffers}


# -- the standard algorithm: S and P through global memory ----------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, sq, sk, h, g, d",
                         [(2, 256, 256, 4, 1, 64), (1, 128, 384, 8, 4, 128), (3, 37, 113, 2, 2, 64)])
def test_standard_moves_s_and_p_through_memory(b, sq, sk, h, g, d, causal):
    spec = KernelSpec(d, causal=causal, group=g)
    qk, softmax, pv = traffic.count_module(D.standard_attention(spec), shapes(b, sq, sk, h, g),
                                           (D.STD_QK, D.STD_SOFTMAX, D.STD_PV))
    s_bytes = b * h * sq * sk * F32
    p_bytes = b * h * sq * sk * F16
    q_bytes, kv_bytes = b * sq * h * d * F16, b * sk * (h // g) * d * F16
    qk_b, sm_b, pv_b = by_name(qk), by_name(softmax), by_name(pv)
    assert (qk_b["Q"].read, qk_b["K"].read, qk_b["S"].written, qk_b["S"].read) == (q_bytes, kv_bytes, s_bytes, 0)
    assert (sm_b["S"].read, sm_b["P"].written, sm_b["LSE"].written) == (s_bytes, p_bytes, b * h * sq * F32)
    assert (pv_b["P"].read, pv_b["V"].read, pv_b["O"].written) == (p_bytes, kv_bytes, q_bytes)
    # the standard computes every score, masked or not: FLOPs of both GEMMs in full
    assert qk.flops == pv.flops == 2 * b * h * sq * sk * d
    assert softmax.flops == 0
    assert qk.units == softmax.units == pv.units == 1


# -- the fused kernel: Q once, K and V once per query tile ----------------------------------------


@pytest.mark.parametrize("bm, bn", [(64, 32), (128, 64)])
@pytest.mark.parametrize("b, n, h, g, d", [(2, 512, 4, 1, 64), (1, 1024, 8, 4, 128)])
def test_fused_reads_kv_once_per_query_tile(b, n, h, g, d, bm, bn):
    spec = KernelSpec(d, group=g)
    k = traffic.count(D.fused_attention(spec, bm, bn), shapes(b, n, n, h, g))
    buf = by_name(k)
    tiles = n // bm
    assert k.units == b * h * tiles  # one unit (thread block) per batch, head and query tile
    assert buf["Q"].read == b * n * h * d * F16
    assert buf["K"].read == buf["V"].read == tiles * b * h * n * d * F16  # per query head, per tile
    assert buf["O"].written == b * n * h * d * F16 and buf["LSE"].written == b * h * n * F32
    assert buf["O"].read == buf["Q"].written == buf["K"].written == 0
    assert k.flops == 4 * b * h * n * n * d


@pytest.mark.parametrize("bm, bn", [(64, 32), (128, 64), (64, 64)])
def test_causal_skips_tiles_above_the_diagonal(bm, bn):
    b, n, h, d = 2, 1024, 4, 64
    full = traffic.count(D.fused_attention(KernelSpec(d), bm, bn), shapes(b, n, n, h, 1))
    causal = traffic.count(D.fused_attention(KernelSpec(d, causal=True), bm, bn), shapes(b, n, n, h, 1))
    tiles = n // bm
    # query tile t visits keys 0 .. (t + 1) * bm: sum over t = bm * tiles * (tiles + 1) / 2 keys
    keys = bm * tiles * (tiles + 1) // 2
    assert by_name(causal)["K"].read == by_name(causal)["V"].read == b * h * keys * d * F16
    assert causal.flops == 4 * b * h * bm * keys * d  # each visited tile computed in full
    ratio = (tiles + 1) / (2 * tiles)
    assert by_name(causal)["K"].read / by_name(full)["K"].read == pytest.approx(ratio)
    assert causal.flops / full.flops == pytest.approx(ratio)
    assert by_name(causal)["Q"].read == by_name(full)["Q"].read  # Q, O, lse unchanged
    assert by_name(causal)["O"].written == by_name(full)["O"].written


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq, sk", [(37, 113), (113, 37), (100, 100), (501, 1023)])
def test_ragged_shapes_count_only_guarded_rows(sq, sk, causal):
    """Rows past the end are guarded (if_then_else / if): they move no bytes. Every query tile
    visits at least one K/V tile (``compiler.derive._kv_tile_count``, for the software pipeline): a
    causal tile that sees no key (seq_q > seq_k) still loads the first one, wholly masked."""
    b, h, g, d, bm, bn = 2, 4, 2, 64, 64, 32
    k = traffic.count(D.fused_attention(KernelSpec(d, causal=causal, group=g), bm, bn), shapes(b, sq, sk, h, g))
    buf = by_name(k)
    keys = 0
    for t in range(math.ceil(sq / bm)):
        last = min(sk, (t + 1) * bm + sk - sq) if causal else sk
        keys += min(sk, max(math.ceil(last / bn), 1) * bn)
    assert buf["Q"].read == b * sq * h * d * F16
    assert buf["K"].read == buf["V"].read == b * h * keys * d * F16
    assert buf["O"].written == b * sq * h * d * F16 and buf["LSE"].written == b * h * sq * F32


def test_minimum_counts_each_element_once():
    """per_unit=False: the whole kernel as one unit, i.e. every re-read served by a cache."""
    spec = KernelSpec(64, causal=True, group=2)
    s = shapes(2, 300, 500, 4, 2)
    k = traffic.count(D.fused_attention(spec, 64, 32), s, per_unit=False)
    for b in k.buffers:
        assert (b.read or b.written) == b.nbytes, b
    assert k.flops == traffic.count(D.fused_attention(spec, 64, 32), s).flops


def test_tile_size_comes_from_the_ir():
    """The same spec with twice the query tile re-reads K and V half as often."""
    s = shapes(1, 1024, 1024, 2, 1)
    small = by_name(traffic.count(D.fused_attention(KernelSpec(64), 64, 32), s))["K"].read
    large = by_name(traffic.count(D.fused_attention(KernelSpec(64), 128, 32), s))["K"].read
    assert small == 2 * large


def test_missing_shape_is_named():
    with pytest.raises(ValueError, match="shapes: expected a value for 'heads_kv'"):
        traffic.count(D.fused_attention(KernelSpec(64), 64, 32), dict(batch=1, seq_q=64, seq_k=64, heads=1))


# -- the counting rules on small functions --------------------------------------------------------


@T.prim_func(s_tir=True)
def _guarded(a: T.handle, b: T.handle, c: T.handle, bound: T.handle):
    n = T.int32()
    m = T.int32()
    T.match_buffer(bound, (m,), "int32")  # gives the guard's bound a name in the shape
    A = T.match_buffer(a, (n,), "float32")
    B = T.match_buffer(b, (n,), "float32")
    C = T.match_buffer(c, (n,), "float32")
    for i in range(n):
        with T.sblock("masked_load"):  # a predicated load: only where i < m
            vi = T.axis.remap("S", [i])
            B[vi] = T.if_then_else(vi < m, A[vi], T.float32(0))
    for i in range(n):
        with T.sblock("select"):  # Select evaluates both operands: every A[i] is read
            vi = T.axis.remap("S", [i])
            C[vi] = T.Select(vi < m, A[vi], T.float32(0))
    for i in range(n):
        with T.sblock("guarded_store"):
            vi = T.axis.remap("S", [i])
            if vi < m:
                C[vi] = T.float32(1)


def test_guard_rules():
    for n, m in ((10, 4), (10, 10), (10, 0)):
        k = traffic.count(_guarded, dict(n=n, m=m))
        buf = by_name(k)
        # A: read by the Select everywhere; the masked load adds nothing new (same unit, same elements)
        assert buf["A"].read == n * F32
        assert buf["B"].written == n * F32
        assert buf["C"].written == n * F32  # the select writes all of C; the guarded store a subset


@T.prim_func(s_tir=True)
def _masked_only(a: T.handle, b: T.handle, bound: T.handle):
    n = T.int32()
    m = T.int32()
    T.match_buffer(bound, (m,), "int32")
    A = T.match_buffer(a, (n,), "float32")
    B = T.match_buffer(b, (n,), "float32")
    for i in range(n):
        with T.sblock("masked_load"):
            vi = T.axis.remap("S", [i])
            B[vi] = T.if_then_else(vi < m, A[vi], T.float32(0))


@T.prim_func(s_tir=True)
def _store_under_if(b: T.handle, bound: T.handle):
    n = T.int32()
    m = T.int32()
    T.match_buffer(bound, (m,), "int32")
    B = T.match_buffer(b, (n,), "float32")
    for i in range(n):
        with T.sblock("guarded_store"):
            vi = T.axis.remap("S", [i])
            if vi < m:
                B[vi] = T.float32(1)


@pytest.mark.parametrize("n, m", [(10, 4), (10, 10), (10, 0), (7, 20)])
def test_predicated_accesses_count_where_the_guard_holds(n, m):
    assert by_name(traffic.count(_masked_only, dict(n=n, m=m)))["A"].read == min(n, m) * F32
    assert by_name(traffic.count(_store_under_if, dict(n=n, m=m)))["B"].written == min(n, m) * F32


@T.prim_func(s_tir=True)
def _matvec(a: T.handle, x: T.handle, y: T.handle):
    n = T.int32()
    k = T.int32()
    A = T.match_buffer(a, (n, k), "float16")
    X = T.match_buffer(x, (k,), "float16")
    Y = T.match_buffer(y, (n,), "float32")
    for i, j in T.grid(n, k):
        with T.sblock("mv"):
            vi, vj = T.axis.remap("SR", [i, j])
            with T.init():
                Y[vi] = T.float32(0)
            Y[vi] = Y[vi] + T.Cast("float32", A[vi, vj]) * T.Cast("float32", X[vj])


def test_reduction_keeps_its_accumulator_on_chip():
    k = traffic.count(_matvec, dict(n=6, k=10))
    buf = by_name(k)
    assert buf["Y"].read == 0 and buf["Y"].written == 6 * F32  # written once, never read back
    assert buf["A"].read == 60 * F16 and buf["X"].read == 10 * F16  # X: once per kernel (one unit)
    assert k.flops == 2 * 60


@T.prim_func(s_tir=True)
def _tiled(a: T.handle, b: T.handle):
    n = T.int32()
    A = T.match_buffer(a, (16,), "float32")
    B = T.match_buffer(b, (n * 4,), "float32")
    for t in range(n):
        with T.sblock("tile"):  # a tile block: the loop above it enumerates the units
            vt = T.axis.remap("S", [t])
            A_tile = T.sblock_alloc_buffer((16,), "float32")
            for j in range(16):
                with T.sblock("load"):
                    vj = T.axis.remap("S", [j])
                    A_tile[vj] = A[vj]
            for i, j in T.grid(4, 16):
                with T.sblock("use"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    with T.init():
                        B[vt * 4 + vi] = T.float32(0)
                    B[vt * 4 + vi] = B[vt * 4 + vi] + A_tile[vj] * A_tile[vj]


@T.prim_func(s_tir=True)
def _triangle(a: T.handle, c: T.handle):
    n = T.int32()
    A = T.match_buffer(a, (n,), "float32")
    C = T.match_buffer(c, (n,), "float32")
    for i in range(n):
        for j in range(i + 1):  # the inner extent depends on the outer loop
            with T.sblock("acc"):
                vi = T.axis.spatial(n, i)
                vj = T.axis.reduce(n, j)
                with T.init():
                    C[vi] = T.float32(0)
                C[vi] = C[vi] + A[vj] * A[vj]


@pytest.mark.parametrize("n", [1, 5, 12])
def test_units_and_dependent_extents(n):
    tiled = traffic.count(_tiled, dict(n=n))
    assert tiled.units == n
    assert by_name(tiled)["A"].read == n * 16 * F32  # each unit loads its own copy
    assert by_name(traffic.count(_tiled, dict(n=n), per_unit=False))["A"].read == 16 * F32
    assert tiled.flops == 2 * n * 4 * 16
    tri = traffic.count(_triangle, dict(n=n))
    assert tri.flops == 2 * n * (n + 1) // 2
    assert by_name(tri)["A"].read == n * F32 and by_name(tri)["C"].written == n * F32
