"""`thinkforge curate`: rejection sampling, decontamination, dedupe, cap, difficulty labels, reformat."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request

from thinkforge.data.curate import CurateConfig, curate, difficulty_label, stats_path
from thinkforge.data.dedupe import exact_dedupe, near_dedupe
from thinkforge.data.reformat import BEGIN_SOLUTION, parse_structured, render, split_response
from thinkforge.errors import ThinkforgeError
from thinkforge.tasks import get_task

LONG = "First I read the expression carefully. " + " ".join(f"Step {i}: I check value {i * 7} again." for i in range(40))


def row(p, sample, response, finish="stop"):
    task = get_task(p.task) if p.task in ("arith", "code") else None
    msgs = task.messages(p) if task else [{"role": "user", "content": p.prompt}]
    return {"id": f"{p.id}#{sample}", "problem_id": p.id, "sample": sample, "task": p.task, "problem": p.to_dict(),
            "messages": msgs, "response": response, "finish_reason": finish, "teacher": "t"}


def boxed(p, value=None, prefix=""):
    return f"{prefix}{p.solution.rsplit(chr(10), 1)[0]}\nThe answer is \\boxed{{{p.answer if value is None else value}}}."


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    arith = get_task("arith").problems("train", n=6, seed=3)
    code = get_task("code").problems("train", n=2, seed=3)
    math500 = get_task("math500").problems("test")[0]
    rows = []
    a0, a1, a2, a3, a4, a5 = arith
    # a0: 4 correct, distinct (long reasoning) -> cap 3 drops one; pass rate 1.0 (easy)
    rows += [row(a0, k, boxed(a0, prefix=LONG.replace("Step", f"Attempt {k} step") + "\n")) for k in range(4)]
    # a1: correct, exact duplicate of it, near duplicate (one word differs in a long text), wrong -> 0.75 (medium)
    text = boxed(a1, prefix=LONG + "\n")
    rows += [row(a1, 0, text), row(a1, 1, text), row(a1, 2, text.replace("carefully", "closely", 1)),
             row(a1, 3, boxed(a1, value=int(a1.answer) + 1))]
    # a2: no answer, truncated (with a correct answer, still dropped), one correct -> 1/3 (hard)
    rows += [row(a2, 0, "I think it is big."), row(a2, 1, boxed(a2), finish="length"), row(a2, 2, boxed(a2))]
    # a3: all wrong -> unsolved
    rows += [row(a3, k, boxed(a3, value=int(a3.answer) + 2 + k)) for k in range(2)]
    # a4, a5: one correct each
    rows += [row(a4, 0, boxed(a4)), row(a5, 0, boxed(a5))]
    # code: a correct solution and one that fails the edge tests
    c0, c1 = code
    rows += [row(c0, 0, c0.solution), row(c1, 0, c1.solution),
             row(c1, 1, "Plan.\n```python\ndef f(*args):\n    return 12345\n```")]
    # a benchmark problem answered correctly: contaminated with itself
    rows += [row(math500, 0, f"Working.\nThe answer is \\boxed{{{math500.answer}}}.")]
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {"arith": arith, "code": code, "math500": math500}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pipeline_counts_every_drop_reason(traces, tmp_path):
    path, probs = traces
    out = tmp_path / "sft.jsonl"
    stats = curate(CurateConfig(traces=str(path), out=str(out), max_per_problem=3, decontam=["math500"]))
    assert stats["input_rows"] == 19 and stats["kept"] == 9
    assert stats["dropped"] == {"over_cap": 1, "exact_duplicate": 1, "near_duplicate": 1, "wrong:wrong_answer": 3,
                                "wrong:no_answer": 1, "truncated": 1, "wrong:failed_tests": 1, "contaminated": 1}
    assert stats["per_task"]["arith"]["kept"] == 7 and stats["per_task"]["arith"]["problems_kept"] == 5
    assert stats["per_task"]["code"] == {"rows": 3, "kept": 2, "problems": 2, "problems_kept": 2,
                                         "dropped": {"wrong:failed_tests": 1}}
    assert stats["decontam_examples"][0]["benchmark_id"] == probs["math500"].id
    rows = read(out)
    a = probs["arith"]
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    assert [r["sample"] for r in by_problem[a[0].id]] == [0, 1, 2]
    assert [r["sample"] for r in by_problem[a[1].id]] == [0]
    labels = {pid: (rs[0]["pass_rate"], rs[0]["difficulty"]) for pid, rs in by_problem.items()}
    assert labels[a[0].id] == (1.0, "easy") and labels[a[1].id] == (0.75, "medium")
    assert labels[a[2].id] == (pytest.approx(1 / 3, abs=1e-4), "hard")
    assert stats["problem_difficulty"] == {"easy": 5, "medium": 2, "hard": 1, "unsolved": 1}
    r = by_problem[a[4].id][0]
    assert r["messages"][-2] == {"role": "user", "content": a[4].prompt}
    assert r["messages"][-1]["content"] == boxed(a[4]) and r["reformat"] == "none"
    assert json.loads(stats_path(out).read_text())["kept"] == 9


def test_split_reformat_and_sharegpt_via_cli(traces, tmp_path):
    path, probs = traces
    out = tmp_path / "sg.jsonl"
    res = subprocess.run([sys.executable, "-m", "thinkforge.cli", "curate", str(path), "--out", str(out),
                          "--format", "sharegpt", "--reformat", "split", "--near-dup-threshold", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "kept 12 of 19 rows" in res.stdout and "wrote 12 rows" in res.stdout
    rows = read(out)
    assert all(r["reformat"] == "split" for r in rows)
    code_row = next(r for r in rows if r["problem_id"] == probs["code"][0].id)
    assert [t["from"] for t in code_row["conversations"]] == ["human", "gpt"]
    thought, solution = parse_structured(code_row["conversations"][-1]["value"])
    assert solution.startswith("```python\ndef f(") and thought == probs["code"][0].solution.split("\n")[0]
    a4 = probs["arith"][4]
    arow = next(r for r in rows if r["problem_id"] == a4.id)
    thought, solution = parse_structured(arow["conversations"][-1]["value"])
    assert solution == f"The answer is \\boxed{{{a4.answer}}}." and thought == a4.solution.rsplit("\n", 1)[0]


def test_splitter_cases():
    r = "Let me think.\n\nStep 1.\n\n**Final Answer**\n\n\\[ \\boxed{5} \\]"
    assert split_response(r) == ("Let me think.\n\nStep 1.", "**Final Answer**\n\n\\[ \\boxed{5} \\]")
    assert split_response("<think>hmm 2+2</think>It is \\boxed{4}.") == ("hmm 2+2", "It is \\boxed{4}.")
    assert split_response("no answer here") is None
    structured = render("a", "b \\boxed{1}")
    assert split_response(structured) == ("a", "b \\boxed{1}") and structured.count(BEGIN_SOLUTION) == 1
    assert [difficulty_label(x) for x in (1.0, 0.5, 0.1, 0.0)] == ["easy", "medium", "hard", "unsolved"]


def test_dedupe_functions():
    texts = ["a b c d e f g h", "a  b c d e f g h", "x y z"]
    assert exact_dedupe(texts) == [None, 0, None]
    base = " ".join(f"w{i}" for i in range(200))
    near = base.replace("w100", "v100")
    res = near_dedupe([base, near, "totally different text " * 5], threshold=0.9)
    assert res.keep == [True, False, True] and res.duplicate_of == [None, 0, None]
    res = near_dedupe([base, " ".join(f"w{i}" for i in range(100))], threshold=0.9)
    assert res.keep == [True, True]  # half the shingles shared: Jaccard ~0.5


def test_llm_reformat_is_reverified(traces, tmp_path):
    """A real OpenAI-compatible reformatter: good rewrites replace the original, a rewrite that changes the
    answer is rejected by the verifier (split fallback), an unstructured reply is counted unparseable."""
    path, probs = traces
    seen = []
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fmt", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        user = body["messages"][-1]["content"]
        seen.append(body["messages"][0]["content"])
        problem = user.split("Problem:\n", 1)[1].split("\n\nOriginal solution:\n", 1)[0]
        original = user.split("\n\nOriginal solution:\n", 1)[1]
        parts = split_response(original, "code" if "```" in original else "math")
        if problem == probs["arith"][4].prompt:
            text = render(parts[0], "The answer is \\boxed{-1}.")  # changes the answer
        elif problem == probs["arith"][5].prompt:
            text = "Sure! Here is the reformatted solution: " + original  # ignores the structure
        else:
            text = "Here you go.\n" + render("REWRITTEN " + parts[0], parts[1])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "fmt",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        out = tmp_path / "llm.jsonl"
        stats = curate(CurateConfig(traces=str(path), out=str(out), reformat="llm",
                                    reformat_model=f"http://127.0.0.1:{port}/v1", near_dup_threshold=0))
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    assert stats["reformat"] == {"llm_accepted": 10, "llm_rejected_by_verifier": 1, "llm_unparseable": 1, "split": 2}
    assert len(seen) == 12 and "<|begin_of_thought|>" in seen[0]
    rows = {r["problem_id"]: r for r in read(out)}
    a4 = rows[probs["arith"][4].id]
    assert a4["reformat"] == "split" and f"\\boxed{{{probs['arith'][4].answer}}}" in a4["messages"][-1]["content"]
    good = rows[probs["code"][0].id]
    assert good["reformat"] == "llm" and good["messages"][-1]["content"].startswith("<|begin_of_thought|>\n\nREWRITTEN")


def test_bad_input_and_empty_result(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": {"id": "a", "task": "arith", "prompt": "Compute 1 + 1."}, "response": "x"}\n'
                   '{"problem": {"id": "b", "task": "arith"}, "response": "x"}\n')
    with pytest.raises(ThinkforgeError, match=r"bad.jsonl:2: field 'problem.prompt' missing"):
        curate(CurateConfig(traces=str(bad), out=str(tmp_path / "o.jsonl")))
    bad.write_text('{"problem": {"id": "a", "task": "arith", "prompt": "p"}}\n')
    with pytest.raises(ThinkforgeError, match=r"bad.jsonl:1: field 'response' missing"):
        curate(CurateConfig(traces=str(bad), out=str(tmp_path / "o.jsonl")))
    bad.write_text('{"problem": {"id": "a", "task": "arith", "prompt": "p"}, "response": "x"}\n{"problem": \n')
    with pytest.raises(ThinkforgeError, match=r"bad.jsonl:2: invalid JSON"):
        curate(CurateConfig(traces=str(bad), out=str(tmp_path / "o.jsonl")))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"problem": {"id": "a", "task": "arith", "prompt": "Compute 1 + 1.", "answer": "2"}, '
                     '"response": "\\\\boxed{3}"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(ThinkforgeError, match=r"no rows left after filtering 1 \(wrong:wrong_answer 1\)"):
        curate(CurateConfig(traces=str(wrong), out=str(out)))
    assert not out.exists() and json.loads(stats_path(out).read_text())["kept"] == 0
    with pytest.raises(ThinkforgeError, match="--format must be one of"):
        curate(CurateConfig(traces=str(wrong), out=str(out), format="alpaca"))


def test_unknown_task_names_file_and_line(tmp_path):
    good = {"problem": {"id": "a", "task": "arith", "prompt": "Compute 1 + 1.", "answer": "2"}, "response": "\\boxed{2}"}
    bad = {"problem": {"id": "b", "task": "arithmetic", "prompt": "Compute 1 + 2."}, "response": "\\boxed{3}"}
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")  # line 3: the blank line counts
    with pytest.raises(ThinkforgeError, match=r"traces\.jsonl:3: field 'problem\.task': unknown task 'arithmetic'; "
                                              r"known: .*arith"):
        curate(CurateConfig(traces=str(traces), out=str(tmp_path / "o.jsonl")))
    res = subprocess.run([sys.executable, "-m", "thinkforge.cli", "curate", str(traces), "--out", str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {traces}:3: field 'problem.task': unknown task")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.jsonl").exists()
