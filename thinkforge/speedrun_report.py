"""The speedrun's report card: per-stage held-out accuracy with 95% intervals, paired tests between stages,
sampled pass@1 / pass@k, the TDDR ablation, MTP acceptance, cost, and the plots (LM losses, RL curves).

Everything here reads what the stages and evaluations wrote (`summary.json`, `metrics.jsonl`, the eval
harness's `samples.jsonl`), so a report can be rebuilt from a finished run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from thinkforge.utils import run_metadata

CPU_PRICE_PER_CORE_HOUR = 0.02  # USD; an on-demand cloud vCPU-hour is roughly $0.02-0.05


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def greedy_correct(path: Path) -> dict[str, bool]:
    """problem id -> correct, from a stage's greedy held-out samples (one per problem)."""
    return {str(r["problem_id"]): bool(r["correct"]) for r in read_rows(path)}


def stage_statistics(eval_dir: Path, stage_names: list[str], tasks: list[str],
                     pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """95% Wilson intervals of each stage's greedy held-out accuracy, McNemar's paired test for each
    (before, after) pair (same problems, so only the problems one got right and the other wrong count), and,
    where a stage was also sampled at T > 0, sampled pass@1 and pass@k with intervals over problems."""
    from thinkforge.eval.stats import mcnemar, report_card

    intervals: dict[str, dict[str, Any]] = {}
    sampled: dict[str, dict[str, Any]] = {}
    correct = {(n, t): greedy_correct(eval_dir / n / t / "samples.jsonl") for n in stage_names for t in tasks}
    for name in stage_names:
        for t in tasks:
            greedy = read_rows(eval_dir / name / t / "samples.jsonl")
            if not greedy:
                continue
            draws = read_rows(eval_dir / f"{name}-sampled" / t / "samples.jsonl")
            k = min((c[0] for c in _counts(draws).values()), default=0)
            card = report_card(greedy, draws or None, k=k) if k else report_card(greedy)
            intervals.setdefault(name, {})[t] = card["greedy_pass1"]
            if k:
                sampled.setdefault(name, {})[t] = {"k": k, "pass1": card["sampled_pass1"],
                                                   "passk": card[f"sampled_pass{k}"]}
    paired = []
    for before, after in pairs:
        for t in tasks:
            a, b = correct.get((before, t)), correct.get((after, t))
            if a and b:
                paired.append({"a": before, "b": after, "task": t, **mcnemar(a, b).to_dict()})
    return {"intervals": intervals, "sampled": sampled, "paired": paired}


def _counts(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    from thinkforge.eval.stats import per_problem_counts

    return per_problem_counts(rows) if rows else {}


def code_test_stats(eval_dir: Path, stage: str, task: str) -> dict[str, Any] | None:
    """Mean share of tests passed and the pass rate per test level, from a code task's greedy samples
    (the harness keeps each test's result and level in the score details)."""
    rows = read_rows(eval_dir / stage / task / "samples.jsonl")
    per_level: dict[int, list[int]] = {}
    shares = []
    for r in rows:
        details = r.get("details") or {}
        passed, levels = details.get("passed"), details.get("levels")
        if not passed or not levels:
            continue
        shares.append(sum(passed) / len(passed))
        for ok, level in zip(passed, levels, strict=True):
            per_level.setdefault(int(level), []).append(int(ok))
    if not shares:
        return None
    return {"tests_passed": sum(shares) / len(shares),
            "level_pass_rate": {str(lv): sum(v) / len(v) for lv, v in sorted(per_level.items())}}


def build_report(cfg: Any, stages: dict[str, Any], wall_s: float, steal_s: float = 0.0) -> dict[str, Any]:
    from thinkforge.utils import asdict

    pre = stages["pretrain"]["summary"]
    cores = os.cpu_count() or 1
    stage_rows = {}
    for name, s in stages.items():
        summ = s["summary"]
        row = {"train_wall_s": round(summ["wall_s"], 1), "train_cpu_s": round(summ.get("cpu_s", 0.0), 1),
               "tokens": summ.get("tokens", 0), "steps": summ.get("steps", 0)}
        if "accuracy" in s:
            row.update(accuracy=s["accuracy"], eval_wall_s=round(s["eval_wall_s"], 1),
                       eval_cpu_s=round(s["eval_cpu_s"], 1), heldout_loss=summ.get("heldout_loss"),
                       label=s.get("label", name), **({"mtp": s["mtp"]} if s.get("mtp") else {}))
        for key in ("traces", "completions", "kept", "files", "teacher_pass_rate"):
            if key in summ:
                row[key] = summ[key]
        stage_rows[name] = row
    train_wall = sum(r["train_wall_s"] for r in stage_rows.values())
    return {
        "stages": stage_rows,
        "model": {"params": pre["params"], "architecture": "Qwen2ForCausalLM"},
        "tokens_seen": sum(r["tokens"] for r in stage_rows.values()),
        "train_wall_s": round(train_wall, 1),
        # A resumed speedrun skips finished stages: its own wall time is not what the recipe costs, the sum
        # of every stage's training and evaluation time is.
        "total_wall_s": round(train_wall + sum(r.get("eval_wall_s", 0.0) for r in stage_rows.values()), 1),
        "this_invocation_wall_s": round(wall_s, 1),
        "total_cpu_s": round(sum(r["train_cpu_s"] + r.get("eval_cpu_s", 0.0) for r in stage_rows.values()), 1),
        # Share of the machine's core-time the hypervisor gave to others during the run: when it is
        # large, the wall times above measure the neighbours, and the CPU times are the ones to trust.
        "steal_ratio": round(steal_s / max(wall_s * cores, 1e-9), 3),
        "estimated_cost_usd": round(train_wall / 3600 * cores * CPU_PRICE_PER_CORE_HOUR, 4),
        "cores": cores,
        "cost_assumption": f"{cores} CPU cores at ${CPU_PRICE_PER_CORE_HOUR}/core-hour, training wall time",
        **run_metadata(asdict(cfg), cfg.seed),
    }


def _pct(c: dict[str, Any]) -> str:
    return f"{100 * c['estimate']:.1f}% [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"


def render_markdown(report: dict[str, Any]) -> str:
    rows = {n: s for n, s in report["stages"].items() if "accuracy" in s}
    tasks = sorted({t for s in rows.values() for t in s["accuracy"]})
    lines = ["# thinkforge speedrun report", "",
             f"Model: {report['model']['architecture']}, {report['model']['params'] / 1e6:.2f}M parameters. "
             f"Tokens seen: {report['tokens_seen']:,}. Seed {report['seed']}, config hash `{report['config_hash']}`.", "",
             "| stage | " + " | ".join(f"{t} held-out acc" for t in tasks) + " | train wall (s) | train CPU (s) | eval wall (s) | tokens |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for name, s in rows.items():
        accs = " | ".join(f"{100 * s['accuracy'][t]:.1f}%" if t in s["accuracy"] else "–" for t in tasks)  # code-only rows
        lines.append(f"| {s.get('label', name)} | {accs} | {s['train_wall_s']} | {s['train_cpu_s']} | {s['eval_wall_s']} | "
                     f"{s['tokens']:,} |")
    data_rows = [(n, s) for n, s in report["stages"].items() if "accuracy" not in s]
    for name, s in data_rows:
        lines += ["", f"Data stage `{name}`: {s.get('train_wall_s')} s wall, {s.get('train_cpu_s')} CPU-s; "
                  + ", ".join(f"{k} {json.dumps(v)}" for k, v in s.items()
                              if k in ("traces", "teacher_pass_rate", "completions", "kept"))]
    if report.get("intervals"):
        lines += ["", "Greedy held-out accuracy with 95% Wilson intervals; with T=1 samples, sampled pass@1 and "
                  "pass@k (unbiased estimator, normal 95% interval over problems).", "",
                  "| stage | task | greedy pass@1 (problems) | sampled pass@1 | sampled pass@k |", "|---|---|---|---|---|"]
        for name, per_task in report["intervals"].items():
            for t in tasks:
                if (c := per_task.get(t)) is None:
                    continue
                smp = report.get("sampled", {}).get(name, {}).get(t)
                s1 = _pct(smp["pass1"]) if smp else "–"
                sk = f"{_pct(smp['passk'])} (k={smp['k']}, {smp['passk']['n']} problems)" if smp else "–"
                lines.append(f"| {rows.get(name, {}).get('label', name)} | {t} | {_pct(c)} ({c['n']}) | {s1} | {sk} |")
        lines += ["", "McNemar's paired test on the same problems (exact binomial below 200 discordant problems):", ""]
        for m in report.get("paired", []):
            lines.append(f"- {m['task']}, {m['a']} -> {m['b']}: {100 * m['difference']:+.1f} points "
                         f"({m['b_only']} problems right only after, {m['a_only']} only before, of {m['n']}), "
                         f"McNemar p = {m['p_value']:.3g} ({m['method']})")
    if report.get("ablation"):
        lines += _ablation_lines(report["ablation"])
    mtp_rows = [(name, s["mtp"]) for name, s in rows.items() if s.get("mtp")]
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
              "![loss curves](loss.png)", "", "![accuracy by stage](accuracy.png)", ""]
    if report.get("has_rl_curves"):
        lines += ["![RL curves: reward, held-out accuracy and response length per step](rl.png)", ""]
    lines += [_machine_line(report), "", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _ablation_lines(ablation: dict[str, Any]) -> list[str]:
    out = ["", f"Reward ablation on `{ablation['task']}` (same SFT start, same RL budget per row): all-tests pass "
           "rate, mean share of tests passed, and pass rate per test level.", "",
           "| RL reward | pass all [95% CI] | tests passed | per-level pass rate | vs first row (McNemar p) |",
           "|---|---|---|---|---|"]
    for row in ablation["rows"]:
        levels = " / ".join(f"L{k} {100 * v:.1f}%" for k, v in (row.get("level_pass_rate") or {}).items()) or "–"
        vs = f"{100 * row['vs_first']['difference']:+.1f} (p = {row['vs_first']['p_value']:.3g})" if row.get("vs_first") else "–"
        tp = f"{100 * row['tests_passed']:.1f}%" if row.get("tests_passed") is not None else "–"
        out.append(f"| {row['label']} | {_pct(row['interval'])} | {tp} | {levels} | {vs} |")
    return out


def ablation_table(eval_dir: Path, stage_names: list[str], labels: dict[str, str], task: str,
                   intervals: dict[str, Any]) -> dict[str, Any] | None:
    from thinkforge.eval.stats import mcnemar

    names = [n for n in stage_names if task in intervals.get(n, {})]
    if len(names) < 2:
        return None
    first = greedy_correct(eval_dir / names[0] / task / "samples.jsonl")
    rows = []
    for n in names:
        row = {"stage": n, "label": labels.get(n, n), "interval": intervals[n][task],
               **(code_test_stats(eval_dir, n, task) or {})}
        if n != names[0]:
            row["vs_first"] = mcnemar(first, greedy_correct(eval_dir / n / task / "samples.jsonl")).to_dict()
        rows.append(row)
    return {"task": task, "rows": rows}


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


def write_plots(out: Path, stages: dict[str, Any]) -> bool:
    """loss.png (LM stages), accuracy.png (held-out accuracy by stage) and, with an RL stage, rl.png: reward,
    held-out accuracy and response length over RL steps. Returns whether rl.png was written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = [n for n in stages if (out / n / "metrics.jsonl").exists() and any("loss" in r and "reward" not in r
                                                                             for r in read_rows(out / n / "metrics.jsonl")[:3])]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in lm:
        rows = [r for r in read_rows(out / name / "metrics.jsonl") if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{name} train", lw=1)
        held = [(r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
        if held:
            ax.plot(*zip(*held, strict=True), "o--", label=f"{name} held-out")
    ax.set_xlabel("step of the stage")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    evaluated = {n: s for n, s in stages.items() if "accuracy" in s}
    tasks = sorted({t for s in evaluated.values() for t in s["accuracy"]})
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(evaluated)), 4))
    width = 0.8 / max(len(tasks), 1)
    for i, task in enumerate(tasks):
        xs = [j + i * width for j in range(len(evaluated))]
        ax.bar(xs, [100 * s["accuracy"].get(task, 0) for s in evaluated.values()], width, label=task)
    ax.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(evaluated))], list(evaluated), fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    rl_stages = [n for n in stages if n == "rl" or n.startswith("rl_")]
    rows_by = {n: [r for r in read_rows(out / n / "metrics.jsonl") if "step" in r] for n in rl_stages}
    if not any(rows_by.values()):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in rows_by.items():
        for ax, prefix in zip(axes, ("reward/", "eval/", "response_length/"), strict=True):
            for key in sorted({k for r in rows for k in r if k.startswith(prefix)}):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                ax.plot(*zip(*pts, strict=True), "o-" if prefix == "eval/" else "-", lw=1, ms=3,
                        label=f"{name} {key[len(prefix):]}")
    for ax, title in zip(axes, ("mean reward of the rollout batch", "held-out greedy accuracy",
                                "mean response length (tokens)"), strict=True):
        ax.set_xlabel("RL step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rl.png", dpi=100)
    plt.close(fig)
    return True
