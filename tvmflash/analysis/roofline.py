"""``tvmflash explain``: why the fused kernel is fast, counted from its own TensorIR.

FlashAttention's argument (Dao et al. 2022, section 3.2) is about memory traffic. The standard
algorithm writes the scores S and the probabilities P, N x N per head, to HBM and reads them
back: Theta(N d + N^2) bytes. The fused kernel keeps them on chip and re-reads only K and V, once
per query tile: Theta(N^2 d^2 / M) with M the on-chip memory. This module shows it for tvmflash's
kernels, for one spec and sequence length:

1. the bytes each kernel reads from and writes to global memory and its FLOPs, for the standard
   functions (qk, softmax, pv) and the fused kernel, counted from the TensorIR by
   ``traffic.count`` (its docstring gives the rules);
2. what the fused kernel keeps on chip per thread block: shared memory from the allocations of the
   lowered TIR (after TVM merges and reuses them), registers per thread from ``ptxas -v``;
3. each kernel's arithmetic intensity and roofline bound on a GPU (HBM bandwidth and fp16 dense
   tensor-core peak; A100, H100 and H200 built in, both overridable), and times measured by
   ``tvmflash bench --json`` on the same roofline;
4. ``plot``: traffic and peak memory against sequence length, and the roofline, as a PNG.

Shapes follow FlashAttention's benchmark: 16 heads, batch * seqlen = 16k tokens, seqlen_q = seqlen_k.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .. import _compat
from .. import definition as D
from ..builder import compile_lowered, lower
from ..compiler import device_source, lower_to_device, nvcc
from ..spec import KernelSpec
from . import traffic

DEFAULT_SWEEP = (512, 1024, 2048, 4096, 8192, 16384)
STANDARD_FUNCTIONS = (D.STD_QK, D.STD_SOFTMAX, D.STD_PV)
BENCH_FUSED = "tvmflash fused"  # method names of ``tvmflash bench``
BENCH_STANDARD = "tvmflash standard"


@dataclass(frozen=True)
class GPU:
    """Datasheet figures of one GPU (dense math, no sparsity)."""

    name: str
    target: str  # the TVM target the kernels are lowered for
    bandwidth_tbs: float  # HBM bandwidth, TB/s (1e12 bytes/s)
    peak_tflops: float  # fp16/bf16 dense tensor-core peak, TFLOP/s
    memory_gb: float  # HBM capacity, GB (1e9 bytes)

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the memory and compute bounds meet."""
        return self.peak_tflops / self.bandwidth_tbs


GPUS = {
    "a100": GPU("A100 SXM4 80GB", "nvidia/nvidia-a100", bandwidth_tbs=2.039, peak_tflops=312.0, memory_gb=80.0),
    "h100": GPU("H100 SXM5 80GB", "nvidia/nvidia-h100", bandwidth_tbs=3.35, peak_tflops=989.4, memory_gb=80.0),
    # the H100's chip (sm_90, TVM has no tag of its own) with HBM3e: the same compute ceiling, a
    # 1.4x higher memory one
    "h200": GPU("H200 SXM 141GB", "nvidia/nvidia-h100", bandwidth_tbs=4.8, peak_tflops=989.4, memory_gb=141.0),
}


def get_gpu(name: str = "a100", bandwidth_tbs: float | None = None, peak_tflops: float | None = None) -> GPU:
    """A built-in GPU, with its bandwidth or peak replaced where given."""
    if name not in GPUS:
        raise ValueError(f"gpu: expected one of {sorted(GPUS)}, got {name!r}")
    gpu = GPUS[name]
    for arg, value in (("bandwidth_tbs", bandwidth_tbs), ("peak_tflops", peak_tflops)):
        if value is not None and not value > 0:
            raise ValueError(f"{arg}: expected a positive number, got {value!r}")
    changes = {k: v for k, v in (("bandwidth_tbs", bandwidth_tbs), ("peak_tflops", peak_tflops)) if v is not None}
    if changes:
        gpu = dataclasses.replace(gpu, name=gpu.name + " (user figures)", **changes)
    return gpu


