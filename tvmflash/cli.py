"""The ``tvmflash`` command: demo, build, tune, inspect, bench, explain, env."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .spec import DTYPES


def _spec_from_args(args, target: str):
    from .spec import KernelSpec

    return KernelSpec(
        head_dim=args.head_dim,
        dtype=args.dtype,
        causal=args.causal,
        group=args.gqa,
        algorithm=args.algorithm,
        target=target,
        shape=_parse_shape(getattr(args, "shape", None)),
        even=bool(getattr(args, "even", False)),
        softcap=bool(getattr(args, "softcap", False)),
        window=bool(getattr(args, "window", False)),
        alibi=bool(getattr(args, "alibi", False)),
        splits=int(getattr(args, "splits", 0) or 0),
        seqused_k=bool(getattr(args, "kv_lengths", False) or getattr(args, "paged", 0)),
        paged=int(getattr(args, "paged", 0) or 0),
        varlen=bool(getattr(args, "varlen", False)),
    )


def _dtype(text: str) -> str:
    """float16 / bfloat16 from any spelling ``KernelSpec`` accepts (fp16, half, bf16, ...)."""
    from .spec import canonical_dtype

    return canonical_dtype(text.strip().lower())


_DTYPE_HELP = "float16 (fp16, half) or bfloat16 (bf16); default float16"


def _parse_shape(text):
    """``B,SQ,SK,H`` -> (B, SQ, SK, H); None stays None."""
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        raise ValueError(f"--shape: expected BATCH,SEQLEN_Q,SEQLEN_K,HEADS (four ints), got {text!r}")
    return shape


def _add_spec_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The spec flags; ``defaults=False`` leaves them None when not given (so a command can tell)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    p.add_argument("--head-dim", type=int, default=d(128), help="head dimension (default 128)")
    p.add_argument("--dtype", type=_dtype, choices=DTYPES, default=d("float16"), help=_DTYPE_HELP)
    p.add_argument("--causal", action="store_true", default=d(False), help="causal mask (bottom-right aligned)")
    p.add_argument("--gqa", type=int, default=d(1), metavar="G", help="query heads per kv head (default 1)")
    p.add_argument("--algorithm", choices=("fused", "standard"), default=d("fused"))
    p.add_argument("--even", action="store_true", default=d(False),
                   help="the even build: lengths are multiples of the tile, no bound checks (what "
                        "attention() runs on a GPU where the lengths allow)")
    p.add_argument("--softcap", action="store_true", default=d(False),
                   help="logit soft-capping compiled in (the cap is a runtime argument, attention(softcap=...))")
    p.add_argument("--window", action="store_true", default=d(False),
                   help="a sliding window compiled in (its edges are runtime arguments, attention(window_size=...)); "
                        "with --causal the left edge only")
    p.add_argument("--alibi", action="store_true", default=d(False),
                   help="ALiBi compiled in (the slopes are a runtime argument, attention(alibi_slopes=...))")
    p.add_argument("--splits", type=int, default=d(0), metavar="N",
                   help="FlashDecoding: the keys split into N chunks combined by a second kernel (default 0: none; "
                        "what attention(num_splits=N) runs)")
    p.add_argument("--kv-lengths", action="store_true", default=d(False),
                   help="per-sequence key counts compiled in (a runtime (batch,) int32 tensor): the kernel of "
                        "attention_with_kvcache")
    p.add_argument("--paged", type=int, default=d(0), metavar="PAGE_SIZE",
                   help="a paged KV cache of PAGE_SIZE rows a page (with a runtime block table; implies "
                        "--kv-lengths): the kernel of attention_with_kvcache(block_table=...)")
    p.add_argument("--varlen", action="store_true", default=d(False),
                   help="packed variable-length sequences (runtime cu_seqlens_q/k prefix sums and longest lengths): "
                        "the kernel of attention_varlen")


def cmd_build(args) -> int:
    from .builder import build

    spec = _spec_from_args(args, args.target)
    t0 = time.perf_counter()
    so_path, json_path = build(spec, args.output, device_code=args.device_code, device_archs=args.device_archs)
    print(f"built {spec.key} for {spec.target} in {time.perf_counter() - t0:.1f} s")
    print(f"  module:   {so_path}")
    print(f"  manifest: {json_path}")
    with open(json_path) as fh:
        device = json.load(fh).get("device_code")
    if device:
        archs = f" for {', '.join(device['archs'])}" if "archs" in device else ""
        print(f"  device:   {device['form']}{archs}; loading needs {device['load_needs']}")
    cu = os.path.splitext(so_path)[0] + ".cu"
    if os.path.exists(cu):
        print(f"  cuda:     {cu}")
    with open(json_path) as fh:
        schedule = json.load(fh)["schedule"]
    if schedule.get("source") == "tuned record":
        print(f"  schedule: tuned record ({schedule['database']}, {schedule['run_ms']:.4g} ms when measured)")
    elif "tuning" in schedule:  # paths below the working directory, as the user typed them
        print(f"  schedule: {schedule['source']} ({schedule['tuning'].replace(os.getcwd() + os.sep, '')})")
    return 0


def cmd_tune(args) -> int:
    """MetaSchedule tuning of fused kernels, one variant after another in this process (TVM's
    CUDA intrinsics load once); the best record per tile goes to the logs."""
    from .tuning.space import parse_tiles

    for flag, value in (("--trials", args.trials), ("--seqlen", args.seqlen), ("--batch", args.batch),
                        ("--heads", args.heads), ("--trials-per-iter", args.trials_per_iter)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive int, got {value}")
    from .tuning import records

    specs = [_spec_from_args(argparse.Namespace(**{**vars(args), "head_dim": d, "causal": c}), target)
             for target in args.target for d in args.head_dim for c in _CAUSALS[args.causal]]
    tiles = parse_tiles(args.tiles) if args.tiles else None
    logs = records.logs_root() if args.logs_dir is None else args.logs_dir
    if logs is None:
        logs = "tuning_logs"
    schedules = records.schedules_root() if args.schedules_dir is None else args.schedules_dir
    if schedules is None:
        schedules = "schedules"
    status = 0
    for spec in specs:
        work_dir = args.work_dir or os.path.join("tvmflash-tune", spec.key)
        if args.work_dir and len(specs) > 1:
            work_dir = os.path.join(args.work_dir, spec.key)
        code = _tune_one(args, spec, tiles, work_dir, logs, schedules)
        if code == 130:
            return code
        status = status or code
    return status


#: --causal off | on | both -> the causal settings to run.
_CAUSALS = {"off": (False,), "on": (True,), "both": (False, True)}


def _tune_one(args, spec, tiles, work_dir, logs, schedules) -> int:
    from .tuning import TuneOptions, tune
    from .tuning.rank import rank_key
    from .tuning.space import default_shape

    shape = default_shape(spec, args.seqlen, args.batch, args.heads)
    print(f"tuning {spec.key} for {spec.target}: batch {shape.batch}, seqlen {shape.seq_q}, "
          f"{shape.heads}/{shape.heads_kv} heads, {args.trials} trials, work dir {work_dir}")
    t0 = time.perf_counter()
    try:
        options = TuneOptions(trials=args.trials, work_dir=work_dir, shape=shape, tiles=tiles, seed=args.seed,
                              rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, logs_dir=logs,
                              schedules_dir=schedules, trials_per_iter=args.trials_per_iter,
                              build_timeout=args.build_timeout, run_timeout=args.run_timeout,
                              progress=not args.no_progress)
        res = tune(spec, options)
    except KeyboardInterrupt:
        print(f"interrupted: the measured trials are in {work_dir}; run the same command again to resume",
              file=sys.stderr)
        return 130
    flops = shape.flops(spec)
    print(f"tuned {spec.key} in {time.perf_counter() - t0:.0f} s: {res.trials} trials in the work dir "
          f"({res.measured_now} new, {res.failed_now} of them failed)")
    best = res.best
    for t in sorted(res.tiles, key=rank_key):
        if t.config is None and t.record is None:
            print(f"  tile {t.tile[0]}x{t.tile[1]}: none ({t.why_not})")
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in (t.config or {}).items() if k not in ("block_m", "block_n"))
        mark = "   <- best" if t is best else ""
        at = ("  (as built: " + ", ".join(f"{n}: {secs * 1e3:.3f} ms" for n, secs in t.secs_at.items()) + ")"
              if len(t.secs_at) > 1 else "")
        print(f"  tile {t.tile[0]}x{t.tile[1]}: {t.run_secs * 1e3:8.4f} ms  {flops / t.run_secs / 1e12:8.4f} TFLOP/s  "
              f"{cfg}{mark}{at}")
    for tile, why in res.skipped_tiles.items():
        print(f"  tile {tile[0]}x{tile[1]}: skipped ({why})")
    if best is None:
        print("no candidate ran successfully: nothing exported (see failures.log in the work dir)")
        return 1
    print(f"  log:      {res.log_dir}")
    print(f"  schedule: {res.schedule_py}")
    return 0


def cmd_demo(args) -> int:
    """The main job on an embedded default: build the fused kernel for the A100 target and the
    CPU, run the CPU kernel on random inputs against the float64 reference."""
    import numpy as np

    from .builder import build
    from .definition import attention_reference
    from .runtime.kernel import load
    from .spec import KernelSpec, numpy_dtype

    out_dir = args.output
    print(f"tvmflash demo: fused attention, head_dim {args.head_dim}, {args.dtype}, causal={args.causal}")
    paths = {}
    for target in ("nvidia/nvidia-a100", "cpu"):
        spec = KernelSpec(head_dim=args.head_dim, dtype=args.dtype, causal=args.causal, target=target)
        t0 = time.perf_counter()
        paths[target] = build(spec, out_dir)
        print(f"  built {spec.key:<32} ({target}) in {time.perf_counter() - t0:5.1f} s -> {paths[target][0]}")
    cu = os.path.splitext(paths["nvidia/nvidia-a100"][0])[0] + ".cu"
    print(f"  manifest:    {paths['nvidia/nvidia-a100'][1]}")
    print(f"  CUDA source: {cu}")
    print(f"  inspect it:  tvmflash inspect {paths['nvidia/nvidia-a100'][0]} --cuda   (or --tir, --tir-before)")

    kernel = load(paths["cpu"][0])
    rng = np.random.default_rng(args.seed)
    b, sq, sk, h = 2, 257, 300, 4
    np_dtype = numpy_dtype(args.dtype)
    q = rng.standard_normal((b, sq, h, args.head_dim)).astype(np_dtype)
    k = rng.standard_normal((b, sk, h, args.head_dim)).astype(np_dtype)
    v = rng.standard_normal((b, sk, h, args.head_dim)).astype(np_dtype)
    t0 = time.perf_counter()
    out, lse = kernel(q, k, v, return_lse=True)
    dt = time.perf_counter() - t0
    ref, ref_lse = attention_reference(q, k, v, causal=args.causal)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    finite = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max())
    tol = 2e-2 if args.dtype == "bfloat16" else 4e-3
    ok = err <= tol and lse_err <= 1e-4
    print(f"  CPU kernel on q {q.shape}, k/v {k.shape}: {dt * 1e3:.1f} ms, max |out - ref| = {err:.2e} "
          f"(tolerance {tol:.0e}), max |lse - ref| = {lse_err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _resolve_artifact(ref: str) -> str:
    """A .so/.json path, a path without extension, or a key in the cache directory."""
    from .runtime.cache import cache_dir

    base = ref
    for ext in (".so", ".json", ".cu"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    if os.path.exists(base + ".json"):
        return base
    cached = os.path.join(cache_dir(), os.path.basename(base))
    if os.path.exists(cached + ".json"):
        return cached
    raise FileNotFoundError(f"PATH: {ref} does not exist (expected a built kernel's .so or .json, or the key of one "
                            f"in the cache {cache_dir()})")


def _inspected_artifact(args) -> str:
    """The artifact ``inspect`` reads: PATH, or the spec flags' kernel, built into the cache if
    needed (no GPU needed, nothing is loaded)."""
    given = [flag for flag, dest in _INSPECT_SPEC_FLAGS if getattr(args, dest, None) is not None]
    if args.path is not None:
        if given:
            raise ValueError(f"PATH: expected either a built kernel or spec flags, got {args.path!r} and {given}")
        return _resolve_artifact(args.path)
    from .runtime.cache import ensure_built

    return ensure_built(_inspected_spec(args))


def _inspected_spec(args) -> KernelSpec:
    """The spec of ``inspect``'s spec flags, each flag not given at its default."""
    for _, dest in _INSPECT_SPEC_FLAGS:
        if getattr(args, dest, None) is None:
            setattr(args, dest, _INSPECT_DEFAULTS[dest])
    return _spec_from_args(args, args.target)


