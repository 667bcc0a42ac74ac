"""Inspecting the generated CUDA without a GPU: ``tvmflash inspect --cuda/--ptx/--resources`` on a
path, a cache key or spec flags, and ``Kernel.ptx()`` / ``Kernel.resources()``."""

import argparse
import json
import os
import re

import pytest

from tvmflash import KernelSpec, build
from tvmflash.compiler import nvcc
from tvmflash.cli import main
from tvmflash.runtime.kernel import Kernel, manifest_resources

from conftest import NVCC

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI without the CUDA toolkit)")

SPEC = KernelSpec(64, group=2, target="nvidia/nvidia-a100")
SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?main_kernel\(([^)]*)\)')


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A CUDA build (source embedded: the nvcc-dependent tests run nvcc themselves)."""
    out = tmp_path_factory.mktemp("inspect")
    so, manifest = build(SPEC, out, device_code="source")
    return so, json.loads(open(manifest).read())


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _resource_rows(out: str):
    """{(kernel, arch): (registers, spill stores, spill loads, stack frame)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\w+)\s+(sm_\w+)\s+(\d+)\s+(\d+) B\s+(\d+) B\s+(\d+) B", line)
        if m:
            rows[(m.group(1), m.group(2))] = tuple(int(g) for g in m.groups()[2:])
    return rows


def test_cuda_shows_the_kernel_signature(built, capsys):
    so, _ = built
    code, out, _ = _run(capsys, "inspect", so, "--cuda")
    assert code == 0
    params = SIGNATURE.search(out)
    assert params, out[:2000]
    assert re.findall(r"\* __restrict__ (\w+)_ptr", params.group(1)) == ["K", "LSE", "O", "Q", "V"]


@needs_nvcc
@pytest.mark.parametrize("arch", [None, "sm_90"])
def test_ptx_for_the_target_arch_or_another(built, capsys, arch):
    so, _ = built
    code, out, _ = _run(capsys, "inspect", so, "--ptx", *(["--arch", arch] if arch else []))
    assert code == 0
    assert f".target {arch or 'sm_80'}" in out
    assert re.search(r"\.visible \.entry main_kernel\(", out)


@needs_nvcc
def test_resources_parse_registers_and_spills_for_sm80_and_sm90(built, capsys):
    so, manifest = built
    code, out, _ = _run(capsys, "inspect", so, "--resources")
    assert code == 0 and "ptxas -v now" in out
    rows = _resource_rows(out)
    assert set(rows) == {("main_kernel", "sm_80"), ("main_kernel", "sm_90")}, out
    # the table agrees with ptxas run here directly
    direct = nvcc.resources(manifest["source"], ["sm_80"])["sm_80"]["main_kernel"]
    registers, stores, loads, stack = rows[("main_kernel", "sm_80")]
    assert (registers, stores, loads, stack) == (direct.registers, direct.spill_stores, direct.spill_loads,
                                                 direct.stack_frame)
    assert 0 < registers <= 255


@needs_nvcc
def test_resources_of_a_fatbin_build_come_from_its_ptxas_report(tmp_path, capsys):
    so, _ = build(SPEC, tmp_path, device_code="fatbin")
    code, out, _ = _run(capsys, "inspect", so, "--resources")
    assert code == 0 and "recorded at build" in out
    assert set(_resource_rows(out)) == {("main_kernel", "sm_80"), ("main_kernel", "sm_90")}


@needs_nvcc
def test_kernel_ptx_and_resources_from_python(built):
    _, manifest = built

    class NotLoaded:  # a CUDA module cannot be loaded without a GPU; inspection needs none
        def __getitem__(self, name):
            raise AssertionError("inspection must not touch the module")

    kernel = Kernel(NotLoaded(), {**manifest, "functions": []})
    assert ".target sm_80" in kernel.ptx()
    table = kernel.resources(["sm_90"])
    report = table["sm_90"]["main_kernel"]
    assert isinstance(report, nvcc.Resources) and report.arch == "sm_90" and report.registers > 0
    assert report.to_dict()["spill_stores"] == report.spill_stores


