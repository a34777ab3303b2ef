"""A small Bradley-Terry reward model for MiMo-VL's human-preference rewards, in miniature.

MiMo-VL mixes Bradley-Terry reward models into its per-task router for the tasks without a verifier. This
one scores (prompt, images, response) with a few thousand parameters, so it trains and runs on a CPU in
seconds: the first image is area-averaged to `image_side` x `image_side` RGB (white = 0), the prompt's and
the response's words and word bigrams are hashed into `buckets` embeddings (mean-pooled), and an MLP reads
[image, response, prompt, image * response]. Trained with the Bradley-Terry loss -log sigmoid(s_chosen -
s_rejected) (`thinkforge.train.reward_model`); as a reward its score goes through a fixed affine map (the
training scores' mean and standard deviation, stored with the weights) and a sigmoid, into [0, 1].

Checkpoints are a directory with `config.json` and `model.safetensors`, written atomically.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thinkforge.errors import ThinkforgeError


@dataclass
class BTSpec:
    image_side: int = 8  # the image is pooled to side x side x 3 features
    buckets: int = 256  # hashed word / bigram vocabulary
    dim: int = 16
    hidden: int = 64

    def check(self) -> None:
        if self.image_side < 1 or self.buckets < 16 or self.dim < 1 or self.hidden < 1:
            raise ThinkforgeError(f"bt reward model: bad spec {asdict(self)}")


WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def hashed(text: str, buckets: int) -> list[int]:
    """Bucket ids of the words and word bigrams of `text` (crc32: the same on every machine and run)."""
    ws = words(text)
    grams = ws + [f"{a} {b}" for a, b in zip(ws, ws[1:], strict=False)]
    return [zlib.crc32(g.encode()) % buckets for g in grams] or [0]


def image_features(images: list[Any], side: int, where: str) -> torch.Tensor:
    """The first image pooled to side x side (1 - RGB / 255, so a white background is 0); zeros with no image."""
    if not images:
        return torch.zeros(3 * side * side)
    import numpy as np
    from PIL import Image

    from thinkforge.vl.images import MAX_DECODE_PIXELS, decode_image

    img = decode_image(images[0], where, max_pixels=MAX_DECODE_PIXELS).resize((side, side), Image.Resampling.BOX)
    return 1.0 - torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)


class BTRewardModel(nn.Module):
    def __init__(self, spec: BTSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or BTSpec()
        self.spec.check()
        s = self.spec
        self.response_emb = nn.EmbeddingBag(s.buckets, s.dim, mode="mean")
        self.prompt_emb = nn.EmbeddingBag(s.buckets, s.dim, mode="mean")
        self.image_proj = nn.Linear(3 * s.image_side * s.image_side, s.dim)
        self.head = nn.Sequential(nn.Linear(4 * s.dim + 1, s.hidden), nn.Tanh(), nn.Linear(s.hidden, 1))
        # The fixed affine map a raw score goes through before the sigmoid (set by `calibrate` after training),
        # so rewards spread over (0, 1) instead of saturating at 0 or 1 where BT scores grow large.
        self.register_buffer("score_shift", torch.zeros(()))
        self.register_buffer("score_scale", torch.ones(()))

    def features(self, prompt: str, response: str, images: list[Any], where: str = "sample") -> dict[str, Any]:
        """Inputs for one sample; `images` are anything `decode_image` reads (a task's base64 PNGs)."""
        return {"image": image_features(images, self.spec.image_side, where),
                "prompt": hashed(prompt, self.spec.buckets), "response": hashed(response, self.spec.buckets),
                "length": min(len(words(response)), 50) / 10.0}

    def forward(self, batch: list[dict[str, Any]]) -> torch.Tensor:
        """Scores [B] of feature dicts (`features`)."""
        device = self.image_proj.weight.device

        def bag(key: str) -> tuple[torch.Tensor, torch.Tensor]:
            ids = [f[key] for f in batch]
            offsets = torch.tensor([0] + [len(i) for i in ids[:-1]], device=device).cumsum(0)
            return torch.tensor([t for i in ids for t in i], device=device), offsets

        img = self.image_proj(torch.stack([f["image"] for f in batch]).to(device))
        resp = self.response_emb(*bag("response"))
        prompt = self.prompt_emb(*bag("prompt"))
        length = torch.tensor([[f["length"]] for f in batch], device=device)
        return self.head(torch.cat([img, resp, prompt, img * resp, length], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def calibrate(self, batch: list[dict[str, Any]]) -> None:
        """Sets the affine map to centre and scale the scores of `batch` (both sides of the training pairs)."""
        scores = self(batch).double()
        self.score_shift.fill_(float(scores.mean()))
        self.score_scale.fill_(max(float(scores.std()), 1e-6))

    @torch.no_grad()
    def reward(self, prompt: str, response: str, images: list[Any], where: str = "sample") -> float:
        """sigmoid((score - shift) / scale), in [0, 1] (computed in float64)."""
        self.eval()
        score = self([self.features(prompt, response, images, where)])[0].double()
        return float(torch.sigmoid((score - self.score_shift.double()) / self.score_scale.double()))


def save_bt(model: BTRewardModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from thinkforge.utils import atomic_dir

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"model_type": "thinkforge_bt_reward", "spec": asdict(model.spec),
                                                     **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_bt(path: str | Path, device: str = "cpu") -> BTRewardModel:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists() or not (path / "model.safetensors").exists():
        raise ThinkforgeError(f"bt reward model {path}: no config.json + model.safetensors there")
    try:
        cfg = json.loads(cfg_file.read_text())
        spec = BTSpec(**cfg["spec"])
    except (ValueError, KeyError, TypeError) as err:
        raise ThinkforgeError(f"bt reward model {cfg_file}: bad config ({type(err).__name__}: {err})") from None
    if cfg.get("model_type") != "thinkforge_bt_reward":
        raise ThinkforgeError(f"bt reward model {cfg_file}: model_type is {cfg.get('model_type')!r}, "
                              "not 'thinkforge_bt_reward'")
    model = BTRewardModel(spec)
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as err:
        raise ThinkforgeError(f"bt reward model {path}: weights do not match the config "
                              f"({str(err).splitlines()[0][:200]})") from None
    return model.to(device).eval()
