"""`thinkforge mtp-extend`: MiMo's recipe for more MTP draft layers (copy layer 0, train the copies)."""

from __future__ import annotations

from typing import Annotated

import typer


def mtp_extend_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint directory with at least one trained MTP layer.")],
    out: Annotated[str, typer.Option(help="Output directory (the extended model goes to OUT/model).")],
    layers: Annotated[int, typer.Option(help="MTP layers after extension (layer 0 is copied into 1..K-1).")] = 3,
    steps: Annotated[int, typer.Option(help="Optimizer steps for the copied layers.")] = 200,
    data: Annotated[str | None, typer.Option(help="jsonl of {'text'} or {'messages'} rows (default: task docs).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1...")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field (repeatable).")] = None,
) -> None:
    """Copy MTP layer 0 into layers 1..K-1 and fine-tune them with the main model and layer 0 frozen."""
    from thinkforge.commands.train import progress_bar
    from thinkforge.train.mtp_extend import MTPExtendConfig, mtp_extend
    from thinkforge.utils import build_config, parse_overrides

    cfg = build_config(MTPExtendConfig, {"model": model, "out_dir": out, "layers": layers, "steps": steps,
                                         "data": data, "device": device, "seed": seed, **parse_overrides(set_)},
                       where="mtp-extend")
    with progress_bar() as bar:
        summary = mtp_extend(cfg, bar)
    accs = ", ".join(f"{k}={v:.3f}" for k, v in summary["final"].items() if k.startswith(("mtp_acc", "mtp_agree")))
    typer.echo(f"extended to {summary['layers']} MTP layers ({accs}) -> {summary['model_dir']}")


COMMANDS = {"mtp-extend": mtp_extend_cmd}
