"""``tvmflash bench``: TFLOP/s of tvmflash fused / standard and PyTorch SDPA, side by side.

Prints a table; asserts nothing about speed. FLOPs = 4 * batch * heads * seq^2 * head_dim,
halved for causal (FlashAttention's convention); for a sliding window, 4 * batch * heads *
head_dim per visible score (``visible_scores``). batch * seq = ``--tokens`` (default 16k).
Each method is timed the same way: the median of ``reps`` samples of ``CALLS_PER_SAMPLE`` calls
back to back, the methods of a row sampled in turn (``_time_interleaved``).
"""

from __future__ import annotations

import functools
import itertools
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
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                enable_gqa=k.shape[2] != q.shape[2])

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


def visible_scores(seq_q: int, seq_k: int, causal: bool, window=(-1, -1)) -> int:
    """How many (query, key) pairs a head sees (FlashAttention-2's window semantics, -1
    unbounded; causal: right edge 0)."""
    import numpy as np

    left, right = window
    right = 0 if causal else right
    diag = np.arange(seq_q, dtype=np.int64) + seq_k - seq_q
    lo = np.zeros(seq_q, dtype=np.int64) if left < 0 else np.maximum(diag - left, 0)
    hi = np.full(seq_q, seq_k - 1, dtype=np.int64) if right < 0 else np.minimum(diag + right, seq_k - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())


