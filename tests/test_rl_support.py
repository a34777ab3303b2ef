"""Shared pieces for the RL tests: toy rewards registered under test-only names, and a micro model.
Imported by test_rl*.py / test_rollout*.py and by the subprocess of the SIGKILL test. The one test here
checks the shipped RL recipes and the command each one documents."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

from thinkforge.rewards import RewardResult, register_reward

# A random micro model writes a digit in about a third of 12-token samples: a binary reward with real
# variance inside each group, which RL can push up within a few steps.
DIGIT = re.compile(r"\d")


@register_reward("test_has_digit")
def _has_digit() -> object:
    def fn(problem, response):  # noqa: ANN001, ANN202
        ok = bool(DIGIT.search(response))
        return RewardResult(float(ok), ok, "correct" if ok else "wrong_answer")

    return fn


@register_reward("test_constant")
def _constant(value: float = 0.0) -> object:
    def fn(problem, response):  # noqa: ANN001, ANN202
        return RewardResult(value, value >= 1.0, "constant")

    return fn


@register_reward("test_raises")
def _raises() -> object:
    def fn(problem, response):  # noqa: ANN001, ANN202
        raise ValueError("boom")

    return fn


@register_reward("test_hangs")
def _hangs(seconds: float = 5.0) -> object:
    def fn(problem, response):  # noqa: ANN001, ANN202
        time.sleep(seconds)
        return RewardResult(1.0, True, "late")

    return fn


@register_reward("test_slow_digit")
def _slow_digit(delay_s: float = 0.02) -> object:
    """The digit reward with a fixed latency, like a sandboxed verifier."""

    def fn(problem, response):  # noqa: ANN001, ANN202
        time.sleep(delay_s)
        ok = bool(DIGIT.search(response))
        return RewardResult(float(ok), ok, "correct" if ok else "wrong_answer")

    return fn


def micro_model(out: Path) -> str:
    """A micro Qwen2 with the project tokenizer, pretrained a few steps (cached per directory)."""
    from thinkforge.train.pretrain import PretrainConfig, pretrain

    model = out / "model"
    if not (model / "config.json").exists():
        pretrain(PretrainConfig(out_dir=str(out), model_size="micro", steps=4, batch_size=4, seq_len=64,
                                docs_per_stage=200, eval_docs=16, eval_every=2, save_every=100, warmup_steps=1))
    return str(model)


def _documented_rl_commands(path: Path) -> list[list[str]]:
    """The `thinkforge rl ...` command lines in a recipe's comments."""
    return [shlex.split(line.lstrip("# ").strip())[2:] for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#") and line.lstrip("# ").startswith("thinkforge rl ")]


def test_every_shipped_rl_recipe_loads_and_its_documented_command_runs_checks():
    """Each rl-*.yaml builds an RLConfig that passes check(), and the command in its header names tasks RL
    can train on (a task without a 'train' split fails at the start of the run)."""
    import thinkforge
    from thinkforge.tasks import get_task
    from thinkforge.train.rl import RLConfig
    from thinkforge.utils import load_config

    fields = {"--model": "model", "--tasks": "tasks", "--out": "out_dir", "--steps": "steps", "--device": "device",
              "--seed": "seed"}
    recipes = sorted((Path(thinkforge.__file__).parent / "recipes").glob("rl-*.yaml"))
    assert {p.stem for p in recipes} >= {"rl-mimo7b", "rl-speedrun"}
    for path in recipes:
        commands = _documented_rl_commands(path)
        assert commands, f"{path.name}: no documented `thinkforge rl` command"
        for argv in commands:
            opts = dict(zip(argv[::2], argv[1::2], strict=True))
            assert opts.get("--recipe") == path.stem, (path.name, argv)
            overrides = {fields[k]: v for k, v in opts.items() if k in fields}
            if "tasks" in overrides:
                overrides["tasks"] = overrides["tasks"].split(",")
            cfg = load_config(RLConfig, path.stem, "rl", overrides)
            assert cfg.model
            cfg.check()
            for name in cfg.tasks:
                assert "train" in get_task(name).splits, f"{path.name}: task {name!r} has no 'train' split"
        # The recipe alone, with only a model given, is a valid config too.
        load_config(RLConfig, str(path), "rl", {"model": "some/model"}).check()
