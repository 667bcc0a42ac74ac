"""FlashAttention and FlashDecoding derived from plain attention: rolling update and split-K update.

The input is Algorithm 0 (``definition.plain``): S = Q K^T, a score, a row max m, an exponential
P, a row sum l, P in the input dtype, the product acc = P V, and an epilogue that reads m, l and
acc. Every reduction there runs over the whole key axis, and each later one needs the earlier one
finished: P needs the final m, so S is materialised row by row. The transformations break that
dependency and repair the result algebraically (Neptune, PLDI 2026):

- **rolling update** (``rolling_update``): the key axis is tiled and traversed once. Each tile
  updates the running max, and a partial computed against the old max m_old is repaired to the
  new one by ``alpha = p(m_old, m_new)``, P's own formula evaluated at the old max: that is
  ``exp2((m_old - m_new) * c)``, FlashAttention's online softmax. The sum's running value
  becomes ``l * alpha + l_tile`` and the product accumulator's init becomes ``acc * alpha``.
- **split-K update** (``split_k_update``): the key axis is cut into ``parts`` chunks that each run
  the rolling update to a partial (m_c, l_c, acc_c); a combine repairs the partials to the
  global max, ``l = sum_c l_c * p(m_c, m)`` and likewise acc, then runs Algorithm 0's epilogue:
  FlashDecoding.

The repair is valid only under algebraic conditions, which ``analyze`` checks on the blocks'
expressions instead of assuming attention (``NotRepairable`` names the block and the failed
condition):

1. the max block is a reduction with combiner ``max`` and identity -inf, its operand the score
   (masked or not) and nothing else of the chain;
2. every use of m before the epilogue is inside P's exponential ``exp2((x - g(m)) * c)`` (or
   ``exp``), with x and c free of m and g(m) m or its guard ``finite(m)``; then
   ``P(m_new) == P(m_old) * p(m_old, m_new)`` (g is the identity on finite maxima, and while m is
   -inf every sum still holds its identity 0);
3. every later key reduction is a sum from 0 whose term is homogeneous of degree 1 in P (a
   product of P, or its cast, with factors free of P and m), so one multiply repairs it; and no
   such term reads another key reduction's result (it is not final inside the loop).

Everything the kernel computes comes from Algorithm 0's blocks: the score (a softcap, a bias),
the mask, the exponential and its constant, the terms of the sums and the epilogue are
Algorithm 0's expressions re-indexed into the tiles. What the transformations add is the loop
structure and the repair. The derived function's block structure is the schedule rules' API
(``definition.fused``'s block names): a tile block per query tile holding the tile buffers, the
K/V loop (``KV_LOOP_VAR``), each GEMM and row reduction in a scope block of its own.

TVM has no way to add a schedule primitive from Python with trace support, so these run on the
definition before a schedule's trace starts: ``derived_attention`` is what the rules schedule and
MetaSchedule's workloads hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm_ffi
from tvm.sym.analyzer import Analyzer as _Analyzer

from .._compat import T, fast_tvmscript, tirx, tvm
from ..definition.fused import (
    ALPHA, EPILOGUE, INIT_L, INIT_M, INIT_O, K_LOAD, L_UPDATE, LSE_STORE, O_GEMM, O_GEMM_TILE,
    O_STAGE, O_STORE, P_CAST, P_EXP, Q_LOAD, ROW_MAX, ROW_MAX_TILE, ROW_SUM, ROW_SUM_TILE, RUNNING_MAX,
    S_GEMM, S_GEMM_TILE, S_STORE, STATE_UPDATE, TILE, V_LOAD,
)
from ..definition.mask import NEG_INF, guarded
from ..definition.plain import ScoreMod, plain_attention, without_buffer, without_param
from ..spec import KernelSpec

__all__ = [
    "NotRepairable", "Chain", "analyze", "rolling_update", "split_k_update", "derived_attention",
    "derivation_steps", "SPLIT_COMBINE", "SPLIT_PARTIAL",
]

Load = tvm.ir.TensorLoad
SBlock = tvm.s_tir.SBlock
_SPATIAL, _REDUCE = 0, 2

#: Block names of the split-K form (beside the tile block's, which it shares).
SPLIT_PARTIAL = "partial_store"
SPLIT_COMBINE = "combine"
#: the split form's other block names (GPU schedules look them up)
PARTIAL_ACC = "acc_partial"
PARTIAL_STATE = "state_partial"
COMBINE_MAX = "combine_max"
COMBINE_SUM = "combine_sum"
COMBINE_ACC = "combine_acc"
COMBINE_LSE = "combine_lse"

#: Shape variables of the definitions, by name (the derived function declares its own); a paged
#: cache's keys are ``max_pages * page_size``, its K and V (num_pages, page_size, ...), the page
#: size a constant (``KernelSpec.paged``).
_SHAPE_VARS = ("batch", "seq_q", "seq_k", "heads", "heads_kv", "num_pages", "max_pages", "total_q", "total_k",
               "batch_p1")
#: The scalar parameters a derived function can carry, in its signature's order after the buffers:
#: the softmax scale, the cap of a runtime softcap (``definition.plain.SOFTCAP``) and a sliding
#: window's edges (``KernelSpec.window``), and packed sequences' longest lengths
#: (``KernelSpec.varlen``: the query and key extents).
SCALARS = ("sm_scale", "softcap", "window_left", "window_right", "max_seqlen_q", "max_seqlen_k")
#: The input buffers a derived function can carry besides q, k, v (after lse in its signature):
#: ALiBi's slopes [batch, heads] (``KernelSpec.alibi``), read by the score, and the keys each
#: sequence uses [batch] (``KernelSpec.seqused_k``), read by the mask, and a paged cache's block
#: table [batch, max_pages] (``KernelSpec.paged``), read by the K and V loads, and packed
#: sequences' prefix sums [batch + 1] (``KernelSpec.varlen``), read by every load, the mask and
#: the stores.
BUFFERS = ("alibi_slopes", "seqused_k", "block_table", "cu_seqlens_q", "cu_seqlens_k")
#: Roles of a block's iterators, read from their domains: batch, head, query row, key, head dim.
_ROLE_OF_EXTENT = {"batch": "b", "heads": "h", "seq_q": "i", "seq_k": "j", "max_seqlen_q": "i", "max_seqlen_k": "j"}


class NotRepairable(ValueError):
    """The chain is not one the transformation can repair; the message names the block and the
    condition that failed."""


# -- IR helpers ------------------------------------------------------------------------------


def _loads(e) -> list:
    out = []
    tvm_ffi.structural_walk(e, [(Load, out.append)])
    return out


def _reads(e, buf) -> bool:
    return any(ld.source.same_as(buf) for ld in _loads(e))


def _uses(e, var) -> bool:
    found = []
    tvm_ffi.structural_walk(e, [(tirx.Var, lambda v: found.append(v) if v.same_as(var) else None)])
    return bool(found)


def _subst(e, vmap: dict, loads: dict):
    """``e`` with variables (uses only) replaced by ``vmap`` and loads of the buffers in ``loads``
    replaced by the expressions there."""
    def on_load(ld):
        for buf, rep in loads.items():
            if ld.source.same_as(buf):
                return rep
        return ld

    def on_var(v, kind):
        if kind != tvm_ffi.DefRegionKind.NONE:
            return v
        for old, new in vmap.items():
            if v.same_as(old):
                return new
        return v

    return tvm_ffi.structural_map(e, [(Load, on_load)], with_def_region_kind=[(tirx.Var, on_var)])


def _is_const(e, value) -> bool:
    return isinstance(e, (tirx.FloatImm, tirx.IntImm)) and float(e.value) == value


def _leaf_blocks(func) -> list:
    blocks = []
    tvm_ffi.structural_walk(func.body, [(SBlock, blocks.append)], order="pre")
    return [b for b in blocks if b.name_hint != "root"]


# -- analysis --------------------------------------------------------------------------------


@dataclass
class Step:
    """One block of Algorithm 0: its single store (under ``guard`` where one guards it) and its
    iterators by role."""

    block: object
    store: object
    roles: dict  # "b" / "h" / "i" / "j" / "d" -> the block's iter var
    reduce: tuple  # roles of its reduction iterators
    guard: object = None  # the condition the store runs under (a varlen row inside its sequence)

    @property
    def name(self) -> str:
        return self.block.name_hint

    @property
    def out(self):
        return self.store.buffer

    def term(self):
        """A sum's term: the store is ``out[...] + term``."""
        v = self.store.value
        if isinstance(v, tirx.Add) and isinstance(v.a, Load) and v.a.source.same_as(self.out):
            return v.b
        raise NotRepairable(f"block {self.name!r}: expected a sum 'out + term', got {v}")


