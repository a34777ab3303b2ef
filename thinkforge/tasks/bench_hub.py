"""Benchmarks loaded from the Hugging Face hub: GPQA-Diamond, LiveCodeBench, MMLU-Pro.

Each loads with the real `datasets` call; with no network (or, for gated GPQA, no accepted terms)
the loader raises a ThinkforgeError saying so. A local copy in the hub's format can be used instead:
`get_task` builds tasks without arguments, so the path comes from an environment variable,
`THINKFORGE_<TASK>_DATA_FILES` (a file or comma-separated files; .csv, .json/.jsonl or .parquet),
or from the constructor (`GpqaDiamond(data_files=...)`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import zlib
from datetime import date
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.tasks.base import Problem, Score, register_task
from thinkforge.tasks.benchmarks import BenchmarkTask, extract_code, require, score_tests

LETTERS = "ABCDEFGHIJ"


def local_load_call(name: str, data_files: str | list[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`datasets.load_dataset` arguments for local copies of a benchmark (a comma list or a list of paths/URLs);
    a missing file or an unknown format is a one-line error naming the benchmark."""
    files = [f for f in (data_files.split(",") if isinstance(data_files, str) else data_files) if f]
    missing = [f for f in files if "://" not in f and not os.path.exists(f)]
    if missing:
        raise ThinkforgeError(f"{name}: data file {missing[0]} not found")
    ext = files[0].rsplit(".", 1)[-1].lower()
    builder = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise ThinkforgeError(f"{name}: data file {files[0]} must be .csv, .json, .jsonl or .parquet")
    return (builder,), {"data_files": files, "split": "train"}


