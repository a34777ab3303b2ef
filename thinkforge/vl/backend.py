"""Generation with images behind the engine's `Backend` contract: `hf-vl`, plain HF `generate` on a
Qwen2.5-VL-architecture checkpoint, so `thinkforge.eval.evaluate` (and anything else that talks to a
`Backend`) runs the visual tasks unchanged.

Messages may carry Qwen2-VL / OpenAI content parts: {"type": "image", "image": <data URL | base64 |
bytes | PIL>}, {"type": "image_url", "image_url": {"url": <data URL>}} and {"type": "text", "text": ...};
a plain-string content may use `<image>` placeholders, one per part-less image in `images`. Vision
tokens (vision start/end, image and video pads) are suppressed in sampling: the model only reads them.
Prompts are left-padded; `mm_token_type_ids` is always passed so 3D MRoPE positions are used.
"""

from __future__ import annotations

from typing import Any

from thinkforge.engine.base import Backend, Completion, SamplingParams, register_backend
from thinkforge.errors import ThinkforgeError


def split_images(messages: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with image parts reduced to {"type": "image"}, the images in order)."""
    out, images, _ = split_images_named(messages, where)
    return out, images


def split_images_named(messages: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[Any], list[str]]:
    """`split_images` plus each image's field name (`<where>.messages[i].content[j]`) for error messages."""
    if not isinstance(messages, list) or not messages:
        raise ThinkforgeError(f"{where}: expected a non-empty list of messages")
    out, images, names = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ThinkforgeError(f"{where}.messages[{i}]: expected {{'role': ..., 'content': ...}}")
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ThinkforgeError(f"{where}.messages[{i}].content: expected a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                if part.get("image") is None:
                    raise ThinkforgeError(f"{where}.messages[{i}].content[{j}]: image part without an image")
                images.append(part["image"])
                names.append(f"{where}.messages[{i}].content[{j}].image")
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ThinkforgeError(f"{where}.messages[{i}].content[{j}]: image_url without a url")
                images.append(url)
                names.append(f"{where}.messages[{i}].content[{j}].image_url")
                parts.append({"type": "image"})
            else:
                raise ThinkforgeError(f"{where}.messages[{i}].content[{j}]: unknown content part {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out, images, names


@register_backend("hf-vl")
class HFVLBackend(Backend):
    """HF `generate` for VL checkpoints (a directory or hub id, or an already loaded `(model, processor)`)."""

    name = "hf-vl"

    def __init__(self, model: str | tuple[Any, Any], device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 **_: Any) -> None:
        from thinkforge.vl.model import load_vl

        if isinstance(model, tuple):
            self.model, self.processor = model
            self.model_name = getattr(self.model, "name_or_path", "") or "in-memory"
        else:
            self.model, self.processor = load_vl(model, device=device, dtype=dtype)
            self.model_name = model
        self.tokenizer = self.processor.tokenizer
        self.batch_size = batch_size
        self.context = int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 1 << 30)

    def encode_chat(self, conversation: list[dict[str, Any]], where: str) -> Any:
        messages, images, names = split_images_named(conversation, where)
        return self.processor.encode_chat(messages, images, where=where, image_names=names)

    def chat(self, conversations: list[list[dict[str, Any]]], params: SamplingParams) -> list[list[Completion]]:
        return self.generate_encoded([self.encode_chat(c, f"conversation {i}") for i, c in enumerate(conversations)],
                                     params)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ThinkforgeError(f"prompt {i}: expected a string, got {type(p).__name__}")
        return self.generate_encoded([self.processor.encode(p, [], where=f"prompt {i}") for i, p in enumerate(prompts)],
                                     params)

    def generate_encoded(self, encs: list[Any], params: SamplingParams) -> list[list[Completion]]:
        params.validate()
        for i, e in enumerate(encs):
            if e.length >= self.context:
                raise ThinkforgeError(f"prompt {i} has {e.length} tokens; the model's context is {self.context}")
        out: list[list[Completion]] = []
        for start in range(0, len(encs), self.batch_size):
            out += self._chunk(encs[start:start + self.batch_size], params)
        return out

    def _chunk(self, encs: list[Any], params: SamplingParams) -> list[list[Completion]]:
        import torch

        from thinkforge.engine.backends import hf_generation_config

        tok = self.tokenizer
        batch = self.processor.collate(encs, padding_side="left", device=self.model.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        P = batch["input_ids"].shape[1]
        gen, stop_ids, _ = hf_generation_config(self.model, tok, params, P, self.context,
                                                suppress_tokens=self.processor.vision_token_ids)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            res = self.model.generate(**batch, generation_config=gen, tokenizer=tok if params.stop else None)
        seqs = res.sequences[:, P:].tolist()
        logps = None
        if params.logprobs:
            scores = torch.stack(res.scores, dim=1).float().log_softmax(-1)
            logps = scores.gather(-1, res.sequences[:, P:P + scores.shape[1], None])[..., 0].tolist()
        from thinkforge.engine.backends import truncate_at_stop

        out: list[list[Completion]] = []
        for i, e in enumerate(encs):
            group = []
            for j in range(params.n):
                k = i * params.n + j
                toks = seqs[k]
                end = next((t + 1 for t, x in enumerate(toks) if x in stop_ids), None)
                reason = "stop" if end is not None else "length"
                toks = toks[:end] if end is not None else toks
                text = tok.decode(toks[:-1] if reason == "stop" else toks, skip_special_tokens=True)
                if params.stop:
                    text, hit = truncate_at_stop(text, params.stop)
                    reason = "stop" if hit else reason
                lp = logps[k][:len(toks)] if logps is not None else None
                group.append(Completion(text=text, token_ids=toks, finish_reason=reason, logprobs=lp,
                                        prompt_tokens=e.length))
            out.append(group)
        return out
