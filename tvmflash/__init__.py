"""tvmflash: FlashAttention built the TVM way.

Pipeline, one module each: ``definition`` (attention in TensorIR) -> ``schedule_*`` (schedule
primitives) -> ``build`` (compile, export) -> ``kernel`` (load, call); ``cache`` and ``api`` on
top, ``cli`` for the command line; ``traffic`` and ``roofline`` count what the kernels move
(``explain``).
"""

from .api import attention
from .build import build, lower
from .cache import cache_dir, get_kernel
from .kernel import Kernel, load
from .reference import attention_reference
from .roofline import explain
from .spec import KernelSpec

__all__ = [
    "attention",
    "attention_reference",
    "build",
    "cache_dir",
    "explain",
    "get_kernel",
    "Kernel",
    "KernelSpec",
    "load",
    "lower",
]
__version__ = "0.1.0"