_INSPECT_SPEC_FLAGS = [("--head-dim", "head_dim"), ("--dtype", "dtype"), ("--causal", "causal"), ("--gqa", "gqa"),
                       ("--algorithm", "algorithm"), ("--even", "even"), ("--softcap", "softcap"),
                       ("--window", "window"), ("--alibi", "alibi"), ("--splits", "splits"),
                       ("--kv-lengths", "kv_lengths"), ("--paged", "paged"), ("--varlen", "varlen"),
                       ("--target", "target")]
_INSPECT_DEFAULTS = dict(head_dim=128, dtype="float16", causal=False, gqa=1, algorithm="fused", even=False,
                         softcap=False, window=False, alibi=False, splits=0, kv_lengths=False, paged=0,
                         varlen=False, target="nvidia/nvidia-a100")


def cmd_inspect(args) -> int:
    if args.derivation:
        return _inspect_derivation(args)
    base = _inspected_artifact(args)
    with open(base + ".json") as fh:
        manifest = json.load(fh)
    if args.ptx:
        from .runtime.kernel import manifest_ptx

        print(manifest_ptx(manifest, args.arch, what="--ptx"))
        return 0
    if args.resources:
        from .compiler.nvcc import format_resources
        from .runtime.kernel import manifest_resources

        table, origin = manifest_resources(manifest, args.arch, what="--resources")
        print(f"{manifest['key']}: {origin}")
        print(format_resources(table))
        print("static smem: ptxas' figure; dynamic shared memory (shared.dyn) is a launch argument")
        return 0
    if args.cuda:
        print(manifest.get("source", ""))
    elif args.tir:
        print(manifest["tir"]["after"])
    elif args.tir_before:
        print(manifest["tir"]["before"])
    else:
        shown = {k: v for k, v in manifest.items() if k not in ("tir", "source")}
        print(json.dumps(shown, indent=1))
    return 0


