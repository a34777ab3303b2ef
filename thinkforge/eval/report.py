"""`thinkforge report`: result directories -> a markdown table (+ a PNG bar plot), optionally beside
published reference numbers, each with its source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import atomic_write_text

REFERENCES = Path(__file__).resolve().parent.parent / "data" / "benchmarks" / "references.jsonl"


def find_summaries(dirs: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """(run label, summary) for every summary.json under the given directories (or given directly)."""
    out = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise ThinkforgeError(f"{d}: not found")
        files = [d] if d.is_file() else sorted(d.rglob("summary.json"))
        if not files:
            raise ThinkforgeError(f"{d}: no summary.json found (run `thinkforge eval --output {d}` first)")
        for f in files:
            try:
                summary = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ThinkforgeError(f"{f}: invalid JSON ({err.msg})") from None
            if not isinstance(summary, dict) or "task" not in summary or "accuracy" not in summary:
                raise ThinkforgeError(f"{f}: not an evaluation summary (needs task and accuracy)")
            out.append((run_label(d, f, summary), summary))
    return out


def run_label(root: Path, file: Path, summary: dict[str, Any]) -> str:
    model = (summary.get("config") or {}).get("model")
    if model:
        return Path(str(model).rstrip("/")).name or str(model)
    # DIR/<task>/summary.json: the run is DIR.
    return (file.parent.parent if file.parent.name == summary["task"] else file.parent).name or str(root)


def load_references(path: str | Path = REFERENCES) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            for key in ("model", "benchmark", "value", "metric", "source"):
                if key not in row:
                    raise ThinkforgeError(f"{path}:{i}: missing field {key!r}")
            rows.append(row)
    return rows


def build_table(summaries: list[tuple[str, dict[str, Any]]], references: list[dict[str, Any]] | None = None
                ) -> tuple[list[str], list[tuple[str, dict[str, float], bool]]]:
    """Columns (tasks) and rows (label, {task: percent}, is_reference). References keep pass@1 only."""
    tasks = sorted({s["task"] for _, s in summaries})
    rows: dict[str, dict[str, float]] = {}
    for label, s in summaries:
        rows.setdefault(label, {})[s["task"]] = round(100 * float(s["accuracy"]), 1)
    table = [(label, vals, False) for label, vals in rows.items()]
    if references:
        refs: dict[str, dict[str, float]] = {}
        for r in references:
            if r["benchmark"] in tasks and r["metric"] in ("pass@1", "accuracy"):
                refs.setdefault(r["model"], {})[r["benchmark"]] = float(r["value"])
        table += [(f"{m} (published)", vals, True) for m, vals in sorted(refs.items())]
    return tasks, table


def render_markdown(summaries: list[tuple[str, dict[str, Any]]], references: list[dict[str, Any]] | None = None,
                    plot_name: str | None = None) -> str:
    tasks, table = build_table(summaries, references)
    lines = ["# Evaluation report", "", "Accuracy is avg@n pass@1 in percent, strict grading (the prompt's format, "
             "`\\boxed{}`, or the benchmark's own answer marker such as GSM8K's `#### N`). The runs table adds "
             "flexible grading (also \"The answer is N\", \"Answer: N\" and, for numeric benchmarks, the last "
             "number) and the share of responses with no answer under each.", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, vals, _ in table:
        cells = [f"{vals[t]:.1f}" if t in vals else "–" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| run | task | strict | flexible | no answer (strict / flexible) | pass@k | maj@k | "
              "samples | problems | truncated | config hash |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for label, s in summaries:
        pk = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in (s.get("pass_at_k") or {}).items())
        mk = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in (s.get("maj_at_k") or {}).items()) or "–"
        lines.append(f"| {label} | {s['task']} | {100 * s['accuracy']:.1f} | {_percent(s.get('accuracy_flexible'))} | "
                     f"{_percent(s.get('no_answer_rate'))} / {_percent(s.get('no_answer_rate_flexible'))} | {pk} | "
                     f"{mk} | {s.get('n_samples')} | {s.get('n_problems')} | {_truncated(s)} | "
                     f"`{s.get('config_hash', '')}` |")
    breakdowns = [(label, s) for label, s in summaries if s.get("breakdown")]
    for label, s in breakdowns:
        for key, groups in s["breakdown"].items():
            lines += ["", f"### {label} / {s['task']} by {key}", "", f"| {key} | problems | accuracy |", "|---|---:|---:|"]
            lines += [f"| {g} | {v['n_problems']} | {100 * v['accuracy']:.1f} |" for g, v in groups.items()]
    if references:
        used = [r for r in references if r["benchmark"] in tasks]
        if used:
            lines += ["", "## Published reference numbers", "", "| model | benchmark | value | metric | source |",
                      "|---|---|---:|---|---|"]
            lines += [f"| {r['model']} | {r['benchmark']} | {r['value']} | {r['metric']} | [{r.get('note') or 'source'}]"
                      f"({r['source']}) |" for r in used]
    if plot_name:
        lines += ["", f"![accuracy]({plot_name})"]
    return "\n".join(lines) + "\n"


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"  # older summaries lack the flexible keys


def _truncated(summary: dict[str, Any]) -> str:
    rate = summary.get("truncation_rate")
    if rate is None:
        return "–"
    n = summary.get("n_truncated")
    return f"{100 * rate:.1f}%" + (f" ({n})" if n is not None else "")


def render_plot(summaries: list[tuple[str, dict[str, Any]]], path: str | Path,
                references: list[dict[str, Any]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, table = build_table(summaries, references)
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4))
    x = np.arange(len(tasks))
    for i, (label, vals, is_ref) in enumerate(table):
        heights = [vals.get(t, 0.0) for t in tasks]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=label, hatch="//" if is_ref else None,
               alpha=0.6 if is_ref else 1.0)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(dirs: list[str | Path], out: str | Path | None = None, plot: str | Path | None = None,
                 with_references: bool = False) -> str:
    summaries = find_summaries(dirs)
    refs = load_references() if with_references else None
    if plot is not None:
        render_plot(summaries, plot, refs)
    base = Path(out).parent if out else Path.cwd()
    plot_name = None
    if plot is not None:
        try:
            plot_name = str(Path(plot).resolve().relative_to(base.resolve()))
        except ValueError:
            plot_name = str(plot)
    text = render_markdown(summaries, refs, plot_name)
    if out is not None:
        atomic_write_text(out, text)
    return text
