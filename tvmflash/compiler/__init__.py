"""The compiler layer: a scheduled IRModule -> a runtime module, one way for every caller.

``compile_module`` is the one compile step: ``build``, tuning's candidates and re-ranking,
``explain`` and the tests all call it, so what is tuned is what is shipped. It runs TVM's
compiler with the pipeline of ``pipeline`` (TVM's s_tir passes plus tvmflash's own, ``passes``)
under the rule's PassContext options, and keeps the CUDA source in the module
(``device_code``: what a built library then embeds, nvcc's fatbin or PTX or the source).

``derive`` comes before the schedule: rolling update and split-K update turn plain attention into
the online-softmax function the rules schedule (FlashAttention) and into FlashDecoding's split.
"""

from __future__ import annotations

from .._compat import tvm
from .device_code import cuda_source_modules, device_source
from .pipeline import TIR_PIPELINE, lower_to_device

__all__ = ["compile_module", "device_source", "lower_to_device", "TIR_PIPELINE"]


def compile_module(mod: tvm.IRModule, target, pass_config: dict | None = None, tir_pipeline: str | None = None):
    """``tvm.compile`` of the scheduled ``mod`` for ``target`` (a ``tvm.target.Target``) through
    ``TIR_PIPELINE`` (or the rule's ``tir_pipeline``: "tirx" for a kernel written in TIRx) with
    ``pass_config`` (the rule's PassContext options). No GPU is needed for CUDA: the module
    holds the generated CUDA source (on a GPU machine too)."""
    with tvm.transform.PassContext(config=dict(pass_config or {})), cuda_source_modules():
        return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline or TIR_PIPELINE)
