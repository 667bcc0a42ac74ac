"""MetaSchedule tuning without a GPU: the design spaces, trace replay on the dynamic-shape
function, candidates measured as build ships them, ranking and validation on synthetic records,
build from the logs, and the logs committed to the repository (the real tuning runs:
``test_tune_e2e``). One test (marker ``gpu``) tunes a tiny CUDA run."""

import functools
import json
import os
import types
from pathlib import Path

import pytest

from tvmflash import KernelSpec, build, load, lower
from tvmflash import _compat
from tvmflash import definition as D
from tvmflash.cli import main
from tvmflash.compiler import compile_module, device_code, nvcc as nvcc_mod
from tvmflash.definition import attention_reference
from tvmflash.rules import base as rules_base, rule_for
from tvmflash._compat import Schedule, ms, structural_equal, tvm
from tvmflash.tuning import TuneOptions, measure, rank, records, search, tune
from tvmflash.tuning import space as SP

from conftest import NVCC
from helpers import assert_close_to_reference, check_numerics, make_qkv, spec_id

#: the committed H100 logs are the mma.sync rule's (``without_hopper``)
pytestmark = pytest.mark.usefixtures("without_hopper")

REPO = Path(__file__).resolve().parent.parent
SHAPE = SP.Shape(1, 128, 128, 2, 2)  # small enough for a shared 2-core CI machine


def _sampled(spec, tile, seed, shape=SHAPE):
    """A point of the design space of ``tile``: the schedule function with sampled knobs."""
    sch = Schedule(SP.workload(spec, tile, shape), seed=seed)
    assert SP.space_for(spec).sch_fn(tile)(sch) is None  # traced: applied in place
    return sch


def _replay(trace, spec, tile):
    sch = Schedule(D.fused_attention(spec, *tile))
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


# -- the design space ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    KernelSpec(32), KernelSpec(64, causal=True), KernelSpec(128, group=4), KernelSpec(256, dtype="bfloat16"),
    KernelSpec(128, target="nvidia/nvidia-a100"), KernelSpec(128, target="nvidia/nvidia-h100", causal=True),
    KernelSpec(64, target="nvidia/nvidia-a100"), KernelSpec(256, target="nvidia/nvidia-a100", dtype="bfloat16"),
], ids=spec_id)
def test_hand_config_is_a_point_of_the_space(spec):
    """Tuned and hand-config builds share one schedule rule; the space holds the hand config."""
    rule = rule_for(spec)
    cfg = rule.default_config(spec)
    space = SP.space_for(spec)
    assert space.name == rule.name
    tile = (cfg.block_m, cfg.block_n)
    assert tile in space.tiles, f"hand tile {tile} not among {space.tiles}"
    for knob, candidates in space.knobs(*tile).items():
        assert getattr(cfg, knob) in candidates, f"{knob}={getattr(cfg, knob)} not among {candidates}"


