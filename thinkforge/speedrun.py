"""`thinkforge speedrun`: the whole recipe in miniature, then a report card.

build tokenizer -> pretrain (staged, rising difficulty) -> SFT on verified teacher traces -> RL from
verifiable rewards, evaluating held-out accuracy after each stage, and write `report.md`, `report.json` and
PNG plots (`thinkforge.speedrun_report`). A preset may add the references an RL claim needs: a teacher whose
traces go through distill -> curate into nested N / 10N trace sets (`traces:`), SFT on the 10N set
(`sft_10n:`), rejection-sampling fine-tuning with RL's completion budget (`rft:`), and RL reward ablations
from the same SFT start (`ablations:`). Every stage is the real trainer on a tiny Qwen2; a stage whose
summary already exists with the same config (and the same upstream configs) is skipped, so an interrupted
speedrun continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.numerics import numerics_info
from thinkforge.speedrun_report import (
    ablation_table,
    build_report,
    render_markdown,
    stage_statistics,
    write_plots,
)
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
)

SECTIONS = ("pretrain", "teacher", "traces", "sft", "sft_10n", "rl", "rft", "eval")


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    problems_per_task: int = 200
    max_tokens: int = 160
    backend: str = "native"
    mtp_prompts_per_task: int = 32  # held-out prompts decoded speculatively to measure MTP acceptance
    sampled_n: int = 0  # > 0: also this many T=sampled_temperature samples per problem (sampled pass@1, pass@n)
    sampled_temperature: float = 1.0
    sampled_problems: int = 0  # problems per task sampled (0 = all greedy ones)
    sampled_stages: list[str] = field(default_factory=list)  # [] = every evaluated stage but pretrain
    compare: list[list[str]] = field(default_factory=list)  # McNemar pairs besides (parent, stage)
    ablation_task: str = "code"


@dataclass
class SpeedrunConfig:
    out_dir: str = "runs/speedrun"
    seed: int = 0
    device: str = "auto"
    pretrain: dict = field(default_factory=dict)
    teacher: dict | None = None  # SFT of a teacher model (its traces feed `traces`)
    traces: dict | None = None  # distill -> curate -> nested verified trace sets (TraceSetsConfig)
    sft: dict = field(default_factory=dict)  # `traces: N` trains on the N-trace set
    sft_10n: dict | None = None  # the reference: SFT on the larger trace set
    rl: dict | None = None  # the RL stage runs when the preset has an `rl:` section
    rft: dict | None = None  # rejection-sampling fine-tuning from the SFT model, with RL's completion budget
    ablations: dict[str, dict] = field(default_factory=dict)  # name -> RL overrides, each from the SFT model
    eval: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage: its config class, its runner, its preset section, and the stage whose model it starts from."""

    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]
    section: dict
    parent: str | None = None
    model_field: str = "model"
    evaluated: bool = True


def plan_stages(cfg: SpeedrunConfig) -> list[Stage]:
    from thinkforge.data.trace_sets import TraceSetsConfig, build_trace_sets
    from thinkforge.train.rft import RFTConfig, rft
    from thinkforge.train.rl import RLConfig, rl

    plan = [Stage("pretrain", PretrainConfig, pretrain, cfg.pretrain)]
    if cfg.teacher is not None:
        plan.append(Stage("teacher", SFTConfig, sft, cfg.teacher, "pretrain"))
    if cfg.traces is not None:
        # A teacher URL or checkpoint in the section is used as is; otherwise the teacher stage's model.
        parent = None if cfg.traces.get("teacher") else "teacher"
        if parent and cfg.teacher is None:
            raise ThinkforgeError("speedrun: traces needs a teacher (a `teacher:` section or traces.teacher)")
        plan.append(Stage("traces", TraceSetsConfig, build_trace_sets, cfg.traces, parent, "teacher", evaluated=False))
    plan.append(Stage("sft", SFTConfig, sft, cfg.sft, "pretrain"))
    if cfg.sft_10n is not None:
        plan.append(Stage("sft_10n", SFTConfig, sft, cfg.sft_10n, "pretrain"))
    if cfg.rl is not None:
        plan.append(Stage("rl", RLConfig, rl, cfg.rl, "sft"))
    for name, overrides in cfg.ablations.items():
        plan.append(Stage(f"rl_{name}", RLConfig, rl, {**(cfg.rl or {}), **overrides}, "sft"))
    if cfg.rft is not None:
        plan.append(Stage("rft", RFTConfig, rft, cfg.rft, "sft"))
    return plan


