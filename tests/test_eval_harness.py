"""The harness plumbing: generation through a Backend, resume, identical summaries, bad input.

The backend here is a scripted `Backend` subclass (the contract is all the harness sees); the real
engines are exercised in test_eval_models.py.
"""

from __future__ import annotations

import json
import re

import pytest

from thinkforge.engine.base import Backend, Completion, SamplingParams
from thinkforge.errors import ThinkforgeError
from thinkforge.eval import evaluate, score_responses
from thinkforge.tasks.base import Problem, Score, Task


class EchoTask(Task):
    """Problems "say N"; a response is correct iff it ends with "answer: N"."""

    name = "echo"
    kind = "math"

    def problems(self, split="heldout", n=None, seed=0, difficulty=None):
        return [Problem(id=f"echo/{i}", task="echo", prompt=f"say {i}", answer=str(i),
                        meta={"level": 1 + i % 2}) for i in range(n or 6)]

    def score(self, problem: Problem, response: str) -> Score:
        m = re.search(r"answer: (\d+)$", response)
        if not m:
            return Score(False, 0.0, "no_answer")
        ok = m.group(1) == problem.answer
        return Score(ok, float(ok), "correct" if ok else "wrong_answer", m.group(1))


class ScriptedBackend(Backend):
    """Sample j of "say N" answers N when (N + j) is even, else N + 1; "say 5" gets empty text and is truncated."""

    name = "scripted"

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[int, int]] = []  # (prompts, n) per call
        self.fail_after = fail_after
        self.seen = 0

    def generate(self, prompts, params):
        raise NotImplementedError

    def chat(self, conversations, params):
        self.calls.append((len(conversations), params.n))
        out = []
        for conv in conversations:
            if self.fail_after is not None and self.seen >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            self.seen += 1
            n = int(conv[-1]["content"].split()[-1])
            comps = []
            for j in range(params.n):
                if n == 5:
                    comps.append(Completion(text="", token_ids=[1] * params.max_tokens, finish_reason="length"))
                    continue
                ans = n if (n + j) % 2 == 0 else n + 1
                text = f"thinking about {n}... answer: {ans}"
                comps.append(Completion(text=text, token_ids=list(range(len(text.split()))), finish_reason="stop"))
            out.append(comps)
        return out


PARAMS = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=16, n=4)