def test_workload_is_static_the_built_function_is_not():
    """MetaSchedule allocates arguments from concrete buffer shapes and passes no scalar: the
    dynamic function cannot be measured (TVM 0.27), its specialisation can."""
    spec = KernelSpec(64, group=2)
    mod = SP.workload(spec, (32, 64), SP.Shape(3, 200, 300, 4, 2))
    infos = [info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    assert infos == [
        ["TENSOR", "float16", [3, 200, 4, 64]], ["TENSOR", "float16", [3, 300, 2, 64]],
        ["TENSOR", "float16", [3, 300, 2, 64]], ["TENSOR", "float16", [3, 200, 4, 64]],
        ["TENSOR", "float32", [3, 4, 200]],
    ]
    with pytest.raises(Exception):
        ms.arg_info.ArgInfo.from_prim_func(D.fused_attention(spec, 32, 64))


@pytest.mark.parametrize("spec", [KernelSpec(64, causal=True, group=2), KernelSpec(32, dtype="bfloat16")],
                         ids=spec_id)
def test_sampled_trace_replays_on_the_dynamic_function(spec, rng):
    """A trace found on the workload (static shapes) is a schedule of the dynamic function:
    compiled, it is correct on other lengths, batch and heads than those measured."""
    tile = (32, 64)
    shape = SP.Shape(1, 128, 128, 2, 2 // spec.group)
    for seed in (1, 2):
        sch = _sampled(spec, tile, seed, shape)
        check_numerics(_replay(sch.trace, spec, tile).mod, spec, rng)


def test_mutated_decision_changes_the_schedule_and_names_its_config():
    spec = KernelSpec(64)
    tile = (32, 64)
    space = SP.space_for(spec)
    mod = SP.workload(spec, tile, SHAPE)
    sch = _sampled(spec, tile, seed=3)
    mutated = search.MutateCategorical(seed=0).apply(sch.trace)
    assert mutated is not None
    before = rank.identify_config(space, tile, types.SimpleNamespace(trace=sch.trace), mod)
    after = rank.identify_config(space, tile, types.SimpleNamespace(trace=mutated), mod)
    assert before is not None and after is not None and before != after
    # the config is the sampled decisions, in the order the knobs are sampled
    decided = [inst.attrs[0][int(sch.trace.decisions[inst])] for inst in sch.trace.insts
               if inst.kind.name == "SampleCategorical"]
    assert [before[k] for k in space.knobs(*tile)] == [int(x) for x in decided]
    # and the hand schedule with that config is that very schedule
    hand = space.schedule(mod["main"], space.config(*tile, **{k: before[k] for k in space.knobs(*tile)}))
    assert structural_equal(hand.mod, sch.mod)


def test_enumerated_space_is_one_design_space_per_config():
    """Rules whose schedule builds its own Schedule (the CUDA ones) get a design space per
    config value; each replays on the dynamic function and compiles for CUDA (no GPU needed)."""
    spec = KernelSpec(32, target="nvidia/nvidia-a100")
    space = SP.space_for(spec)
    assert space.name == "fused_cuda_mma" and space.apply is None
    tile = space.tiles[0]
    spaces = space.sch_fn(tile)(Schedule(SP.workload(spec, tile, SHAPE)))
    assert len(spaces) == space.size(tile) >= 1
    from tvmflash.compiler import compile_module

    ex = compile_module(_replay(spaces[0].trace, spec, tile).mod, spec.tvm_target, rule_for(spec).pass_config(spec))
    assert any(m.kind == "cuda" for m in ex.mod.imports)


def test_verify_gpu_code_needs_the_opt_in_shared_memory_limit():
    """TVM's tags give the 48 KB static shared-memory limit; the tensor-core space checks its
    candidates against the arch's opt-in limit instead."""
    spec = KernelSpec(128, target="nvidia/nvidia-a100")
    target = SP.space_for(spec).target(spec.tvm_target)
    assert int(spec.tvm_target.attrs["max_shared_memory_per_block"]) == 49152
    assert int(target.attrs["max_shared_memory_per_block"]) == rules_base.SHARED_MEMORY_OPT_IN["sm_80"]
    assert str(target.attrs["arch"]) == "sm_80"


#: (tile, kv_buffers) of the head-dim-128 space that TVM 0.27 cannot compile: StorageRewrite
#: shares one shared.dyn allocation between a float16 and a float32 buffer ("tvm_access_ptr
#: element type must match the source buffer", docs/tvm-0.27.md). Tuning logs them as failed
#: candidates.
STORAGE_REWRITE_FAILS = {((128, 128), 2), ((64, 64), 2)}


@pytest.mark.slow
def test_cuda_tensor_core_space_compiles():
    """The design spaces of the tensor-core schedule replay on the dynamic function, compile to
    mma.sync CUDA and pass VerifyGPUCode unless their shared memory exceeds the arch's
    (double-buffered K/V of 128 keys at head dim 128 on sm_80): what `tvmflash tune --target
    nvidia/nvidia-a100 --head-dim 128` measures on a GPU. Every knob value of the hand tile; for
    the other tiles the double-buffered K/V, whose shared memory decides what fits."""
    spec = KernelSpec(128, target="nvidia/nvidia-a100")
    space = SP.space_for(spec)
    rule_for(spec).prepare(spec)
    target = space.target(spec.tvm_target)
    row = (spec.head_dim + 8) * 2  # bytes per padded row of a Q/K/V tile (storage_align)
    hand = rule_for(spec).default_config(spec)
    for tile in space.tiles:
        mod = SP.workload(spec, tile, SP.Shape(4, 4096, 4096, 16, 16))
        assert len(space.configs(tile)) == space.size(tile)
        configs = [c for c in space.configs(tile) if tile == (hand.block_m, hand.block_n)
                   or (c.vec, c.stages, c.kv_buffers) == (hand.vec, hand.stages, 2)]
        for config in configs:
            sch = space.schedule(mod["main"], config)
            ctx = _compat.tune_context(mod, target, ms.space_generator.ScheduleFn(lambda s: None, sch_rules=[],
                                       postprocs=[], mutator_probs={}), None, "t", 0, 1, None)
            verify = ms.postproc.VerifyGPUCode()
            verify._initialize_with_tune_context(ctx)
            tiles_bytes = tile[0] * row + 2 * config.kv_buffers * tile[1] * row
            fits = (tiles_bytes <= rules_base.SHARED_MEMORY_OPT_IN["sm_80"]
                    and (tile, config.kv_buffers) not in STORAGE_REWRITE_FAILS)
            assert verify.apply(sch) == fits, f"VerifyGPUCode on {config} ({tiles_bytes} bytes of Q/K/V tiles)"
            dyn = _replay(sch.trace, spec, tile)
            pass_config = rule_for(spec).pass_config(spec)
            if (tile, config.kv_buffers) in STORAGE_REWRITE_FAILS:
                with pytest.raises(tvm.error.InternalError, match="tvm_access_ptr element type must match"):
                    compile_module(dyn.mod, spec.tvm_target, pass_config)
                continue
            ex = compile_module(dyn.mod, spec.tvm_target, pass_config)
            cuda = next(m for m in ex.mod.imports if m.kind == "cuda").inspect_source()
            assert "mma.sync.aligned.m16n8k16" in cuda
    # MetaSchedule's build workers compile without TVM's intrinsics module (our own index map)
    builder = ms.builder.LocalBuilder(max_workers=1, initializer=measure.build_worker_init,
                                      f_build=functools.partial(measure.build_candidate,
                                                                pass_config=rule_for(spec).pass_config(spec)))
    (result,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    assert result.error_msg is None, result.error_msg
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout as tvm_layout
    for i in range(16):
        for j in range(16):
            assert measure.fragment_lane_register(i, j) == tuple(tvm_layout(i, j))


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_candidates_are_measured_as_the_machine_code_build_embeds(tmp_path):
    """Where ``build`` embeds nvcc's fatbin, tuning's builder exports each candidate with the
    fatbin of the same archs and flags in place of its CUDA source (NVRTC's code for the source
    ran 5-15% slower on the H100 and ranked configs differently)."""
    import tarfile

    from tvm.support import cc

    spec = KernelSpec(64, target="nvidia/nvidia-a100")
    form, archs = measure.candidate_device_code(spec)
    assert (form, archs) == ("fatbin", ("sm_80", "sm_90"))
    space = SP.space_for(spec)
    rule_for(spec).prepare(spec)
    mod = SP.workload(spec, (128, 64), SP.Shape(1, 256, 256, 2, 2))
    sch = space.schedule(mod["main"], rule_for(spec).default_config(spec))
    (result,) = measure.make_builder(spec, 1, 300).build([ms.builder.BuilderInput(sch.mod, space.target(spec.tvm_target))])
    assert result.error_msg is None, result.error_msg
    with tarfile.open(result.artifact_path) as tar:
        tar.extractall(tmp_path / "x")
    so = tmp_path / "candidate.so"
    cc.create_shared(str(so), [str(f) for f in (tmp_path / "x").iterdir()])
    fmt, code = device_code.embedded_cuda_code(str(so))
    assert fmt == "fatbin"
    assert {("elf", "sm_80"), ("elf", "sm_90")} <= set(nvcc_mod.fatbin_entries(code))


def test_candidates_are_ranked_at_the_bench_lengths():
    """On a GPU the best candidates are timed as built at 1k, 4k and 16k (the measured shape's
    tokens and heads) and ranked by the geometric mean; the CPU ranks at the measured shape."""
    gpu = KernelSpec(128, target="nvidia/nvidia-h100")
    shapes = rank.rank_shapes(gpu, SP.default_shape(gpu))
    assert [(s.batch, s.seq_q, s.seq_k, s.heads) for s in shapes] == [
        (4, 4096, 4096, 16), (16, 1024, 1024, 16), (1, 16384, 16384, 16)]
    cpu = KernelSpec(64)
    assert rank.rank_shapes(cpu, SP.default_shape(cpu)) == [SP.default_shape(cpu)]
    # faster at the measured length, slower overall: ranked second
    a = rank.TileResult((128, 64), None, 1.0, secs_at={4096: 1.0, 1024: 0.5, 16384: 8.0})
    b = rank.TileResult((128, 128), None, 1.1, secs_at={4096: 1.1, 1024: 0.3, 16384: 5.0})
    untimed = rank.TileResult((64, 64), None, 0.1)
    assert b.rank_secs == pytest.approx((1.1 * 0.3 * 5.0) ** (1 / 3))
    assert sorted([untimed, a, b], key=rank.rank_key) == [b, a, untimed]
    result = rank.TuneResult(gpu, shapes[0], "", 0, 0, 0, tiles=[untimed, a, b])
    assert result.best is b


def test_candidates_carry_the_source_where_build_would(monkeypatch):
    """Without nvcc, ``build`` embeds the source (NVRTC compiles it when loaded): so do candidates."""
    monkeypatch.setattr(nvcc_mod, "find_nvcc", lambda: None)
    assert measure.candidate_device_code(KernelSpec(64, target="nvidia/nvidia-a100")) == ("source", ())
    assert measure.candidate_device_code(KernelSpec(64, target="cpu"))[0] == "host"
    with pytest.raises(ValueError, match="form: expected 'fatbin', 'source' or 'host', got 'cubin'"):
        measure.export_candidate(None, "cubin")


@pytest.mark.slow
def test_cuda_log_round_trip_builds(tmp_path, monkeypatch):
    """A CUDA log (its record made here: no GPU to measure) through the JSON database, the
    readable schedule and `build`: the tensor-core trace replays from disk and compiles."""
    spec = KernelSpec(128, causal=True, target="nvidia/nvidia-a100")
    space = SP.space_for(spec)
    rule_for(spec).prepare(spec)
    tile, shape = (128, 32), SP.Shape(1, 1024, 1024, 16, 16)
    mod = SP.workload(spec, tile, shape)
    sch = space.sch_fn(tile)(Schedule(mod))[1]
    db = ms.database.MemoryDatabase()
    record = ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [2e-3], space.target(spec.tvm_target),
                                      ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    config = rank.identify_config(space, tile, record, mod)
    assert config == {"block_m": 128, "block_n": 32, "num_warps": 4, "vec": 8, "stages": 2, "kv_buffers": 2}
    meta = {"key": spec.key, "spec": spec.to_dict(), "rule": space.name, "shape": shape.to_dict(),
            "softmax_scale": SP.softmax_scale(spec), "trials": 1, "device": "none (test)",
            "tvm_version": _compat.TVM_VERSION, "tvm_ffi_version": _compat.TVM_FFI_VERSION, "date": records.now(),
            "tiles": [{"config": config, "run_ms": 2.0, "tflops": shape.flops(spec) / 2e-3 / 1e12}]}
    records.write_variant(tmp_path / "logs", spec, meta, [record])
    py = records.write_schedule_py(tmp_path / "sched.py", spec, space.name, meta["tiles"][0], meta, record.trace,
                                   "tuning_logs/x")
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "logs"))
    _, manifest = build(spec, tmp_path / "out")
    schedule = json.loads(Path(manifest).read_text())["schedule"]
    assert schedule["source"] == "tuned record" and schedule["config"] == config
    assert "mma.sync.aligned.m16n8k16" in (tmp_path / "out" / f"{spec.key}.cu").read_text()
    scope: dict = {}
    exec(py.read_text(), scope)
    readable = Schedule(D.fused_attention(spec, *tile))
    scope["apply"](readable)
    assert structural_equal(readable.mod, lower(spec).mod)


# -- the work dir and the logs, without measuring ------------------------------------------


def _fake_records(db, spec, tile, n, shape=SHAPE, secs=1e-3):
    """Commit ``n`` records of sampled schedules of ``tile`` as if measured (no build, no run)."""
    mod = SP.workload(spec, tile, shape)
    workload = db.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    for i in range(n):
        trace = _sampled(spec, tile, seed=10 + i, shape=shape).trace
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [secs * (1 + i)], spec.tvm_target, args))
    return mod


