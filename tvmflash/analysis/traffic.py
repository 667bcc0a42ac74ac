"""Global-memory traffic and FLOPs of a TensorIR function, counted from the IR itself.

The analysis reads a function's statements: its loops, blocks, loads, stores and guards. Nothing
here knows what attention is; the numbers for attention come out of ``definition.py``'s IR with
the symbolic shape (batch, seq_q, seq_k, heads, heads_kv) set to concrete values.

Which TIR: the definitions, before scheduling
---------------------------------------------
The fused definition is already written the way a GPU runs it: one ``tile`` block per (batch,
head, query tile), which loads a Q tile, loops over K/V tiles loading each, and stores its O rows
and lse. Every schedule of it (CPU, plain CUDA, tensor cores) binds that block to a thread block
and keeps its tile buffers on chip, so its global accesses *are* the tile loads and stores.
After scheduling the same accesses remain (split over threads, vectorised), but the GEMMs are
tensorized into mma calls that hide their FLOPs, and the standard functions get TVM's generic
``dlight`` rules whose per-thread loads re-read P and V once per output element (caught by L1/L2
on a real GPU): counting those would measure a placeholder schedule, not the algorithm. The
definitions are also the same for every target and cheap to walk.

Rules
-----
1. Global memory is the function's buffer parameters (q, k, v, o, lse; S and P in the standard
   functions). Buffers a function allocates itself (tiles, accumulators, the softmax row max and
   sum) are taken to live on chip.
2. Work units. The loops above the outermost sblock that holds sblocks of its own (a tile block,
   the root excluded) enumerate the function's work units; a function without one is a single
   unit. In the fused kernel a unit is one query tile (one thread block on the GPU); the standard
   functions are plain loop nests, so each whole function is one unit.
3. A unit moves each global element it touches once: its traffic is the number of *distinct*
   elements it reads, and distinct elements it writes, times the element size. In the fused kernel
   these are exactly its loads: the Q tile once, the K and V tiles of every K/V tile it visits,
   its O rows and lse once. The standard functions are charged their footprint, each element read
   once and each element written once per function: the least any schedule of them can move (a
   GEMM schedule re-reads operand tiles), so the comparison is generous to the standard algorithm.
4. A reduction keeps its accumulator on chip: inside a block with a reduction axis, loads of the
   buffers the block writes are not memory reads (``S = S + q * k`` reads no S).
5. Guards. A load in ``if_then_else(cond, load, 0)``, a store under ``if cond:`` and anything under
   a block predicate move bytes only where ``cond`` holds (a predicated access moves nothing when
   off); both operands of ``Select`` are evaluated, so loads in a ``Select`` always count. On shapes
   that are multiples of the tiles no guard of the definitions is ever false.
6. FLOPs: 2 per multiply-accumulate (``acc = acc + x * y``), for every iteration executed: the two
   GEMMs, FlashAttention's convention (4 * batch * heads * seq_q * seq_k * head_dim without a mask).
   Softmax arithmetic is not counted.

``count(..., per_unit=False)`` makes the whole function one unit: each element once per kernel,
the traffic if a cache (L2) caught every re-read across thread blocks. For the fused kernel that
is Q, K, V, O and lse once; for the standard functions it changes nothing.

Counting is exact, not sampled: loops whose extent depends on an outer variable (the causal K/V
loop depends on the query tile) are handled by enumerating that variable's values, and every
index expression is evaluated over its loops' ranges with numpy (the distinct index tuples are
the elements touched). Index dimensions that share no loop variable are counted apart and
multiplied; several accesses to one buffer in one unit count the union of their elements.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np

from .._compat import s_tir, tirx, tvm

#: Most grid points evaluated at once (numpy arrays of this many int64s); larger grids go in slices.
MAX_GRID = 1 << 22

_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")
_LIKELY = tvm.ir.Op.get("prim.likely")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BufferTraffic:
    """One global buffer of a function: its size and the bytes the function moves."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: int  # bytes
    written: int  # bytes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _itemsize(self.dtype)


