"""`thinkforge distill` against real HTTP teachers, driven through the real `openai` client.

A scripted FastAPI teacher (run by uvicorn on a real socket) answers arith problems correctly and
injects faults on a schedule: 429 with Retry-After, 500s, hangs past the client timeout, and
connections dropped in the middle of the body. Our own `thinkforge serve` is the other teacher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from thinkforge.data.distill import DistillConfig, distill, repair_tail, summary_path
from thinkforge.engine.testing import serve_in_thread
from thinkforge.errors import ThinkforgeError

EXPR = re.compile(r"Compute (.*)\.$")


class Teacher:
    """Scripted teacher: `fault(call_no, key)` returns None (answer) or a fault name."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # prompt -> attempts
        self.answered: Counter[str] = Counter()  # prompt -> successful answers
        self.answered_jobs: Counter[tuple] = Counter()  # (prompt, seed) -> successful answers
        self.times: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
        self.fault = lambda call, prompt: None
        self.delay = 0.0
        self.retry_after = "0.3"

    def reply(self, prompt: str) -> str:
        expr = EXPR.search(prompt).group(1)
        value = eval(expr)  # our own arith prompts: digits, + - * and parentheses only
        return f"Let me compute step by step.\n{expr} = {value}\nThe answer is \\boxed{{{value}}}."


