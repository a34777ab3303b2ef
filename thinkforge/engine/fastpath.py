"""A lean forward for Llama-family decoders (Qwen2/Qwen3/Llama/Mistral), using the HF model's own weights.

Why: on small models the HF `forward` is dominated by per-call Python (output-capturing decorators,
mask preparation, kwargs plumbing, ~10 module calls per layer). This path runs the same math in the
same order on the same modules' tensors (`F.linear` on `q_proj.weight`, HF's RMSNorm formula op for op,
the model's own rotary module, SDPA with the GQA packing HF uses), so logits match HF bit-for-bit on CPU (tested via
greedy identity with `generate`) at a fraction of the overhead. Weights are read from the modules on
every call, so `load_weights` (in-place copies) and a trainer updating the model are both seen.

Anything else (other architectures, sliding-window layers, non-SDPA attention) uses the HF forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = {"qwen2", "qwen3", "llama", "mistral"}


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """HF's Llama-family RMSNorm forward, op for op (so bit-identical), without the module call."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _is_rms_norm(norm: Any) -> bool:
    # The Llama-family RMSNorm classes (Qwen2/Qwen3/Llama/Mistral) share `rms_norm`'s exact formula.
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


def fused_rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The same normalisation as one ATen kernel: cheaper, equal up to rounding (used for MTP drafts)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LeanDecoder:
    """`forward(input_ids, mask, position_ids, cache) -> last-position logits [B, V]`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_rep = attn.num_key_value_groups
        self.scaling = attn.scaling

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
            return False
        if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":  # eager/flash round differently
            return False
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            return False
        inner = getattr(model, "model", None)
        if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        layer = inner.layers[0]
        need = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling")
        norms = [inner.norm, layer.input_layernorm, layer.post_attention_layernorm]
        return all(hasattr(layer.self_attn, a) for a in need) and all(
            hasattr(layer.mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and all(
            _is_rms_norm(n) for n in norms + [getattr(layer.self_attn, a) for a in ("q_norm", "k_norm")
                                              if hasattr(layer.self_attn, a)])

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        inner = self.model.model
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(x, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = self.block(layer, x, cos, sin, mask, cache, i)
        x = rms_norm(inner.norm, x[:, -1:, :])
        return self.model.lm_head(x)[:, -1, :]

    def block(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              cache: Any, cache_idx: int, norm: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
              ) -> torch.Tensor:
        """One decoder layer (HF's op order). `norm` defaults to the bit-exact `rms_norm`; MTP drafts,
        which the main model verifies anyway, pass the one-kernel `fused_rms_norm`."""
        norm = norm or rms_norm
        B, T, _ = x.shape
        D = self.head_dim
        attn = layer.self_attn
        h = norm(layer.input_layernorm, x)
        q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, T, -1, D)
        k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, T, -1, D)
        v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, T, -1, D).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        k, v = cache.update(k, v, cache_idx)
        o = self._attention(q, k, v, mask)
        x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), attn.o_proj.weight, attn.o_proj.bias)
        h = norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        g = mlp.act_fn(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
        return x + F.linear(g * F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight,
                            mlp.down_proj.bias)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n_rep = self.n_rep
        B, H, T, D = q.shape
        if n_rep > 1 and T == 1:
            # As HF does for one query token: fold the query heads of a KV group into the query axis
            # instead of materialising repeated keys/values.
            o = F.scaled_dot_product_attention(q.reshape(B, H // n_rep, n_rep, D), k, v, attn_mask=mask,
                                               scale=self.scaling)
            return o.reshape(B, H, 1, D)
        if n_rep > 1:
            k = k[:, :, None].expand(B, k.shape[1], n_rep, k.shape[2], D).reshape(B, H, k.shape[2], D)
            v = v[:, :, None].expand(B, v.shape[1], n_rep, v.shape[2], D).reshape(B, H, v.shape[2], D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