@dataclass(frozen=True)
class KernelTraffic:
    """Bytes one function moves to and from global memory, and its FLOPs."""

    name: str
    units: int  # work units (thread blocks of the fused kernel; 1 for a plain loop nest)
    flops: int
    buffers: tuple[BufferTraffic, ...]

    @property
    def read(self) -> int:
        return sum(b.read for b in self.buffers)

    @property
    def written(self) -> int:
        return sum(b.written for b in self.buffers)

    @property
    def moved(self) -> int:
        return self.read + self.written

    def buffer(self, name: str) -> BufferTraffic:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(f"buffer: expected one of {[b.name for b in self.buffers]}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# Collecting the access sites of a function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Loop:
    var: tirx.Var
    min: tirx.PrimExpr
    extent: tirx.PrimExpr


@dataclass(frozen=True, eq=False)
class _Site:
    """A load, store or multiply-accumulate and everything around it."""

    kind: str  # "read" | "write" | "mac"
    buffer: tirx.Var
    indices: tuple
    loops: tuple  # of _Loop, outermost first
    unit_depth: int  # loops[:unit_depth] enumerate work units
    guards: tuple  # conditions that must hold for the access to happen
    bindings: dict  # block iteration vars and let vars -> their values


@dataclass(frozen=True)
class _Ctx:
    loops: tuple = ()
    guards: tuple = ()
    bindings: dict = field(default_factory=dict)
    unit_depth: int | None = None
    accum: tuple = ()  # buffers written by the enclosing reduction block


class _Collector:
    """Walks a PrimFunc once and records every global access and multiply-accumulate."""

    def __init__(self, func: tirx.PrimFunc):
        self.globals = {p: p for p in func.params if tirx.is_buffer_var(p)}
        self.sites: list[_Site] = []
        body = func.body
        if isinstance(body, s_tir.SBlockRealize) and not body.block.iter_vars:  # the root block
            body = body.block.body
        self.stmt(body, _Ctx())

    def record(self, kind, buffer, indices, ctx: _Ctx):
        unit_depth = 0 if ctx.unit_depth is None else ctx.unit_depth
        self.sites.append(_Site(kind, buffer, tuple(indices), ctx.loops, unit_depth, ctx.guards, ctx.bindings))

    # -- statements --
    def stmt(self, s, ctx: _Ctx) -> _Ctx:
        """Walk ``s``; returns the context for the statements after it (a ``Bind`` extends it)."""
        if isinstance(s, tirx.SeqStmt):
            inner = ctx
            for x in s.seq:
                inner = self.stmt(x, inner)
        elif isinstance(s, tirx.Bind):
            return dataclasses.replace(ctx, bindings={**ctx.bindings, s.var: s.value})
        elif isinstance(s, tirx.For):
            if s.step is not None and not _is_const(s.step, 1):
                raise NotImplementedError(f"traffic: loop {s.loop_var.name} has step {s.step}")
            loop = _Loop(s.loop_var, s.min, s.extent)
            self.stmt(s.body, dataclasses.replace(ctx, loops=ctx.loops + (loop,)))
        elif isinstance(s, s_tir.SBlockRealize):
            self.block(s, ctx)
        elif isinstance(s, tirx.IfThenElse):
            self.expr(s.condition, ctx)
            self.stmt(s.then_case, _guarded(ctx, s.condition))
            if s.else_case is not None:
                self.stmt(s.else_case, _guarded(ctx, tirx.Not(s.condition)))
        elif isinstance(s, tirx.BufferStore):
            self.store(s, ctx)
        elif isinstance(s, tirx.Evaluate):
            self.expr(s.value, ctx)
        elif isinstance(s, (tirx.AttrStmt, tirx.AllocBuffer, tirx.DeclBuffer)):
            if getattr(s, "body", None) is not None:
                self.stmt(s.body, ctx)
        else:
            raise NotImplementedError(f"traffic: no counting rule for {type(s).__name__}")
        return ctx

    def block(self, realize, ctx: _Ctx) -> None:
        block = realize.block
        bindings = dict(ctx.bindings)
        for iv, value in zip(block.iter_vars, realize.iter_values):
            bindings[iv.var] = value
        guards = ctx.guards if _is_const(realize.predicate, True) else ctx.guards + (realize.predicate,)
        unit_depth = ctx.unit_depth
        if unit_depth is None and _holds_blocks(block.body):
            unit_depth = len(ctx.loops)  # the loops above this tile block enumerate the units
        reduces = any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)
        accum = tuple(w.source for w in block.writes) if reduces else ()
        inner = dataclasses.replace(ctx, guards=guards, bindings=bindings, unit_depth=unit_depth, accum=accum)
        if block.init is not None:
            self.stmt(block.init, inner)
        self.stmt(block.body, inner)

    def store(self, s, ctx: _Ctx) -> None:
        if s.buffer in self.globals:
            self.record("write", s.buffer, s.indices, ctx)
        if _is_mac(s):
            self.record("mac", s.buffer, (), ctx)
        for i in s.indices:
            self.expr(i, ctx)
        self.expr(s.value, ctx)

    # -- expressions --
    def expr(self, e, ctx: _Ctx) -> None:
        if isinstance(e, tvm.ir.TensorLoad):
            buf = e.source
            if buf in self.globals and not any(buf.same_as(a) for a in ctx.accum):
                self.record("read", buf, e.indices, ctx)
            for i in e.indices:
                self.expr(i, ctx)
        elif isinstance(e, tvm.ir.Call) and e.op.same_as(_IF_THEN_ELSE):
            cond, then_value, else_value = e.args
            self.expr(cond, ctx)
            self.expr(then_value, _guarded(ctx, cond))
            self.expr(else_value, _guarded(ctx, tirx.Not(cond)))
        elif isinstance(e, (tvm.ir.Call, tirx.Select, tirx.Cast, tirx.Not)) or _is_binary(e):
            for child in _children(e):
                self.expr(child, ctx)
        elif isinstance(e, (tirx.Ramp, tirx.Broadcast, tirx.Shuffle, tirx.Let)):
            raise NotImplementedError(f"traffic: no counting rule for {type(e).__name__} (count before vectorizing)")
        # Var, IntImm, FloatImm, StringImm: no memory access


