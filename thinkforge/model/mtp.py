"""Multi-Token Prediction (MTP) layers laid out exactly like MiMo-7B's released checkpoints.

MTP layer i (0-based) at position t reads the previous hidden state (the main model's final, normed
hidden state h_t for i = 0, the output of MTP layer i-1 for i > 0) and the embedding of token
x_{t+i+1}, and predicts token x_{t+i+2} through the main model's shared LM head:

    g = final_layernorm(block(input_proj(cat[hidden_layernorm(prev), token_layernorm(embed(x))])))

`block` is one decoder layer of the base architecture (Qwen2DecoderLayer for Qwen2/MiMo), built from
the model's own decoder-layer class, so its weights are named like a normal layer's. Parameter names
are MiMo's (`model.mtp_layers.{i}.token_layernorm.weight`, `...hidden_layernorm`, `...input_proj`,
`...final_layernorm`, `...input_layernorm`, `...self_attn.q_proj`, `...mlp.gate_proj`, ...), the order
of the concatenation is [hidden, embedding] (vLLM `mimo_mtp.py`), and, as there, the embedding is
zeroed at position 0. The config key is `num_nextn_predict_layers`.

Because the layers live at `model.model.mtp_layers`, `save_pretrained` writes them into the same
safetensors as the main model, and plain `AutoModelForCausalLM.from_pretrained` of a Qwen2 checkpoint
ignores them (unexpected keys). `load_mtp_layers` re-attaches them; `thinkforge.model.io.load_model`
does so automatically. Checkpoints with `model_type: mimo` (MiMo's own) load through the Auto classes
registered here, MTP layers included.

This module defines layers and losses only; MiMo's extension *training* recipe (`thinkforge mtp-extend`)
lives in `thinkforge.train.mtp_extend`, so model code imports no trainer.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thinkforge.engine.kvcache import cache_kwargs
from thinkforge.errors import ThinkforgeError

PREFIX = "model.mtp_layers."
CONFIG_KEY = "num_nextn_predict_layers"


# ----------------------------------------------------------------------------- structure
def num_mtp_layers(model: Any) -> int:
    layers = getattr(getattr(model, "model", None), "mtp_layers", None)
    return len(layers) if layers is not None else 0


def mtp_layers(model: Any) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "mtp_layers", None)
    if layers is None or len(layers) == 0:
        raise ThinkforgeError("model has no MTP layers (config num_nextn_predict_layers is 0 or missing)")
    return layers


def _inner(model: Any) -> Any:
    inner = getattr(model, "model", None)
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in need) or not hasattr(model, "lm_head"):
        raise ThinkforgeError(f"MTP layers need a decoder-only HF model with model.{{{', '.join(need)}}} and "
                              f"lm_head; {type(model).__name__} does not have them")
    return inner


def build_mtp_layer(model: Any, index: int) -> nn.Module:
    """One MTP layer for `model`: a fresh decoder layer of the base architecture (its attention uses
    cache slot num_hidden_layers + index, as in vLLM) plus MiMo's norms and input projection."""
    inner = _inner(model)
    cfg = model.config
    h = cfg.hidden_size
    eps = getattr(cfg, "rms_norm_eps", 1e-6)
    # Built as layer 0 (per-layer config lists such as layer_types only cover the main layers, and
    # MiMo's own code does the same), then pointed at its own KV-cache slot after the main layers.
    layer = type(inner.layers[0])(cfg, layer_idx=0)
    layer.self_attn.layer_idx = cfg.num_hidden_layers + index
    norm_cls = type(inner.norm)
    layer.token_layernorm = norm_cls(h, eps=eps)
    layer.hidden_layernorm = norm_cls(h, eps=eps)
    layer.input_proj = nn.Linear(2 * h, h, bias=False)
    layer.final_layernorm = norm_cls(h, eps=eps)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, norm_cls):
                mod.weight.fill_(1.0)
    p = next(model.parameters())
    return layer.to(device=p.device, dtype=p.dtype)


