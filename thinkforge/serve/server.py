"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (+ SSE streaming), /health.

With the native backend every request goes into one `EngineLoop`, so concurrent requests share the
continuous batch (this is where server throughput comes from). With the `hf` backend requests run
one at a time through `generate` (reference only). Client mistakes get HTTP 400 with an OpenAI-style
error body and the server keeps serving. Authentication, body/time limits, admission (429) and
disconnect handling live in `guard.py`, in front of these routes; the per-request caps (prompt
tokens, `n`, `max_tokens`, prompts per request) are checked here, `n` and `max_tokens` before
anything is tokenized. Tokenization runs on its own thread so a long prompt never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from thinkforge.engine.backends import apply_chat_template
from thinkforge.engine.base import Completion, SamplingParams, model_vocab_size, out_of_vocab
from thinkforge.errors import ThinkforgeError
from thinkforge.serve import protocol as P
from thinkforge.serve.guard import Guard


@dataclass
class ServeConfig:
    model: str
    backend: str = "native"
    served_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 64
    max_model_len: int | None = None
    seed: int = 0
    speculative: str | None = None  # "mtp": self-speculative decoding with the checkpoint's MTP layers
    num_draft: int = 1
    # With --speculative: above this many running rows a step decodes plain (verification turns compute-bound
    # at large batches; benchmarks/mtp_speculative.py's calibration measures where). None: always speculate.
    spec_max_batch: int | None = None
    # Decode steps of at most this many token rows run on one CPU thread (LLMEngine serial_rows; 0 = off).
    serial_rows: int = 0
    # Access and limits (guard.py). No key: anyone who can reach the port may generate; the CLI refuses
    # that on a non-loopback address unless told --insecure-no-auth.
    api_key: str | None = None
    max_concurrent_requests: int = 256  # running at once (requests, whatever their n)
    max_queued_requests: int = 1024  # waiting for a slot; beyond that 429 + Retry-After
    max_request_bytes: int = 4 << 20  # a body over this is refused (413) before it is parsed
    body_timeout_s: float = 30.0  # headers-to-complete-body limit (slowloris)
    request_timeout_s: float = 600.0  # queue wait + generation
    retry_after_s: int = 1
    max_prompt_tokens: int | None = None  # None: whatever the context allows
    max_tokens_limit: int | None = None  # cap on max_tokens / max_completion_tokens; None: the context
    max_n: int = 64
    max_prompts: int = 64  # prompts in one /v1/completions request

    def validate(self) -> ServeConfig:
        for name in ("max_concurrent_requests", "max_request_bytes", "max_n", "max_prompts", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ThinkforgeError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ThinkforgeError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.spec_max_batch is not None and self.spec_max_batch < 0:
            raise ThinkforgeError(f"serve: spec_max_batch must be >= 0 (0: always plain), "
                                  f"got {self.spec_max_batch}")
        if self.max_queued_requests < 0:
            raise ThinkforgeError(f"serve: max_queued_requests must be >= 0, got {self.max_queued_requests}")
        for name in ("body_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ThinkforgeError(f"serve: {name} must be > 0, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ThinkforgeError("serve: the API key is empty")
        return self


class _Generator:
    """What the routes need: submit token ids, get completions (and optionally per-token callbacks)."""

    def __init__(self, cfg: ServeConfig) -> None:
        from thinkforge.engine.loading import load_model_and_tokenizer
        from thinkforge.vl.model import is_vl_checkpoint

        self.vl = None  # a Qwen2(.5)-VL checkpoint: images in chat content parts, via the hf-vl backend
        if is_vl_checkpoint(cfg.model):
            self._init_vl(cfg)
            return
        if cfg.backend not in ("native", "hf"):
            raise ThinkforgeError(f"serve: backend {cfg.backend!r} not servable; use native or hf")
        if cfg.speculative and cfg.backend != "native":
            raise ThinkforgeError("serve: --speculative needs --backend native")
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
        self.backend = cfg.backend
        self.max_prompt_tokens = cfg.max_prompt_tokens
        self.aborted = 0  # generations stopped because their client left or timed out
        # One thread: tokenizing off the event loop, and never concurrently (HF fast tokenizers are
        # not safe to call from several threads at once).
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="thinkforge-tokenize")
        self.vocab_size = model_vocab_size(model, self.tokenizer)
        if cfg.backend == "native":
            from thinkforge.engine.native import LLMEngine
            from thinkforge.engine.runner import EngineLoop
            from thinkforge.engine.speculative import prepare_speculative

            spec = prepare_speculative(model, cfg.model, cfg.speculative, cfg.num_draft)
            self.engine = LLMEngine(model, self.tokenizer, max_batch_size=cfg.max_batch_size,
                                    max_model_len=cfg.max_model_len, seed=cfg.seed, speculative=spec,
                                    num_draft=cfg.num_draft, spec_max_batch=cfg.spec_max_batch,
                                    serial_rows=cfg.serial_rows)
            self.loop = EngineLoop(self.engine)
            self.max_model_len = self.engine.max_model_len
        else:
            from thinkforge.engine.backends import HFBackend

            hf = HFBackend.__new__(HFBackend)
            hf.model, hf.tokenizer, hf.model_name, hf.batch_size = model, self.tokenizer, cfg.model, 1
            hf.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
            self.hf, self.hf_lock = hf, threading.Lock()
            self.max_model_len = min(hf.context, cfg.max_model_len or hf.context)

    def _init_vl(self, cfg: ServeConfig) -> None:
        from thinkforge.vl.backend import HFVLBackend

        if cfg.speculative:
            raise ThinkforgeError("serve: --speculative is not available for VL checkpoints")
        self.vl = HFVLBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=1)
        self.backend, self.tokenizer = "hf-vl", self.vl.tokenizer
        self.max_prompt_tokens, self.aborted = cfg.max_prompt_tokens, 0
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="thinkforge-tokenize")
        self.vocab_size = model_vocab_size(self.vl.model, self.tokenizer)
        self.hf_lock = threading.Lock()
        self.max_model_len = min(self.vl.context, cfg.max_model_len or self.vl.context)

    def check_prompt(self, ids: list[int], param: str) -> None:
        ids = getattr(ids, "input_ids", ids)  # a VL prompt: its tokens, image tokens included
        if not ids:
            raise P.RequestError("prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise P.RequestError(f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
                                 param=param, code="context_length_exceeded")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise P.RequestError(f"prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens} "
                                 "(--max-prompt-tokens)", param=param, code="context_length_exceeded")
        bad = out_of_vocab(ids, self.vocab_size)
        if bad is not None:
            raise P.RequestError(f"token id {bad} is out of range; this model's vocabulary has ids 0.."
                                 f"{self.vocab_size - 1}", param=param)

    async def run(self, ids: list[int], params: SamplingParams, on_token: Any = None) -> list[Completion]:
        if self.backend == "native":
            try:
                handle = self.loop.submit(ids, params, on_token=on_token)
            except ThinkforgeError as err:
                raise P.RequestError(str(err)) from None
            try:
                return await asyncio.wrap_future(handle.future)
            except asyncio.CancelledError:  # client went away or timed out (guard.py): free the slots
                self.loop.abort(handle.request_id)
                self.aborted += 1
                raise

        def blocking() -> list[Completion]:
            with self.hf_lock:
                if self.vl is not None:  # ids: a VLEncoding from the chat route, or plain token ids
                    from thinkforge.vl.processor import VLEncoding

                    enc = ids if isinstance(ids, VLEncoding) else VLEncoding(list(ids), [0] * len(ids))
                    try:
                        return self.vl.generate_encoded([enc], params)[0]
                    except ThinkforgeError as err:
                        raise P.RequestError(str(err).splitlines()[0]) from None
                return self.hf.generate_ids([ids], params)[0]

        return await asyncio.to_thread(blocking)

    async def prepare(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def close(self) -> None:
        if self.backend == "native":
            self.loop.close()
        self.prep.shutdown(wait=False)


def create_app(cfg: ServeConfig) -> FastAPI:
    cfg.validate()
    gen = _Generator(cfg)
    tok = gen.tokenizer
    name = cfg.served_name or cfg.model
    max_n = cfg.max_n
    max_tokens_limit = min(cfg.max_tokens_limit or gen.max_model_len, gen.max_model_len)

    def check_caps(req: Any, max_tokens: int | None, field: str) -> None:
        """Before tokenizing anything: n and max_tokens within this server's caps."""
        if isinstance(req.n, int) and req.n > max_n:
            raise P.RequestError(f"n is {req.n}; this server allows at most {max_n} (--max-n)", param="n")
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise P.RequestError(f"{field} is {max_tokens}; this server allows at most {max_tokens_limit}"
                                 + (" (--max-tokens-limit)" if cfg.max_tokens_limit else " (the model's context)"),
                                 param=field)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gen.close()  # stop the engine thread when uvicorn shuts down

    app = FastAPI(title="thinkforge", version="0.1", lifespan=lifespan)
    app.state.generator = gen
    guard = Guard(None, api_key=cfg.api_key, max_concurrent=cfg.max_concurrent_requests,
                  max_queued=cfg.max_queued_requests, max_body_bytes=cfg.max_request_bytes,
                  body_timeout_s=cfg.body_timeout_s, request_timeout_s=cfg.request_timeout_s,
                  retry_after_s=cfg.retry_after_s)
    app.add_middleware(guard.wrap)  # type: ignore[arg-type]  (Starlette calls it with the inner app)
    app.state.guard = guard

    def bad(err: P.RequestError) -> JSONResponse:
        return JSONResponse(P.error_body(err.message, err.param, err.code), status_code=400)

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise P.RequestError(f"malformed JSON body ({err})") from None

    def check_model(requested: str) -> None:
        if requested not in (name, cfg.model):
            raise P.RequestError(f"model {requested!r} is not served here; available: {name}", param="model",
                                 code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "backend": cfg.backend}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Load and rejections (needs the API key like every path but /health)."""
        engine = getattr(gen, "engine", None)
        return {"running_sequences": engine.num_running if engine else None,
                "waiting_sequences": engine.num_waiting if engine else None,
                "admitted_requests": guard.admission.running, "queued_requests": guard.admission.queued,
                "aborted_generations": gen.aborted, "rejected": dict(guard.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "thinkforge", "max_model_len": gen.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            req = P.parse(P.CompletionRequest, await body_of(request))
            check_model(req.model)
            check_caps(req, req.max_tokens, "max_tokens")
            if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
                    and len(req.prompt) > cfg.max_prompts:
                raise P.RequestError(f"prompt has {len(req.prompt)} prompts; this server takes at most "
                                     f"{cfg.max_prompts} per request (--max-prompts)", param="prompt")
            prompts = await gen.prepare(_prompt_ids, req.prompt, tok)
            for i, ids in enumerate(prompts):
                gen.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt.{i}")
            params = P.sampling_params(req, req.max_tokens if req.max_tokens is not None else min(16, max_tokens_limit))
            params.logprobs = req.logprobs is not None
        except P.RequestError as err:
            return bad(err)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            rid = P.new_id("cmpl")

            def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

            return _sse(gen, prompts, params, tok, chunk, rid, name, "text_completion", include_usage)
        try:
            groups = await _all_or_none([gen.run(ids, params) for ids in prompts])
        except P.RequestError as err:
            return bad(err)
        return P.completion_response(name, list(groups), tok, params.logprobs,
                                     sum(len(p) for p in prompts))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            req = P.parse(P.ChatRequest, await body_of(request))
            check_model(req.model)
            if not req.messages:
                raise P.RequestError("messages must not be empty", param="messages")
            given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            check_caps(req, given, "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
            if gen.vl is not None:  # content parts may carry images (image_url data URLs)
                ids = await gen.prepare(_vl_chat_encoding, gen.vl, [{"role": m.role, "content": m.content or ""}
                                                                    for m in req.messages])
            else:
                conv = [{"role": m.role, "content": P.message_text(m.content)} for m in req.messages]
                ids = await gen.prepare(_chat_ids, tok, conv)
            gen.check_prompt(ids, "messages")
            if req.max_completion_tokens is not None:
                max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
            elif req.max_tokens is not None:
                max_tokens, field = req.max_tokens, "max_tokens"
            else:  # unset: whatever room the context leaves, within the cap
                max_tokens, field = min(gen.max_model_len - len(ids), max_tokens_limit), "max_tokens"
            if max_tokens < 1:  # 0 is rejected as on /v1/completions, not read as "unset"
                raise P.RequestError(f"{field} must be >= 1, got {max_tokens}", param=field)
            params = P.sampling_params(req, max_tokens)
            params.logprobs = req.logprobs
        except P.RequestError as err:
            return bad(err)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            rid = P.new_id("chatcmpl")

            def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if text or finish is None else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return _sse(gen, [ids], params, tok, chunk, rid, name, "chat.completion.chunk", include_usage,
                        first=lambda i: {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                         "model": name, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                     "content": ""}, "logprobs": None,
                                                                     "finish_reason": None}]})
        try:
            group = await gen.run(ids, params)
        except P.RequestError as err:
            return bad(err)
        return P.chat_response(name, group, tok, params.logprobs, len(ids))

    return app


async def _all_or_none(runs: list[Awaitable[list[Completion]]]) -> list[list[Completion]]:
    """gather, but when one prompt fails the others are cancelled (and so aborted in the engine)."""
    tasks = [asyncio.ensure_future(r) for r in runs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


def _chat_ids(tok: Any, conv: list[dict[str, str]]) -> list[int]:
    try:
        text = apply_chat_template(tok, conv)
    except ThinkforgeError as err:
        raise P.RequestError(str(err), param="messages") from None
    return tok(text, add_special_tokens=False)["input_ids"]


def _vl_chat_encoding(vl: Any, conv: list[dict[str, Any]]) -> Any:
    """The VL prompt (images decoded, checked and expanded); bad images/placeholders -> 400 naming the part."""
    try:
        return vl.encode_chat(conv, "request")
    except ThinkforgeError as err:
        raise P.RequestError(str(err).splitlines()[0], param="messages") from None


def _prompt_ids(prompt: Any, tok: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tok(prompt, add_special_tokens=True)["input_ids"]]
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt:
        out = []
        for p in prompt:
            out.append(tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p))
        return out
    raise P.RequestError("prompt must be a non-empty string, list of strings, or token ids", param="prompt")


def _sse(gen: _Generator, prompts: list[list[int]], params: SamplingParams, tok: Any, chunk: Any, rid: str,
         name: str, obj: str, include_usage: bool, first: Any = None) -> StreamingResponse:
    """Streams token deltas of all prompts x n samples as they are generated (choice index i*n + j)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    n = params.n
    streamers = [[P.TextStreamer(tok, params.stop) for _ in range(n)] for _ in prompts]

    def on_token_for(p: int) -> Any:
        def on_token(_rid: str, index: int, token_id: int, _lp: float) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("tok", p, index, token_id))
        return on_token

    async def one(p: int, ids: list[int]) -> None:
        try:
            group = await gen.run(ids, params, on_token=on_token_for(p))
            queue.put_nowait(("done", p, group, None))
        except Exception as err:  # surfaced to the client as an error event
            queue.put_nowait(("error", p, None, err))

    async def events() -> AsyncIterator[str]:
        tasks = [asyncio.create_task(one(p, ids)) for p, ids in enumerate(prompts)]
        remaining = len(prompts)
        completion_tokens = 0
        try:
            if first is not None:
                for i in range(len(prompts) * n):
                    yield f"data: {json.dumps(first(i))}\n\n"
            while remaining:
                kind, p, a, err = await queue.get()
                if kind == "tok":  # a = sample index, err = token id
                    delta = streamers[p][a].push(err)
                    if delta:
                        yield f"data: {json.dumps(chunk(p * n + a, delta, None))}\n\n"
                    continue
                if kind == "error":
                    msg = err.message if isinstance(err, P.RequestError) else f"generation failed: {err}"
                    yield f"data: {json.dumps(P.error_body(msg))}\n\n"
                    remaining -= 1
                    continue
                remaining -= 1
                for j, c in enumerate(a):
                    completion_tokens += c.completion_tokens
                    rest = streamers[p][j].final(c)
                    if rest:
                        yield f"data: {json.dumps(chunk(p * n + j, rest, None))}\n\n"
                    yield f"data: {json.dumps(chunk(p * n + j, '', c.finish_reason))}\n\n"
            if include_usage:
                u = P.usage(sum(len(x) for x in prompts), completion_tokens)  # prompts count once, as OpenAI does
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': int(time.time()), 'model': name, 'choices': [], 'usage': u})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")
