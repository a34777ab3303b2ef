"""The server's front door, as one pure-ASGI middleware in front of the FastAPI app.

In order, for every HTTP request:
1. **Authentication**: with an API key set, every path but `/health` needs `Authorization: Bearer KEY`
   (compared in constant time); otherwise 401 in OpenAI's error shape.
2. **Body limits** (POST): a declared `Content-Length` over the cap is answered 413 without parsing
   anything; a body that grows past the cap while arriving likewise; a body that has not fully arrived
   within `body_timeout_s` of the headers (slowloris) is answered 408 and the connection closed.
3. **Admission** (generation routes): at most `max_concurrent` requests run, at most `max_queued` wait
   (FIFO) for a slot; beyond that 429 with `Retry-After`. The slot is held until the response is
   complete, streaming included.
4. **Deadline and disconnects**: the request (queue wait included) is cancelled when the client goes
   away or after `request_timeout_s`. Cancelling the route cancels its `await` on the engine, which
   aborts the generation there (`server._Generator.run`), so nobody's compute is spent on nobody.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers streaming responses and hides
`http.disconnect` from the route.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections import Counter, deque
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health"})
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# A body over the cap is read and thrown away up to this much, so that the client, still sending, can
# read our 413 instead of a connection reset; past it the connection is simply closed.
DRAIN_LIMIT = 64 << 20


class Admission:
    """At most `max_running` holders and `max_queued` FIFO waiters; `acquire` is False when both are full.
    Event-loop only (no locks): uvicorn serves every request from one loop."""

    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running, self.max_queued = max_running, max_queued
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return True
        if len(self._waiters) >= self.max_queued:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # `release` hands its slot over: `running` stays as it is
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise
        return True

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def send_error(send: Any, status: int, message: str, *, type_: str, code: str | None = None,
                     param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, param, code, type_)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Guard:
    def __init__(self, app: Any, *, api_key: str | None, max_concurrent: int, max_queued: int,
                 max_body_bytes: int, body_timeout_s: float, request_timeout_s: float,
                 retry_after_s: int = 1) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.admission = Admission(max_concurrent, max_queued)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s
        self.retry_after = str(max(1, int(retry_after_s))).encode()
        # Rejections and cancellations by kind (tests and the load benchmark read them).
        self.stats: Counter[str] = Counter()

    def wrap(self, app: Any) -> Guard:
        """For `app.add_middleware(guard.wrap)`: Starlette builds its middleware stack lazily."""
        self.app = app
        return self

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self._key is not None and path not in OPEN_PATHS:
            given = _header(scope, b"authorization") or b""
            scheme, _, token = given.partition(b" ")
            # compare_digest: the time taken does not depend on how much of the key matched
            if not (hmac.compare_digest(token.strip(), self._key) and scheme.lower() == b"bearer"):
                self.stats["401"] += 1
                msg = ("Incorrect API key provided." if given else
                       "Missing API key: send it as 'Authorization: Bearer KEY' (the openai client's api_key).")
                await send_error(send, 401, msg, type_="invalid_request_error", code="invalid_api_key",
                                 headers=[(b"www-authenticate", b"Bearer")])
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(scope, receive), self.body_timeout_s)
        except _ClientGone:
            return
        except _BodyTooLarge:
            self.stats["413"] += 1
            await send_error(send, 413, f"request body is larger than this server's limit of {self.max_body_bytes} "
                             "bytes (--max-request-bytes)", type_="invalid_request_error",
                             code="request_too_large", headers=[(b"connection", b"close")])
            return
        except asyncio.TimeoutError:
            self.stats["408"] += 1
            await send_error(send, 408, f"request body not received within {self.body_timeout_s:g} s",
                             type_="invalid_request_error", code="timeout", headers=[(b"connection", b"close")])
            return
        if path not in GENERATION_PATHS:
            await self.app(scope, _replay(body, asyncio.Event()), send)
            return
        await self._generate(scope, body, receive, send)

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        declared = _header(scope, b"content-length")
        too_large = declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes)
        chunks, size = [], 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone
            chunk = msg.get("body", b"")
            size += len(chunk)
            more = msg.get("more_body", False)
            if too_large or size > self.max_body_bytes:
                too_large = True
                if size > DRAIN_LIMIT:
                    break
                continue  # drained, not kept
            chunks.append(chunk)
        if too_large:
            raise _BodyTooLarge
        return b"".join(chunks)

    async def _generate(self, scope: dict[str, Any], body: bytes, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        try:
            outcome = await self._admit(gone, self.request_timeout_s)
            if outcome == "timeout":
                self.stats["timeout"] += 1
                await send_error(send, 408, f"request timed out after {self.request_timeout_s:g} s waiting for "
                                 "a slot", type_="timeout_error", code="timeout")
                return
            if outcome == "gone":  # the client left while queued
                self.stats["disconnect"] += 1
                return
            if outcome == "full":
                self.stats["429"] += 1
                await send_error(send, 429, f"server is at capacity ({self.admission.max_running} running, "
                                 f"{self.admission.max_queued} queued); retry later", type_="rate_limit_error",
                                 code="server_busy", headers=[(b"retry-after", self.retry_after)])
                return
            try:
                await self._run_app(scope, body, send, gone, watcher, max(0.0, deadline - loop.time()))
            finally:
                self.admission.release()
        finally:
            watcher.cancel()

    async def _admit(self, gone: asyncio.Event, timeout: float) -> str:
        """"ok" (holding a slot), "full", "gone" (client left while queued) or "timeout"."""
        acquire = asyncio.ensure_future(self.admission.acquire())
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({acquire, left}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not acquire.done():
                acquire.cancel()  # Admission.acquire passes on a slot handed over in the meantime
        if acquire.done() and not acquire.cancelled():
            if not acquire.result():
                return "full"
            if not gone.is_set():
                return "ok"
            self.admission.release()
            return "gone"
        await asyncio.gather(acquire, return_exceptions=True)
        return "gone" if gone.is_set() else "timeout"

    async def _run_app(self, scope: dict[str, Any], body: bytes, send: Any, gone: asyncio.Event,
                       watcher: asyncio.Future, timeout: float) -> None:
        state = {"started": False, "complete": False}

        async def tracked_send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                state["started"] = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                state["complete"] = True
            await send(msg)

        app_task = asyncio.ensure_future(self.app(scope, _replay(body, gone), tracked_send))
        done, _ = await asyncio.wait({app_task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if app_task in done or state["complete"]:  # (the watcher also wakes once the response is complete)
            await app_task
            return
        app_task.cancel()  # -> CancelledError at the route's await on the engine -> engine abort
        await asyncio.gather(app_task, return_exceptions=True)
        if watcher in done:
            self.stats["disconnect"] += 1
            return
        self.stats["timeout"] += 1
        msg = f"request timed out after {self.request_timeout_s:g} s"
        if not state["started"]:
            await send_error(send, 408, msg, type_="timeout_error", code="timeout")
        elif not state["complete"]:  # mid-stream: say why in the stream, then end it
            event = f"data: {json.dumps(error_body(msg, None, 'timeout', 'timeout_error'))}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})


async def _watch_disconnect(receive: Any, gone: asyncio.Event) -> None:
    """Owns the real `receive` once the body is read: returns when the client disconnects (uvicorn also
    reports a disconnect once the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


def _replay(body: bytes, gone: asyncio.Event) -> Any:
    """The `receive` the app sees: the body we already read, then (like uvicorn) a disconnect when it happens."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> str | None:
    """Refuses an open server on a non-loopback address; returns a warning line when the user insisted."""
    if api_key or is_loopback(host):
        return None
    if not insecure_no_auth:
        raise ThinkforgeError(f"serve: --host {host} is reachable from other machines and no API key is set; "
                              "pass --api-key KEY (or set THINKFORGE_API_KEY), or --insecure-no-auth to serve "
                              "without one")
    return f"serving on {host} without an API key (--insecure-no-auth): anyone who can reach it can use it"


def uvicorn_config(app: Any, host: str, port: int, *, header_timeout_s: float = 30.0, **kwargs: Any) -> Any:
    """uvicorn settings for the server, with a limit on how long a new connection may take to send its
    request head: uvicorn has none (its keep-alive timer starts after a first response), so a
    slowloris client trickling header bytes would hold its connection for ever."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithHeaderTimeout(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _head_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no complete request head yet
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(app, host=host, port=port, http=H11WithHeaderTimeout, **kwargs)
