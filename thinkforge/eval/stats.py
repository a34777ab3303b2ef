"""Statistics that make an accuracy claim checkable: intervals for pass@1 and a paired test for two models.

- `wilson_interval`: 95% score interval for a proportion (Wilson 1927). Unlike the normal approximation
  it stays inside [0, 1] and keeps its coverage near 0% and 100%, where small models and easy tasks live.
- `mcnemar`: two models graded on the *same* problems. Only the discordant problems (one right, the other
  wrong) carry information; with b and c of them the null hypothesis "equally good" makes b ~ Binomial(b + c,
  1/2). Exact two-sided binomial p-value for small counts, chi-square with continuity correction above
  `exact_below` discordant pairs (the two agree closely there and the exact sum gets slow for huge counts).
- `pass_at_k_interval`: mean unbiased pass@k over problems, with a normal interval over problems (a
  per-problem pass@k is not a Bernoulli draw, so Wilson does not apply).

Pure Python (math only): the report card runs without scipy; tests compare with scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from thinkforge.errors import ThinkforgeError

Z95 = 1.959963984540054  # standard normal quantile 0.975


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"estimate": round(self.estimate, 6), "low": round(self.low, 6), "high": round(self.high, 6),
                "n": self.n}

    def percent(self) -> str:
        """`82.5% [79.9, 84.8]`: the form the report card prints."""
        return f"{100 * self.estimate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval for successes / n (95% by default)."""
    if n < 1 or not 0 <= successes <= n:
        raise ThinkforgeError(f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp rounding only: mathematically the interval already lies in [0, 1] and contains p.
    return Interval(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), n)


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: the probability of an outcome at least
    as far from n/2 as k (for p = 1/2 this equals summing every outcome no more likely than k)."""
    if n < 0 or not 0 <= k <= n:
        raise ThinkforgeError(f"binom_two_sided_p needs 0 <= k <= n, got k={k} n={n}")
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    if 2 * lo == n:
        return 1.0
    # log-space terms: C(n, i) / 2^n underflows for large n otherwise
    log_half_n = -n * math.log(2.0)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
               for i in range(lo + 1))
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class McNemar:
    n: int  # problems graded by both models
    a_only: int  # problems model A got right and model B wrong
    b_only: int  # problems model B got right and model A wrong
    p_value: float
    method: str  # "exact" | "chi2-cc"

    @property
    def difference(self) -> float:
        """Accuracy of B minus accuracy of A (the discordant counts decide it)."""
        return (self.b_only - self.a_only) / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "a_only": self.a_only, "b_only": self.b_only, "difference": round(self.difference, 6),
                "p_value": self.p_value, "method": self.method}

    def line(self, a: str = "A", b: str = "B") -> str:
        return (f"McNemar {a} vs {b} on {self.n} shared problems: {self.b_only} right only by {b}, "
                f"{self.a_only} right only by {a}; {b} - {a} = {100 * self.difference:+.1f} points, "
                f"two-sided p = {self.p_value:.3g} ({self.method}).")


def mcnemar_counts(a_only: int, b_only: int, n: int, exact_below: int = 200) -> McNemar:
    """McNemar's test from the discordant counts."""
    if min(a_only, b_only) < 0 or a_only + b_only > n:
        raise ThinkforgeError(f"mcnemar: discordant counts {a_only} + {b_only} exceed {n} problems")
    d = a_only + b_only
    if d < exact_below:
        return McNemar(n, a_only, b_only, binom_two_sided_p(b_only, d), "exact")
    stat = max(0.0, abs(a_only - b_only) - 1.0) ** 2 / d
    p = math.erfc(math.sqrt(stat / 2.0))  # survival function of chi-square with 1 degree of freedom
    return McNemar(n, a_only, b_only, p, "chi2-cc")


