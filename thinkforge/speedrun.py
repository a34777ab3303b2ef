"""`thinkforge speedrun`: the whole recipe in miniature, then a report card.

build tokenizer -> pretrain (staged, rising difficulty) -> SFT on verified teacher traces -> RL from
verifiable rewards, evaluating held-out accuracy after each stage, and write `report.md`, `report.json` and PNG plots. Every stage is the
real trainer from `thinkforge.train` on a tiny Qwen2; a stage whose summary already exists with the
same config is skipped, so an interrupted speedrun continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.numerics import numerics_info
from thinkforge.train.pretrain import PretrainConfig, pretrain
from thinkforge.train.sft import SFTConfig, sft
from thinkforge.utils import (
    asdict,
    atomic_write_json,
    atomic_write_text,
    build_config,
    config_hash,
    ensure_writable_dir,
    load_yaml,
    resolve_recipe,
    run_metadata,
)

CPU_PRICE_PER_CORE_HOUR = 0.02  # USD; an on-demand cloud vCPU-hour is roughly $0.02-0.05


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    problems_per_task: int = 200
    max_tokens: int = 160
    backend: str = "native"
    mtp_prompts_per_task: int = 32  # held-out prompts decoded speculatively to measure MTP acceptance


@dataclass
class SpeedrunConfig:
    out_dir: str = "runs/speedrun"
    seed: int = 0
    device: str = "auto"
    pretrain: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    rl: dict | None = None  # the RL stage runs when the preset has an `rl:` section
    eval: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One training stage: its config class, its trainer, and whether it starts from the previous model."""

    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]
    takes_model: bool = True


def _stages() -> list[Stage]:
    from thinkforge.train.rl import RLConfig, rl

    return [Stage("pretrain", PretrainConfig, pretrain, takes_model=False), Stage("sft", SFTConfig, sft),
            Stage("rl", RLConfig, rl)]


