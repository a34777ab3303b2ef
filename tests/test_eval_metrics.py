"""Metrics against brute force: the unbiased pass@k estimator, maj@k, breakdowns, lengths."""

from __future__ import annotations

import itertools
import math

import pytest

from thinkforge.eval.metrics import default_ks, majority, pass_at_k, summarize


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) contains a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 4), (8, 0, 8), (10, 9, 1)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # The binomial form overflows a float for n = 2000; the product form stays accurate.
    got = pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert got == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(2000, 1990, 20) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(16) == [1, 2, 4, 8, 16]


def test_majority_vote():
    assert majority([("1", False), ("2", True), ("2", True)]) is True
    assert majority([("1", False), ("2", True)]) is False  # tie: first answer seen wins
    assert majority([(None, False), (None, False), ("3", True)]) is True  # abstentions do not vote
    assert majority([(None, False)]) is False


def sample(pid: str, i: int, correct: bool, extracted: str | None, **kw) -> dict:
    return {"problem_id": pid, "sample_index": i, "correct": correct, "extracted": extracted,
            "response": "x" * (10 * (i + 1)), "reason": "correct" if correct else "wrong_answer", **kw}


def test_summarize_numbers():
    samples = [
        sample("a", 0, True, "5", finish_reason="stop", completion_tokens=10),
        sample("a", 1, False, "6", finish_reason="length", completion_tokens=20),
        sample("a", 2, True, "5", finish_reason="stop", completion_tokens=30),
        sample("a", 3, False, "6", finish_reason="stop", completion_tokens=40),
        sample("b", 0, False, "1", finish_reason="stop", completion_tokens=10),
        sample("b", 1, False, "1", finish_reason="stop", completion_tokens=20),
        sample("b", 2, False, None, finish_reason="length", completion_tokens=30),
        sample("b", 3, True, "2", finish_reason="stop", completion_tokens=40),
    ]
    meta = {"a": {"level": 1, "subject": "Algebra"}, "b": {"level": 2, "subject": "Algebra"}, "c": {"level": 2}}
    s = summarize(reversed(samples), meta)
    # c was asked and never answered: it counts as wrong (0/… of 3 problems), so accuracy is (0.5 + 0.25 + 0) / 3.
    assert s["accuracy"] == pytest.approx(0.75 / 3, abs=1e-6)
    assert s["missing_problems"] == 1 and s["n_samples"] == {"min": 0, "max": 4}
    s = summarize(samples, {k: meta[k] for k in "ab"})
    assert s["accuracy"] == pytest.approx(0.375)
    assert s["pass_at_k"] == {"1": pytest.approx(0.375), "2": pytest.approx((5 / 6 + 1 / 2) / 2, abs=1e-6),
                              "4": 1.0}
    # a: votes tie between "5" (right, seen first) and "6", so a is right; b votes "1" (wrong) for every k.
    assert s["maj_at_k"] == {"1": 0.5, "2": 0.5, "4": 0.5}
    assert s["breakdown"]["level"] == {"1": {"n_problems": 1, "accuracy": 0.5},
                                       "2": {"n_problems": 1, "accuracy": 0.25}}
    assert s["breakdown"]["subject"] == {"Algebra": {"n_problems": 2, "accuracy": 0.375}}
    assert s["truncation_rate"] == pytest.approx(0.25)
    assert s["length_tokens"]["mean"] == 25.0 and s["length_tokens"]["max"] == 40.0
    assert s["length_chars"]["min"] == 10.0 and s["n_responses"] == 8 and s["n_problems_solved"] == 2


def test_summarize_order_independent():
    samples = [sample(p, i, (i + len(p)) % 3 == 0, str(i % 2)) for p in ("x", "yy", "zzz") for i in range(3)]
    meta = {"x": {}, "yy": {}, "zzz": {}}
    assert summarize(samples, meta) == summarize(list(reversed(samples)), meta)


def test_code_tasks_have_no_majority_vote():
    s = summarize([sample("a", 0, True, "def f(): pass")], {"a": {}}, kind="code")
    assert s["maj_at_k"] is None and s["truncation_rate"] is None


def test_summarize_strict_and_flexible_side_by_side():
    def row(pid, i, strict, flexible, **kw):
        # (answer, correct) under each grading; None = no answer extracted.
        return {**sample(pid, i, strict[1], strict[0]), "reason": "no_answer" if strict[0] is None else
                ("correct" if strict[1] else "wrong_answer"), "extracted_flexible": flexible[0],
                "correct_flexible": flexible[1],
                "reason_flexible": "no_answer" if flexible[0] is None else ("correct" if flexible[1] else "wrong_answer"),
                **kw}

    samples = [
        row("a", 0, ("5", True), ("5", True), finish_reason="stop"),
        row("a", 1, (None, False), ("6", False), finish_reason="stop"),
        row("a", 2, (None, False), ("6", False), finish_reason="length", truncated=False),  # explicit field wins
        row("b", 0, (None, False), ("1", True), truncated=True),
        row("b", 1, (None, False), (None, False)),  # unknown finish: left out of the truncation rate
        {**sample("b", 2, True, "1"), "reason": "correct"},  # a row without flexible fields counts the same
    ]
    s = summarize(samples, {"a": {}, "b": {}})
    assert s["accuracy"] == s["accuracy_strict"] == pytest.approx((1 / 3 + 1 / 3) / 2, abs=1e-6)
    assert s["accuracy_flexible"] == pytest.approx((1 / 3 + 2 / 3) / 2, abs=1e-6)
    assert s["no_answer_rate"] == pytest.approx(4 / 6, abs=1e-6)
    assert s["no_answer_rate_flexible"] == pytest.approx(1 / 6, abs=1e-6)
    # a: strict votes "5" alone (right); flexible votes "6" twice against "5" once (wrong). b: "1" both ways.
    assert s["maj_at_k"]["3"] == 1.0 and s["maj_at_k_flexible"]["3"] == 0.5
    assert s["n_truncated"] == 1 and s["truncation_rate"] == pytest.approx(1 / 4, abs=1e-6)
