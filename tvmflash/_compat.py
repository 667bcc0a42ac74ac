"""Everything that depends on TVM's version lives here (TVM 0.27: ``tvm.s_tir`` / ``tvm.tirx``).

The rest of the package imports TVM names from this module only, so a TVM upgrade that moves
names again is a change to one file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import threading

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm_ffi import structural_equal, structural_hash

__all__ = [
    "T",
    "Schedule",
    "ms",
    "structural_equal",
    "structural_hash",
    "s_tir",
    "tirx",
    "tvm",
    "TVM_VERSION",
    "TVM_FFI_VERSION",
    "make_target",
    "host_cpu_target",
    "is_cuda",
    "cuda_arch",
    "ensure_cuda_headers",
]

TVM_VERSION: str = tvm.__version__
try:
    import tvm_ffi

    TVM_FFI_VERSION: str = tvm_ffi.__version__
except Exception:  # pragma: no cover - tvm_ffi always ships with TVM 0.27
    TVM_FFI_VERSION = "unknown"

#: Short names accepted wherever a target is asked for.
TARGET_ALIASES = {
    "cpu": "cpu",
    "llvm": "cpu",
    "a100": "nvidia/nvidia-a100",
    "h100": "nvidia/nvidia-h100",
    "sm80": "nvidia/nvidia-a100",
    "sm90": "nvidia/nvidia-h100",
}


def host_cpu_target() -> tvm.target.Target:
    """The llvm target for this machine's CPU, with every core."""
    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1})