def load_speedrun_config(preset: str, overrides: dict[str, Any]) -> SpeedrunConfig:
    doc = load_yaml(resolve_recipe(f"speedrun-{preset}" if not preset.endswith(".yaml") else preset))
    cfg = build_config(SpeedrunConfig, doc, f"speedrun preset {preset!r}")
    for key, value in overrides.items():  # "pretrain.steps=10" style keys reach into a section
        section, _, name = key.partition(".")
        if name and section in ("pretrain", "sft", "rl", "eval"):
            if getattr(cfg, section) is None:
                setattr(cfg, section, {})
            getattr(cfg, section)[name] = value
        elif hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            raise ThinkforgeError(f"unknown speedrun override {key!r}")
    return cfg


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (reward workers, sandboxes): unlike wall time,
    it does not grow when a shared or virtual machine takes the cores away."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def steal_seconds() -> float:
    """Machine-wide time the hypervisor ran someone else on our cores (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _cached(stage_dir: Path, digest: str) -> dict[str, Any] | None:
    path = stage_dir / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("speedrun_hash") == digest and Path(summary.get("model_dir", "")).exists():
            return summary
    return None


def evaluate_stage(model_dir: str, spec: EvalSpec, out_dir: Path, seed: int, device: str) -> dict[str, Any]:
    """Greedy held-out accuracy per task through the evaluation harness."""
    from thinkforge.engine.base import SamplingParams, get_backend
    from thinkforge.eval import evaluate
    from thinkforge.tasks import get_task

    backend = get_backend(spec.backend, model_dir, device=device, dtype="float32")
    try:
        params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, seed=seed)
        out = {}
        for name in spec.tasks:
            task = get_task(name)
            problems = task.problems("heldout", n=spec.problems_per_task, seed=0)
            summary = evaluate(task, backend, params, problems=problems, output_dir=out_dir, seed=seed,
                               config={"model": model_dir, "task": name})
            out[name] = summary["accuracy"]
        return out
    finally:
        backend.close()


def measure_mtp(model_dir: str, spec: EvalSpec, device: str) -> dict[str, Any] | None:
    """Per-draft-position acceptance of the checkpoint's MTP layers under greedy self-speculative
    decoding of held-out chat prompts (None when the model has no MTP layers)."""
    from thinkforge.engine.backends import apply_chat_template
    from thinkforge.engine.mtp_acceptance import mtp_acceptance
    from thinkforge.model.io import load_tokenizer
    from thinkforge.model.mtp import checkpoint_mtp_layers
    from thinkforge.tasks import get_task

    if not checkpoint_mtp_layers(model_dir) or spec.mtp_prompts_per_task < 1:
        return None
    tokenizer = load_tokenizer(model_dir)
    prompts = [apply_chat_template(tokenizer, get_task(name).messages(p)) for name in spec.tasks
               for p in get_task(name).problems("heldout", n=spec.mtp_prompts_per_task, seed=0)]
    m = mtp_acceptance(model_dir, prompts, max_tokens=spec.max_tokens, device=device, dtype="float32")
    return {"acceptance": [round(a, 4) for a in m["acceptance"]],
            "mean_accepted_length": round(m["mean_accepted_length"], 3), "prompts": len(prompts)}


def run_speedrun(cfg: SpeedrunConfig, progress: Any = None) -> dict[str, Any]:
    out = ensure_writable_dir(cfg.out_dir)
    spec = build_config(EvalSpec, cfg.eval, "speedrun eval")
    t_start, steal_start = time.time(), steal_seconds()
    stages: dict[str, Any] = {}
    # Configs of this stage and all before it, and the numerics mode: a change upstream reruns downstream.
    numerics = numerics_info()
    lineage: dict[str, Any] = {"numerics": {k: numerics.get(k) for k in ("mode", "in_effect")}}
    model_dir: str | None = None
    for stage in _stages():
        section = getattr(cfg, stage.name)
        if section is None:
            continue
        fields = {"seed": cfg.seed, "device": cfg.device, **section, "out_dir": str(out / stage.name)}
        if stage.takes_model:
            fields["model"] = model_dir
        stage_cfg = build_config(stage.config_cls, fields, f"speedrun {stage.name}")
        lineage[stage.name] = asdict(stage_cfg)
        digest = config_hash(lineage)
        summary = _cached(out / stage.name, digest)
        if summary is None:
            c0 = cpu_seconds()
            summary = stage.run(stage_cfg, progress)
            summary["cpu_s"] = cpu_seconds() - c0
            summary["speedrun_hash"] = digest
            atomic_write_json(out / stage.name / "summary.json", summary)
        stages[stage.name] = {"summary": summary}
        model_dir = summary["model_dir"]

    for name, stage in stages.items():
        t0, c0 = time.time(), cpu_seconds()
        stage["accuracy"] = evaluate_stage(stage["summary"]["model_dir"], spec, out / "eval" / name, cfg.seed, cfg.device)
        stage["mtp"] = measure_mtp(stage["summary"]["model_dir"], spec, cfg.device)
        stage["eval_wall_s"], stage["eval_cpu_s"] = time.time() - t0, cpu_seconds() - c0

    report = build_report(cfg, stages, time.time() - t_start, steal_seconds() - steal_start)
    report.update(stage_statistics(out / "eval", list(stages), spec.tasks))
    atomic_write_json(out / "report.json", report)
    write_plots(out, stages)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _greedy_correct(path: Path) -> dict[str, bool]:
    """problem id -> correct, from a stage's greedy held-out samples (one per problem)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["problem_id"]): bool(r["correct"]) for r in rows}


def stage_statistics(eval_dir: Path, stage_names: list[str], tasks: list[str]) -> dict[str, Any]:
    """95% Wilson intervals of each stage's greedy held-out accuracy, and McNemar's paired test between
    consecutive stages (same problems, so only the problems one got right and the other wrong count)."""
    from thinkforge.eval.stats import mcnemar, wilson_interval

    intervals: dict[str, dict[str, Any]] = {}
    paired: list[dict[str, Any]] = []
    correct = {(n, t): _greedy_correct(eval_dir / n / t / "samples.jsonl") for n in stage_names for t in tasks}
    for name in stage_names:
        intervals[name] = {t: wilson_interval(sum(c.values()), len(c)).to_dict()
                           for t in tasks if (c := correct[(name, t)])}
    for before, after in zip(stage_names, stage_names[1:], strict=False):
        for t in tasks:
            if correct[(before, t)] and correct[(after, t)]:
                paired.append({"a": before, "b": after, "task": t,
                               **mcnemar(correct[(before, t)], correct[(after, t)]).to_dict()})
    return {"intervals": intervals, "paired": paired}