def add_mtp_layers(model: Any, n: int) -> nn.ModuleList:
    """Attaches `n` freshly initialised MTP layers (replacing any) and records n in the config."""
    if n < 0:
        raise ThinkforgeError(f"mtp_layers must be >= 0, got {n}")
    inner = _inner(model)
    inner.mtp_layers = nn.ModuleList([build_mtp_layer(model, i) for i in range(n)])
    setattr(model.config, CONFIG_KEY, n)
    return inner.mtp_layers


def extend_mtp_layers(model: Any, k: int) -> nn.ModuleList:
    """MiMo's extension recipe, step 1: copies MTP layer 0 into layers 1..k-1 (k layers in all).
    Existing layers 1.. are replaced by copies of layer 0."""
    layers = mtp_layers(model)
    if k < 1:
        raise ThinkforgeError(f"--layers must be >= 1, got {k}")
    first = layers[0]
    new = [first]
    for i in range(1, k):
        layer = copy.deepcopy(first)
        layer.self_attn.layer_idx = model.config.num_hidden_layers + i
        new.append(layer)
    _inner(model).mtp_layers = nn.ModuleList(new)
    setattr(model.config, CONFIG_KEY, k)
    return _inner(model).mtp_layers


def freeze_mtp(model: Any, frozen: bool = True) -> int:
    """Stops (or restarts) gradients into the MTP layers; returns how many tensors changed. RL calls
    this by default: MiMo keeps MTP layers frozen during RL, and an optimizer built afterwards skips
    them (make_optimizer only takes parameters that require grad)."""
    layers = getattr(getattr(model, "model", None), "mtp_layers", None)
    if layers is None:
        return 0
    n = 0
    for p in layers.parameters():
        p.requires_grad_(not frozen)
        n += 1
    return n


