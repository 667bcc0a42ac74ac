"""The tirx pipeline tvmflash compiles with: TVM's s_tir pipeline plus the passes of ``passes``.

Registered once per process under the name ``TIR_PIPELINE``; ``compiler.compile_module`` and
``lower_to_device`` run it.
"""

from __future__ import annotations

import threading

from .._compat import s_tir, tirx, tvm
from .passes import constant_async_waits, lower_all_warp_memory, unmask_full_kv_tiles

_PIPELINE_LOCK = threading.RLock()


def _register_pipeline() -> str:
    """TVM's s_tir pipeline with K/V tiles that need no mask run without one
    (``unmask_full_kv_tiles``), every warp-scope buffer lowered (``lower_all_warp_memory``) and
    cp.async wait counts made constants (``constant_async_waits``)."""
    from tvm.s_tir import pipeline as s_pipeline
    from tvm.tirx import compilation_pipeline

    def factory():
        default, finalize_host, _ = s_pipeline.default_s_tir_pipeline()

        def pipeline(mod, ctx):
            # TVM's pipeline, with ``unmask_full_kv_tiles`` before its LoopPartition: TVM builds
            # the pass list inside its pipeline function, looking each pass up when it runs, so
            # the name is swapped for the run (under a lock: one run at a time per process)
            with _PIPELINE_LOCK:
                loop_partition = s_tir.transform.LoopPartition
                s_tir.transform.LoopPartition = lambda: tvm.ir.transform.Sequential(
                    [unmask_full_kv_tiles(), loop_partition()])
                try:
                    return default(mod)
                finally:
                    s_tir.transform.LoopPartition = loop_partition

        pipeline = tvm.transform.module_pass(pipeline, opt_level=0, name="tvmflash.STIRPipeline")

        def finalize_device():
            return tvm.ir.transform.Sequential(
                [constant_async_waits(), lower_all_warp_memory(), tirx.transform.StmtSimplify(),
                 tirx.transform.LowerIntrin()]
            )

        return pipeline, finalize_host, finalize_device

    compilation_pipeline.PIPELINE_MAP["tvmflash"] = factory
    return "tvmflash"


#: The tirx pipeline's name (``tvm.compile(..., tir_pipeline=TIR_PIPELINE)``).
TIR_PIPELINE = _register_pipeline()


def lower_to_device(mod: tvm.IRModule, target: tvm.target.Target, pass_config: dict | None = None,
                    instruments=(), tir_pipeline: str | None = None) -> tvm.IRModule:
    """The scheduled ``mod`` taken through the tirx pipeline ``tvm.compile`` runs (``TIR_PIPELINE``,
    or the rule's ``tir_pipeline``), up to code generation: kernels split from the host code,
    shared memory merged and reused. This is the TIR the CUDA source is printed from (what
    ``tvm.tirx.build`` does before codegen)."""
    host = tvm.target.Target("llvm") if tvm.runtime.enabled("llvm") else tvm.target.Target("c")
    mod = tirx.transform.BindTarget(target.with_host(host))(mod)
    pipeline, _, _ = tirx.get_tir_pipeline(tir_pipeline or TIR_PIPELINE)
    with tvm.transform.PassContext(config=pass_config or {}, instruments=list(instruments)):
        return pipeline(mod)