def test_validation_rejects_a_wrong_schedule(monkeypatch):
    """MetaSchedule measures time only; before a record reaches the logs it is checked against
    the reference. A schedule made wrong on purpose (P stored as int8) fails the check."""
    spec = KernelSpec(32, causal=True)
    tile = (32, 64)
    sch = _sampled(spec, tile, seed=5)
    assert rank.validate_record(spec, tile, types.SimpleNamespace(trace=sch.trace)) is None
    sch.unsafe_set_dtype(D.P_CAST, 0, "int8")
    # replayed as build replays a log's trace: an instruction the rule never writes is refused
    why = rank.validate_record(spec, tile, types.SimpleNamespace(trace=sch.trace))
    assert why is not None and "UnsafeSetDType instruction, which rule fused_cpu never writes" in why
    monkeypatch.setattr(type(rule_for(spec)), "trace_instructions",
                        rule_for(spec).trace_instructions | {"UnsafeSetDType"})
    why = rank.validate_record(spec, tile, types.SimpleNamespace(trace=sch.trace))
    assert why is not None and "max |out - ref|" in why


def test_variant_kernels_are_validated_and_timed_with_their_runtime_values():
    """Softcap and ALiBi kernels' candidates get their runtime values where tuning runs them (the
    validation against the reference with the same values; the timing as built): the kernel
    takes slopes after lse and the cap after sm_scale, and a call without them fails every
    candidate. A window kernel's edges follow the cap, the left one only when causal."""
    spec = KernelSpec(32, causal=True, softcap=True, alibi=True)
    tile = (32, 64)
    record = types.SimpleNamespace(trace=_sampled(spec, tile, seed=5).trace)
    assert rank.validate_record(spec, tile, record) is None
    (times,) = measure.deployed_times(spec, [SHAPE], [(tile, record)], reps=1)
    assert times[0] != records.FAILED_RUN and 0 < times[0] < 10, times
    for causal, edges in ((True, [50]), (False, [50, 50])):
        windowed = KernelSpec(32, causal=causal, softcap=True, window=True)
        values = SP.variant_values(windowed, 1, 2, window=50)
        assert SP.variant_args(windowed, values, tvm.cpu()) == ([], [SP.NOMINAL_CAP] + edges)


