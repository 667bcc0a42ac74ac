"""Spec -> plan -> scheduled TensorIR -> compiled module -> artifacts on disk.

- ``plan``: which rule, config and tuning record build a spec (``plan``, ``build_for``);
- ``lower``: the plan carried out, the scheduled TensorIR (``lower``, ``compile_lowered``);
- ``artifact``: ``build`` writes ``<key>.so`` + ``<key>.json`` (+ ``<key>.cu``).
"""

from .artifact import build, manifest  # noqa: F401
from .lower import Lowered, compile_lowered, lower  # noqa: F401
from .plan import Plan, build_for, plan  # noqa: F401
