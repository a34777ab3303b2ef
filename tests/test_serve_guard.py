"""`thinkforge serve` hardening (issue 17): API key, limits, 429, oversized and slow requests, disconnects.

Real uvicorn servers on loopback, the real `openai` client, raw sockets for the abusive clients.
"""

from __future__ import annotations

import asyncio
import os
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

from thinkforge.engine.testing import build_tiny_model, build_tokenizer
from thinkforge.errors import ThinkforgeError
from thinkforge.serve.guard import Guard, check_bind, uvicorn_config
from thinkforge.serve.server import ServeConfig, create_app

NAME = "tiny"
KEY = "sk-test-0123456789"
# Runs for seconds (8 x up to 1900 tokens), so a disconnect or deadline lands mid-generation.
LONG = {"model": NAME, "prompt": list(range(5, 12)), "max_tokens": 1900, "n": 8, "temperature": 1.0, "seed": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, cfg: ServeConfig, header_timeout_s: float = 30.0) -> None:
        self.app = create_app(cfg)
        self.port = free_port()
        self.srv = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, header_timeout_s=header_timeout_s))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.srv.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.srv.started
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.engine = self.app.state.generator.engine
        self.guard = self.app.state.guard

    def wait_idle(self, within: float = 5.0) -> float:
        t = time.time()
        # `_requests` too: a request being admitted (prefill running) is in neither the waiting nor the running list
        while (self.engine.has_unfinished() or self.engine._requests or self.guard.admission.running) \
                and time.time() - t < within:
            time.sleep(0.01)
        return time.time() - t

    def stop(self) -> None:
        self.srv.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny test model with a 2048 context whose end-of-text logits are zeroed, so that it rarely stops by
    itself (a random model's peaked logits otherwise end many samples within a few hundred tokens)."""
    import torch

    out = tmp_path_factory.mktemp("ckpt")
    tok = build_tokenizer(512)
    model = build_tiny_model(tok, max_position_embeddings=2048)
    with torch.no_grad():
        model.lm_head.weight[[tok.eos_token_id, tok.pad_token_id]] = 0.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(ckpt):
    run = Running(ServeConfig(model=ckpt, served_name=NAME, device="cpu", dtype="float32", max_batch_size=16,
                              api_key=KEY, max_concurrent_requests=2, max_queued_requests=1, body_timeout_s=1.0,
                              max_request_bytes=1 << 20, max_prompt_tokens=50, max_tokens_limit=1900, max_n=8,
                              max_prompts=4), header_timeout_s=1.0)
    yield run
    run.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_api_key_wrong_missing_right_and_health_open(server, client):
    for key in ("wrong", KEY + "x", KEY[:-1]):
        bad = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert err.value.status_code == 401
        assert err.value.body == {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                  "param": None, "code": "invalid_api_key"}
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(server.url + "/chat/completions", json={"model": NAME, "messages": []})  # no header at all
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "Missing API key" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/models", headers={"Authorization": KEY}).status_code == 401  # no "Bearer"
    assert httpx.get(server.url + "/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200
    assert httpx.get(server.base + "/stats").status_code == 401
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,field,words", [
    ({"prompt": "x", "n": 9}, "n", "at most 8"),
    ({"prompt": "x", "max_tokens": 1901}, "max_tokens", "at most 1900"),
    ({"prompt": "hello " * 60}, "prompt", "at most 50"),
    ({"prompt": ["a", "b", "c", "d", "e"]}, "prompt", "at most 4"),
    ({"prompt": ["a", "hello " * 60]}, "prompt.1", "at most 50"),
])
def test_caps_are_400s_naming_the_field(server, client, body, field, words):
    r = httpx.post(server.url + "/completions", json={"model": NAME, **body}, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and words in err["message"] and err["type"] == "invalid_request_error"


def test_chat_caps_through_the_openai_client(client):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens is 2000"):
        client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=2000)
    with pytest.raises(openai.BadRequestError, match="n is 9"):
        client.chat.completions.create(model=NAME, messages=msgs, n=9, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 50"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello " * 60}])


def test_ten_megabyte_prompt_is_413_before_parsing(server, client):
    t = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=NAME, prompt="x" * 10_000_000, max_tokens=2)
    assert err.value.status_code == 413 and "1048576 bytes" in err.value.message
    assert time.perf_counter() - t < 10
    # No Content-Length (chunked upload): cut off as it grows.
    r = httpx.post(server.url + "/completions", content=(b"x" * 65536 for _ in range(40)), headers=AUTH, timeout=30)
    assert r.status_code == 413
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def raw_request(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def test_slowloris_head_and_body_get_408_and_others_are_served(server, client):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    half_body = raw_request(server.port, head + b'{"model": "tiny", "prompt": "')
    half_head = raw_request(server.port, head[:30])
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2)  # served while both stall
    assert r.usage.completion_tokens >= 1
    t = time.perf_counter()
    for sock in (half_body, half_head):
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.perf_counter() - t < 5


def test_over_the_limit_gets_429_with_retry_after_then_queue_drains(server, client):
    # 2 slots and 1 queue place: two streams hold the slots, one request queues, the fourth is refused.
    streams = [client.completions.create(**LONG, stream=True) for _ in range(2)]
    for s in streams:
        next(iter(s))  # generating
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.completions.create, model=NAME, prompt="x", max_tokens=2)
        deadline = time.time() + 10
        while server.guard.admission.queued < 1 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "1"
        assert err.value.body["type"] == "rate_limit_error" and err.value.body["code"] == "server_busy"
        assert not queued.done()
        for s in streams:
            s.close()
        assert queued.result(timeout=30).usage.completion_tokens >= 1  # a freed slot went to the queued request
    assert server.wait_idle() < 5 and server.guard.admission.running == 0


