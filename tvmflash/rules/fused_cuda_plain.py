"""A plain CUDA schedule of the fused TensorIR: one thread per query row, no tensor cores.

It is the portable fallback (any CUDA target, any head dim) and the reference point for the
tensor-core rule ``fused_cuda_mma``: the same TensorIR, only the mapping differs.
Thread block = one query tile of ``block_m`` rows; K/V tiles are staged in shared memory by
all threads together; the running state (m_i, l_i, acc_o) lives in each thread's registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import definition as D
from .._compat import Schedule, ms, tirx
from ..spec import KernelSpec
from .base import COMMON_INSTRUCTIONS, ScheduleRule, Space, bind_grid


@dataclass(frozen=True)
class PlainCudaConfig:
    block_m: int = 64  # threads per block, one query row each
    block_n: int = 32


def schedule(func: tirx.PrimFunc, config: PlainCudaConfig) -> Schedule:
    sch = Schedule(func)
    BM = config.block_m

    # Step 1. One thread block per (batch, head, query tile).
    bind_grid(sch)

    # Step 2. K/V tiles in shared memory, loaded cooperatively; everything per-row in registers.
    for block, buffer_index, scope in (
        (D.K_LOAD, 0, "shared"),
        (D.V_LOAD, 0, "shared"),
        (D.Q_LOAD, 0, "local"),
        (D.S_GEMM, 0, "local"),
        (D.S_STORE, 0, "local"),
        (D.P_EXP, 0, "local"),
        (D.INIT_O, 0, "local"),
        (D.INIT_M, 0, "local"),
        (D.INIT_L, 0, "local"),
        (D.ROW_MAX, 0, "local"),
        (D.RUNNING_MAX, 0, "local"),
        (D.ROW_SUM, 0, "local"),
        (D.L_UPDATE, 0, "local"),
        (D.P_CAST, 0, "local"),
        (D.O_STAGE, 0, "local"),
        (D.ALPHA, 0, "local"),
    ):
        sch.set_scope(block, buffer_index, scope)
    for name in (D.K_LOAD, D.V_LOAD):
        j, d = sch.get_loops(name)[-2:]
        _, tx = sch.split(sch.fuse(j, d), factors=[None, BM])
        sch.bind(tx, "threadIdx.x")

    # Step 3. Every row-wise stage: its row loop is the thread index.
    for name in (
        D.Q_LOAD, D.INIT_M, D.INIT_L, D.INIT_O, D.S_GEMM, D.S_STORE, D.ROW_MAX, D.RUNNING_MAX, D.ALPHA,
        D.P_EXP, D.P_CAST, D.ROW_SUM, D.L_UPDATE, D.O_GEMM, D.STATE_UPDATE, D.O_STAGE, D.O_STORE, D.LSE_STORE,
    ):
        sch.bind(_row_loop(sch, name), "threadIdx.x")
    return sch


def _row_loop(sch: Schedule, name: str):
    """The query-row loop of stage ``name``: the definition names it ``i`` in every stage (found
    by name, not position: a stage may sit in a scope block of its own or inside the K/V loop)."""
    for loop in sch.get_loops(name):
        if sch.get(loop).loop_var.name == "i":
            return loop
    raise ValueError(f"{name}: expected a loop named 'i' over the query rows, got "
                     f"{[sch.get(loop).loop_var.name for loop in sch.get_loops(name)]}")


@dataclass(frozen=True)
class FusedCudaPlain(ScheduleRule):
    """The fused kernel without tensor cores: any CUDA target, any head dim, either dtype."""

    name: ClassVar[str] = "fused_cuda_plain"
    config_type: ClassVar[type] = PlainCudaConfig
    even_builds: ClassVar[bool] = True
    trace_instructions: ClassVar[frozenset] = COMMON_INSTRUCTIONS | {"Bind", "Fuse", "SetScope", "Split"}

    def supports(self, spec: KernelSpec) -> bool:
        return spec.algorithm == "fused" and spec.is_cuda and not spec.splits

    def default_config(self, spec: KernelSpec) -> PlainCudaConfig:
        return PlainCudaConfig(block_m=64, block_n=32 if spec.head_dim <= 128 else 16)

    def apply(self, func: tirx.PrimFunc, config: PlainCudaConfig) -> Schedule:
        return schedule(func, config)

    def space(self, spec: KernelSpec) -> Space:
        itemsize = 2
        # K and V tiles live in static shared memory: 48 KB at most
        tiles = tuple((bm, bn) for bm in (32, 64, 128) for bn in (16, 32, 64)
                      if 2 * bn * spec.head_dim * itemsize <= 48 * 1024)
        return Space(
            name=self.name,
            tiles=tiles,
            knobs=lambda bm, bn: {},
            config=lambda bm, bn: PlainCudaConfig(block_m=bm, block_n=bn),
            schedule=schedule,
            postprocs=lambda: [ms.postproc.VerifyGPUCode()],
        )


RULE = FusedCudaPlain()
