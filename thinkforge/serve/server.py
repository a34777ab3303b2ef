"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (+ SSE streaming), /health.

With the native backend every request goes into one `EngineLoop`, so concurrent requests share the
continuous batch (this is where server throughput comes from). With the `hf` backend requests run
one at a time through `generate` (reference only). Client mistakes get HTTP 400 with an OpenAI-style
error body and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from thinkforge.engine.backends import apply_chat_template
from thinkforge.engine.base import Completion, SamplingParams, model_vocab_size, out_of_vocab
from thinkforge.errors import ThinkforgeError
from thinkforge.serve import protocol as P


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


class _Generator:
    """What the routes need: submit token ids, get completions (and optionally per-token callbacks)."""

    def __init__(self, cfg: ServeConfig) -> None:
        from thinkforge.engine.loading import load_model_and_tokenizer

        if cfg.backend not in ("native", "hf"):
            raise ThinkforgeError(f"serve: backend {cfg.backend!r} not servable; use native or hf")
        if cfg.speculative and cfg.backend != "native":
            raise ThinkforgeError("serve: --speculative needs --backend native")
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
        self.backend = cfg.backend
        self.vocab_size = model_vocab_size(model, self.tokenizer)
        if cfg.backend == "native":
            from thinkforge.engine.native import LLMEngine
            from thinkforge.engine.runner import EngineLoop
            from thinkforge.engine.speculative import prepare_speculative

            spec = prepare_speculative(model, cfg.model, cfg.speculative, cfg.num_draft)
            self.engine = LLMEngine(model, self.tokenizer, max_batch_size=cfg.max_batch_size,
                                    max_model_len=cfg.max_model_len, seed=cfg.seed, speculative=spec,
                                    num_draft=cfg.num_draft)
            self.loop = EngineLoop(self.engine)
            self.max_model_len = self.engine.max_model_len
        else:
            from thinkforge.engine.backends import HFBackend

            hf = HFBackend.__new__(HFBackend)
            hf.model, hf.tokenizer, hf.model_name, hf.batch_size = model, self.tokenizer, cfg.model, 1
            hf.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
            self.hf, self.hf_lock = hf, threading.Lock()
            self.max_model_len = min(hf.context, cfg.max_model_len or hf.context)

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise P.RequestError("prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise P.RequestError(f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
                                 param=param, code="context_length_exceeded")
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
            except asyncio.CancelledError:  # client went away: free the slots
                self.loop.abort(handle.request_id)
                raise

        def blocking() -> list[Completion]:
            with self.hf_lock:
                return self.hf.generate_ids([ids], params)[0]

        return await asyncio.to_thread(blocking)

    def close(self) -> None:
        if self.backend == "native":
            self.loop.close()


def create_app(cfg: ServeConfig) -> FastAPI:
    gen = _Generator(cfg)
    tok = gen.tokenizer
    name = cfg.served_name or cfg.model
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gen.close()  # stop the engine thread when uvicorn shuts down

    app = FastAPI(title="thinkforge", version="0.1", lifespan=lifespan)
    app.state.generator = gen

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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "thinkforge", "max_model_len": gen.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            req = P.parse(P.CompletionRequest, await body_of(request))
            check_model(req.model)
            prompts = _prompt_ids(req.prompt, tok)
            for i, ids in enumerate(prompts):
                gen.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt.{i}")
            params = P.sampling_params(req, req.max_tokens if req.max_tokens is not None else 16)
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
            groups = await asyncio.gather(*(gen.run(ids, params) for ids in prompts))
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
            conv = [{"role": m.role, "content": P.message_text(m.content)} for m in req.messages]
            try:
                text = apply_chat_template(tok, conv)
            except ThinkforgeError as err:
                raise P.RequestError(str(err), param="messages") from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
            gen.check_prompt(ids, "messages")
            if req.max_completion_tokens is not None:
                max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
            elif req.max_tokens is not None:
                max_tokens, field = req.max_tokens, "max_tokens"
            else:  # unset: whatever room the context leaves
                max_tokens, field = gen.max_model_len - len(ids), "max_tokens"
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