def _step(block) -> Step:
    body, guard = block.body, None
    if isinstance(body, tirx.IfThenElse) and body.else_case is None:
        body, guard = body.then_case, body.condition
    if not isinstance(body, tirx.BufferStore):
        raise NotRepairable(f"block {block.name_hint!r}: expected one store, got {type(block.body).__name__}")
    roles, reduce = {}, []
    for iv in block.iter_vars:
        ext = iv.dom.extent
        if isinstance(ext, tirx.Var):
            role = _ROLE_OF_EXTENT.get(ext.name)
        elif isinstance(ext, tirx.Mul) and getattr(ext.a, "name", None) == "max_pages":
            role = "j"  # a paged cache's keys, max_pages * page_size
        elif isinstance(ext, tirx.Sub) and getattr(ext.a, "name", None) == "batch_p1" and _is_const(ext.b, 1):
            role = "b"  # packed sequences: the prefix sums hold batch + 1
        else:
            role = "d"
        if role is None or role in roles:
            raise NotRepairable(f"block {block.name_hint!r}: iterator {iv.var.name} over {ext} has no role "
                                "(batch, heads, seq_q, seq_k or the head dim)")
        roles[role] = iv.var
        if int(iv.iter_type) == _REDUCE:
            reduce.append(role)
        elif int(iv.iter_type) != _SPATIAL:
            raise NotRepairable(f"block {block.name_hint!r}: iterator {iv.var.name} is neither spatial nor a reduction")
    return Step(block, body, roles, tuple(reduce), guard)


@dataclass
class Chain:
    """Algorithm 0's blocks by what they do, with the checks of the module docstring passed."""

    shape: dict  # shape variable name -> Var
    params: dict  # parameter name -> buffer Var (q_h ... as Q, K, V, O, LSE) or the scale
    gemm: Step  # S = Q K^T
    score: Step | None  # elementwise on S before the max
    max: Step
    exp: Step
    sum: Step  # l
    cast: Step | None  # P in the input dtype
    pv: Step  # acc = P V
    out: Step  # O = f(acc, l)
    lse: Step  # lse = f(m, l)
    x: object  # the (masked) score the max reduces and P's exponential reads, in the max's iterators
    q_load: object
    k_load: object
    v_load: object

    @property
    def m(self):
        return self.max.out

    def at(self, step: Step, e, roles: dict, loads: dict, shape: dict, scalars: dict):
        """Expression ``e`` of block ``step`` re-indexed: its iterators by role to ``roles``, the
        shape variables and the scalar parameters (``SCALARS``) to the derived function's, loads
        to ``loads``."""
        vmap = {step.roles[r]: v for r, v in roles.items() if r in step.roles}
        vmap.update({self.shape[n]: shape[n] for n in self.shape})
        vmap.update({self.params[n]: scalars[n] for n in SCALARS + BUFFERS if n in self.params})
        return _subst(e, vmap, loads)


def _expect(cond, step: Step, what: str):
    if not cond:
        raise NotRepairable(f"block {step.name!r}: {what}")


def _exp_form(e, m_buf):
    """(op, x, g_is_finite, c) of ``exp2((x - g(m)) * c)`` / ``exp(x - g(m))``, else None."""
    if not (isinstance(e, tvm.ir.Call) and getattr(e.op, "name", "") in ("tirx.exp2", "tirx.exp") and len(e.args) == 1):
        return None
    arg, c = e.args[0], None
    if isinstance(arg, tirx.Mul):
        arg, c = arg.a, arg.b
        if _reads(c, m_buf):
            return None
    if not isinstance(arg, tirx.Sub):
        return None
    x, g = arg.a, arg.b
    if _reads(x, m_buf):
        return None
    if isinstance(g, Load) and g.source.same_as(m_buf):
        return e.op.name, x, False, c
    # finite(m): Select(m == -inf, 0, m)
    if (isinstance(g, tirx.Select) and isinstance(g.true_value, (tirx.FloatImm,)) and g.true_value.value == 0
            and isinstance(g.false_value, Load) and g.false_value.source.same_as(m_buf)
            and isinstance(g.condition, tirx.EQ) and isinstance(g.condition.a, Load)
            and g.condition.a.source.same_as(m_buf) and _is_const(g.condition.b, NEG_INF)):
        return e.op.name, x, True, c
    return None


def _degree(e, p_bufs, m_buf):
    """1 if ``e`` is homogeneous of degree 1 in the loads of ``p_bufs`` (free of m), 0 if it
    reads none of them, None otherwise."""
    if _reads(e, m_buf):
        return None
    if not any(_reads(e, b) for b in p_bufs):
        return 0
    if isinstance(e, Load):
        return 1 if any(e.source.same_as(b) for b in p_bufs) else None
    if isinstance(e, tirx.Cast):
        return _degree(e.value, p_bufs, m_buf)
    if isinstance(e, tirx.Mul):
        da, db = _degree(e.a, p_bufs, m_buf), _degree(e.b, p_bufs, m_buf)
        return None if da is None or db is None or da + db != 1 else 1
    if isinstance(e, tirx.Div):
        da, db = _degree(e.a, p_bufs, m_buf), _degree(e.b, p_bufs, m_buf)
        return 1 if da == 1 and db == 0 else None
    return None


def analyze(func) -> Chain:
    """Read Algorithm 0's blocks by their dataflow and check the repair's algebra (module doc)."""
    blocks = [_step(b) for b in _leaf_blocks(func)]
    params = {p.name: p for p in func.params}
    for name in ("Q", "K", "V", "O", "LSE", "sm_scale"):
        if name not in params:
            raise NotRepairable(f"the function has no parameter {name!r} (expected q, k, v, o, lse, sm_scale)")
    extra = [n for n in params if n not in ("Q", "K", "V", "O", "LSE") and n not in SCALARS + BUFFERS]
    if extra:
        raise NotRepairable(f"the function has parameters {extra} the derived forms do not carry (they take "
                            f"q, k, v, o, lse, the buffers {list(BUFFERS)} and the scalars {list(SCALARS)})")
    inputs = [params[n] for n in BUFFERS if n in params]
    Q, K, V, O, LSE = (params[n] for n in ("Q", "K", "V", "O", "LSE"))
    shape = {}
    for buf in (Q, K, V, O, LSE, *inputs):
        for ext in buf.ty.shape:
            if isinstance(ext, tirx.Var):
                shape[ext.name] = ext
    writer = {}
    for st in blocks:
        if any(st.out.same_as(w) for w in writer):
            raise NotRepairable(f"block {st.name!r}: writes {st.out.name}, which another block writes")
        writer[st.out] = st

    def one(pred, what):
        hits = [st for st in blocks if pred(st)]
        if len(hits) != 1:
            raise NotRepairable(f"expected one block that {what}, found {[s.name for s in hits] or 'none'}")
        return hits[0]

    gemm = one(lambda st: st.reduce == ("d",) and _reads(st.store.value, Q) and _reads(st.store.value, K),
               "reduces Q K^T over the head dim")
    max_st = one(lambda st: st.reduce == ("j",) and isinstance(st.store.value, tirx.Max), "takes a max over the keys")
    # 1. the max: combiner max, identity -inf, one operand free of the max itself
    v = max_st.store.value
    _expect(isinstance(v.a, Load) and v.a.source.same_as(max_st.out), max_st, "the max must read its own output first")
    _expect(not _reads(v.b, max_st.out), max_st, "the max's operand reads the max itself")
    init = max_st.block.init
    _expect(isinstance(init, tirx.BufferStore) and _is_const(init.value, NEG_INF), max_st,
            "a max reduction must start from -inf (the max's identity)")
    m = max_st.out
    score_x = v.b
    # the score between S and the max: at most one elementwise block
    srcs = [ld.source for ld in _loads(score_x)]
    score = None
    if not any(s.same_as(gemm.out) for s in srcs):
        cands = [writer[s] for s in writer if any(s.same_as(x) for x in srcs)]
        _expect(len(cands) == 1 and not cands[0].reduce and _reads(cands[0].store.value, gemm.out)
                and all(ld.source.same_as(gemm.out) or any(ld.source.same_as(b) for b in inputs)
                        for ld in _loads(cands[0].store.value)), max_st,
                f"the max's operand must be S or one elementwise block of S (reading only S and the inputs "
                f"{list(BUFFERS)})")
        score = cands[0]
    # 2. every use of m before the epilogue: inside P's exponential
    m_readers = [st for st in blocks if st is not max_st and _reads(st.store.value, m)]
    key_readers = [st for st in m_readers if "j" in st.roles]
    _expect(len(key_readers) == 1, max_st, f"its result must feed one exponential block, feeds "
            f"{[s.name for s in key_readers]}")
    exp_st = key_readers[0]
    _expect(not exp_st.reduce, exp_st, "the exponential of the scores must be an elementwise block")
    form = _exp_form(exp_st.store.value, m)
    _expect(form is not None, exp_st, "uses the max outside exp2((x - m) * c): the rescale "
            "exp2((m_old - m_new) * c) cannot repair it")
    _, x, _, _ = form
    same_roles = {exp_st.roles[r]: max_st.roles[r] for r in exp_st.roles if r in max_st.roles}
    _expect(tvm_ffi.structural_equal(_subst(x, same_roles, {}), score_x), exp_st,
            "the exponential's score differs from the one the max reduced")
    # 3. later key reductions: sums from 0, linear in P, reading no other key reduction
    p_bufs = [exp_st.out]
    cast = None
    for st in blocks:
        if not st.reduce and "j" in st.roles and st is not exp_st and _reads(st.store.value, exp_st.out):
            _expect(isinstance(st.store.value, tirx.Cast) and isinstance(st.store.value.value, Load), st,
                    "an elementwise block of P other than its cast cannot be carried by the rescale")
            cast = st
            p_bufs.append(st.out)
    sums = [st for st in blocks if st.reduce == ("j",) and st is not max_st]
    for st in sums:
        init = st.block.init
        _expect(isinstance(init, tirx.BufferStore) and _is_const(init.value, 0.0), st,
                "a key reduction after the max must be a sum from 0 (repairable by one multiply)")
        term = st.term()
        others = [o.out for o in sums if o is not st]
        _expect(not any(_reads(term, b) for b in others), st,
                "its term reads another key reduction's result, which is not final inside the loop")
        _expect(_degree(term, p_bufs, m) == 1, st,
                "its term is not linear in P (a sum of P times factors free of P and the max); "
                "the rescale exp2((m_old - m_new) * c) cannot repair it")
    row_sum = [st for st in sums if "d" not in st.roles]
    pv = [st for st in sums if "d" in st.roles]
    if len(row_sum) != 1 or len(pv) != 1:
        raise NotRepairable(f"expected one row sum and one product with V after the max, found sums "
                            f"{[s.name for s in sums]}")
    row_sum, pv = row_sum[0], pv[0]
    _expect(_reads(pv.term(), V), pv, "the product's term must read V")
    epi = [st for st in blocks if "j" not in st.roles and st is not max_st and st not in sums and st is not gemm]
    out = [st for st in epi if st.out.same_as(O)]
    lse = [st for st in epi if st.out.same_as(LSE)]
    if len(out) != 1 or len(lse) != 1 or len(epi) != 2:
        raise NotRepairable(f"expected the epilogue to be one block writing O and one writing LSE, found "
                            f"{[s.name for s in epi]}")
    for st in epi:
        for ld in _loads(st.store.value):
            ok = any(ld.source.same_as(b) for b in (m, row_sum.out, pv.out, params["sm_scale"]))
            _expect(ok, st, f"the epilogue reads {ld.source.name}; it may read only the max, the sums and the scale")
    for st in blocks:
        if st.guard is None:
            continue
        # a store left out for rows that do not exist (a packed sequence's rows past its own)
        _expect(st in epi, st, "only the epilogue's stores may run under a condition")
        _expect(all(any(ld.source.same_as(b) for b in inputs) for ld in _loads(st.guard))
                and not _uses(st.guard, st.roles.get("d")), st,
                f"its store's condition may read only the row, the batch and the inputs {list(BUFFERS)}")
    order = [b.name for b in blocks]
    expected = [s.name for s in (gemm, score, max_st, exp_st, row_sum, cast, pv) if s is not None]
    _expect([n for n in order if n in expected] == expected, max_st,
            f"the chain's blocks are out of order: {order}")

    def the_load(st, buf):
        lds = [ld for ld in _loads(st.store.value) if ld.source.same_as(buf)]
        _expect(len(lds) == 1, st, f"expected one load of {buf.name}")
        return lds[0]

    chain = Chain(shape, params, gemm, score, max_st, exp_st, row_sum, cast, pv, out[0], lse[0], score_x,
                  the_load(gemm, Q), the_load(gemm, K), the_load(pv, V))
    _check_layout(chain)
    return chain


