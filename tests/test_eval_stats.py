"""Report-card statistics against scipy and published values."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats as sps

from thinkforge.errors import ThinkforgeError
from thinkforge.eval.stats import (
    binom_two_sided_p,
    mcnemar,
    mcnemar_counts,
    pass_at_k_interval,
    report_card,
    wilson_interval,
)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (165, 200), (835, 1000),
                                 (999, 1000), (3, 7)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    got = wilson_interval(k, n)
    assert got.low == pytest.approx(ref.low, rel=1e-9, abs=1e-12)
    assert got.high == pytest.approx(ref.high, rel=1e-9, abs=1e-12)
    assert got.low <= k / n <= got.high


def test_wilson_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, example (a): 81/263 -> 0.2553 to 0.3662
    got = wilson_interval(81, 263)
    assert (round(got.low, 4), round(got.high, 4)) == (0.2553, 0.3662)
    assert got.percent() == "30.8% [25.5, 36.6]"


def test_wilson_rejects_bad_counts() -> None:
    with pytest.raises(ThinkforgeError, match="successes <= n"):
        wilson_interval(5, 4)
    with pytest.raises(ThinkforgeError):
        wilson_interval(0, 0)


@pytest.mark.parametrize("k,n", [(0, 1), (0, 5), (2, 9), (4, 8), (7, 8), (12, 40), (30, 61), (150, 400)])
def test_exact_binomial_matches_scipy(k: int, n: int) -> None:
    assert binom_two_sided_p(k, n) == pytest.approx(sps.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_exact_and_chi2() -> None:
    # 2 vs 9 discordant: exact binomial, 2 * P(X <= 2 | n=11) = 2 * 67 / 2048
    small = mcnemar_counts(9, 2, 200)
    assert small.method == "exact"
    assert small.p_value == pytest.approx(2 * (1 + 11 + 55) / 2048, rel=1e-12)
    assert small.difference == pytest.approx(-7 / 200)
    # large counts: continuity-corrected chi-square, as scipy computes it
    big = mcnemar_counts(120, 250, 1000, exact_below=200)
    assert big.method == "chi2-cc"
    assert big.p_value == pytest.approx(sps.chi2.sf((abs(120 - 250) - 1) ** 2 / 370, 1), rel=1e-9)
    # the two methods agree closely where they meet
    assert mcnemar_counts(90, 130, 1000, exact_below=10**6).p_value == pytest.approx(
        mcnemar_counts(90, 130, 1000, exact_below=0).p_value, rel=0.05)


def test_mcnemar_from_paired_results() -> None:
    rng = random.Random(0)
    a = {f"p{i}": rng.random() < 0.6 for i in range(1000)}
    b = {k: (v or rng.random() < 0.4) and rng.random() > 0.02 for k, v in a.items()}
    res = mcnemar(a, b)
    a_only = sum(a[k] and not b[k] for k in a)
    b_only = sum(b[k] and not a[k] for k in a)
    assert (res.a_only, res.b_only, res.n) == (a_only, b_only, 1000)
    assert res.difference == pytest.approx((sum(b.values()) - sum(a.values())) / 1000)
    assert res.p_value < 1e-6
    assert "shared problems" in res.line("SFT", "RL")
    identical = mcnemar(a, a)
    assert identical.p_value == 1.0 and identical.difference == 0.0
    with pytest.raises(ThinkforgeError, match="different problems"):
        mcnemar(a, {**b, "extra": True})


def test_pass_at_k_interval_and_report_card() -> None:
    # 3 problems x 8 samples, with 0, 1 and 8 correct
    per = [(8, 0), (8, 1), (8, 8)]
    p1 = pass_at_k_interval(per, 1)
    assert p1.estimate == pytest.approx((0 + 1 / 8 + 1) / 3)
    p8 = pass_at_k_interval(per, 8)
    assert p8.estimate == pytest.approx(2 / 3)
    sd = math.sqrt(sum((v - 2 / 3) ** 2 for v in (0, 1, 1)) / 2)
    assert p8.high == pytest.approx(min(1.0, 2 / 3 + 1.959963984540054 * sd / math.sqrt(3)))
    greedy = [{"problem_id": f"p{i}", "correct": i != 0} for i in range(3)]
    sampled = [{"problem_id": f"p{i}", "correct": j < c} for i, (_, c) in enumerate(per) for j in range(8)]
    card = report_card(greedy, sampled, k=8)
    assert card["greedy_pass1"]["estimate"] == pytest.approx(2 / 3, abs=1e-6)
    assert card["sampled_pass8"]["estimate"] == pytest.approx(2 / 3, abs=1e-6)
    with pytest.raises(ThinkforgeError, match="pass@16"):
        report_card(greedy, sampled, k=16)


def test_paired_rate_difference_matches_a_paired_t_interval() -> None:
    import numpy as np

    from thinkforge.eval.stats import paired_rate_difference

    a = {"p1": (8, 2), "p2": (8, 4), "p3": (8, 8), "p4": (4, 0)}
    b = {"p1": (8, 6), "p2": (8, 4), "p3": (8, 7), "p4": (4, 2)}
    diffs = np.array([0.5, 0.0, -0.125, 0.5])
    iv = paired_rate_difference(a, b)
    half = 1.959963984540054 * diffs.std(ddof=1) / np.sqrt(4)
    assert iv.n == 4 and iv.estimate == pytest.approx(diffs.mean(), abs=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(diffs.mean() - half, abs=1e-12),
                                 pytest.approx(diffs.mean() + half, abs=1e-12))
    assert paired_rate_difference(b, a).estimate == pytest.approx(-diffs.mean(), abs=1e-12)
    with pytest.raises(ThinkforgeError, match="different problems"):
        paired_rate_difference(a, {"p1": (8, 6)})
