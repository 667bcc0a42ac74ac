"""tvmflash: FlashAttention built the TVM way.

The package reads as its pipeline: ``definition`` (attention in TensorIR) -> ``compiler.derive``
(plain attention into the online softmax) -> ``rules`` (schedule
rules in a registry: primitives and tunables per kernel family) -> ``compiler`` (tvmflash's TIR
passes, the pipeline, the device code) -> ``builder`` (plan, lower, artifacts) -> ``runtime``
(kernel, cache, ``attention``); ``tuning`` (MetaSchedule) and ``analysis`` (traffic, explain,
bench) beside them; ``cli`` for the command line, ``torch_ops`` for the PyTorch op.
"""

from .analysis.roofline import explain
from .builder import build, lower
from .definition import attention_reference, attention_varlen_reference
from .runtime.api import attention
from .runtime.cache import cache_dir, get_kernel
from .runtime.kernel import Kernel, load
from .runtime.kvcache import attention_with_kvcache
from .runtime.varlen import attention_varlen
from .spec import KernelSpec
from .version import __version__

__all__ = [
    "attention",
    "attention_with_kvcache",
    "attention_varlen",
    "attention_reference",
    "attention_varlen_reference",
    "build",
    "cache_dir",
    "explain",
    "get_kernel",
    "Kernel",
    "KernelSpec",
    "load",
    "lower",
]