# -- the derived functions -------------------------------------------------------------------


def _mask_terms(ch: Chain, x) -> list:
    """The terms of the mask ``Select(t1 and t2 ..., s, -inf)`` of the max's operand ``x``."""
    if not (isinstance(x, tirx.Select) and _is_const(x.false_value, NEG_INF)):
        return []
    terms, stack = [], [x.condition]
    while stack:
        c = stack.pop()
        if isinstance(c, tirx.And):
            stack += [c.a, c.b]
        else:
            terms.append(c)
    return terms


def _mask_edge(ch: Chain, x, cls, row, b):
    """R(``row``) of the first mask term of ``x`` that reads ``j <= R(i)`` (``cls`` LE) or
    ``j >= R(i)`` (GE) with R increasing by 1 per row, else None (the mask does not bound the
    keys so). ``b``: the batch where R reads one (a sequence's own key count)."""
    vi, vj, vb = ch.max.roles.get("i"), ch.max.roles.get("j"), ch.max.roles.get("b")
    for t in _mask_terms(ch, x):
        if isinstance(t, cls) and isinstance(t.a, tirx.Var) and t.a.same_as(vj) and not _uses(t.b, vj):
            step = _Analyzer().simplify(_subst(t.b, {vi: vi + 1}, {}) - t.b)
            if _is_const(step, 1):
                return _subst(t.b, {vi: row, vb: b}, {})
    return None


def _kv_tile_bound(ch: Chain, x, row_end, b):
    """The exclusive bound of the keys a query tile can see, or None when the mask does not
    bound them: a term ``j <= R(i)`` of the mask (causal, a window's right edge) means the tile's
    last row sees keys below R(``row_end``), ``row_end`` one past that row ((qb + 1) * BM); a
    term ``j < U`` free of the row (the keys a sequence uses) bounds every row's keys by U."""
    vi, vj, vb = ch.max.roles.get("i"), ch.max.roles.get("j"), ch.max.roles.get("b")
    bound = _mask_edge(ch, x, tirx.LE, row_end, b)
    for t in _mask_terms(ch, x):
        if (isinstance(t, tirx.LT) and isinstance(t.a, tirx.Var) and t.a.same_as(vj) and not _uses(t.b, vj)
                and not _uses(t.b, vi)):
            u = _subst(t.b, {vb: b}, {})
            bound = u if bound is None else tirx.min(u, bound)
    return bound


def _kv_tile_first(ch: Chain, x, row_first, b):
    """The first key a query tile can see, or None when the mask does not bound it below: a term
    ``j >= L(i)`` (a sliding window's left edge) means the tile's first row (``row_first``,
    qb * BM) sees no key below L(row_first)."""
    return _mask_edge(ch, x, tirx.GE, row_first, b)


def _row_bound(ch: Chain):
    """U where the epilogue stores only rows ``i < U`` (U free of the row: a packed sequence's
    rows), in the O block's iterators, else None."""
    g, vi = ch.out.guard, ch.out.roles.get("i")
    if isinstance(g, tirx.LT) and isinstance(g.a, tirx.Var) and g.a.same_as(vi) and not _uses(g.b, vi):
        return g.b
    return None


def _kv_tile_count(last_key, BN: int, first=None):
    """Tiles up to ``last_key`` (from tile ``first``, where given), at least one: a tile with no
    visible key (causal, seq_q > seq_k; or seq_k == 0) is wholly masked and leaves the
    identities, as no tile would. The bound lets TVM's software pipeliner prove its prologue and
    epilogue run (else it guards them by conditions, and ThreadSync refuses the __syncthreads
    inside: "Cannot insert syncs inside condition")."""
    if first is None:
        return tirx.max(tirx.ceildiv(last_key, BN), 1)
    return tirx.max(tirx.ceildiv(last_key, BN) - first, 1)


def _tile_mask(x, inside, even: bool):
    """The score ``x`` with the keys past the end (tiling's padding) masked: the padding term
    first, then the definition's own terms."""
    if even:
        return x
    neg_inf = tirx.const(NEG_INF, "float32")
    if isinstance(x, tirx.Select) and _is_const(x.false_value, NEG_INF):
        return tirx.Select(tirx.And(inside, x.condition), x.true_value, neg_inf)
    return tirx.Select(inside, x, neg_inf)


