"""Test-Difficulty-Driven Reward (MiMo-7B report, section 3): partial credit for code, graded by test difficulty.

A pass/fail reward over all tests gives a hard problem a reward of 0 for every rollout, so GRPO learns
nothing from it. MiMo groups a problem's tests into difficulty levels by how often a population of
solutions passes each test, then awards partial credit level by level, in two flavours (strict, soft).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from thinkforge.errors import ThinkforgeError


def difficulty_levels(pass_rates: Sequence[float], n_levels: int = 3) -> list[int]:
    """Assigns each test a level in 0..n_levels-1 from its pass rate (0 = easiest, n_levels-1 = hardest).

    Equal-width bins over the pass rate p (fraction of sampled solutions that pass the test):

        level(p) = min(n_levels - 1, floor((1 - p) * n_levels))

    so with 3 levels p > 2/3 is level 0, 1/3 < p <= 2/3 is level 1 and p <= 1/3 is level 2. Fixed bins
    (rather than quantiles) keep a test's level independent of which other tests the problem has.
    """
    if n_levels < 1:
        raise ThinkforgeError(f"difficulty_levels: n_levels must be >= 1, got {n_levels}")
    levels = []
    for i, p in enumerate(pass_rates):
        if not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
            raise ThinkforgeError(f"difficulty_levels: pass_rates[{i}] must be in [0, 1], got {p!r}")
        levels.append(min(n_levels - 1, math.floor((1.0 - p) * n_levels)))
    return levels


def tddr_reward(passed: Sequence[bool], levels: Sequence[int], mode: str = "strict",
                level_scores: Sequence[float] | None = None) -> float:
    """The reward of one solution given which tests it passed and each test's difficulty level.

    With T_l the tests of level l, P_l those of them that passed, and score s_l for level l (default
    s_l = 1/L over the L levels that have tests, so a full pass earns 1 and a full fail 0):

        strict:  R = sum_l s_l * [ |P_k| = |T_k| for every k <= l ]
                 a level counts only if it and every easier level pass completely;
        soft:    R = sum_l s_l * |P_l| / |T_l|
                 each level's score is split equally over its tests.

    A level without tests earns nothing and does not break the strict chain (a problem whose tests are all
    hard must not hand out the easy levels' score for free). Raises ThinkforgeError on mismatched lengths, negative levels,
    too few level scores or an unknown mode.
    """
    if mode not in ("strict", "soft"):
        raise ThinkforgeError(f"tddr_reward: mode must be 'strict' or 'soft', got {mode!r}")
    if len(passed) != len(levels):
        raise ThinkforgeError(f"tddr_reward: {len(passed)} pass flags but {len(levels)} levels")
    if not levels:
        return 0.0
    if any(not isinstance(lv, int) or lv < 0 for lv in levels):
        raise ThinkforgeError(f"tddr_reward: levels must be non-negative ints, got {list(levels)!r:.100}")
    n = max(levels) + 1
    if level_scores is not None and len(level_scores) < n:
        raise ThinkforgeError(f"tddr_reward: {len(level_scores)} level_scores for levels up to {n - 1}")
    totals, hits = [0] * n, [0] * n
    for ok, lv in zip(passed, levels, strict=True):
        totals[lv] += 1
        hits[lv] += bool(ok)
    present = [lv for lv in range(n) if totals[lv]]
    scores = ([1.0 / len(present)] * n) if level_scores is None else [float(s) for s in level_scores]
    reward = 0.0
    for lv in present:
        if mode == "soft":
            reward += scores[lv] * hits[lv] / totals[lv]
        elif hits[lv] == totals[lv]:
            reward += scores[lv]
        else:
            break
    return reward
