"""The command line, run as a user would."""

import collections
import json
import os
import subprocess
import sys

import pytest

from tvmflash.cli import main


def tvmflash(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tvmflash.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_demo_builds_both_and_checks_cpu(tmp_path):
    res = tvmflash("demo", "--head-dim", "64", "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "-> OK" in res.stdout
    assert f"manifest:    {tmp_path / 'fwd_f16_d64_g1_sm80.json'}" in res.stdout  # as README says
    assert (tmp_path / "fwd_f16_d64_g1_sm80.so").exists()
    assert (tmp_path / "fwd_f16_d64_g1_sm80.cu").exists()
    assert any(p.name.startswith("fwd_f16_d64_g1_cpu") and p.suffix == ".so" for p in tmp_path.iterdir())


def test_build_then_inspect(tmp_path, capsys):
    assert main(["build", "--target", "nvidia/nvidia-a100", "--head-dim", "128", "--causal", "--gqa", "4",
                 "--dtype", "bfloat16", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    key = "fwd_bf16_d128_causal_g4_sm80"
    assert f"built {key}" in out and str(tmp_path / f"{key}.so") in out
    manifest = json.loads((tmp_path / f"{key}.json").read_text())
    assert manifest["spec"]["group"] == 4 and manifest["tvm_version"].startswith("0.27")

    assert main(["inspect", str(tmp_path / f"{key}.so"), "--cuda"]) == 0
    cuda = capsys.readouterr().out
    assert '__global__ void' in cuda and "main_kernel" in cuda
    assert main(["inspect", str(tmp_path / key), "--tir-before"]) == 0
    before = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / f"{key}.json"), "--tir"]) == 0
    after = capsys.readouterr().out
    assert 'T.sblock("tile")' in before and "blockIdx.x" not in before
    assert "blockIdx.x" in after


def test_build_standard_cpu(tmp_path, capsys):
    assert main(["build", "--target", "cpu", "--head-dim", "64", "--algorithm", "standard", "-o",
                 str(tmp_path)]) == 0
    assert "built std_f16_d64_g1_cpu" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--head-dim", "48", "-o", "x"], "head_dim: expected one of"),
        (["build", "--target", "nvidia/no-such-gpu", "-o", "x"], "target: expected 'cpu', a TVM tag"),
        (["build", "--gqa", "0", "-o", "x"], "group: expected a positive int"),
        (["inspect", "no/such/kernel.so", "--cuda"], "PATH: no/such/kernel.so does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "tvm        0.27" in out and "tvm-ffi    0.1.14" in out


@pytest.mark.parametrize("extra", [[], ["--memory"]])
def test_bench_without_gpu_says_what_it_needs(extra, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench would run")
    assert main(["bench", *extra]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_put_every_method_after_every_other_equally_often(n):
    from tvmflash.analysis.bench import balanced_orders

    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = collections.Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1, follows
    assert len(orders) == (n if n % 2 == 0 else 2 * n)


def test_bench_samples_methods_in_balanced_orders(monkeypatch):
    """Round r takes the methods in balanced order r, so no method always runs right after the
    same one (a rotated order kept each method behind one neighbour: "tvmflash fused" always ran
    after SDPA's cuDNN backend); a method that raises is reported, not sampled."""
    torch = pytest.importorskip("torch")
    from tvmflash.analysis import bench

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = []
    monkeypatch.setattr(bench, "_sample_ms", lambda fn, calls=10: (seen.append(fn()), float(len(seen)))[1])

    def broken():
        raise MemoryError("out of memory")

    fns = {"a": lambda: "a", "oom": broken, "b": lambda: "b", "c": lambda: "c"}
    times = bench._time_interleaved(fns, warmup=1, reps=6)
    rounds = ["".join(seen[i:i + 3]) for i in range(0, 18, 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "acb", "bac"]
    after = collections.Counter((x, y) for r in rounds for x, y in zip(r, r[1:]))
    assert after == {tuple(pair): 2 for pair in ("ab", "bc", "ca", "cb", "ba", "ac")}
    assert isinstance(times["oom"], MemoryError)
    # medians of each method's sample values (the running count when it was sampled)
    assert (times["a"], times["b"], times["c"]) == (10.0, 10.0, 8.5)


@pytest.mark.parametrize("seq_q, seq_k, causal, window", [
    (300, 300, False, (-1, -1)), (300, 300, True, (-1, -1)), (200, 500, True, (50, -1)), (500, 200, False, (30, 7)),
    (100, 100, False, (0, 0)), (64, 640, False, (-1, 3)),
])
def test_bench_counts_the_visible_scores(seq_q, seq_k, causal, window):
    """The FLOPs of a windowed method count the scores its window leaves, per score as the
    reference's mask has them."""
    import numpy as np

    from tvmflash.analysis.bench import visible_scores

    left, right = window
    right = 0 if causal else right
    diag = np.arange(seq_q)[:, None] + seq_k - seq_q
    cols = np.arange(seq_k)[None, :]
    seen = np.ones((seq_q, seq_k), bool)
    if right >= 0:
        seen &= cols <= diag + right
    if left >= 0:
        seen &= cols >= diag - left
    assert visible_scores(seq_q, seq_k, causal, window) == int(seen.sum())


def test_bench_models_knows_its_models_and_says_which_are_unknown():
    from tvmflash.analysis.bench import MODELS, bench_models

    assert {"Llama-3-8B", "Qwen2-7B", "Mistral-7B", "Gemma-2-9B", "Phi-3-mini", "GPT-2"} <= set(MODELS)
    assert MODELS["Gemma-2-9B"] == (16, 8, 256, 50.0, 4096)
    with pytest.raises(ValueError, match=r"models: expected names among .*, got \['Llama-9'\]"):
        bench_models(["Llama-9"])