def freeze_for_extension(model: Any, first: int = 1) -> list[str]:
    """MiMo's extension recipe, step 2: everything frozen except MTP layers `first`.. (MiMo: 1..);
    returns trainable names."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = mtp_layers(model)
    for layer in list(layers)[first:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- forward
def mtp_layer_forward(layer: nn.Module, prev_hidden: torch.Tensor, token_embeds: torch.Tensor,
                      position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None = None, past_key_values: Any = None) -> torch.Tensor:
    """One MTP layer through the HF modules (training and the generic inference path)."""
    # Zeroed at position 0, as vLLM does for MiMo's weights (RMSNorm of zeros is zeros).
    token_embeds = token_embeds.masked_fill((position_ids == 0)[..., None], 0.0)
    x = layer.input_proj(torch.cat([layer.hidden_layernorm(prev_hidden), layer.token_layernorm(token_embeds)], -1))
    out = layer(x, attention_mask=attention_mask, position_ids=position_ids, use_cache=past_key_values is not None,
                position_embeddings=position_embeddings, **cache_kwargs(layer, past_key_values))
    if isinstance(out, tuple):  # older decoder layers return (hidden, ...)
        out = out[0]
    return layer.final_layernorm(out)


def _roll(t: torch.Tensor, shift: int, fill: int) -> torch.Tensor:
    """t shifted left by `shift` along the sequence, the tail filled with `fill`."""
    out = torch.full_like(t, fill)
    if shift < t.shape[1]:
        out[:, : t.shape[1] - shift] = t[:, shift:]
    return out


def _causal_mask(model: Any, T: int, device: Any, dtype: Any) -> torch.Tensor | None:
    # SDPA/flash apply causality themselves when given no mask; eager needs it spelled out.
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return None
    m = torch.full((T, T), torch.finfo(dtype).min, device=device, dtype=dtype).triu_(1)
    return m[None, None]


def mtp_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Full-sequence forward for training: (main logits [B, T, V], [MTP layer i logits [B, T, V]]).
    MTP layer i's logits at t predict input token t + i + 2 (last i + 1 positions have no target)."""
    inner = _inner(model)
    mlayers = mtp_layers(model)
    n = len(mlayers) if layers is None else layers
    out = inner(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state  # already through the final norm, as MiMo feeds it
    logits = model.lm_head(hidden)
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    pe = inner.rotary_emb(hidden, pos)
    mask = _causal_mask(model, T, hidden.device, hidden.dtype)
    outs = []
    prev = hidden
    for i in range(n):
        emb = inner.embed_tokens(_roll(input_ids, i + 1, 0))
        prev = mtp_layer_forward(mlayers[i], prev, emb, pos, pe, mask)
        outs.append(model.lm_head(prev))
    return logits, outs


def mtp_weight(step: int, total_steps: int, start: float = 0.3, end: float | None = None,
               switch: float = 0.4) -> float:
    """MiMo's schedule: `start` (0.3) for the first `switch` of training (10T of 25T tokens), then `end`
    (default start / 3, i.e. 0.1)."""
    end = start / 3 if end is None else end
    return start if step < switch * max(total_steps, 1) else end


def mtp_lm_loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor, *, weight: float = 0.3, step: int = 0,
                total_steps: int = 1, attention_mask: torch.Tensor | None = None,
                train_layers: list[int] | None = None, include_main: bool = True,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """main next-token loss + w(step) * mean over MTP layers of their losses (`labels` as for HF causal
    LMs already shifted: labels[t] is the target of inputs[t]; -100 = ignored, e.g. SFT prompt tokens).

    Pretraining calls it through its hook; SFT calls it with its masked labels and attention mask.
    `train_layers` restricts the MTP term to some layers (the extension recipe trains 1..k-1);
    `include_main=False` drops the main loss (frozen main model). Extras: lm_loss, mtp_loss_i,
    mtp_acc_i (top-1 accuracy of layer i's prediction), mtp_weight."""
    import torch.nn.functional as F

    logits, mtp_logits = mtp_forward(model, inputs, attention_mask)
    main = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    w = mtp_weight(step, total_steps, weight)
    extras: dict[str, float] = {"lm_loss": main.item(), "mtp_weight": w}
    use = list(range(len(mtp_logits))) if train_layers is None else train_layers
    terms = []
    for i, lg in enumerate(mtp_logits):
        target = _roll(labels, i + 1, -100)
        valid = target != -100
        if not bool(valid.any()):
            continue
        li = F.cross_entropy(lg.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        extras[f"mtp_loss_{i}"] = li.item()
        with torch.no_grad():
            extras[f"mtp_acc_{i}"] = ((lg.argmax(-1) == target) & valid).sum().item() / valid.sum().item()
        if i in use:
            terms.append(li)
    mtp = torch.stack(terms).mean() if terms else logits.new_zeros(())
    loss = (main if include_main else 0.0) + w * mtp
    return loss, extras


def mtp_self_distill_loss(model: Any, inputs: torch.Tensor, *, train_layers: list[int] | None = None,
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-distillation of the MTP layers onto the frozen main model (Medusa-2 / EAGLE's draft target):
    layer i at t is trained towards the main model's own next-token distribution at t + i + 1, the one
    that speculative decoding verifies its draft against, instead of the document's next token. Soft
    cross-entropy (KL up to the teacher's entropy), mean over positions that have a target. Extras:
    mtp_kl_i and mtp_agree_i (layer i's argmax equals the main model's: its greedy acceptance rate under
    teacher forcing)."""
    logits, mtp_logits = mtp_forward(model, inputs)
    use = list(range(len(mtp_logits))) if train_layers is None else train_layers
    extras: dict[str, float] = {}
    terms = []
    for i, lg in enumerate(mtp_logits):
        T = inputs.shape[1] - i - 1  # positions whose target position t + i + 1 exists
        if T < 1:
            continue
        with torch.no_grad():
            teacher = logits[:, i + 1:].float()
            p = teacher.softmax(-1)
            entropy = -(p * teacher.log_softmax(-1)).sum(-1).mean()
        logq = lg[:, :T].float().log_softmax(-1)
        ce = -(p * logq).sum(-1).mean()
        extras[f"mtp_kl_{i}"] = (ce - entropy).item()
        with torch.no_grad():
            extras[f"mtp_agree_{i}"] = (lg[:, :T].argmax(-1) == teacher.argmax(-1)).float().mean().item()
        if i in use:
            terms.append(ce)
    loss = torch.stack(terms).mean() if terms else logits.new_zeros(())
    return loss, extras


# ----------------------------------------------------------------------------- checkpoints
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise ThinkforgeError(f"{index}: unreadable safetensors index ({err})") from None
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    return files


def read_mtp_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All `model.mtp_layers.*` tensors of a checkpoint directory (any shard), names without the prefix."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(PREFIX):
                    out[key[len(PREFIX):]] = fh.get_tensor(key)
    return out


def checkpoint_mtp_layers(path: str | Path) -> int:
    """`num_nextn_predict_layers` of a checkpoint's config.json (0 when absent)."""
    cfg_path = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return 0
    return int(cfg.get(CONFIG_KEY) or 0)


def load_mtp_layers(model: Any, path: str | Path, layers: int | None = None) -> int:
    """Attaches the checkpoint's MTP layers (weights from its safetensors) to `model`; returns how many.
    0 when the checkpoint has none. Shape mismatches (e.g. a different hidden size) raise naming the
    tensor and both shapes."""
    path = Path(path)
    n = checkpoint_mtp_layers(path) if layers is None else layers
    if n <= 0:
        return 0
    state = read_mtp_state(path)
    found = sorted({int(k.split(".", 1)[0]) for k in state})
    if not found:
        raise ThinkforgeError(f"{path}/config.json: {CONFIG_KEY} = {n} but no {PREFIX}* tensors in its safetensors")
    if max(found) + 1 < n:
        raise ThinkforgeError(f"{path}/config.json: {CONFIG_KEY} = {n} but the safetensors hold MTP layers "
                              f"{found} only")
    module = add_mtp_layers(model, n)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ThinkforgeError(f"{path}: MTP tensor {PREFIX}{missing[0]} missing ({len(missing)} missing in all)")
    for key, tensor in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise ThinkforgeError(f"{path}: {PREFIX}{key} has shape {tuple(got.shape)}, the model expects "
                                  f"{tuple(tensor.shape)} (hidden_size {model.config.hidden_size}): MTP "
                                  "layers from a different model?")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    return n


def check_mtp_compatible(model: Any) -> None:
    """Raises if attached MTP layers do not fit the model (e.g. mismatched hidden sizes)."""
    h = model.config.hidden_size
    for i, layer in enumerate(mtp_layers(model)):
        w = layer.input_proj.weight
        if tuple(w.shape) != (h, 2 * h):
            raise ThinkforgeError(f"MTP layer {i}: input_proj is {tuple(w.shape)}, the model's hidden_size {h} "
                                  f"needs ({h}, {2 * h})")


# ----------------------------------------------------------------------------- MiMo's own checkpoints
_REGISTERED = False


def register_mimo() -> None:
    """Lets the Auto classes load `model_type: mimo` checkpoints (MiMo-7B) without remote code: the
    main model is a Qwen2, the MTP layers are built from the config and loaded with the weights."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    class MiMoConfig(Qwen2Config):
        model_type = "mimo"

        def __init__(self, num_nextn_predict_layers: int = 0, **kwargs: Any) -> None:
            self.num_nextn_predict_layers = num_nextn_predict_layers
            super().__init__(**kwargs)

    class MiMoForCausalLM(Qwen2ForCausalLM):
        config_class = MiMoConfig

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            n = int(getattr(config, CONFIG_KEY, 0) or 0)
            if n:
                add_mtp_layers(self, n)

    try:
        AutoConfig.register("mimo", MiMoConfig, exist_ok=True)
        AutoModelForCausalLM.register(MiMoConfig, MiMoForCausalLM, exist_ok=True)
    except ValueError:  # registered by another copy of this module
        pass
    _REGISTERED = True


class _MTPOnlyReportFilter(logging.Filter):
    """Drops transformers' load report when its only complaint is our MTP tensors (plain Qwen2 classes
    load the main model and ignore them by design); any other missing/unexpected key still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "LOAD REPORT" not in msg:
            return True
        rows = [line for line in msg.splitlines() if "|" in line and any(
            s in line for s in ("UNEXPECTED", "MISSING", "MISMATCH"))]
        return not rows or not all("mtp_layers" in line and "UNEXPECTED" in line for line in rows)


def _install_report_filter() -> None:
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # the library root: its handler prints every transformers record
    for handler in root.handlers:
        if not any(isinstance(f, _MTPOnlyReportFilter) for f in handler.filters):
            handler.addFilter(_MTPOnlyReportFilter())


register_mimo()
_install_report_filter()