def mcnemar(correct_a: Mapping[str, bool], correct_b: Mapping[str, bool], exact_below: int = 200) -> McNemar:
    """Paired test for two models on the same problems (problem id -> greedy correct). The two maps must
    hold the same problem ids: a test on different problem sets is not paired."""
    if set(correct_a) != set(correct_b):
        missing = sorted(set(correct_a) ^ set(correct_b))
        raise ThinkforgeError(f"mcnemar: the two models were graded on different problems (e.g. {missing[0]!r})")
    if not correct_a:
        raise ThinkforgeError("mcnemar: no problems")
    a_only = sum(1 for k in correct_a if correct_a[k] and not correct_b[k])
    b_only = sum(1 for k in correct_a if correct_b[k] and not correct_a[k])
    return mcnemar_counts(a_only, b_only, len(correct_a), exact_below)


def pass_at_k_interval(per_problem: Sequence[tuple[int, int]], k: int, z: float = Z95) -> Interval:
    """Mean unbiased pass@k over problems, given (samples, correct) per problem, with a normal 95% interval
    over problems (clamped to [0, 1])."""
    from thinkforge.eval.metrics import pass_at_k

    if not per_problem:
        raise ThinkforgeError("pass_at_k_interval: no problems")
    mean, half = _mean_and_half_width([pass_at_k(n, c, k) for n, c in per_problem], z)
    return Interval(mean, max(0.0, mean - half), min(1.0, mean + half), len(per_problem))


def _mean_and_half_width(values: Sequence[float], z: float) -> tuple[float, float]:
    """Mean of per-problem values and the half-width of its normal interval (sample sd over sqrt(m))."""
    m = len(values)
    mean = math.fsum(values) / m
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (m - 1)) if m > 1 else 0.0
    return mean, z * sd / math.sqrt(m)


def per_problem_counts(samples: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(samples, correct) per problem id from scored sample rows (`problem_id`, `correct`)."""
    out: dict[str, list[int]] = {}
    for s in samples:
        row = out.setdefault(str(s["problem_id"]), [0, 0])
        row[0] += 1
        row[1] += bool(s["correct"])
    return {pid: (n, c) for pid, (n, c) in sorted(out.items())}


def report_card(greedy: Sequence[Mapping[str, Any]], sampled: Sequence[Mapping[str, Any]] | None = None,
                k: int = 8) -> dict[str, Any]:
    """Greedy pass@1 with its Wilson interval, and from T=1 samples (several per problem) sampled pass@1 and
    pass@k with normal intervals over problems. Inputs are scored sample rows (`samples.jsonl`)."""
    g = per_problem_counts(greedy)
    if any(n != 1 for n, _ in g.values()):
        raise ThinkforgeError("report_card: greedy rows must hold one sample per problem")
    card: dict[str, Any] = {"greedy_pass1": wilson_interval(sum(c for _, c in g.values()), len(g)).to_dict()}
    if sampled:
        s = per_problem_counts(sampled)
        n_min = min(n for n, _ in s.values())
        if n_min < k:
            raise ThinkforgeError(f"report_card: pass@{k} needs >= {k} samples per problem, got {n_min}")
        card["sampled_pass1"] = pass_at_k_interval(list(s.values()), 1).to_dict()
        card[f"sampled_pass{k}"] = pass_at_k_interval(list(s.values()), k).to_dict()
    return card


def paired_rate_difference(counts_a: Mapping[str, tuple[int, int]], counts_b: Mapping[str, tuple[int, int]],
                           z: float = Z95) -> Interval:
    """Mean over problems of B's per-problem sampled pass rate minus A's ((samples, correct) per problem id),
    with a normal 95% interval over problems: the paired comparison of two models' sampled pass@1 on the
    same problems (pairing removes the spread of problem difficulty from the interval)."""
    if set(counts_a) != set(counts_b):
        missing = sorted(set(counts_a) ^ set(counts_b))
        raise ThinkforgeError(f"paired_rate_difference: the two models were sampled on different problems "
                              f"(e.g. {missing[0]!r})")
    if not counts_a:
        raise ThinkforgeError("paired_rate_difference: no problems")
    mean, half = _mean_and_half_width([counts_b[k][1] / counts_b[k][0] - counts_a[k][1] / counts_a[k][0]
                                       for k in counts_a], z)
    return Interval(mean, mean - half, mean + half, len(counts_a))
