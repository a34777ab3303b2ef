"""Test-Difficulty-Driven Reward: levels from pass rates, strict and soft partial credit."""

import pytest

from thinkforge.errors import ThinkforgeError
from thinkforge.verify import difficulty_levels, run_code, tddr_reward


def test_difficulty_levels_bin_pass_rates():
    assert difficulty_levels([1.0, 0.9, 0.5, 0.34, 0.33, 0.0]) == [0, 0, 1, 1, 2, 2]
    assert difficulty_levels([1.0, 0.51, 0.5, 0.0], n_levels=2) == [0, 0, 1, 1]
    assert difficulty_levels([0.3, 1.0], n_levels=1) == [0, 0]
    for bad in ([1.5], [-0.1], [float("nan")], ["0.5"]):
        with pytest.raises(ThinkforgeError, match="pass_rates"):
            difficulty_levels(bad)
    with pytest.raises(ThinkforgeError, match="n_levels"):
        difficulty_levels([0.5], n_levels=0)


LEVELS = [0, 0, 1, 1, 2]


@pytest.mark.parametrize("passed,strict,soft", [
    ([1, 1, 1, 1, 1], 1.0, 1.0),
    ([0, 0, 0, 0, 0], 0.0, 0.0),
    ([1, 1, 1, 0, 1], 1 / 3, 1 / 3 + 1 / 6 + 1 / 3),  # a level-1 miss: strict stops at level 0
    ([0, 1, 1, 1, 1], 0.0, 1 / 6 + 1 / 3 + 1 / 3),  # an easy miss: strict gives nothing
    ([1, 1, 1, 1, 0], 2 / 3, 2 / 3),
])
def test_strict_and_soft(passed, strict, soft):
    flags = [bool(p) for p in passed]
    assert tddr_reward(flags, LEVELS, "strict") == pytest.approx(strict)
    assert tddr_reward(flags, LEVELS, "soft") == pytest.approx(soft)


def test_custom_level_scores_and_empty_levels():
    scores = [0.2, 0.3, 0.5]
    assert tddr_reward([True, True, False], [0, 1, 2], "strict", scores) == pytest.approx(0.5)
    assert tddr_reward([True, False, True], [0, 1, 2], "soft", scores) == pytest.approx(0.7)
    # Level 1 has no tests: the default scores split over the two levels that have tests, and the empty
    # level neither pays nor breaks the strict chain.
    assert tddr_reward([True, True], [0, 2], "strict") == pytest.approx(1.0)
    assert tddr_reward([True, False], [0, 2], "strict") == pytest.approx(0.5)
    assert tddr_reward([True, False], [0, 2], "soft") == pytest.approx(0.5)
    assert tddr_reward([True, True], [0, 2], "strict", scores) == pytest.approx(0.7)
    # Only hard tests (all level 2): failing them all earns nothing, passing them all earns 1.
    for mode in ("strict", "soft"):
        assert tddr_reward([False, False], [2, 2], mode) == 0.0
        assert tddr_reward([True, True], [2, 2], mode) == pytest.approx(1.0)
    assert tddr_reward([True, False], [2, 2], "soft") == pytest.approx(0.5)
    assert tddr_reward([], [], "soft") == 0.0


def test_bad_arguments():
    with pytest.raises(ThinkforgeError, match="mode"):
        tddr_reward([True], [0], "lenient")
    with pytest.raises(ThinkforgeError, match="2 pass flags but 1 levels"):
        tddr_reward([True, False], [0])
    with pytest.raises(ThinkforgeError, match="level_scores"):
        tddr_reward([True, True], [0, 2], "soft", [0.5, 0.5])
    with pytest.raises(ThinkforgeError, match="non-negative"):
        tddr_reward([True], [-1])


def test_rewards_real_sandbox_results():
    # An edge-case bug (empty list) passes the easy tests and fails the harder ones.
    code = "def f(xs):\n    return max(xs)\n"
    tests = [{"assert": "assert f([1, 3]) == 3", "level": 0}, {"assert": "assert f([2]) == 2", "level": 0},
             {"assert": "assert f([]) == 0", "level": 1}, {"assert": "assert f([-5, -2]) == -2", "level": 1}]
    passed = [r.passed for r in run_code(code, tests)]
    assert passed == [True, True, False, True]
    levels = [t["level"] for t in tests]
    assert tddr_reward(passed, levels, "strict") == pytest.approx(0.5)
    assert tddr_reward(passed, levels, "soft") == pytest.approx(0.75)
