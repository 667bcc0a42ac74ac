"""tvmflash: FlashAttention built the TVM way.

Pipeline, one module each: ``definition`` (attention in TensorIR) -> ``schedule_*`` (schedule
primitives) -> ``build`` (compile, export) -> ``kernel`` (load, call); ``cache`` and ``api`` on
top, ``cli`` for the command line.
"""

from .api import attention
from .build import build, lower
from .cache import cache_dir, get_kernel
from .kernel import Kernel, load
from .reference import attention_reference
from .spec import KernelSpec

__all__ = [
    "attention",
    "attention_reference",
    "build",
    "cache_dir",
    "get_kernel",
    "Kernel",
    "KernelSpec",
    "load",
    "lower",
]
__version__ = "0.1.0"
