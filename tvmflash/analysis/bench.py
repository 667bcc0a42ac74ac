"""``tvmflash bench``: TFLOP/s of tvmflash fused / standard and PyTorch SDPA, side by side.

Prints a table; asserts nothing about speed. FLOPs = 4 * batch * heads * seq^2 * head_dim,
halved for causal (FlashAttention's convention). batch * seq = ``--tokens`` (default 16k).
Each method is timed the same way: the median of ``reps`` samples of ``CALLS_PER_SAMPLE`` calls
back to back, the methods of a row sampled in turn (``_time_interleaved``).
"""

from __future__ import annotations

import functools
import statistics


#: Calls timed back to back per measurement: the host's work for a call (argument checks, kernel
#: lookup, launch) overlaps the previous call's kernel, as in a model's forward pass and in
#: FlashAttention's own benchmarks; one call between two events would add it to the time.
CALLS_PER_SAMPLE = 10


def _sample_ms(fn, calls: int = CALLS_PER_SAMPLE) -> float:
    """Milliseconds per call of ``calls`` calls of ``fn`` back to back between two CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _time_ms(fn, warmup: int = 3, reps: int = 10, calls: int = CALLS_PER_SAMPLE) -> float:
    """Median over ``reps`` samples (``_sample_ms``) of ``fn`` alone."""
    return _time_interleaved({"fn": fn}, warmup, reps, calls)["fn"]


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` methods, one per round, in which every method comes directly after every
    other one equally often (a Williams design: ``n`` orders for even ``n``, ``2n`` for odd ``n``).
    Rotating one order would not do: each method would always follow the same neighbour."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    orders = [[(m + i) % n for m in first] for i in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def _time_interleaved(fns: dict, warmup: int = 3, reps: int = 10, calls: int = CALLS_PER_SAMPLE) -> dict:
    """{name: median ms per call} of several functions sampled in turn: sample r of each
    function is taken next to sample r of the others, so a drift of the GPU's clocks or
    temperature during the measurement is shared, and round r takes the functions in
    ``balanced_orders``' order r, so each one follows every other one equally often. What runs
    just before matters: a kernel sampled right after a power-hungry one (SDPA's cuDNN backend)
    runs slower, presumably at lowered clocks, so a fixed neighbour would bias one method
    (docs/performance.md). A function that raises (out of memory, an unsupported backend) gets
    its exception instead."""
    import torch

    times, live = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            live[name], times[name] = fn, []
        except Exception as err:  # noqa: BLE001 - reported in the table
            times[name] = err
            torch.cuda.empty_cache()
    names = list(live)
    orders = balanced_orders(len(names)) if names else []
    for r in range(reps if names else 0):
        for i in orders[r % len(orders)]:
            times[names[i]].append(_sample_ms(live[names[i]], calls))
    return {name: (statistics.median(t) if isinstance(t, list) else t) for name, t in times.items()}


def _sdpa(backend):
    import torch
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )

    return run


def _general():
    """The any-length build (bound checks kept) even where attention() would take the even one."""
    def run(q, k, v, causal):
        from ..runtime.api import spec_for
        from ..runtime.cache import get_kernel

        return get_kernel(spec_for(q, k, v, causal=causal)[0])(q, k, v)

    return run


def _hand_config():
    """The kernel ``attention`` would run with the tuning logs off (the hand config; the even build
    where the lengths allow), built into ``<cache>/hand-config``: tuned and hand kernels share a
    key, so they cannot share the cache. For comparing the two in one process."""
    from ..runtime.kernel import load

    kernels = {}

    def run(q, k, v, causal):
        from ..runtime.api import spec_for

        spec, (_, sq, sk, _) = spec_for(q, k, v, causal=causal)
        if (spec, sq, sk) not in kernels:
            kernels[spec, sq, sk] = load(hand_config_kernel(spec, sq, sk) + ".so")
        return kernels[spec, sq, sk](q, k, v)

    return run


def hand_config_kernel(spec, seq_q: int, seq_k: int) -> str:
    """``<cache>/hand-config/<key>`` (add .so / .json) of the build ``attention`` picks for
    ``spec`` at these lengths (``builder.build_for``) with the tuning logs off, built once per TVM
    version."""
    import os

    from ..builder import build_for
    from ..runtime.cache import cache_dir, ensure_built
    from ..tuning import records

    with records.tuning_logs_off():
        return ensure_built(build_for(spec, seq_q, seq_k), os.path.join(cache_dir(), "hand-config"))


def bench(head_dims=(64, 128), seqlens=(1024, 4096, 16384), causals=(False, True), heads: int = 16,
          tokens: int = 16384, dtype: str = "float16", methods=None, reps: int = 10):
    import torch
    from torch.nn.attention import SDPBackend

    from ..definition.plain import NOMINAL_CAP
    from ..runtime.api import attention

    all_methods = {
        "tvmflash fused": lambda q, k, v, c: attention(q, k, v, causal=c),
        "tvmflash fused general": _general(),
        "tvmflash fused hand": _hand_config(),
        "tvmflash fused static": lambda q, k, v, c: attention(q, k, v, causal=c, static_shape=True),
        "tvmflash standard": lambda q, k, v, c: attention(q, k, v, causal=c, algorithm="standard"),
        "tvmflash fused softcap": lambda q, k, v, c: attention(q, k, v, causal=c, softcap=NOMINAL_CAP),
        "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    methods = list(methods or all_methods)
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        raise ValueError(f"methods: expected names among {list(all_methods)}, got {unknown}")
    rows = []
    dt = getattr(torch, dtype)
    for d in head_dims:
        for n in seqlens:
            for causal in causals:
                b = max(1, tokens // n)
                q, k, v = (torch.randn(b, n, heads, d, device="cuda", dtype=dt) for _ in range(3))
                flops = 4 * b * heads * n * n * d / (2 if causal else 1)
                row = {"head_dim": d, "seqlen": n, "batch": b, "causal": causal}
                fns = {name: functools.partial(all_methods[name], q, k, v, causal) for name in methods}
                for name, ms in _time_interleaved(fns, reps=reps).items():
                    row[name] = (None, type(ms).__name__) if isinstance(ms, Exception) else (ms, flops / ms / 1e9)
                torch.cuda.empty_cache()
                rows.append(row)
                print(_format_row(row, methods), flush=True)
    return rows, methods


def peak_memory(seqlens=(4096, 16384, 32768, 65536), head_dim: int = 128, heads: int = 16, batch: int = 1,
                dtype: str = "float16", causal: bool = False, algorithms=("fused", "standard")):
    """Peak GPU memory (torch's allocator, MB) of one call of each algorithm as seqlen grows, the
    inputs and output included. The standard algorithm holds S (float32) and P: B*H*N^2*(4+2)
    bytes, so it runs out of memory where the fused one does not. Rows: {seqlen: {algorithm:
    MB or the error's name}}."""
    import torch

    from ..runtime.api import attention

    dt = getattr(torch, dtype)
    rows = {}
    for n in seqlens:
        row = rows.setdefault(n, {})
        for algorithm in algorithms:
            torch.cuda.empty_cache()
            try:
                q, k, v = (torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dt) for _ in range(3))
                attention(q, k, v, causal=causal, algorithm=algorithm)  # build / load outside the measurement
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                attention(q, k, v, causal=causal, algorithm=algorithm)
                torch.cuda.synchronize()
                row[algorithm] = (torch.cuda.max_memory_allocated() - base) / 1e6 + 4 * q.numel() * q.element_size() / 1e6
            except torch.OutOfMemoryError:
                row[algorithm] = "out of memory"
            except ValueError as err:  # the standard algorithm's int32 limit on S
                row[algorithm] = "S over int32 indexing" if "int32" in str(err) else type(err).__name__
            finally:
                q = k = v = None
                torch.cuda.empty_cache()
        print(f"N={n:<6} " + " | ".join(f"{a}: {_mb(row[a])}" for a in algorithms), flush=True)
    return rows


def _mb(value) -> str:
    return f"{value:,.0f} MB" if isinstance(value, float) else str(value)


def print_memory_table(rows, algorithms=("fused", "standard")) -> None:
    print("| seqlen | " + " | ".join(f"{a} peak memory" for a in algorithms) + " |")
    print("|" + "---|" * (1 + len(algorithms)))
    for n, row in rows.items():
        print(f"| {n} | " + " | ".join(_mb(row[a]) for a in algorithms) + " |")


def _format_row(row, methods) -> str:
    cells = [f"d={row['head_dim']:<4}N={row['seqlen']:<6}B={row['batch']:<3}{'causal' if row['causal'] else '      '}"]
    for name in methods:
        ms, val = row[name]
        cells.append(f"{name}: " + (f"{val:7.1f} TF/s {ms:8.3f} ms" if ms is not None else f"{val:>20}"))
    return " | ".join(cells)


def print_table(rows, methods) -> None:
    head = "| head_dim | seqlen | batch | causal | " + " | ".join(f"{m} TFLOP/s (ms)" for m in methods) + " |"
    print(head)
    print("|" + "---|" * (4 + len(methods)))
    for r in rows:
        cells = []
        for m in methods:
            ms, val = r[m]
            cells.append(f"{val:.1f} ({ms:.3f})" if ms is not None else str(val))
        print(f"| {r['head_dim']} | {r['seqlen']} | {r['batch']} | {r['causal']} | " + " | ".join(cells) + " |")


def to_json(rows, methods, **meta) -> dict:
    """The measured rows as plain data: ``meta`` (dtype, heads, tokens, reps, ...) and the device
    at the top, one entry per (head_dim, seqlen, causal) with each method's ms and TFLOP/s."""
    out = {"device": _device_name(), **meta, "methods": list(methods), "rows": []}
    for r in rows:
        results = {}
        for name in methods:
            ms, val = r[name]
            results[name] = {"ms": ms, "tflops": val} if ms is not None else {"ms": None, "error": str(val)}
        out["rows"].append({"head_dim": r["head_dim"], "seqlen": r["seqlen"], "batch": r["batch"],
                            "causal": r["causal"], "heads": meta.get("heads"), "dtype": meta.get("dtype"),
                            "group": 1, "results": results})
    return out


def write_json(path, rows, methods, **meta) -> None:
    """Write ``to_json(rows, methods, **meta)`` to ``path`` (read by ``tvmflash explain --bench``)."""
    import json

    with open(path, "w") as fh:
        json.dump(to_json(rows, methods, **meta), fh, indent=1)


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        return "unknown"
