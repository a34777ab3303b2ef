"""Evaluation through a real OpenAI-compatible HTTP server and the real `openai` client.

The server is a small FastAPI app that solves `arith` prompts ("Compute (3 + 4) * 2.") and answers in
\\boxed{}, except for sample index 1 which it answers wrongly, so the expected metrics are known exactly.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from thinkforge.engine.base import SamplingParams, get_backend
from thinkforge.eval import evaluate


def _app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "arith-oracle", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        expr = re.fullmatch(r"Compute ([\d\s()+\-*]+)\.", body["messages"][-1]["content"]).group(1)
        value = eval(expr, {"__builtins__": {}})  # digits, spaces, parentheses and + - * only (checked above)
        choices = [{"index": i, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": f"{expr} = {value + (i == 1)}. \\boxed{{{value + (i == 1)}}}"}}
                   for i in range(body.get("n", 1))]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}

    return app


@pytest.fixture(scope="module")
def server_url():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_backend_evaluation(server_url, tmp_path):
    backend = get_backend("openai", server_url)
    try:
        summary = evaluate("arith", backend, SamplingParams(temperature=0.6, top_p=0.95, max_tokens=64, n=3),
                           n_problems=5, output_dir=tmp_path, seed=2)
    finally:
        backend.close()
    # Samples 0 and 2 are right, sample 1 is off by one: avg@3 = 2/3, pass@3 = 1, maj@3 = 1.
    assert summary["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["pass_at_k"]["1"] == pytest.approx(2 / 3, abs=1e-6) and summary["pass_at_k"]["3"] == 1.0
    assert summary["maj_at_k"]["3"] == 1.0 and summary["maj_at_k"]["1"] == 1.0
    assert summary["config"]["backend"] == "openai" and summary["config"]["model"] == "arith-oracle"
    assert summary["truncation_rate"] == 0.0 and summary["length_tokens"] == {}  # the API gives no token ids
    rows = [json.loads(x) for x in (tmp_path / "arith/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["reason"] for r in rows if r["sample_index"] == 1} == {"wrong_answer"}


def test_eval_cli_takes_a_url_as_an_openai_endpoint(server_url, tmp_path):
    """`thinkforge eval --model URL` needs no --backend: a URL is an OpenAI-compatible endpoint (as in distill)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "thinkforge.cli", "eval", "--model", server_url, "--task", "arith",
                           "--n", "2", "--limit", "3", "--max-tokens", "32", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "arith" / "summary.json").read_text())
    assert summary["config"]["backend"] == "openai" and summary["n_problems"] == 3
    assert summary["accuracy"] == pytest.approx(0.5)  # sample 0 right, sample 1 off by one