def test_evaluate_metrics_and_files(tmp_path):
    summary = evaluate(EchoTask(), ScriptedBackend(), PARAMS, output_dir=tmp_path, seed=3)
    # Problems 0-4 get 2 of 4 samples right, problem 5 none: avg@4 = (5 * 0.5) / 6.
    assert summary["accuracy"] == pytest.approx(5 * 0.5 / 6, abs=1e-6)
    # pass@1 equals avg@n; pass@4 = 5/6 (every answered problem has a correct sample).
    assert summary["pass_at_k"]["1"] == pytest.approx(summary["accuracy"], abs=1e-6)
    assert summary["pass_at_k"]["4"] == pytest.approx(5 / 6, abs=1e-6)
    # pass@2 for n=4, c=2: 1 - C(2,2)/C(4,2) = 5/6.
    assert summary["pass_at_k"]["2"] == pytest.approx(5 / 6 * 5 / 6, abs=1e-6)
    assert summary["n_samples"] == 4 and summary["n_problems"] == 6 and summary["n_responses"] == 24
    assert summary["truncation_rate"] == pytest.approx(4 / 24, abs=1e-6)
    assert summary["reasons"] == {"correct": 10, "no_answer": 4, "wrong_answer": 10}
    assert set(summary["breakdown"]["level"]) == {"1", "2"}
    assert summary["seed"] == 3 and len(summary["config_hash"]) == 16 and "torch" in summary["versions"]
    on_disk = json.loads((tmp_path / "echo" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    rows = [json.loads(line) for line in (tmp_path / "echo" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    empty = [r for r in rows if r["problem_id"] == "echo/5"]
    assert all(r["reason"] == "no_answer" and r["correct"] is False and r["finish_reason"] == "length"
               for r in empty)
    good = next(r for r in rows if r["problem_id"] == "echo/0" and r["sample_index"] == 0)
    assert good["extracted"] == "0" and good["correct"] is True and good["reward"] == 1.0


def test_resume_generates_only_missing_samples(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        evaluate(EchoTask(), ScriptedBackend(fail_after=2), PARAMS, output_dir=tmp_path, batch_size=2)
    assert len((tmp_path / "echo" / "samples.jsonl").read_text().splitlines()) == 8  # one batch of 2 x 4
    # Simulate a kill in the middle of a write: a torn last line must not poison the file.
    with open(tmp_path / "echo" / "samples.jsonl", "a") as f:
        f.write('{"problem_id": "echo/2", "sample_in')
    backend = ScriptedBackend()
    resumed = evaluate(EchoTask(), backend, PARAMS, output_dir=tmp_path, batch_size=2)
    assert sum(p for p, _ in backend.calls) == 4  # only the 4 unfinished problems were generated
    fresh = evaluate(EchoTask(), ScriptedBackend(), PARAMS, output_dir=tmp_path / "fresh")
    assert resumed["accuracy"] == fresh["accuracy"] and resumed["pass_at_k"] == fresh["pass_at_k"]
    # Growing n resumes too: only samples 4..5 are generated.
    backend = ScriptedBackend()
    more = evaluate(EchoTask(), backend, SamplingParams(temperature=0.6, top_p=0.95, max_tokens=16, n=6),
                    output_dir=tmp_path)
    assert backend.calls == [(6, 2)] and more["n_samples"] == 6
    # Other sampling settings must not be mixed into the same samples file.
    with pytest.raises(ThinkforgeError, match="temperature"):
        evaluate(EchoTask(), ScriptedBackend(), SamplingParams(temperature=1.0, n=4), output_dir=tmp_path)


def test_same_responses_identical_summary(tmp_path):
    evaluate(EchoTask(), ScriptedBackend(), PARAMS, output_dir=tmp_path / "a", seed=1)
    evaluate(EchoTask(), ScriptedBackend(), PARAMS, output_dir=tmp_path / "b", seed=1)
    assert (tmp_path / "a/echo/summary.json").read_bytes() == (tmp_path / "b/echo/summary.json").read_bytes()
    # A rerun over finished samples generates nothing and rewrites the same summary.
    backend = ScriptedBackend()
    evaluate(EchoTask(), backend, PARAMS, output_dir=tmp_path / "a", seed=1)
    assert backend.calls == []
    assert (tmp_path / "a/echo/summary.json").read_bytes() == (tmp_path / "b/echo/summary.json").read_bytes()


def test_rescore_responses_and_bad_rows(tmp_path):
    task = EchoTask()
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"problem_id": "echo/1", "response": "answer: 1"},
        {"problem_id": "echo/1", "response": "answer: 7"},
        {"problem_id": "echo/2", "response": ""},
    ]) + "\n")
    s1 = score_responses(task, good, output_dir=tmp_path / "r1")
    assert s1["n_problems"] == 2 and s1["accuracy"] == pytest.approx(0.25)
    assert s1["reasons"] == {"correct": 1, "no_answer": 1, "wrong_answer": 1}
    s2 = score_responses(task, good, output_dir=tmp_path / "r2")
    assert (tmp_path / "r1/echo/summary.json").read_bytes() == (tmp_path / "r2/echo/summary.json").read_bytes()
    assert s1 == s2
    whole = score_responses(task, good, all_problems=True)
    assert whole["n_problems"] == 6 and whole["accuracy"] == pytest.approx(0.5 / 6, abs=1e-6)

    cases = {
        '{"problem_id": "echo/1"}': r"bad.jsonl:2: missing field 'response'",
        '{"response": "x"}': r"bad.jsonl:2: missing field 'problem_id'",
        '{"problem_id": "nope/9", "response": "x"}': r"bad.jsonl:2: unknown problem_id 'nope/9'",
        '{"problem_id": "echo/1", "response": 3}': r"bad.jsonl:2: field 'response' must be a string",
        "not json": r"bad.jsonl:2: invalid JSON",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"problem_id": "echo/1", "response": "answer: 1"}\n' + line + "\n")
        with pytest.raises(ThinkforgeError, match=message):
            score_responses(task, bad)


def test_backend_returning_wrong_count_is_an_error():
    class Short(ScriptedBackend):
        def chat(self, conversations, params):
            return super().chat(conversations, params)[:-1]

    with pytest.raises(ThinkforgeError, match="returned"):
        evaluate(EchoTask(), Short(), PARAMS)


class GsmBackend(Backend):
    """Answers each GSM8K prompt with its gold number in four shapes: boxed, "The answer is N.", and two cut off
    by max_tokens (one ending in the gold number, one with a complete "The answer is N." line before the cut)."""

    name = "gsm-shapes"

    def __init__(self, gold: dict[str, str]):
        self.gold = gold

    def generate(self, prompts, params):
        raise NotImplementedError

    def chat(self, conversations, params):
        out = []
        for conv in conversations:
            n = self.gold[conv[-1]["content"]]
            texts = [(f"So it is \\boxed{{{n}}}.", "stop"), (f"Adding up gives {n}. The answer is {n}.", "stop"),
                     (f"Adding up step by step: 3 + 4 = 7, then {n}", "length"),
                     (f"The answer is {n}.\nLet me double-check this by adding", "length")]
            out.append([Completion(text=t, token_ids=[1] * 4, finish_reason=f) for t, f in texts[:params.n]])
        return out


def test_generation_grades_strict_and_flexible_and_counts_truncation(tmp_path):
    from thinkforge.tasks.base import get_task

    task = get_task("gsm8k")
    problems = task.problems(n=3, seed=0)
    backend = GsmBackend({p.prompt: p.answer for p in problems})
    s = evaluate(task, backend, SamplingParams(temperature=0.6, max_tokens=4, n=4), problems=problems,
                 output_dir=tmp_path)
    # Strict: the boxed sample. Flexible adds "The answer is N." twice; the sample ending in a bare number at
    # the cut is not graded from that number.
    assert s["accuracy"] == pytest.approx(0.25) and s["accuracy_flexible"] == pytest.approx(0.75)
    assert s["n_truncated"] == 6 and s["truncation_rate"] == pytest.approx(0.5)
    assert s["no_answer_rate"] == pytest.approx(0.75) and s["no_answer_rate_flexible"] == pytest.approx(0.25)
    rows = [json.loads(x) for x in (tmp_path / "gsm8k/samples.jsonl").read_text().splitlines()]
    assert [r["truncated"] for r in rows[:4]] == [False, False, True, True]
    assert [r["extracted_by"] for r in rows[:4]] == ["boxed", "the answer is", None, "the answer is"]
    # Samples written before flexible grading existed (a resumed run) are graded flexibly when summarised.
    old_rows = [{k: v for k, v in r.items() if not k.endswith("_flexible") and k != "extracted_by"} for r in rows]
    (tmp_path / "gsm8k/samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    again = evaluate(task, backend, SamplingParams(temperature=0.6, max_tokens=4, n=4), problems=problems,
                     output_dir=tmp_path)
    assert again["accuracy_flexible"] == pytest.approx(0.75) and again["maj_at_k_flexible"] == s["maj_at_k_flexible"]