def make_app(t: Teacher) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio

        body = await request.json()
        prompt = body["messages"][-1]["content"]
        with t.lock:
            t.calls += 1
            call = t.calls
            t.requests[prompt] += 1
            fault = t.fault(call, prompt)
            t.times[(prompt, body.get("seed"))].append((time.time(), fault or "ok"))
        if t.delay:
            await asyncio.sleep(t.delay)
        if fault == "429":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429,
                                headers={"Retry-After": t.retry_after})
        if fault == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if fault == "400":
            return JSONResponse({"error": {"message": "bad request", "type": "invalid_request"}}, status_code=400)
        if fault == "hang":
            await asyncio.sleep(1.5)
        if fault == "drop":
            async def torn():
                yield b'{"id": "x", "choices": ['
                raise RuntimeError("connection dropped on purpose")
            return StreamingResponse(torn(), media_type="application/json")
        text = t.reply(prompt)
        if fault is None:  # a hung request's late answer reaches no one (the client timed out)
            with t.lock:
                t.answered[prompt] += 1
            t.answered_jobs[(prompt, body.get("seed"))] += 1
        n_in, n_out = len(prompt.split()), len(text.split())
        return {"id": f"c{call}", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    return app


@pytest.fixture()
def teacher():
    t = Teacher()
    srv, thread, url = serve_in_thread(make_app(t))
    t.url = url
    yield t
    srv.should_exit = True
    thread.join(timeout=10)


def cfg_for(teacher, out, **kw):
    base = dict(teacher=teacher.url, tasks=["arith"], n=3, limit=10, out=str(out), concurrency=4, max_retries=8,
                timeout=1.0, backoff_base=0.01, backoff_max=0.05, price_in=2.0, price_out=8.0, max_tokens=64)
    return DistillConfig(**{**base, **kw})


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flaky_teacher_every_row_once_with_retry_after_honoured(teacher, tmp_path):
    schedule = {0: "429", 1: "500", 2: "drop", 4: "hang"}  # a third of the calls fail, all four kinds
    teacher.fault = lambda call, prompt: schedule.get(call % 6) if call <= 60 else None
    out = tmp_path / "traces.jsonl"
    summary = distill(cfg_for(teacher, out))
    rows = read_rows(out)
    keys = [r["id"] for r in rows]
    assert len(rows) == 30 and len(set(keys)) == 30
    assert Counter(r["problem_id"] for r in rows) == Counter({pid: 3 for pid in {r["problem_id"] for r in rows}})
    assert all(r["response"].endswith(f"\\boxed{{{r['problem']['answer']}}}.") for r in rows)
    # every prompt was answered exactly as often as it has rows: no request counted twice
    assert sum(teacher.answered.values()) == 30
    run = summary["this_run"]
    assert run["failed"] == 0 and run["retries"] >= 15
    assert set(run["retry_reasons"]) == {"http_429", "http_500", "connection", "timeout"}
    assert max(r["attempts"] for r in rows) >= 2
    # Retry-After: 0.3 s: the retry of a request answered 429 (same prompt, same seed) came no sooner
    gaps = [b[0] - a[0] for times in teacher.times.values() for a, b in zip(times[:-1], times[1:], strict=True) if a[1] == "429"]
    assert gaps and min(gaps) >= 0.29
    tot = summary["totals"]
    assert tot["rows"] == 30 and tot["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in rows)
    expected = (tot["prompt_tokens"] * 2.0 + tot["completion_tokens"] * 8.0) / 1e6
    assert tot["cost_usd"] == pytest.approx(expected, rel=1e-6)
    assert json.loads(summary_path(out).read_text())["complete"] is True


def test_resume_after_torn_write_requests_only_missing_rows(teacher, tmp_path):
    out = tmp_path / "traces.jsonl"
    distill(cfg_for(teacher, out, n=2))
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 20
    kept = lines[:12]
    out.write_text("".join(kept) + lines[12][: len(lines[12]) // 2])  # a kill in the middle of row 13
    assert repair_tail(out) > 0 and out.read_text() == "".join(kept)
    out.write_text("".join(kept) + lines[12][: len(lines[12]) // 2])
    before = Counter(teacher.answered)
    summary = distill(cfg_for(teacher, out, n=2))
    assert summary["this_run"]["already_done"] == 12 and summary["this_run"]["written"] == 8
    rows = read_rows(out)  # every line parses: the torn one was cut, not glued to
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert sum((teacher.answered - before).values()) == 8
    # a third run is a no-op
    again = distill(cfg_for(teacher, out, n=2))
    assert again["this_run"]["requested"] == 0 and len(read_rows(out)) == 20


def test_permanent_errors_are_reported_not_written_then_retried(teacher, tmp_path):
    teacher.fault = lambda call, prompt: "400" if "+" in prompt else None
    out = tmp_path / "traces.jsonl"
    summary = distill(cfg_for(teacher, out, n=1))
    bad = summary["this_run"]["failed"]
    assert bad > 0 and summary["complete"] is False
    assert summary["failures"][0]["attempts"] == 1  # 400 is not retried
    assert all("+" not in r["messages"][-1]["content"] for r in read_rows(out))
    teacher.fault = lambda call, prompt: None
    summary = distill(cfg_for(teacher, out, n=1))
    assert summary["this_run"]["written"] == bad and summary["complete"] is True
    assert len(read_rows(out)) == 10


def test_sigkill_mid_run_then_rerun_completes_without_duplicates(teacher, tmp_path):
    teacher.delay = 0.05
    out = tmp_path / "traces.jsonl"
    args = [sys.executable, "-m", "thinkforge.cli", "distill", "--teacher", teacher.url, "--tasks", "arith",
            "--n", "4", "--limit", "12", "--out", str(out), "--concurrency", "2", "--max-tokens", "32"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not out.exists() or len(out.read_text().splitlines()) < 8:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    teacher.delay = 0.0
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert len(rows) == 48 and len({r["id"] for r in rows}) == 48
    # rows on disk at kill time were never requested again; every job was answered at least once
    assert all(teacher.answered_jobs[(r["messages"][-1]["content"], r["seed"])] == 1 for r in before)
    assert all(teacher.answered_jobs[(r["messages"][-1]["content"], r["seed"])] >= 1 for r in rows)
    assert sum(teacher.answered_jobs.values()) <= 48 + 2  # at most the 2 in flight at the kill, twice
    assert "total: 48 rows" in result.stdout


def test_thinkforge_serve_as_teacher_and_native_backend(tmp_path):
    from thinkforge.engine.testing import save_tiny_checkpoint
    from thinkforge.serve.server import ServeConfig, create_app

    ckpt = str(save_tiny_checkpoint(tmp_path / "ckpt"))
    app = create_app(ServeConfig(model=ckpt, served_name="tiny", device="cpu", dtype="float32", max_batch_size=8,
                                 max_model_len=256))
    srv, thread, url = serve_in_thread(app)
    try:
        out = tmp_path / "served.jsonl"
        summary = distill(DistillConfig(teacher=url, tasks=["arith", "code"], n=2, limit=3, out=str(out),
                                        concurrency=4, max_tokens=12, price_out=1.0))
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    rows = read_rows(out)
    assert len(rows) == 12 and {r["task"] for r in rows} == {"arith", "code"}
    assert all(r["teacher"].endswith("#tiny") and 1 <= r["usage"]["completion_tokens"] <= 12 for r in rows)
    assert all(r["usage"]["prompt_tokens"] > 0 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert summary["totals"]["cost_usd"] == pytest.approx(summary["totals"]["completion_tokens"] / 1e6)

    local = tmp_path / "local.jsonl"
    summary = distill(DistillConfig(teacher=ckpt, tasks=["arith"], n=2, limit=3, out=str(local), max_tokens=12,
                                    device="cpu", dtype="float32"))
    rows = read_rows(local)
    assert summary["backend"] == "native" and len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert all(r["usage"]["completion_tokens"] >= 1 for r in rows)


def test_bad_input(tmp_path, teacher):
    with pytest.raises(ThinkforgeError, match="--teacher is required"):
        distill(DistillConfig(out=str(tmp_path / "x.jsonl")))
    other = tmp_path / "other.jsonl"
    other.write_text('{"messages": []}\n')
    with pytest.raises(ThinkforgeError, match=r"other.jsonl:1: not a distill row"):
        distill(cfg_for(teacher, other))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem_id": "a", "sample": 0}\n{oops\n{"problem_id": "b", "sample": 0}\n')
    with pytest.raises(ThinkforgeError, match=r"broken.jsonl:2: invalid JSON"):
        distill(cfg_for(teacher, broken))
    with pytest.raises(ThinkforgeError, match="unknown task 'nope'"):
        distill(cfg_for(teacher, tmp_path / "y.jsonl", tasks=["nope"]))


def test_resume_refuses_rows_drawn_with_other_settings(teacher, tmp_path):
    from typer.testing import CliRunner

    from thinkforge.cli import app
    from thinkforge.data.distill import settings_path

    out = tmp_path / "traces.jsonl"
    distill(cfg_for(teacher, out, n=1, limit=4, temperature=0.7))
    record = json.loads(settings_path(out).read_text())
    assert record == {"settings": {"teacher": "scripted", "temperature": 0.7, "top_p": 1.0, "max_tokens": 64,
                                   "system_prompt": None}, "previous": []}
    before, calls = out.read_text(), teacher.calls
    for change, what in ((dict(temperature=0.2), "temperature 0.7 -> 0.2"), (dict(max_tokens=32), "max_tokens 64 -> 32"),
                         (dict(top_p=0.9), "top_p 1.0 -> 0.9"), (dict(system_prompt="Be brief."), "system_prompt None")):
        with pytest.raises(ThinkforgeError, match=rf"traces\.jsonl: its 4 rows were drawn with other settings \({what}"):
            distill(cfg_for(teacher, out, n=2, limit=4, **change))
    assert out.read_text() == before and teacher.calls == calls  # refused before any request
    # Same teacher model behind another URL spelling, more samples per problem: rows drawn the same way
    other_url = dataclasses.replace(cfg_for(teacher, out, n=2, limit=4), teacher=teacher.url + "/#scripted")
    summary = distill(other_url)
    assert summary["this_run"]["written"] == 4 and len(read_rows(out)) == 8
    # The explicit override appends and keeps the history
    runner = CliRunner()
    args = ["distill", "--teacher", teacher.url, "--tasks", "arith", "--n", "2", "--limit", "5", "--out", str(out),
            "--temperature", "0.2", "--max-tokens", "64"]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, ThinkforgeError) and "drawn with other settings" in str(res.exception)
    res = runner.invoke(app, [*args, "--allow-settings-change"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    assert len(rows) == 10 and sorted(r["temperature"] for r in rows) == [0.2] * 2 + [0.7] * 8
    record = json.loads(settings_path(out).read_text())
    assert record["settings"]["temperature"] == 0.2 and [p["temperature"] for p in record["previous"]] == [0.7]
    # A file from before settings were recorded is checked on what its rows carry (teacher, temperature)
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(r) + "\n" for r in rows if r["temperature"] == 0.7))
    with pytest.raises(ThinkforgeError, match=r"legacy\.jsonl: its 8 rows .* \(temperature 0\.7 -> 0\.5\)"):
        distill(cfg_for(teacher, legacy, n=2, limit=5, temperature=0.5))
    assert not settings_path(legacy).exists()
    assert distill(cfg_for(teacher, legacy, n=2, limit=5, temperature=0.7))["this_run"]["written"] == 2
    assert json.loads(settings_path(legacy).read_text())["settings"]["temperature"] == 0.7


# ---------------------------------------------------------------- fan-out over several endpoints
@pytest.fixture()
def two_teachers():
    pair = []
    for _ in range(2):
        t = Teacher()
        srv, thread, t.url = serve_in_thread(make_app(t))
        pair.append((t, srv, thread))
    yield [t for t, _, _ in pair]
    for _, srv, thread in pair:
        srv.should_exit = True
        thread.join(timeout=10)


def test_fan_out_over_two_teachers_sigkill_then_resume_without_duplicates(two_teachers, tmp_path):
    a, b = two_teachers
    a.delay = b.delay = 0.05
    out = tmp_path / "traces.jsonl"
    args = [sys.executable, "-m", "thinkforge.cli", "distill", "--teacher", f"{a.url},{b.url}", "--tasks", "arith",
            "--n", "4", "--limit", "12", "--out", str(out), "--concurrency", "2", "--max-tokens", "32"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not out.exists() or len(out.read_text().splitlines()) < 12:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert {r["teacher"].rpartition("#")[0] for r in before} == {a.url, b.url}  # both endpoints served rows
    a.delay = b.delay = 0.0
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert len(rows) == 48 and len({r["id"] for r in rows}) == 48
    answered = a.answered_jobs + b.answered_jobs
    # rows on disk at kill time were never requested again, from either endpoint
    assert all(answered[(r["messages"][-1]["content"], r["seed"])] == 1 for r in before)
    assert sum(answered.values()) <= 48 + 4  # at most the 4 in flight at the kill (2 per endpoint), twice
    assert sum(a.answered.values()) > 0 and sum(b.answered.values()) > 0
    assert all(r["teacher"] in (f"{a.url}#scripted", f"{b.url}#scripted") for r in rows)
    # the same rows as one endpoint draws: seeds are per (problem, sample), not per endpoint
    single = tmp_path / "single.jsonl"
    distill(cfg_for(a, single, n=4, limit=12, max_tokens=32, concurrency=4))
    by_id = {r["id"]: r["response"] for r in read_rows(single)}
    assert {r["id"]: r["response"] for r in rows} == by_id


def test_fan_out_moves_a_dead_endpoints_share_to_the_live_one(two_teachers, tmp_path):
    live, other = two_teachers
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    out = tmp_path / "traces.jsonl"
    summary = distill(dataclasses.replace(cfg_for(live, out, n=2, limit=8), teacher=f"{dead}#scripted,{live.url}"))
    rows = read_rows(out)
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16 and summary["complete"]
    assert {r["teacher"] for r in rows} == {f"{live.url}#scripted"}
    run = summary["this_run"]
    assert run["per_endpoint"] == {dead: 0, live.url: 16} and run["retry_reasons"].get("connection", 0) >= 1
    mixed = dataclasses.replace(cfg_for(live, tmp_path / "mixed.jsonl"), teacher=f"{live.url},{other.url}#other")
    with pytest.raises(ThinkforgeError, match="serve different models"):
        distill(mixed)  # one file, one teacher: refused before any request
    assert not (tmp_path / "mixed.jsonl").exists()
