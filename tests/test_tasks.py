import re

import pytest

from thinkforge.errors import UnknownNameError
from thinkforge.tasks import TASKS, get_task


def test_registry_lists_synthetic_tasks_and_rejects_unknown():
    assert {"arith", "code"} <= set(TASKS)
    with pytest.raises(UnknownNameError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("name", ["arith", "code"])
def test_splits_are_deterministic_and_disjoint(name):
    task = get_task(name)
    a = task.problems("heldout", n=60, seed=3)
    b = task.problems("heldout", n=60, seed=3)
    assert [p.id for p in a] == [p.id for p in b]
    assert len({p.id for p in a}) == 60  # held-out problems are distinct
    train = task.problems("train", n=600, seed=3)
    assert not {p.id for p in train} & {p.id for p in task.problems("heldout", n=100, seed=0)}
    assert task.problems("heldout", n=20, seed=4)[0].id != a[0].id  # the seed matters


def test_arith_teacher_solution_is_step_by_step_and_correct():
    task = get_task("arith")
    for level in (1, 2, 3, 4):
        for p in task.problems("train", n=30, seed=1, difficulty=level):
            steps = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", p.solution, re.M)
            assert len(steps) == level == p.difficulty
            for a, op, b, r in steps:
                assert eval(f"{a} {op} {b}") == int(r)
            assert p.solution.endswith(f"\\boxed{{{p.answer}}}.")
            assert eval(p.prompt.removeprefix("Compute ").rstrip(".")) == int(p.answer)


def test_arith_scoring():
    task = get_task("arith")
    p = task.problems("heldout", n=1)[0]
    assert task.score(p, p.solution).correct
    assert task.score(p, f"so \\boxed{{{int(p.answer) + 1}}}").reason == "wrong_answer"
    assert task.score(p, p.answer).reason == "no_answer"  # the answer must be boxed


def test_code_tests_are_graded_and_teacher_passes_them():
    task = get_task("code")
    problems = task.problems("heldout", n=12, seed=0)
    assert len({p.meta["template"] for p in problems}) >= 4
    for p in problems:
        assert {t["level"] for t in p.tests} == {0, 1, 2}
        score = task.score(p, p.solution)
        assert score.correct, (p.id, score)
        assert score.reward == 1.0


def test_code_edge_case_bug_fails_only_harder_tests():
    task = get_task("code")
    p = next(p for p in task.problems("heldout", n=60) if p.meta["template"] == "max_or_default")
    buggy = "```python\ndef f(xs):\n    return max(xs)\n```"
    score = task.score(p, buggy)
    assert not score.correct
    levels = dict(zip(range(len(p.tests)), score.details["levels"], strict=True))
    passed_levels = {levels[i] for i, ok in enumerate(score.details["passed"]) if ok}
    failed_levels = {levels[i] for i, ok in enumerate(score.details["passed"]) if not ok}
    assert 0 in passed_levels and 1 in failed_levels
    assert 0 < score.reward < 1
    assert task.score(p, "I don't know").reason == "no_answer"


def test_code_heldout_has_1000_distinct_problems_over_all_templates():
    from thinkforge.tasks.code import TEMPLATES

    task = get_task("code")
    held = task.problems("heldout", n=1000, seed=0)
    assert len({p.id for p in held}) == len({p.prompt for p in held}) == 1000
    assert {p.meta["template"] for p in held} == {t.name for t in TEMPLATES}
    assert not {p.id for p in held} & {p.id for p in task.problems("train", n=3000, seed=0)}


@pytest.mark.parametrize(("template", "buggy"), [
    ("count_in_range", "def f(xs):\n    return sum(1 for x in xs if {lo} < x < {hi})\n"),  # exclusive bounds
    ("threshold", "def f(x):\n    return {a} * x if x > {t} else {b}\n"),  # off by one at x == t
    ("first_above", "def f(xs):\n    for i, x in enumerate(xs):\n        if x > {k}:\n            return i\n"),
])
def test_code_off_by_one_and_default_bugs_pass_typical_tests_only(template, buggy):
    task = get_task("code")
    p = next(p for p in task.problems("heldout", n=200) if p.meta["template"] == template)
    assert task.score(p, p.solution).correct
    nums = [int(x) for x in re.findall(r"-?\d+", p.prompt)]  # the template's parameters, in prompt order
    names = {"count_in_range": ("lo", "hi"), "threshold": ("a", "t", "b"), "first_above": ("k", "d")}[template]
    score = task.score(p, "```python\n" + buggy.format(**dict(zip(names, nums, strict=True))) + "```")
    by_level: dict[int, list[bool]] = {}
    for ok, level in zip(score.details["passed"], score.details["levels"], strict=True):
        by_level.setdefault(level, []).append(ok)
    assert all(by_level[0]) and not all(by_level[1]) and not score.correct