class _Exprs:
    """Algorithm 0's expressions as the derived function needs them, each re-indexed into the
    tiles (``row``/``col``: the global query row and key of a tile element)."""

    def __init__(self, ch: Chain, even: bool, BM: int, pack: int = 1):
        self.ch, self.even, self.BM, self.pack = ch, even, BM, pack
        self.shape = self.scalars = self.tile_b = None
        self.lets = {}  # input buffer name -> the variables the tile binds its loads at b, b + 1 to

    # A tile's rows. Unpacked (``pack`` 1): the grid's head ``vh`` and query rows ``qb * BM + i``.
    # Packed (GQA, FlashAttention's "pack GQA"): the grid's head is a K/V head and the tile's rows
    # run over the ``pack`` query heads of its group, query row by query row: tile row i is query
    # row qb * P + i // pack of query head vh * pack + i % pack, P = BM // pack query rows a tile
    # (the rows past P * pack idle), so the group's heads share each K/V tile.
    @property
    def per_tile(self) -> int:
        """Query rows a tile holds (of each head)."""
        return self.BM // self.pack

    def at(self, vh, vqb, vi):
        """(query head, query row) of row ``vi`` of tile ``vqb``."""
        return self.head(vh, vqb, vi), self.row(vqb, vi)

    def head(self, vh, vqb, vi):
        """The query head of row ``vi`` of tile ``vqb``."""
        return vh if self.pack == 1 else vh * self.pack + tirx.floormod(vi, self.pack)

    def row(self, vqb, vi):
        """The query row of row ``vi`` of tile ``vqb``."""
        return vqb * self.BM + vi if self.pack == 1 else vqb * self.per_tile + tirx.floordiv(vi, self.pack)

    def valid(self, vqb, vi, seq_q):
        """Whether row ``vi`` of tile ``vqb`` is a query row."""
        if self.pack == 1:
            return vqb * self.BM + vi < seq_q
        inside = self.row(vqb, vi) < seq_q
        return inside if self.per_tile * self.pack == self.BM else tirx.And(vi < self.per_tile * self.pack, inside)

    def tiles(self, seq_q):
        """Query tiles of ``seq_q`` rows."""
        return tirx.ceildiv(seq_q, self.per_tile)

    def kv_src(self, vh):
        """A query head whose K/V head the loads of grid head ``vh`` read."""
        return vh if self.pack == 1 else vh * self.pack

    def row_end(self, qb):
        """One past the query row of tile ``qb``'s last row."""
        return (qb + 1) * self.per_tile

    def row_first(self, qb):
        """The query row of tile ``qb``'s first row."""
        return qb * self.per_tile

    def bind(self, shape: dict, pages: dict, *scalars_and_buffers):
        """The derived function's shape variables (``pages``: a paged cache's), scalars and input
        buffers, in ``SCALARS`` then ``BUFFERS`` order (called as its body is parsed)."""
        self.shape, self.scalars = {**shape, **pages}, dict(zip(SCALARS + BUFFERS, scalars_and_buffers))

    def use(self, vb, **lets):
        """Read the loads of input buffers at the tile's batch ``vb`` (and at ``vb + 1``) from
        variables the tile binds, from here on: ``seqused_k=(kv_used,)`` (the sequence's key
        count), ``cu_seqlens_q=(q_start, q_end)``, ``cu_seqlens_k=(k_start, k_end)`` (a packed
        sequence's offsets). One load each a tile, and bounds TVM's analyzer can prove (it proves
        the pipeline's guards on variables, not on loads). Returns vb."""
        self.tile_b = vb
        self.lets.update(lets)
        return vb

    def local(self, e):
        """``e`` with the loads the tile binds to variables (``use``) read from them."""
        if not self.lets:
            return e
        bufs = {name: self.scalars[name] for name in self.lets}

        def on_load(ld):
            for name, buf in bufs.items():
                if ld.source.same_as(buf) and len(ld.indices) == 1:
                    delta = _Analyzer().simplify(ld.indices[0] - self.tile_b)
                    if isinstance(delta, tirx.IntImm) and 0 <= delta.value < len(self.lets[name]):
                        return self.lets[name][delta.value]
            return ld

        return tvm_ffi.structural_map(e, [(Load, on_load)])

    def store_at(self, st, b, h, row, d=None):
        """The indices of epilogue block ``st``'s store (O's or lse's) at (b, h, row, d)."""
        roles = {"b": b, "h": h, "i": row} if d is None else {"b": b, "h": h, "i": row, "d": d}
        return tuple(self._at(st, ix, roles, {}) for ix in st.store.indices)

    def row_ok(self, st, b, row):
        """Whether epilogue block ``st`` stores ``row`` of batch ``b`` (its guard: a packed
        sequence's rows)."""
        return self._at(st, st.guard, {"b": b, "i": row}, {})

    def keys(self, seq_k):
        """The keys a tile loads: all of k, or the sequence's (``use``): past them nothing is read,
        so a paged cache's table needs entries for the sequence's own pages only. (Packed
        sequences load up to the longest sequence's keys, clamped inside k, the mask leaving out
        the next sequence's: bounding the loads by the sequence's keys cost registers, 436 B of
        spills at sm_90 against 324.)"""
        used = self.lets.get("seqused_k")
        return seq_k if used is None else tirx.min(seq_k, used[0])

    def _at(self, st, e, roles, loads):
        return self.local(self.ch.at(st, e, roles, loads, self.shape, self.scalars))

    def load(self, which, buf, b, h, pos, d):
        ch = self.ch
        ld, st = {"q": (ch.q_load, ch.gemm), "k": (ch.k_load, ch.gemm), "v": (ch.v_load, ch.pv)}[which]
        roles = {"b": b, "h": h, "d": d, ("i" if which == "q" else "j"): pos}
        return self._at(st, buf[tuple(ld.indices)], roles, {})

    def kv_head(self, b, h):
        """The K/V head index of query head ``h`` (GQA), from the definition's K load."""
        return self._at(self.ch.gemm, self.ch.k_load.indices[-2], {"b": b, "h": h}, {})

    def s_term(self, b, h, q_elem, k_elem):
        ch = self.ch
        return self._at(ch.gemm, ch.gemm.term(), {"b": b, "h": h}, {ch.q_load.source: q_elem, ch.k_load.source: k_elem})

    def score(self, b, h, row, col, s_elem):
        ch = self.ch
        if ch.score is None:
            return s_elem
        return self._at(ch.score, ch.score.store.value, {"b": b, "h": h, "i": row, "j": col}, {ch.gemm.out: s_elem})

    def max_operand(self, b, h, row, col, s_elem):
        """The score the max reduces (and P exponentiates), with tiling's key-padding mask."""
        ch = self.ch
        src = ch.score.out if ch.score is not None else ch.gemm.out
        x = self._at(ch.max, ch.x, {"b": b, "h": h, "i": row, "j": col}, {src: s_elem})
        return _tile_mask(x, col < self.shape["seq_k"], self.even)

    def _exp_at(self, x_new, m_new):
        """P's exponential with its score replaced by ``x_new`` and its max load by ``m_new``."""
        call = self.ch.exp.store.value
        arg, c = call.args[0], None
        if isinstance(arg, tirx.Mul):
            arg, c = arg.a, arg.b
        inner = x_new - _subst(arg.b, {}, {self.ch.m: m_new})
        if c is not None:
            inner = inner * c
        return tirx.exp2(inner) if call.op.name == "tirx.exp2" else tirx.exp(inner)

    def p(self, b, h, row, col, s_elem, m_elem):
        """P's formula on the tile's score against the running max."""
        return self._at(self.ch.exp, self._exp_at(self.max_operand(b, h, row, col, s_elem), m_elem),
                        {"b": b, "h": h, "i": row, "j": col}, {})

    def alpha(self, b, h, row, m_old, m_new):
        """The repair: P's formula at the score m_old against the max m_new."""
        return self._at(self.ch.exp, self._exp_at(m_old, m_new), {"b": b, "h": h, "i": row}, {})

    def l_term(self, b, h, row, col, p_elem):
        ch = self.ch
        return self._at(ch.sum, ch.sum.term(), {"b": b, "h": h, "i": row, "j": col}, {ch.exp.out: p_elem})

    def p_cast(self, p_elem):
        ch = self.ch
        return _subst(ch.cast.store.value, {}, {ch.exp.out: p_elem})

    def o_term(self, b, h, row, p_elem, v_elem):
        ch = self.ch
        pb = ch.cast.out if ch.cast is not None else ch.exp.out
        return self._at(ch.pv, ch.pv.term(), {"b": b, "h": h, "i": row}, {pb: p_elem, ch.v_load.source: v_elem})

    def o(self, b, h, row, acc_elem, l_elem):
        ch = self.ch
        return self._at(ch.out, ch.out.store.value, {"b": b, "h": h, "i": row},
                        {ch.pv.out: acc_elem, ch.sum.out: l_elem})

    def lse(self, b, h, row, m_elem, l_elem):
        ch = self.ch
        return self._at(ch.lse, ch.lse.store.value, {"b": b, "h": h, "i": row}, {ch.m: m_elem, ch.sum.out: l_elem})

    def init(self, st):
        return st.block.init.value


def _check_layout(ch: Chain):
    """The kernels' layout (the API): q, o [b, row, h, d]; k, v [b, key, kv head, d]."""
    def is_var(e, st, role):
        return isinstance(e, tirx.Var) and e.same_as(st.roles.get(role))

    q, k, v = ch.q_load.indices, ch.k_load.indices, ch.v_load.indices
    g, p = ch.gemm, ch.pv
    if "cu_seqlens_q" in ch.params:  # packed sequences: Q[row(b, i), h, d], K[key(b, j), kv_head(h), d]
        cq, ck = ch.params["cu_seqlens_q"], ch.params["cu_seqlens_k"]
        _expect(len(q) == 3 and _reads(q[0], cq) and _uses(q[0], g.roles["i"]) and is_var(q[1], g, "h")
                and is_var(q[2], g, "d"), g, "packed Q must be read as Q[row(cu_seqlens_q[b], i), h, d]")
        for st, ix in ((g, k), (p, v)):
            _expect(len(ix) == 3 and _reads(ix[0], ck) and _uses(ix[0], st.roles["j"]) and is_var(ix[2], st, "d")
                    and not _uses(ix[1], st.roles["i"]), st,
                    "packed K, V must be read as K[key(cu_seqlens_k[b], j), kv_head(h), d]")
        for st in (ch.out, ch.lse):
            _expect(st.guard is not None, st, "a packed sequence's rows past its own are the next one's: its "
                    "store must run under a condition on the row")
        return
    _expect(is_var(q[0], g, "b") and is_var(q[1], g, "i") and is_var(q[2], g, "h") and is_var(q[3], g, "d"), g,
            "Q must be read as Q[b, i, h, d]")
    if "block_table" in ch.params:  # a paged cache: K[table[b, j // page_size], j % page_size, kv_head(h), d]
        for st, ix in ((g, k), (p, v)):
            _expect(_reads(ix[0], ch.params["block_table"])
                    and isinstance(ix[1], (tirx.FloorMod, tirx.Mod)) and is_var(ix[1].a, st, "j") and is_var(ix[3], st, "d")
                    and not _uses(ix[2], st.roles["i"]), st,
                    "a paged K, V must be read as K[block_table[b, j // page_size], j % page_size, kv_head(h), d]")
        return
    _expect(is_var(k[0], g, "b") and is_var(k[1], g, "j") and is_var(k[3], g, "d") and not _uses(k[2], g.roles["i"]),
            g, "K must be read as K[b, j, kv_head(h), d]")
    _expect(is_var(v[0], p, "b") and is_var(v[1], p, "j") and is_var(v[3], p, "d"), p, "V must be read as V[b, j, kv_head(h), d]")