def _guarded(ctx: _Ctx, cond) -> _Ctx:
    return dataclasses.replace(ctx, guards=ctx.guards + (cond,))


def _holds_blocks(s) -> bool:
    """Whether statement ``s`` contains an sblock."""
    if isinstance(s, s_tir.SBlockRealize):
        return True
    if isinstance(s, tirx.SeqStmt):
        return any(_holds_blocks(x) for x in s.seq)
    if isinstance(s, tirx.IfThenElse):
        return _holds_blocks(s.then_case) or (s.else_case is not None and _holds_blocks(s.else_case))
    body = getattr(s, "body", None)
    return isinstance(body, tirx.Stmt) and _holds_blocks(body)


def _is_mac(store) -> bool:
    """``acc[i] = acc[i] + x * y`` (either order of the addition)."""
    value = store.value
    if not isinstance(value, tirx.Add):
        return False
    for acc, prod in ((value.a, value.b), (value.b, value.a)):
        if (
            isinstance(prod, tirx.Mul)
            and isinstance(acc, tvm.ir.TensorLoad)
            and acc.source.same_as(store.buffer)
            and len(acc.indices) == len(store.indices)
            and all(_same(a, b) for a, b in zip(acc.indices, store.indices))
        ):
            return True
    return False


def _same(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b))


def _is_binary(e) -> bool:
    return isinstance(e, (tvm.ir.prim.expr.BinaryOpExpr, tvm.ir.prim.expr.CmpExpr, tirx.And, tirx.Or))