@dataclass(frozen=True)
class Point:
    """A kernel, or the sum of several, on a GPU's roofline."""

    label: str
    flops: int
    moved: int  # bytes read + written
    measured_ms: float | None = None

    @property
    def intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.moved if self.moved else float("inf")

    def memory_ms(self, gpu: GPU) -> float:
        return self.moved / (gpu.bandwidth_tbs * 1e12) * 1e3

    def compute_ms(self, gpu: GPU) -> float:
        return self.flops / (gpu.peak_tflops * 1e12) * 1e3

    def bound_ms(self, gpu: GPU) -> float:
        """The least time the roofline allows: the larger of the two."""
        return max(self.memory_ms(gpu), self.compute_ms(gpu))

    def limit(self, gpu: GPU) -> str:
        return "memory" if self.memory_ms(gpu) >= self.compute_ms(gpu) else "compute"

    @property
    def measured_tflops(self) -> float | None:
        return None if self.measured_ms is None else self.flops / (self.measured_ms * 1e-3) / 1e12


@dataclass(frozen=True)
class SweepPoint:
    """Totals at one sequence length (for the plot)."""

    seqlen: int
    batch: int
    standard_moved: int
    fused_moved: int
    fused_minimum: int  # every element once: K/V re-reads all served by a cache
    standard_memory: int  # bytes of the buffers the algorithm allocates
    fused_memory: int


@dataclass(frozen=True)
class Report:
    """What ``explain`` found; ``table()`` renders it as text (Markdown tables)."""

    spec: KernelSpec  # the fused kernel, lowered for the GPU's target
    gpu: GPU
    shapes: dict  # batch, seq_q, seq_k, heads, heads_kv
    tiles: dict  # the fused kernel's schedule config (block_m, block_n, ...)
    schedule: str
    standard: tuple  # traffic.KernelTraffic of qk, softmax, pv
    fused: traffic.KernelTraffic
    fused_minimum: traffic.KernelTraffic  # the fused kernel counted as one unit: each element once
    shared_bytes: int | None  # per thread block, from the lowered TIR
    threads: int | None  # per thread block, from the lowered TIR
    registers: int | None  # per thread, from ptxas -v
    registers_note: str  # where the register count came from, or why there is none
    measured: dict  # bench method -> ms (empty without --bench)
    measured_note: str
    sweep: tuple  # SweepPoint per sequence length

    # -- points on the roofline --
    def standard_points(self) -> list[Point]:
        ms = self.measured.get(BENCH_STANDARD)
        parts = [Point(f"standard {k.name}", k.flops, k.moved) for k in self.standard]
        total = Point("standard (3 kernels)", sum(p.flops for p in parts), sum(p.moved for p in parts), ms)
        return parts + [total]

    def fused_point(self) -> Point:
        return Point("fused (tvmflash)", self.fused.flops, self.fused.moved, self.measured.get(BENCH_FUSED))

    def fused_minimum_point(self) -> Point:
        """The fused kernel if a cache (L2) served every K/V re-read: each element moved once."""
        return Point("fused, re-reads from L2", self.fused_minimum.flops, self.fused_minimum.moved)

    def memory(self) -> tuple[int, int]:
        """Bytes of the buffers each algorithm allocates (standard: every buffer of its three
        functions, S and P included; fused: q, k, v, o, lse)."""
        return _allocated(self.standard), _allocated((self.fused,))

    def table(self) -> str:
        return _render(self)


