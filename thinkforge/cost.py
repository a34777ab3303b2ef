"""`thinkforge cost`: GPU-hours and dollars of a training run, from model size, tokens and hardware.

Training compute is ~6·N·T FLOPs (forward 2·N·T, backward 4·N·T; attention's share ignored, as in the
usual estimate). Wall time = FLOPs / (GPUs x peak dense bf16 FLOP/s x MFU), where MFU (model FLOPs
utilisation) is what a real stack achieves: ~0.4-0.5 for well-tuned FSDP on H100s, far less with
DeepSpeed ZeRO-3 CPU offload. Cost = GPU-hours x price per GPU-hour.

Sky-T1-32B-Preview, as its authors put it: 19 hours on 8 H100s (ZeRO-3 offload) for about $450, i.e.
19 x 8 x ~$2.96. With 17K examples x 3 epochs at ~8K tokens each (their traces are long QwQ outputs)
the same arithmetic reproduces it at MFU 0.15:

    thinkforge cost --params 32.8e9 --examples 17000 --avg-tokens 8000 --epochs 3 --hardware h100 --gpus 8 --mfu 0.15
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError, UnknownNameError

# Peak dense bf16 tensor FLOP/s (vendor datasheets, without sparsity) and a typical on-demand price
# per GPU-hour in USD (cloud list prices vary; override with --price).
HARDWARE: dict[str, tuple[float, float]] = {
    "h100": (989e12, 2.96),  # SXM; price = Sky-T1's $450 / (19 h x 8 GPUs)
    "h200": (989e12, 3.80),
    "a100": (312e12, 1.80),
    "l40s": (362e12, 1.20),
    "l4": (121e12, 0.80),
    "b200": (2250e12, 6.00),
}


@dataclass
class CostConfig:
    params: float = 0.0  # model parameters N (or read from --model)
    model: str | None = None  # HF dir or hub id whose config gives N
    tokens: float = 0.0  # training tokens T (or examples x avg_tokens x epochs)
    examples: int = 0
    avg_tokens: float = 0.0
    epochs: float = 1.0
    hardware: str = "h100"
    gpus: int = 8
    mfu: float = 0.4
    price_per_gpu_hour: float | None = None  # default: the hardware table's


def model_params(name: str) -> int:
    """Parameter count of an HF model from its config alone (no weights are read or downloaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(name).exists() and "/" not in name:
        raise ThinkforgeError(f"model {name!r}: not a directory and not a hub id")
    cfg = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def estimate(cfg: CostConfig) -> dict[str, Any]:
    if cfg.hardware not in HARDWARE:
        raise UnknownNameError(f"unknown hardware {cfg.hardware!r}; known: {', '.join(sorted(HARDWARE))}")
    n = float(model_params(cfg.model)) if cfg.model else cfg.params
    tokens = cfg.tokens or cfg.examples * cfg.avg_tokens * cfg.epochs
    for name, value in (("params", n), ("tokens", tokens), ("gpus", cfg.gpus)):
        if value <= 0:
            raise ThinkforgeError(f"cost: {name} must be > 0 (give --params or --model, and --tokens or "
                                  "--examples/--avg-tokens/--epochs)")
    if not 0 < cfg.mfu <= 1:
        raise ThinkforgeError(f"cost: mfu must be in (0, 1], got {cfg.mfu}")
    peak, default_price = HARDWARE[cfg.hardware]
    price = default_price if cfg.price_per_gpu_hour is None else cfg.price_per_gpu_hour
    flops = 6.0 * n * tokens
    seconds = flops / (cfg.gpus * peak * cfg.mfu)
    gpu_hours = seconds / 3600 * cfg.gpus
    return {"params": n, "tokens": tokens, "flops": flops, "hardware": cfg.hardware, "gpus": cfg.gpus,
            "mfu": cfg.mfu, "peak_flops_per_gpu": peak, "wall_hours": seconds / 3600, "gpu_hours": gpu_hours,
            "price_per_gpu_hour": price, "cost_usd": gpu_hours * price}