def test_best_tile_is_ranked_as_built_then_validated(monkeypatch):
    """The tuner's choice on synthetic records (nothing built or run): the fastest few on the
    workload are re-timed as built and ranked by that time; the fastest of those that validates
    is exported with its as-built time, the workload time kept beside it."""
    from tvmflash.tuning import tuner

    spec = KernelSpec(32)
    tile = (32, 64)
    db = ms.database.MemoryDatabase()
    mod = _fake_records(db, spec, tile, 5)  # workload times 1, 2, 3, 4, 5 ms
    as_built = {1: 9e-3, 2: 7e-3, 3: 8e-3}  # the 3 fastest re-timed: as built, 2 beats 3 beats 1
    timed, validated = [], []

    def fake_times(spec_, shapes, candidates, build_timeout=120.0, reps=10):
        timed.extend(round(records.mean_run_secs(r) * 1e3) for _, r in candidates)
        return [[as_built[round(records.mean_run_secs(r) * 1e3)]] * len(shapes) for _, r in candidates]

    def fake_validate(spec_, tile_, record):
        validated.append(round(records.mean_run_secs(record) * 1e3))
        return "wrong (test)" if len(validated) == 1 else None

    monkeypatch.setattr(measure, "can_run_here", lambda spec_: True)
    monkeypatch.setattr(measure, "deployed_times", fake_times)
    monkeypatch.setattr(rank, "validate_record", fake_validate)
    options = TuneOptions(trials=5, work_dir=Path("/nonexistent"))
    monkeypatch.setattr(search, "log_failure", lambda *a: None)
    task = search.Task(tile, mod, None)
    (best,) = tuner.best_tiles(spec, rule_for(spec), SP.space_for(spec), [task], db, SHAPE, options, lambda m: None)
    assert sorted(timed) == [1, 2, 3] and validated == [2, 3]
    assert best.validated and best.workload_secs == pytest.approx(3e-3) and best.run_secs == pytest.approx(8e-3)
    assert best.secs_at == {SHAPE.seq_q: 8e-3} and best.config is not None


