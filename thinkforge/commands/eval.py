"""`thinkforge eval`, `thinkforge report`, `thinkforge decontam`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from thinkforge.errors import ThinkforgeError


def _task_names(task: str) -> list[str]:
    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names:
        raise ThinkforgeError("--task needs at least one task name")
    return names


def _speculative_kwargs(backend: str, speculative: str | None, num_draft: int) -> dict[str, Any]:
    """Backend kwargs for `--speculative/--num-draft` (the native engine's MTP self-speculative decoding)."""
    if speculative in (None, "", "none"):
        if num_draft != 1:
            raise ThinkforgeError("--num-draft needs --speculative mtp")
        return {}
    if speculative != "mtp":
        raise ThinkforgeError(f"unknown --speculative {speculative!r}; known: mtp")
    if backend != "native":
        raise ThinkforgeError(f"--speculative mtp needs --backend native, got --backend {backend}")
    if num_draft < 1:
        raise ThinkforgeError(f"--num-draft must be >= 1, got {num_draft}")
    return {"speculative": speculative, "num_draft": num_draft}


def _speculative_line(backend: Any) -> str | None:
    """One line of MTP draft statistics when the native engine decoded speculatively."""
    spec = getattr(getattr(backend, "engine", None), "speculator", None)
    if spec is None:
        return None
    m = spec.metrics()
    acc = ", ".join(f"{100 * a:.1f}%" for a in m["acceptance"])
    return (f"speculative mtp (num_draft {m['num_draft']}): acceptance per draft position {acc}; "
            f"mean accepted length {m['mean_accepted_length']:.2f}")


def eval_cmd(
    task: Annotated[str, typer.Option(help="Task(s), comma-separated: math500,aime24,aime25,amc23,gsm8k,humaneval,"
                                           "gpqa_diamond,livecodebench,mmlu_pro, VL: mmmu,mathvista,charxiv,refcoco,"
                                           "countbench, or a synthetic task (arith, code, vl_*).")],
    output: Annotated[Path, typer.Option(help="Result directory; results go to OUTPUT/<task>/ (reruns resume).")],
    model: Annotated[str | None, typer.Option(help="Model dir / hub id, or base URL (URL#model) for --backend openai.")] = None,
    backend: Annotated[str, typer.Option(help="auto (openai for an http(s) URL, hf-vl for a VL "
                                              "checkpoint, else native) | native | hf | hf-vl | openai | vllm")] = "auto",
    responses: Annotated[Path | None, typer.Option(help="Re-score existing responses: jsonl rows "
                                                        "{problem_id, response} instead of generating.")] = None,
    n: Annotated[int, typer.Option(help="Samples per problem.")] = 1,
    temperature: Annotated[float, typer.Option()] = 0.6,
    top_p: Annotated[float, typer.Option()] = 0.95,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Generation budget per sample.")] = 2048,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt (default: the task's own).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded subset of K problems per task.")] = None,
    split: Annotated[str | None, typer.Option(help="Task split (default: test for benchmarks, heldout otherwise).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per backend call.")] = 64,
    device: Annotated[str | None, typer.Option(help="native/hf/vllm: auto, cpu, cuda, cuda:1...")] = None,
    dtype: Annotated[str | None, typer.Option(help="native/hf/vllm: auto, float32, bfloat16...")] = None,
    all_problems: Annotated[bool, typer.Option(help="With --responses: unanswered problems count as wrong.")] = False,
    speculative: Annotated[str | None, typer.Option(help="native: mtp = self-speculative decoding with the "
                                                    "checkpoint's MTP layers (greedy output unchanged).")] = None,
    num_draft: Annotated[int, typer.Option(help="Draft tokens per step with --speculative mtp.")] = 1,
) -> None:
    """Evaluate a model on benchmarks (resumable), or re-score an existing responses file.

    Hub benchmarks (gpqa_diamond, livecodebench, mmlu_pro) read local copies from
    THINKFORGE_<TASK>_DATA_FILES when set; LiveCodeBench's window comes from THINKFORGE_LIVECODEBENCH_RELEASE,
    _START and _END.
    """
    from thinkforge.eval.harness import evaluate, resolve_task, score_responses

    names = _task_names(task)
    tasks = [resolve_task(name) for name in names]  # unknown names fail before any work
    summaries: list[dict[str, Any]] = []
    if responses is not None:
        if model is not None:
            raise ThinkforgeError("give either --model (generate) or --responses (re-score), not both")
        if len(tasks) != 1:
            raise ThinkforgeError("--responses re-scores one task at a time")
        summaries.append(score_responses(tasks[0], responses, output_dir=output, all_problems=all_problems, seed=seed))
    else:
        if model is None:
            raise ThinkforgeError("--model is required to generate (or pass --responses to re-score)")
        from thinkforge.engine.base import SamplingParams, get_backend

        if backend == "auto":  # as distill's --teacher: a URL is an OpenAI-compatible endpoint
            from thinkforge.vl.model import is_vl_checkpoint

            backend = ("openai" if model.startswith(("http://", "https://"))
                       else "hf-vl" if is_vl_checkpoint(model) else "native")  # a Qwen2.5-VL checkpoint sees images

        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, n=n,
                                seed=seed).validate()
        kwargs = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        if kwargs and backend == "openai":
            raise ThinkforgeError("--device/--dtype do not apply to --backend openai")
        kwargs.update(_speculative_kwargs(backend, speculative, num_draft))
        engine = get_backend(backend, model, **kwargs)
        config = {"model": model, "backend": backend, **kwargs}
        line = None
        try:
            for t in tasks:
                from thinkforge.commands.train import progress_bar

                with progress_bar() as bar:
                    job = bar.add_task(t.name, total=None)
                    summaries.append(evaluate(
                        t, engine, params, split=split, n_problems=limit, output_dir=output, system_prompt=system_prompt,
                        seed=seed, config=config, batch_size=batch_size,
                        progress=lambda done, total, job=job, bar=bar: bar.update(job, completed=done, total=total)))
            line = _speculative_line(engine)
        finally:
            engine.close()
        if line:
            typer.echo(line)
    for s in summaries:
        typer.echo(summary_line(s, output))
        hint = no_answer_hint(s)
        if hint:
            typer.echo(hint)


