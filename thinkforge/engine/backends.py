"""The built-in backends: `native` (our engine), `hf` (plain `generate`, the reference), `openai` (any
OpenAI-compatible endpoint) and `vllm` (in-process, optional). All return, per prompt, `params.n`
`Completion`s; `chat` applies the model's chat template (or the server's, for `openai`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from thinkforge.engine.base import Backend, Completion, Message, SamplingParams, register_backend
from thinkforge.errors import ThinkforgeError


def apply_chat_template(tokenizer: Any, conversation: list[Message]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ThinkforgeError("this model's tokenizer has no chat template; use generate() with raw prompts")
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ThinkforgeError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r}")
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _LocalBackend(Backend):
    """Shared by native/hf: a tokenizer with a chat template; chat = template + generate on token ids."""

    tokenizer: Any

    def _encode_chat(self, conversations: list[list[Message]]) -> list[list[int]]:
        texts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]
        # The template already contains any BOS, so no special tokens are added again.
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ThinkforgeError(f"prompt {i}: expected a string, got {type(p).__name__}")
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


@register_backend("native")
class NativeBackend(_LocalBackend):
    """`LLMEngine` over an HF checkpoint directory or hub id."""

    name = "native"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 64,
                 max_model_len: int | None = None, seed: int = 0, speculative: str | None = None,
                 num_draft: int = 1, speculative_fallback: bool = False, **engine_kwargs: Any) -> None:
        from thinkforge.engine.loading import load_model_and_tokenizer
        from thinkforge.engine.native import LLMEngine
        from thinkforge.engine.speculative import prepare_speculative

        hf_model, self.tokenizer = load_model_and_tokenizer(model, device, dtype)
        self.model_name = model
        # speculative="mtp": the checkpoint's MTP layers draft num_draft tokens per step (self-speculative).
        spec = prepare_speculative(hf_model, model, speculative, num_draft, speculative_fallback)
        self.engine = LLMEngine(hf_model, self.tokenizer, max_batch_size=max_batch_size,
                                max_model_len=max_model_len, seed=seed, speculative=spec, num_draft=num_draft,
                                **engine_kwargs)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(self._encode(prompts), params)

    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(self._encode_chat(conversations), params)


def hf_generation_config(model: Any, tok: Any, params: SamplingParams, prompt_len: int, context: int,
                         **extra: Any) -> tuple[Any, set[int], int]:
    """HF `generate`'s config for `params` (shared by the text and VL HF backends), the stop token ids
    (the model's and tokenizer's eos plus `stop_token_ids`) and the pad id."""
    from transformers import GenerationConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, list | tuple) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    stop_ids = set(eos) | set(params.stop_token_ids)
    sample = params.temperature > 0
    gen = GenerationConfig(
        max_new_tokens=min(params.max_tokens, context - prompt_len), do_sample=sample,
        temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
        # top_k=0 is "off"; None would let generate fill in its default of 50 (a different policy).
        top_k=params.top_k if sample else None, num_return_sequences=params.n,
        eos_token_id=sorted(stop_ids) or None, pad_token_id=pad, return_dict_in_generate=True,
        output_scores=params.logprobs, stop_strings=params.stop or None, **extra,
    )
    return gen, stop_ids, pad


@register_backend("hf")
class HFBackend(_LocalBackend):
    """Plain `model.generate` with left padding, in chunks of `batch_size` prompts: the reference.

    Logprobs come from `output_scores` (logits after HF's temperature/top-k/top-p warpers), i.e. the
    same quantity the native engine reports. HF cannot seed per request: a seed seeds the global RNG
    before each chunk, so results depend on the batch composition (unlike the native engine)."""

    name = "hf"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64,
                 **_: Any) -> None:
        from thinkforge.engine.loading import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(model, device, dtype)
        self.model_name = model
        self.batch_size = batch_size
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        return self.generate_ids(self._encode(prompts), params)

    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        return self.generate_ids(self._encode_chat(conversations), params)

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        params.validate()
        for i, ids in enumerate(prompts):
            if len(ids) >= self.context:
                raise ThinkforgeError(f"prompt {i} has {len(ids)} tokens; the model's context is {self.context}")
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._chunk(prompts[start:start + self.batch_size], params)
        return out

    def _chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        import torch

        tok = self.tokenizer
        P = max(len(p) for p in prompts)
        gen, stop_ids, pad = hf_generation_config(self.model, tok, params, P, self.context)
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=self.model.device)
        attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            res = self.model.generate(input_ids=ids, attention_mask=attn, generation_config=gen,
                                      tokenizer=tok if params.stop else None)
        seqs = res.sequences[:, P:].tolist()
        logps = None
        if params.logprobs:
            scores = torch.stack(res.scores, dim=1).float().log_softmax(-1)  # [B*n, T, V]
            chosen = res.sequences[:, P:P + scores.shape[1], None]
            logps = scores.gather(-1, chosen)[..., 0].tolist()
        out: list[list[Completion]] = []
        for i, p in enumerate(prompts):
            group = []
            for j in range(params.n):
                k = i * params.n + j
                toks = seqs[k]
                end = next((t + 1 for t, x in enumerate(toks) if x in stop_ids), None)
                reason = "stop" if end is not None else "length"
                toks = toks[:end] if end is not None else [x for x in toks if x != pad] if pad not in stop_ids \
                    else toks
                text_ids = toks[:-1] if reason == "stop" else toks
                text = tok.decode(text_ids, skip_special_tokens=True)
                if params.stop:
                    text, hit = truncate_at_stop(text, params.stop)
                    reason = "stop" if hit else reason
                lp = logps[k][:len(toks)] if logps is not None else None
                group.append(Completion(text=text, token_ids=toks, finish_reason=reason, logprobs=lp,
                                        prompt_tokens=len(p)))
            out.append(group)
        return out


@register_backend("openai")
class OpenAIBackend(Backend):
    """Any OpenAI-compatible server. `model` = base URL (`http://host:port/v1`), optionally `URL#name`;
    without a name the first entry of /v1/models is used. Requests run concurrently on a thread pool."""

    name = "openai"

    def __init__(self, model: str, api_key: str | None = None, max_retries: int = 2, timeout: float = 600.0,
                 concurrency: int = 32, **_: Any) -> None:
        import os

        import openai

        url, _, name = model.partition("#")
        if not url.startswith(("http://", "https://")):
            raise ThinkforgeError(f"openai backend: model must be a base URL like http://host:port/v1, got {model!r}")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.client = openai.OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    max_retries=max_retries, timeout=timeout)
        if not name:
            try:
                models = self.client.models.list().data
            except openai.OpenAIError as err:
                raise ThinkforgeError(f"openai backend: cannot list models at {url} ({err})") from None
            if not models:
                raise ThinkforgeError(f"openai backend: {url}/models lists no model")
            name = models[0].id
        self.model_name = name
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-backend")

    def _kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model_name, "n": params.n, "temperature": params.temperature,
                              "top_p": params.top_p, "max_tokens": params.max_tokens}
        if params.stop:
            kw["stop"] = params.stop
        if params.seed is not None:
            kw["seed"] = params.seed
        extra: dict[str, Any] = {}
        if params.top_k > 0:
            extra["top_k"] = params.top_k  # vLLM/SGLang extension
        if params.stop_token_ids:
            extra["stop_token_ids"] = params.stop_token_ids
        if extra:
            kw["extra_body"] = extra
        return kw

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        params.validate()
        kw = self._kwargs(params)
        if params.logprobs:
            kw["logprobs"] = 1

        def one(prompt: str) -> list[Completion]:
            r = self.client.completions.create(prompt=prompt, **kw)
            out = []
            for c in sorted(r.choices, key=lambda c: c.index):
                lp = list(c.logprobs.token_logprobs) if c.logprobs and c.logprobs.token_logprobs else None
                out.append(Completion(text=c.text, token_ids=[], finish_reason=c.finish_reason or "stop",
                                      logprobs=lp, prompt_tokens=r.usage.prompt_tokens if r.usage else 0))
            return out

        return list(self.pool.map(one, prompts))

    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        params.validate()
        kw = self._kwargs(params)
        if params.logprobs:
            kw["logprobs"] = True

        def one(messages: list[Message]) -> list[Completion]:
            r = self.client.chat.completions.create(messages=messages, **kw)
            out = []
            for c in sorted(r.choices, key=lambda c: c.index):
                lp = [t.logprob for t in c.logprobs.content] if c.logprobs and c.logprobs.content else None
                out.append(Completion(text=c.message.content or "", token_ids=[],
                                      finish_reason=c.finish_reason or "stop", logprobs=lp,
                                      prompt_tokens=r.usage.prompt_tokens if r.usage else 0))
            return out

        return list(self.pool.map(one, conversations))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()


@register_backend("vllm")
class VLLMBackend(Backend):
    """In-process `vllm.LLM` (optional extra `thinkforge[vllm]`); extra kwargs go to `vllm.LLM`."""

    name = "vllm"

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", seed: int = 0, **kwargs: Any) -> None:
        try:
            import vllm
        except ImportError:
            raise ThinkforgeError("backend 'vllm' needs vllm installed (pip install 'thinkforge[vllm]'); "
                                  "use backend 'native' instead") from None
        from thinkforge.engine.loading import check_model_path

        check_model_path(model)
        self._vllm = vllm
        kw: dict[str, Any] = {"model": model, "seed": seed, "dtype": dtype}
        kw.update(kwargs)
        self.llm = vllm.LLM(**kw)

    def _params(self, params: SamplingParams) -> Any:
        params.validate()
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            max_tokens=params.max_tokens, stop=params.stop or None, stop_token_ids=params.stop_token_ids or None,
            seed=params.seed, logprobs=0 if params.logprobs else None)

    def _convert(self, results: Any) -> list[list[Completion]]:
        out = []
        for r in results:
            group = []
            for c in r.outputs:
                lp = None
                if c.logprobs is not None:
                    lp = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=False)]
                group.append(Completion(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason or "stop",
                                        logprobs=lp, prompt_tokens=len(r.prompt_token_ids or [])))
            out.append(group)
        return out

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        return self._convert(self.llm.generate(prompts, self._params(params), use_tqdm=False))

    def chat(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        return self._convert(self.llm.chat(conversations, self._params(params), use_tqdm=False))