def test_repair_database_drops_a_line_cut_by_a_kill(tmp_path):
    spec = KernelSpec(32)
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    _fake_records(db, spec, (32, 64), 2)
    path = tmp_path / records.RECORDS
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])  # a record cut short
    with pytest.raises(Exception):
        ms.database.JSONDatabase(work_dir=str(tmp_path), allow_missing=False)
    assert search.repair_database(tmp_path) == 1
    assert path.read_text() == text
    assert len(ms.database.JSONDatabase(work_dir=str(tmp_path), allow_missing=False)) == 2
    assert search.repair_database(tmp_path) == 0


def _write_log(root, spec, tile=(32, 64), n=3, shape=SHAPE, rule="fused_cpu"):
    """A log as `tvmflash tune` writes it, from fake records."""
    db = ms.database.MemoryDatabase()
    mod = _fake_records(db, spec, tile, n, shape)
    best = db.get_top_k(db.commit_workload(mod), 1)[0]
    config = rank.identify_config(SP.space_for(spec), tile, best, mod)
    meta = {"key": spec.key, "spec": spec.to_dict(), "rule": rule, "shape": shape.to_dict(),
            "softmax_scale": SP.softmax_scale(spec), "trials": n, "device": "test", "tvm_version": "x",
            "tvm_ffi_version": "x", "date": records.now(),
            "tiles": [{"config": config, "run_ms": 1.0, "tflops": 1.0}]}
    return records.write_variant(root, spec, meta, [best]), config


