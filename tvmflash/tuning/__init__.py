"""MetaSchedule tuning, as a package: what is measured (``space``), how a candidate is built and
run (``measure``), the search (``search``), the ranking and validation (``rank``), the logs
(``records``), and the orchestration (``tuner``: ``tune(spec, TuneOptions(...))``).
"""

from .space import Shape, default_shape, space_for  # noqa: F401
from .tuner import TuneOptions, tune  # noqa: F401
from .rank import TileResult, TuneResult  # noqa: F401
