"""End to end, the Sky-T1 data recipe in miniature (issue 6): `thinkforge serve` a small model as the
teacher, `thinkforge distill` from it over HTTP, `thinkforge curate` the traces, `thinkforge sft` a student
for a few steps on the result, and load the student with plain `transformers`.

Curate keeps only answers the task's verifier accepts, and a random tiny model answers no arithmetic, so
the teacher first learns its few problems: the same SFT trainer fine-tunes the tiny checkpoint on the
teacher solutions of exactly the problems distill will ask (a task's problems are a pure function of
split, count and seed) until it answers them greedily. From there on everything is the real thing: the
`thinkforge serve` process on a loopback port, the `openai` client inside distill, the verifier, the
trainer, and files on disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from thinkforge.cli import app
from thinkforge.tasks import get_task
from thinkforge.train.sft import SFTConfig, sft

N_PROBLEMS, SEED = 3, 0


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teach(base: str, out: Path) -> str:
    """The tiny checkpoint fine-tuned until it reproduces the teacher solutions of distill's problems."""
    summary = sft(SFTConfig(model=base, tasks=["arith"], examples_per_task=N_PROBLEMS, seed=SEED, eval_examples=1,
                            out_dir=str(out), steps=60, batch_size=N_PROBLEMS, lr=1e-2, warmup_steps=2,
                            min_lr_ratio=1.0, eval_every=1000, save_every=1000, max_len=256, dtype="float32",
                            device="cpu", tensorboard=False))
    return summary["model_dir"]


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as err:  # the child keeps its own copy of the handle
        proc = subprocess.Popen([sys.executable, "-m", "thinkforge.cli", "serve", "--model", model, "--port", str(port),
                                 "--served-name", "teacher", "--device", "cpu", "--dtype", "float32",
                                 "--max-batch-size", "8", "--max-model-len", "512"],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 90
    try:
        while True:
            assert proc.poll() is None, f"thinkforge serve exited: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"thinkforge serve not healthy after 90 s: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ok":
                    return proc, f"http://127.0.0.1:{port}/v1"
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_serve_distill_curate_sft_then_plain_transformers(tiny_checkpoint, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = get_task("arith")
    problems = {p.id: p for p in task.problems("train", n=N_PROBLEMS, seed=SEED)}
    teacher = teach(tiny_checkpoint, tmp_path / "teacher")
    server, url = start_server(teacher, tmp_path / "serve.log")
    runner = CliRunner()
    traces, curated = tmp_path / "traces.jsonl", tmp_path / "sft.jsonl"
    try:
        # greedy, 2 samples per problem: the teacher answers each problem the same way twice
        res = runner.invoke(app, ["distill", "--teacher", url, "--tasks", "arith", "--n", "2", "--limit",
                                  str(N_PROBLEMS), "--seed", str(SEED), "--temperature", "0", "--max-tokens", "96",
                                  "--concurrency", "4", "--out", str(traces), "--price-out", "2.0"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    assert len(rows) == 2 * len(problems) and {r["problem_id"] for r in rows} == set(problems)
    assert sorted(r["id"] for r in rows) == sorted(f"{pid}#{k}" for pid in problems for k in (0, 1))
    assert all(r["teacher"] == f"{url}#teacher" and r["finish_reason"] == "stop" for r in rows)
    assert all(r["usage"]["completion_tokens"] > 0 and r["cost_usd"] > 0 for r in rows)
    # the served teacher really solves them (checked here with the task's own verifier, as curate will)
    assert all(task.score(problems[r["problem_id"]], r["response"]).correct for r in rows), \
        [r["response"] for r in rows]

    res = runner.invoke(app, ["curate", str(traces), "--out", str(curated), "--reformat", "split"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    stats = json.loads(curated.with_name("sft.stats.json").read_text())
    assert stats["input_rows"] == 2 * len(problems) and stats["kept"] == len(problems)
    assert stats["dropped"] == {"exact_duplicate": len(problems)}  # greedy twice: the same text
    assert stats["problem_difficulty"] == {"easy": len(problems)} and stats["reformat"] == {"split": len(problems)}
    kept = [json.loads(line) for line in curated.read_text().splitlines()]
    assert sorted(r["problem_id"] for r in kept) == sorted(problems)
    for r in kept:
        p = problems[r["problem_id"]]
        assert [m["role"] for m in r["messages"]][-2:] == ["user", "assistant"]
        assert r["messages"][-2]["content"] == p.prompt and f"\\boxed{{{p.answer}}}" in r["messages"][-1]["content"]

    student = tmp_path / "student"
    res = runner.invoke(app, ["sft", "--model", tiny_checkpoint, "--data", str(curated), "--out", str(student),
                              "--steps", "3", "--device", "cpu", "--set", "batch_size=2", "--set", "lr=3e-3",
                              "--set", "warmup_steps=1", "--set", "dtype=float32", "--set", "tensorboard=false"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads((student / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_examples"] == len(problems) and summary["target_tokens"] > 0
    assert [json.loads(line)["step"] for line in (student / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (student / "checkpoint").exists()  # a finished run leaves only the plain model

    # plain transformers, no thinkforge code: load, render the chat, score the curated replies, generate
    model = AutoModelForCausalLM.from_pretrained(student / "model")
    tok = AutoTokenizer.from_pretrained(student / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)

    def reply_loss(m, messages):  # mean cross-entropy of the assistant reply given its prompt
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
        labels = ids.clone()
        labels[:, : len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
        with torch.no_grad():
            return m(input_ids=ids, labels=labels).loss.item()

    for r in kept:  # three steps on these conversations made them more likely
        assert reply_loss(model, r["messages"]) < reply_loss(base, r["messages"])
    prompt = tok.apply_chat_template(task.messages(next(iter(problems.values()))), tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert 1 <= len(new) <= 12 and all(0 <= t < len(tok) for t in new)
    assert len(new) == 12 or new[-1] == tok.eos_token_id
