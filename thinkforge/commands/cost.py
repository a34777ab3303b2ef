"""`thinkforge cost`: estimate GPU-hours and dollars (6·N·T FLOPs over achievable throughput)."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def cost_cmd(
    params: Annotated[float, typer.Option(help="Model parameters, e.g. 32.8e9 (or --model).")] = 0.0,
    model: Annotated[str | None, typer.Option(help="HF dir or hub id: parameters counted from its config.")] = None,
    tokens: Annotated[float, typer.Option(help="Training tokens (or --examples x --avg-tokens x --epochs).")] = 0.0,
    examples: Annotated[int, typer.Option(help="Training examples.")] = 0,
    avg_tokens: Annotated[float, typer.Option(help="Average tokens per example.")] = 0.0,
    epochs: Annotated[float, typer.Option(help="Epochs over the examples.")] = 1.0,
    hardware: Annotated[str, typer.Option(help="h100, h200, a100, l40s, l4, b200.")] = "h100",
    gpus: Annotated[int, typer.Option(help="Number of GPUs.")] = 8,
    mfu: Annotated[float, typer.Option(help="Model FLOPs utilisation actually achieved (0-1).")] = 0.4,
    price: Annotated[float | None, typer.Option(help="USD per GPU-hour (default: the hardware's list price).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """GPU-hours and dollars of a training run (see `thinkforge/cost.py` for the Sky-T1 example)."""
    from thinkforge.cost import CostConfig, estimate

    r = estimate(CostConfig(params=params, model=model, tokens=tokens, examples=examples, avg_tokens=avg_tokens,
                            epochs=epochs, hardware=hardware, gpus=gpus, mfu=mfu, price_per_gpu_hour=price))
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(f"{r['params'] / 1e9:.2f}B params x {r['tokens'] / 1e9:.3f}B tokens = {r['flops']:.3g} FLOPs (6NT)\n"
               f"{r['gpus']} x {r['hardware']} at MFU {r['mfu']}: {r['wall_hours']:.1f} h wall, "
               f"{r['gpu_hours']:.0f} GPU-hours, ${r['cost_usd']:,.0f} at ${r['price_per_gpu_hour']}/GPU-hour")


COMMANDS = {"cost": cost_cmd}