def test_client_leaving_the_queue_frees_its_place(server, client):
    streams = [client.completions.create(**LONG, stream=True) for _ in range(2)]
    for s in streams:
        next(iter(s))
    gone = server.guard.stats["disconnect"]
    with pytest.raises(httpx.TimeoutException):  # queued behind the two streams, then gives up
        httpx.post(server.url + "/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, headers=AUTH,
                   timeout=0.5)
    deadline = time.time() + 5
    while server.guard.admission.queued and time.time() < deadline:
        time.sleep(0.01)
    assert server.guard.admission.queued == 0 and server.guard.stats["disconnect"] == gone + 1
    assert server.guard.admission.running == 2
    for s in streams:
        s.close()
    assert server.wait_idle() < 5 and server.guard.admission.running == 0
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_generation_in_the_engine(server, stream):
    engine, gen = server.engine, server.app.state.generator
    aborted, generated = gen.aborted, engine.stats["generated_tokens"]
    if stream:
        with httpx.stream("POST", server.url + "/completions", json={**LONG, "stream": True}, headers=AUTH,
                          timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 8:
                    break
            assert engine.num_running == 8
    else:
        with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
            httpx.post(server.url + "/completions", json=LONG, headers=AUTH, timeout=0.5)
    t = server.wait_idle()
    assert engine.num_running == 0 and engine.num_waiting == 0 and t < 3
    assert gen.aborted == aborted + 1
    after = engine.stats["generated_tokens"]
    time.sleep(0.2)
    assert engine.stats["generated_tokens"] == after < generated + 8 * 1900  # nothing runs on for nobody
    assert server.guard.admission.running == 0


def test_request_timeout_aborts_and_answers_408(ckpt):
    run = Running(ServeConfig(model=ckpt, served_name=NAME, device="cpu", dtype="float32", request_timeout_s=0.5,
                              max_concurrent_requests=1))
    try:
        client = openai.OpenAI(base_url=run.url, api_key="unused", max_retries=0, timeout=30)
        t = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**LONG)
        assert err.value.status_code == 408 and err.value.body["code"] == "timeout"
        assert time.perf_counter() - t < 5
        assert run.wait_idle() < 3 and run.app.state.generator.aborted == 1
        chunks = []
        with pytest.raises(openai.APIError, match="timed out after 0.5 s"):  # mid-stream: an error event ends it
            for chunk in client.completions.create(**LONG, stream=True):
                chunks.append(chunk)
        assert chunks and run.wait_idle() < 3 and run.app.state.generator.aborted == 2
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    finally:
        run.stop()


def test_admission_queue_timeout_leaving_and_handover():
    async def scenario() -> None:
        guard = Guard(None, api_key=None, max_concurrent=1, max_queued=1, max_body_bytes=1, body_timeout_s=1,
                      request_timeout_s=1)
        adm = guard.admission
        assert await guard._admit(asyncio.Event(), 1) == "ok" and adm.running == 1
        assert await guard._admit(asyncio.Event(), 0.05) == "timeout" and adm.queued == 0
        gone = asyncio.Event()
        waiting = asyncio.ensure_future(guard._admit(gone, 5))
        await asyncio.sleep(0.01)
        assert adm.queued == 1 and await guard._admit(asyncio.Event(), 1) == "full"
        gone.set()
        assert await waiting == "gone" and adm.queued == 0 and adm.running == 1
        # A slot handed to a waiter that is cancelled before it runs is passed on, not lost.
        first = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        adm.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it resumes
        await asyncio.gather(first, return_exceptions=True)
        assert adm.running == 0 and adm.queued == 0

    asyncio.run(scenario())


def test_check_bind_rules():
    assert check_bind("127.0.0.1", None, False) is None and check_bind("::1", None, False) is None
    assert check_bind("localhost", None, False) is None and check_bind("0.0.0.0", "k", False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(ThinkforgeError, match="--api-key"):
            check_bind(host, None, False)
        assert "anyone" in check_bind(host, None, True)


def wait_health(url: str, proc: subprocess.Popen, within: float = 120) -> None:
    deadline = time.time() + within
    while True:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server not healthy"
        time.sleep(0.2)


def test_cli_refuses_open_non_loopback_and_allows_key_or_insecure(ckpt):
    cmd = [sys.executable, "-m", "thinkforge.cli", "serve", "--model", ckpt, "--served-name", NAME, "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "THINKFORGE_API_KEY"}
    res = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and res.stderr.startswith("error: serve: --host 0.0.0.0") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    open_port, key_port = free_port(), free_port()
    insecure = subprocess.Popen(cmd + ["--host", "0.0.0.0", "--port", str(open_port), "--insecure-no-auth"],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    keyed = subprocess.Popen(cmd + ["--host", "0.0.0.0", "--port", str(key_port)], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True, env={**env, "THINKFORGE_API_KEY": KEY})
    try:
        for port, proc in ((open_port, insecure), (key_port, keyed)):
            wait_health(f"http://127.0.0.1:{port}", proc)
        body = {"model": NAME, "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{open_port}/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.post(f"http://127.0.0.1:{key_port}/v1/completions", json=body, timeout=30).status_code == 401
        ok = openai.OpenAI(base_url=f"http://127.0.0.1:{key_port}/v1", api_key=KEY, max_retries=0)
        assert ok.completions.create(**body).usage.completion_tokens >= 1
    finally:
        for proc in (insecure, keyed):
            proc.terminate()
            proc.wait(timeout=30)
    assert insecure.stderr.read().startswith("warning: serving on 0.0.0.0 without an API key")
