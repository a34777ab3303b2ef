"""`thinkforge speedrun --preset vl-smoke | vl-cpu`: the MiMo-VL recipe in miniature, then a report card.

tiny Qwen2.5-VL from config -> four-stage VL pretraining (`thinkforge.train.vl_pretrain`) -> MORL
(`thinkforge.train.rl` on the VL checkpoint: fully on-policy GRPO, the per-task reward router, dynamic
sampling and the easy pool), with held-out greedy accuracy per task after every stage (counting exact
match, grounding Acc@0.5, point-in-box, digits via math-verify, charts, two-image comparison, caption
exact match), McNemar of MORL against the stage it started from, and with `eval_samples` T=1 pass@1 / pass@k
of both and their paired difference. With a `reward_model` section, a Bradley-Terry reward model (`thinkforge.train.reward_model`) is
trained first and handed to the `bt_preference` reward, which the rl section's routes mix in (MiMo-VL's
preference reward beside the verifiable ones); its held-out pairwise accuracy goes in the report. Writes
`report.json` and `report.md`. Finished stages are reused on a rerun (pretraining
skips its finished stages; RL resumes from its checkpoint), and evaluations already written are reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.utils import (
    asdict,
    atomic_write_json,
    atomic_write_text,
    build_config,
    ensure_writable_dir,
    load_yaml,
    resolve_recipe,
    run_metadata,
)

EVAL_TASKS = ["vl_count", "vl_ground", "vl_point", "vl_digits", "vl_chart", "vl_compare", "vl_caption"]


@dataclass
class VLSpeedrunConfig:
    out_dir: str = "runs/speedrun-vl"
    seed: int = 0
    device: str = "auto"
    pretrain: dict = field(default_factory=dict)  # VLPretrainConfig fields
    rl: dict | None = None  # RLConfig fields; the MORL stage runs when present
    # RewardModelConfig fields: a Bradley-Terry reward model trained before MORL when present; its path goes
    # to the `bt_preference` reward (rl.reward_options), which the rl section's routes can mix in.
    reward_model: dict | None = None
    eval_tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    eval_problems: int = 50  # held-out problems per task and stage
    eval_max_tokens: int = 48
    eval_batch_size: int = 32
    # T=1 samples per held-out problem of the RL tasks, for MORL and the stage it started from: sampled pass@1
    # (the sampling policy RL trains; greedy is only its mode) and pass@k beside greedy; 0 = greedy only
    eval_samples: int = 0


def load_vl_speedrun_config(preset: str, overrides: dict[str, Any]) -> VLSpeedrunConfig:
    """`preset` "vl-smoke" reads recipe `vl-speedrun-smoke.yaml` (or a path to a YAML file)."""
    name = preset if preset.endswith(".yaml") else f"vl-speedrun-{preset.removeprefix('vl-')}"
    cfg = build_config(VLSpeedrunConfig, load_yaml(resolve_recipe(name)), f"speedrun preset {preset!r}")
    for key, value in overrides.items():  # "pretrain.batch_size=8" reaches into a section
        section, _, sub = key.partition(".")
        if sub and section in ("pretrain", "rl", "reward_model"):
            if getattr(cfg, section) is None:
                setattr(cfg, section, {})
            getattr(cfg, section)[sub] = value
        else:
            setattr(cfg, key, value)
    return cfg


def evaluate_vl(model_dir: str, cfg: VLSpeedrunConfig, out_dir: Path, samples: int = 0,
                tasks: list[str] | None = None) -> dict[str, float]:
    """Held-out accuracy per task, greedy, or with `samples` T=1 draws per problem (the harness resumes: a
    rerun reuses written samples)."""
    from thinkforge.engine.base import SamplingParams
    from thinkforge.eval import evaluate
    from thinkforge.tasks import get_task
    from thinkforge.vl.backend import HFVLBackend

    backend = HFVLBackend(model_dir, device=cfg.device, dtype="float32", batch_size=cfg.eval_batch_size)
    params = (SamplingParams(temperature=1.0, max_tokens=cfg.eval_max_tokens, n=samples, seed=cfg.seed) if samples
              else SamplingParams(temperature=0.0, max_tokens=cfg.eval_max_tokens, seed=cfg.seed))
    acc = {}
    for name in tasks or cfg.eval_tasks:
        task = get_task(name)
        summary = evaluate(task, backend, params, problems=task.problems("heldout", n=cfg.eval_problems, seed=0),
                           output_dir=out_dir, seed=cfg.seed)
        acc[name] = round(summary["accuracy"], 4)
    return acc


def train_bt(cfg: VLSpeedrunConfig, out_dir: Path) -> dict[str, Any]:
    """The Bradley-Terry reward model (reused when a finished one is there)."""
    import json

    from thinkforge.train.reward_model import RewardModelConfig, train_reward_model

    done = out_dir / "summary.json"
    if done.exists() and (out_dir / "model" / "model.safetensors").exists():
        return json.loads(done.read_text())
    rm_cfg = build_config(RewardModelConfig, {"seed": cfg.seed, **(cfg.reward_model or {}), "out_dir": str(out_dir)},
                          "speedrun reward_model")
    return train_reward_model(rm_cfg)


def run_vl_speedrun(cfg: VLSpeedrunConfig, progress: Any = None) -> dict[str, Any]:
    from thinkforge.train.rl import RLConfig, rl
    from thinkforge.train.vl_pretrain import VLPretrainConfig, vl_pretrain
    from thinkforge.vl.model import load_vl, module_parameters

    t0 = time.time()
    out = ensure_writable_dir(cfg.out_dir)
    pre_cfg = build_config(VLPretrainConfig, {"seed": cfg.seed, "device": cfg.device, **cfg.pretrain,
                                              "out_dir": str(out / "pretrain")}, "speedrun pretrain")
    pre = vl_pretrain(pre_cfg, progress)
    stages: dict[str, Any] = {}
    for s in pre["stages"]:
        t = time.time()
        acc = evaluate_vl(s["model_dir"], cfg, out / "eval" / s["stage"])
        stages[s["stage"]] = {"model_dir": s["model_dir"], "accuracy": acc, "train_wall_s": s["wall_s"],
                              "eval_wall_s": round(time.time() - t, 2), "trainable_params": s["trainable_params"],
                              "dropped_overlong": s["dropped_overlong"], "final_loss": round(s["final_loss"], 4)}
    reward_options: dict[str, Any] = {}
    reward_model = None
    if cfg.reward_model is not None:
        rm = train_bt(cfg, out / "reward_model")
        reward_model = {"model_dir": rm["model_dir"], "train_wall_s": rm["wall_s"], "parameters": rm["parameters"],
                        "heldout_pair_accuracy": rm["heldout_accuracy"], "heldout_pairs": rm["heldout_pairs"]}
        reward_options = {"bt_preference": {"path": rm["model_dir"]}}
    if cfg.rl is not None:
        options = {**(cfg.rl.get("reward_options") or {})}
        for name, opts in reward_options.items():
            options[name] = {**opts, **options.get(name, {})}
        rl_cfg = build_config(RLConfig, {"seed": cfg.seed, "device": cfg.device, "tasks": list(cfg.eval_tasks),
                                         "on_policy": True, **cfg.rl, "reward_options": options,
                                         "model": pre["model_dir"], "out_dir": str(out / "morl")}, "speedrun rl")
        summary = rl(rl_cfg, progress)
        t = time.time()
        stages["morl"] = {"model_dir": summary["model_dir"], "accuracy": evaluate_vl(summary["model_dir"], cfg,
                                                                                     out / "eval" / "morl"),
                          "train_wall_s": round(summary["wall_s"], 2), "eval_wall_s": round(time.time() - t, 2),
                          "steps": summary["steps"], "stopped": summary["stopped"]}
        if cfg.eval_samples:
            rl_tasks = [t for t in rl_cfg.tasks if t in cfg.eval_tasks]
            before = pre["stages"][-1]
            for name, model_dir in ((before["stage"], before["model_dir"]), ("morl", summary["model_dir"])):
                evaluate_vl(model_dir, cfg, out / "eval" / f"{name}-sampled", cfg.eval_samples, rl_tasks)
    model, _ = load_vl(pre["model_dir"], device="cpu", dtype="float32")
    report = {"stages": stages, "model": {"architecture": "Qwen2_5_VLForConditionalGeneration",
                                          **module_parameters(model)},
              "statistics": paired_statistics(out / "eval", list(stages), cfg),
              **({"reward_model": reward_model} if reward_model else {}),
              "total_wall_s": round(time.time() - t0, 1), **run_metadata(asdict(cfg), cfg.seed)}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def paired_statistics(eval_dir: Path, stage_names: list[str], cfg: VLSpeedrunConfig) -> dict[str, Any]:
    """Wilson intervals per stage and task, and McNemar's paired test of MORL against the SFT stage it started
    from, per task and pooled over the tasks RL trained on (same held-out problems, so the test is paired)."""
    from thinkforge.eval.stats import mcnemar, paired_rate_difference, per_problem_counts
    from thinkforge.speedrun_report import greedy_correct, read_rows, stage_statistics

    pairs = [(stage_names[-2], "morl")] if "morl" in stage_names and len(stage_names) > 1 else []
    stats = stage_statistics(eval_dir, stage_names, list(cfg.eval_tasks), pairs)
    rl_tasks = [t for t in (cfg.rl or {}).get("tasks") or cfg.eval_tasks if t in cfg.eval_tasks]  # RL's, evaluated
    if pairs:
        before, after = pairs[0]
        a: dict[str, bool] = {}
        b: dict[str, bool] = {}
        for t in rl_tasks:
            a.update(greedy_correct(eval_dir / before / t / "samples.jsonl"))
            b.update(greedy_correct(eval_dir / after / t / "samples.jsonl"))
        if a and set(a) == set(b):
            stats["paired"].append({"a": before, "b": after, "task": "rl_tasks_pooled", **mcnemar(a, b).to_dict()})
        # Sampled pass@1 (the sampling policy RL trains), paired per problem: B's pass rate minus A's, 95% interval.
        stats["sampled_paired"] = []
        for t in stats["sampled"].get(after, {}):
            if t in stats["sampled"].get(before, {}):
                ca, cb = (per_problem_counts(read_rows(eval_dir / f"{n}-sampled" / t / "samples.jsonl"))
                          for n in (before, after))
                stats["sampled_paired"].append({"a": before, "b": after, "task": t,
                                                **paired_rate_difference(ca, cb).to_dict()})
    stats["answer_bias"] = answer_bias(eval_dir, stage_names, rl_tasks, cfg.eval_problems)
    return stats


def count_direction(rows: list[dict[str, Any]], gold: dict[str, str]) -> dict[str, Any]:
    """How greedy integer answers miss: below / at / above the true value (unparsed apart), and the mean signed
    error over parsed answers. A shift between below and above at equal accuracy is a moved threshold, not a
    better reading of the image (issue 15: MORL on count turned undercounts into overcounts)."""
    out = {"below": 0, "exact": 0, "above": 0, "unparsed": 0}
    errors = []
    by_truth: dict[str, list[int]] = {}  # true value -> [exact, problems]
    for r in rows:
        truth = int(gold[str(r["problem_id"])])
        cell = by_truth.setdefault(str(truth), [0, 0])
        cell[1] += 1
        try:
            said = int(str(r.get("extracted")).strip())
        except ValueError:
            out["unparsed"] += 1
            continue
        out["below" if said < truth else "above" if said > truth else "exact"] += 1
        cell[0] += said == truth
        errors.append(said - truth)
    return {**out, "n": len(rows), "mean_signed_error": round(sum(errors) / len(errors), 4) if errors else 0.0,
            "exact_by_truth": dict(sorted(by_truth.items(), key=lambda kv: int(kv[0])))}


def answer_bias(eval_dir: Path, stage_names: list[str], tasks: list[str], problems: int) -> dict[str, dict[str, Any]]:
    """count_direction per stage for those of `tasks` whose held-out answers are all integers (count, compare);
    the gold answers are the `problems` held-out problems every stage was evaluated on."""
    from thinkforge.speedrun_report import read_rows
    from thinkforge.tasks import get_task

    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        gold = {p.id: p.answer for p in get_task(t).problems("heldout", n=problems, seed=0)}
        if not gold or not all(a.strip().lstrip("-").isdigit() for a in gold.values()):
            continue
        for name in stage_names:
            rows = read_rows(eval_dir / name / t / "samples.jsonl")
            if rows:
                out.setdefault(name, {})[t] = count_direction(rows, gold)
    return out


def _pct(iv: dict[str, Any]) -> str:
    return f"{100 * iv['estimate']:.1f}% [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"


def render_markdown(report: dict[str, Any]) -> str:
    tasks = sorted({t for s in report["stages"].values() for t in s["accuracy"]})
    m = report["model"]
    lines = ["# thinkforge VL speedrun report", "",
             f"Model: {m['architecture']}, {m['total'] / 1e6:.2f}M parameters (ViT {m['vit'] / 1e6:.2f}M, projector "
             f"{m['projector'] / 1e6:.2f}M, LLM {m['llm'] / 1e6:.2f}M). Seed {report['seed']}, config hash "
             f"`{report['config_hash']}`.", "",
             "Held-out greedy accuracy (grounding: Acc@0.5; caption: exact match):", "",
             "| stage | " + " | ".join(tasks) + " | train s |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, s in report["stages"].items():
        cells = [f"{100 * s['accuracy'][t]:.1f}%" if t in s["accuracy"] else "-" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['train_wall_s']} |")
    paired = (report.get("statistics") or {}).get("paired") or []
    if paired:
        lines += ["", f"MORL against the stage it started from ({paired[0]['a']}), McNemar on the same held-out "
                      "problems (`rl_tasks_pooled`: every task RL trained on):", "",
                  "| task | problems | right only before | right only after | difference | p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['task']} | {p['n']} | {p['a_only']} | {p['b_only']} | {100 * p['difference']:+.1f} pts | "
                  f"{p['p_value']:.3g} |" for p in paired]
    sampled = (report.get("statistics") or {}).get("sampled") or {}
    if sampled:
        lines += ["", "T=1 samples on the RL tasks' held-out problems (95% intervals over problems):", "",
                  "| stage | task | greedy | sampled pass@1 | sampled pass@k |", "|---|---|---|---|---|"]
        for name, per_task in sampled.items():
            for t, smp in per_task.items():
                g = report["statistics"]["intervals"][name][t]
                lines.append(f"| {name} | {t} | {_pct(g)} | {_pct(smp['pass1'])} | "
                             f"pass@{smp['k']} {_pct(smp['passk'])} |")
        diffs = report["statistics"].get("sampled_paired") or []
        lines += [""] + [f"- Sampled pass@1, {d['b']} minus {d['a']} on {d['task']} (paired over {d['n']} problems): "
                         f"{100 * d['estimate']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]."
                         for d in diffs] if diffs else []
    bias = (report.get("statistics") or {}).get("answer_bias") or {}
    if bias:
        lines += ["", "Greedy integer answers against the truth (a move from below to above at the same accuracy is "
                      "a shifted threshold, not better perception):", "",
                  "| stage | task | below | exact | above | unparsed | mean signed error | exact / problems by true value |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t} | {b['below']} | {b['exact']} | {b['above']} | {b['unparsed']} | "
                  f"{b['mean_signed_error']:+.2f} | "
                  + ", ".join(f"{v}: {c[0]}/{c[1]}" for v, c in b["exact_by_truth"].items()) + " |"
                  for name, per_task in bias.items() for t, b in per_task.items()]
    rm = report.get("reward_model")
    if rm:
        per_kind = ", ".join(f"{k} {100 * v:.1f}%" for k, v in rm["heldout_pair_accuracy"].items() if k != "all")
        lines += ["", f"Bradley-Terry reward model (`bt_preference`): held-out pairwise accuracy "
                      f"{100 * rm['heldout_pair_accuracy']['all']:.1f}% on {rm['heldout_pairs']} pairs ({per_kind}); "
                      f"trained in {rm['train_wall_s']} s."]
    lines += ["", f"Total wall time: {report['total_wall_s']} s.", ""]
    return "\n".join(lines)
