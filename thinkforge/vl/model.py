"""The tiny VL model: a Qwen2.5-VL (MiMo-VL's architecture) created from config, and its checkpoints.

The ViT keeps the real geometry (patch 14, temporal patch 2, 2x2 merge, 112 px windows, full attention
in `fullatt_block_indexes`), only with fewer and narrower blocks; the merger (`model.visual.merger`) is
the projector; the LLM is a tiny Qwen2 with MRoPE. Checkpoints are plain HF directories that
`AutoModelForImageTextToText` loads unchanged, with weights under `model.visual.*`,
`model.language_model.*` and `lm_head`. A real Qwen2.5-VL / MiMo-VL checkpoint goes through `load_vl`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import atomic_dir
from thinkforge.vl.images import MERGE, PATCH


@dataclass
class TinyVLSpec:
    # LLM
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 4096
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])  # sums to head_dim / 2
    rope_theta: float = 10000.0
    # ViT
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_intermediate_size: int = 160
    window_size: int = 112  # pixels, as Qwen2.5-ViT
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1, 3])

    def check(self) -> None:
        head_dim = self.hidden_size // self.num_attention_heads
        if sum(self.mrope_section) * 2 != head_dim:
            raise ThinkforgeError(f"vl spec: mrope_section {self.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        if self.window_size // (MERGE * PATCH) < 1:
            raise ThinkforgeError(f"vl spec: window_size {self.window_size} is below one merged patch ({MERGE * PATCH} px)")
        if not self.fullatt_block_indexes or any(not 0 <= i < self.vision_depth for i in self.fullatt_block_indexes):
            # transformers silently uses window attention everywhere when every index is out of range
            raise ThinkforgeError(f"vl spec: fullatt_block_indexes {self.fullatt_block_indexes} must be blocks of "
                                  f"the {self.vision_depth}-block ViT")
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            raise ThinkforgeError("vl spec: ViT head dim must be a multiple of 4 (2D RoPE)")


VL_PRESETS = {
    "micro": TinyVLSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, mrope_section=[2, 3, 3], vision_depth=2, vision_hidden_size=32,
                        vision_heads=2, vision_intermediate_size=64, fullatt_block_indexes=[1]),
    "tiny": TinyVLSpec(),
}


def tiny_vl_config(tokenizer: Any, spec: TinyVLSpec) -> Any:
    from transformers import Qwen2_5_VLConfig

    from thinkforge.model.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    spec.check()
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]), strict=True))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                 "mrope_section": list(spec.mrope_section)},
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, bos_token_id=None)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, num_heads=spec.vision_heads,
                  intermediate_size=spec.vision_intermediate_size, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=2, window_size=spec.window_size, out_hidden_size=spec.hidden_size,
                  fullatt_block_indexes=list(spec.fullatt_block_indexes))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build_tiny_vl_model(tokenizer: Any, spec: TinyVLSpec, seed: int) -> Any:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(tokenizer, spec))
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_vl(texts: list[str], spec: TinyVLSpec | str = "tiny", seed: int = 0, vocab_size: int = 512) -> tuple[Any, Any]:
    """(model, processor) from scratch: a tokenizer trained on `texts` plus the vision tokens."""
    from thinkforge.model.tokenizer import train_vl_tokenizer
    from thinkforge.vl.processor import VLProcessor, make_image_processor

    spec = VL_PRESETS[spec] if isinstance(spec, str) else spec
    tokenizer = train_vl_tokenizer(texts, vocab_size)
    return build_tiny_vl_model(tokenizer, spec, seed), VLProcessor(tokenizer, make_image_processor())


def module_parameters(model: Any) -> dict[str, int]:
    """Parameter counts of the parts MiMo-VL freezes separately: projector (merger), ViT without the
    projector, and LLM (embeddings, blocks, norm, head; tied embeddings counted once)."""
    merger = sum(p.numel() for p in model.model.visual.merger.parameters())
    visual = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"projector": merger, "vit": visual - merger, "llm": total - visual, "total": total}


def save_vl(model: Any, processor: Any, out_dir: str | Path, extra: dict[str, str] | None = None) -> Path:
    """An HF directory, atomically: weights keep transformers' current names (`model.visual.*`,
    `model.language_model.*`), not the legacy layout `save_pretrained` reverts to by default."""
    from thinkforge.model.io import quiet_hf

    quiet_hf()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=False)
        processor.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        os.sync() if hasattr(os, "sync") else None
    return out_dir


VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def is_vl_checkpoint(path: str | Path) -> bool:
    """True for a local HF directory whose config is a Qwen2-VL / Qwen2.5-VL (MiMo-VL) model."""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in VL_MODEL_TYPES
    except (OSError, ValueError):
        return False


def load_vl(path: str | Path, device: str = "auto", dtype: str | Any = "auto") -> tuple[Any, Any]:
    """(model, processor) for a local directory or hub id, on `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForImageTextToText

    from thinkforge.model.io import check_model_path, quiet_hf, resolve_device, resolve_dtype
    from thinkforge.vl.processor import VLProcessor

    quiet_hf()
    check_model_path(str(path))
    device = resolve_device(device)
    processor = VLProcessor.from_pretrained(path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as err:
        raise ThinkforgeError(f"model {path}: cannot load as a VL model ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), processor