def test_build_uses_the_log_else_says_why(tmp_path, monkeypatch, rng):
    spec = KernelSpec(32, causal=True, group=2)
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "none"))
    lowered = lower(spec)
    assert lowered.tuning == {"source": "hand config",
                              "tuning": f"no tuning log for {spec.key} in {tmp_path / 'none' / records.target_id('cpu')}"}

    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", "off")
    assert "tuned records are off" in lower(spec).tuning["tuning"]

    root = tmp_path / "logs"
    vdir, config = _write_log(root, spec, shape=SP.Shape(1, 128, 128, 4, 2))
    assert sorted(p.name for p in vdir.iterdir()) == sorted([records.WORKLOADS + records.XZ, records.RECORDS + records.XZ,
                                                             records.METADATA])
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(root))
    so, manifest = build(spec, tmp_path / "out")
    schedule = json.loads(Path(manifest).read_text())["schedule"]
    assert schedule["source"] == "tuned record" and schedule["config"] == config
    assert schedule["rule"] == "fused_cpu" and schedule["database"] == str(vdir)
    tuned = lower(spec)
    q, k, v = make_qkv(rng, 2, 113, 77, 4, 2, 32, "float16")
    out, lse = load(so)(q, k, v, return_lse=True)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")

    # a log of another rule: the hand config, saying why
    meta_path = vdir / records.METADATA
    meta = json.loads(meta_path.read_text())
    _rewrite(meta_path, {**meta, "rule": "fused_cpu_other"})
    lowered = lower(spec)
    assert lowered.tuning["source"] == "hand config"
    assert "tuned for rule 'fused_cpu_other', this build uses 'fused_cpu'" in lowered.tuning["tuning"]
    # a record that no longer matches the definition (here: tuning.json names another measured
    # shape) or a database that cannot be read: the record's own config under the rule's schedule,
    # saying so, never silently the hand config; the same kernel, as the config is the trace's
    _rewrite(meta_path, {**meta, "shape": {**meta["shape"], "seq_q": 129}})
    lowered = lower(spec)
    assert lowered.tuning["source"] == "tuned config" and lowered.config == config, lowered.tuning
    assert "matches the current TensorIR definition" in lowered.tuning["tuning"]
    _rewrite(meta_path, meta)
    (vdir / (records.WORKLOADS + records.XZ)).write_text("not xz\n")
    lowered = lower(spec)
    assert lowered.tuning["source"] == "tuned config" and "not an xz file" in lowered.tuning["tuning"]
    assert structural_equal(lowered.mod, tuned.mod)
    # a tuning.json that is no JSON: the hand config, saying why
    meta_path.write_bytes(b"\x00\xff binary")
    lowered = lower(spec)
    assert lowered.tuning["source"] == "hand config" and "could not be read" in lowered.tuning["tuning"]
    assert str(meta_path) in lowered.tuning["tuning"]


