"""The VL processor: chat rendering, image checks and Qwen2.5-VL's image-token expansion.

It produces what `Qwen2_5_VLProcessor` produces (each `<|image_pad|>` expanded to prod(grid_thw) / 4
tokens, `pixel_values` [patches, 3*2*14*14], `image_grid_thw`, and `mm_token_type_ids`, without which
transformers 5.x silently falls back from 3D MRoPE to 1D positions), and it saves the files
`AutoProcessor.from_pretrained` reads. It exists because transformers' own processor class cannot be
built without torchvision (its video processor needs it), and CPU-only installs have none; the image
processor itself is transformers' (its PIL backend), so pixels and grids are identical.

A prompt's image tokens are never truncated: callers drop overlong samples whole (`VLEncoding.length`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.model.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from thinkforge.vl.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, MERGE, PATCH, decode_image

PLACEHOLDER = "<image>"  # plain-text placeholder accepted in prompts, same as an image content part
IMAGE_BLOCK = VISION_START + IMAGE_PAD + VISION_END


@dataclass
class VLEncoding:
    """One tokenized prompt (or prompt + response) with its images."""

    input_ids: list[int]
    mm_token_type_ids: list[int]  # 1 on image tokens, 0 elsewhere
    pixel_values: torch.Tensor | None = None  # [patches, 1176]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    def __len__(self) -> int:  # stands in for a token-id list where only the length is read (serve)
        return len(self.input_ids)


def make_image_processor(min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH,
                                    merge_size=MERGE, temporal_patch_size=2)


class VLProcessor:
    """Tokenizer (with the vision tokens) + Qwen2-VL image processor."""

    def __init__(self, tokenizer: Any, image_processor: Any, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.max_image_pixels = max_image_pixels
        ids = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
        unk = tokenizer.unk_token_id
        if any(i is None or i == unk for i in ids):
            raise ThinkforgeError("VL processor: the tokenizer lacks the vision tokens "
                                  f"{VISION_START} {VISION_END} {IMAGE_PAD} {VIDEO_PAD}")
        self.vision_start_id, self.vision_end_id, self.image_token_id, self.video_token_id = ids
        self.merge = int(getattr(image_processor, "merge_size", MERGE))

    # The tokenizer attributes trainers read (pad id, end of turn), so a processor stands in for a tokenizer.
    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vision_token_ids(self) -> list[int]:
        """Ids a sampler must never emit (the model only ever reads them)."""
        return [self.vision_start_id, self.vision_end_id, self.image_token_id, self.video_token_id]

    # ------------------------------------------------------------------ text
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def image_tokens(self, grid_thw: torch.Tensor) -> int:
        return int(grid_thw.prod()) // (self.merge * self.merge)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, images: list[Any] | None = None, where: str = "prompt",
               image_names: list[str] | None = None) -> VLEncoding:
        """Tokenizes `text` (already rendered; `<image>` or `<|vision_start|><|image_pad|><|vision_end|>` per
        image), expanding each image placeholder to its image's token count. Errors name `where` (and
        `image_names[i]`, e.g. the content part an image came from, for an image that fails to decode)."""
        images = list(images or [])
        names = image_names or [f"{where}.images[{i}]" for i in range(len(images))]
        text = text.replace(PLACEHOLDER, IMAGE_BLOCK)
        n_slots = text.count(IMAGE_PAD)
        for i, img in enumerate(images):
            if img is None:
                raise ThinkforgeError(f"{where}: image {i} is missing (None) for its placeholder")
        if n_slots > len(images):
            raise ThinkforgeError(f"{where}: {n_slots} image placeholders but {len(images)} images "
                                  f"(placeholder {len(images) + 1} has no image)")
        if n_slots < len(images):
            raise ThinkforgeError(f"{where}: {len(images)} images but only {n_slots} image placeholders")
        pixel_values = grid = None
        if images:
            decoded = [decode_image(img, names[i], self.max_image_pixels) for i, img in enumerate(images)]
            out = self.image_processor(images=decoded, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            pieces = text.split(IMAGE_PAD)
            text = pieces[0] + "".join(IMAGE_PAD * self.image_tokens(g) + p for g, p in zip(grid, pieces[1:], strict=True))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        types = [int(t == self.image_token_id) for t in ids]
        expected = sum(self.image_tokens(g) for g in grid) if grid is not None else 0
        if sum(types) != expected:  # the model would raise "image features and image tokens do not match"
            raise ThinkforgeError(f"{where}: {sum(types)} image tokens after tokenization, expected {expected} "
                                  "(an image token inside the prompt text?)")
        return VLEncoding(ids, types, pixel_values, grid)

    def encode_chat(self, messages: list[dict[str, Any]], images: list[Any] | None = None, where: str = "prompt",
                    add_generation_prompt: bool = True, image_names: list[str] | None = None) -> VLEncoding:
        return self.encode(self.render(messages, add_generation_prompt), images, where, image_names)

    def extend(self, enc: VLEncoding, token_ids: list[int]) -> VLEncoding:
        """`enc` followed by text tokens (a response): images unchanged, new tokens are text."""
        return VLEncoding(enc.input_ids + list(token_ids), enc.mm_token_type_ids + [0] * len(token_ids),
                          enc.pixel_values, enc.image_grid_thw)

    def collate(self, rows: list[VLEncoding], padding_side: str = "right", device: Any = None) -> dict[str, torch.Tensor]:
        """A padded batch: input_ids, attention_mask, mm_token_type_ids [B, T]; pixel_values and
        image_grid_thw concatenated in row order (what the model's forward expects)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(r.length for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - r.length, width) if padding_side == "left" else slice(0, r.length)
            ids[i, sl] = torch.tensor(r.input_ids)
            attn[i, sl] = 1
            types[i, sl] = torch.tensor(r.mm_token_type_ids)
        batch = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": types}
        pv = [r.pixel_values for r in rows if r.pixel_values is not None]
        if pv:
            batch["pixel_values"] = torch.cat(pv)
            batch["image_grid_thw"] = torch.cat([r.image_grid_thw for r in rows if r.image_grid_thw is not None])
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path: str | Path) -> None:
        """Tokenizer files + `preprocessor_config.json` naming `Qwen2_5_VLProcessor`, as HF writes them."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        cfg_file = path / "preprocessor_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["processor_class"] = "Qwen2_5_VLProcessor"
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (path / "chat_template.jinja").write_text(self.tokenizer.chat_template or "")

    @classmethod
    def from_pretrained(cls, path: str | Path, max_image_pixels: int | None = None) -> VLProcessor:
        """From any Qwen2-VL / Qwen2.5-VL / MiMo-VL directory or hub id (tokenizer + preprocessor config)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from thinkforge.model.io import check_model_path

        check_model_path(str(path))
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        except OSError as err:
            raise ThinkforgeError(f"model {path}: cannot load the VL processor ({str(err).splitlines()[0]})") from None
        template = Path(path) / "chat_template.jinja"
        if not getattr(tok, "chat_template", None) and template.exists():
            tok.chat_template = template.read_text()
        cap = max_image_pixels or int(image_processor.size.get("longest_edge", DEFAULT_MAX_PIXELS))
        return cls(tok, image_processor, cap)
