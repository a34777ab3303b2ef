"""`code`: write a small Python function, checked by executing tests of graded difficulty.

Each problem comes from one of ten template families (affine map, clamp, threshold, max-or-default,
max-below, sum-above, count-in-range, count-divisible, first-above, count-char) with random parameters. Tests carry a `level`: 0 = typical inputs, 1 = edge cases
(empty list, zero, negatives, bounds), 2 = stress (large values / long inputs). A solution that
ignores the edge case passes level 0 but not level 1, which is what MiMo's Test-Difficulty-Driven
Reward grades. The teacher solution is a one-line plan plus a ```python block.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from thinkforge.tasks.arith import split_of
from thinkforge.tasks.base import Problem, Score, Task, register_task

CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Template:
    name: str
    difficulty: int
    params: Callable[[random.Random], dict]
    prompt: str
    plan: str
    code: str
    reference: Callable[..., object]  # the true function, given params, returns f
    inputs: Callable[[random.Random, dict], list[tuple[int, tuple]]]  # (level, args)


def _ints(rng: random.Random, n: int, lo: int = -9, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng: random.Random, n: int, alphabet: str = "abcdexyz") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _window(r: random.Random, lo_min: int, lo_max: int, width_max: int) -> dict:
    lo = r.randint(lo_min, lo_max)
    return {"lo": lo, "hi": lo + r.randint(0, width_max)}


# Each template's prompt states its edge case in words (empty-input default, inclusive bound, "at least" vs
# "greater than"); the level-1 tests probe exactly that case, so a program that gets the typical case right and
# the edge case wrong earns partial credit under TDDR and none under an all-tests reward. Parameter spaces are
# large (hundreds to tens of thousands of instances) so the held-out split holds well over 1000 problems.
TEMPLATES = [
    Template(
        "affine", 1, lambda r: {"a": r.randint(2, 20), "b": r.randint(0, 99)},
        "Write a Python function f(x) that returns {a} * x + {b}.",
        "Multiply x by {a} and add {b}.",
        "def f(x):\n    return {a} * x + {b}\n",
        lambda a, b: lambda x: a * x + b,
        lambda r, p: [(0, (r.randint(1, 20),)), (0, (r.randint(1, 20),)), (1, (0,)), (1, (-r.randint(1, 20),)),
                      (2, (10**9 + r.randint(0, 99),))],
    ),
    Template(
        "count_char", 1, lambda r: {"c": r.choice("abcdefghijklmnopqrstuvwxyz"), "d": r.choice([-1, 1]) * r.randint(1, 30)},
        "Write a Python function f(s) that returns how many times the character '{c}' appears in the string s, "
        "or {d} if s is empty.",
        "Return {d} for an empty string, else s.count('{c}').",
        "def f(s):\n    if not s:\n        return {d}\n    return s.count('{c}')\n",
        lambda c, d: lambda s: s.count(c) if s else d,
        lambda r, p: [(0, (_word(r, 8) + p["c"],)), (0, (_word(r, 6, "abcdexyz" + p["c"] * 3),)), (1, ("",)),
                      (1, (_word(r, 5, "".join(ch for ch in "mnopq" if ch != p["c"]) or "z"),)),
                      (2, (_word(r, 500, "abcdexyz" + p["c"]),))],
    ),
    Template(
        "clamp", 2, lambda r: (lambda lo: {"lo": lo, "hi": lo + r.randint(3, 60)})(r.randint(-50, 50)),
        "Write a Python function f(x) that returns x limited to the range [{lo}, {hi}].",
        "Take the max with {lo}, then the min with {hi}.",
        "def f(x):\n    return min(max(x, {lo}), {hi})\n",
        lambda lo, hi: lambda x: min(max(x, lo), hi),
        lambda r, p: [(0, (r.randint(p["lo"], p["hi"]),)), (0, (r.randint(p["lo"], p["hi"]),)),
                      (1, (p["lo"] - r.randint(1, 9),)), (1, (p["hi"] + r.randint(1, 9),)), (2, (-10**9,))],
    ),
    Template(
        "threshold", 2, lambda r: {"t": r.randint(-20, 20), "a": r.randint(2, 9), "b": r.randint(-50, 50)},
        "Write a Python function f(x) that returns {a} * x if x is at least {t}, and {b} otherwise.",
        "If x >= {t} return {a} * x, else return {b}.",
        "def f(x):\n    if x >= {t}:\n        return {a} * x\n    return {b}\n",
        lambda t, a, b: lambda x: a * x if x >= t else b,
        lambda r, p: [(0, (p["t"] + r.randint(2, 20),)), (0, (p["t"] - r.randint(2, 20),)), (1, (p["t"],)),
                      (1, (p["t"] - 1,)), (2, (10**9 + r.randint(0, 99),))],
    ),
    Template(
        "max_or_default", 2, lambda r: {"d": r.randint(-99, 99)},
        "Write a Python function f(xs) that returns the largest number in the list xs, or {d} if xs is empty.",
        "Return {d} for an empty list, else max(xs).",
        "def f(xs):\n    if not xs:\n        return {d}\n    return max(xs)\n",
        lambda d: lambda xs: max(xs) if xs else d,
        lambda r, p: [(0, (_ints(r, 5),)), (0, (_ints(r, 4),)), (1, ([],)), (1, (_ints(r, 3, -30, -1),)),
                      (2, (_ints(r, 300, -10**6, 10**6),))],
    ),
    Template(
        "max_below", 3, lambda r: {"k": r.randint(-10, 30), "d": r.randint(-99, 99)},
        "Write a Python function f(xs) that returns the largest number in the list xs that is less than {k}, "
        "or {d} if there is none.",
        "Keep the x in xs with x < {k}; return {d} if none are left, else their max.",
        "def f(xs):\n    ys = [x for x in xs if x < {k}]\n    if not ys:\n        return {d}\n    return max(ys)\n",
        lambda k, d: lambda xs: max([x for x in xs if x < k], default=d),
        lambda r, p: [(0, (_ints(r, 6, p["k"] - 15, p["k"] + 15) + [p["k"] - 3],)),
                      (0, (_ints(r, 5, p["k"] - 15, p["k"] + 15) + [p["k"] - 8],)),
                      (1, ([],)), (1, ([p["k"], p["k"] + 1, p["k"] + 7],)),
                      (2, (_ints(r, 300, -10**6, 10**6),))],
    ),
    Template(
        "sum_above", 3, lambda r: {"k": r.randint(-30, 30), **r.choice([{"op": "greater than", "sym": ">"},
                                                                   {"op": "at least", "sym": ">="}])},
        "Write a Python function f(xs) that returns the sum of the numbers in the list xs that are {op} {k}.",
        "Add up every x in xs with x {sym} {k}; an empty list gives 0.",
        "def f(xs):\n    total = 0\n    for x in xs:\n        if x {sym} {k}:\n            total += x\n    return total\n",
        lambda k, op, sym: lambda xs: sum(x for x in xs if (x > k if sym == ">" else x >= k)),
        lambda r, p: [(0, (_ints(r, 6, p["k"] - 20, p["k"] + 20),)), (0, (_ints(r, 5, p["k"] - 20, p["k"] + 20),)),
                      (1, ([],)), (1, ([p["k"], p["k"], p["k"] - 1, p["k"] + 1],)),
                      (2, (_ints(r, 400, -1000, 1000),))],
    ),
    Template(
        "count_in_range", 2, lambda r: _window(r, -40, 40, 40),
        "Write a Python function f(xs) that returns how many numbers in the list xs are between {lo} and {hi}, "
        "both included.",
        "Count the x in xs with {lo} <= x <= {hi}.",
        "def f(xs):\n    count = 0\n    for x in xs:\n        if {lo} <= x <= {hi}:\n            count += 1\n    return count\n",
        lambda lo, hi: lambda xs: sum(1 for x in xs if lo <= x <= hi),
        lambda r, p: [(0, (_ints(r, 6, p["lo"] - 10, p["hi"] + 10),)), (0, (_ints(r, 5, p["lo"] - 10, p["hi"] + 10),)),
                      (1, ([p["lo"], p["hi"], p["lo"] - 1, p["hi"] + 1],)), (1, ([],)),
                      (2, (_ints(r, 400, -1000, 1000),))],
    ),
    Template(
        "count_divisible", 3, lambda r: {"m": r.randint(2, 20)},
        "Write a Python function f(xs) that returns how many numbers in the list xs are divisible by {m}.",
        "Count the x in xs with x % {m} == 0.",
        "def f(xs):\n    count = 0\n    for x in xs:\n        if x % {m} == 0:\n            count += 1\n    return count\n",
        lambda m: lambda xs: sum(1 for x in xs if x % m == 0),
        lambda r, p: [(0, (_ints(r, 6, 1, 60) + [p["m"] * 2],)), (0, (_ints(r, 5, 1, 60),)), (1, ([],)),
                      (1, ([0, -p["m"], 1 - p["m"]],)), (2, (_ints(r, 400, -1000, 1000),))],
    ),
    Template(
        "first_above", 3, lambda r: {"k": r.randint(-20, 30), "d": r.randint(-20, 20)},
        "Write a Python function f(xs) that returns the index of the first number in the list xs that is "
        "greater than {k}, or {d} if there is none.",
        "Scan xs in order and return the index of the first x > {k}; return {d} after the loop.",
        "def f(xs):\n    for i, x in enumerate(xs):\n        if x > {k}:\n            return i\n    return {d}\n",
        lambda k, d: lambda xs: next((i for i, x in enumerate(xs) if x > k), d),
        lambda r, p: [(0, (_ints(r, 3, p["k"] - 20, p["k"]) + [p["k"] + r.randint(1, 9)] + _ints(r, 2, p["k"] - 20, p["k"] + 20),)),
                      (0, (_ints(r, 5, p["k"] - 20, p["k"]) + [p["k"] + r.randint(1, 9)],)),
                      (1, ([],)), (1, ([p["k"], p["k"] - 1],)),
                      (2, ([p["k"] - 1000] * 500 + [p["k"] + 1],))],
    ),
]


def make_tests(template: Template, params: dict, rng: random.Random) -> list[dict]:
    fn = template.reference(**params)
    return [{"assert": f"assert f({', '.join(map(repr, args))}) == {fn(*args)!r}", "level": level}
            for level, args in template.inputs(rng, params)]


def extract_code(response: str) -> str | None:
    """The last ```python block, else the response itself when it already looks like code."""
    blocks = CODE_BLOCK.findall(response)
    if blocks:
        return blocks[-1]
    return response if "def " in response else None


@register_task("code")
class CodeTask(Task):
    kind = "code"

    def problems(self, split: str = "heldout", n: int | None = None, seed: int = 0,
                 difficulty: int | None = None) -> list[Problem]:
        """`n` problems (distinct for held-out; train draws may repeat); templates of difficulty <= d (None = all)."""
        if split not in self.splits:
            raise ValueError(f"code has splits {self.splits}, not {split!r}")
        n = 100 if n is None else n
        pool = [t for t in TEMPLATES if difficulty is None or t.difficulty <= difficulty]
        rng = random.Random(f"code/{split}/{seed}/{difficulty}")
        seen: set[str] = set()
        misses = dict.fromkeys((t.name for t in pool), 0)
        out: list[Problem] = []
        while len(out) < n:
            # Templates have parameter spaces of different sizes; one whose split is exhausted leaves the pool.
            pool = [t for t in pool if misses[t.name] < 500]
            if not pool:
                raise ValueError(f"code: only {len(out)} distinct {split} problems exist at difficulty {difficulty}")
            template = rng.choice(pool)
            params = template.params(rng)
            key = f"{template.name}:{sorted(params.items())}"
            if split_of(key) != split or (split == "heldout" and key in seen):
                misses[template.name] += 1
                continue
            misses[template.name] = 0
            seen.add(key)
            code = template.code.format(**params)
            # Test inputs depend only on the problem, not on the draw order, so ids and tests stay stable.
            tests = make_tests(template, params, random.Random(key))
            out.append(Problem(
                id=f"code/{template.name}/{hashlib.sha1(key.encode()).hexdigest()[:12]}",
                task=self.name, prompt=template.prompt.format(**params), answer="",
                solution=f"{template.plan.format(**params)}\n```python\n{code}```",
                difficulty=template.difficulty, tests=tests,
                meta={"level": template.difficulty, "template": template.name, "entry_point": "f"},
            ))
        return out

    def score(self, problem: Problem, response: str) -> Score:
        from thinkforge.verify import run_code

        code = extract_code(response)
        if code is None:
            return Score(False, 0.0, "no_answer")
        results = run_code(code, problem.tests, timeout_s=5.0)
        passed = [r.passed for r in results]
        ok = bool(passed) and all(passed)
        statuses = sorted({r.status for r in results if not r.passed})
        reason = "correct" if ok else ("failed_tests" if statuses == ["failed"] else "+".join(statuses) or "failed_tests")
        return Score(ok, sum(passed) / max(len(passed), 1), reason, code,
                     details={"passed": passed, "levels": [t.get("level", 0) for t in problem.tests]})