def _children(e):
    if isinstance(e, tvm.ir.Call):
        return tuple(e.args)
    if isinstance(e, tirx.Select):
        return (e.condition, e.true_value, e.false_value)
    if isinstance(e, tirx.Cast):
        return (e.value,)
    if isinstance(e, tirx.Not):
        return (e.a,)
    return (e.a, e.b)


def _is_const(e, value) -> bool:
    return isinstance(e, (tirx.IntImm, bool, int)) and int(getattr(e, "value", e)) == int(value)


def _itemsize(dtype: str) -> int:
    return tvm.runtime.DataType(str(dtype)).bits // 8


# ---------------------------------------------------------------------------------------------
# Evaluating index expressions over loop ranges
# ---------------------------------------------------------------------------------------------

_BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "FloorDiv": np.floor_divide,
    "FloorMod": np.mod,
    "Min": np.minimum,
    "Max": np.maximum,
    "EQ": np.equal,
    "NE": np.not_equal,
    "LT": np.less,
    "LE": np.less_equal,
    "GT": np.greater,
    "GE": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
}


def _eval(e, env: dict, bindings: dict):
    """Value of the integer/boolean expression ``e`` (numpy arrays where ``env`` holds arrays)."""
    if isinstance(e, (tirx.IntImm, tirx.FloatImm)):
        return e.value
    if isinstance(e, tvm.ir.Var):
        if e in env:
            return env[e]
        if e in bindings:
            return _eval(bindings[e], env, bindings)
        raise ValueError(f"traffic: no value for variable {e.name!r}")
    kind = type(e).__name__
    if kind in _BINARY:
        return _BINARY[kind](_eval(e.a, env, bindings), _eval(e.b, env, bindings))
    if isinstance(e, tirx.Not):
        return np.logical_not(_eval(e.a, env, bindings))
    if isinstance(e, tirx.Select):
        return np.where(_eval(e.condition, env, bindings), _eval(e.true_value, env, bindings),
                        _eval(e.false_value, env, bindings))
    if isinstance(e, tirx.Cast):
        return _eval(e.value, env, bindings)
    if isinstance(e, tvm.ir.Call) and e.op.same_as(_IF_THEN_ELSE):
        return np.where(*(_eval(a, env, bindings) for a in e.args))
    if isinstance(e, tvm.ir.Call) and e.op.same_as(_LIKELY):
        return _eval(e.args[0], env, bindings)
    raise NotImplementedError(f"traffic: cannot evaluate {kind} in an index or loop bound: {e}")


def _free_vars(e, bindings: dict) -> frozenset:
    """Variables ``e`` depends on once let and block variables are replaced by their values."""
    if isinstance(e, tvm.ir.Var):
        if e in bindings:
            return _free_vars(bindings[e], bindings)
        return frozenset((e,))
    if isinstance(e, (tirx.IntImm, tirx.FloatImm, tvm.ir.StringImm)):
        return frozenset()
    if isinstance(e, tvm.ir.TensorLoad):
        raise NotImplementedError(f"traffic: data-dependent index or bound: {e}")
    out = frozenset()
    for child in _children(e):
        out |= _free_vars(child, bindings)
    return out


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


@dataclass
class _InUnit:
    """One site in one unit: accesses executed and the distinct elements touched."""

    issued: int
    distinct: int
    footprint: tuple  # comparable description of the distinct elements (None if not needed)


