"""`thinkforge pretrain`, `thinkforge sft`, `thinkforge speedrun`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

Recipe = Annotated[str | None, typer.Option(help="YAML recipe (path or shipped name, e.g. 'pretrain-tiny').")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: --set lr=3e-4 (repeatable).")]


@contextlib.contextmanager
def progress_bar() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        yield bar


def _cli_overrides(pairs: list[str] | None, **named: Any) -> dict[str, Any]:
    from thinkforge.utils import parse_overrides

    return {**{k: v for k, v in named.items() if v is not None}, **parse_overrides(pairs)}


def pretrain_cmd(
    recipe: Recipe = None,
    out: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    model: Annotated[str | None, typer.Option(help="HF dir or hub id to continue pretraining (default: tiny Qwen2).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1...")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Overrides = None,
) -> None:
    """Staged causal-LM pretraining on task-generated reasoning data (resumes from OUT/checkpoint)."""
    from thinkforge.train.pretrain import PretrainConfig, pretrain
    from thinkforge.utils import load_config

    cfg = load_config(PretrainConfig, recipe, "pretrain" if recipe else None,
                      _cli_overrides(set_, out_dir=out, model=model, steps=steps, device=device, seed=seed))
    with progress_bar() as bar:
        summary = pretrain(cfg, bar)
    typer.echo(f"pretrained {summary['steps']} steps, held-out loss {summary['heldout_loss']:.4f} -> {summary['model_dir']}")


def sft_cmd(
    model: Annotated[str | None, typer.Option(help="HF dir or hub id to fine-tune.")] = None,
    data: Annotated[str | None, typer.Option(help="jsonl of conversations (messages / ShareGPT); default: task traces.")] = None,
    recipe: Recipe = None,
    out: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Overrides = None,
) -> None:
    """Supervised fine-tuning with loss on assistant tokens only (resumes from OUT/checkpoint)."""
    from thinkforge.train.sft import SFTConfig, sft
    from thinkforge.utils import load_config

    cfg = load_config(SFTConfig, recipe, "sft" if recipe else None,
                      _cli_overrides(set_, model=model, data=data, out_dir=out, steps=steps, device=device, seed=seed))
    with progress_bar() as bar:
        summary = sft(cfg, bar)
    typer.echo(f"fine-tuned {summary['steps']} steps, held-out loss {summary['heldout_loss']} -> {summary['model_dir']}")


def speedrun_cmd(
    preset: Annotated[str, typer.Option(help="cpu (<15 min on 2 cores), smoke (<2 min), or a recipe path.")] = "cpu",
    out: Annotated[str | None, typer.Option(help="Output directory (default runs/speedrun-PRESET).")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    numerics: Annotated[str | None, typer.Option(
        help="portable (default: the same bits on any x86 CPU with AVX2, see thinkforge/numerics.py) or native "
             "(the fastest kernels of this CPU).")] = None,
    set_: Overrides = None,
) -> None:
    """Run the whole recipe in miniature and write OUT/report.md and OUT/report.json."""
    import os

    from thinkforge.numerics import pin

    # Before torch loads (thinkforge.speedrun imports it): the kernels are chosen then.
    note = pin(numerics or os.environ.get("THINKFORGE_NUMERICS") or "portable")
    if note:
        typer.echo(f"note: {note}", err=True)
    from thinkforge.speedrun import load_speedrun_config, run_speedrun

    overrides = _cli_overrides(set_, seed=seed, device=device)
    overrides.setdefault("out_dir", out or f"runs/speedrun-{preset}")
    # MiMo-VL's recipe (thinkforge.train.vl_speedrun) for vl-* presets and YAML files named vl-*.yaml; the text
    # presets are unchanged
    if Path(preset).name.startswith("vl-"):
        from thinkforge.train.vl_speedrun import load_vl_speedrun_config, run_vl_speedrun

        vl_cfg = load_vl_speedrun_config(preset, overrides)
        with progress_bar() as bar:
            vl_report = run_vl_speedrun(vl_cfg, bar)
        for stage, row in vl_report["stages"].items():
            typer.echo(f"{stage:>20}: " + ", ".join(f"{t} {100 * a:.1f}%" for t, a in row["accuracy"].items()))
        typer.echo(f"report: {vl_cfg.out_dir}/report.md ({vl_report['total_wall_s']} s)")
        return
    cfg = load_speedrun_config(preset, overrides)
    with progress_bar() as bar:
        report = run_speedrun(cfg, bar)
    for stage, row in report["stages"].items():
        if "accuracy" not in row:  # a data stage (traces): nothing evaluated
            continue
        accs = ", ".join(f"{t} {100 * a:.1f}%" for t, a in row["accuracy"].items())
        typer.echo(f"{stage:>9}: {accs}")
    typer.echo(f"report: {cfg.out_dir}/report.md ({report['total_wall_s']} s)")


COMMANDS = {"pretrain": pretrain_cmd, "sft": sft_cmd, "speedrun": speedrun_cmd}
