"""``tvmflash explain``: the report, the roofline, measured times from ``bench --json``, the
picture and the command. No GPU needed; the registers count needs nvcc (skipped without it)."""

import json
import subprocess
import sys

import pytest

from tvmflash import KernelSpec
from tvmflash.analysis import roofline as E
from tvmflash.analysis.bench import write_json
from tvmflash.cli import main

from conftest import NVCC

SPEC = KernelSpec(64)  # the counts below are for head dim 64 (its CUDA build lowers the tensor-core schedule)


@pytest.fixture(scope="module")
def report():
    return E.explain(SPEC, 1024, registers=False, sweep=(512, 1024, 2048))


def test_report_counts_and_memory(report):
    b, n, h, d = 16, 1024, 16, 64  # batch * seqlen = 16k tokens, 16 heads (FlashAttention's benchmark)
    assert report.shapes == dict(batch=b, seq_q=n, seq_k=n, heads=h, heads_kv=h)
    assert report.spec.target == E.GPUS["a100"].target and report.spec.algorithm == "fused"
    qkvo = 4 * b * n * h * d * 2
    lse = b * h * n * 4
    std_mem, fused_mem = report.memory()
    assert fused_mem == qkvo + lse
    assert std_mem - fused_mem == b * h * n * n * (4 + 2)  # S in float32, P in float16
    qk, softmax, pv = report.standard
    assert [k.name for k in report.standard] == ["qk", "softmax", "pv"]
    assert softmax.moved == b * h * n * n * (4 + 2) + lse  # reads S, writes P and lse
    assert report.fused.flops == qk.flops + pv.flops == 4 * b * h * n * n * d
    assert report.fused_minimum.moved == qkvo + lse  # each element once
    tiles = n // report.tiles["block_m"]
    assert report.fused.buffer("K").read == tiles * b * h * n * d * 2
    # the sweep: the standard grows with N (batch * N fixed), the fused minimum does not
    sweep = {p.seqlen: p for p in report.sweep}
    assert sorted(sweep) == [512, 1024, 2048]
    assert sweep[2048].standard_moved > sweep[1024].standard_moved > sweep[1024].fused_moved
    assert sweep[2048].fused_minimum == sweep[512].fused_minimum
    assert sweep[1024].fused_moved == report.fused.moved


def test_on_chip_from_the_lowered_tir(report):
    assert report.threads and report.threads % 32 == 0
    assert 0 < report.shared_bytes <= 227 * 1024
    assert report.registers is None and report.registers_note.startswith("n/a")


def test_roofline_bounds():
    gpu = E.get_gpu("a100", bandwidth_tbs=1.0, peak_tflops=100.0)
    assert gpu.ridge == 100.0 and "user figures" in gpu.name
    compute_bound = E.Point("x", flops=10**12, moved=10**9)  # 1000 FLOP/B
    assert compute_bound.bound_ms(gpu) == pytest.approx(10.0) and compute_bound.limit(gpu) == "compute"
    memory_bound = E.Point("y", flops=10**10, moved=10**9, measured_ms=4.0)  # 10 FLOP/B
    assert memory_bound.bound_ms(gpu) == pytest.approx(1.0) and memory_bound.limit(gpu) == "memory"
    assert memory_bound.measured_tflops == pytest.approx(2.5)


def test_table_shows_every_kernel(report):
    text = report.table()
    for row in ("| standard qk |", "| standard softmax |", "| standard pv |", "| standard (3 kernels) |",
                "| fused (tvmflash) |", "| fused, re-reads from L2 |", "| S |", "| P |"):
        assert row in text, row
    fused, std = report.fused_point(), report.standard_points()[-1]
    assert f"{std.moved / fused.moved:.1f}x fewer" in text
    assert "registers/thread n/a" in text


def _bench_rows(ms_fused, ms_standard):
    row = {"head_dim": 64, "seqlen": 1024, "batch": 16, "causal": False,
           "tvmflash fused": (ms_fused, 1.0), "tvmflash standard": (ms_standard, 1.0), "sdpa flash": (None, "OOM")}
    other = dict(row, seqlen=4096, batch=4)
    return [row, other], ["tvmflash fused", "tvmflash standard", "sdpa flash"]