def _rewrite(path: Path, meta: dict) -> None:
    """Rewrite a tuning.json in place, its modification time moved on (build's plan is cached
    while the file's inode, size and modification time stay)."""
    st = path.stat()
    path.write_text(json.dumps(meta))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_even_build_replays_the_general_log(tmp_path, monkeypatch, rng):
    """No log of its own: the even build takes the general build's record (same trace) and runs
    correctly on tile multiples."""
    spec = KernelSpec(32, causal=True, group=2)
    root = tmp_path / "logs"
    vdir, config = _write_log(root, spec, shape=SP.Shape(1, 128, 128, 4, 2))
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(root))
    even = spec.replace(even=True)
    so, manifest = build(even, tmp_path / "out")
    schedule = json.loads(Path(manifest).read_text())["schedule"]
    assert schedule["source"] == "tuned record" and schedule["config"] == config
    assert schedule["database"] == str(vdir)
    q, k, v = make_qkv(rng, 2, 2 * config["block_m"], 2 * config["block_n"], 4, 2, 32, "float16")
    out, lse = load(so)(q, k, v, return_lse=True)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")


def test_tune_several_variants_in_turn(tmp_path, monkeypatch):
    """--target / --head-dim lists and --causal both: each variant in turn, in one process, each
    in <work-dir>/<key>; --causal alone still means causal."""
    from tvmflash import cli

    seen = []
    monkeypatch.setattr(cli, "_tune_one", lambda args, spec, tiles, work_dir, logs, schedules: seen.append((spec.key, work_dir)) or 0)
    work = str(tmp_path / "w")
    assert main(["tune", "--target", "cpu", "--head-dim", "32", "64", "--causal", "both", "--work-dir", work]) == 0
    keys = [KernelSpec(d, causal=c).key for d in (32, 64) for c in (False, True)]
    assert seen == [(key, os.path.join(work, key)) for key in keys]
    seen.clear()
    assert main(["tune", "--target", "cpu", "--head-dim", "32", "--causal", "--work-dir", work]) == 0
    assert seen == [(KernelSpec(32, causal=True).key, work)]


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials: expected a positive int, got 0"),
    (["--tiles", "7x7"], "tiles: expected a subset of"),
    (["--tiles", "32by64"], "tiles: expected BLOCK_MxBLOCK_N"),
    (["--rpc-tracker", "127.0.0.1:9190"], "rpc_key: expected --rpc-tracker and --rpc-key together"),
    (["--rpc-tracker", "nohost", "--rpc-key", "k"], "rpc_tracker: expected HOST:PORT"),
    (["--heads", "3", "--gqa", "2"], "heads: expected a multiple of the GQA group 2, got 3"),
])
def test_tune_errors_name_the_argument(tmp_path, args, message, capsys):
    assert main(["tune", "--target", "cpu", "--head-dim", "32", "--work-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


# -- the logs committed to the repository ------------------------------------------------------


def _committed_logs():
    return sorted((REPO / "tuning_logs").glob(f"*/*/{records.METADATA}"))


@pytest.mark.parametrize("meta_path", _committed_logs(), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_committed_logs_replay(meta_path, rng, tmp_path):
    """Each committed log loads on this TVM version, its best trace replays on the dynamic
    function (JSON round trip included), is the recorded config of the hand schedule function,
    matches schedules/<target>/<key>.py, and (CPU logs) is correct on this machine's CPU."""
    meta = json.loads(meta_path.read_text())
    spec = KernelSpec.from_dict(meta["spec"])
    rule = rule_for(spec)
    space = SP.space_for(spec)
    rule.prepare(spec)
    # on this TVM version the database loads and each record replays on the workload it measured
    stored = records.open_database(meta_path.parent).get_all_tuning_records()
    assert len(stored) == len(meta["tiles"])
    for record in stored:
        records.replay(rule, spec, record.trace, record.workload.mod, "a committed record")
    # a stale log (the definition changed since tuning) fails here: build would fall back to the
    # record's config, no longer its trace; retune the variant (`tvmflash tune`, its spec from
    # tuning.json)
    entry, why = records.read_entry(meta_path.parent, spec, rule)
    assert entry is not None, why
    tuned = records.load_record(spec, rule, entry)
    assert tuned.config == meta["tiles"][0]["config"]
    mod = SP.workload(spec, tuned.tile, SP.Shape(**meta["shape"]), meta["softmax_scale"])
    assert rank.identify_config(space, tuned.tile, tuned.record, mod) == tuned.config
    func = D.fused_attention(spec, *tuned.tile)
    sch = records.replay(rule, spec, tuned.record.trace, func, "the committed record")
    # through a JSON database written and read again on this TVM version
    records.write_variant(tmp_path, spec, meta, [tuned.record])
    vdir = records.variant_dir(tmp_path, spec)
    again = records.load_record(spec, rule, records.read_entry(vdir, spec, rule)[0])
    assert structural_equal(records.replay(rule, spec, again.record.trace, func, "again").mod, sch.mod)
    scope: dict = {}
    # named by the key it was tuned under: a CPU key names the tuning machine's CPU, not this one's
    text = (REPO / "schedules" / meta_path.parent.parent.name / f"{meta['key']}.py").read_text()
    assert f"from the best record of tuning_logs/{meta_path.parent.parent.name}/{meta['key']}/" in text
    exec(text, scope)
    readable = Schedule(func)
    scope["apply"](readable)
    assert structural_equal(readable.mod, sch.mod)
    if spec.is_cuda:
        compile_module(sch.mod, spec.tvm_target, rule.pass_config(spec))
    else:
        check_numerics(sch.mod, spec, rng, heads=4 * spec.group)


def test_committed_logs_are_small():
    for path in (REPO / "tuning_logs").rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 512 * 1024, f"{path} is {path.stat().st_size} bytes"


# -- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tune_cuda_tiny_run_then_build(tmp_path, monkeypatch):
    """A few trials of the tensor-core schedule measured on the GPU, then built from the log."""
    import torch

    from tvmflash.runtime.api import target_for

    spec = KernelSpec(128, target=target_for("cuda:0"))
    res = tune(spec, TuneOptions(trials=3, work_dir=tmp_path / "work", shape=SP.Shape(1, 1024, 1024, 16, 16),
                                 tiles=[(128, 64), (128, 32)], logs_dir=tmp_path / "logs",
                                 schedules_dir=tmp_path / "sched", progress=False, seed=0))
    assert res.best is not None and res.best.run_secs < 1.0, [(t.tile, t.run_secs) for t in res.tiles]
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "logs"))
    so, manifest = build(spec, tmp_path / "out")
    assert json.loads(Path(manifest).read_text())["schedule"]["source"] == "tuned record"
    q = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 700, 8, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    out = load(so)(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert (out - ref.transpose(1, 2)).abs().max().item() < 4e-3