def _inspect_derivation(args) -> int:
    """``inspect --derivation``: from the spec flags (a built kernel holds only the last step)."""
    if args.path is not None:
        raise ValueError(f"PATH: --derivation derives from the spec flags, not a built kernel (got {args.path!r})")
    spec = _inspected_spec(args)
    if spec.algorithm != "fused":
        raise ValueError(f"--algorithm: --derivation shows the fused kernel's derivation, got {spec.algorithm!r}")
    from .builder.lower import lower
    from .compiler.derive import derivation_steps

    low = lower(spec)
    tile = tuple(low.config.get(k) for k in ("block_m", "block_n"))
    steps = derivation_steps(spec, *tile)
    steps.append((f"4. Scheduled for {spec.target} by rule {low.rule} ({low.tuning.get('source', 'hand config')})",
                  low.mod.script()))
    for title, text in steps:
        print(f"=== {title} ===")
        print(text)
        print()
    return 0


def cmd_bench(args) -> int:
    from .analysis.bench import bench, print_table

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("tvmflash bench: needs a CUDA GPU and PyTorch with CUDA (found: "
              f"{'no torch' if torch is None else 'torch ' + torch.__version__ + ', no GPU'})", file=sys.stderr)
        return 2
    if args.models is not None:
        from .analysis.bench import bench_models, print_model_table

        rows = bench_models(models=args.models or None, seqlens=args.model_seqlens, dtype=args.dtype or "bfloat16",
                            reps=args.reps, flex=args.flex)
        print()
        print_model_table(rows)
        return 0
    if args.decode:
        from .analysis.bench import bench_decode, print_decode_table

        head_dim = args.head_dims[0] if len(args.head_dims) == 1 else 128
        rows, methods = bench_decode(head_dim=head_dim, dtype=args.dtype or "float16", reps=args.reps)
        print()
        print_decode_table(rows, methods)
        return 0
    if args.varlen:
        from .analysis.bench import bench_varlen, print_varlen_table

        head_dim = args.head_dims[0] if len(args.head_dims) == 1 else 128
        rows, methods = bench_varlen(head_dim=head_dim, heads=args.heads, dtype=args.dtype or "float16",
                                     causals=_CAUSALS[args.causal], reps=args.reps)
        print()
        print_varlen_table(rows, methods)
        return 0
    if args.memory:
        from .analysis.bench import peak_memory, print_memory_table

        rows = peak_memory(seqlens=args.seqlens, head_dim=args.head_dims[0], heads=args.heads,
                           dtype=args.dtype or "float16")
        print()
        print_memory_table(rows)
        return 0

    rows, methods = bench(
        head_dims=args.head_dims, seqlens=args.seqlens, causals=_CAUSALS[args.causal], heads=args.heads,
        tokens=args.tokens, dtype=args.dtype or "float16", methods=args.methods, reps=args.reps, window=args.window,
        group=args.gqa,
    )
    print()
    print_table(rows, methods)
    if args.json:
        from .analysis.bench import write_json

        write_json(args.json, rows, methods, dtype=args.dtype or "float16", heads=args.heads, tokens=args.tokens,
                   reps=args.reps)
        print(f"rows written to {args.json} (read by: tvmflash explain --bench {args.json})")
    return 0