def test_bench_json_puts_measurements_on_the_roofline(tmp_path):
    path = tmp_path / "bench.json"
    rows, methods = _bench_rows(2.5, 40.0)
    write_json(path, rows, methods, dtype="float16", heads=16, tokens=16384, reps=5)
    data = json.loads(path.read_text())
    assert data["rows"][0]["results"]["tvmflash fused"] == {"ms": 2.5, "tflops": 1.0}
    assert data["rows"][0]["results"]["sdpa flash"]["error"] == "OOM"

    r = E.explain(SPEC, 1024, registers=False, bench=path, sweep=(1024,))
    assert r.measured == {"tvmflash fused": 2.5, "tvmflash standard": 40.0}
    assert r.fused_point().measured_tflops == pytest.approx(r.fused.flops / 2.5e-3 / 1e12)
    assert r.standard_points()[-1].measured_ms == 40.0
    assert "2.500 ms" in r.table() and "40.0 ms" in r.table()
    E.plot(r, tmp_path / "measured.png")

    causal = E.explain(KernelSpec(64, causal=True), 1024, registers=False, bench=path, sweep=(1024,))
    assert causal.measured == {} and "no row of" in causal.measured_note


def test_registers_na_without_nvcc(monkeypatch):
    from tvmflash.builder import lower

    monkeypatch.setattr(E.nvcc, "find_nvcc", lambda: None)
    lowered = lower(SPEC.replace(target="nvidia/nvidia-h100"))
    assert E.ptxas_registers(lowered) == (None, "n/a (nvcc not found)")
    assert E.ptxas_registers(lower(SPEC)) == (None, "n/a (not a CUDA target)")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_registers_from_ptxas():
    from tvmflash.builder import lower

    regs, note = E.ptxas_registers(lower(SPEC.replace(target="nvidia/nvidia-a100")))
    assert 16 <= regs <= 255 and note.startswith("ptxas -v, sm_80")


def test_plot_writes_a_png(report, tmp_path):
    path = E.plot(report, tmp_path / "sub" / "explain.png")
    with open(path, "rb") as fh:
        head = fh.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sub" / "explain.png").stat().st_size > 20_000


def test_cli_prints_the_table_and_writes_the_png(tmp_path, capsys):
    png = tmp_path / "x.png"
    assert main(["explain", "--head-dim", "64", "--seqlen", "2048", "--gpu", "a100", "--no-ptxas",
                 "--bandwidth-tbs", "1.5", "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "batch 8, seqlen 2048" in out and "HBM 1.5 TB/s" in out and "| fused (tvmflash) |" in out
    assert f"picture: {png}" in out and png.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["explain", "--head-dim", "64", "--gqa", "3", "--no-plot"], "heads: expected a multiple of the GQA group 3"),
        (["explain", "--seqlen", "0", "--no-plot"], "seqlen: expected a positive int"),
        (["explain", "--peak-tflops", "-1", "--no-plot"], "peak_tflops: expected a positive number"),
    ],
)
def test_cli_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bench_has_a_json_flag():
    res = subprocess.run([sys.executable, "-m", "tvmflash.cli", "bench", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--json PATH" in res.stdout


@pytest.mark.slow
def test_tensor_core_kernel_on_chip():
    """head_dim 128 float16: the tensor-core schedule's shared memory holds at least the Q, K and V
    tiles and fits an H100 SM; one thread per query row."""
    r = E.explain(KernelSpec(128), 4096, registers=False, sweep=(4096,))
    bm, bn, d = r.tiles["block_m"], r.tiles["block_n"], 128
    assert r.threads == bm
    assert (bm + 2 * bn) * d * 2 <= r.shared_bytes <= 227 * 1024
    assert r.fused.buffer("K").read == (4096 // bm) * 4 * 16 * 4096 * d * 2


def test_h200_is_the_h100_chip_with_faster_memory():
    """The H200 runs the sm_90 kernels (TVM's nvidia-h100 target): same compute roof, HBM3e at
    4.8 TB/s, so the ridge falls from ~295 to ~206 FLOP/B."""
    h100, h200 = E.get_gpu("h100"), E.get_gpu("h200")
    assert h200.target == h100.target and h200.peak_tflops == h100.peak_tflops
    assert h200.ridge == pytest.approx(206.1, abs=0.1) and h100.ridge == pytest.approx(295.3, abs=0.1)
    with pytest.raises(ValueError, match=r"gpu: expected one of \['a100', 'h100', 'h200'\], got 'b200'"):
        E.get_gpu("b200")
