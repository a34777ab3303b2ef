"""`thinkforge serve`: an OpenAI-compatible server over a local checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    model: Annotated[str, typer.Option(help="HF checkpoint directory or hub id.")],
    host: Annotated[str, typer.Option(help="Bind address (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    backend: Annotated[str, typer.Option(help="native (continuous batching) | hf (reference, one at a time)")] = "native",
    served_name: Annotated[str | None, typer.Option(help="Model id clients use (default: the --model value).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Cap on prompt + completion tokens.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for requests that do not give one.")] = 0,
    speculative: Annotated[str | None, typer.Option(help="mtp: self-speculative decoding with the "
                                                    "checkpoint's MTP layers.")] = None,
    num_draft: Annotated[int, typer.Option(help="Draft tokens per step with --speculative mtp.")] = 1,
    spec_max_batch: Annotated[int | None, typer.Option(help="With --speculative: decode plain while more than "
                                                       "this many rows run (default: always speculate).")] = None,
    serial_rows: Annotated[int, typer.Option(help="Decode steps of at most this many token rows (rows x verified "
                                             "tokens) run on one CPU thread; 4 suits small models (0 = off).")] = 0,
    api_key: Annotated[str | None, typer.Option(envvar="THINKFORGE_API_KEY", show_envvar=True,
                                                help="Clients must send 'Authorization: Bearer KEY' (the openai "
                                                "client's api_key); /health stays open.")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(help="Allow a non-loopback --host without an API key.")] = False,
    max_concurrent_requests: Annotated[int, typer.Option(help="Requests generating at once.")] = 256,
    max_queued_requests: Annotated[int, typer.Option(help="Requests waiting for a slot; more get 429 + "
                                                     "Retry-After.")] = 1024,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body (413 beyond).")] = 4 << 20,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may take, queueing included.")] = 600.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its request.")] = 30.0,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Prompt token cap (default: the context).")] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Cap on max_tokens (default: the context).")] = None,
    max_n: Annotated[int, typer.Option(help="Cap on n (samples per prompt).")] = 64,
    max_prompts: Annotated[int, typer.Option(help="Cap on prompts per /v1/completions request.")] = 64,
) -> None:
    """Serve /v1/models, /v1/completions, /v1/chat/completions (streaming too) and /health."""
    import sys

    from thinkforge.errors import ThinkforgeError
    from thinkforge.serve.guard import check_bind

    if not 0 < port < 65536:
        raise ThinkforgeError(f"--port must be in 1..65535, got {port}")
    warning = check_bind(host, api_key, insecure_no_auth)  # before the (slow) imports and model load
    import uvicorn

    from thinkforge.serve.guard import uvicorn_config
    from thinkforge.serve.server import ServeConfig, create_app

    cfg = ServeConfig(model=model, backend=backend, served_name=served_name, device=device, dtype=dtype,
                      max_batch_size=max_batch_size, max_model_len=max_model_len, seed=seed,
                      speculative=speculative, num_draft=num_draft,
                      spec_max_batch=spec_max_batch, serial_rows=serial_rows, api_key=api_key,
                      max_concurrent_requests=max_concurrent_requests, max_queued_requests=max_queued_requests,
                      max_request_bytes=max_request_bytes, request_timeout_s=request_timeout,
                      body_timeout_s=body_timeout, max_prompt_tokens=max_prompt_tokens,
                      max_tokens_limit=max_tokens_limit, max_n=max_n, max_prompts=max_prompts).validate()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    app = create_app(cfg)
    uvicorn.Server(uvicorn_config(app, host, port, header_timeout_s=cfg.body_timeout_s)).run()


COMMANDS = {"serve": serve}