def test_spec_flags_build_into_the_cache(capsys):
    code, out, _ = _run(capsys, "inspect", "--head-dim", "32", "--dtype", "bfloat16", "--causal", "--gqa", "4",
                        "--target", "nvidia/nvidia-a100", "--cuda")
    assert code == 0 and SIGNATURE.search(out)
    key = KernelSpec(32, "bfloat16", causal=True, group=4, target="nvidia/nvidia-a100").key
    cache = os.environ["TVMFLASH_CACHE"]
    assert os.path.exists(os.path.join(cache, key + ".so")) and os.path.exists(os.path.join(cache, key + ".json"))
    # a second inspect by key reads the cached artifact
    code, out, _ = _run(capsys, "inspect", key)
    assert code == 0 and json.loads(out)["key"] == key


@pytest.mark.parametrize("flag", ["--ptx", "--resources"])
def test_cpu_kernel_has_no_ptx(capsys, flag):
    code, _, err = _run(capsys, "inspect", "--head-dim", "64", "--target", "cpu", flag)
    assert code == 2
    assert f"{flag}: expected a CUDA kernel, got fwd_f16_d64_g1_cpu" in err


def test_cpu_kernel_methods_name_what_is_needed():
    from tvmflash import get_kernel

    kernel = get_kernel(KernelSpec(64))
    with pytest.raises(NotImplementedError, match=r"ptx: expected a CUDA kernel, got fwd_f16_d64_g1_cpu"):
        kernel.ptx()
    with pytest.raises(NotImplementedError, match=r"resources: expected a CUDA kernel"):
        kernel.resources()


@pytest.mark.parametrize("flag", ["--ptx", "--resources"])
def test_missing_nvcc_is_named(built, capsys, monkeypatch, flag):
    monkeypatch.setattr(nvcc, "find_nvcc", lambda: None)
    code, _, err = _run(capsys, "inspect", built[0], flag)
    assert code == 2 and f"nvcc: {flag} needs the CUDA compiler" in err


def test_bad_arch_and_conflicting_arguments(built, capsys):
    so, manifest = built
    code, _, err = _run(capsys, "inspect", so, "--head-dim", "64")
    assert code == 2 and "PATH: expected either a built kernel or spec flags" in err
    with pytest.raises(ValueError, match=r"archs: expected CUDA archs such as 'sm_80,sm_90', got \['compute_80'\]"):
        manifest_resources(manifest, ["compute_80"])
    code, _, err = _run(capsys, "inspect", so, "--ptx", "--arch", "sm_80,sm_90")
    assert code == 2 and "arch: expected one CUDA arch such as 'sm_80', got 'sm_80,sm_90'" in err


def test_inspect_derivation_prints_the_steps(capsys):
    """``inspect --derivation``: Algorithm 0, the chain, the rolling update and the schedule."""
    from tvmflash import cli

    assert cli.main(["inspect", "--derivation", "--head-dim", "64", "--causal", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("=== ")]
    assert [t.split(".")[0] for t in titles] == ["=== 1", "=== 2", "=== 3", "=== 4"], titles
    first, third = out.index("=== 1"), out.index("=== 3")
    assert 'T.sblock("row_max")' in out[first:out.index("=== 2")]  # Algorithm 0's blocks
    assert 'T.sblock("state_update")' in out[third:out.index("=== 4")]  # the online softmax
    assert "combiner max, identity -inf" in out


def test_inspect_builds_a_softcap_kernel(capsys):
    from tvmflash import cli

    assert cli.main(["inspect", "--head-dim", "64", "--softcap", "--target", "cpu"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key"] == KernelSpec(64, softcap=True).key and shown["spec"]["softcap"] is True
    assert "softcap" in shown["arguments"]


def test_inspect_builds_window_and_alibi_kernels(capsys):
    from tvmflash import cli
    from tvmflash.builder.artifact import _argument_layout

    assert cli.main(["inspect", "--head-dim", "64", "--alibi", "--causal", "--target", "cpu"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key"] == KernelSpec(64, causal=True, alibi=True).key and shown["spec"]["alibi"] is True
    assert list(shown["arguments"])[:6] == ["q", "k", "v", "out", "lse", "alibi_slopes"]
    args = argparse.Namespace(head_dim=64, dtype="float16", causal=True, gqa=1, algorithm="fused", window=True)
    spec = cli._spec_from_args(args, "cpu")
    assert spec == KernelSpec(64, causal=True, window=True)
    layout = _argument_layout(spec)  # (a window kernel's CPU build is the slow one: not built here)
    assert "window_left" in layout and "window_right" not in layout
    assert "window_right" in _argument_layout(spec.replace(causal=False))
