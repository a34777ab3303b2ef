"""`thinkforge reward-model`: train the Bradley-Terry reward model (`bt_preference`) on synthetic preference pairs."""

from __future__ import annotations

from typing import Annotated

import typer


def reward_model_cmd(
    out: Annotated[str | None, typer.Option(help="Output directory (the model goes to OUT/model).")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks to draw pairs from (default vl_caption).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1...")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    recipe: Annotated[str | None, typer.Option(help="YAML recipe (its reward_model section is read).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field (repeatable).")] = None,
) -> None:
    """Bradley-Terry reward model on the tasks' preference pairs; route it with
    `rewards: {TASK: [..., {name: bt_preference, path: OUT/model}]}` or THINKFORGE_BT_REWARD_MODEL=OUT/model."""
    from thinkforge.train.reward_model import RewardModelConfig, train_reward_model
    from thinkforge.utils import load_config, parse_overrides

    named = {"out_dir": out, "steps": steps, "device": device, "seed": seed,
             "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None}
    cfg = load_config(RewardModelConfig, recipe, "reward_model" if recipe else None,
                      {**{k: v for k, v in named.items() if v is not None}, **parse_overrides(set_)})
    s = train_reward_model(cfg)
    acc = s["heldout_accuracy"]
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items() if k != "all")
    typer.echo(f"reward model: held-out pairwise accuracy {100 * acc['all']:.1f}% on {s['heldout_pairs']} pairs "
               f"({kinds}) -> {s['model_dir']}")


COMMANDS = {"reward-model": reward_model_cmd}