def rolling_update(func, block_m: int, block_n: int, *, even: bool = False) -> tirx.PrimFunc:
    """Algorithm 0 ``func`` as FlashAttention: one program per ``block_m`` query rows, one pass
    over the keys in tiles of ``block_n`` carrying the running max, sum and accumulator, repaired
    each tile (module docstring). ``even``: the caller promises lengths that are multiples of the
    tiles (FlashAttention-2's ``Is_even_MN``): no bound checks, no key-padding mask.

    Raises ``NotRepairable`` (naming the block) for a chain whose repair the checks cannot prove."""
    ch = analyze(func)
    return _carried(ch, _rolling(ch, int(block_m), int(block_n), bool(even)))


def _carried(ch: Chain, func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The derived ``func`` with the scalar and buffer parameters Algorithm 0 has: the templates
    declare every one of ``SCALARS`` and ``BUFFERS``, and those it lacks (a softcap) go."""
    for name in SCALARS:
        if name not in ch.params:
            func = without_param(func, name)
    for name in BUFFERS:
        if name not in ch.params:
            func = without_buffer(func, name)
    return func


def _shared(ch: Chain, BM: int, BN: int, even: bool, pack: int = 1):
    """What both derived forms share: dtypes, the expressions, the visible key tiles and the two
    macros (the tile's start, one key tile's step). ``pack``: the query heads a tile's rows run
    over (``_Exprs.head``)."""
    dtype = str(ch.params["Q"].ty.dtype)
    D = int(ch.params["Q"].ty.shape[-1])
    acc_dtype = str(ch.pv.out.ty.dtype)
    m_init, l_init, o_init = ch.max.block.init.value, ch.sum.block.init.value, ch.pv.block.init.value
    p_dtype = str(ch.cast.out.ty.dtype) if ch.cast is not None else str(ch.exp.out.ty.dtype)
    # rfactor needs the max reducer's identity as TVM knows it (min_value, not -inf) for the tile's max
    tile_max_init = tirx.min_value(str(ch.m.ty.dtype))
    ex = _Exprs(ch, even, BM, pack)
    # the macros below see the names of the function they expand in: they reach these through ex
    ex.m_init, ex.l_init, ex.o_init, ex.tile_max_init = m_init, l_init, o_init, tile_max_init

    def here(e):
        """An expression of Algorithm 0's shape and scalars in the derived function's (the
        sequence's key count read from its variable, once the tile binds one: ``_Exprs.use``)."""
        vmap = {ch.shape[n]: ex.shape[n] for n in ch.shape}
        vmap.update({ch.params[n]: ex.scalars[n] for n in SCALARS + BUFFERS if n in ch.params})
        if e is None:
            return None
        return ex.local(_subst(e, vmap, {}))

    def first_tile(b, qb, seq_k):
        """The first key tile query tile ``qb`` of batch ``b`` can see (None: the first of all,
        0), kept inside the keys so that even kernels, which have no bound checks, never read past
        them."""
        first = here(_kv_tile_first(ch, ch.x, ex.row_first(qb), b))
        if first is None:
            return None
        return tirx.max(tirx.min(tirx.floordiv(first, BN), tirx.ceildiv(seq_k, BN) - 1), 0)

    def kv_tiles(b, qb, seq_q, seq_k):
        """How many key tiles query tile ``qb`` of batch ``b`` visits, from ``first_tile``. With
        per-sequence key counts (``KernelSpec.seqused_k``) the count reads the tile's variable
        for the sequence's, not its load: the pipeline's guards are proved on the count, and
        TVM's analyzer proves them on a variable, not on a load."""
        bound = here(_kv_tile_bound(ch, ch.x, ex.row_end(qb), b))
        last_key = seq_k if bound is None else tirx.min(seq_k, bound)
        rows = _row_bound(ch)
        if rows is not None:  # a tile past its sequence's rows stores nothing: no key tile to visit
            last_key = tirx.Select(ex.row_first(qb) < ex._at(ch.out, rows, {"b": b}, {}), last_key, 0)
        first = first_tile(b, qb, seq_k)
        return _kv_tile_count(last_key, BN, first)

    def kv_first(b, qb, seq_k, kb):
        """The first key of the ``kb``-th tile query tile ``qb`` of batch ``b`` visits."""
        first = first_tile(b, qb, seq_k)
        return kb * BN if first is None else (first + kb) * BN

    # The steps both forms share, as TVMScript macros expanded at the call site (whose tile
    # buffers and iterators they use).
    @T.macro(hygienic=False)
    def start_tile():
        for i, d in T.grid(BM, D):
            with T.sblock(Q_LOAD):
                vi, vd = T.axis.remap("SS", [i, d])
                hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                Q_tile[vi, vd] = guarded(even, ex.valid(vqb, vi, seq_q), ex.load("q", Q, vb, hq, iq, vd), dtype)
        # the running state starts at the reductions' identities
        for i in range(BM):
            with T.sblock(INIT_M):
                vi = T.axis.remap("S", [i])
                m_i[vi] = ex.m_init
        for i in range(BM):
            with T.sblock(INIT_L):
                vi = T.axis.remap("S", [i])
                l_i[vi] = ex.l_init
        for i, d in T.grid(BM, D):
            with T.sblock(INIT_O):
                vi, vd = T.axis.remap("SS", [i, d])
                acc_o[vi, vd] = ex.o_init

    @T.macro(hygienic=False)
    def kv_step(first):
        kv_load: T.let[T.int32] = first
        for j, d in T.grid(BN, D):
            with T.sblock(K_LOAD):
                vj, vd = T.axis.remap("SS", [j, d])
                hk = T.meta_var(ex.kv_src(vh))
                K_tile[vj, vd] = guarded(even, kv_load + vj < ex.keys(seq_k), ex.load("k", K, vb, hk, kv_load + vj, vd),
                                         dtype)
        for j, d in T.grid(BN, D):
            with T.sblock(V_LOAD):
                vj, vd = T.axis.remap("SS", [j, d])
                hk = T.meta_var(ex.kv_src(vh))
                V_tile[vj, vd] = guarded(even, kv_load + vj < ex.keys(seq_k), ex.load("v", V, vb, hk, kv_load + vj, vd),
                                         dtype)
        kv0: T.let[T.int32] = first
        with T.sblock(S_GEMM_TILE):
            for i, j, d in T.grid(BM, BN, D):
                with T.sblock(S_GEMM):
                    vi, vj, vd = T.axis.remap("SSR", [i, j, d])
                    with T.init():
                        acc_s[vi, vj] = ex.init(ex.ch.gemm)
                    hq = T.meta_var(ex.head(vh, vqb, vi))
                    acc_s[vi, vj] = acc_s[vi, vj] + ex.s_term(vb, hq, Q_tile[vi, vd], K_tile[vj, vd])
        for i, j in T.grid(BM, BN):
            with T.sblock(S_STORE):
                vi, vj = T.axis.remap("SS", [i, j])
                hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                S_tile[vi, vj] = ex.score(vb, hq, iq, kv0 + vj, acc_s[vi, vj])
        with T.sblock(ROW_MAX_TILE):
            for i, j in T.grid(BM, BN):
                with T.sblock(ROW_MAX):
                    vi, vj = T.axis.remap("SR", [i, j])
                    with T.init():
                        m_tile[vi] = ex.tile_max_init
                    hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                    m_tile[vi] = T.max(m_tile[vi], ex.max_operand(vb, hq, iq, kv0 + vj, S_tile[vi, vj]))
        for i in range(BM):
            with T.sblock(RUNNING_MAX):
                vi = T.axis.remap("S", [i])
                m_new[vi] = T.max(m_i[vi], m_tile[vi])
        for i in range(BM):
            with T.sblock(ALPHA):
                vi = T.axis.remap("S", [i])
                hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                alpha[vi] = ex.alpha(vb, hq, iq, m_i[vi], m_new[vi])
        for i, j in T.grid(BM, BN):
            with T.sblock(P_EXP):
                vi, vj = T.axis.remap("SS", [i, j])
                hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                P_f32[vi, vj] = ex.p(vb, hq, iq, kv0 + vj, S_tile[vi, vj], m_new[vi])
        with T.sblock(ROW_SUM_TILE):
            for i, j in T.grid(BM, BN):
                with T.sblock(ROW_SUM):
                    vi, vj = T.axis.remap("SR", [i, j])
                    with T.init():
                        l_tile[vi] = ex.l_init
                    hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                    l_tile[vi] = l_tile[vi] + ex.l_term(vb, hq, iq, kv0 + vj, P_f32[vi, vj])
        for i in range(BM):
            with T.sblock(L_UPDATE):
                vi = T.axis.remap("S", [i])
                l_new[vi] = l_i[vi] * alpha[vi] + l_tile[vi]
        for i, j in T.grid(BM, BN):
            with T.sblock(P_CAST):
                vi, vj = T.axis.remap("SS", [i, j])
                P_tile[vi, vj] = ex.p_cast(P_f32[vi, vj])
        with T.sblock(O_GEMM_TILE):
            for i, d, j in T.grid(BM, D, BN):
                with T.sblock(O_GEMM):
                    vi, vd, vj = T.axis.remap("SSR", [i, d, j])
                    with T.init():
                        acc_o[vi, vd] = acc_o[vi, vd] * alpha[vi]
                    hq, iq = T.meta_var(ex.at(vh, vqb, vi))
                    acc_o[vi, vd] = acc_o[vi, vd] + ex.o_term(vb, hq, iq, P_tile[vi, vj], V_tile[vj, vd])
        for i in range(BM):
            with T.sblock(STATE_UPDATE):
                vi = T.axis.remap("S", [i])
                m_i[vi] = m_new[vi]
                l_i[vi] = l_new[vi]

    ex.kv_first = kv_first
    ex.used = "seqused_k" in ch.params
    ex.paged = "block_table" in ch.params
    ex.page_size = int(ch.params["K"].ty.shape[1]) if ex.paged else 0
    ex.varlen = "cu_seqlens_q" in ch.params
    return dtype, D, acc_dtype, p_dtype, ex, kv_tiles, start_tile, kv_step


@fast_tvmscript()
def _rolling(ch: Chain, BM: int, BN: int, even: bool) -> tirx.PrimFunc:
    dtype, D, acc_dtype, p_dtype, ex, kv_tiles, start_tile, kv_step = _shared(ch, BM, BN, even)

    @T.prim_func(s_tir=True)
    def main(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle, alibi_h: T.handle,
        seqused_h: T.handle, table_h: T.handle, cu_q_h: T.handle, cu_k_h: T.handle, sm_scale: T.float32,
        softcap: T.float32, window_left: T.int32, window_right: T.int32, max_seqlen_q: T.int32, max_seqlen_k: T.int32,
    ):
        T.func_attr({"tirx.noalias": True})
        if ex.varlen:  # (the definition's: sequence b at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q)
            heads = T.int32()
            heads_kv = T.int32()
            total_q = T.int32()
            total_k = T.int32()
            batch_p1 = T.int32()
            cu_seqlens_q = T.match_buffer(cu_q_h, (batch_p1,), "int32")
            cu_seqlens_k = T.match_buffer(cu_k_h, (batch_p1,), "int32")
            batch = T.meta_var(batch_p1 - 1)
            seq_q = T.meta_var(max_seqlen_q)
            seq_k = T.meta_var(max_seqlen_k)
            Q = T.match_buffer(q_h, (total_q, heads, D), dtype)
            O = T.match_buffer(o_h, (total_q, heads, D), dtype)
            K = T.match_buffer(k_h, (total_k, heads_kv, D), dtype)
            V = T.match_buffer(v_h, (total_k, heads_kv, D), dtype)
            LSE = T.match_buffer(lse_h, (heads, total_q), "float32")
            max_pages = T.int32()
            block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
            pages = T.meta_var({"total_q": total_q, "total_k": total_k, "batch_p1": batch_p1})
        else:
            batch = T.int32()
            seq_q = T.int32()
            heads = T.int32()
            heads_kv = T.int32()
            batch_p1 = T.int32()
            cu_seqlens_q = T.match_buffer(cu_q_h, (batch_p1,), "int32")
            cu_seqlens_k = T.match_buffer(cu_k_h, (batch_p1,), "int32")
            if ex.paged:  # (the definition's: key j in page block_table[b, j // page_size])
                num_pages = T.int32()
                max_pages = T.int32()
                K = T.match_buffer(k_h, (num_pages, ex.page_size, heads_kv, D), dtype)
                V = T.match_buffer(v_h, (num_pages, ex.page_size, heads_kv, D), dtype)
                block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
                seq_k = T.meta_var(max_pages * ex.page_size)
                pages = T.meta_var({"num_pages": num_pages, "max_pages": max_pages})
            else:
                seq_k = T.int32()
                K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dtype)
                V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dtype)
                max_pages = T.int32()
                block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
                pages = T.meta_var({})
            Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dtype)
            O = T.match_buffer(o_h, (batch, seq_q, heads, D), dtype)
            LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32")
        alibi_slopes = T.match_buffer(alibi_h, (batch, heads), "float32")
        seqused_k = T.match_buffer(seqused_h, (batch,), "int32")
        ex.bind({"batch": batch, "seq_q": seq_q, "seq_k": seq_k, "heads": heads, "heads_kv": heads_kv}, pages, sm_scale,
                softcap, window_left, window_right, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_k, block_table,
                cu_seqlens_q, cu_seqlens_k)

        for b, h, qb in T.grid(batch, heads, T.ceildiv(seq_q, BM)):
            with T.sblock(TILE):
                vb, vh, vqb = T.axis.remap("SSS", [b, h, qb])
                if ex.varlen:
                    T.reads(
                        Q[0:total_q, vh, 0:D], K[0:total_k, ex.kv_head(vb, vh), 0:D], V[0:total_k, ex.kv_head(vb, vh), 0:D],
                        cu_seqlens_q[vb : vb + 2], cu_seqlens_k[vb : vb + 2],
                    )
                    T.writes(O[0:total_q, vh, 0:D], LSE[vh, 0:total_q])
                elif ex.paged:
                    T.reads(
                        Q[vb, vqb * BM : vqb * BM + BM, vh, 0:D],
                        K[0:num_pages, 0:ex.page_size, ex.kv_head(vb, vh), 0:D],
                        V[0:num_pages, 0:ex.page_size, ex.kv_head(vb, vh), 0:D],
                        block_table[vb, 0:max_pages],
                    )
                else:
                    T.reads(
                        Q[vb, vqb * BM : vqb * BM + BM, vh, 0:D],
                        K[vb, 0:seq_k, ex.kv_head(vb, vh), 0:D],
                        V[vb, 0:seq_k, ex.kv_head(vb, vh), 0:D],
                    )
                if not ex.varlen:
                    T.writes(O[vb, vqb * BM : vqb * BM + BM, vh, 0:D], LSE[vb, vh, vqb * BM : vqb * BM + BM])
                Q_tile = T.sblock_alloc_buffer((BM, D), dtype)
                K_tile = T.sblock_alloc_buffer((BN, D), dtype)
                V_tile = T.sblock_alloc_buffer((BN, D), dtype)
                acc_s = T.sblock_alloc_buffer((BM, BN), "float32")
                S_tile = T.sblock_alloc_buffer((BM, BN), "float32")
                P_f32 = T.sblock_alloc_buffer((BM, BN), "float32")
                P_tile = T.sblock_alloc_buffer((BM, BN), p_dtype)
                acc_o = T.sblock_alloc_buffer((BM, D), acc_dtype)
                O_tile = T.sblock_alloc_buffer((BM, D), acc_dtype)
                m_i = T.sblock_alloc_buffer((BM,), "float32")
                m_tile = T.sblock_alloc_buffer((BM,), "float32")
                m_new = T.sblock_alloc_buffer((BM,), "float32")
                l_tile = T.sblock_alloc_buffer((BM,), "float32")
                l_new = T.sblock_alloc_buffer((BM,), "float32")
                l_i = T.sblock_alloc_buffer((BM,), "float32")
                alpha = T.sblock_alloc_buffer((BM,), "float32")

                if ex.varlen:  # (the sequence's offsets, one variable each a tile: ``_Exprs.use``)
                    q_start: T.let[T.int32] = cu_seqlens_q[vb]
                    q_end: T.let[T.int32] = cu_seqlens_q[vb + 1]
                    k_start: T.let[T.int32] = cu_seqlens_k[vb]
                    k_end: T.let[T.int32] = cu_seqlens_k[vb + 1]
                    offsets_ = T.meta_var(ex.use(vb, cu_seqlens_q=(q_start, q_end), cu_seqlens_k=(k_start, k_end)))
                start_tile()
                # the key tiles the mask leaves visible (all where it bounds none)
                if ex.used:  # (the sequence's key count, one variable a tile: ``kv_tiles``)
                    kv_used: T.let[T.int32] = seqused_k[vb]
                    kv_used_ = T.meta_var(ex.use(vb, seqused_k=(kv_used,)))
                for kb in T.serial(kv_tiles(vb, vqb, seq_q, seq_k)):
                    kv_step(ex.kv_first(vb, vqb, seq_k, kb))

                with T.sblock(EPILOGUE):
                    for i, d in T.grid(BM, D):
                        with T.sblock(O_STAGE):
                            vi, vd = T.axis.remap("SS", [i, d])
                            O_tile[vi, vd] = acc_o[vi, vd]
                    for i, d in T.grid(BM, D):
                        with T.sblock(O_STORE):
                            vi, vd = T.axis.remap("SS", [i, d])
                            if ex.varlen:  # (the rows of the tile's sequence only: Algorithm 0's guard)
                                if ex.row_ok(ex.ch.out, vb, vqb * BM + vi):
                                    O[ex.store_at(ex.ch.out, vb, vh, vqb * BM + vi, vd)] = ex.o(vb, vh, vqb * BM + vi,
                                                                                                 O_tile[vi, vd], l_i[vi])
                            elif even or vqb * BM + vi < seq_q:
                                O[vb, vqb * BM + vi, vh, vd] = ex.o(vb, vh, vqb * BM + vi, O_tile[vi, vd], l_i[vi])
                    for i in range(BM):
                        with T.sblock(LSE_STORE):
                            vi = T.axis.remap("S", [i])
                            if ex.varlen:
                                if ex.row_ok(ex.ch.lse, vb, vqb * BM + vi):
                                    LSE[ex.store_at(ex.ch.lse, vb, vh, vqb * BM + vi)] = ex.lse(vb, vh, vqb * BM + vi, m_i[vi],
                                                                                                l_i[vi])
                            elif even or vqb * BM + vi < seq_q:
                                LSE[vb, vh, vqb * BM + vi] = ex.lse(vb, vh, vqb * BM + vi, m_i[vi], l_i[vi])

    return main