def _site_in_unit(site: _Site, env: dict, depth: int, want_footprint: bool) -> _InUnit:
    """Count ``site`` in the unit whose variables ``env`` binds; ``depth``: number of unit loops."""
    ranges, bound_guards = {}, []
    for loop in site.loops[depth:]:
        deps = (_free_vars(loop.min, site.bindings) | _free_vars(loop.extent, site.bindings)) & set(ranges)
        if deps:  # bounds that move with an outer loop of the unit: the hull of them, and a guard
            lo, hi = _hull(loop, deps, ranges, env, site.bindings)
            bound_guards.append(tirx.And(loop.var >= loop.min, loop.var < loop.min + loop.extent))
        else:
            lo, ext = (_scalar(x, env, site.bindings, loop.var) for x in (loop.min, loop.extent))
            hi = lo + ext
        if hi <= lo:
            return _InUnit(0, 0, ())
        ranges[loop.var] = (lo, hi - lo)
    # Parts (guards and index dimensions) joined into components by the loop variables they share.
    guards = list(site.guards) + bound_guards
    parts = [("guard", g) for g in guards] + [("dim", (k, idx)) for k, idx in enumerate(site.indices)]
    part_vars = []
    for kind, p in parts:
        free = _free_vars(p if kind == "guard" else p[1], site.bindings)
        part_vars.append(frozenset(v for v in free if v in ranges))
    parent = {v: v for v in ranges}

    def find(v):
        while parent[v] is not v:
            v = parent[v]
        return v

    for vs in part_vars:
        vs = list(vs)
        for v in vs[1:]:
            parent[find(v)] = find(vs[0])
    components: dict = {}
    constant_dims = []
    for (kind, p), vs in zip(parts, part_vars):
        if not vs:  # depends on unit and shape variables only
            if kind == "guard":
                if not bool(_eval(p, env, site.bindings)):
                    return _InUnit(0, 0, ())
            elif want_footprint:
                constant_dims.append((p[0], int(_eval(p[1], env, site.bindings))))
            continue
        components.setdefault(find(next(iter(vs))), []).append((kind, p))
    issued, distinct, footprint = 1, 1, []
    in_component = set()
    for root, members in components.items():
        cvars = [v for v in ranges if find(v) is root]  # loop order
        in_component.update(cvars)
        guards_c = [p for kind, p in members if kind == "guard"]
        dims = [p for kind, p in members if kind == "dim"]
        hits, unique = _enumerate(cvars, ranges, guards_c, [idx for _, idx in dims], env, site.bindings)
        issued *= hits
        if dims:
            distinct *= unique.shape[1]
            if want_footprint:
                footprint.append((tuple(k for k, _ in dims), unique))
        elif hits == 0:
            distinct = 0
    for v, (_, ext) in ranges.items():
        if v not in in_component:
            issued *= ext
    if issued == 0:
        return _InUnit(0, 0, ())
    return _InUnit(issued, distinct, (tuple(sorted(constant_dims)), sorted(footprint, key=lambda f: f[0])))