def load_rows(name: str, dataset: str, config: str | None, split: str, data_files: str | list[str] | None,
              hint: str = "") -> list[dict[str, Any]]:
    """Rows of a hub dataset, or of local files in the same format."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if data_files:
        args, kwargs = local_load_call(name, data_files)
    else:
        args = (dataset, config) if config else (dataset,)
        kwargs = {"split": split}
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
        where = f"data files {data_files}" if data_files else f"{dataset} from the Hugging Face hub"
        env = f"THINKFORGE_{name.upper()}_DATA_FILES"
        raise ThinkforgeError(f"{name}: cannot load {where} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                              f"{hint}; offline, point {env} at a local copy") from None
    return [dict(r) for r in ds]


class HubBenchmark(BenchmarkTask):
    dataset = ""
    config_name: str | None = None
    hub_split = "test"
    hint = ""

    def __init__(self, data_files: str | list[str] | None = None) -> None:
        self.data_files = data_files or os.environ.get(f"THINKFORGE_{self.name.upper()}_DATA_FILES") or None

    @property
    def source(self) -> str:  # type: ignore[override]
        if self.data_files:
            return f"local files {self.data_files}"
        return f"hf://{self.dataset}" + (f" ({self.config_name})" if self.config_name else "")

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        rows = load_rows(self.name, self.dataset, self.config_name, self.hub_split, self.data_files, self.hint)
        return [(f"{self.source} row {i}", r) for i, r in enumerate(rows, 1)]


def score_choice(problem: Problem, response: str) -> Score:
    from thinkforge.verify import choice_equal, extract_choice

    letter = extract_choice(response) if response else None
    if letter is None:
        return Score(False, 0.0, "no_answer")
    # A letter beyond the offered choices (e.g. "E" on a 4-choice question) is simply wrong.
    ok = letter in LETTERS[: len(problem.meta.get("choices", LETTERS))] and bool(choice_equal(letter, problem.answer))
    return Score(ok, float(ok), "correct" if ok else "wrong_answer", letter)


def choice_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return (f"{question.strip()}\n\n{options}\n\nPlease reason step by step, and put the letter of your final "
            f"answer ({LETTERS[0]}-{LETTERS[len(choices) - 1]}) within \\boxed{{}}.")


@register_task("gpqa_diamond")
class GpqaDiamond(HubBenchmark):
    """GPQA-Diamond (Rein et al. 2023): 198 graduate-level science questions, 4 choices."""

    kind = "choice"
    dataset, config_name, hub_split = "Idavidrein/gpqa", "gpqa_diamond", "train"
    hint = " (GPQA is gated: accept its terms on the hub and set HF_TOKEN)"

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            q = str(require(r, "Question", where))
            correct = str(require(r, "Correct Answer", where)).strip()
            wrong = [str(require(r, f"Incorrect Answer {i}", where)).strip() for i in (1, 2, 3)]
            rid = str(require(r, "Record ID", where))
            # The gold answer is always first in the source; the shuffle is seeded by the record id so
            # the letter of every problem is the same on every machine and run.
            choices = [correct, *wrong]
            random.Random(f"gpqa_diamond/{rid}").shuffle(choices)
            gold = LETTERS[choices.index(correct)]
            out.append(Problem(
                id=f"gpqa_diamond/{rid}", task=self.name, prompt=choice_prompt(q, choices), answer=gold,
                solution=f"{r.get('Explanation') or ''}\n\nThe answer is $\\boxed{{{gold}}}$.".lstrip(),
                meta={"choices": choices, "subject": r.get("Subdomain") or "", "domain": r.get("High-level domain") or "",
                      "question": q, "source_id": rid},
            ))
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_choice(problem, response)


@register_task("mmlu_pro")
class MmluPro(HubBenchmark):
    """MMLU-Pro (Wang et al. 2024): 12k questions over 14 subjects, up to 10 choices (A-J)."""

    kind = "choice"
    dataset, hub_split = "TIGER-Lab/MMLU-Pro", "test"

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            q = str(require(r, "question", where))
            # Options are kept as given: dropping one would shift every later letter off its gold answer.
            options = [str(o) for o in require(r, "options", where)]
            gold = str(require(r, "answer", where)).strip().upper()
            if not options or gold not in LETTERS[: len(options)]:
                raise ThinkforgeError(f"{where}: field 'answer' {gold!r} is not one of the {len(options)} options")
            index = r.get("answer_index")
            if index is not None and LETTERS[int(index)] != gold:
                raise ThinkforgeError(f"{where}: field 'answer' {gold!r} disagrees with answer_index {index}")
            qid = str(require(r, "question_id", where))
            out.append(Problem(
                id=f"mmlu_pro/{qid}", task=self.name, prompt=choice_prompt(q, options), answer=gold,
                solution=f"{r.get('cot_content') or ''}\n\nThe answer is $\\boxed{{{gold}}}$.".lstrip(),
                meta={"choices": options, "subject": r.get("category") or "", "question": q, "source_id": qid},
            ))
        return out

    def score(self, problem: Problem, response: str) -> Score:
        return score_choice(problem, response)


# --------------------------------------------------------------------------- LiveCodeBench

LCB_FILES = {f"release_v{i}": [f"test{'' if j == 1 else j}.jsonl" for j in range(1, i + 1)] for i in range(1, 7)}
LCB_FILES["release_latest"] = LCB_FILES["release_v6"]

LCB_SYSTEM = ("You are an expert Python programmer. You will be given a question (problem specification) and "
              "will generate a correct Python program that matches the specification and passes all tests.")
LCB_WITH_STARTER = ("### Question\n\n{question}\n\n### Format\n\nUse the following starter code to write the "
                    "solution and enclose your code within delimiters.\n\n```python\n{starter}\n```\n\n"
                    "### Answer (use the provided format with backticks)\n\n")
LCB_STDIN = ("### Question\n\n{question}\n\n### Format\n\nRead the inputs from stdin, solve the problem and write "
             "the answer to stdout (do not directly test on the sample inputs). Enclose your code within "
             "delimiters as follows.\n\n```python\n# YOUR CODE HERE\n```\n\n"
             "### Answer (use the provided format with backticks)\n\n")
# LeetCode-style solutions assume these names are in scope, as LiveCodeBench's own runner does.
LCB_HEADER = ("from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
              "from heapq import *\nfrom bisect import *\nfrom math import *\nimport collections, heapq, itertools, "
              "math, bisect, functools, string, re, sys\n")


class _BasicTypesUnpickler(pickle.Unpickler):
    """Unpickles plain data only. The private tests of LiveCodeBench are stored as
    base64(zlib(pickle(json string))). Pickle can import and call any object, so a tampered file
    could run code on load; refusing every global (`find_class`) leaves only the opcodes that build
    str/bytes/int/float/list/tuple/dict/set/None/bool, which cannot execute anything."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only basic types are allowed")


def decode_tests(raw: Any, where: str) -> list[dict[str, Any]]:
    """LiveCodeBench test lists: JSON (public tests) or base64+zlib+pickle of JSON (private tests)."""
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        payload = _BasicTypesUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(raw)))).load()
        return json.loads(payload) if isinstance(payload, str | bytes) else payload
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as err:
        raise ThinkforgeError(f"{where}: cannot decode test cases ({err})") from None


