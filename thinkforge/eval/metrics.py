"""Evaluation metrics: avg@n pass@1, unbiased pass@k, maj@k, breakdowns, lengths, truncation.

All functions take plain per-sample records so re-scored files and fresh generations share them,
and iterate in sorted order so the same samples give bit-identical numbers.

Two gradings side by side. Strict (`correct`, `extracted`) is the headline: `accuracy`, `pass_at_k`,
`maj_at_k`, `breakdown` and `no_answer_rate` use it, so numbers stay comparable with published boxed-answer
evaluations and with the RL reward. Flexible (`correct_flexible`, `extracted_flexible`, when the task grades
both) gives `accuracy_flexible`, `maj_at_k_flexible` (votes over the flexible answers) and
`no_answer_rate_flexible`; a sample without them (a task with one rule) counts the same under both.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

BREAKDOWN_KEYS = ("level", "subject", "category", "difficulty", "platform", "domain")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples with c correct (Chen et al. 2021, Codex):
    1 - C(n-c, k) / C(n, k), computed as a product so it stays stable for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, 8, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return sorted(set(ks) | {n}) if n >= 1 else []


def majority(answers: list[tuple[str | None, bool]]) -> bool:
    """Majority vote over (normalised answer, correct) pairs; ties go to the answer seen first.
    Samples without an answer do not vote; if none answered, the vote is wrong."""
    votes: Counter[str] = Counter()
    first: dict[str, int] = {}
    correct: dict[str, bool] = {}
    for i, (ans, ok) in enumerate(answers):
        if ans is None:
            continue
        votes[ans] += 1
        first.setdefault(ans, i)
        correct[ans] = correct.get(ans, False) or ok
    if not votes:
        return False
    best = max(votes, key=lambda a: (votes[a], -first[a]))
    return correct[best]


def normalise_answer(text: str | None) -> str | None:
    if text is None:
        return None
    out = "".join(text.split()).replace("\\left", "").replace("\\right", "").replace("\\!", "").strip("$.")
    return out or None


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(sorted(values), dtype=float)
    return {"mean": round(float(arr.mean()), 4), "median": round(float(np.median(arr)), 4),
            "p90": round(float(np.percentile(arr, 90)), 4), "min": float(arr[0]), "max": float(arr[-1])}


def summarize(samples: Iterable[dict[str, Any]], problem_meta: dict[str, dict[str, Any]], *,
              kind: str = "math", ks: list[int] | None = None) -> dict[str, Any]:
    """Metrics from scored samples (`problem_id`, `sample_index`, `correct`, `extracted`, `response`,
    optional `finish_reason`, `completion_tokens`). `problem_meta` maps every evaluated problem id to its
    meta; a problem with no sample counts as wrong (it was asked and not answered)."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem_id"]].append(s)
    ids = sorted(problem_meta)
    per_problem = {pid: sorted(by_problem.get(pid, []), key=lambda s: s["sample_index"]) for pid in ids}
    counts = [len(v) for v in per_problem.values()]
    n_min = min(counts) if counts else 0
    n_max = max(counts) if counts else 0
    all_samples = [s for pid in ids for s in per_problem[pid]]

    def flexible_ok(s: dict[str, Any]) -> bool:
        return bool(s.get("correct_flexible", s["correct"]))

    def solve_rate(pid: str, ok: Any = lambda s: bool(s["correct"])) -> float:
        v = per_problem[pid]
        return sum(ok(s) for s in v) / len(v) if v else 0.0

    def acc(pids: list[str], ok: Any = lambda s: bool(s["correct"])) -> float:
        # avg@n: mean over problems of the fraction of that problem's samples that are correct.
        return round(float(np.mean([solve_rate(p, ok) for p in pids])), 6) if pids else 0.0

    rates = [solve_rate(p) for p in ids]
    # Standard error over problems: how much the accuracy would move on another draw of problems.
    stderr = round(statistics.stdev(rates) / len(rates) ** 0.5, 6) if len(rates) > 1 else 0.0

    ks = [k for k in (ks or default_ks(n_min)) if 1 <= k <= n_min]
    pass_k = {}
    maj_k: dict[str, float] | None = {} if kind != "code" else None
    maj_k_flex: dict[str, float] | None = {} if kind != "code" else None
    for k in ks:
        pass_k[str(k)] = round(float(np.mean([
            pass_at_k(len(v), sum(bool(s["correct"]) for s in v), k) for v in per_problem.values()])), 6)
        if maj_k is not None and maj_k_flex is not None:
            # maj@k votes over the first k samples of each problem (a deterministic choice of subset).
            maj_k[str(k)] = round(float(np.mean([
                majority([(normalise_answer(s.get("extracted")), bool(s["correct"])) for s in v[:k]])
                for v in per_problem.values()])), 6)
            maj_k_flex[str(k)] = round(float(np.mean([
                majority([(normalise_answer(s.get("extracted_flexible", s.get("extracted"))), flexible_ok(s))
                          for s in v[:k]]) for v in per_problem.values()])), 6)

    breakdown: dict[str, dict[str, dict[str, Any]]] = {}
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[str]] = defaultdict(list)
        for pid in ids:
            value = problem_meta[pid].get(key)
            if value not in (None, ""):
                groups[str(value)].append(pid)
        if len(groups) > 1 or (groups and key in ("level", "subject", "category")):
            breakdown[key] = {g: {"n_problems": len(p), "accuracy": acc(p)}
                              for g, p in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}

    chars = [len(s.get("response") or "") for s in all_samples]
    tokens = [s["completion_tokens"] for s in all_samples if s.get("completion_tokens") is not None]
    # Truncated (cut off by the length limit): an explicit `truncated`, else finish_reason "length"; samples
    # whose finish is unknown (some APIs, some files) are left out of the rate rather than counted as complete.
    cut = [s["truncated"] if s.get("truncated") is not None else s["finish_reason"] == "length"
           for s in all_samples if s.get("truncated") is not None or s.get("finish_reason")]
    reasons = Counter(str(s.get("reason", "")) for s in all_samples)
    flexible_none = sum(s.get("reason_flexible", s.get("reason")) == "no_answer" for s in all_samples)
    return {
        "accuracy": acc(ids),
        "accuracy_stderr": stderr,
        "accuracy_strict": acc(ids),
        "accuracy_flexible": acc(ids, flexible_ok),
        "pass_at_k": pass_k,
        "maj_at_k": maj_k,
        "maj_at_k_flexible": maj_k_flex,
        "n_problems": len(ids),
        "n_samples": n_min if n_min == n_max else {"min": n_min, "max": n_max},
        "n_responses": len(all_samples),
        "n_correct": sum(bool(s["correct"]) for s in all_samples),
        "n_problems_solved": sum(any(s["correct"] for s in v) for v in per_problem.values()),
        "missing_problems": sum(1 for c in counts if c == 0),
        "breakdown": breakdown,
        "reasons": dict(sorted(reasons.items())),
        "no_answer_rate": round(reasons.get("no_answer", 0) / len(all_samples), 6) if all_samples else 0.0,
        "no_answer_rate_flexible": round(flexible_none / len(all_samples), 6) if all_samples else 0.0,
        "length_chars": _stats(chars),
        "length_tokens": _stats(tokens) if len(tokens) == len(all_samples) else {},
        "n_truncated": sum(cut),
        "truncation_rate": round(sum(cut) / len(cut), 6) if cut else None,
    }


def _sort_key(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)