def make_target(target) -> tvm.target.Target:
    """A ``tvm.target.Target`` from a tag (``nvidia/nvidia-a100``), an alias (``cpu``, ``a100``,
    ``h100``), a JSON string or dict, or a Target. TVM 0.27 rejects old ``"llvm -mcpu=..."`` strings."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if not isinstance(target, str):
        raise TypeError(f"target: expected a str, dict or tvm.target.Target, got {type(target).__name__}")
    return _target_from_str(target)


@functools.lru_cache(maxsize=None)
def _target_from_str(target: str) -> tvm.target.Target:
    """``make_target`` of a string, once per string: specs name their target by string, and a
    spec's key and kind are read on every ``attention`` call (a Target is immutable)."""
    name = TARGET_ALIASES.get(target.strip().lower(), target.strip())
    if name == "cpu":
        return host_cpu_target()
    if name.startswith("{"):
        try:
            return tvm.target.Target(json.loads(name))
        except json.JSONDecodeError as err:
            raise ValueError(f"target: not valid JSON ({err}): {target!r}") from None
    try:
        return tvm.target.Target(name)
    except Exception as err:  # TVM raises its own error types
        raise ValueError(
            f"target: expected 'cpu', a TVM tag such as 'nvidia/nvidia-a100' or a JSON dict, "
            f"got {target!r} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def cuda_arch(target: tvm.target.Target) -> str:
    """``sm_80``-style arch of a CUDA target."""
    return str(target.attrs["arch"])


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


#: The name of the fused kernel's K/V loop variable (``definition.fused_attention``).
KV_LOOP_VAR = "kb"


def unmask_full_kv_tiles(loop_name: str = KV_LOOP_VAR):
    """A pass for after the software pipeline (run right before TVM's LoopPartition): K/V tiles
    that need no mask run without one, as FlashAttention-2's ``n_masking_steps`` loop does.

    The masks are the ``Select(visible, s, -inf)`` of ``definition._masked``; each term of
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
            terms = {}
            for cond, ranges in _mask_conditions(loop.body):
                relax = {**threads, **ranges}
                for term in _and_terms(cond):
                    if not _uses(term, kb):
                        continue
                    bound = deduce_bound(kb, term, {}, relax)
                    if bound.is_nothing() or not bound.min_value.same_as(neg_inf()) or bound.max_value.same_as(pos_inf()):
                        continue
                    terms[term] = bound.max_value + 1
            if not terms:
                return loop
            # the pipeline guards its statements by conditions on kb that hold for kb < E; proved
            # here while the bound is E (StmtSimplify could not from the split loops' bounds)
            with analyzer.constraint_scope(tirx.all(kb >= loop.min, kb < loop.min + E)):
                loop = _with_body(loop, _drop_proven_guards(loop.body, analyzer))
            everywhere, local = [], []  # terms that hold over the whole loop, and the others
            for term, u in terms.items():
                (everywhere if analyzer.can_prove(u >= E, ProofStrength.SYMBOLIC_BOUND) else local).append(term)
            body = _replace_terms(loop.body, everywhere)
            if not local:
                return _with_body(loop, body)
            cut = tirx.min(tirx.max(functools.reduce(tirx.min, [terms[t] for t in local]), 0), E)
            unmasked = _replace_terms(body, local)
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


def _drop_proven_guards(stmt, analyzer):
    """``stmt`` with each ``if`` whose condition ``analyzer`` proves replaced by its body."""
    if isinstance(stmt, tirx.IfThenElse) and analyzer.can_prove(stmt.condition):
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


def _and_terms(cond) -> list:
    if isinstance(cond, tirx.And):
        return _and_terms(cond.a) + _and_terms(cond.b)
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


def _is_mask(e) -> bool:
    """``Select(visible, s, -inf)``: a masked score (``definition._masked``)."""
    return (isinstance(e, tirx.Select) and isinstance(e.false_value, tirx.FloatImm)
            and e.false_value.value == float("-inf"))


def _mask_conditions(stmt, ranges=None) -> list:
    """(condition, {inner loop var: IntervalSet}) of every mask stored in ``stmt``."""
    from tvm.sym import IntervalSet

    ranges = ranges or {}
    found = []
    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            found += _mask_conditions(s, ranges)
    elif isinstance(stmt, tirx.For):
        inner = {**ranges, stmt.loop_var: IntervalSet(stmt.min, stmt.min + stmt.extent - 1)}
        found += _mask_conditions(stmt.body, inner)
    elif isinstance(stmt, tirx.AttrStmt):
        found += _mask_conditions(stmt.body, ranges)
    elif isinstance(stmt, tirx.IfThenElse):
        found += _mask_conditions(stmt.then_case, ranges)
        if stmt.else_case is not None:
            found += _mask_conditions(stmt.else_case, ranges)
    elif isinstance(stmt, tirx.BufferStore):
        stack = [stmt.value]
        while stack:
            e = stack.pop()
            if _is_mask(e):
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


_PIPELINE_LOCK = threading.RLock()


def _register_pipeline() -> str:
    """TVM's s_tir pipeline with K/V tiles that need no mask run without one
    (``unmask_full_kv_tiles``), every warp-scope buffer lowered (``lower_all_warp_memory``) and
    cp.async wait counts made constants (``constant_async_waits``)."""
    from tvm.s_tir import pipeline as s_pipeline
    from tvm.tirx import compilation_pipeline

    def factory():
        default, finalize_host, _ = s_pipeline.default_s_tir_pipeline()

        def pipeline(mod, ctx):
            # TVM's pipeline, with ``unmask_full_kv_tiles`` before its LoopPartition: TVM builds
            # the pass list inside its pipeline function, looking each pass up when it runs, so
            # the name is swapped for the run (under a lock: one run at a time per process)
            with _PIPELINE_LOCK:
                loop_partition = s_tir.transform.LoopPartition
                s_tir.transform.LoopPartition = lambda: tvm.ir.transform.Sequential(
                    [unmask_full_kv_tiles(), loop_partition()])
                try:
                    return default(mod)
                finally:
                    s_tir.transform.LoopPartition = loop_partition

        pipeline = tvm.transform.module_pass(pipeline, opt_level=0, name="tvmflash.STIRPipeline")

        def finalize_device():
            return tvm.ir.transform.Sequential(
                [constant_async_waits(), lower_all_warp_memory(), tirx.transform.StmtSimplify(),
                 tirx.transform.LowerIntrin()]
            )

        return pipeline, finalize_host, finalize_device

    compilation_pipeline.PIPELINE_MAP["tvmflash"] = factory
    return "tvmflash"


#: The tirx pipeline name for kernels with several mma fragment buffers.
TIR_PIPELINE = _register_pipeline()


def ensure_cuda_headers() -> None:
    """NVRTC needs the CUDA headers; TVM finds them through CUDA_PATH. When nvcc is a symlink
    (``/usr/local/bin/nvcc``) TVM's own search misses them, so point CUDA_PATH at the toolkit."""
    if os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME"):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.isdir(os.path.join(cand, "include")):
            os.environ["CUDA_PATH"] = cand
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(root, "include")):
            os.environ["CUDA_PATH"] = root