def lcb_tests(cases: list[dict[str, Any]], func_name: str | None, where: str) -> list[dict[str, Any]]:
    tests = []
    for case in cases:
        inp, expected = str(case.get("input", "")), str(case.get("output", ""))
        if case.get("testtype", "stdin") == "functional":
            if not func_name:
                raise ThinkforgeError(f"{where}: functional test without metadata.func_name")
            # Inputs are one JSON value per line (the arguments); the output is one JSON value.
            tests.append({"assert": (
                "import json as _json\n"
                f"_args = [_json.loads(_l) for _l in {inp!r}.split('\\n') if _l.strip()]\n"
                f"_got = Solution().{func_name}(*_args)\n"
                f"_want = _json.loads({expected!r})\n"
                "assert _got == _want or (isinstance(_got, tuple) and list(_got) == _want), (_got, _want)"
            )})
        else:
            tests.append({"stdin": inp, "stdout": expected})
    return tests


@register_task("livecodebench")
class LiveCodeBench(HubBenchmark):
    """LiveCodeBench code generation (Jain et al. 2024), `code_generation_lite`, filtered by date.

    Release files are read directly (`hf://datasets/...`): the hub repo's loading script is not run
    by `datasets` >= 4. Window: THINKFORGE_LIVECODEBENCH_RELEASE (default release_v5) and
    THINKFORGE_LIVECODEBENCH_START / _END (ISO dates, inclusive), or constructor arguments.
    """

    kind = "code"
    dataset = "livecodebench/code_generation_lite"
    timeout_s = 10.0

    def __init__(self, data_files: str | list[str] | None = None, release: str | None = None,
                 start_date: str | None = None, end_date: str | None = None) -> None:
        super().__init__(data_files)
        env = os.environ.get
        self.release = release or env("THINKFORGE_LIVECODEBENCH_RELEASE") or "release_v5"
        if self.release not in LCB_FILES:
            raise ThinkforgeError(f"livecodebench: unknown release {self.release!r}; known: {', '.join(LCB_FILES)}")
        self.start = self._date(start_date or env("THINKFORGE_LIVECODEBENCH_START"), "start")
        self.end = self._date(end_date or env("THINKFORGE_LIVECODEBENCH_END"), "end")
        if not self.data_files:
            self.data_files = [f"hf://datasets/{self.dataset}/{f}" for f in LCB_FILES[self.release]]

    @staticmethod
    def _date(value: str | None, which: str) -> date | None:
        if not value:
            return None
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            raise ThinkforgeError(f"livecodebench: {which} date {value!r} is not YYYY-MM-DD") from None

    @property
    def source(self) -> str:  # type: ignore[override]
        return f"{self.data_files} ({self.release}, {self.start or '...'} to {self.end or '...'})"

    def load(self) -> list[Problem]:
        out = []
        for where, r in self.rows():
            day = date.fromisoformat(str(require(r, "contest_date", where))[:10])
            if (self.start and day < self.start) or (self.end and day > self.end):
                continue
            meta_raw = r.get("metadata") or "{}"
            meta = json.loads(meta_raw) if isinstance(meta_raw, str) else dict(meta_raw)
            func = meta.get("func_name")
            cases = decode_tests(r.get("public_test_cases"), where) + decode_tests(r.get("private_test_cases"), where)
            if not cases:
                raise ThinkforgeError(f"{where}: no test cases")
            q = str(require(r, "question_content", where))
            starter = str(r.get("starter_code") or "")
            prompt = (LCB_WITH_STARTER.format(question=q, starter=starter) if starter.strip()
                      else LCB_STDIN.format(question=q))
            qid = str(require(r, "question_id", where))
            out.append(Problem(
                id=f"livecodebench/{qid}", task=self.name, prompt=prompt, tests=lcb_tests(cases, func, where),
                meta={"difficulty": r.get("difficulty") or "", "platform": r.get("platform") or "",
                      "contest_date": day.isoformat(), "func_name": func, "question": q, "source_id": qid},
            ))
        if not out:
            raise ThinkforgeError(f"livecodebench: no problems in {self.source}")
        return out

    def messages(self, problem: Problem, system_prompt: str | None = None) -> list[dict[str, str]]:
        system = system_prompt if system_prompt is not None else LCB_SYSTEM
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": problem.prompt}]

    def score(self, problem: Problem, response: str) -> Score:
        code = extract_code(response) if response else None
        return score_tests(problem, code, self.timeout_s, prefix=LCB_HEADER)