def load_speedrun_config(preset: str, overrides: dict[str, Any]) -> SpeedrunConfig:
    doc = load_yaml(resolve_recipe(f"speedrun-{preset}" if not preset.endswith(".yaml") else preset))
    cfg = build_config(SpeedrunConfig, doc, f"speedrun preset {preset!r}")
    for key, value in overrides.items():  # "pretrain.steps=10" style keys reach into a section
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            if getattr(cfg, section) is None:
                setattr(cfg, section, {})
            getattr(cfg, section)[name] = value
        elif name and section == "ablations" and "." in name:
            ablation, _, fld = name.partition(".")
            cfg.ablations.setdefault(ablation, {})[fld] = value
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


def rl_completions(rl_dir: Path) -> dict[str, int]:
    """Completions an RL run drew per task (finished samples of every group it scored), from rollouts.jsonl."""
    counts: dict[str, int] = {}
    path = rl_dir / "rollouts.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        for g in json.loads(line)["groups"]:
            task = g["problem"].split("/")[0]
            counts[task] = counts.get(task, 0) + len(g["rewards"])
    return counts


def drop_stale_samples(eval_dir: Path, key: str) -> None:
    """Removes a task's eval samples made from an earlier model of this stage (another stage hash), which the
    harness's resume guard would otherwise refuse; samples of this model are kept and resumed."""
    import shutil

    for run_file in eval_dir.glob("*/run.json") if eval_dir.exists() else []:
        if json.loads(run_file.read_text()).get("settings", {}).get("stage_hash") != key:
            shutil.rmtree(run_file.parent)


def file_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resolve_inputs(stage: Stage, fields: dict[str, Any], done: dict[str, Any], out: Path) -> list[str]:
    """Fills the fields a stage takes from earlier stages; returns the names of the stages it read."""
    used = []
    if "traces" in fields and stage.config_cls is SFTConfig:  # `traces: N` = the N-trace set per task
        size = fields.pop("traces")
        if "traces" not in done:
            raise ThinkforgeError(f"speedrun {stage.name}: traces: {size} needs a `traces:` section")
        files = done["traces"]["summary"]["files"]
        if str(size) not in files:
            raise ThinkforgeError(f"speedrun {stage.name}: no {size}-trace set; traces.sizes makes {sorted(files)}")
        fields["data"] = files[str(size)]
        used.append("traces")
    if stage.name == "rft" and not fields.get("completions_per_task"):
        if "rl" not in done:
            raise ThinkforgeError("speedrun rft: give rft.completions_per_task or run an `rl:` stage to match")
        fields["completions_per_task"] = rl_completions(out / "rl")
        fields.setdefault("tasks", [t for t in fields["completions_per_task"]])
        used.append("rl")
    return used


def _label(stage: Stage, summary: dict[str, Any], section: dict[str, Any]) -> str:
    if "traces" in section:
        return f"{stage.name} ({section['traces']} traces/task)"
    if stage.name == "rft":
        return f"rft ({summary.get('kept')} verified of {summary.get('completions')} samples)"
    return stage.name


