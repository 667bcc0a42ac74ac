"""Measuring candidates as ``build`` ships them: compile, export, arguments, run.

The functions here run in MetaSchedule's builder and runner worker processes (``LocalBuilder``,
``LocalRunner``, ``RPCRunner``), so they import nothing of tvmflash at module level beyond what
the workers need. A candidate is compiled by the one compile path (``compiler.compile_module``)
with its rule's pass config, and exported with the device code ``build`` embeds: nvcc's fatbin
where ``build`` would embed one (``export_candidate``), so the machine code timed is the machine
code shipped. After the search, ``deployed_times`` times the best records as ``build`` makes
them: replayed on the any-shape definition (or the even one where the lengths allow, as
``attention`` picks it), each with the pass config of that build (``deployed_module``).
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
from functools import partial

import numpy as np

from .. import _compat
from .._compat import ms, tvm
from ..compiler import compile_module, nvcc
from ..compiler import device_code as DC
from ..rules import rule_for
from ..spec import KernelSpec, numpy_dtype
from . import records
from .space import Shape, variant_args, variant_values

# -- build (in the builder's workers) ---------------------------------------------------------


def build_candidate(mod, target, _params=None, pass_config=None):
    """``LocalBuilder``'s f_build: ``compiler.compile_module`` with the rule's pass config."""
    return compile_module(mod, target, pass_config).mod


def candidate_device_code(spec: KernelSpec) -> tuple[str, tuple[str, ...]]:
    """(form, archs) of the device code that ``build`` embeds for ``spec`` by default, which
    candidates are measured with: ('fatbin', the target's archs) where nvcc is found, else
    ('source', ()) (NVRTC compiles it where it is loaded, as it would ``build``'s module)."""
    form = DC.device_code_form(spec, "auto", None) if spec.is_cuda else "host"
    if form != "fatbin":
        return form, ()
    return form, nvcc.default_archs(_compat.cuda_arch(spec.tvm_target))


def export_candidate(mod, form: str = "source", archs: tuple[str, ...] = ()) -> str:
    """``LocalBuilder``'s f_export: a tar of the candidate (MetaSchedule's default), its CUDA
    source replaced by nvcc's fatbin for ``archs`` when ``form`` is 'fatbin', compiled with
    ``build``'s flags. Candidates are then measured as the machine code ``build`` ships (NVRTC's
    code for the same source can run slower and rank configs differently)."""
    from tvm.support.tar import tar

    pack = None
    if form == "fatbin":
        source = next((m.inspect_source() for m in mod.imports if m.kind == "cuda"), None)
        if source is not None:
            code, _ = nvcc.compile_source(source, "fatbin", archs, ptx_arch=archs[0])
            pack = DC.pack_imports_with_device_code(source, "fatbin", code)
    elif form not in ("source", "host"):
        raise ValueError(f"form: expected 'fatbin', 'source' or 'host', got {form!r}")
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod." + tar.output_format)
    mod.export_library(path, fcompile=tar, fpack_imports=pack)
    return path


def candidate_build(spec: KernelSpec):
    """The builder's f_build for ``spec``'s candidates: ``build_candidate`` with the pass config of
    ``spec``'s rule for that very build (even or any-length)."""
    return partial(build_candidate, pass_config=dict(rule_for(spec).pass_config(spec)))


def make_builder(spec: KernelSpec, max_workers: int, timeout: float):
    """The ``LocalBuilder`` of ``spec``'s candidates: compiled by ``candidate_build``, exported as
    ``build`` exports it."""
    form, archs = candidate_device_code(spec)
    return ms.builder.LocalBuilder(
        max_workers=max_workers, timeout_sec=timeout, initializer=build_worker_init,
        f_build=candidate_build(spec), f_export=partial(export_candidate, form=form, archs=archs))


FRAGMENT_INDEX_MAP = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def build_worker_init() -> None:
    """Each build worker: register the fragment layout that CUDA codegen looks up by name when it
    lowers the mma store intrinsic. TVM registers it when its intrinsics module is imported
    (slow, and LocalBuilder starts new workers every batch); the workers only compile
    already tensorized modules and never import that module, so the registrations cannot clash."""
    import tvm_ffi

    if tvm_ffi.get_global_func(FRAGMENT_INDEX_MAP, allow_missing=True) is not None:
        return

    def index_map(ind):
        return tvm.runtime.convert(list(fragment_lane_register(ind[0], ind[1])))

    tvm_ffi.register_global_func(FRAGMENT_INDEX_MAP, index_map)


def fragment_lane_register(i, j):
    """(lane, register) holding element (i, j) of a 16x16 m16n8k16 accumulator / ldmatrix
    fragment (PTX ISA)."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


# -- run (in the runner's workers) --------------------------------------------------------------

_HOST_ARRAYS: dict = {}  # per runner worker: the same inputs for every candidate


def host_array(index: int, dtype: str, shape) -> np.ndarray:
    """The ``index``-th argument's values: normal random numbers (no inf/NaN/denormal in the
    timing, unlike random bits), the same for every candidate of a worker."""
    key = (index, dtype, tuple(shape))
    if key not in _HOST_ARRAYS:
        rng = np.random.default_rng(index)
        _HOST_ARRAYS[key] = rng.standard_normal(shape, dtype="float32").astype(numpy_dtype(dtype))
    return _HOST_ARRAYS[key]


def _arrays(args_info, alloc_repeat: int, make):
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for index, (kind, dtype, shape) in enumerate(args_info):
            if kind != "TENSOR":
                raise NotImplementedError(f"argument: expected a tensor, got {kind}")
            args.append(make(host_array(index, dtype, shape)))
        repeated.append(args)
    return repeated


def alloc_arguments(device, args_info, alloc_repeat):
    return _arrays(args_info, alloc_repeat, lambda a: tvm.runtime.tensor(a, device))


def alloc_arguments_rpc(session, device, args_info, alloc_repeat):
    return _arrays(args_info, alloc_repeat, lambda a: tvm.runtime.tensor(a, device))


def run_evaluator(rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def run_evaluator_rpc(session, rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker: expected HOST:PORT such as 127.0.0.1:9190, got {text!r}")
    return host, int(port)


#: What a runner's error says where the runner could not be reached (``create_session``).
UNREACHABLE = "tvmflash: the runner could not be reached"


def unreachable(error_msg) -> bool:
    """Whether a runner result's error says the candidate was never run (no measurement)."""
    return bool(error_msg) and UNREACHABLE in str(error_msg)


def create_session(rpc_config):
    """``RPCRunner``'s session: MetaSchedule's, its failure marked as ``UNREACHABLE``."""
    try:
        return rpc_config.connect_server()
    except Exception as err:  # noqa: BLE001 - any failure to connect: nothing was measured
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        host, port = rpc_config.tracker_host, rpc_config.tracker_port
        raise RuntimeError(f"{UNREACHABLE} (RPC tracker {host}:{port}, key {rpc_config.tracker_key!r}: "
                           f"{lines[0].rstrip(':') if lines else type(err).__name__}; check it with python3 -m "
                           f"tvm.exec.query_rpc_tracker --host {host} --port {port})") from None


def make_runner(spec: KernelSpec, rpc_tracker: str | None, rpc_key: str | None, timeout: float):
    """This machine's ``LocalRunner``, or an ``RPCRunner`` through the tracker."""
    evaluator = ms.runner.EvaluatorConfig(
        number=3 if spec.is_cuda else 2, repeat=3 if spec.is_cuda else 2,
        min_repeat_ms=100 if spec.is_cuda else 20, enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator,
                                     f_alloc_argument=alloc_arguments, f_run_evaluator=run_evaluator)
    host, port = parse_tracker(rpc_tracker)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                       session_timeout_sec=int(math.ceil(timeout))),
        evaluator_config=evaluator, f_create_session=create_session, f_alloc_argument=alloc_arguments_rpc,
        f_run_evaluator=run_evaluator_rpc)


