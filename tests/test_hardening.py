"""Hostile but realistic input: no crash, no silently wrong answer, no code from untrusted files.

Each test names what went wrong before. The inputs that crashed the process run in a subprocess,
and the test asserts on its exit status.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, build, load
from tvmflash.cli import main
from tvmflash.definition import attention_reference
from tvmflash.runtime.cache import ensure_built

from helpers import assert_close_to_reference, make_qkv

REPO = Path(__file__).resolve().parent.parent
torch = pytest.importorskip("torch")


def _python(code: str, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVMFLASH_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TVMFLASH_CACHE", str(path))
    return path


# -- crashes ------------------------------------------------------------------------------------


def test_misaligned_cpu_tensors_are_copied_not_a_crash(tmp_path):
    """torch tensors whose data is not 64-byte aligned (a storage offset, ``torch.from_numpy``)
    as q, k, v and out: the kernel gets aligned copies (it segfaulted in TVM's thread pool)."""
    res = _python("""
        import numpy as np, torch, tvmflash
        from helpers import make_qkv
        q, k, v = (torch.from_numpy(x) for x in make_qkv(np.random.default_rng(0), 2, 50, 70, 4, 2, 64, "float16"))
        def misaligned(x):
            buf = torch.zeros(x.numel() + 1, dtype=x.dtype)
            view = buf[1:].view(x.shape)
            view.copy_(x)
            assert view.data_ptr() % 64 != 0
            return view
        want = tvmflash.attention(q, k, v, causal=True)
        out = misaligned(torch.zeros_like(want))
        got = tvmflash.attention(misaligned(q), misaligned(k), misaligned(v), causal=True)
        tvmflash.get_kernel(tvmflash.KernelSpec(64, causal=True, group=2))(
            misaligned(q), misaligned(k), misaligned(v), out=out)
        assert torch.equal(got, want) and torch.equal(out, want)
        print("OK")
    """, tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout, (res.returncode, res.stderr[-3000:])


def test_truncated_module_in_the_cache_is_rebuilt_not_a_crash(tmp_path, monkeypatch):
    """A cached .so cut short on disk: rebuilt (loading it died with a Bus error)."""
    monkeypatch.setenv("TVMFLASH_CACHE", str(tmp_path / "cache"))
    so = Path(ensure_built(KernelSpec(32)) + ".so")
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    res = _python("""
        import numpy as np, tvmflash
        from helpers import make_qkv
        q, k, v = make_qkv(np.random.default_rng(0), 1, 40, 40, 2, 2, 32, "float16")
        out = tvmflash.attention(q, k, v)
        print(float(np.abs(out.astype("float64") - tvmflash.attention_reference(q, k, v)[0]).max()))
    """, tmp_path)
    assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
    assert float(res.stdout.splitlines()[-1]) < 4e-3


# -- the cache verifies what it loads --------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "garbage", "swapped"])
def test_damaged_or_swapped_cache_entry_is_rebuilt(damage, cache, rng):
    """An empty or garbage module failed on every call and was never rebuilt; a .so/.json pair of
    another key (the non-causal kernel under the causal key) computed the wrong attention."""
    spec, other = KernelSpec(32, causal=True), KernelSpec(32)
    base, other_base = ensure_built(spec), ensure_built(other)
    so = Path(base + ".so")
    if damage == "empty":
        so.write_bytes(b"")
    elif damage == "garbage":
        so.write_bytes(np.random.default_rng(1).bytes(so.stat().st_size))
    else:
        for ext in (".so", ".json"):
            shutil.copy(other_base + ext, base + ext)
    kernel = load(ensure_built(spec) + ".so")
    assert kernel.spec == spec
    q, k, v = make_qkv(rng, 1, 60, 45, 2, 2, 32, "float16")
    out, lse = kernel(q, k, v, return_lse=True)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")
    files = json.loads(Path(base + ".json").read_text())["files"]
    assert files["so"]["bytes"] == so.stat().st_size and len(files["so"]["sha256"]) == 64


def test_a_stale_cache_entry_of_another_rule_or_config_is_rebuilt(cache, monkeypatch):
    """A kernel cached under a key, built by a rule or config the plan no longer names (a rule
    registered since, a retuned log): rebuilt, not reused."""
    from tvmflash.rules import fused_cpu

    spec = KernelSpec(32)
    base = ensure_built(spec)
    before = json.loads(Path(base + ".json").read_text())["schedule"]["config"]
    monkeypatch.setattr(fused_cpu.FusedCpu, "default_config",
                        lambda self, s: fused_cpu.CpuConfig(block_m=16, block_n=32))
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", "off")
    after = json.loads(Path(ensure_built(spec) + ".json").read_text())["schedule"]["config"]
    assert before["block_m"] == 32 and after["block_m"] == 16


def test_load_refuses_a_module_its_manifest_does_not_describe(tmp_path):
    """``tvmflash.load`` of a user's file whose module does not match its manifest: refused,
    never loaded (loading runs the module's code)."""
    so, _ = build(KernelSpec(32), tmp_path)
    with open(so, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match=r"path: .*\.so is \d+ bytes, its manifest says \d+: damaged or replaced"):
        load(so)
    data = bytearray(Path(so).read_bytes()[:-1])
    data[100] ^= 0xFF
    Path(so).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256 its manifest records"):
        load(so)


def test_lock_file_symlink_is_not_followed(cache):
    """``KEY.lock`` was opened with open(..., "w"), which followed a symlink and truncated its
    target."""
    spec = KernelSpec(32)
    cache.mkdir(mode=0o700)
    victim = cache.parent / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, cache / f"{spec.key}.lock")
    with pytest.raises(PermissionError, match="lock: expected a file, got a symbolic link"):
        ensure_built(spec)
    assert victim.read_text() == "precious"


def test_keys_are_file_names():
    """A target's mcpu of ``../..`` went into the file name."""
    spec = KernelSpec(32, target='{"kind": "llvm", "mcpu": "../../etc"}')
    assert "/" not in spec.key and ".." not in spec.key and spec.key.startswith("fwd_f16_d32_g1_cpu_")


def test_a_killed_builds_temporary_files_are_cleaned(tmp_path):
    spec = KernelSpec(32)
    left = [tmp_path / f".{spec.key}.abc123{ext}" for ext in (".so", ".json", ".cu")]
    for path in left:
        path.write_bytes(b"half")
    build(spec, tmp_path)
    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{spec.key}{ext}" for ext in (".json", ".lock", ".so"))


def test_the_cache_directory_is_private(cache):
    ensure_built(KernelSpec(32))
    assert cache.stat().st_mode & 0o777 == 0o700
    cache.chmod(0o777)
    with pytest.raises(PermissionError, match=r"TVMFLASH_CACHE: expected a directory only its owner may write to"):
        ensure_built(KernelSpec(32))


# -- tuning logs are input ---------------------------------------------------------------------------


def test_a_trace_with_foreign_code_is_refused(tmp_path, monkeypatch):
    """A tuning-log trace that annotates ``pragma_import_llvm`` (LLVM IR linked into the kernel)
    was replayed: now refused, naming the record."""
    from tvmflash._compat import Schedule, ms
    from tvmflash.rules import rule_for
    from tvmflash.tuning import rank, records, space as SP

    spec = KernelSpec(32)
    shape = SP.Shape(1, 64, 64, 2, 2)
    mod = SP.workload(spec, (32, 64), shape)
    sch = Schedule(mod, seed=1)
    SP.space_for(spec).sch_fn((32, 64))(sch)
    config = rank.identify_config(SP.space_for(spec), (32, 64), sch, mod)
    sch.annotate(sch.get_loops("tile")[0], "pragma_import_llvm", "define void @payload() { ret void }")
    db = ms.database.MemoryDatabase()
    record = ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [1e-3], spec.tvm_target,
                                      ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    meta = {"key": spec.key, "spec": spec.to_dict(), "rule": rule_for(spec).name, "shape": shape.to_dict(),
            "softmax_scale": SP.softmax_scale(spec), "trials": 1, "device": "test", "date": records.now(),
            "tiles": [{"config": config, "run_ms": 1.0, "tflops": 1.0}]}
    vdir = records.write_variant(tmp_path / "logs", spec, meta, [record])
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "logs"))
    with pytest.raises(records.UntrustedTrace, match=rf"the record of tile 32x64 in {re.escape(str(vdir))}: the "
                                                     r"trace annotates 'pragma_import_llvm', which rule fused_cpu "
                                                     r"never writes"):
        build(spec, tmp_path / "out")
    assert not (tmp_path / "out" / f"{spec.key}.so").exists()