def run_speedrun(cfg: SpeedrunConfig, progress: Any = None) -> dict[str, Any]:
    out = ensure_writable_dir(cfg.out_dir)
    spec = build_config(EvalSpec, cfg.eval, "speedrun eval")
    t_start, steal_start = time.time(), steal_seconds()
    numerics = numerics_info()
    mode = {k: numerics.get(k) for k in ("mode", "in_effect")}
    stages: dict[str, Any] = {}
    digests: dict[str, str] = {}
    for stage in plan_stages(cfg):
        fields = {"seed": cfg.seed, "device": cfg.device, **stage.section, "out_dir": str(out / stage.name)}
        if stage.parent:
            fields[stage.model_field] = stages[stage.parent]["summary"]["model_dir"]
        inputs = _resolve_inputs(stage, fields, stages, out)
        stage_cfg = build_config(stage.config_cls, fields, f"speedrun {stage.name}")
        # This stage's config, the numerics mode, and the digests of every stage it reads: a change upstream
        # reruns it, a change in a sibling (another reference row) does not.
        data = getattr(stage_cfg, "data", None)  # a data file's content, not only its path
        digest = config_hash({"numerics": mode, stage.name: asdict(stage_cfg),
                              "upstream": {n: digests[n] for n in [stage.parent, *inputs] if n},
                              **({"data_sha256": file_sha256(data)} if data and Path(data).exists() else {})})
        digests[stage.name] = digest
        summary = _cached(out / stage.name, digest)
        if summary is None:
            c0 = cpu_seconds()
            summary = stage.run(stage_cfg, progress)
            summary["cpu_s"] = cpu_seconds() - c0
            summary["speedrun_hash"] = digest
            atomic_write_json(out / stage.name / "summary.json", summary)
        stages[stage.name] = {"summary": summary, "parent": stage.parent, "evaluated": stage.evaluated,
                              "label": _label(stage, summary, stage.section)}

    evaluated = [n for n, s in stages.items() if s["evaluated"]]
    sampled = spec.sampled_stages or [n for n in evaluated if n != "pretrain"]
    # An ablation that trains on its own tasks (the TDDR rows train on code only) is evaluated on those.
    own_tasks = {f"rl_{n}": [t for t in spec.tasks if t in o["tasks"]] for n, o in cfg.ablations.items() if "tasks" in o}
    for name in evaluated:
        stage = stages[name]
        t0, c0 = time.time(), cpu_seconds()
        model_dir = stage["summary"]["model_dir"]
        # The stage's digest in the eval config: a retrained model in the same directory is evaluated afresh.
        key = digests[name]
        for sub in (name, f"{name}-sampled"):
            drop_stale_samples(out / "eval" / sub, key)
        stage_spec = replace(spec, tasks=own_tasks[name]) if name in own_tasks else spec
        stage["accuracy"] = evaluate_stage(model_dir, stage_spec, out / "eval" / name, cfg.seed, cfg.device, key=key)
        if spec.sampled_n > 0 and name in sampled:
            evaluate_stage(model_dir, stage_spec, out / "eval" / f"{name}-sampled", cfg.seed, cfg.device,
                           sampled=True, key=key)
        stage["mtp"] = measure_mtp(model_dir, spec, cfg.device)
        stage["eval_wall_s"], stage["eval_cpu_s"] = time.time() - t0, cpu_seconds() - c0

    report = build_report(cfg, stages, time.time() - t_start, steal_seconds() - steal_start)
    pairs = [(s["parent"], n) for n, s in stages.items() if n in evaluated and s["parent"] in evaluated]
    pairs += [(a, b) for a, b in spec.compare if a in evaluated and b in evaluated]
    report.update(stage_statistics(out / "eval", evaluated, spec.tasks, pairs))
    # Variants of the main run (same tasks) follow it in the table; ablations with tasks of their own (code-only
    # runs at one budget) are compared among themselves.
    ablation = [f"rl_{n}" for n in cfg.ablations if f"rl_{n}" in evaluated]
    if ablation and "rl" in evaluated and not own_tasks:
        ablation.insert(0, "rl")
    if len(ablation) > 1 and spec.ablation_task in spec.tasks:
        report["ablation"] = ablation_table(out / "eval", ablation, {n: stages[n]["label"] for n in ablation},
                                            spec.ablation_task, report["intervals"])
    atomic_write_json(out / "report.json", report)  # before the plots: the numbers never wait on matplotlib
    report["has_rl_curves"] = write_plots(out, stages)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def evaluate_stage(model_dir: str, spec: EvalSpec, out_dir: Path, seed: int, device: str,
                   sampled: bool = False, key: str | None = None) -> dict[str, float]:
    """Held-out accuracy per task through the evaluation harness: greedy, or `spec.sampled_n` samples per
    problem at `spec.sampled_temperature` (avg@n pass@1)."""
    from thinkforge.engine.base import SamplingParams, get_backend
    from thinkforge.eval import evaluate
    from thinkforge.tasks import get_task

    backend = get_backend(spec.backend, model_dir, device=device, dtype="float32")
    try:
        if sampled:
            params = SamplingParams(temperature=spec.sampled_temperature, n=spec.sampled_n,
                                    max_tokens=spec.max_tokens, seed=seed)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, seed=seed)
        out = {}
        for name in spec.tasks:
            task = get_task(name)
            problems = task.problems("heldout", n=spec.problems_per_task, seed=0)
            if sampled and spec.sampled_problems:
                problems = problems[: spec.sampled_problems]
            summary = evaluate(task, backend, params, problems=problems, output_dir=out_dir, seed=seed,
                               config={"model": model_dir, "task": name, **({"stage_hash": key} if key else {})})
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