def derived_attention(spec: KernelSpec, block_m: int, block_n: int,
                      score_mod: ScoreMod | None = None) -> tirx.PrimFunc:
    """The fused kernel's definition for ``spec``: Algorithm 0 (``plain_attention``) through the
    rolling update at (block_m, block_n)."""
    return rolling_update(plain_attention(spec, score_mod), block_m, block_n, even=spec.even)


def split_k_update(func, block_m: int, block_n: int, parts: int, *, even: bool = False,
                   pack_gqa: bool = False) -> tirx.PrimFunc:
    """Algorithm 0 ``func`` as FlashDecoding: the keys of each query tile cut into ``parts``
    chunks of whole key tiles, each chunk a program running the rolling update to a partial
    (m_c, l_c, acc_c) in float32, then a combine that repairs the partials to the global max
    (``l = sum_c l_c * p(m_c, m)``, acc alike) and runs Algorithm 0's epilogue. One function,
    the same arguments as the fused kernel's; the partials are global intermediates.

    ``pack_gqa``: where Algorithm 0 reads K and V at head ``h // G`` (GQA), the programs run per
    K/V head and a tile's rows over its G query heads (``_Exprs.head``), so each K/V tile is read
    once per group, not G times (FlashAttention's "pack GQA"). Not for even builds, nor for
    groups larger than ``block_m``.

    Raises ``NotRepairable`` as ``rolling_update`` does, and ValueError for ``parts`` < 1."""
    if not (isinstance(parts, int) and parts >= 1):
        raise ValueError(f"parts: expected an int >= 1, got {parts!r}")
    ch = analyze(func)
    if "cu_seqlens_q" in ch.params:
        raise NotRepairable("cu_seqlens_q: packed sequences (varlen) take the rolling update only; the split "
                            "form's partials are per (batch, row), which packed rows do not have")
    group = _gqa_group(ch) or 1
    pack = group if pack_gqa and not even and group <= block_m else 1
    return _carried(ch, _split(ch, int(block_m), int(block_n), bool(even), parts, pack))