def bench(head_dims=(64, 128), seqlens=(1024, 4096, 16384), causals=(False, True), heads: int = 16,
          tokens: int = 16384, dtype: str = "float16", methods=None, reps: int = 10, window: int = 4096,
          group: int = 1):
    """Rows of ms and TFLOP/s per method. ``window``: the left (and, not causal, right) edge of
    the sliding window of the "tvmflash fused window" method, whose FLOPs count its visible
    scores only. ``group``: query heads per kv head (GQA; ``heads`` must be a multiple)."""
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
        "tvmflash fused window": lambda q, k, v, c: attention(q, k, v, causal=c, window_size=_window(window, c)),
        "tvmflash fused alibi": lambda q, k, v, c: attention(q, k, v, causal=c, alibi_slopes=alibi_slopes(q)),
        "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or heads % group:
        raise ValueError(f"gqa: expected a positive int dividing heads={heads}, got {group!r}")
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
                q = torch.randn(b, n, heads, d, device="cuda", dtype=dt)
                k, v = (torch.randn(b, n, heads // group, d, device="cuda", dtype=dt) for _ in range(2))
                flops = 4 * b * heads * n * n * d / (2 if causal else 1)
                windowed = 4 * b * heads * d * visible_scores(n, n, causal, _window(window, causal))
                row = {"head_dim": d, "seqlen": n, "batch": b, "causal": causal, "group": group}
                fns = {name: functools.partial(all_methods[name], q, k, v, causal) for name in methods}
                for name, ms in _time_interleaved(fns, reps=reps).items():
                    work = windowed if name.endswith(" window") else flops
                    row[name] = (None, type(ms).__name__) if isinstance(ms, Exception) else (ms, work / ms / 1e9)
                torch.cuda.empty_cache()
                rows.append(row)
                print(_format_row(row, methods), flush=True)
    return rows, methods


def _window(window: int, causal: bool) -> tuple[int, int]:
    return (window, 0 if causal else window)


@functools.lru_cache(maxsize=None)
def _slopes(heads: int, device: str):
    import torch

    from ..definition.plain import alibi_geometric_slopes

    return torch.from_numpy(alibi_geometric_slopes(heads)).to(device)


def alibi_slopes(q):
    """ALiBi's slopes for the heads of ``q`` [batch, seqlen, heads, head_dim], on its device."""
    return _slopes(int(q.shape[2]), str(q.device))


#: The attention of real models' prefill: (query heads, kv heads, head dim, softcap, window).
#: Gemma-2 alternates windowed and global layers; the row is its windowed layer.
MODELS = {
    "Llama-3-8B": (32, 8, 128, 0.0, -1),
    "Qwen2-7B": (28, 4, 128, 0.0, -1),
    "Mistral-7B": (32, 8, 128, 0.0, 4096),
    "Gemma-2-9B": (16, 8, 256, 50.0, 4096),
    "Phi-3-mini": (32, 32, 96, 0.0, -1),
    "GPT-2": (12, 12, 64, 0.0, -1),
}

#: The methods of ``bench_models``, in their columns' order.
MODEL_METHODS = ("tvmflash", "sdpa flash", "sdpa cudnn", "flex")


def _flex(softcap: float, window: int, seqlen: int):
    """FlexAttention (``torch.nn.attention.flex_attention``, compiled) with the model's causal
    mask, window and softcap as mask_mod / score_mod."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = _compiled_flex()

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx
        return visible & (q_idx - kv_idx <= window) if window >= 0 else visible

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device="cuda")

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                        score_mod=score_mod if softcap else None, enable_gqa=k.shape[2] != q.shape[2])

    return run


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def bench_models(models=None, seqlens=(2048, 8192), dtype: str = "bfloat16", reps: int = 10, flex: str = "variants"):
    """Causal prefill (batch 1) of each model's attention (``MODELS``): ms and TFLOP/s (on the
    visible scores) of tvmflash, SDPA's flash and cuDNN backends where they serve the case (no
    softcap, no window) and compiled FlexAttention (``flex``: "variants", the rows with a softcap
    or a window; "all"; "none"). Rows: dicts with the model, seqlen and {method: (ms, TFLOP/s) or
    (None, why)}."""
    import torch
    from torch.nn.attention import SDPBackend

    from ..runtime.api import attention

    names = list(models or MODELS)
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise ValueError(f"models: expected names among {list(MODELS)}, got {unknown}")
    if flex not in ("variants", "all", "none"):
        raise ValueError(f"flex: expected 'variants', 'all' or 'none', got {flex!r}")
    dt = getattr(torch, dtype)
    rows = []
    for name in names:
        heads, heads_kv, d, cap, window = MODELS[name]
        for n in seqlens:
            q = torch.randn(1, n, heads, d, device="cuda", dtype=dt)
            k, v = (torch.randn(1, n, heads_kv, d, device="cuda", dtype=dt) for _ in range(2))
            win = (window, 0) if 0 <= window < n else (-1, 0)
            variant = bool(cap) or win[0] >= 0
            fns = {"tvmflash": functools.partial(attention, q, k, v, causal=True, softcap=cap, window_size=win)}
            if not variant:
                for method, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                                        ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
                    fns[method] = functools.partial(_sdpa(backend), q, k, v, True)
            if flex == "all" or (flex == "variants" and (cap or window >= 0)):
                fns["flex"] = functools.partial(_flex(cap, win[0], n), q, k, v)
            work = 4 * heads * d * visible_scores(n, n, True, win)
            row = {"model": name, "seqlen": n, "heads": heads, "heads_kv": heads_kv, "head_dim": d,
                   "softcap": cap, "window": win[0]}
            for method, ms in _time_interleaved(fns, reps=reps).items():
                row[method] = (None, type(ms).__name__) if isinstance(ms, Exception) else (ms, work / ms / 1e9)
            for method in MODEL_METHODS:
                row.setdefault(method, (None, "n/a"))
            torch.cuda.empty_cache()
            rows.append(row)
            print(_format_model_row(row), flush=True)
    return rows


#: The decode cases of ``bench_decode``: (batch, new query tokens, keys in the cache), as the
#: inference issue measures them (head dim 128, 32 query heads over 8 kv heads).
DECODE_CASES = ((8, 1, 4096), (64, 1, 4096), (8, 1, 32768), (64, 1, 32768), (8, 16, 8192))

#: HBM bandwidth of the GPUs the decode table reports against (bytes/s).
HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


#: Page sizes of the paged-cache methods of ``bench_decode`` (vLLM's default 16, FlashAttention's 256).
PAGE_SIZES = (16, 256)


def _paged_cache(q, k, v, page_size: int):
    """(q, k pages, v pages, new k, new v, lengths, block table) for a decode step on a paged
    copy of k, v: pages in shuffled order, the table and lengths on the CPU."""
    import torch

    batch, seq_k = k.shape[:2]
    n = batch * seq_k // page_size
    perm = torch.randperm(n, device=k.device)
    pages = []
    for x in (k, v):
        p = torch.empty_like(x).view(n, page_size, *x.shape[2:])
        p[perm] = x.view(n, page_size, *x.shape[2:])
        pages.append(p)
    seq_q = q.shape[1]
    lengths = torch.full((batch,), seq_k - seq_q, dtype=torch.int32)
    return (q, *pages, k[:, -seq_q:].clone(), v[:, -seq_q:].clone(), lengths,
            perm.view(batch, seq_k // page_size).int().cpu())


def bench_decode(cases=DECODE_CASES, head_dim: int = 128, heads: int = 32, heads_kv: int = 8,
                 dtype: str = "float16", reps: int = 10, methods=None):
    """Rows of us per call and TB/s (the bytes of q, k, v and o over the time) of decode-shaped
    attention, side by side: tvmflash with its split count chosen (``num_splits=0``), tvmflash's
    prefill kernel (``num_splits=1``), a decode step through ``attention_with_kvcache`` (its
    append and its host-side length check included; causal), the same on a paged cache of each of
    ``PAGE_SIZES``, SDPA flash and cuDNN. Not causal: SDPA's ``is_causal`` is
    aligned top-left, which is not decode's; with one new token the two are the same, with 16 the
    bottom-right mask would drop 120 of 131k scores."""
    import torch
    from torch.nn.attention import SDPBackend

    from ..runtime.api import attention
    from ..runtime.kvcache import attention_with_kvcache

    flash, cudnn = _sdpa(SDPBackend.FLASH_ATTENTION), _sdpa(SDPBackend.CUDNN_ATTENTION)

    def kv_cache(q, k, v, k_new, v_new, lengths, block_table=None):
        # a decode step on the cache API: the new tokens' keys appended at seq_k - seq_q (the same
        # slots every call), then attention over all seq_k keys; the lengths (and a paged cache's
        # table) on the CPU, as a serving loop's scheduler holds them (checked there, no wait for
        # the GPU)
        return attention_with_kvcache(q, k, v, k_new, v_new, cache_seqlens=lengths, block_table=block_table)

    all_methods = {
        "tvmflash split": lambda q, k, v: attention(q, k, v),
        "tvmflash kv cache": kv_cache,
        **{f"tvmflash paged {p}": kv_cache for p in PAGE_SIZES},
        "tvmflash no split": lambda q, k, v: attention(q, k, v, num_splits=1),
        "sdpa flash": lambda q, k, v: flash(q, k, v, False),
        "sdpa cudnn": lambda q, k, v: cudnn(q, k, v, False),
    }
    methods = list(methods or all_methods)
    unknown = [m for m in methods if m not in all_methods]
    if unknown:
        raise ValueError(f"methods: expected names among {list(all_methods)}, got {unknown}")
    dt = getattr(torch, dtype)
    rows = []
    for batch, seq_q, seq_k in cases:
        q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", dtype=dt)
        k, v = (torch.randn(batch, seq_k, heads_kv, head_dim, device="cuda", dtype=dt) for _ in range(2))
        moved = 2 * (q.numel() * 2 + k.numel() + v.numel())
        row = {"batch": batch, "seq_q": seq_q, "seq_k": seq_k, "head_dim": head_dim, "heads": heads,
               "heads_kv": heads_kv}
        fns = {name: functools.partial(all_methods[name], q, k, v) for name in methods}
        for page_size in PAGE_SIZES:
            name = f"tvmflash paged {page_size}"
            if name in fns:
                fns[name] = functools.partial(kv_cache, *_paged_cache(q, k, v, page_size))
        if "tvmflash kv cache" in fns:
            lengths = torch.full((batch,), seq_k - seq_q, dtype=torch.int32)
            fns["tvmflash kv cache"] = functools.partial(kv_cache, q, k, v, k[:, -seq_q:].clone(),
                                                         v[:, -seq_q:].clone(), lengths)
        _timed_row(row, fns, reps, moved, f"B={batch} q={seq_q} kv={seq_k}", "{:5.2f} TB/s")
        del q, k, v
        torch.cuda.empty_cache()
        rows.append(row)
    return rows, methods


def _timed_row(row: dict, fns: dict, reps: int, work: float, label: str, unit: str) -> None:
    """``row[method] = (us, work / time / 1e9)`` for each of ``fns`` sampled side by side (or
    (None, why) where one raised), and the row printed as it comes (``unit`` formats the rate)."""
    for name, ms in _time_interleaved(fns, reps=reps).items():
        row[name] = (None, _why(ms)) if isinstance(ms, Exception) else (ms * 1e3, work / ms / 1e9)
    print(" | ".join([label] + [f"{m}: " + (f"{row[m][0]:8.1f} us " + unit.format(row[m][1]) if row[m][0] is not None
                                            else row[m][1]) for m in fns]), flush=True)


#: The cases of ``bench_varlen``: (name, each sequence's length), query and key lengths equal
#: (prefill): equal lengths (the dense kernel's case), a skewed batch of halving lengths and a
#: mixed one.
VARLEN_CASES = (
    ("4 x 4096", (4096,) * 4),
    ("16 x 1024", (1024,) * 16),
    ("skewed 8k", (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1, 1, 1)),
    ("mixed 16k", (3000, 17, 4096, 1500, 777, 2048, 3333, 129, 1300)),
)


def bench_varlen(cases=VARLEN_CASES, head_dim: int = 128, heads: int = 16, dtype: str = "float16",
                 causals=(False, True), reps: int = 10):
    """Rows of us per call and TFLOP/s (4 * head_dim * the visible scores of the sequences
    themselves) of packed variable-length prefill, side by side: ``attention_varlen`` (prefix
    sums on the CPU, checked there), and what a caller without it runs: tvmflash and SDPA flash
    and cuDNN on the batch padded to the longest sequence (the padding computed and dropped), and
    SDPA flash once per sequence."""
    import torch
    from torch.nn.attention import SDPBackend

    from ..runtime.api import attention
    from ..runtime.varlen import attention_varlen

    flash, cudnn = _sdpa(SDPBackend.FLASH_ATTENTION), _sdpa(SDPBackend.CUDNN_ATTENTION)
    methods = ["tvmflash varlen", "tvmflash padded", "sdpa flash padded", "sdpa cudnn padded", "sdpa flash per sequence"]
    dt = getattr(torch, dtype)
    rows = []
    for causal in causals:
        for name, lengths in cases:
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            total, longest, batch = int(cu[-1]), max(lengths), len(lengths)
            q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=dt) for _ in range(3))
            padded = [torch.zeros(batch, longest, heads, head_dim, device="cuda", dtype=dt) for _ in range(3)]
            for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                for dst, src in zip(padded, (q, k, v)):
                    dst[b, : hi - lo] = src[lo:hi]
            seqs = [tuple(x[None, lo:hi] for x in (q, k, v)) for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())]
            flops = 4 * head_dim * heads * sum(visible_scores(n, n, causal) for n in lengths)

            def per_sequence(seqs=seqs, causal=causal):
                for a, b_, c in seqs:
                    flash(a, b_, c, causal)

            fns = {
                "tvmflash varlen": functools.partial(attention_varlen, q, k, v, cu, cu, longest, longest, causal=causal),
                "tvmflash padded": functools.partial(attention, *padded, causal=causal),
                "sdpa flash padded": functools.partial(flash, *padded, causal),
                "sdpa cudnn padded": functools.partial(cudnn, *padded, causal),
                "sdpa flash per sequence": per_sequence,
            }
            row = {"case": name, "causal": causal, "sequences": batch, "tokens": total, "head_dim": head_dim,
                   "heads": heads}
            _timed_row(row, fns, reps, flops, f"{name} causal={causal}", "{:6.1f} TFLOP/s")
            del q, k, v, padded, seqs
            torch.cuda.empty_cache()
            rows.append(row)
    return rows, methods


def print_varlen_table(rows, methods) -> None:
    print(f"packed variable-length prefill, {rows[0]['head_dim'] if rows else ''} head dim, "
          f"{rows[0]['heads'] if rows else ''} heads; us per call, TFLOP/s on the sequences' own scores, on "
          f"{_device_name()}")
    print("| case | causal | " + " | ".join(methods) + " |")
    print("|" + "---|" * (2 + len(methods)))
    for r in rows:
        cells = [str(val) if us is None else f"{us:.0f} us, {val:.0f}" for us, val in (r[m] for m in methods)]
        print(f"| {r['case']} ({r['sequences']} seqs, {r['tokens']} tokens) | {'yes' if r['causal'] else 'no'} | "
              + " | ".join(cells) + " |")


def _why(err: Exception) -> str:
    """A table cell for a method that raised: its type and the start of its message."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:80]}" if text else type(err).__name__