def cmd_explain(args) -> int:
    from .analysis.roofline import explain, get_gpu, plot
    from .spec import KernelSpec

    spec = KernelSpec(head_dim=args.head_dim, dtype=args.dtype, causal=args.causal, group=args.gqa)
    gpu = get_gpu(args.gpu, bandwidth_tbs=args.bandwidth_tbs, peak_tflops=args.peak_tflops)
    report = explain(spec, args.seqlen, batch=args.batch, heads=args.heads, tokens=args.tokens, gpu=gpu,
                     bench=args.bench, registers=not args.no_ptxas)
    print(report.table())
    if not args.no_plot:
        path = args.output or os.path.join("tvmflash-out", f"explain_{report.spec.key}_n{args.seqlen}.png")
        try:
            print(f"\npicture: {plot(report, path)}")
        except ImportError as err:
            print(f"tvmflash explain: no picture: {err}", file=sys.stderr)
    return 0


def cmd_env(args) -> int:
    from . import _compat

    from .version import __version__

    print(f"tvmflash   {__version__}")
    print(f"python     {sys.version.split()[0]}")
    print(f"tvm        {_compat.TVM_VERSION}")
    print(f"tvm-ffi    {_compat.TVM_FFI_VERSION}")
    from .runtime.cache import cache_dir

    print(f"cache      {cache_dir()}")
    from .compiler import nvcc

    tool = nvcc.find_nvcc()
    print(f"nvcc       {tool} ({nvcc.nvcc_version(tool)})" if tool else
          "nvcc       not found: CUDA builds embed the source (NVRTC compiles it when loaded)")
    try:
        import torch

        print(f"torch      {torch.__version__}")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cc = torch.cuda.get_device_capability(i)
                print(f"gpu {i}      {torch.cuda.get_device_name(i)} (sm_{cc[0]}{cc[1]}), CUDA {torch.version.cuda}")
        else:
            print("gpu        none visible to torch")
    except ImportError:
        print("torch      not installed")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvmflash", description="FlashAttention built the TVM way.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build for the A100 target and the CPU, check the CPU kernel (no GPU needed)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", type=_dtype, choices=DTYPES, default="float16", help=_DTYPE_HELP)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="tvmflash-out", help="output directory (default ./tvmflash-out)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="compile one kernel to DIR/<key>.so + DIR/<key>.json")
    p.add_argument("--target", default="nvidia/nvidia-a100",
                   help="cpu | nvidia/nvidia-a100 | nvidia/nvidia-h100 | a target JSON (default nvidia/nvidia-a100)")
    _add_spec_flags(p)
    p.add_argument("--shape", default=None, metavar="B,SQ,SK,H",
                   help="compile for this shape only (batch, seqlen_q, seqlen_k, heads): bound checks and index "
                        "arithmetic fold away; default: one kernel for every shape")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--device-code", choices=("auto", "fatbin", "ptx", "source"), default="auto",
                   help="CUDA: embed an nvcc fatbin (loads with the driver alone), PTX (the driver JIT-compiles "
                        "it) or the source (NVRTC compiles it when loaded); auto: fatbin if nvcc is found, else source")
    p.add_argument("--device-archs", default=None, metavar="SM,...",
                   help="archs of the fatbin, e.g. sm_80,sm_90 (default: the target's, plus sm_90 below it)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("tune", help="MetaSchedule auto-tuning of fused kernels (logs used by build)")
    p.add_argument("--target", nargs="+", default=["nvidia/nvidia-a100"],
                   help="cpu | nvidia/nvidia-a100 | nvidia/nvidia-h100 | a target JSON (default nvidia/nvidia-a100); "
                        "several: each in turn")
    p.add_argument("--head-dim", type=int, nargs="+", default=[128], help="head dimension(s) (default 128)")
    p.add_argument("--dtype", type=_dtype, choices=DTYPES, default="float16", help=_DTYPE_HELP)
    p.add_argument("--causal", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="causal mask (bottom-right aligned); 'both': the non-causal and the causal variant")
    p.add_argument("--gqa", type=int, default=1, metavar="G", help="query heads per kv head (default 1)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="measured sequence length (default 4096 on GPUs, 256 on the CPU)")
    p.add_argument("--batch", type=int, default=None, help="measured batch (default 16384 tokens / seqlen on GPUs, "
                   "1024 / seqlen on the CPU)")
    p.add_argument("--heads", type=int, default=None, help="measured query heads (default 16 on GPUs, 4 on the CPU)")
    p.add_argument("--trials", type=int, default=64, help="measured candidates in total, earlier runs in the work "
                   "dir included (default 64)")
    p.add_argument("--trials-per-iter", type=int, default=None, help="candidates per measurement batch")
    p.add_argument("--tiles", default=None, help="BLOCK_MxBLOCK_N[,...]: tune only these tiles (default: all "
                   "candidates of the schedule)")
    p.add_argument("--work-dir", default=None, help="MetaSchedule work dir: JSON database and logs; a rerun "
                   "resumes from it (default tvmflash-tune/<key>; several variants: <work-dir>/<key> each)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on a device of this RPC tracker")
    p.add_argument("--rpc-key", default=None, help="the RPC tracker's device key")
    p.add_argument("--logs-dir", default=None, help="where the pruned database goes (default the checkout's "
                   "tuning_logs/, or $TVMFLASH_TUNING_LOGS)")
    p.add_argument("--schedules-dir", default=None, help="where the best schedule goes as Python (default the "
                   "checkout's schedules/)")
    p.add_argument("--build-timeout", type=float, default=120.0, help="seconds per candidate build (default 120)")
    p.add_argument("--run-timeout", type=float, default=30.0, help="seconds per candidate run (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune, algorithm="fused")

    p = sub.add_parser("inspect", help="print a built kernel's CUDA, PTX, ptxas resources, TensorIR or manifest")
    p.add_argument("path", nargs="?", default=None,
                   help="a built .so/.json, or a key in the cache directory; without it, the kernel of the spec "
                        "flags below, built into the cache if needed")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuda", action="store_true", help="the generated CUDA C (LLVM IR for a CPU kernel)")
    g.add_argument("--ptx", action="store_true", help="PTX of the CUDA source (nvcc -ptx) for the target's arch")
    g.add_argument("--resources", action="store_true",
                   help="registers, spills, stack, static shared memory per arch (ptxas -v)")
    g.add_argument("--tir", action="store_true", help="the TensorIR after scheduling")
    g.add_argument("--tir-before", action="store_true", help="the TensorIR before scheduling")
    g.add_argument("--derivation", action="store_true",
                   help="the spec flags' kernel derived step by step: Algorithm 0, the chain and its repair, the "
                        "rolling update, the schedule for the target")
    p.add_argument("--arch", default=None, metavar="SM[,SM]",
                   help="--ptx: the arch (default the target's); --resources: archs (default sm_80,sm_90 or the target's)")
    p.add_argument("--target", default=None, help="spec flag (default nvidia/nvidia-a100)")
    _add_spec_flags(p, defaults=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="TFLOP/s of tvmflash and PyTorch SDPA on the GPU (prints a table)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--causal", choices=("off", "on", "both"), default="both")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--gqa", type=int, default=1, metavar="G", help="query heads per kv head (default 1)")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen (default 16384)")
    p.add_argument("--dtype", type=_dtype, choices=DTYPES, default=None,
                   help="float16 (fp16, half) or bfloat16 (bf16); default float16, bfloat16 for --models")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of: 'tvmflash fused' 'tvmflash fused general' 'tvmflash fused hand' (the hand "
                        "config, tuning logs off) 'tvmflash fused static' 'tvmflash standard' 'tvmflash fused softcap' "
                        "(softcap=50) 'tvmflash fused window' (window_size=(W, W), causal (W, 0)) "
                        "'tvmflash fused alibi' 'sdpa flash' 'sdpa cudnn'")
    p.add_argument("--window", type=int, default=4096, metavar="W",
                   help="the window edge W of the 'tvmflash fused window' method (default 4096)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="also write the measured rows to PATH (for tvmflash explain --bench)")
    p.add_argument("--decode", action="store_true",
                   help="instead: decode (1 and 16 new tokens over a 4k-32k KV cache, 32 q / 8 kv heads, head dim "
                        "128 or the one --head-dims gives) in us and TB/s against SDPA flash and cuDNN")
    p.add_argument("--varlen", action="store_true",
                   help="instead: packed variable-length prefill (attention_varlen) against the batch padded to its "
                        "longest sequence (tvmflash, SDPA flash, cuDNN) and SDPA once per sequence")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak GPU memory of fused vs standard per --seqlens (batch 1, the first --head-dims)")
    p.add_argument("--models", nargs="*", default=None, metavar="MODEL",
                   help="instead: real models' causal prefill attention (default all: Llama-3-8B Qwen2-7B Mistral-7B "
                        "Gemma-2-9B Phi-3-mini GPT-2) against SDPA flash, cuDNN and compiled FlexAttention")
    p.add_argument("--model-seqlens", type=int, nargs="+", default=[2048, 8192], help="--models: prefill lengths")
    p.add_argument("--flex", choices=("variants", "all", "none"), default="variants",
                   help="--models: the rows FlexAttention runs (default: those with a softcap or a window)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("explain", help="why the fused kernel is fast: HBM traffic, FLOPs and roofline from the "
                                       "TensorIR, against the standard algorithm (table + PNG, no GPU needed)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--dtype", type=_dtype, choices=DTYPES, default="float16", help=_DTYPE_HELP)
    p.add_argument("--causal", action="store_true", help="causal mask (bottom-right aligned)")
    p.add_argument("--gqa", type=int, default=1, metavar="G", help="query heads per kv head (default 1)")
    p.add_argument("--seqlen", type=int, default=4096, help="query and key length (default 4096)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: tokens // seqlen)")
    p.add_argument("--heads", type=int, default=16, help="query heads (default 16)")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen when --batch is not given (default 16384)")
    p.add_argument("--gpu", choices=("a100", "h100", "h200"), default="a100",
                   help="roofline figures and CUDA target (default a100: nvidia/nvidia-a100, the default target of "
                        "every command)")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="HBM bandwidth in TB/s (overrides the GPU's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="fp16 dense tensor-core peak in TFLOP/s (overrides the GPU's)")
    p.add_argument("--bench", metavar="PATH", default=None,
                   help="measured times from `tvmflash bench --json PATH`, placed on the roofline")
    p.add_argument("--no-ptxas", action="store_true", help="skip the registers count (nvcc -Xptxas -v)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("-o", "--output", default=None,
                   help="PNG path (default tvmflash-out/explain_<key>_n<seqlen>.png)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("env", help="versions, GPU, cache directory")
    p.set_defaults(func=cmd_env)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            raise
        print(f"tvmflash {args.command}: error: {err}", file=sys.stderr)
        return 2


def run() -> int:
    """The console script: ``main``, quiet when a reader of its output stops early
    (``tvmflash inspect ... | head``)."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python would report the closed pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(run())