def can_run_here(spec: KernelSpec) -> bool:
    return tvm.cuda(0).exist if spec.is_cuda else True


# -- the kernels build makes of a record ----------------------------------------------------------


def deployed_module(spec: KernelSpec, tile, trace) -> tuple[tvm.IRModule, dict]:
    """(the scheduled module, its pass config) that ``build`` makes of ``trace`` for ``spec``
    (any-length or even): the trace replayed on the rule's definition at ``tile``, checked as
    ``build`` checks a log's trace."""
    rule = rule_for(spec)
    sch = records.replay(rule, spec, trace, rule.definition(spec, tuple(tile)), f"a record of tile {tile}")
    return sch.mod, dict(rule.pass_config(spec))


def deployed_times(spec: KernelSpec, shapes: list[Shape], candidates: list, build_timeout: float = 120.0,
                   reps: int = 10) -> list[list[float]]:
    """Seconds per call of each (tile, record)'s kernel as ``build`` compiles it, at each shape:
    the build ``attention`` picks at the shape's lengths (``rule.build_at``: the even one where
    they are tile multiples), its module and pass config from ``deployed_module``, exported as
    ``build`` exports it. Compiled in parallel, one builder per build kind; at each shape timed in
    turn (``reps`` rounds of one ``time_evaluator`` sample each) so that clock drift is shared. A
    candidate that fails to build or run gets ``records.FAILED_RUN``."""
    rule = rule_for(spec)

    def build_of(tile, shape) -> KernelSpec:
        return rule.build_at(spec, tile, shape.seq_q, shape.seq_k)

    keys = sorted({(i, build_of(tile, sh).even) for i, (tile, _) in enumerate(candidates) for sh in shapes})
    loaded = {}
    for is_even in sorted({e for _, e in keys}):
        variant = spec.replace(even=is_even)
        group = [key for key in keys if key[1] == is_even]
        mods = [deployed_module(variant, candidates[i][0], candidates[i][1].trace)[0] for i, _ in group]
        builder = make_builder(variant, max(1, min(len(mods), os.cpu_count() or 1)), build_timeout)
        results = builder.build([ms.builder.BuilderInput(m, spec.tvm_target) for m in mods])
        for key, res in zip(group, results):
            if res.error_msg is None:
                try:
                    loaded[key] = tvm.runtime.load_module(res.artifact_path)
                except Exception:  # noqa: BLE001 - ranked last
                    pass
    dev = tvm.cuda(0) if spec.is_cuda else tvm.cpu()
    out = [[records.FAILED_RUN] * len(shapes) for _ in candidates]
    for s_idx, shape in enumerate(shapes):
        b, sq, sk, h, d = shape.batch, shape.seq_q, shape.seq_k, shape.heads, spec.head_dim
        # q, k, v as the runner measured the workload with (``host_array``)
        args = [tvm.runtime.tensor(host_array(i, spec.dtype, s), dev)
                for i, s in enumerate(((b, sq, h, d), (b, sk, shape.heads_kv, d), (b, sk, shape.heads_kv, d)))]
        inputs, scalars = variant_args(spec, variant_values(spec, b, h), dev)
        args += [tvm.runtime.empty((b, sq, h, d), spec.dtype, dev), tvm.runtime.empty((b, h, sq), "float32", dev),
                 *inputs, d**-0.5, *scalars]
        timers, samples = {}, {}
        for i, (tile, _) in enumerate(candidates):
            mod = loaded.get((i, build_of(tile, shape).even))
            if mod is None:
                continue
            try:
                f = mod.time_evaluator("main", dev, number=5, repeat=1)
                f(*args)  # warm up
                timers[i], samples[i] = f, []
            except Exception:  # noqa: BLE001 - ranked last
                pass
        for _ in range(reps):
            for i, f in timers.items():
                samples[i].append(f(*args).mean)
        for i in samples:
            out[i][s_idx] = float(np.median(samples[i]))
        del args
    return out


def device_description(spec: KernelSpec, rpc_tracker: str | None) -> str:
    """What the candidates ran on: the GPU name and compute capability, or the CPU model."""
    if spec.is_cuda and rpc_tracker is None:
        dev = tvm.cuda(0)
        if dev.exist:
            return f"{dev.device_name} (sm_{dev.compute_version.replace('.', '')})"
        return "unknown CUDA device"
    if rpc_tracker is not None:
        return f"RPC device via tracker {rpc_tracker}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mcpu = spec.tvm_target.attrs.get("mcpu", "")
    return f"{model} ({mcpu}, {os.cpu_count()} cores)"


def measured_code(spec: KernelSpec) -> dict | str:
    """tuning.json's ``device_code``: the machine code the candidates were measured as."""
    form, archs = candidate_device_code(spec)
    if form != "fatbin":
        return {"source": "NVRTC where measured", "host": "LLVM"}.get(form, form)
    return {"form": form, "archs": list(archs), "nvcc": nvcc.nvcc_version(nvcc.require_nvcc("tuning")),
            "flags": list(nvcc.FLAGS)}
