"""`thinkforge distill` and `thinkforge curate`: the Sky-T1 data recipe."""

from __future__ import annotations

from typing import Annotated

import typer


def distill_cmd(
    teacher: Annotated[str, typer.Option(help="Teacher: http(s)://host:port/v1[#model] or a checkpoint dir / hub id.")],
    out: Annotated[str, typer.Option(help="Append-only traces jsonl (re-running resumes it).")] = "traces.jsonl",
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (arith, code, math500, ...).")] = "arith,code",
    n: Annotated[int, typer.Option("--n", help="Samples per problem.")] = 4,
    backend: Annotated[str, typer.Option(help="auto (openai for URLs, else native) | openai | native | hf | vllm")] = "auto",
    concurrency: Annotated[int, typer.Option(help="Requests in flight (openai) / prompts per batch / 4 (local).")] = 16,
    max_retries: Annotated[int, typer.Option(help="Retries per request on 429/5xx/timeouts/dropped connections.")] = 6,
    timeout: Annotated[float, typer.Option(help="Seconds per request before it counts as timed out.")] = 600.0,
    price_in: Annotated[float, typer.Option(help="USD per 1M prompt tokens (for the cost estimate).")] = 0.0,
    price_out: Annotated[float, typer.Option(help="USD per 1M completion tokens.")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Problems per task (default: 100; benchmarks: all).")] = None,
    split: Annotated[str, typer.Option(help="Task split (benchmarks fall back to their only split).")] = "train",
    temperature: Annotated[float, typer.Option()] = 0.7,
    top_p: Annotated[float, typer.Option()] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Completion token cap per request.")] = 4096,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt (default: the task's own).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="Local teachers: auto, cpu, cuda...")] = "auto",
    dtype: Annotated[str, typer.Option(help="Local teachers: auto, float32, bfloat16...")] = "auto",
    allow_settings_change: Annotated[bool, typer.Option(
        help="Resume into an --out drawn with another teacher, temperature, top-p, max-tokens or system prompt "
             "(mixes them; refused otherwise).")] = False,
) -> None:
    """Sample every problem N times from a teacher (bounded concurrency, retries, resumable output)."""
    from thinkforge.commands.train import progress_bar
    from thinkforge.data.distill import DistillConfig, distill, summary_path
    from thinkforge.utils import build_config

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is None and all(t in ("arith", "code") for t in task_list):
        limit = 100
    cfg = build_config(DistillConfig, dict(
        teacher=teacher, out=out, tasks=task_list, n=n, backend=backend, concurrency=concurrency,
        max_retries=max_retries, timeout=timeout, price_in=price_in, price_out=price_out, limit=limit, split=split,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, system_prompt=system_prompt, seed=seed,
        device=device, dtype=dtype, allow_settings_change=allow_settings_change), "distill")
    with progress_bar() as bar:
        summary = distill(cfg, bar)
    t, run = summary["totals"], summary["this_run"]
    typer.echo(f"{run['written']} new rows ({run['already_done']} already done, {run['failed']} failed, "
               f"{run['retries']} retries) in {run['wall_s']:.1f} s")
    typer.echo(f"total: {t['rows']} rows, {t['prompt_tokens']:,} prompt + {t['completion_tokens']:,} completion "
               f"tokens, ${t['cost_usd']:.4f} -> {out} (summary {summary_path(__import__('pathlib').Path(out))})")
    if run["failed"]:
        typer.echo(f"warning: {run['failed']} requests failed after retries; re-run the same command to retry them",
                   err=True)
        raise typer.Exit(1)


def curate_cmd(
    traces: Annotated[str, typer.Argument(help="Traces jsonl written by `thinkforge distill`.")],
    out: Annotated[str, typer.Option(help="SFT jsonl to write (stats go to OUT minus .jsonl + .stats.json).")] = "sft.jsonl",
    format: Annotated[str, typer.Option("--format", help="messages (OpenAI) | sharegpt")] = "messages",
    max_per_problem: Annotated[int, typer.Option(help="Cap on kept responses per problem (MiMo: 8).")] = 8,
    decontam: Annotated[str, typer.Option(help="Comma-separated benchmarks to decontaminate against.")] = "",
    ngram: Annotated[int, typer.Option(help="Word n-gram size for decontamination (MiMo: 16).")] = 16,
    reformat: Annotated[str, typer.Option(help="none | split (deterministic) | llm (rewrite, re-verified)")] = "none",
    reformat_model: Annotated[str | None, typer.Option(help="--reformat llm: URL (OpenAI-compatible) or checkpoint.")] = None,
    reformat_backend: Annotated[str, typer.Option(help="auto | openai | native | hf | vllm")] = "auto",
    near_dup_threshold: Annotated[float, typer.Option(help="MinHash Jaccard threshold (0 disables).")] = 0.9,
    keep_truncated: Annotated[bool, typer.Option(help="Keep responses that hit max_tokens.")] = False,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt for the output conversations.")] = None,
    workers: Annotated[int, typer.Option(help="Scoring threads (0 = CPU count).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Verify, decontaminate, dedupe, cap and reformat teacher traces into an SFT set, with a stats report."""
    from thinkforge.data.curate import CurateConfig, curate, print_stats, stats_path
    from thinkforge.utils import build_config

    cfg = build_config(CurateConfig, dict(
        traces=traces, out=out, format=format, max_per_problem=max_per_problem,
        decontam=[d.strip() for d in decontam.split(",") if d.strip()], ngram=ngram, reformat=reformat,
        reformat_model=reformat_model, reformat_backend=reformat_backend, near_dup_threshold=near_dup_threshold,
        keep_truncated=keep_truncated, system_prompt=system_prompt, workers=workers, seed=seed), "curate")
    stats = curate(cfg)
    print_stats(stats)
    typer.echo(f"wrote {stats['kept']} rows -> {out} (stats {stats_path(__import__('pathlib').Path(out))})")


COMMANDS = {"distill": distill_cmd, "curate": curate_cmd}