def _gqa_group(ch: Chain) -> int | None:
    """G where Algorithm 0 reads K and V at head ``h // G`` (1 where at ``h``), else None."""
    found = set()
    for st, ld in ((ch.gemm, ch.k_load), (ch.pv, ch.v_load)):
        idx, h = ld.indices[-2], st.roles.get("h")
        if isinstance(idx, tirx.Var) and idx.same_as(h):
            found.add(1)
        elif (isinstance(idx, tirx.FloorDiv) and isinstance(idx.a, tirx.Var) and idx.a.same_as(h)
              and isinstance(idx.b, tirx.IntImm) and idx.b.value >= 1):
            found.add(int(idx.b.value))
        else:
            return None
    return found.pop() if len(found) == 1 else None


@fast_tvmscript()
def _split(ch: Chain, BM: int, BN: int, even: bool, parts: int, pack: int) -> tirx.PrimFunc:
    dtype, D, acc_dtype, p_dtype, ex, kv_tiles, start_tile, kv_step = _shared(ch, BM, BN, even, pack)

    def grid_heads(heads, heads_kv):
        """The programs' heads: query heads, or K/V heads where packed."""
        return heads if pack == 1 else heads_kv

    def chunk_tiles(b, qb, c, seq_q, seq_k):
        """(count, first) of the key tiles of chunk ``c``: an equal share of the tile's visible
        ones, in order. A chunk left without one (more chunks than tiles) still runs one, past
        the visible ones and so wholly masked (the key-padding mask or the definition's), as
        ``_kv_tile_count`` does: a GPU software pipeline needs a loop it can prove runs. An even
        build has no padding mask, so there such a chunk runs none."""
        n = kv_tiles(b, qb, seq_q, seq_k)
        per = tirx.ceildiv(n, parts)
        return tirx.max(tirx.min(n, (c + 1) * per) - c * per, 0 if even else 1), c * per

    @T.prim_func(s_tir=True)
    def main(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle, alibi_h: T.handle,
        seqused_h: T.handle, table_h: T.handle, cu_q_h: T.handle, cu_k_h: T.handle, sm_scale: T.float32,
        softcap: T.float32, window_left: T.int32, window_right: T.int32, max_seqlen_q: T.int32, max_seqlen_k: T.int32,
    ):
        T.func_attr({"tirx.noalias": True})
        batch = T.int32()
        seq_q = T.int32()
        heads = T.int32()
        heads_kv = T.int32()
        # (packed sequences are not split: ``split_k_update`` refuses them)
        batch_p1 = T.int32()
        cu_seqlens_q = T.match_buffer(cu_q_h, (batch_p1,), "int32")
        cu_seqlens_k = T.match_buffer(cu_k_h, (batch_p1,), "int32")
        if ex.paged:  # (the definition's: key j in page block_table[b, j // page_size])
            num_pages = T.int32()
            max_pages = T.int32()
            K = T.match_buffer(k_h, (num_pages, ex.page_size, heads_kv, D), dtype)
            V = T.match_buffer(v_h, (num_pages, ex.page_size, heads_kv, D), dtype)
            block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
            seq_k = T.meta_var(max_pages * ex.page_size)
            pages = T.meta_var({"num_pages": num_pages, "max_pages": max_pages})
        else:
            seq_k = T.int32()
            K = T.match_buffer(k_h, (batch, seq_k, heads_kv, D), dtype)
            V = T.match_buffer(v_h, (batch, seq_k, heads_kv, D), dtype)
            max_pages = T.int32()
            block_table = T.match_buffer(table_h, (batch, max_pages), "int32")
            pages = T.meta_var({})
        Q = T.match_buffer(q_h, (batch, seq_q, heads, D), dtype)
        O = T.match_buffer(o_h, (batch, seq_q, heads, D), dtype)
        LSE = T.match_buffer(lse_h, (batch, heads, seq_q), "float32")
        alibi_slopes = T.match_buffer(alibi_h, (batch, heads), "float32")
        seqused_k = T.match_buffer(seqused_h, (batch,), "int32")
        ex.bind({"batch": batch, "seq_q": seq_q, "seq_k": seq_k, "heads": heads, "heads_kv": heads_kv}, pages, sm_scale,
                softcap, window_left, window_right, max_seqlen_q, max_seqlen_k, alibi_slopes, seqused_k, block_table,
                cu_seqlens_q, cu_seqlens_k)
        with T.sblock("root"):
            # (the partials per query head: heads_kv * pack of them where packed, which the
            # programs' writes are seen to cover)
            m_part = T.sblock_alloc_buffer((parts, batch, grid_heads(heads, heads_kv) * pack, seq_q), "float32")
            l_part = T.sblock_alloc_buffer((parts, batch, grid_heads(heads, heads_kv) * pack, seq_q), "float32")
            acc_part = T.sblock_alloc_buffer((parts, batch, grid_heads(heads, heads_kv) * pack, seq_q, D), acc_dtype)
            m_all = T.sblock_alloc_buffer((batch, heads, seq_q), "float32")
            l_all = T.sblock_alloc_buffer((batch, heads, seq_q), "float32")
            acc_all = T.sblock_alloc_buffer((batch, heads, seq_q, D), acc_dtype)
            for b, h, qb, c in T.grid(batch, grid_heads(heads, heads_kv), ex.tiles(seq_q), parts):
                with T.sblock(TILE):
                    vb, vh, vqb, vc = T.axis.remap("SSSS", [b, h, qb, c])
                    if ex.paged:
                        T.reads(
                            Q[vb, ex.row_first(vqb) : ex.row_end(vqb), ex.kv_src(vh) : ex.kv_src(vh) + pack, 0:D],
                            K[0:num_pages, 0:ex.page_size, ex.kv_head(vb, ex.kv_src(vh)), 0:D],
                            V[0:num_pages, 0:ex.page_size, ex.kv_head(vb, ex.kv_src(vh)), 0:D],
                            block_table[vb, 0:max_pages],
                        )
                    else:
                        T.reads(
                            Q[vb, ex.row_first(vqb) : ex.row_end(vqb), ex.kv_src(vh) : ex.kv_src(vh) + pack, 0:D],
                            K[vb, 0:seq_k, ex.kv_head(vb, ex.kv_src(vh)), 0:D],
                            V[vb, 0:seq_k, ex.kv_head(vb, ex.kv_src(vh)), 0:D],
                        )
                    T.writes(
                        m_part[vc, vb, ex.kv_src(vh) : ex.kv_src(vh) + pack, ex.row_first(vqb) : ex.row_end(vqb)],
                        l_part[vc, vb, ex.kv_src(vh) : ex.kv_src(vh) + pack, ex.row_first(vqb) : ex.row_end(vqb)],
                        acc_part[vc, vb, ex.kv_src(vh) : ex.kv_src(vh) + pack, ex.row_first(vqb) : ex.row_end(vqb),
                                 0:D],
                    )
                    Q_tile = T.sblock_alloc_buffer((BM, D), dtype)
                    K_tile = T.sblock_alloc_buffer((BN, D), dtype)
                    V_tile = T.sblock_alloc_buffer((BN, D), dtype)
                    acc_s = T.sblock_alloc_buffer((BM, BN), "float32")
                    S_tile = T.sblock_alloc_buffer((BM, BN), "float32")
                    P_f32 = T.sblock_alloc_buffer((BM, BN), "float32")
                    P_tile = T.sblock_alloc_buffer((BM, BN), p_dtype)
                    acc_o = T.sblock_alloc_buffer((BM, D), acc_dtype)
                    m_i = T.sblock_alloc_buffer((BM,), "float32")
                    m_tile = T.sblock_alloc_buffer((BM,), "float32")
                    m_new = T.sblock_alloc_buffer((BM,), "float32")
                    l_tile = T.sblock_alloc_buffer((BM,), "float32")
                    l_new = T.sblock_alloc_buffer((BM,), "float32")
                    l_i = T.sblock_alloc_buffer((BM,), "float32")
                    alpha = T.sblock_alloc_buffer((BM,), "float32")
                    O_tile = T.sblock_alloc_buffer((BM, D), acc_dtype)
                    start_tile()
                    if ex.used:  # (the sequence's key count, one variable a tile: ``kv_tiles``)
                        kv_used: T.let[T.int32] = seqused_k[vb]
                        kv_used_ = T.meta_var(ex.use(vb, seqused_k=(kv_used,)))
                    for kb in T.serial(chunk_tiles(vb, vqb, vc, seq_q, seq_k)[0]):
                        kv_step(ex.kv_first(vb, vqb, seq_k, chunk_tiles(vb, vqb, vc, seq_q, seq_k)[1] + kb))
                    # the chunk's partial state leaves the tile (rows past seq_q are not stored),
                    # acc staged as the fused epilogue stages it (a GPU schedule stores its
                    # fragments there)
                    with T.sblock(SPLIT_PARTIAL):
                        for i, d in T.grid(BM, D):
                            with T.sblock(O_STAGE):
                                vi, vd = T.axis.remap("SS", [i, d])
                                O_tile[vi, vd] = acc_o[vi, vd]
                        for i, d in T.grid(BM, D):
                            with T.sblock(PARTIAL_ACC):
                                vi, vd = T.axis.remap("SS", [i, d])
                                if even or ex.valid(vqb, vi, seq_q):
                                    acc_part[vc, vb, ex.head(vh, vqb, vi), ex.row(vqb, vi), vd] = O_tile[vi, vd]
                        for i in range(BM):
                            with T.sblock(PARTIAL_STATE):
                                vi = T.axis.remap("S", [i])
                                if even or ex.valid(vqb, vi, seq_q):
                                    m_part[vc, vb, ex.head(vh, vqb, vi), ex.row(vqb, vi)] = m_i[vi]
                                    l_part[vc, vb, ex.head(vh, vqb, vi), ex.row(vqb, vi)] = l_i[vi]
            # the combine: the partials repaired to the global max, then Algorithm 0's epilogue
            for b, h, i, c in T.grid(batch, heads, seq_q, parts):
                with T.sblock(COMBINE_MAX):
                    vb, vh, vi, vc = T.axis.remap("SSSR", [b, h, i, c])
                    with T.init():
                        m_all[vb, vh, vi] = ex.m_init
                    m_all[vb, vh, vi] = T.max(m_all[vb, vh, vi], m_part[vc, vb, vh, vi])
            for b, h, i, c in T.grid(batch, heads, seq_q, parts):
                with T.sblock(COMBINE_SUM):
                    vb, vh, vi, vc = T.axis.remap("SSSR", [b, h, i, c])
                    with T.init():
                        l_all[vb, vh, vi] = ex.l_init
                    l_all[vb, vh, vi] = l_all[vb, vh, vi] + l_part[vc, vb, vh, vi] * ex.alpha(
                        vb, vh, vi, m_part[vc, vb, vh, vi], m_all[vb, vh, vi])
            for b, h, i, d, c in T.grid(batch, heads, seq_q, D, parts):
                with T.sblock(COMBINE_ACC):
                    vb, vh, vi, vd, vc = T.axis.remap("SSSSR", [b, h, i, d, c])
                    with T.init():
                        acc_all[vb, vh, vi, vd] = ex.o_init
                    acc_all[vb, vh, vi, vd] = acc_all[vb, vh, vi, vd] + acc_part[vc, vb, vh, vi, vd] * ex.alpha(
                        vb, vh, vi, m_part[vc, vb, vh, vi], m_all[vb, vh, vi])
            # (one nest for O and lse: a schedule can then place the max and the sum under a row)
            for b, h, i in T.grid(batch, heads, seq_q):
                with T.sblock(COMBINE_LSE):
                    vb, vh, vi = T.axis.remap("SSS", [b, h, i])
                    LSE[vb, vh, vi] = ex.lse(vb, vh, vi, m_all[vb, vh, vi], l_all[vb, vh, vi])
                for d in range(D):
                    with T.sblock(SPLIT_COMBINE):
                        vb, vh, vi, vd = T.axis.remap("SSSS", [b, h, i, d])
                        O[vb, vi, vh, vd] = ex.o(vb, vh, vi, acc_all[vb, vh, vi, vd], l_all[vb, vh, vi])

    return main