def build_report(cfg: SpeedrunConfig, stages: dict[str, Any], wall_s: float, steal_s: float = 0.0) -> dict[str, Any]:
    pre = stages["pretrain"]["summary"]
    cores = os.cpu_count() or 1
    stage_rows = {
        name: {"accuracy": s["accuracy"], "train_wall_s": round(s["summary"]["wall_s"], 1),
               "eval_wall_s": round(s["eval_wall_s"], 1), "train_cpu_s": round(s["summary"].get("cpu_s", 0.0), 1),
               "eval_cpu_s": round(s["eval_cpu_s"], 1), "tokens": s["summary"]["tokens"],
               "steps": s["summary"]["steps"], "heldout_loss": s["summary"].get("heldout_loss"),
               **({"mtp": s["mtp"]} if s.get("mtp") else {})}
        for name, s in stages.items()
    }
    train_wall = sum(s["summary"]["wall_s"] for s in stages.values())
    return {
        "stages": stage_rows,
        "model": {"params": pre["params"], "architecture": "Qwen2ForCausalLM"},
        "tokens_seen": sum(s["summary"]["tokens"] for s in stages.values()),
        "train_wall_s": round(train_wall, 1),
        # A resumed speedrun skips finished stages: its own wall time is not what the recipe costs, the sum
        # of every stage's training and evaluation time is.
        "total_wall_s": round(train_wall + sum(s["eval_wall_s"] for s in stages.values()), 1),
        "this_invocation_wall_s": round(wall_s, 1),
        "total_cpu_s": round(sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in stage_rows.values()), 1),
        # Share of the machine's core-time the hypervisor gave to others during the run: when it is
        # large, the wall times above measure the neighbours, and the CPU times are the ones to trust.
        "steal_ratio": round(steal_s / max(wall_s * cores, 1e-9), 3),
        "estimated_cost_usd": round(train_wall / 3600 * cores * CPU_PRICE_PER_CORE_HOUR, 4),
        "cores": cores,
        "cost_assumption": f"{cores} CPU cores at ${CPU_PRICE_PER_CORE_HOUR}/core-hour, training wall time",
        **run_metadata(asdict(cfg), cfg.seed),
    }


