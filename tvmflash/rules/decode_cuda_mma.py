"""FlashDecoding on tensor cores (sm_80+): the split-K update's function, scheduled.

Decode is one query row (or a few) per sequence against a long KV cache: one program per query
tile would leave most of the GPU idle and read K and V at a fraction of the memory bandwidth.
``compiler.derive.split_k_update`` derives the split form from Algorithm 0: the keys of each
query tile cut into ``KernelSpec.splits`` chunks, each a program that runs the rolling update
over its chunk and stores a partial (m, l, acc), then a combine repairs the partials to the
global max. This rule schedules that function:

- the tile block as ``fused_cuda_mma`` schedules the rolling update's (``schedule_tiles``): one
  thread block per (batch, head, query tile, chunk), K and V through shared memory by cp.async
  one tile ahead, both GEMMs by ldmatrix + mma.sync, the online softmax on the fragments. The
  query tile is 16 rows, one warp (``DECODE_CONFIG``): the fewest rows an mma tile has, so a
  decode step wastes the least work on padding rows;
- the partial state leaves the tile through shared memory (acc) and one row a thread (m, l);
- the combine is one kernel, a thread block per (batch, head, query row) and a thread per
  head-dim element: each thread reduces the chunks' maxima and sums itself (a few values) and
  repairs its own element of acc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._compat import Schedule, tirx
from ..compiler.derive import COMBINE_ACC, COMBINE_MAX, COMBINE_SUM, SPLIT_COMBINE
from ..spec import KernelSpec
from .fused_cuda_mma import FlashConfig, FusedCudaMma, schedule_tiles, tensor_cores_serve

#: 16 query rows on one warp, K/V tiles of 64 keys (32 at head dim 256, where acc takes the
#: registers), cp.async one tile ahead.
DECODE_CONFIG = FlashConfig(block_m=16, block_n=64, num_warps=1)
DECODE_CONFIG_256 = FlashConfig(block_m=16, block_n=32, num_warps=1)


def schedule_combine(sch: Schedule) -> None:
    """The combine of the split-K function: a thread block per (batch, head, query row), a
    thread per head-dim element; the chunks' max and sum recomputed by each thread (in
    registers), the lse stored by the block."""
    out = sch.get_sblock(SPLIT_COMBINE)
    b, h, i, d = sch.get_loops(out)
    row = sch.fuse(b, h, i)
    sch.bind(row, "blockIdx.x")
    sch.bind(d, "threadIdx.x")
    acc = sch.get_sblock(COMBINE_ACC)
    sch.compute_at(acc, d)
    sch.set_scope(acc, 0, "local")
    for name in (COMBINE_SUM, COMBINE_MAX):
        block = sch.get_sblock(name)
        sch.compute_at(block, row)
        sch.set_scope(block, 0, "local")


@dataclass(frozen=True)
class DecodeCudaMma(FusedCudaMma):
    """Split-K (FlashDecoding) attention on tensor cores, sm_80 and newer: specs with
    ``splits`` >= 1, any shape."""

    name: ClassVar[str] = "decode_cuda_mma"
    even_builds: ClassVar[bool] = False
    split_builds: ClassVar[bool] = True

    def supports(self, spec: KernelSpec) -> bool:
        return tensor_cores_serve(spec) and spec.splits >= 1 and spec.shape is None

    def default_config(self, spec: KernelSpec) -> FlashConfig:
        return DECODE_CONFIG if spec.head_dim <= 128 else DECODE_CONFIG_256

    def space(self, spec: KernelSpec):
        return None  # not tuned yet: the hand config

    def apply(self, func: tirx.PrimFunc, config: FlashConfig) -> Schedule:
        sch = schedule_tiles(func, config, partial=True)
        schedule_combine(sch)
        return sch


RULE = DecodeCudaMma()