@pytest.mark.parametrize("line, error", [
    ('[0, [1, 2, 3]]\n', r"database_tuning_record.json, line 1: TVM cannot read"),
    (None, r"database_workload.json: not a text file"),
    ('["0x1", "%%%not base64%%%"]\n', r"database_workload.json, line 1: the workload is not base64"),
], ids=["wrong-record", "binary-workloads", "bad-base64"])
def test_a_damaged_tuning_database_names_its_file_and_line(line, error, tmp_path, capsys):
    """A well-formed but wrong database line raised a raw TVM RuntimeError, a binary workload
    file a UTF-8 error with no path, bad base64 std::bad_alloc."""
    from tvmflash.tuning import records

    work = tmp_path / "work"
    work.mkdir()
    if error.startswith("database_tuning_record"):
        src = REPO / "tuning_logs" / "cpu_znver3" / "fwd_f16_d64_g1_cpu_znver3"
        import lzma

        (work / records.WORKLOADS).write_bytes(lzma.decompress((src / (records.WORKLOADS + records.XZ)).read_bytes()))
        (work / records.RECORDS).write_text(line)
    elif line is None:
        (work / records.WORKLOADS).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    else:
        (work / records.WORKLOADS).write_text(line)
    code = main(["tune", "--target", "cpu", "--head-dim", "32", "--trials", "1", "--tiles", "32x64",
                 "--work-dir", str(work), "--logs-dir", str(tmp_path / "logs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(work) in err
    assert re.search(error, err), err


# -- silently wrong numbers ----------------------------------------------------------------------


def test_outputs_that_share_memory_with_inputs_are_refused(rng):
    """``out=`` overlapping k or v gave errors of 0.3; ``lse=`` overlapping q gave NaNs."""
    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, 1, 16, 16, 2, 2, 64, "float16"))
    kernel = tvmflash.get_kernel(KernelSpec(64))
    with pytest.raises(ValueError, match="out: expected a buffer of its own, got one that shares memory with k"):
        kernel(q, k, v, out=k)
    lse_over_q = q.view(torch.float32).reshape(-1)[: 2 * 16].view(1, 2, 16)
    with pytest.raises(ValueError, match="lse: expected a buffer of its own, got one that shares memory with q"):
        kernel(q, k, v, lse=lse_over_q)
    qn, kn, vn = (x.numpy() for x in (q, k, v))
    with pytest.raises(ValueError, match="out: expected a buffer of its own, got one that shares memory with v"):
        kernel(qn, kn, vn, out=vn)


@pytest.mark.parametrize("scale", [1e-50, 3.4e38])
def test_softmax_scale_the_kernels_cannot_represent_is_refused(scale, rng):
    """1e-50 and 3.4e38 passed the positive-finite check in float64, then became 0 or overflowed
    in float32: every output NaN."""
    q, k, v = make_qkv(rng, 1, 8, 8, 2, 2, 32, "float16")
    with pytest.raises(ValueError, match=r"softmax_scale: expected 1\.175e-38 to 2\.359e\+38"):
        tvmflash.attention(q, k, v, softmax_scale=scale)
    out = tvmflash.attention(q, k, v, softmax_scale=1e30)  # large but representable: finite
    assert np.isfinite(out.astype(np.float32)).all()


def test_argument_kinds(rng):
    q, k, v = make_qkv(rng, 1, 8, 8, 2, 2, 32, "float16")
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got str \('yes'\)"):
        tvmflash.attention(q, k, v, return_lse="yes")
    with pytest.raises(TypeError, match=r"return_lse: expected a bool, got int"):
        tvmflash.get_kernel(KernelSpec(32))(q, k, v, return_lse=1)
    # numpy bools are bools (they said "expected a bool, got bool")
    out, lse = tvmflash.attention(q, k, v, causal=np.True_, return_lse=np.bool_(True))
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")
    # the argument whose dtype is wrong is named: q float32 with k float16 is q's error
    with pytest.raises(TypeError, match=r"^q: expected dtype float16 or bfloat16, got float32$"):
        tvmflash.attention(q.astype(np.float32), k, v)
    # a meta tensor: no device to run on (it raised torch's "Torch not compiled with CUDA enabled")
    meta = torch.empty(1, 8, 2, 32, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"q: expected a CPU or CUDA tensor, got one on device meta"):
        tvmflash.attention(meta, meta, meta)


# -- a newcomer's rough edges ------------------------------------------------------------------------


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    """``tvmflash inspect ... | head`` ended in a BrokenPipeError traceback (here the reader is
    gone before the first write)."""
    so, _ = build(KernelSpec(32), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m tvmflash.cli inspect {so} --tir | head -c 0"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]


@pytest.mark.skipif(__import__("conftest").HAS_CUDA, reason="this machine has a GPU")
def test_loading_a_cuda_kernel_without_a_gpu_says_so(tmp_path):
    """It gave TVM's "loader of that name is not registered"."""
    so, _ = build(KernelSpec(64, target="nvidia/nvidia-a100"), tmp_path, device_code="source")
    with pytest.raises(RuntimeError, match=r"is a CUDA kernel .*: loading it needs a CUDA GPU and its driver"):
        load(so)


def test_inspect_of_a_missing_file_says_it_does_not_exist(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing.so")]) == 2
    assert f"PATH: {tmp_path / 'nothing.so'} does not exist" in capsys.readouterr().err


def test_every_command_defaults_to_one_target(monkeypatch):
    """explain defaulted to the H100 while build and demo defaulted to the A100."""
    import argparse

    from tvmflash import cli

    seen, real = {}, argparse.ArgumentParser.parse_args
    for command, extra in (("build", ["-o", "x"]), ("tune", []), ("explain", []), ("inspect", [])):
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _capture(seen, command, real))
        main([command, *extra])
    assert seen["build"].target == "nvidia/nvidia-a100" and seen["tune"].target == ["nvidia/nvidia-a100"]
    assert cli._INSPECT_DEFAULTS["target"] == "nvidia/nvidia-a100"
    from tvmflash.analysis.roofline import get_gpu

    assert get_gpu(seen["explain"].gpu).target == "nvidia/nvidia-a100"


def _capture(seen, command, real):
    def parse(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        seen[command] = ns
        ns.func = lambda a: 0
        return ns

    return parse


def test_dtype_spellings_are_accepted(monkeypatch, capsys):
    """``--dtype fp16`` is a likely spelling and was refused."""
    import argparse

    seen, real = {}, argparse.ArgumentParser.parse_args
    for spelling, dtype in (("fp16", "float16"), ("BF16", "bfloat16"), ("half", "float16")):
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _capture(seen, spelling, real))
        main(["build", "--dtype", spelling, "-o", "x"])
        assert seen[spelling].dtype == dtype
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
    with pytest.raises(SystemExit):
        main(["build", "--dtype", "fp8", "-o", "x"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
