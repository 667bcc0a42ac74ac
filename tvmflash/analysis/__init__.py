"""What the kernels move and how fast they run: ``traffic`` counts global-memory bytes and FLOPs
from the TensorIR, ``roofline`` explains the fused kernel against the standard one
(``tvmflash explain``), ``bench`` times them against PyTorch SDPA (``tvmflash bench``)."""