def print_decode_table(rows, methods) -> None:
    name = _device_name()
    peak = next((bw for gpu, bw in HBM_PEAK.items() if gpu in name), None)
    print(f"decode, {rows[0]['head_dim'] if rows else ''} head dim, {rows[0]['heads'] if rows else ''} q / "
          f"{rows[0]['heads_kv'] if rows else ''} kv heads; us per call, TB/s"
          + (f" (% of {peak / 1e12:.1f} TB/s)" if peak else "") + f" on {name}")
    print("| batch | new tokens | kv length | " + " | ".join(methods) + " |")
    print("|" + "---|" * (3 + len(methods)))
    for r in rows:
        cells = []
        for m in methods:
            us, val = r[m]
            if us is None:
                cells.append(str(val))
            else:
                cells.append(f"{us:.0f} us, {val:.2f} TB/s" + (f" ({100 * val * 1e12 / peak:.0f}%)" if peak else ""))
        print(f"| {r['batch']} | {r['seq_q']} | {r['seq_k']} | " + " | ".join(cells) + " |")


def _format_model_row(row) -> str:
    cells = [f"{row['model']:<11} N={row['seqlen']:<6}"]
    for method in MODEL_METHODS:
        ms, val = row[method]
        cells.append(f"{method}: " + (f"{val:6.1f} TF/s {ms:7.3f} ms" if ms is not None else f"{val:>18}"))
    return " | ".join(cells)


