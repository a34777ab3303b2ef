"""The evaluation harness: generate through any `Backend`, score with the task, summarise.

Layout of a result directory (one per task):
    DIR/<task>/samples.jsonl   every response with its extracted answer, correctness and reason
    DIR/<task>/summary.json    metrics + config, config hash, seed, package versions (no timestamps,
                               so the same responses always give a byte-identical summary)
    DIR/<task>/run.json        the generation settings the samples were made with (resume guard)
    DIR/<task>/timing.json     wall-clock figures, kept apart from the summary on purpose

Generation is resumable: samples.jsonl is append-only and a rerun only generates the
(problem_id, sample_index) pairs it lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from thinkforge.engine.base import Backend, Completion, SamplingParams
from thinkforge.errors import ThinkforgeError
from thinkforge.eval.metrics import summarize
from thinkforge.tasks.base import Problem, Score, Task
from thinkforge.utils import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    ensure_writable_dir,
    run_metadata,
)

SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"


def resolve_task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    import thinkforge.tasks.benchmarks  # noqa: F401  (registers the benchmarks)
    from thinkforge.tasks.base import get_task

    return get_task(task)


def default_split(task: Task) -> str:
    split = getattr(task, "default_split", None)
    if split:
        return split
    return "test" if "test" in task.splits else "heldout" if "heldout" in task.splits else task.splits[-1]


def score_one(task: Task, problem: Problem, response: str) -> Score:
    """Scores a response; an empty one is `no_answer` without asking the task."""
    if not response or not response.strip():
        return Score(False, 0.0, "no_answer")
    return task.score(problem, response)


def answer_format(task: Task) -> Any:
    """The task's declared `AnswerFormat` when it grades strict and flexible apart (math benchmarks), else None."""
    return getattr(task, "answer_format", None) if callable(getattr(task, "grade", None)) else None


def grade_response(task: Task, problem: Problem, response: str, truncated: bool = False) -> tuple[Score, Score | None]:
    """(strict, flexible) scores. Strict is the headline: the prompt's format (`\\boxed{}`) and the benchmark's
    own answer marker. Flexible is None for a task with a single rule (code, multiple choice, synthetic)."""
    fmt = answer_format(task)
    if not response or not response.strip():
        empty = Score(False, 0.0, "no_answer")
        return empty, (empty if fmt is not None else None)
    if fmt is None:
        return task.score(problem, response), None
    strict = task.grade(problem, response, truncated=truncated)  # type: ignore[attr-defined]
    if strict.extracted is not None:  # flexible extraction tries the strict rules first: same answer
        return strict, strict
    return strict, task.grade(problem, response, flexible=True, truncated=truncated)  # type: ignore[attr-defined]


def is_truncated(extra: dict[str, Any]) -> bool | None:
    """Whether the length limit cut the response off: an explicit `truncated` field, else finish_reason
    "length"; None when neither is known (an API or file that does not say)."""
    if extra.get("truncated") is not None:
        return bool(extra["truncated"])
    return extra["finish_reason"] == "length" if extra.get("finish_reason") else None


def sample_row(problem: Problem, index: int, response: str, score: Score, extra: dict[str, Any],
               flexible: Score | None = None) -> dict[str, Any]:
    details = {k: v for k, v in score.details.items() if k != "extracted_by"} if _jsonable(score.details) else {}
    row = {"problem_id": problem.id, "sample_index": index, "response": response,
           "extracted": score.extracted, "correct": bool(score.correct), "reward": float(score.reward),
           "reason": score.reason}
    if flexible is not None:
        row.update({"extracted_flexible": flexible.extracted, "correct_flexible": bool(flexible.correct),
                    "reason_flexible": flexible.reason, "extracted_by": flexible.details.get("extracted_by")})
    return {**row, **extra, **({"details": details} if details else {})}


def _jsonable(obj: Any) -> bool:
    try:
        json.dumps(obj)
        return True
    except (TypeError, ValueError):
        return False


