"""The machine's limit beside decode figures: dense fp32 GEMM throughput and decode's weight-GEMM rate."""

from __future__ import annotations

import time
from typing import Any


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 3) -> float:
    """This machine's dense fp32 GEMM rate at `threads` threads: best of `repeats` n x n torch.matmul."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main_gemm_weights(model: Any) -> int:
    """Weights one decoded token passes through as GEMMs: every decoder layer plus the LM head."""
    return sum(p.numel() for p in model.model.layers.parameters()) + model.lm_head.weight.numel()