def explain(
    spec: KernelSpec,
    seqlen: int,
    *,
    batch: int | None = None,
    heads: int = 16,
    tokens: int = 16384,
    gpu: str | GPU = "a100",
    bench: str | os.PathLike | dict | None = None,
    registers: bool = True,
    sweep=DEFAULT_SWEEP,
) -> Report:
    """Memory traffic, FLOPs and roofline of the fused kernel of ``spec`` against the standard
    algorithm, at ``seqlen`` (query and key length).

    batch: default ``max(1, tokens // seqlen)``; heads: query heads (kv heads = heads / spec.group).
    gpu: 'a100', 'h100', 'h200' or a ``GPU`` (``get_gpu`` overrides its figures); ``spec`` is lowered for
    its target. bench: a ``tvmflash bench --json`` file (or its loaded dict): the row of the same
    head dim, dtype, causal, seqlen, batch and heads gives the measured times. registers: run
    ``ptxas -v`` on the generated CUDA (when nvcc is on PATH) for the registers per thread.
    sweep: the sequence lengths of the plot's curves.
    """
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    shapes = problem_shapes(spec, seqlen, batch=batch, heads=heads, tokens=tokens)
    spec = spec.replace(target=gpu.target, algorithm="fused")
    lowered = lower(spec)
    fused_func = lowered.before["main"]  # the definition with the schedule's tile sizes
    standard_mod = D.standard_attention(spec)  # = lower(standard spec).before, without dlight's schedule
    fused = traffic.count(fused_func, shapes, "fused")
    fused_minimum = traffic.count(fused_func, shapes, "fused", per_unit=False)
    standard = traffic.count_module(standard_mod, shapes, STANDARD_FUNCTIONS)
    shared, threads = on_chip(lowered)
    regs, regs_note = ptxas_registers(lowered) if registers else (None, "n/a (not asked for)")
    measured, measured_note = _measured(bench, spec, shapes)
    points = []
    for n in sorted(set(sweep) | {seqlen}):
        s = problem_shapes(spec, n, batch=batch, heads=heads, tokens=tokens)
        if n == seqlen:
            f, std, f_min = fused, standard, fused_minimum
        else:
            f = traffic.count(fused_func, s, "fused")
            std = traffic.count_module(standard_mod, s, STANDARD_FUNCTIONS)
            f_min = traffic.count(fused_func, s, "fused", per_unit=False)
        points.append(SweepPoint(n, s["batch"], sum(k.moved for k in std), f.moved, f_min.moved, _allocated(std),
                                 _allocated((f,))))
    return Report(spec, gpu, shapes, dict(lowered.config), lowered.rule, standard, fused, fused_minimum, shared,
                  threads, regs, regs_note, measured, measured_note, tuple(points))