def render_markdown(report: dict[str, Any]) -> str:
    tasks = sorted({t for s in report["stages"].values() for t in s["accuracy"]})
    lines = ["# thinkforge speedrun report", "",
             f"Model: {report['model']['architecture']}, {report['model']['params'] / 1e6:.2f}M parameters. "
             f"Tokens seen: {report['tokens_seen']:,}. Seed {report['seed']}, config hash `{report['config_hash']}`.", "",
             "| stage | " + " | ".join(f"{t} held-out acc" for t in tasks) + " | train wall (s) | train CPU (s) | eval wall (s) | tokens |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for name, s in report["stages"].items():
        accs = " | ".join(f"{100 * s['accuracy'].get(t, float('nan')):.1f}%" for t in tasks)
        lines.append(f"| {name} | {accs} | {s['train_wall_s']} | {s['train_cpu_s']} | {s['eval_wall_s']} | "
                     f"{s['tokens']:,} |")
    if report.get("intervals"):
        lines += ["", "Greedy held-out accuracy with 95% Wilson intervals, and McNemar's paired test between "
                  "consecutive stages on the same problems (exact binomial below 200 discordant problems).", "",
                  "| stage | " + " | ".join(f"{t} [95% CI] (problems)" for t in tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for name, per_task in report["intervals"].items():
            cells = [f"{100 * c['estimate']:.1f}% [{100 * c['low']:.1f}, {100 * c['high']:.1f}] ({c['n']})"
                     if (c := per_task.get(t)) else "–" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        for m in report.get("paired", []):
            lines.append(f"- {m['task']}, {m['a']} -> {m['b']}: {100 * m['difference']:+.1f} points "
                         f"({m['b_only']} problems right only after, {m['a_only']} only before, of {m['n']}), "
                         f"McNemar p = {m['p_value']:.3g} ({m['method']})")
    mtp_rows = [(name, s["mtp"]) for name, s in report["stages"].items() if s.get("mtp")]
    if mtp_rows:
        k = max(len(m["acceptance"]) for _, m in mtp_rows)
        lines += ["", "MTP self-speculative decoding (greedy, held-out prompts): share of drafts accepted per "
                  "draft position, and tokens emitted per verify step.", "",
                  "| stage | " + " | ".join(f"draft {j + 1} accepted" for j in range(k)) + " | mean accepted length |",
                  "|---|" + "---|" * (k + 1)]
        for name, m in mtp_rows:
            accs = " | ".join(f"{100 * a:.1f}%" for a in m["acceptance"])
            lines.append(f"| {name} | {accs} | {m['mean_accepted_length']} |")
    lines += ["", f"Total wall time: {report['total_wall_s']} s (training {report['train_wall_s']} s, summed over "
              f"stages; this invocation {report['this_invocation_wall_s']} s); CPU time "
              f"{report['total_cpu_s']} s over {report['cores']} cores; CPU steal by the hypervisor "
              f"{100 * report['steal_ratio']:.0f}% of core-time.",
              f"Estimated cost: ${report['estimated_cost_usd']} ({report['cost_assumption']}).", "",
              "![loss curves](loss.png)", "", "![accuracy by stage](accuracy.png)", "",
              _machine_line(report), "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _machine_line(report: dict[str, Any]) -> str:
    m, n = report.get("machine", {}), report.get("numerics", {})
    mode = n.get("mode", "native")
    if mode == "portable":
        mode += " (in effect)" if n.get("in_effect") else " (NOT in effect: torch was loaded first)"
    return (f"Machine: {m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('torch_threads', '?')} torch threads, BLAS {m.get('blas', '?')}, kernels "
            f"{n.get('cpu_capability', '?')}); numerics {mode}; fingerprint `{m.get('id', '?')}`. Same seed and "
            "numerics mode give the same numbers: portable mode on any x86 CPU with AVX2, native mode on "
            "machines with this fingerprint (see README, Reproducibility).")


def write_plots(out: Path, stages: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows_of(name: str) -> list[dict[str, Any]]:
        path = out / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # Left: language-model losses (pretrain, SFT). Right: RL's mean reward per rollout batch (its
    # policy-gradient loss is not a quantity to watch).
    lm = [name for name in stages if name != "rl"]
    fig, axes = plt.subplots(1, 2 if "rl" in stages else 1, figsize=(12 if "rl" in stages else 7, 4), squeeze=False)
    ax = axes[0][0]
    offset = 0
    for name in lm:
        rows = [r for r in rows_of(name) if "loss" in r]
        if rows:
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=f"{name} train", lw=1)
            held = [(offset + r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
            if held:
                ax.plot(*zip(*held, strict=True), "o--", label=f"{name} held-out")
            offset += rows[-1]["step"]
    ax.set_xlabel("step (stages concatenated)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    if "rl" in stages:
        ax = axes[0][1]
        rows = [r for r in rows_of("rl") if "reward" in r]
        for key in sorted({k for r in rows for k in r if k.startswith("reward/")}):
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key[7:], lw=1)
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean reward of the rollout batch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    tasks = sorted({t for s in stages.values() for t in s["accuracy"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(tasks), 1)
    for i, task in enumerate(tasks):
        xs = [j + i * width for j in range(len(stages))]
        ax.bar(xs, [100 * s["accuracy"].get(task, 0) for s in stages.values()], width, label=task)
    ax.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(stages))], list(stages))
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