def print_model_table(rows) -> None:
    """The README's table: TFLOP/s (ms) per method and tvmflash's ratio to the fastest other."""
    print("| model | heads (q/kv, d) | variant | seqlen | " + " | ".join(f"{m} TFLOP/s (ms)" for m in MODEL_METHODS)
          + " | tvmflash / best other |")
    print("|" + "---|" * (5 + len(MODEL_METHODS)))
    for r in rows:
        variant = ", ".join(x for x in (f"softcap {r['softcap']:g}" if r["softcap"] else "",
                                        f"window {r['window']}" if r["window"] >= 0 else "") if x) or "-"
        cells = []
        for m in MODEL_METHODS:
            ms, val = r[m]
            cells.append(f"{val:.1f} ({ms:.3f})" if ms is not None else str(val))
        others = [r[m][0] for m in MODEL_METHODS[1:] if r[m][0] is not None]
        ratio = f"{min(others) / r['tvmflash'][0]:.2f}x" if others and r["tvmflash"][0] is not None else "-"
        print(f"| {r['model']} | {r['heads']}/{r['heads_kv']}, {r['head_dim']} | {variant} | {r['seqlen']} | "
              + " | ".join(cells) + f" | {ratio} |")


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
                            "group": r.get("group", 1), "results": results})
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
