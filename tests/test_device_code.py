"""What a CUDA build embeds for the GPU, on a machine without one: an nvcc fatbin or PTX in the
exported .so (loads with the driver alone), or the CUDA source when there is no nvcc."""

import hashlib
import json
import os

import pytest

from tvmflash import KernelSpec, build
from tvmflash.compiler import device_code, nvcc
from tvmflash.compiler.nvcc import parse_ptxas

from conftest import NVCC

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI without the CUDA toolkit)")

SPEC = KernelSpec(64, causal=True, target="nvidia/nvidia-a100")  # the plain CUDA schedule: builds in seconds


def _built(tmp_path, **kw):
    so, manifest = build(SPEC, tmp_path, **kw)
    return so, json.loads(open(manifest).read())


@needs_nvcc
def test_fatbin_for_sm80_and_sm90_is_in_the_exported_library(tmp_path):
    so, manifest = _built(tmp_path, device_code="fatbin")
    fmt, code = device_code.embedded_cuda_code(so)
    assert fmt == "fatbin"
    device = manifest["device_code"]
    assert device["form"] == "fatbin" and device["archs"] == ["sm_80", "sm_90"] and device["ptx"] == "compute_80"
    assert device["bytes"] == len(code) and device["sha256"] == hashlib.sha256(code).hexdigest()
    entries = nvcc.fatbin_entries(code)
    assert {("elf", "sm_80"), ("elf", "sm_90"), ("ptx", "sm_80")} <= set(entries), entries
    # the source stays readable: in the manifest (inspect --cuda) and beside the module
    assert 'extern "C" __global__' in manifest["source"]
    assert (tmp_path / f"{SPEC.key}.cu").read_text() == manifest["source"]
    # the build's own ptxas report, one entry per arch
    for arch in ("sm_80", "sm_90"):
        report = device["resources"][arch]["main_kernel"]
        assert report["arch"] == arch and 0 < report["registers"] <= 255


@needs_nvcc
def test_ptx_form_embeds_nul_terminated_ptx(tmp_path):
    so, manifest = _built(tmp_path, device_code="ptx", device_archs="sm_86")
    fmt, code = device_code.embedded_cuda_code(so)
    assert fmt == "ptx" and manifest["device_code"]["archs"] == ["sm_86"]
    assert code.endswith(b"\0") and b".target sm_86" in code and b".entry main_kernel(" in code


def test_without_nvcc_auto_embeds_the_source(tmp_path, monkeypatch):
    monkeypatch.setattr(nvcc, "find_nvcc", lambda: None)
    so, manifest = _built(tmp_path)
    assert manifest["device_code"]["form"] == "source"
    assert "nvcc not found" in manifest["device_code"]["why"] and "NVRTC" in manifest["device_code"]["load_needs"]
    assert device_code.embedded_cuda_code(so) == ("cuda", manifest["source"].encode())


def test_without_nvcc_asking_for_fatbin_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(nvcc, "find_nvcc", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"nvcc: device_code='fatbin' needs the CUDA compiler"):
        build(SPEC, tmp_path, device_code="fatbin")
    assert not list(tmp_path.iterdir()), "nothing is written when the build cannot start"


def test_explicit_source_form(tmp_path):
    so, manifest = _built(tmp_path, device_code="source")
    assert manifest["device_code"]["form"] == "source" and "why" not in manifest["device_code"]
    fmt, code = device_code.embedded_cuda_code(so)
    assert fmt == "cuda" and code.decode() == manifest["source"]


def test_bad_device_code_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"device_code: expected one of \('auto', 'fatbin', 'ptx', 'source'\), "
                                         r"got 'cubin'"):
        build(SPEC, tmp_path, device_code="cubin")
    with pytest.raises(ValueError, match=r"device_archs: expected CUDA archs such as 'sm_80,sm_90', got \['80'\]"):
        build(SPEC, tmp_path, device_code="fatbin", device_archs="sm_80,80")
    with pytest.raises(ValueError, match=r"device_code: expected 'auto' for a CPU target \(cpu\), got 'fatbin'"):
        build(KernelSpec(64), tmp_path, device_code="fatbin")
    with pytest.raises(ValueError, match=r"device_archs: expected None with device_code='source'"):
        build(SPEC, tmp_path, device_code="source", device_archs=["sm_80"])


def test_build_leaves_tvm_callback_and_environment_as_they_were(tmp_path, monkeypatch):
    import tvm_ffi

    monkeypatch.setenv("TVM_COMPILE_FORCE_FALLBACK", "0")
    before = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    build(SPEC, tmp_path, device_code="source")
    assert tvm_ffi.get_global_func("tvm_callback_cuda_compile").same_as(before)
    assert os.environ["TVM_COMPILE_FORCE_FALLBACK"] == "0"
    monkeypatch.delenv("TVM_COMPILE_FORCE_FALLBACK")
    with pytest.raises(RuntimeError, match="inside"):
        with device_code.cuda_source_modules():
            assert os.environ["TVM_COMPILE_FORCE_FALLBACK"] == "1"
            raise RuntimeError("inside")
    assert "TVM_COMPILE_FORCE_FALLBACK" not in os.environ


def test_cpu_build_has_no_device_code(tmp_path):
    _, manifest = build(KernelSpec(64), tmp_path)
    assert "device_code" not in json.loads(open(manifest).read())


def test_parse_ptxas_reads_every_kernel_and_arch():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'qk_kernel' for 'sm_80'
ptxas info    : Function properties for qk_kernel
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'pv_kernel' for 'sm_90'
ptxas info    : Function properties for pv_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""
    table = parse_ptxas(log)
    qk, pv = table["sm_80"]["qk_kernel"], table["sm_90"]["pv_kernel"]
    assert (qk.registers, qk.stack_frame, qk.spill_stores, qk.spill_loads, qk.shared_static, qk.barriers) == \
        (96, 24, 16, 12, 4096, 1)
    assert (pv.registers, pv.spill_stores, pv.shared_static) == (40, 0, 0)
    assert set(table) == {"sm_80", "sm_90"}


def test_fatbin_entries_rejects_other_data():
    with pytest.raises(ValueError, match=r"data: expected a fatbin \(magic 0xba55ed50\), got magic"):
        nvcc.fatbin_entries(b"//\n.version 9.0\n.target sm_80\n")


def test_default_archs():
    assert nvcc.default_archs("sm_80") == ("sm_80", "sm_90")
    assert nvcc.default_archs("sm_86") == ("sm_86", "sm_90")
    assert nvcc.default_archs("sm_90a") == ("sm_90a",)
    assert nvcc.default_archs("sm_100") == ("sm_100",)
