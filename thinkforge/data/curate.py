"""Curation: teacher traces -> a verified, deduplicated, decontaminated SFT set (Sky-T1 / MiMo recipe).

Order of the filters (each row leaves at the first one that rejects it, under that reason):
  1. truncated  - the teacher hit max_tokens (finish_reason "length"); counted as a failed sample
  2. wrong      - rejection sampling: the task's own scorer (`thinkforge.verify`) says incorrect
                  (reasons: wrong_answer, no_answer, failed_tests, timeout, ...)
  3. contaminated - shares a word n-gram (MiMo: 16) with a benchmark problem (`Decontaminator`)
  4. exact_duplicate, near_duplicate - same (normalised) prompt + response, or MinHash Jaccard >= threshold
  5. over_cap   - more than `max_per_problem` kept responses for one problem (MiMo: <= 8)
Reformatting (deterministic split or LLM rewrite) runs last, on the survivors only, because the LLM
step costs money; every rewrite is re-verified and replaces the original only when its solution
section still scores correct. Difficulty labels come from the teacher's pass rate over all samples of
a problem (truncated ones included).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem, Task
from thinkforge.utils import asdict, atomic_write_json, atomic_write_text, run_metadata

FORMATS = ("messages", "sharegpt")
REFORMATS = ("none", "split", "llm")


@dataclass
class CurateConfig:
    traces: str = ""
    out: str = "sft.jsonl"
    format: str = "messages"
    max_per_problem: int = 8
    decontam: list[str] = field(default_factory=list)  # benchmark names
    ngram: int = 16
    reformat: str = "none"
    reformat_model: str | None = None  # URL (openai backend) or checkpoint for --reformat llm
    reformat_backend: str = "auto"
    reformat_max_tokens: int = 4096
    near_dup_threshold: float = 0.9  # 1.0 still removes identical shingle sets; use exact only with 0
    num_perm: int = 128
    keep_truncated: bool = False
    workers: int = 0  # scoring threads (0 = CPU count)
    system_prompt: str | None = None  # replaces the traces' system prompt when set
    seed: int = 0


@dataclass
class Item:
    line: int
    row: dict[str, Any]
    problem: Problem
    task: Task
    response: str
    prompt: list[dict[str, str]]
    correct: bool = False
    reason: str = ""
    drop: str | None = None
    reformat: str = "none"


def difficulty_label(pass_rate: float) -> str:
    """Teacher pass rate -> label (Sky-T1 kept hard problems; MiMo re-samples easy ones less)."""
    if pass_rate >= 0.8:
        return "easy"
    if pass_rate >= 0.4:
        return "medium"
    return "hard" if pass_rate > 0 else "unsolved"


def load_items(path: str) -> list[Item]:
    from thinkforge.data.conversations import numbered_rows
    from thinkforge.eval.harness import resolve_task

    rows = numbered_rows(path)  # a torn line here is a real error: distill writes whole rows
    items: list[Item] = []
    tasks: dict[str, Task] = {}
    for i, row in rows:
        where = f"{path}:{i}"
        prob = row.get("problem")
        if not isinstance(prob, dict):
            raise ThinkforgeError(f"{where}: missing field 'problem' (an object with id, task, prompt)")
        for key in ("id", "task", "prompt"):
            if not isinstance(prob.get(key), str):
                raise ThinkforgeError(f"{where}: field 'problem.{key}' missing or not a string")
        if not isinstance(row.get("response"), str):
            raise ThinkforgeError(f"{where}: field 'response' missing or not a string")
        try:
            problem = Problem(**{k: v for k, v in prob.items() if k in Problem.__dataclass_fields__})
        except TypeError as err:
            raise ThinkforgeError(f"{where}: field 'problem' is malformed ({err})") from None
        if problem.task not in tasks:
            try:
                tasks[problem.task] = resolve_task(problem.task)
            except ThinkforgeError as err:
                raise ThinkforgeError(f"{where}: field 'problem.task': {err}") from None
        task = tasks[problem.task]
        prompt = row.get("messages")
        if not (isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                   for m in prompt)):
            prompt = task.messages(problem)
        items.append(Item(i, row, problem, task, row["response"], prompt))
    if not items:
        raise ThinkforgeError(f"{path}: no rows")
    return items


def score_items(items: list[Item], workers: int) -> None:
    from thinkforge.eval.harness import score_one

    def one(item: Item) -> tuple[bool, str]:
        s = score_one(item.task, item.problem, item.response)
        return s.correct, s.reason

    todo = [it for it in items if it.drop is None]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for item, (ok, reason) in zip(todo, pool.map(one, todo), strict=True):
            item.correct, item.reason = ok, reason
            if not ok:
                item.drop = f"wrong:{reason}"


def verified(item: Item, text: str) -> bool:
    from thinkforge.data.reformat import parse_structured
    from thinkforge.eval.harness import score_one

    parts = parse_structured(text)
    return parts is not None and score_one(item.task, item.problem, parts[1]).correct


def reformat_items(cfg: CurateConfig, items: list[Item], stats: Counter) -> None:
    from thinkforge.data.reformat import llm_reformat, split_reformat

    if cfg.reformat == "none":
        return
    llm_out: list[str | None] = [None] * len(items)
    if cfg.reformat == "llm":
        from thinkforge.engine.base import get_backend

        if not cfg.reformat_model:
            raise ThinkforgeError("curate: --reformat llm needs --reformat-model (a URL or checkpoint)")
        name = cfg.reformat_backend
        if name == "auto":
            name = "openai" if cfg.reformat_model.startswith(("http://", "https://")) else "native"
        backend = get_backend(name, cfg.reformat_model)
        try:
            llm_out = llm_reformat(backend, [(it.problem.prompt, it.response) for it in items],
                                   max_tokens=cfg.reformat_max_tokens, seed=cfg.seed)
        finally:
            backend.close()
    for item, rewritten in zip(items, llm_out, strict=True):
        if rewritten is not None:
            if verified(item, rewritten):
                item.response, item.reformat = rewritten, "llm"
                stats["llm_accepted"] += 1
                continue
            stats["llm_rejected_by_verifier"] += 1
        elif cfg.reformat == "llm":
            stats["llm_unparseable"] += 1
        split = split_reformat(item.response, item.task.kind)
        if split is not None and verified(item, split):
            item.response, item.reformat = split, "split"
            stats["split"] += 1
        else:
            stats["kept_original"] += 1


def to_output(item: Item, fmt: str, pass_rate: float, n_samples: int, system_prompt: str | None) -> dict[str, Any]:
    msgs = [dict(m) for m in item.prompt]
    if system_prompt is not None:
        msgs = [{"role": "system", "content": system_prompt}] + [m for m in msgs if m["role"] != "system"]
    msgs.append({"role": "assistant", "content": item.response})
    meta = {"id": item.row.get("id", f"{item.problem.id}#{item.row.get('sample', 0)}"), "problem_id": item.problem.id,
            "task": item.problem.task, "sample": item.row.get("sample"), "pass_rate": round(pass_rate, 4),
            "n_samples": n_samples, "difficulty": difficulty_label(pass_rate), "reformat": item.reformat,
            "teacher": item.row.get("teacher")}
    if fmt == "messages":
        return {"messages": msgs, **meta}
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": role.get(m["role"], m["role"]), "value": m["content"]} for m in msgs], **meta}


def curate(cfg: CurateConfig) -> dict[str, Any]:
    """Runs the pipeline; writes `cfg.out` and `<out>.stats.json`; returns the stats."""
    from thinkforge.data.decontam import Decontaminator
    from thinkforge.data.dedupe import exact_dedupe, near_dedupe

    if cfg.format not in FORMATS:
        raise ThinkforgeError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.reformat not in REFORMATS:
        raise ThinkforgeError(f"--reformat must be one of {', '.join(REFORMATS)}, got {cfg.reformat!r}")
    if cfg.max_per_problem < 1:
        raise ThinkforgeError(f"--max-per-problem must be >= 1, got {cfg.max_per_problem}")
    t0 = time.time()
    items = load_items(cfg.traces)
    items.sort(key=lambda it: (it.problem.id, it.row.get("sample", 0), it.line))
    for it in items:
        if not cfg.keep_truncated and it.row.get("finish_reason") == "length":
            it.drop = "truncated"
    score_items(items, cfg.workers)

    per_problem: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        per_problem[it.problem.id].append(it)
    pass_rate = {pid: sum(i.correct for i in group) / len(group) for pid, group in per_problem.items()}

    decontam_examples: list[dict[str, Any]] = []
    if cfg.decontam:
        dec = Decontaminator.from_benchmarks(cfg.decontam, n=cfg.ngram)
        for it in items:
            if it.drop is None:
                hits = dec.check(it.problem.prompt + "\n" + it.response)
                if hits:
                    it.drop = "contaminated"
                    if len(decontam_examples) < 20:
                        decontam_examples.append({"id": it.row.get("id"), "benchmark_id": hits[0].benchmark_id,
                                                  "ngram": hits[0].ngram})

    live = [it for it in items if it.drop is None]
    texts = [it.problem.prompt + "\n" + it.response for it in live]
    for it, dup in zip(live, exact_dedupe(texts), strict=True):
        if dup is not None:
            it.drop = "exact_duplicate"
    if cfg.near_dup_threshold > 0:
        live = [it for it in live if it.drop is None]
        res = near_dedupe([it.problem.prompt + "\n" + it.response for it in live], cfg.near_dup_threshold,
                          cfg.num_perm, seed=cfg.seed + 1)
        for it, keep in zip(live, res.keep, strict=True):
            if not keep:
                it.drop = "near_duplicate"
    counts: Counter[str] = Counter()
    for it in items:
        if it.drop is None:
            counts[it.problem.id] += 1
            if counts[it.problem.id] > cfg.max_per_problem:
                it.drop = "over_cap"

    kept = [it for it in items if it.drop is None]
    reformat_stats: Counter[str] = Counter()
    reformat_items(cfg, kept, reformat_stats)

    stats = build_stats(cfg, items, pass_rate, per_problem, reformat_stats, decontam_examples, time.time() - t0)
    atomic_write_json(stats_path(Path(cfg.out)), stats)
    if not kept:
        raise ThinkforgeError(f"curate: no rows left after filtering {len(items)} ({_reasons(stats['dropped'])}); "
                              f"stats in {stats_path(Path(cfg.out))}")
    import json

    lines = [json.dumps(to_output(it, cfg.format, pass_rate[it.problem.id], len(per_problem[it.problem.id]),
                                  cfg.system_prompt)) for it in kept]
    atomic_write_text(cfg.out, "\n".join(lines) + "\n")
    return stats


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "none"


def stats_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".stats.json")


def build_stats(cfg: CurateConfig, items: list[Item], pass_rate: dict[str, float],
                per_problem: dict[str, list[Item]], reformat_stats: Counter, decontam_examples: list,
                wall_s: float) -> dict[str, Any]:
    per_task: dict[str, dict[str, Any]] = {}
    for it in items:
        row = per_task.setdefault(it.problem.task, {"rows": 0, "kept": 0, "problems": 0, "problems_kept": 0,
                                                     "dropped": Counter()})
        row["rows"] += 1
        if it.drop is None:
            row["kept"] += 1
        else:
            row["dropped"][it.drop] += 1
    for group in per_problem.values():
        row = per_task[group[0].problem.task]
        row["problems"] += 1
        row["problems_kept"] += any(it.drop is None for it in group)
    for row in per_task.values():
        row["dropped"] = dict(row["dropped"])
    difficulty = Counter(difficulty_label(r) for r in pass_rate.values())
    return {
        "traces": cfg.traces, "out": cfg.out, "input_rows": len(items),
        "kept": sum(it.drop is None for it in items),
        "dropped": dict(Counter(it.drop for it in items if it.drop is not None)),
        "per_task": per_task,
        "problems": len(per_problem),
        "problem_difficulty": dict(difficulty),
        "mean_pass_rate": round(sum(pass_rate.values()) / max(len(pass_rate), 1), 4),
        "reformat": dict(reformat_stats),
        "decontam_examples": decontam_examples,
        "wall_s": round(wall_s, 3),
        **run_metadata(asdict(cfg), cfg.seed),
    }


def print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    reasons = sorted({r for t in stats["per_task"].values() for r in t["dropped"]})
    table = Table(title=f"curate: kept {stats['kept']} of {stats['input_rows']} rows")
    for col in ["task", "rows", "kept", "problems kept", *reasons]:
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in sorted(stats["per_task"].items()):
        table.add_row(name, str(t["rows"]), str(t["kept"]), f"{t['problems_kept']}/{t['problems']}",
                      *[str(t["dropped"].get(r, 0)) for r in reasons])
    console = Console()
    console.print(table)
    console.print(f"difficulty (teacher pass rate): {stats['problem_difficulty']}; reformat: {stats['reformat'] or '-'}")
