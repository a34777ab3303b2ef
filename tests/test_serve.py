"""The OpenAI-compatible server, exercised with the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from thinkforge.engine.base import SamplingParams, get_backend
from thinkforge.engine.testing import save_tiny_checkpoint
from thinkforge.serve.server import ServeConfig, create_app

NAME = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))
    app = create_app(ServeConfig(model=path, served_name=NAME, device="cpu", dtype="float32", max_batch_size=16,
                                 max_model_len=128))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}/v1", "engine": app.state.generator.engine, "path": path}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="unused", max_retries=0)


def test_models_health_and_completion_with_logprobs(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server["url"].removesuffix("/v1") + "/health").json()["status"] == "ok"
    r = client.completions.create(model=NAME, prompt="What is 12 + 35?", max_tokens=8, temperature=0, logprobs=1)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    n_tok = r.usage.completion_tokens
    assert 1 <= n_tok <= 8 and len(c.logprobs.token_logprobs) == n_tok and all(x <= 0 for x in c.logprobs.token_logprobs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + n_tok and r.usage.prompt_tokens > 0
    # Same request, same greedy answer; a two-prompt request returns one choice per prompt.
    again = client.completions.create(model=NAME, prompt=["What is 12 + 35?", "x"], max_tokens=8, temperature=0)
    assert [ch.index for ch in again.choices] == [0, 1] and again.choices[0].text == c.text


def test_chat_n_seed_and_streaming_match(client):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, n=2, seed=5, temperature=1.0,
                                       logprobs=True)
    assert len(r.choices) == 2 and r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
    same = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, n=2, seed=5, temperature=1.0)
    assert [ch.message.content for ch in same.choices] == [ch.message.content for ch in r.choices]
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, n=2, seed=5, temperature=1.0,
                                            stream=True, stream_options={"include_usage": True})
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish, usage, chunks = {}, None, 0
    for chunk in stream:
        chunks += 1
        if not chunk.choices:
            usage = chunk.usage
            continue
        ch = chunk.choices[0]
        parts[ch.index].append(ch.delta.content or "")
        if ch.finish_reason:
            finish[ch.index] = ch.finish_reason
    assert ["".join(parts[i]) for i in (0, 1)] == [ch.message.content for ch in r.choices]
    assert finish == {i: ch.finish_reason for i, ch in enumerate(r.choices)}
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert chunks > 6  # token by token, not one blob


def test_streaming_completion_with_stop_string(client):
    base = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop = text[8:10]
    assert stop not in text[:8]
    pieces = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The quick brown fox", max_tokens=30, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == text[:text.index(stop)]


def test_concurrent_requests_share_the_batch(server, client):
    engine = server["engine"]
    engine.stats["max_rows"] = 0
    prompts = [f"Solve for x: {i}x + 5 = 20." for i in range(16)]

    def one(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, prompts))
    assert engine.stats["max_rows"] > 1  # requests were decoded together
    # Batched answers equal one-at-a-time answers (greedy).
    assert [one(p) for p in prompts[:3]] == texts[:3]


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "hello " * 200}, "prompt"),
    ({"prompt": "x", "model": "gpt-17"}, "model"),
    ({"prompt": "x", "n": "many"}, "n"),
    ({"prompt": [5, 10**6]}, "prompt"),  # token id beyond the vocabulary
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [[5, 6], [7, 10**6]]}, "prompt.1"),
])
def test_bad_requests_get_400_and_server_keeps_serving(server, body, field):
    payload = {"model": NAME, **body}
    r = httpx.post(server["url"] + "/completions", json=payload, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == field and err["message"]
    ok = httpx.post(server["url"] + "/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_out_of_vocab_token_ids_do_not_fail_requests_in_flight(server):
    url = server["url"] + "/completions"
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, url, json={"model": NAME, "prompt": [5, 6, 7], "max_tokens": 60,
                                                  "temperature": 0, "stop_token_ids": []}, timeout=120)
        time.sleep(0.2)
        r = httpx.post(url, json={"model": NAME, "prompt": [5, 999999]}, timeout=30)
        assert r.status_code == 400 and "999999" in r.json()["error"]["message"]
        done = long.result(timeout=120)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("extra,field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -2}, "max_tokens"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
])
def test_chat_max_tokens_below_one_is_400_like_completions(server, extra, field):
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(server["url"] + "/chat/completions", json={"model": NAME, "messages": msgs, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and ">= 1" in err["message"]
    same = httpx.post(server["url"] + "/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 0}, timeout=30)
    assert same.status_code == 400 and same.json()["error"]["param"] == "max_tokens"
    ok = httpx.post(server["url"] + "/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 1,
                                                              "temperature": 0}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_malformed_json_and_client_errors(server, client):
    r = httpx.post(server["url"] + "/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi " * 200}])


def test_openai_backend_against_our_server(server, client):
    backend = get_backend("openai", server["url"], max_retries=0, timeout=60)  # model from /v1/models
    assert backend.model_name == NAME
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=True)
    out = backend.generate(["What is 12 + 35?", "x"], params)
    direct = client.completions.create(model=NAME, prompt="What is 12 + 35?", max_tokens=10, temperature=0)
    assert len(out) == 2 and out[0][0].text == direct.choices[0].text and len(out[0][0].logprobs) > 0
    chat = get_backend("openai", server["url"] + "#" + NAME).chat(
        [[{"role": "user", "content": "hi"}]], SamplingParams(temperature=1.0, n=3, max_tokens=6, seed=2))
    assert len(chat[0]) == 3 and all(c.finish_reason in ("stop", "length") for c in chat[0])
    backend.close()


def test_serve_cli_rejects_missing_model(tmp_path):
    res = subprocess.run([sys.executable, "-m", "thinkforge.cli", "serve", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: model") and "Traceback" not in res.stderr