def problem_shapes(spec: KernelSpec, seqlen: int, *, batch=None, heads: int = 16, tokens: int = 16384) -> dict:
    """The symbolic shape of the TensorIR, set to FlashAttention's benchmark problem."""
    for arg, value in (("seqlen", seqlen), ("heads", heads), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if batch is None:
        batch = max(1, tokens // seqlen)
    elif isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if heads % spec.group:
        raise ValueError(f"heads: expected a multiple of the GQA group {spec.group}, got {heads}")
    return dict(batch=batch, seq_q=seqlen, seq_k=seqlen, heads=heads, heads_kv=heads // spec.group)


def _allocated(kernels) -> int:
    """Bytes of the distinct global buffers of ``kernels`` (by name)."""
    sizes = {}
    for k in kernels:
        for b in k.buffers:
            sizes[b.name] = b.nbytes
    return sum(sizes.values())


# ---------------------------------------------------------------------------------------------
# On chip: shared memory from the lowered TIR, registers from ptxas
# ---------------------------------------------------------------------------------------------


def on_chip(lowered) -> tuple[int | None, int | None]:
    """(shared memory bytes, threads) per thread block of the fused CUDA kernel, read from the TIR
    that code generation sees (after TVM merges the shared buffers and reuses dead ones)."""
    if not lowered.spec.is_cuda:
        return None, None
    mod = lower_to_device(lowered.mod, lowered.spec.tvm_target, lowered.pass_config,
                          tir_pipeline=lowered.tir_pipeline)
    shared, threads = 0, None
    for gv, func in mod.functions.items():
        if func.attrs is None or not func.attrs.get("tirx.is_global_func", False):
            continue  # host code
        extents = {}
        for s in _statements(func.body):
            if isinstance(s, _compat.tirx.AllocBuffer) and s.buffer.scope().startswith("shared"):
                size = 1
                for dim in s.buffer.shape:
                    size *= int(dim)
                shared += size * _compat.tvm.runtime.DataType(str(s.buffer.dtype)).bits // 8
            if isinstance(s, _compat.tirx.AttrStmt) and s.attr_key == "thread_extent":
                tag = s.node.thread_tag
                if tag.startswith("threadIdx"):
                    extents[tag] = int(s.value)
        if extents:
            threads = 1
            for v in extents.values():
                threads *= v
    return shared, threads


def _statements(s):
    """Every statement under ``s``, ``s`` first."""
    yield s
    for x in getattr(s, "seq", None) or ():
        yield from _statements(x)
    for name in ("body", "then_case", "else_case", "block"):
        child = getattr(s, name, None)
        if isinstance(child, _compat.tirx.Stmt):
            yield from _statements(child)


def ptxas_registers(lowered) -> tuple[int | None, str]:
    """Registers per thread of the fused kernel from ``nvcc -Xptxas -v``, and where they came from
    (or why there are none: no nvcc, not a CUDA target)."""
    if not lowered.spec.is_cuda:
        return None, "n/a (not a CUDA target)"
    if nvcc.find_nvcc() is None:
        return None, "n/a (nvcc not found)"
    arch = _compat.cuda_arch(lowered.spec.tvm_target)
    source = device_source(compile_lowered(lowered), lowered.spec)
    try:  # the flags `build` compiles the embedded fatbin with
        kernels = nvcc.resources(source, [arch])[arch].values()
    except RuntimeError as err:
        return None, f"n/a (nvcc failed: {str(err).strip().splitlines()[-1]})"
    worst = max(kernels, key=lambda r: r.registers)
    return worst.registers, f"ptxas -v, {arch}, {worst.spill_stores} bytes spilled"


# ---------------------------------------------------------------------------------------------
# Measured times (tvmflash bench --json)
# ---------------------------------------------------------------------------------------------


def _measured(bench, spec: KernelSpec, shapes: dict) -> tuple[dict, str]:
    if bench is None:
        return {}, "no measurements given (tvmflash bench --json PATH, then explain --bench PATH)"
    if isinstance(bench, dict):
        data, source = bench, "bench data"
    else:
        with open(bench) as fh:
            data = json.load(fh)
        source = os.fspath(bench)
    want = dict(head_dim=spec.head_dim, dtype=spec.dtype, causal=spec.causal, group=spec.group,
                seqlen=shapes["seq_q"], batch=shapes["batch"], heads=shapes["heads"])
    for row in data.get("rows", []):
        got = {k: row.get(k, data.get(k)) for k in want}
        got["group"] = got["group"] or 1
        if got == want:
            times = {m: r["ms"] for m, r in row.get("results", {}).items() if r.get("ms") is not None}
            device = data.get("device", "unknown device")
            return times, f"measured on {device} ({source})"
    return {}, f"no row of {source} matches {want}"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 10 else f"{x:.1f} ms"


def _render(r: Report) -> str:
    gpu, s = r.gpu, r.shapes
    std_spec = r.spec.replace(algorithm="standard")
    lines = [
        f"tvmflash explain: {r.spec.key} (fused) against {std_spec.key} (standard: qk, softmax, pv)",
        f"problem: batch {s['batch']}, seqlen {s['seq_q']} (q and k), heads {s['heads']} (kv {s['heads_kv']}), "
        f"head_dim {r.spec.head_dim}, {r.spec.dtype}, causal: {'yes' if r.spec.causal else 'no'}",
        f"GPU: {gpu.name}: HBM {gpu.bandwidth_tbs:g} TB/s, fp16 tensor cores {gpu.peak_tflops:g} TFLOP/s dense "
        f"(ridge {gpu.ridge:.0f} FLOP/B)",
        "counts: from the TensorIR (tvmflash/traffic.py); bound: max(bytes / bandwidth, FLOPs / peak)",
        "",
        "| kernel | reads | writes | moved | GFLOP | FLOP/B | roofline bound | limited by | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    std_total, fused, fused_min = r.standard_points()[-1], r.fused_point(), r.fused_minimum_point()
    rows = [((k,), p) for k, p in zip(r.standard, r.standard_points())]
    rows += [(r.standard, std_total), ((r.fused,), fused), ((r.fused_minimum,), fused_min)]
    for ks, p in rows:
        ai = f"{p.intensity:.1f}" if p.flops else "0"
        measured = "" if p.measured_ms is None else f"{_ms(p.measured_ms)} ({p.measured_tflops:.1f} TFLOP/s)"
        lines.append(f"| {p.label} | {_bytes(sum(k.read for k in ks))} | {_bytes(sum(k.written for k in ks))} | "
                     f"{_bytes(p.moved)} | {p.flops / 1e9:.1f} | {ai} | {_ms(p.bound_ms(gpu))} | {p.limit(gpu)} | "
                     f"{measured} |")
    lines += [
        "",
        f"fused moves {fused.moved / std_total.moved:.3f}x the standard's bytes ({std_total.moved / fused.moved:.1f}x "
        f"fewer) for {fused.flops / std_total.flops:.2f}x its FLOPs; {fused_min.moved / std_total.moved:.4f}x "
        f"({std_total.moved / fused_min.moved:.0f}x fewer) if L2 served every K/V re-read.",
        "",
        "| buffer | shape | size | standard: read / written | fused: read / written |",
        "|---|---|---:|---:|---:|",
    ]
    by_buffer: dict = {}
    for k in r.standard:
        for b in k.buffers:
            e = by_buffer.setdefault(b.name, [b, 0, 0, None, None])
            e[1] += b.read
            e[2] += b.written
    for b in r.fused.buffers:
        e = by_buffer.setdefault(b.name, [b, 0, 0, None, None])
        e[3], e[4] = b.read, b.written
    for name, (b, sr, sw, fr, fw) in by_buffer.items():
        fused_cell = "-" if fr is None else f"{_moved(fr, b.nbytes)} / {_moved(fw, b.nbytes)}"
        lines.append(f"| {name} | {list(b.shape)} {b.dtype} | {_bytes(b.nbytes)} | "
                     f"{_moved(sr, b.nbytes)} / {_moved(sw, b.nbytes)} | {fused_cell} |")
    std_mem, fused_mem = r.memory()
    extra = sorted(set(by_buffer) - {b.name for b in r.fused.buffers})
    on_chip = [f"{r.fused.units} thread blocks ({r.tiles.get('block_m', '?')} query rows each)"]
    if r.threads:
        on_chip.append(f"{r.threads} threads")
    on_chip.append("shared memory " + ("n/a" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f} KiB"))
    on_chip.append("registers/thread " + (f"{r.registers} ({r.registers_note})" if r.registers else r.registers_note))
    lines += [
        "",
        f"peak memory (buffers): standard {_bytes(std_mem)} ({', '.join(extra)} on top of the fused kernel's), "
        f"fused {_bytes(fused_mem)}.",
        f"fused kernel on chip ({r.schedule}, tiles {_tiles(r.tiles)}): {', '.join(on_chip)}.",
        r.measured_note + ".",
    ]
    others = {m: ms for m, ms in r.measured.items() if m not in (BENCH_FUSED, BENCH_STANDARD)}
    if others:
        lines.append("other methods, same row: " + ", ".join(f"{m} {_ms(ms)}" for m, ms in others.items()) + ".")
    return "\n".join(lines)


def _moved(n: int, size: int) -> str:
    if not n:
        return "-"
    ratio = n / size if size else 0
    return _bytes(n) + ("" if abs(ratio - 1) < 5e-3 else f" ({ratio:.2f}x)")


def _tiles(cfg: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in cfg.items())


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


def plot(report: Report, path: str | os.PathLike) -> str:
    """Three panels: bytes moved and peak memory against sequence length (standard and fused),
    and the roofline with both algorithms (measured times as open markers). Returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plot: needs matplotlib (pip install 'tvmflash[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, gpu = report, report.gpu
    red, blue = "tab:red", "tab:blue"
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.6))
    n = [p.seqlen for p in r.sweep]
    sweep_note = _sweep_note(r)

    # -- bytes moved --
    ax1.plot(n, [p.standard_moved / 1e9 for p in r.sweep], "o-", color=red, label="standard: qk, softmax, pv")
    ax1.plot(n, [p.fused_moved / 1e9 for p in r.sweep], "s-", color=blue,
             label=f"fused: K, V re-read per query tile ({r.tiles.get('block_m', '?')} rows)")
    ax1.plot(n, [p.fused_minimum / 1e9 for p in r.sweep], "s--", color=blue, mfc="none",
             label="fused, if L2 served every re-read")
    here = next(p for p in r.sweep if p.seqlen == r.shapes["seq_q"])
    ax1.annotate("", xy=(here.seqlen, here.fused_moved / 1e9), xytext=(here.seqlen, here.standard_moved / 1e9),
                 arrowprops=dict(arrowstyle="<->", color="black", lw=1))
    fewer, fewer_l2 = here.standard_moved / here.fused_moved, here.standard_moved / here.fused_minimum
    ax1.text(0.97, 0.22, f"seqlen {here.seqlen}: fused moves {fewer:.1f}x fewer bytes\n"
             f"({fewer_l2:.0f}x fewer if L2 caught the re-reads)",
             transform=ax1.transAxes, fontsize=9, ha="right", va="bottom")
    _seqlen_axis(ax1, n)
    ax1.set_ylabel("HBM traffic per forward pass (GB, log scale)")
    ax1.set_title(f"Bytes moved to and from HBM (counted from the TensorIR)\n{sweep_note}", fontsize=10)
    ax1.legend(fontsize=8, loc="upper left")

    # -- peak memory --
    ax2.plot(n, [p.standard_memory / 1e9 for p in r.sweep], "o-", color=red,
             label="standard: q, k, v, o, lse, S (float32), P")
    ax2.plot(n, [p.fused_memory / 1e9 for p in r.sweep], "s-", color=blue, label="fused: q, k, v, o, lse")
    ax2.axhline(gpu.memory_gb, color="gray", ls="--", lw=1)
    ax2.annotate(f"{gpu.name} memory", (n[0], gpu.memory_gb), xytext=(0, 4), textcoords="offset points",
                 fontsize=8, color="gray")
    _seqlen_axis(ax2, n)
    ax2.set_ylim(top=gpu.memory_gb * 3)
    ax2.set_ylabel("memory for the buffers (GB, log scale)")
    ax2.set_title(f"Peak memory (buffer sizes from the TensorIR)\n{sweep_note}", fontsize=10)
    ax2.legend(fontsize=8, loc="center left")

    # -- roofline --
    std_points = [p for p in r.standard_points() if p.flops]
    points = [r.fused_point(), r.fused_minimum_point()] + std_points  # the standard's drawn on top
    lo = min(p.intensity for p in points) / 3
    hi = max(max(p.intensity for p in points), gpu.ridge) * 3
    xs = [lo, gpu.ridge, hi]
    ax3.plot(xs, [min(gpu.peak_tflops, x * gpu.bandwidth_tbs) for x in xs], "k-", lw=1.5)
    ax3.annotate(f"HBM {gpu.bandwidth_tbs:g} TB/s", (lo * 2, lo * 2 * gpu.bandwidth_tbs), xytext=(-6, 8),
                 textcoords="offset points", fontsize=8, rotation=33)
    ax3.annotate(f"fp16 tensor cores {gpu.peak_tflops:g} TFLOP/s", (gpu.ridge, gpu.peak_tflops), xytext=(0, 6),
                 textcoords="offset points", fontsize=8, ha="center")
    style = {"standard qk": (red, "^"), "standard pv": (red, "v"), "standard (3 kernels)": (red, "o"),
             "fused (tvmflash)": (blue, "s"), "fused, re-reads from L2": (blue, "D")}
    ys = [lo * gpu.bandwidth_tbs]
    for p in points:
        color, marker = style.get(p.label, ("gray", "x"))
        attainable = p.flops / (p.bound_ms(gpu) * 1e-3) / 1e12
        ys += [attainable] + ([p.measured_tflops] if p.measured_ms is not None else [])
        ax3.plot([p.intensity], [attainable], marker, color=color, ms=12 if color == blue else 8, ls="none",
                 label=f"{p.label}: {p.intensity:.0f} FLOP/B, bound {_ms(p.bound_ms(gpu))}")
        if p.measured_ms is not None:
            ax3.plot([p.intensity], [p.measured_tflops], marker, mfc="none", color=color, ms=9, ls="none",
                     label=f"{p.label}, measured: {_ms(p.measured_ms)} ({p.measured_tflops:.1f} TFLOP/s)")
            ax3.plot([p.intensity] * 2, [p.measured_tflops, attainable], ":", color=color, lw=1)
    softmax = next((k for k in r.standard if not k.flops), None)
    if softmax is not None:
        ax3.text(0.02, 0.97, f"standard {softmax.name}: no GEMM FLOPs, {_bytes(softmax.moved)} moved,\n"
                 f"bound {_ms(Point('', 0, softmax.moved).bound_ms(gpu))} (memory only, not on this plot)",
                 transform=ax3.transAxes, fontsize=8, color=red, ha="left", va="top")
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlim(lo, hi)
    ax3.set_ylim(min(ys) / 4, gpu.peak_tflops * 4)
    ax3.set_xlabel("arithmetic intensity (GEMM FLOP per byte of HBM traffic, log scale)")
    ax3.set_ylabel("TFLOP/s (filled: roofline bound; open: measured)")
    ax3.set_title(f"Roofline, {gpu.name}\nseqlen {r.shapes['seq_q']}, batch {r.shapes['batch']}, "
                  f"{r.shapes['heads']} heads", fontsize=10)
    ax3.legend(fontsize=7.5, loc="lower right")

    for ax in (ax1, ax2, ax3):
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle(f"Why the fused kernel is fast: {r.spec.key} against the standard algorithm "
                 f"(head_dim {r.spec.head_dim}, {r.spec.dtype}{', causal' if r.spec.causal else ''}"
                 f"{f', GQA {r.spec.group}' if r.spec.group > 1 else ''})", fontsize=12)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _seqlen_axis(ax, n) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(n)
    ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 else str(x) for x in n])
    ax.set_xlabel("sequence length (q and k)")


def _sweep_note(r: Report) -> str:
    batches = {p.batch for p in r.sweep}
    tokens = {p.batch * p.seqlen for p in r.sweep}
    if len(batches) == 1:
        return f"batch {batches.pop()}, {r.shapes['heads']} heads"
    if len(tokens) == 1:
        return f"batch x seqlen = {tokens.pop()}, {r.shapes['heads']} heads"
    return f"batch = max(1, tokens / seqlen), {r.shapes['heads']} heads"
