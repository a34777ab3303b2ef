"""`thinkforge rl`: RL from verifiable rewards (GRPO, MiMo's recipe) on the Seamless Rollout Engine."""

from __future__ import annotations

from typing import Annotated

import typer


def rl_cmd(
    model: Annotated[str | None, typer.Option(help="HF dir or hub id of the policy to train (the SFT checkpoint).")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task names, e.g. arith,code.")] = None,
    recipe: Annotated[str | None, typer.Option(help="YAML recipe (path or shipped name: rl-speedrun, rl-mimo7b).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory (resumes from OUT/checkpoint).")] = None,
    steps: Annotated[int | None, typer.Option(help="Rollout steps.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1...")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: --set lr=1e-6 (repeatable).")] = None,
) -> None:
    """GRPO with dynamic sampling, clip-higher, token-level loss, easy-data pool and test-difficulty rewards.
    `--set cluster.backend=ray --set cluster.rollout_workers=2 --set cluster.reward_workers=2` runs the
    same loop with rollout engines and reward scorers on Ray actors (a local cluster, or cluster.address);
    `--set cluster.trainer_procs=N` trains with FSDP2 over N ranks (this process is rank 0)."""
    from thinkforge.commands.train import progress_bar
    from thinkforge.train.rl import RLConfig, rl
    from thinkforge.utils import load_config, parse_overrides

    named = {"model": model, "out_dir": out, "steps": steps, "device": device, "seed": seed,
             "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None}
    overrides = {**{k: v for k, v in named.items() if v is not None}, **parse_overrides(set_)}
    # `--set cluster.backend=ray`: dotted keys override one field of the recipe's `cluster:` mapping.
    cluster = {k.split(".", 1)[1]: overrides.pop(k) for k in list(overrides) if k.startswith("cluster.")}
    cfg = load_config(RLConfig, recipe, "rl" if recipe else None, overrides)
    if cluster:
        cfg.cluster = {**cfg.cluster, **cluster}
    with progress_bar() as bar:
        summary = rl(cfg, bar)
    if summary.get("rank"):  # torchrun: a trainer-only rank (rank 0 reports the run)
        return
    accs = ", ".join(f"{t} {100 * a:.1f}%" for t, a in summary["accuracy"].items())
    if summary.get("stopped"):
        typer.echo(f"warning: {summary['stopped']}", err=True)
    typer.echo(f"rl: {summary['steps']} steps, held-out {accs} -> {summary['model_dir']}")


COMMANDS = {"rl": rl_cmd}
