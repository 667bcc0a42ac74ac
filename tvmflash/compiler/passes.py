"""tvmflash's own TIR passes, run by the pipeline in ``pipeline``.

- ``unmask_full_kv_tiles``: after the software pipeline, K/V tiles that need no mask run without
  one (FlashAttention-2's ``n_masking_steps``); only the diagonal and last tiles pay for it.
- ``constant_async_waits``: every cp.async wait count a constant before CUDA codegen.
- ``lower_all_warp_memory``: TVM's LowerWarpMemory run until every warp-scope buffer is lowered.

The mask pass relies on two names of the fused definition (``definition.fused``): the K/V loop
variable ``KV_LOOP_VAR`` and the masked-score form ``is_masked_score``; both are imported here,
so the contract has one owner.
"""

from __future__ import annotations

import functools

from .._compat import structural_equal, tirx, tvm
from ..definition import KV_LOOP_VAR, is_masked_score

#: The attribute InjectSoftwarePipeline gives each cp.async wait: how many commit groups may stay
#: in flight (``cp.async.wait_group N``, N an immediate).
ASYNC_WAIT_COUNT = "async_wait_inflight_count"


def constant_async_waits():
    """A device pass: every cp.async wait count becomes a constant before CUDA codegen.

    TVM 0.27's InjectSoftwarePipeline writes the count as ``if_then_else(predicate, n, 0)`` where
    it cannot prove the producer's predicate at that point, and nothing simplifies an attribute
    value later, so codegen refuses even ``if_then_else(True & True, 0, 0)`` ("immediate operands
    must become compile-time constants"): the static-shape causal kernel MetaSchedule measures.
    The count is simplified; one that stays symbolic becomes 0 (wait for every group: never
    wrong, since fewer groups in flight only waits longer)."""
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()

    def rewrite(stmt):
        if isinstance(stmt, tirx.AttrStmt):
            body, value = rewrite(stmt.body), stmt.value
            if stmt.attr_key == ASYNC_WAIT_COUNT and not isinstance(value, tirx.IntImm):
                value = analyzer.simplify(value)
                if not isinstance(value, tirx.IntImm):
                    value = tirx.const(0, "int32")
            if body.same_as(stmt.body) and value.same_as(stmt.value):
                return stmt
            return tirx.AttrStmt(stmt.node, stmt.attr_key, value, body)
        return _map_children(stmt, rewrite)  # no cp.async wait is nested in other statements here

    def transform(func, mod, ctx):
        body = rewrite(func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    return tirx.transform.prim_func_pass(transform, opt_level=0, name="tvmflash.ConstantAsyncWaits")




def unmask_full_kv_tiles(loop_name: str = KV_LOOP_VAR):
    """A pass for after the software pipeline (run right before TVM's LoopPartition): K/V tiles
    that need no mask run without one, as FlashAttention-2's ``n_masking_steps`` loop does.

    The masks are the ``Select(visible, s, -inf)`` of ``definition.masked``; each term of
    ``visible`` bounds the tile index ``kb``: for all rows and keys of the tile the term holds
    while ``kb < U`` (``deduce_bound`` over the threads' and inner loops' ranges). Over the
    pipeline's steady state ``kb < E``:

    - a term with ``U >= E`` provably (the key bound: the steady state never holds the last,
      partial tile) is dropped from the loop;
    - the others (the causal bound) split the loop in two: tiles below ``min(U, E)`` run with no
      mask, the rest (the diagonal tiles) keep it.

    The pipeline's epilogue (the last tile) keeps every mask. TVM's own LoopPartition cannot do
    this here: it leaves guards around the copied loop body that it cannot prove, and ThreadSync
    then refuses the ``__syncthreads`` inside them ("Cannot insert syncs inside condition")."""
    from tvm.sym import Analyzer, ConstIntBound, IntervalSet, ProofStrength, deduce_bound
    from tvm.sym.int_set import neg_inf, pos_inf

    def transform(func, mod, ctx):
        analyzer = Analyzer()
        for param in func.params:
            ty = getattr(param, "ty", None)
            for extent in ty.shape if isinstance(ty, tirx.BufferType) else ():
                if isinstance(extent, tvm.ir.Var):  # shapes are sizes: >= 0
                    analyzer.update(extent, ConstIntBound(0, ConstIntBound.POS_INF), True)
        threads = {}

        def never(extent):
            return any(analyzer.can_prove(extent <= 0, strength)
                       for strength in (ProofStrength.DEFAULT, ProofStrength.SYMBOLIC_BOUND))

        def split(loop):
            kb, E = loop.loop_var, loop.extent
            upper, lower = {}, {}  # term -> U (it holds while kb < U), term -> L (while kb >= L)
            for cond, ranges in mask_conditions(loop.body):
                relax = {**threads, **ranges}
                for term in and_terms(cond):
                    if not _uses(term, kb):
                        continue
                    bound = deduce_bound(kb, term, {}, relax)
                    if bound.is_nothing():
                        continue
                    low, high = bound.min_value.same_as(neg_inf()), bound.max_value.same_as(pos_inf())
                    if low and not high:
                        upper[term] = bound.max_value + 1
                    elif high and not low:
                        lower[term] = bound.min_value
            if not upper and not lower:
                return loop
            # the pipeline guards its statements by conditions on kb that hold for kb < E; proved
            # here while the bound is E (StmtSimplify could not from the split loops' bounds)
            with analyzer.constraint_scope(tirx.all(kb >= loop.min, kb < loop.min + E)):
                loop = _with_body(loop, _drop_proven_guards(loop.body, analyzer))
            everywhere, local = [], []  # terms that hold over the whole loop, and the others
            for term, u in upper.items():
                (everywhere if analyzer.can_prove(u >= E, ProofStrength.SYMBOLIC_BOUND) else local).append(term)
            local_lower = [t for t, lo in lower.items() if not analyzer.can_prove(lo <= 0, ProofStrength.SYMBOLIC_BOUND)]
            everywhere += [t for t in lower if t not in local_lower]
            body = _replace_terms(loop.body, everywhere)
            if not local and not local_lower:
                return _with_body(loop, body)
            unmasked = _replace_terms(body, local + local_lower)
            cut = tirx.min(tirx.max(functools.reduce(tirx.min, [upper[t] for t in local]), 0), E) if local else E
            if local_lower:
                # a sliding window's left edge: masked tiles before the unmasked ones as well
                return _three_way(loop, body, unmasked, lower, local_lower, cut, never)
            # a part that never runs is left out here: removed later, it would leave its copies
            # of the mma fragments unused, and LowerWarpMemory fails on those ("Divide by zero")
            if never(cut):
                return _with_body(loop, body)
            if never(E - cut):
                return _with_body(loop, unmasked)
            tail = tvm.ir.Var(kb.name + "_masked", "int32")
            return tirx.SeqStmt([
                tirx.For(kb, loop.min, cut, loop.kind, unmasked, loop.thread_binding, loop.annotations),
                # the masked tiles: a loop from 0 (LowerWarpMemory fails on a loop from ``cut``)
                tirx.For(tail, 0, E - cut, loop.kind, tirx.SeqStmt([tirx.Bind(kb, tail + cut), body]),
                         loop.thread_binding, loop.annotations),
            ])

        def rewrite(stmt):
            if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
                analyzer.bind(stmt.node.var, tvm.ir.Range(0, stmt.value), allow_override=True)
                if str(stmt.node.thread_tag).startswith("threadIdx"):  # relaxed: all threads of a tile
                    threads[stmt.node.var] = IntervalSet(0, stmt.value - 1)
            if isinstance(stmt, tirx.For) and stmt.loop_var.name == loop_name and _is_const(stmt.min, 0):
                return split(stmt)
            return _map_children(stmt, rewrite)

        body = rewrite(func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    return tvm.transform.Sequential(
        [tirx.transform.prim_func_pass(transform, opt_level=0, name="tvmflash.UnmaskFullKVTiles"),
         tirx.transform.ConvertSSA()])


def _three_way(loop, body, unmasked, lower: dict, local_lower: list, cut, never):
    """``loop`` as the masked tiles below every lower bound, the unmasked ones up to ``cut``
    and the masked ones from there: a window's first tiles, its inside and its diagonal. Each
    part a loop from 0 (LowerWarpMemory fails on a loop from a symbolic start)."""
    kb, E = loop.loop_var, loop.extent
    start = tirx.min(tirx.max(functools.reduce(tirx.max, [lower[t] for t in local_lower]), 0), E)
    cut = tirx.max(cut, start)

    def part(name, begin, end, stmt):
        if name is None:
            return tirx.For(kb, 0, end, loop.kind, stmt, loop.thread_binding, loop.annotations)
        var = tvm.ir.Var(kb.name + name, "int32")
        return tirx.For(var, 0, end - begin, loop.kind, tirx.SeqStmt([tirx.Bind(kb, var + begin), stmt]),
                        loop.thread_binding, loop.annotations)

    # a part that never runs is left out, as in the two-way split (LowerWarpMemory fails on the
    # unused fragment copies it would leave): a static shape's single query tile, say
    parts = [(None, 0, start, body), ("_inside", start, cut, unmasked), ("_masked", cut, E, body)]
    kept = [part(*p) for p in parts if not never(p[2] - p[1])]
    if not kept:  # the steady state never runs: leave the loop as it was
        return _with_body(loop, body)
    return kept[0] if len(kept) == 1 else tirx.SeqStmt(kept)


def _drop_proven_guards(stmt, analyzer):
    """``stmt`` with each ``if`` whose condition ``analyzer`` proves replaced by its body. The
    symbolic-bound proof too: a window's tile count is a min/max expression, and the default
    proof cannot carry ``kb < min(a, b) + 1`` to ``kb < min(a, b) + 2``."""
    from tvm.sym import ProofStrength

    if isinstance(stmt, tirx.IfThenElse) and (analyzer.can_prove(stmt.condition) or analyzer.can_prove(
            stmt.condition, ProofStrength.SYMBOLIC_BOUND)):
        return _drop_proven_guards(stmt.then_case, analyzer)
    if isinstance(stmt, (tirx.SeqStmt, tirx.AttrStmt)):  # the pipeline's guards are not nested deeper
        return _map_children(stmt, lambda s: _drop_proven_guards(s, analyzer))
    return stmt


def _is_const(e, value) -> bool:
    return isinstance(e, tirx.IntImm) and e.value == value


def _map_children(stmt, f):
    """``stmt`` with ``f`` applied to its child statements (the bodies of SeqStmt, AttrStmt,
    IfThenElse and For); ``stmt`` itself where no child changed. Other statements are leaves."""
    if isinstance(stmt, tirx.SeqStmt):
        seq = [f(s) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.AttrStmt):
        body = f(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.IfThenElse):
        then, other = f(stmt.then_case), stmt.else_case and f(stmt.else_case)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    if isinstance(stmt, tirx.For):
        body = f(stmt.body)
        return stmt if body.same_as(stmt.body) else _with_body(stmt, body)
    return stmt


def _with_body(loop, body):
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations,
                    loop.step)


def and_terms(cond) -> list:
    if isinstance(cond, tirx.And):
        return and_terms(cond.a) + and_terms(cond.b)
    return [cond]


def _expr_children(e) -> tuple:
    if isinstance(e, tvm.ir.Call):
        return tuple(e.args)
    if isinstance(e, tirx.Select):
        return (e.condition, e.true_value, e.false_value)
    if isinstance(e, (tirx.Cast, tirx.Broadcast)):
        return (e.value,)
    if isinstance(e, tirx.Not):
        return (e.a,)
    if hasattr(e, "a") and hasattr(e, "b"):
        return (e.a, e.b)
    return ()  # leaves, buffer loads (their indices hold no mask)


def _uses(e, var) -> bool:
    return e.same_as(var) or any(_uses(c, var) for c in _expr_children(e))


def mask_conditions(stmt, ranges=None) -> list:
    """(condition, {inner loop var: IntervalSet}) of every mask stored in ``stmt``."""
    from tvm.sym import IntervalSet

    ranges = ranges or {}
    found = []
    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            found += mask_conditions(s, ranges)
    elif isinstance(stmt, tirx.For):
        inner = {**ranges, stmt.loop_var: IntervalSet(stmt.min, stmt.min + stmt.extent - 1)}
        found += mask_conditions(stmt.body, inner)
    elif isinstance(stmt, tirx.AttrStmt):
        found += mask_conditions(stmt.body, ranges)
    elif isinstance(stmt, tirx.IfThenElse):
        found += mask_conditions(stmt.then_case, ranges)
        if stmt.else_case is not None:
            found += mask_conditions(stmt.else_case, ranges)
    elif isinstance(stmt, tirx.BufferStore):
        stack = [stmt.value]
        while stack:
            e = stack.pop()
            if is_masked_score(e):
                found.append((e.condition, ranges))
            stack.extend(_expr_children(e))
    return found


def _replace_terms(stmt, terms):
    """``stmt`` with each mask term in ``terms`` (structurally equal) made true."""
    if not terms:
        return stmt

    def expr(e):
        if any(structural_equal(e, t) for t in terms):
            return tirx.const(True, "bool")
        kids = _expr_children(e)
        if not kids:
            return e
        new = [expr(k) for k in kids]
        if all(a.same_as(b) for a, b in zip(new, kids)):
            return e
        if isinstance(e, tvm.ir.Call):
            return tvm.ir.Call(e.op, new, e.attrs, e.ty_args, ret_ty=e.ty)
        if isinstance(e, tirx.Select):
            return tirx.Select(*new)
        if isinstance(e, tirx.Cast):
            return tirx.Cast(e.dtype, new[0])
        if isinstance(e, tirx.Broadcast):
            return tirx.Broadcast(new[0], e.lanes)
        return type(e)(*new)

    def stmt_(s):
        if isinstance(s, tirx.BufferStore):
            value = expr(s.value)
            return s if value.same_as(s.value) else tirx.BufferStore(s.buffer, value, s.indices)
        return _map_children(s, stmt_)

    return stmt_(stmt)


def lower_all_warp_memory(max_runs: int = 64):
    """A device pass: TVM's LowerWarpMemory, run until it changes nothing.

    TVM 0.27's LowerWarpMemory rewrites one warp-scope allocation of a nest and leaves the ones
    inside it 32x oversized, so an mma fragment written through a pointer offset by the lane
    (ldmatrix, mma) and read back without it (mma fill/store) disagree. Each run lowers the next
    allocation. How many a kernel holds depends on the schedule: the K/V software pipeline copies
    the loop body into its epilogue with fresh Q/K/V fragments (11 in the d128 kernel; a fixed
    count of 8 runs left three of them 32x oversized, indexed by the lane)."""

    def transform(mod, ctx):
        for _ in range(max_runs):
            lowered = tirx.transform.LowerWarpMemory()(mod)
            if structural_equal(lowered, mod):
                return mod
            mod = lowered
        raise RuntimeError(f"LowerWarpMemory still changed the module after {max_runs} runs")

    return tvm.transform.module_pass(transform, opt_level=0, name="tvmflash.LowerAllWarpMemory")
