"""Final-answer extraction from realistic response shapes: strict (the prompt's `\\boxed{}` and the benchmark's
own marker) and flexible (also "The answer is", "A:", and for numeric benchmarks the last number), truncation,
and grading through the real benchmark tasks and `thinkforge eval --responses`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from thinkforge.eval.harness import grade_response, score_responses
from thinkforge.tasks.base import Problem, get_task
from thinkforge.tasks.benchmarks import DATA_DIR, read_rows, score_math
from thinkforge.verify.grader import BOXED_ONLY, extract_answer, extract_boxed

GSM8K = get_task("gsm8k")
MATH500 = get_task("math500")

# Janet's ducks (gsm8k/0, gold 18), as models write it.
DUCKS = "Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 remain.\nShe sells 9 * $2 = $18."
MINERVA = ("We have $P = \\frac{3}{6}$, which simplifies.\nFinal Answer: The final answer is $\\frac{1}{2}$. "
           "I hope it is correct.")

# (response, truncated, strict answer, flexible answer, how flexible found it)
GSM8K_SHAPES = [
    (f"{DUCKS}\n#### 18", False, "18", "18", "#### N"),
    ("The total is 1,000 + 234 = 1,234 dollars.\n#### 1,234", False, "1234", "1234", "#### N"),
    ("Costs are $1,200 and $34.\n#### $1,234.50", False, "1234.50", "1234.50", "#### N"),
    (f"{DUCKS}\nThe answer is $18$.", False, None, "18", "the answer is"),
    (f"{DUCKS} The answer is 18.", False, None, "18", "the answer is"),
    ("Q: How much does Janet make?\nA: 18", False, None, "18", "Answer: / A: (line start)"),
    (f"{DUCKS}\n\n**Final Answer:** $18", False, None, "18", "final answer is / Final Answer:"),
    ("She makes 9 * 2 dollars. The answer is:\n\n\\[ 18 \\]\n", False, None, "18", "the answer is"),
    ("The answer is 20 - 2 = 18 dollars", False, None, "18", "the answer is"),
    # Boxed wins, wherever it is, over trailing text; of several boxes the last one.
    (f"{DUCKS} So she makes $\\boxed{{18}}$ dollars a day. Let me double-check: 9 * 2 = 18. Yes.",
     False, "18", "18", "boxed"),
    ("First guess \\boxed{16}; no, she eats 3 and bakes 4, so \\boxed{18}.", False, "18", "18", "boxed"),
    # A few-shot base model runs on into a question of its own: GSM8K's marker takes the first answer.
    (f"{DUCKS}\n#### 18\n\nQuestion: Tom has 5 apples and eats 2. How many are left?\nAnswer: 5 - 2 = 3\n#### 3",
     False, "18", "18", "#### N"),
    # No marker at all: the last number (lm-evaluation-harness flexible-extract, Qwen2.5-Math's fallback).
    (f"{DUCKS}", False, None, "18", "last number"),
    ("A: Janet keeps 16 - 3 - 4 = 9 eggs and sells them at 2 each, so she makes 18", False, None, "18",
     "last number"),
    # Cut off by the length limit: never graded from a stray number, nor from an answer that runs into the cut.
    ("She has 16 - 3 - 4 = 9 eggs left, and 9 * 2 = 1", True, None, None, None),
    (f"{DUCKS}\n#### 1", True, None, None, None),
    (f"{DUCKS}\nThe answer is 18.\nLet me double-check that by", True, None, "18", "the answer is"),
    (f"{DUCKS}\nSo the answer is $\\boxed{{18}}$ and to verify", True, "18", "18", "boxed"),
    ("I am not sure how to solve this problem.", False, None, None, None),
    ("Janet has several ducks and she sells eggs.", False, None, None, None),
]


@pytest.mark.parametrize("response,truncated,strict,flexible,how", GSM8K_SHAPES)
def test_gsm8k_shapes(response, truncated, strict, flexible, how):
    fmt = GSM8K.answer_format
    assert extract_answer(response, fmt, truncated=truncated)[0] == strict
    assert extract_answer(response, fmt, flexible=True, truncated=truncated) == (flexible, how)


@pytest.mark.parametrize("response,strict,flexible", [
    (MINERVA, "\\frac{1}{2}", "\\frac{1}{2}"),
    ("So the domain is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
     "[2,5)", "[2,5)"),
    ("Hence $x = 3$.\nFinal Answer: The final answer is 3", "3", "3"),
    ("$54(\\$0.15)+27(\\$0.40)=\\$18.90$.\nFinal Answer: The final answer is $\\$18.90$. I hope it is correct.",
     "\\$18.90", "\\$18.90"),  # an escaped dollar is content, not the end of the math
    ("The answer is $\\left( 3, \\frac{\\pi}{2} \\right)$.", None, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    # MATH-500's answers are expressions: no last-number fallback.
    ("We get x = 4 after simplifying 2x = 8", None, None),
])
def test_math500_shapes(response, strict, flexible):
    fmt = MATH500.answer_format
    assert extract_answer(response, fmt)[0] == strict
    assert extract_answer(response, fmt, flexible=True)[0] == flexible


@pytest.mark.parametrize("text", [
    "so \\boxed{\\frac{1}{2}} and", "first \\boxed{1} then \\boxed{2}", "\\fbox{x^{2}+1}", "The answer is $\\boxed 5$.",
    "\\boxed{ok} then \\boxed{unclosed", "no box here", "The answer is 7. #### 7", "\\boxed{}", "",
])
def test_boxed_only_is_extract_boxed(text):
    # The RL reward reads answers with extract_boxed: the default format must give it exactly.
    assert extract_answer(text, BOXED_ONLY, flexible=True)[0] == (extract_boxed(text) or None)


def test_grading_through_the_benchmarks():
    ducks = next(p for p in GSM8K.problems() if p.id == "gsm8k/0")
    for response, truncated, strict, flexible, _ in GSM8K_SHAPES:
        s, f = grade_response(GSM8K, ducks, response, truncated)
        assert s.correct is (strict == "18") and (s.reason == "no_answer") is (strict is None), response
        assert f.correct is (flexible == "18") and (f.reason == "no_answer") is (flexible is None), response
    # The headline is what the task's own score says (strict), and a wrong flexible answer is wrong.
    assert GSM8K.score(ducks, f"{DUCKS}\n#### 18").correct
    s, f = grade_response(GSM8K, ducks, "The answer is 19.")
    assert s.reason == "no_answer" and f.reason == "wrong_answer" and f.extracted == "19"
    half = Problem(id="math500/x", task="math500", prompt="", answer="\\frac{1}{2}")
    s, f = grade_response(MATH500, half, MINERVA)
    assert s.correct and f.correct and s.details["extracted_by"].startswith("Final Answer:")
    s, f = grade_response(MATH500, half, "Thus the probability is 0.5, i.e. the answer is $\\frac{1}{2}$.")
    assert s.reason == "no_answer" and f.correct
    # Code and multiple-choice tasks have one rule: no separate flexible score.
    one = Problem(id="arith/x", task="arith", prompt="", answer="1")
    assert grade_response(get_task("arith"), one, "\\boxed{1}")[1] is None


def test_boxed_scores_unchanged_for_the_rl_reward():
    problem = Problem(id="p", task="t", prompt="", answer="\\frac{1}{2}")
    for response in ("\\boxed{\\frac{2}{4}}", "so \\boxed{0.5}.", "\\boxed{1/3}", "\\boxed{}", "The answer is 1/2."):
        boxed = extract_boxed(response)
        score = score_math(problem, response)  # the default: boxed only
        assert score.extracted == (boxed or None)
        assert score.reason == ("no_answer" if not boxed else "correct" if boxed != "1/3" else "wrong_answer")


def test_eval_responses_end_to_end(tmp_path):
    """`thinkforge eval --task gsm8k --responses` through the real command line, then `thinkforge report`."""
    problems = {p.id: p for p in GSM8K.problems()[:6]}
    rows = [
        {"problem_id": "gsm8k/0", "response": f"{DUCKS}\n#### 18"},
        {"problem_id": "gsm8k/0", "response": f"{DUCKS}\nThe answer is $18$."},
        {"problem_id": "gsm8k/1", "response": "It takes 2/2 = 1 bolt of white fiber, so 2 + 1 = 3.\nA: 3"},
        {"problem_id": "gsm8k/1", "response": "It takes 2 + 1 = 3 bolts, and 3 * 1 = 3", "finish_reason": "length"},
        {"problem_id": "gsm8k/2", "response": "He made \\boxed{70000} dollars of profit.", "finish_reason": "stop"},
        {"problem_id": "gsm8k/2", "response": "The answer is 70,000.", "truncated": False},
        {"problem_id": "gsm8k/3", "response": "He runs 3 * 3 = 9 sprints of 60 meters: 540 meters.", "truncated": True},
        {"problem_id": "gsm8k/3", "response": "I cannot tell."},
    ]
    assert all(r["problem_id"] in problems for r in rows)
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", "eval", "--task", "gsm8k", "--responses", str(path),
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "gsm8k/summary.json").read_text())
    # Strict: 0 ("####"), 4 (boxed). Flexible adds 1 ("The answer is $18$."), 2 ("A: 3"), 5 ("70,000");
    # the truncated 3 and 6 get no last-number fallback, and 7 has no answer at all.
    assert s["accuracy"] == s["accuracy_strict"] == pytest.approx((0.5 + 0 + 0.5 + 0) / 4)
    assert s["accuracy_flexible"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert s["no_answer_rate"] == pytest.approx(6 / 8) and s["no_answer_rate_flexible"] == pytest.approx(3 / 8)
    assert s["n_truncated"] == 2 and s["truncation_rate"] == pytest.approx(2 / 4)  # 4 rows say how they ended
    assert s["maj_at_k"]["2"] == pytest.approx(2 / 4) and s["maj_at_k_flexible"]["2"] == pytest.approx(3 / 4)
    assert s["grading"]["headline"] == "strict" and s["grading"]["strict"] == ["\\boxed{}", "#### N"]
    assert "gsm8k: accuracy 25.0% (strict; flexible 62.5%" in proc.stdout and "note: 75%" in proc.stdout
    samples = [json.loads(line) for line in (out / "gsm8k/samples.jsonl").read_text().splitlines()]
    by_how = {r["extracted_by"] for r in samples}
    assert by_how == {"#### N", "the answer is", "Answer: / A: (line start)", "boxed", None}
    assert [r.get("truncated") for r in samples if r["problem_id"] == "gsm8k/3"] == [True, None]

    report = subprocess.run([sys.executable, "-m", "thinkforge.cli", "report", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| run | gsm8k | 25.0 | 62.5 | 75.0 / 37.5 |" in report.stdout and "| 50.0% (2) |" in report.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "truncated": "yes"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", "eval", "--task", "gsm8k", "--responses", str(bad),
                           "--output", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}:2: field 'truncated' must be true or false")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_reference_solution_in_the_benchmarks_own_forms(tmp_path):
    """All 1319 GSM8K reference solutions ending "#### N" (GSM8K's own form) are strict-correct; ending
    "The answer is $N$." they are strict no-answer and flexible-correct. All 500 MATH-500 references with the
    box replaced by Minerva's answer line are strict-correct."""
    hashes, phrased = [], []
    for r in read_rows(DATA_DIR / "gsm8k.jsonl"):
        steps, answer = r["answer"].rsplit("####", 1)
        hashes.append({"problem_id": f"gsm8k/{r['idx']}", "response": f"{steps.strip()}\n#### {answer.strip()}"})
        phrased.append({"problem_id": f"gsm8k/{r['idx']}", "response": f"{steps.strip()}\nThe answer is ${answer.strip()}$."})
    s = score_responses(GSM8K, _write(tmp_path / "hash.jsonl", hashes))
    assert s["n_problems"] == 1319 and s["accuracy"] == 1.0 and s["accuracy_flexible"] == 1.0
    s = score_responses(GSM8K, _write(tmp_path / "phrased.jsonl", phrased))
    assert s["accuracy"] == 0.0 and s["no_answer_rate"] == 1.0 and s["accuracy_flexible"] == 1.0
    minerva = []
    for p in MATH500.problems():
        box = extract_boxed(p.solution)
        body = p.solution.replace(f"\\boxed{{{box}}}", box)
        minerva.append({"problem_id": p.id, "response": f"{body}\nFinal Answer: The final answer is ${p.answer}$. "
                                                         "I hope it is correct."})
    assert not any("\\boxed" in r["response"] for r in minerva[:50])
    s = score_responses(MATH500, _write(tmp_path / "minerva.jsonl", minerva))
    assert s["n_problems"] == 500 and s["accuracy"] == 1.0 and s["no_answer_rate"] == 0.0