def summary_line(s: dict[str, Any], output: Path) -> str:
    pk = " ".join(f"pass@{k}={100 * v:.1f}" for k, v in s["pass_at_k"].items())
    trunc = s.get("truncation_rate")
    return (f"{s['task']}: accuracy {100 * s['accuracy']:.1f}% (strict; flexible {100 * s['accuracy_flexible']:.1f}%, "
            f"no answer {100 * s['no_answer_rate']:.1f}% / {100 * s['no_answer_rate_flexible']:.1f}%"
            + ("" if trunc is None else f", truncated {100 * trunc:.1f}%")
            + f") ({s['n_problems']} problems x {s['n_samples']} samples) {pk} -> {output / s['task']}")


def no_answer_hint(s: dict[str, Any]) -> str | None:
    """Why a model that does not write the prompt's format scores near 0: said once, with what to look at."""
    strict_none, flexible_none = s["no_answer_rate"], s["no_answer_rate_flexible"]
    if strict_none < 0.5 or strict_none - flexible_none < 0.25:
        return None
    formats = ", ".join((s.get("grading") or {}).get("strict") or []) or "the task's format"
    return (f"note: {100 * strict_none:.0f}% of {s['task']} responses have no answer in the strict format ({formats}); "
            f"flexible extraction finds one in {100 * (1 - flexible_none):.0f}% (accuracy_flexible in summary.json)")


def report_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Result directories (or summary.json files).")],
    out: Annotated[Path | None, typer.Option(help="Write the markdown here (default: print it).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG bar plot here.")] = None,
    references: Annotated[bool, typer.Option(help="Add published numbers (MiMo-7B-RL, Sky-T1, o1-mini, "
                                                  "QwQ-32B-Preview, R1-Distill-Qwen-7B) with sources.")] = False,
) -> None:
    """Render evaluation results as a markdown table (+ PNG plot), optionally beside published numbers."""
    from thinkforge.eval.report import write_report

    text = write_report(dirs, out, plot, references)
    if out is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"report -> {out}" + (f", plot -> {plot}" if plot else ""))


def decontam_cmd(
    train: Annotated[Path, typer.Option(help="Training jsonl to check.")],
    out: Annotated[Path, typer.Option(help="Where to write the rows that do not overlap any benchmark.")],
    benchmarks: Annotated[str, typer.Option(help="Comma-separated benchmark tasks.")] = "math500,aime24,aime25,amc23,gsm8k",
    n: Annotated[int, typer.Option(help="Word n-gram size (MiMo: 16).")] = 16,
    field: Annotated[list[str] | None, typer.Option(help="Row field(s) holding text (repeatable; default: all "
                                                         "strings in the row).")] = None,
    report: Annotated[Path | None, typer.Option(help="JSON report of flagged rows (default: OUT.decontam.json).")] = None,
    min_words: Annotated[int, typer.Option(help="Benchmark problems shorter than n words are matched whole if "
                                                "they have at least this many words.")] = 8,
) -> None:
    """Remove training rows that share a word n-gram with benchmark problems."""
    import json

    from thinkforge.data.decontam import Decontaminator
    from thinkforge.utils import atomic_write_json, atomic_write_text, read_jsonl

    rows = read_jsonl(train)
    dec = Decontaminator.from_benchmarks(_task_names(benchmarks), n=n, min_words=min_words)
    kept, flagged = dec.filter(rows, field, where=str(train))
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    report = report or out.with_name(out.name + ".decontam.json")
    atomic_write_json(report, {"train": str(train), "benchmarks": _task_names(benchmarks), "n": n,
                               "rows": len(rows), "kept": len(kept), "removed": len(flagged),
                               "benchmark_items": dec.n_items, "benchmark_items_too_short": len(dec.skipped),
                               "flagged": flagged})
    typer.echo(f"{len(flagged)} of {len(rows)} rows overlap {benchmarks} ({n}-grams); kept {len(kept)} -> {out}; "
               f"report -> {report}")


COMMANDS = {"eval": eval_cmd, "report": report_cmd, "decontam": decontam_cmd}