def score_many(task: Task, items: list[tuple[Problem, int, str, dict[str, Any]]],
               workers: int = 1) -> list[dict[str, Any]]:
    """Scores (problem, sample_index, response, extra) items, in parallel threads when workers > 1
    (the verifier runs code and math checks in subprocesses, so threads overlap their waiting)."""
    def one(item: tuple[Problem, int, str, dict[str, Any]]) -> dict[str, Any]:
        problem, index, response, extra = item
        truncated = is_truncated(extra)
        extra = {**extra, **({"truncated": truncated} if truncated is not None else {})}
        strict, flexible = grade_response(task, problem, response, bool(truncated))
        return sample_row(problem, index, response, strict, extra, flexible)

    if workers <= 1 or len(items) <= 1:
        return [one(it) for it in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


def default_workers(task: Task) -> int:
    # Both verifiers are thread-safe (math: a pool of grader processes; code: one sandbox per program).
    return min(4, os.cpu_count() or 1)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of an append-only samples file. A torn last line (the process was killed mid-write) is
    cut off so the next append starts on a fresh line; a bad row elsewhere is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ThinkforgeError(f"{path}:{i}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "problem_id" not in row or "sample_index" not in row:
            raise ThinkforgeError(f"{path}:{i}: not a sample row (needs problem_id and sample_index)")
        rows.append(row)
    return rows


def _batch_seed(base: int, batch: list[tuple[Problem, list[int]]]) -> int:
    key = f"{base}|" + "|".join(f"{p.id}:{','.join(map(str, idx))}" for p, idx in batch)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _check_unique(problems: list[Problem]) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise ThinkforgeError(f"duplicate problem id {p.id!r}: ids must be unique")
        seen.add(p.id)


def finalize(task: Task, problems: list[Problem], rows: list[dict[str, Any]], config: dict[str, Any], seed: int,
             task_dir: Path | None, samples_written: bool) -> dict[str, Any]:
    """Summary of `rows` restricted to `problems`; writes summary.json (and samples.jsonl if asked)."""
    wanted = {p.id for p in problems}
    n = config.get("sampling", {}).get("n")
    rows = [r for r in rows if r["problem_id"] in wanted and (n is None or r["sample_index"] < n)]
    rows.sort(key=lambda r: (r["problem_id"], r["sample_index"]))
    fmt = answer_format(task)
    if fmt is not None:  # samples written before flexible grading existed (a resumed run) get it filled in
        by_id = {p.id: p for p in problems}
        rows = [r if "correct_flexible" in r else _with_flexible(task, by_id[r["problem_id"]], r) for r in rows]
    metrics = summarize(rows, {p.id: p.meta for p in problems}, kind=task.kind)
    # How answers were read, so a 0% strict score with a high no-answer rate explains itself.
    grading = {"headline": "strict", **(fmt.describe() if fmt is not None else {"strict": ["the task's own rule"],
                                                                                "flexible": ["same as strict"]})}
    summary = {"task": task.name, **metrics, "grading": grading, **run_metadata(config, seed)}
    if task_dir is not None:
        if not samples_written:
            atomic_write_text(task_dir / SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(task_dir / SUMMARY, summary)
    return summary


def _with_flexible(task: Task, problem: Problem, row: dict[str, Any]) -> dict[str, Any]:
    """`row` with its flexible grade added (its recorded strict grade is kept)."""
    _, flexible = grade_response(task, problem, row.get("response") or "", bool(is_truncated(row)))
    if flexible is None:
        return row
    return {**row, "extracted_flexible": flexible.extracted, "correct_flexible": bool(flexible.correct),
            "reason_flexible": flexible.reason, "extracted_by": flexible.details.get("extracted_by")}


def evaluate(task: Task | str, backend: Backend, params: SamplingParams, *, problems: list[Problem] | None = None,
             split: str | None = None, n_problems: int | None = None, output_dir: str | Path | None = None,
             system_prompt: str | None = None, seed: int = 0, config: dict[str, Any] | None = None,
             batch_size: int = 64, score_workers: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generates `params.n` samples per problem with `backend.chat`, scores them with `task.score` and
    returns the summary (`summary["accuracy"]` is avg@n pass@1 under strict grading, `accuracy_flexible` beside
    it; `summary["grading"]` says what each reads). With `output_dir`, results go to
    `output_dir/<task>/` and an interrupted run resumes without regenerating finished samples."""
    task = resolve_task(task)
    params = dataclasses.replace(params).validate()
    split = split or default_split(task)
    if problems is None:
        problems = task.problems(split, n=n_problems, seed=seed)
    problems = list(problems)
    if not problems:
        raise ThinkforgeError(f"{task.name}: no problems to evaluate")
    _check_unique(problems)
    if batch_size < 1:
        raise ThinkforgeError(f"batch_size must be >= 1, got {batch_size}")
    base_seed = params.seed if params.seed is not None else seed
    sampling = dataclasses.asdict(params)
    ids_hash = hashlib.sha256("\n".join(sorted(p.id for p in problems)).encode()).hexdigest()[:16]
    # Which backend/model made the samples is part of the config (and of the resume guard), so a second
    # model evaluated into the same directory cannot silently reuse the first one's samples.
    model_name = getattr(backend, "model_name", None) or getattr(backend, "model", None)
    run_cfg = {"task": task.name, "source": str(getattr(task, "source", "") or ""), "split": split,
               "system_prompt": system_prompt, "sampling": sampling, "backend": backend.name,
               **({"model": str(model_name)} if isinstance(model_name, str | Path) else {}), **(config or {})}
    full_cfg = {**run_cfg, "n_problems": len(problems), "problem_ids_hash": ids_hash}

    task_dir: Path | None = None
    rows: list[dict[str, Any]] = []
    if output_dir is not None:
        task_dir = ensure_writable_dir(Path(output_dir) / task.name)
        # Samples made with other settings must not be mixed in; `n` and the problem set may grow.
        guard = {**run_cfg, "sampling": {k: v for k, v in sampling.items() if k != "n"}}
        run_file = task_dir / "run.json"
        if run_file.exists():
            old = json.loads(run_file.read_text(encoding="utf-8"))
            if old.get("resume_key") != config_hash(guard):
                before, now = _flat(old.get("settings", {})), _flat(json.loads(json.dumps(guard, default=str)))
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise ThinkforgeError(f"{task_dir}: existing samples were generated with different settings "
                                      f"({', '.join(changed) or 'config'}); use a new --output directory")
        else:
            atomic_write_json(run_file, {"resume_key": config_hash(guard), "settings": guard})
        rows = read_samples(task_dir / SAMPLES)

    done = {(r["problem_id"], r["sample_index"]) for r in rows}
    todo = [(p, [i for i in range(params.n) if (p.id, i) not in done]) for p in problems]
    todo = [(p, idx) for p, idx in todo if idx]
    total = sum(len(idx) for _, idx in todo)
    workers = score_workers or default_workers(task)
    t0, generated = time.perf_counter(), 0
    # Problems missing the same number of samples share one backend call (`n` is per call).
    by_missing: dict[int, list[tuple[Problem, list[int]]]] = {}
    for p, idx in todo:
        by_missing.setdefault(len(idx), []).append((p, idx))
    for m, group in sorted(by_missing.items()):
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            bparams = dataclasses.replace(params, n=m, seed=_batch_seed(base_seed, batch))
            outs = backend.chat([task.messages(p, system_prompt) for p, _ in batch], bparams)
            if len(outs) != len(batch) or any(len(o) != m for o in outs):
                raise ThinkforgeError(f"backend {backend.name!r} returned {[len(o) for o in outs]} completions "
                                      f"for {len(batch)} prompts x n={m}")
            items = [(p, i, c.text, _completion_extra(c)) for (p, idx), comps in zip(batch, outs, strict=True)
                     for i, c in zip(idx, comps, strict=True)]
            new_rows = score_many(task, items, workers)
            if task_dir is not None:
                append_jsonl(task_dir / SAMPLES, new_rows)
            rows.extend(new_rows)
            generated += len(new_rows)
            if progress is not None:
                progress(generated, total)
    elapsed = time.perf_counter() - t0
    summary = finalize(task, problems, rows, full_cfg, seed, task_dir, samples_written=True)
    if task_dir is not None:
        atomic_write_json(task_dir / "timing.json", {"generated_samples": generated, "seconds": round(elapsed, 3)})
    return summary


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _completion_extra(c: Completion) -> dict[str, Any]:
    # API backends return text without token ids; record "unknown" rather than a false 0 tokens.
    tokens = c.completion_tokens if (c.token_ids or not c.text) else None
    return {"finish_reason": c.finish_reason, "completion_tokens": tokens, "prompt_tokens": c.prompt_tokens}


# --------------------------------------------------------------------------- re-scoring


def read_responses(path: str | Path, task: Task, problems: list[Problem]) -> list[tuple[Problem, int, str, dict]]:
    """Rows `{"problem_id", "response"}` (optional `sample_index`, `finish_reason`, `truncated` (bool: cut off
    by the length limit, as finish_reason "length"), `completion_tokens`).
    Several rows per id are several samples. Ids may be thinkforge's (`math500/test/...`) or the
    benchmark's own (`test/...`, `HumanEval/0`)."""
    path = Path(path)
    if not path.exists():
        raise ThinkforgeError(f"{path}: responses file not found")
    index: dict[str, Problem] = {}
    for p in problems:
        index[p.id] = p
        source_id = p.meta.get("source_id")
        if source_id is not None:
            index.setdefault(str(source_id), p)
    counters: dict[str, int] = {}
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ThinkforgeError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ThinkforgeError(f"{where}: expected a JSON object")
        for key in ("problem_id", "response"):
            if key not in row:
                raise ThinkforgeError(f"{where}: missing field {key!r}")
        if not isinstance(row["response"], str):
            raise ThinkforgeError(f"{where}: field 'response' must be a string, got {type(row['response']).__name__}")
        problem = index.get(str(row["problem_id"]))
        if problem is None:
            raise ThinkforgeError(f"{where}: unknown problem_id {row['problem_id']!r} for task {task.name}")
        idx = row.get("sample_index")
        if idx is None:
            idx = counters.get(problem.id, 0)
        elif not isinstance(idx, int) or idx < 0:
            raise ThinkforgeError(f"{where}: field 'sample_index' must be a non-negative integer")
        counters[problem.id] = max(counters.get(problem.id, 0), idx + 1)
        if row.get("truncated") is not None and not isinstance(row["truncated"], bool):
            raise ThinkforgeError(f"{where}: field 'truncated' must be true or false, got {row['truncated']!r}")
        extra = {k: row[k] for k in ("finish_reason", "truncated", "completion_tokens", "prompt_tokens")
                 if row.get(k) is not None}
        out.append((problem, idx, row["response"], extra))
    if not out:
        raise ThinkforgeError(f"{path}: no responses")
    seen: set[tuple[str, int]] = set()
    for problem, idx, _, _ in out:
        if (problem.id, idx) in seen:
            raise ThinkforgeError(f"{path}: problem {problem.id!r} has sample_index {idx} twice")
        seen.add((problem.id, idx))
    return out


def score_responses(task: Task | str, responses: str | Path, *, output_dir: str | Path | None = None,
                    all_problems: bool = False, seed: int = 0, config: dict[str, Any] | None = None,
                    score_workers: int | None = None) -> dict[str, Any]:
    """Re-scores a file of existing responses. Accuracy is over the problems the file answers, or over
    the whole benchmark with `all_problems` (unanswered problems then count as wrong)."""
    task = resolve_task(task)
    bench = task.problems(default_split(task))
    items = read_responses(responses, task, bench)
    answered = {p.id for p, *_ in items}
    problems = bench if all_problems else [p for p in bench if p.id in answered]
    digest = hashlib.sha256(Path(responses).read_bytes()).hexdigest()[:16]
    cfg = {"task": task.name, "source": str(getattr(task, "source", "") or ""), "mode": "rescore",
           "responses": Path(responses).name, "responses_sha256": digest, "benchmark_size": len(bench),
           "all_problems": all_problems, **(config or {})}
    ids_hash = hashlib.sha256("\n".join(sorted(p.id for p in problems)).encode()).hexdigest()[:16]
    cfg.update({"n_problems": len(problems), "problem_ids_hash": ids_hash})
    rows = score_many(task, items, score_workers or default_workers(task))
    task_dir = ensure_writable_dir(Path(output_dir) / task.name) if output_dir is not None else None
    return finalize(task, problems, rows, cfg, seed, task_dir, samples_written=False)