def describe(ch: Chain) -> str:
    """What the analysis found in Algorithm 0 and the repair it derived, in words."""
    lines = [
        f"  S = Q K^T          block {ch.gemm.name!r} (a reduction over the head dim)",
        f"  score              block {ch.score.name!r}" if ch.score is not None else "  score              S itself",
        f"  m = max over keys  block {ch.max.name!r}: combiner max, identity -inf",
        f"  P                  block {ch.exp.name!r}: {ch.exp.store.value}",
        f"  l = sum of P       block {ch.sum.name!r}: a sum from 0, linear in P",
        f"  acc = P V          block {ch.pv.name!r}: a sum from 0, linear in P"
        + (f" (through its cast, block {ch.cast.name!r})" if ch.cast is not None else ""),
        f"  epilogue           blocks {ch.out.name!r} (O) and {ch.lse.name!r} (lse): read the final m, l, acc",
        "  repair (rolling):  alpha = P's formula at score m_old against max m_new;",
        "                     l = l * alpha + l_tile;  acc = acc * alpha + P_tile V_tile",
        "  repair (split-K):  m = max_c m_c;  l = sum_c l_c * alpha_c;  acc = sum_c acc_c * alpha_c",
    ]
    return "\n".join(lines)


def derivation_steps(spec: KernelSpec, block_m: int, block_n: int, score_mod: ScoreMod | None = None) -> list:
    """[(title, text)]: Algorithm 0, what the analysis found, and the rolling update's function at
    (block_m, block_n) (what the rule then schedules)."""
    plain = plain_attention(spec, score_mod)
    ch = analyze(plain)
    steps = [
        ("1. Algorithm 0 (definition.plain): S and P span all keys", plain.script()),
        ("2. The chain and its repair (compiler.derive.analyze)", describe(ch)),
    ]
    if spec.splits:
        return steps + [(
            f"3. Split-K update at tile {block_m}x{block_n}, {spec.splits} key chunks: one program per (K/V head "
            "with its GQA group packed, query tile, chunk), then the combine",
            split_k_update(plain, block_m, block_n, spec.splits, even=spec.even, pack_gqa=True).script())]
    return steps + [
        (f"3. Rolling update at tile {block_m}x{block_n}: one program per query tile, one pass over the key "
         f"tiles{' (even: no bound checks)' if spec.even else ''}",
         _carried(ch, _rolling(ch, int(block_m), int(block_n), spec.even)).script()),
    ]