def tune_context(mod, target, space_generator, search_strategy, task_name: str, rand_state: int,
                 num_threads: int, logger) -> "ms.TuneContext":
    """``ms.TuneContext(...)`` without the import it starts with: TVM 0.27's constructor first
    imports ``tvm.s_tir.tensor_intrin``, registering the tensor intrinsics of every target
    (about a minute, once per process), which a CPU design space never uses. A design space
    that tensorizes registers its own intrinsics (``intrinsics.py``)."""
    from tvm.s_tir.meta_schedule import _ffi_api as ms_api
    from tvm.s_tir.meta_schedule.logging import get_logging_func

    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        ms_api.TuneContext, mod, target, space_generator, search_strategy, task_name, num_threads, rand_state,
        get_logging_func(logger),
    )
    ms_api.TuneContextInitialize(ctx)
    return ctx


# -- CUDA modules in an exported library (TVM 0.27, tvm-ffi 0.1) --
#
# TVM 0.27 generates CUDA source; a module of kind "cuda" holds (fmt, function table, code).
# Built where no CUDA driver is loaded, the module keeps fmt "cuda" and the source, and the
# runtime compiles it with the global function tvm_callback_cuda_compile (NVRTC by default)
# when the library is *loaded*; where a driver is loaded, that compile runs already at build
# time, for whatever arch Target.current() or the local GPU names. tvmflash builds every CUDA
# module the first way (TVM_COMPILE_FORCE_FALLBACK) and, to embed machine code, rewrites the
# module's record in the library binary to (fmt "fatbin" or "ptx", nvcc's output): the runtime
# loads such a record with cuModuleLoadData and calls no compiler.
#
# Library binary layout (tvm-ffi src/ffi/extra/library_module.cc): <nbytes: u64> <import tree:
# two vec<u64>> then per module <kind: str> [<payload: bytes> unless kind is "_lib"]; str, bytes
# and vec are a u64 count followed by the items. The "cuda" payload is <fmt: str> <function
# table> <code: bytes> (CUDA module SaveToBytes).

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


@contextlib.contextmanager
def cuda_source_modules():
    """Within: CUDA codegen keeps the source in the module (compiles nothing), GPU or not.
    An environment variable, so process-wide while it lasts: another thread building CUDA with
    TVM at that moment keeps its source too (its module still works; it compiles when loaded)."""
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous


def _u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def _with_len(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def parse_library_bin(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """(import tree bytes, [(kind, payload)]) of a library binary; payload None for "_lib"."""
    body = blob[8 : 8 + _u64(blob, 0)]
    offset = 0
    indptr_len = _u64(body, offset)
    offset += 8 + 8 * indptr_len
    offset += 8 + 8 * _u64(body, offset)  # child indices
    tree, modules = body[:offset], []
    for _ in range(indptr_len - 1):
        n = _u64(body, offset)
        kind = body[offset + 8 : offset + 8 + n].decode()
        offset += 8 + n
        payload = None
        if kind != "_lib":
            n = _u64(body, offset)
            payload = body[offset + 8 : offset + 8 + n]
            offset += 8 + n
        modules.append((kind, payload))
    if offset != len(body):
        raise RuntimeError(f"library binary: {len(body) - offset} bytes left after the last module")
    return tree, modules


def cuda_record(payload: bytes) -> tuple[str, bytes]:
    """(fmt, code) of a "cuda" module payload. The function table between them is not parsed:
    the code is found as the payload's tail, its length prefix checked against the size left."""
    n = _u64(payload, 0)
    fmt = payload[8 : 8 + n].decode()
    # the code is the last bytes field: scan for the length prefix that ends exactly at the tail
    for start in range(8 + n, len(payload) - 7):
        if _u64(payload, start) == len(payload) - start - 8:
            return fmt, payload[start + 8 :]
    raise RuntimeError("CUDA module record: no code field found")


def _replace_cuda_code(blob: bytes, source: str, fmt: str, code: bytes) -> bytes:
    tree, modules = parse_library_bin(blob)
    parts, replaced = [tree], 0
    for kind, payload in modules:
        parts.append(_with_len(kind.encode()))
        if payload is None:
            continue
        if kind == "cuda":
            n = _u64(payload, 0)
            tail = _with_len(source.encode())
            if payload[8 : 8 + n] != b"cuda" or not payload.endswith(tail):
                raise RuntimeError(
                    "CUDA module record: expected fmt 'cuda' and the generated source as its code "
                    f"(TVM {TVM_VERSION}); got fmt {payload[8:8 + n].decode()!r}"
                )
            payload = _with_len(fmt.encode()) + payload[8 + n : len(payload) - len(tail)] + _with_len(code)
            replaced += 1
        parts.append(_with_len(payload))
    if replaced != 1:
        raise RuntimeError(f"library binary: expected one CUDA module, found {replaced}")
    body = b"".join(parts)
    return _with_len(body)


def pack_imports_with_device_code(source: str, fmt: str, code: bytes):
    """An ``fpack_imports`` for ``Module.export_library``: the imports as TVM packs them, with the
    CUDA module's source replaced by ``code`` (``fmt`` 'fatbin' or 'ptx'), as a C file."""
    from tvm.runtime import _ffi_api as runtime_api

    def fpack_imports(mod, is_system_lib, symbol_prefix, workspace_dir):
        if is_system_lib:
            raise NotImplementedError("device code: a system-lib export keeps the CUDA source")
        blob = bytes(runtime_api.ModulePackImportsToTensor(mod).numpy())
        blob = _replace_cuda_code(blob, source, fmt, code)
        path = os.path.join(workspace_dir, "devc.c")
        with open(path, "w") as fh:
            fh.write('#ifdef __cplusplus\nextern "C" {\n#endif\n')
            fh.write(f'__attribute__((visibility("default"))) extern const unsigned char {LIBRARY_BIN_SYMBOL}[];\n')
            fh.write(f"const unsigned char {LIBRARY_BIN_SYMBOL}[{len(blob)}] = {{\n")
            for i in range(0, len(blob), 32):
                fh.write(",".join(str(b) for b in blob[i : i + 32]) + ",\n")
            fh.write('};\n#ifdef __cplusplus\n}\n#endif\n')
        return path

    return fpack_imports


def read_library_bin(so_path: str) -> bytes:
    """The library binary embedded in an exported module (reads the symbol; runs no TVM loader,
    so it works for a CUDA module on a machine without a GPU)."""
    import ctypes

    lib = ctypes.CDLL(os.path.abspath(so_path))
    try:
        start = ctypes.addressof(ctypes.c_uint8.in_dll(lib, LIBRARY_BIN_SYMBOL))
    except ValueError:
        raise ValueError(f"path: expected a TVM module with imports, {so_path} has no {LIBRARY_BIN_SYMBOL}") from None
    nbytes = ctypes.c_uint64.from_address(start).value
    return ctypes.string_at(start, 8 + nbytes)


def embedded_cuda_code(so_path: str) -> tuple[str, bytes]:
    """(fmt, code) of the CUDA module inside an exported library: ('cuda', source),
    ('fatbin', ...) or ('ptx', ...)."""
    _, modules = parse_library_bin(read_library_bin(so_path))
    for kind, payload in modules:
        if kind == "cuda":
            return cuda_record(payload)
    raise ValueError(f"path: expected a module with a CUDA import, {so_path} has {[k for k, _ in modules]}")


def lower_to_device(mod: tvm.IRModule, target: tvm.target.Target, pass_config: dict | None = None,
                    instruments=()) -> tvm.IRModule:
    """The scheduled ``mod`` taken through the tirx pipeline ``tvm.compile`` runs (``TIR_PIPELINE``),
    up to code generation: kernels split from the host code, shared memory merged and reused.
    This is the TIR the CUDA source is printed from (what ``tvm.tirx.build`` does before codegen)."""
    host = tvm.target.Target("llvm") if tvm.runtime.enabled("llvm") else tvm.target.Target("c")
    mod = tirx.transform.BindTarget(target.with_host(host))(mod)
    pipeline, _, _ = tirx.get_tir_pipeline(TIR_PIPELINE)
    with tvm.transform.PassContext(config=pass_config or {}, instruments=list(instruments)):
        return pipeline(mod)
