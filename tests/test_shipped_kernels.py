"""The kernels tvmflash ships, pinned, and measured by tuning as shipped.

``shipped_kernels.json`` holds the SHA-256 of the device code of each kernel built from a committed
tuning log (the eight GPU logs, each as its any-length and its even build, and the CPU log) and
of two hand-config builds, as the code before the schedule-rule refactor generated it (1f40b80):
CUDA source as generated, LLVM IR with its pointer names and debug line numbers left out. A
change of a shipped kernel fails here: say why in the commit, retune where the old records no
longer describe the kernel, and rewrite the fingerprint.

For each GPU build, the candidate tuning compiles from the same record (``measure.deployed_module``
through the tuner's own builder function) is the kernel ``build`` ships: identical CUDA source.
The H100 logs are the mma.sync rule's: at that target it ships its even builds, static shapes and
variants, and every dense any-length kernel where the Hopper rule is not registered; the tests
read them without the Hopper rule (``without_hopper``).
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

from tvmflash import KernelSpec, lower
from tvmflash.builder import compile_lowered
from tvmflash.compiler import device_source
from tvmflash.tuning import measure, records

#: the mma.sync kernel is what these tests read at the H100 target too (``without_hopper``)
pytestmark = pytest.mark.usefixtures("without_hopper")

FINGERPRINTS = json.loads((Path(__file__).parent / "shipped_kernels.json").read_text())


def _normalized(source: str) -> str:
    """LLVM IR without its debug information (source lines of the TensorIR's Python, whose
    statements a TVMScript macro shares) and with its metadata (TBAA, which it names by pointer,
    branch weights, loop hints) unnumbered: the instructions are compared, not the metadata."""
    source = re.sub(r'"0x[0-9a-f]+"', '"0xADDR"', source)
    source = re.sub(r", !dbg !\d+", "", source)
    source = re.sub(r"(?m)^\s*#dbg_\w+\(.*\n", "", source)
    source = re.sub(r"(?m)^!\d+ = .*\n", "", source)
    return re.sub(r"!(tbaa|prof|llvm\.loop) !\d+", r"!\1 !N", source)


def _sha256(source: str) -> str:
    return hashlib.sha256(_normalized(source).encode()).hexdigest()


@pytest.mark.parametrize("key", sorted(FINGERPRINTS))
def test_shipped_kernel_is_unchanged_and_tuning_measures_it(key):
    entry = FINGERPRINTS[key]
    spec = KernelSpec.from_dict(entry["spec"])
    assert spec.key == key
    lowered = lower(spec)
    assert lowered.tuning["source"] == entry["schedule"], lowered.tuning
    shipped = device_source(compile_lowered(lowered), spec)
    assert _sha256(shipped) == entry["sha256"], f"{key}: the shipped kernel changed"
    if not (spec.is_cuda and entry["schedule"] == "tuned record"):
        return
    # the candidate tuning times for this record at lengths this build serves (``deployed_times``)
    from tvmflash.builder import plan

    p = plan(spec)
    tuned = records.load_record(spec, p.rule, p.entry)
    mod, pass_config = measure.deployed_module(spec, tuned.tile, tuned.record.trace)
    assert pass_config == lowered.pass_config
    f_build = measure.candidate_build(spec)  # what the tuner's builder workers call (``make_builder``)
    candidate = next(m for m in f_build(mod, spec.tvm_target, None).imports if m.kind == "cuda").inspect_source()
    assert candidate == shipped, f"{key}: tuning measures another kernel than build ships"