def _enumerate(cvars, ranges, guards, indices, env, bindings):
    """Over the grid of the loop variables ``cvars``: how many points satisfy ``guards``, and the
    distinct index tuples (columns) there. Evaluated in slices of at most MAX_GRID points."""
    sizes = [ranges[v][1] for v in cvars]
    inner = int(np.prod(sizes[1:], dtype=np.int64))
    step = max(1, MAX_GRID // max(inner, 1))
    lo0, ext0 = ranges[cvars[0]]
    hits, uniques = 0, []
    for start in range(lo0, lo0 + ext0, step):
        axes = [np.arange(start, min(start + step, lo0 + ext0), dtype=np.int64)]
        axes += [np.arange(lo, lo + ext, dtype=np.int64) for lo, ext in (ranges[v] for v in cvars[1:])]
        grids = np.meshgrid(*axes, indexing="ij")
        size = grids[0].size
        cenv = {**env, **{v: g.ravel() for v, g in zip(cvars, grids)}}
        mask = np.ones(size, dtype=bool)
        for g in guards:
            mask &= np.broadcast_to(_eval(g, cenv, bindings), (size,)).astype(bool)
        hits += int(mask.sum())
        if indices:
            values = np.stack([np.broadcast_to(_eval(i, cenv, bindings), (size,))[mask] for i in indices])
            uniques.append(_unique_columns(values))
    unique = _unique_columns(np.concatenate(uniques, axis=1)) if indices else None
    return hits, unique


def _unique_columns(values: np.ndarray) -> np.ndarray:
    """The distinct columns of an integer matrix, sorted (one int64 key per column: fast)."""
    if values.shape[1] == 0:
        return values
    low = values.min(axis=1, keepdims=True)
    span = values.max(axis=1) - low[:, 0] + 1
    if np.prod(span.astype(np.float64)) >= 2.0**62:
        return np.unique(values, axis=1)
    keys = np.unique(np.ravel_multi_index(tuple(values - low), tuple(int(x) for x in span)))
    return np.stack(np.unravel_index(keys, tuple(int(x) for x in span))) + low


def _hull(loop: _Loop, deps, ranges, env, bindings) -> tuple[int, int]:
    """Smallest and one past the largest value ``loop.var`` takes as the loops ``deps`` vary."""
    deps = [v for v in ranges if v in deps]
    grids = np.meshgrid(*(np.arange(lo, lo + ext, dtype=np.int64) for lo, ext in (ranges[v] for v in deps)),
                        indexing="ij")
    denv = {**env, **{v: g.ravel() for v, g in zip(deps, grids)}}
    size = grids[0].size
    lo = np.broadcast_to(_eval(loop.min, denv, bindings), (size,))
    hi = lo + np.broadcast_to(_eval(loop.extent, denv, bindings), (size,))
    live = hi > lo
    if not live.any():
        return 0, 0
    return int(lo[live].min()), int(hi[live].max())


def _scalar(e, env, bindings, loop_var) -> int:
    value = _eval(e, env, bindings)
    if np.ndim(value):
        raise NotImplementedError(f"traffic: the bounds of loop {loop_var.name} depend on an inner loop")
    return int(value)


def _same_footprint(a, b) -> bool:
    (ca, fa), (cb, fb) = a, b
    return ca == cb and len(fa) == len(fb) and all(
        da == db and ua.shape == ub.shape and np.array_equal(ua, ub) for (da, ua), (db, ub) in zip(fa, fb)
    )


def _union(found: list[_InUnit], ndim: int) -> int:
    """Distinct elements touched by several sites: their index tuples materialised and merged
    (above MAX_GRID tuples, their sum: an upper bound)."""
    if sum(f.distinct for f in found) > MAX_GRID:
        return sum(f.distinct for f in found)
    tuples = []
    for f in found:
        constant_dims, components = f.footprint
        columns = [None] * ndim
        parts = [((k,), np.array([[v]], dtype=np.int64)) for k, v in constant_dims] + list(components)
        grids = np.meshgrid(*(np.arange(u.shape[1]) for _, u in parts), indexing="ij")
        for (dims, unique), pick in zip(parts, grids):
            for row, k in enumerate(dims):
                columns[k] = unique[row][pick.ravel()]
        tuples.append(np.stack(columns))
    return int(_unique_columns(np.concatenate(tuples, axis=1)).shape[1])


def _units(sites: list[_Site], env: dict, depth: int, all_unit_vars: bool):
    """(rows of unit-variable values to enumerate, multiplicity of each row, number of units).

    A unit variable is enumerated when the sites' counts can depend on it: it appears in an inner
    loop bound, a guard, or an index together with an inner loop variable (every unit variable when
    ``all_unit_vars``: sites must then be compared unit by unit). The other unit loops multiply."""
    unit_loops = sites[0].loops[:depth]
    for s in sites:
        if len(s.loops) < depth or not all(a.var.same_as(b.var) for a, b in zip(s.loops[:depth], unit_loops)):
            raise NotImplementedError("traffic: accesses of one buffer in different work units")
    unit_vars = {loop.var for loop in unit_loops}
    needed = set()
    for s in sites:
        inner = s.loops[depth:]
        inner_vars = {loop.var for loop in inner}
        for e in [x for loop in inner for x in (loop.min, loop.extent)] + list(s.guards):
            needed |= _free_vars(e, s.bindings) & unit_vars
        for idx in s.indices:
            free = _free_vars(idx, s.bindings)
            if all_unit_vars or free & inner_vars:
                needed |= free & unit_vars
    ranges, multiplicity, units = [], 1, 1
    for loop in unit_loops:
        lo, ext = (_scalar(x, env, {}, loop.var) for x in (loop.min, loop.extent))
        units *= max(ext, 0)
        if loop.var in needed:
            ranges.append((loop.var, range(lo, lo + ext)))
        else:
            multiplicity *= max(ext, 0)
    rows = [dict(zip([v for v, _ in ranges], values)) for values in itertools.product(*(r for _, r in ranges))]
    return rows, multiplicity, units


def shape_env(func: tirx.PrimFunc, shapes: dict) -> dict:
    """The function's symbolic shape variables (by name) bound to ``shapes``."""
    env = {}
    for p in func.params:
        if tirx.is_buffer_var(p):
            for dim in p.shape:
                for var in _free_vars(dim, {}):
                    if var.name not in shapes:
                        raise ValueError(f"shapes: expected a value for {var.name!r}, got {sorted(shapes)}")
                    env[var] = int(shapes[var.name])
    return env


_SITES: dict = {}


def _sites_of(func: tirx.PrimFunc) -> list[_Site]:
    key = func.__hash__()
    if key not in _SITES or _SITES[key][0] is not func:
        _SITES[key] = (func, _Collector(func).sites)
    return _SITES[key][1]


def count(func: tirx.PrimFunc, shapes: dict, name: str = "main", per_unit: bool = True) -> KernelTraffic:
    """Global-memory bytes and FLOPs of ``func`` for concrete ``shapes`` (the module docstring
    gives the rules). ``shapes`` maps the symbolic shape names (batch, seq_q, seq_k, heads,
    heads_kv) to ints.

    per_unit=False counts the whole function as one unit: every element it touches once, the
    traffic of a kernel whose re-reads all hit a cache (its compulsory traffic)."""
    env = shape_env(func, shapes)
    groups: dict = {}
    for s in _sites_of(func):
        groups.setdefault((s.kind, s.buffer), []).append(s)

    units, flops, moved = 1, 0, {}
    for (kind, buffer), group in groups.items():
        compare = kind != "mac" and len(group) > 1
        depth = group[0].unit_depth if per_unit else 0
        if any((s.unit_depth if per_unit else 0) != depth for s in group):
            raise NotImplementedError(f"traffic: accesses of {buffer.name} in different work units")
        rows, multiplicity, units_here = _units(group, env, depth, all_unit_vars=compare)
        units = max(units, units_here)
        total = 0
        for row in rows:
            uenv = {**env, **row}
            found = [_site_in_unit(s, uenv, depth, want_footprint=compare) for s in group]
            if kind == "mac":
                total += sum(f.issued for f in found)
            elif len(found) == 1:
                total += found[0].distinct
            else:
                touched = [f for f in found if f.distinct]
                if touched and all(_same_footprint(f.footprint, touched[0].footprint) for f in touched):
                    total += touched[0].distinct
                else:
                    total += _union(touched, len(group[0].indices))
        total *= multiplicity
        if kind == "mac":
            flops += 2 * total
        else:
            moved[(kind, buffer)] = total

    buffers = []
    for p in func.params:
        if tirx.is_buffer_var(p):
            size = _itemsize(p.dtype)
            shape = tuple(int(_eval(d, env, {})) for d in p.shape)
            buffers.append(BufferTraffic(p.name, str(p.dtype), shape, moved.get(("read", p), 0) * size,
                                         moved.get(("write", p), 0) * size))
    return KernelTraffic(name, units, flops, tuple(buffers))


def count_module(mod: tvm.IRModule, shapes: dict, order=None, per_unit: bool = True) -> tuple[KernelTraffic, ...]:
    """``count`` for each function of ``mod`` (in ``order`` where given)."""
    names = list(order) if order is not None else sorted(gv.name_hint for gv in mod.functions)
    return tuple(count(mod[n], shapes, n, per_unit) for n in names)
