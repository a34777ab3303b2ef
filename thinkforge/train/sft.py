"""Supervised fine-tuning on chat-formatted traces, with loss only on assistant tokens.

Data is a jsonl of conversations (OpenAI `messages` or ShareGPT `conversations`, e.g. the output of
`thinkforge curate`), or, without a file, the tasks' verified teacher traces. Each assistant turn is
tokenized after its prompt exactly as it will be at inference (the tokenizer's chat template with the
generation prompt, then the reply + end token), so the trained tokens are the tokens the model must
produce.

Training: the examples of a step are packed into rows without cross-sample attention
(`thinkforge.data.packing`), the loss is the sum of token cross-entropies over the whole step divided
by its assistant-token count (so gradient accumulation gives exactly the big-batch gradient), with a
cosine schedule after warmup, gradient clipping, bf16 autocast on GPUs, optional gradient
checkpointing and LoRA/QLoRA (`peft`). A checkpoint (model or adapter, optimizer, scheduler, RNG and
step, which fixes the data position) is written every `save_every` steps; re-running resumes it.
Under `accelerate launch` (FSDP, DeepSpeed ZeRO-3; see `configs/accelerate/`) each process takes its
share of every step's examples and Accelerate handles sharding, mixed precision and state.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkforge.data.conversations import SHAREGPT_ROLES, normalize_conversation, numbered_rows
from thinkforge.data.packing import IGNORE, pack, target_tokens
from thinkforge.errors import ThinkforgeError
from thinkforge.train.common import (
    MetricLog,
    cosine_lr,
    make_optimizer,
    rng_state,
    set_rng_state,
    write_stage_summary,
)
from thinkforge.utils import (
    asdict,
    atomic_dir,
    config_hash,
    ensure_writable_dir,
    run_metadata,
    seed_everything,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Example = tuple[list[int], list[int]]

__all__ = ["IGNORE", "SHAREGPT_ROLES", "SFTConfig", "collate", "encode", "normalize_conversation", "sft"]


@dataclass
class SFTConfig:
    model: str = ""  # HF dir or hub id
    data: str | None = None  # jsonl of conversations; None = teacher traces from `tasks`
    tasks: list[str] = field(default_factory=lambda: ["arith", "code"])
    examples_per_task: int = 2000
    out_dir: str = "runs/sft"
    steps: int = 300
    batch_size: int = 32  # conversations per optimizer step (per micro-batch x grad_accum)
    grad_accum: int = 1
    max_len: int = 512
    packing: bool = True
    pack_len: int = 0  # packed row width; 0 = the step's longest example (no extra attention cost on CPU)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_examples: int = 128
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # weights; "auto" = float32 (+ bf16 autocast on GPUs, see mixed_precision)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA with bf16 support, else no) | bf16 | fp16 | no
    attn_implementation: str = "auto"  # auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager
    gradient_checkpointing: bool = False
    lora_r: int = 0  # > 0 trains LoRA adapters instead of all weights
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    qlora: bool = False  # 4-bit NF4 base + LoRA (needs CUDA and bitsandbytes)
    tensorboard: bool = True
    system_prompt: str | None = None
    mtp_weight: float = 0.1  # a model with MTP layers trains them too (MiMo's late-stage weight); 0 = main loss only


# ---------------------------------------------------------------- data

Sourced = tuple[str, list[dict[str, str]]]  # (where from: "file:line" or "task NAME problem ID", conversation)


def task_conversations(cfg: SFTConfig, split: str, n: int) -> list[Sourced]:
    from thinkforge.tasks import get_task

    convs = []
    for name in cfg.tasks:
        task = get_task(name)
        for p in task.problems(split, n=n, seed=cfg.seed):
            convs.append((f"task {name} problem {p.id}",
                          task.messages(p, cfg.system_prompt) + [{"role": "assistant", "content": p.solution}]))
    random.Random(cfg.seed).shuffle(convs)
    return convs


def _template(tokenizer: Any, conv: list[dict[str, str]], where: str, **kw: Any) -> str:
    try:
        return tokenizer.apply_chat_template(conv, tokenize=False, **kw)
    except Exception as err:  # noqa: BLE001 - jinja raises its own types (e.g. roles that must alternate)
        raise ThinkforgeError(f"{where}: the tokenizer's chat template rejects this conversation "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def encode(conv: list[dict[str, str]], tokenizer: Any, max_len: int, where: str = "conversation") -> Example:
    """(input_ids, labels) with labels = IGNORE everywhere but assistant replies (+ their end token).
    `where` ("file:line") prefixes the error for a conversation that cannot be trained on."""
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(conv):
        if msg["role"] != "assistant":
            continue
        prompt = _template(tokenizer, conv[:i], where, add_generation_prompt=True)
        full = _template(tokenizer, conv[: i + 1], where)
        rendered = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
        context = tokenizer(prompt[len(rendered):], add_special_tokens=False)["input_ids"]
        reply_text = full[len(prompt):]
        # Train up to and including the end-of-turn token; the template's trailing newline is context.
        cut = reply_text.rfind(tokenizer.eos_token) + len(tokenizer.eos_token) if tokenizer.eos_token in reply_text else len(reply_text)
        reply = tokenizer(reply_text[:cut], add_special_tokens=False)["input_ids"]
        tail = tokenizer(reply_text[cut:], add_special_tokens=False)["input_ids"] if reply_text[cut:] else []
        ids += context + reply + tail
        labels += [IGNORE] * len(context) + reply + [IGNORE] * len(tail)
    if not any(label != IGNORE for label in labels):
        raise ThinkforgeError(f"{where}: conversation has no assistant turn to train on (roles: "
                              f"{', '.join(m['role'] for m in conv) or 'none'})")
    return ids[:max_len], labels[:max_len]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows, one example each (the unpacked layout)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def make_batch(examples: list[Example], pad_id: int, packing: bool, pack_len: int = 0) -> dict[str, torch.Tensor]:
    batch = pack(examples, pad_id, pack_len) if packing else collate(examples, pad_id)
    batch.pop("n_tokens", None)
    return batch


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                           reduction="none")
    return ce.view(targets.shape)


def token_losses(model: Any, batch: dict[str, torch.Tensor], mtp_weight: float = 0.0) -> torch.Tensor:
    """Per-position cross-entropy [B, T-1] (0 where the target is IGNORE). With `mtp_weight` > 0 each
    position also carries `mtp_weight` x the mean loss of the model's MTP layers (layer i at t predicts
    the token i + 1 further on), so the MTP layers follow the main model through SFT."""
    targets = batch["labels"][:, 1:]
    if mtp_weight <= 0:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), use_cache=False)
        return _ce(out.logits[:, :-1], targets)
    from thinkforge.model.mtp import mtp_forward

    logits, mtp_logits = mtp_forward(model, batch["input_ids"], batch.get("attention_mask"))
    main = _ce(logits[:, :-1], targets)
    extra = torch.zeros_like(main)
    for i, lg in enumerate(mtp_logits):
        shifted = torch.full_like(targets, IGNORE)
        shifted[:, : targets.shape[1] - i - 1] = targets[:, i + 1:]
        extra = extra + _ce(lg[:, :-1], shifted)
    return main + mtp_weight * extra / max(1, len(mtp_logits))


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens."""
    n = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
    return token_losses(model, batch).sum() / n


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], pad_id: int, bs: int, device: Any, packing: bool = True) -> float:
    """Token-weighted mean loss over `examples`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), bs):
        batch = {k: v.to(device) for k, v in make_batch(examples[i: i + bs], pad_id, packing).items()}
        total += token_losses(model, batch).sum().item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def load_examples(cfg: SFTConfig, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    if cfg.data:
        rows = numbered_rows(cfg.data)
        if not rows:
            raise ThinkforgeError(f"{cfg.data}: no rows (the data file is empty)")
        convs = [(f"{cfg.data}:{line}", normalize_conversation(r, f"{cfg.data}:{line}")) for line, r in rows]
        random.Random(cfg.seed).shuffle(convs)
        n_eval = min(cfg.eval_examples, len(convs) // 10)
        train, held = convs[n_eval:], convs[:n_eval]
    else:
        train = task_conversations(cfg, "train", cfg.examples_per_task)
        held = task_conversations(cfg, "heldout", max(1, cfg.eval_examples // len(cfg.tasks)))
    enc = [encode(c, tokenizer, cfg.max_len, where) for where, c in train]
    return enc, [encode(c, tokenizer, cfg.max_len, where) for where, c in held]


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """The `index`-th batch of an endless sequence of shuffled epochs: a pure function, so resume is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(index, per_epoch)
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order[pos * batch_size: (pos + 1) * batch_size]


def step_micro_batches(cfg: SFTConfig, n: int, step: int) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step `step` (batch_size split over grad_accum)."""
    idx = batch_indices(n, cfg.batch_size, cfg.seed, step)
    per = math.ceil(len(idx) / cfg.grad_accum)
    return [idx[i:i + per] for i in range(0, len(idx), per)]


# ---------------------------------------------------------------- model setup

def distributed_launch() -> bool:
    """True under `accelerate launch` / torchrun with several processes, FSDP or DeepSpeed."""
    env = os.environ
    return (int(env.get("WORLD_SIZE", "1")) > 1 or env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")


def rank_micro_batch(cfg: SFTConfig, world: int) -> int:
    """Conversations one rank takes per micro-batch (`step_micro_batches` split over `world` ranks)."""
    return max(1, math.ceil(math.ceil(cfg.batch_size / cfg.grad_accum) / world))


def fill_deepspeed_micro_batch(plugin: Any, cfg: SFTConfig, world: int) -> None:
    """DeepSpeed needs `train_micro_batch_size_per_gpu`; Accelerate derives an "auto" one from a dataloader,
    which this trainer does not pass to `prepare`, so it is set to the per-rank micro-batch. An explicit
    value in the config is kept."""
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = rank_micro_batch(cfg, world)


def resolve_precision(cfg: SFTConfig, device: str) -> str:
    if cfg.mixed_precision != "auto":
        if cfg.mixed_precision not in ("bf16", "fp16", "no"):
            raise ThinkforgeError(f"mixed_precision must be auto, bf16, fp16 or no, got {cfg.mixed_precision!r}")
        return cfg.mixed_precision
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() and cfg.dtype in ("auto", "float32", "fp32") else "no"


def resolve_attn(cfg: SFTConfig, device: str) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if str(device).startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_for_training(cfg: SFTConfig, device: str, precision_device: str | None = None) -> tuple[Any, Any]:
    from thinkforge.model.io import load_model, load_tokenizer, resolve_dtype

    precision = resolve_precision(cfg, precision_device or device)
    weight_dtype = "float32" if cfg.dtype == "auto" and precision != "no" else cfg.dtype
    if cfg.qlora:
        model, tokenizer = _load_4bit(cfg, device), load_tokenizer(cfg.model)
    else:
        model, tokenizer = load_model(cfg.model, device=device, dtype=resolve_dtype(weight_dtype, device))
    if not getattr(tokenizer, "chat_template", None):
        raise ThinkforgeError(f"model {cfg.model}: its tokenizer has no chat template (tokenizer_config.json "
                              "'chat_template'); SFT renders conversations with it")
    attn = resolve_attn(cfg, precision_device or device)
    if attn != "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0 or cfg.qlora:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in present]
        if not targets:
            raise ThinkforgeError(f"lora_targets {cfg.lora_targets} match no module of {cfg.model}")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r or 16, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model.train(), tokenizer


def _load_4bit(cfg: SFTConfig, device: str) -> Any:
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        raise ThinkforgeError("qlora needs a CUDA GPU (4-bit bitsandbytes kernels); use lora_r>0 without qlora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ThinkforgeError("qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from thinkforge.model.io import check_model_path

    check_model_path(cfg.model)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, quantization_config=quant, device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def fingerprint(cfg: SFTConfig, model: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the base model and the trainable parameter layout."""
    shapes = sorted((n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    return {"model": cfg.model, "trainable": config_hash({"shapes": [list(map(str, s)) for s in shapes]}),
            "lora": cfg.lora_r > 0 or cfg.qlora}


# ---------------------------------------------------------------- checkpoints

def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_sft_checkpoint(out_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                        fp: dict[str, Any], acc: Any = None) -> None:
    """`out_dir/checkpoint/`: trainable weights, optimizer, scheduler, RNG, step. Temp dir + rename, so a
    kill mid-save leaves the previous checkpoint. Under Accelerate its own (sharded) state is used."""
    from safetensors.torch import save_file

    final = out_dir / "checkpoint"
    if acc is not None:
        acc.wait_for_everyone()
        tmp = out_dir / ".checkpoint.tmp"
        acc.save_state(str(tmp / "accelerate"))
        if acc.is_main_process:
            torch.save({"state": state, "fingerprint": fp, "rng": rng_state(), "scheduler": scheduler.state_dict()},
                       tmp / "trainer.pt")
            with atomic_dir(final) as t:
                os.replace(tmp / "accelerate", t / "accelerate")
                os.replace(tmp / "trainer.pt", t / "trainer.pt")
        acc.wait_for_everyone()
        return
    with atomic_dir(final) as tmp:
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "state": state, "fingerprint": fp}, tmp / "trainer.pt")


def load_sft_checkpoint(out_dir: Path, model: Any, optimizer: Any, scheduler: Any, fp: dict[str, Any],
                        acc: Any = None) -> dict[str, Any] | None:
    ckpt = out_dir / "checkpoint"
    if not (ckpt / "trainer.pt").exists():
        return None
    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    saved = blob.get("fingerprint", {})
    if saved != fp:
        why = (f"model {saved.get('model')!r}, not {fp['model']!r}" if saved.get("model") != fp["model"]
               else "different trainable parameters (LoRA settings or architecture)")
        raise ThinkforgeError(f"{ckpt}: checkpoint is from another run ({why}); use a fresh out_dir or delete it")
    if acc is not None:
        acc.load_state(str(ckpt / "accelerate"))
        scheduler.load_state_dict(blob["scheduler"])
        return blob["state"]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return blob["state"]


def save_final(cfg: SFTConfig, out_dir: Path, model: Any, tokenizer: Any, acc: Any = None) -> Path:
    """`out_dir/model`: a plain HF checkpoint (LoRA adapters merged; the adapter also in `out_dir/adapter`)."""
    import shutil

    from thinkforge.model.io import save_model

    lora = cfg.lora_r > 0 or cfg.qlora
    if acc is not None:
        acc.wait_for_everyone()
        state = acc.get_state_dict(model)  # gathered from every rank (FSDP / ZeRO-3 shards)
        model = acc.unwrap_model(model)
        if acc.is_main_process:
            with atomic_dir(out_dir / ("adapter" if lora else "model")) as tmp:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            if lora:
                save_model(merge_adapter(cfg, out_dir / "adapter", _base_dtype(model)), tokenizer, out_dir / "model")
            shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
        acc.wait_for_everyone()
        return out_dir / "model"
    if lora:
        save_model(model, tokenizer, out_dir / "adapter")
        # QLoRA merges into an unquantized copy of the base: 4-bit weights cannot hold the update.
        model = merge_adapter(cfg, out_dir / "adapter", torch.bfloat16) if cfg.qlora else model.merge_and_unload()
    path = save_model(model, tokenizer, out_dir / "model")
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return path


def merge_adapter(cfg: SFTConfig, adapter_dir: Path, dtype: torch.dtype) -> Any:
    """The base model `cfg.model` with the saved LoRA adapter merged in (a plain transformers model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _base_dtype(model: Any) -> torch.dtype:
    return next(p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point())


# ---------------------------------------------------------------- training

def validate(cfg: SFTConfig) -> None:
    if not cfg.model:
        raise ThinkforgeError("sft: --model is required")
    for name in ("steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise ThinkforgeError(f"sft: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.grad_accum > cfg.batch_size:
        raise ThinkforgeError(f"sft: grad_accum ({cfg.grad_accum}) cannot exceed batch_size ({cfg.batch_size})")


def sft(cfg: SFTConfig, progress: Any = None) -> dict[str, Any]:
    from thinkforge.model.io import resolve_device

    validate(cfg)
    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    acc = None
    if distributed_launch():
        from accelerate import Accelerator

        # cpu=True is what turns WORLD_SIZE > 1 into gloo DDP on CPUs (torchrun --nproc_per_node N).
        acc = Accelerator(cpu=resolve_device(cfg.device) == "cpu")
        device = acc.device
    else:
        device = resolve_device(cfg.device)
    # Under Accelerate the model is loaded on the CPU and `prepare` places or shards it (FSDP, ZeRO-3).
    model, tokenizer = load_for_training(cfg, "cpu" if acc is not None else str(device), precision_device=str(device))
    train, held = load_examples(cfg, tokenizer)
    from thinkforge.model.mtp import num_mtp_layers

    # MTP layers train alongside in single-process full fine-tuning (the DDP/FSDP wrappers and PEFT hide
    # the `model.model.mtp_layers` attribute the MTP forward needs; there they are carried unchanged).
    mtp_weight = cfg.mtp_weight if num_mtp_layers(model) and acc is None and cfg.lora_r == 0 else 0.0
    # MTP layers attend causally over the whole row, so they need one conversation per row (no packing).
    packing = cfg.packing and not mtp_weight
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    fp = fingerprint(cfg, model)
    rank, world = 0, 1
    if acc is not None:
        rank, world = acc.process_index, acc.num_processes
        smallest = min(len(m) for m in step_micro_batches(cfg, len(train), 0))
        if smallest < world:  # a rank with nothing to run would stall the others' collectives
            raise ThinkforgeError(f"sft: batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} leaves a micro-batch "
                                  f"of {smallest} conversations for {world} processes; each needs one")
        fill_deepspeed_micro_batch(getattr(acc.state, "deepspeed_plugin", None), cfg, world)
        model, optimizer = acc.prepare(model, optimizer)
    deepspeed = acc is not None and getattr(acc.state, "deepspeed_plugin", None) is not None
    eval_bs = rank_micro_batch(cfg, world)  # held-out batches no bigger than a training micro-batch (memory)
    # Built on the optimizer `prepare` returned (DeepSpeed with CPU offload swaps in its own CPU Adam, so
    # a scheduler on the original would move nothing), and left unprepared: Accelerate's scheduler
    # wrapper would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, cfg.steps, 1.0, cfg.warmup_steps, cfg.min_lr_ratio))
    precision = "no" if acc is not None else resolve_precision(cfg, str(device))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = torch.device(device).type
    state = load_sft_checkpoint(out_dir, model, optimizer, scheduler, fp, acc) or {
        "step": 0, "tokens": 0, "target_tokens": 0, "elapsed": 0.0}
    is_main = rank == 0
    log = MetricLog(out_dir, tensorboard=cfg.tensorboard, resume_step=state["step"]) if is_main else None
    t0 = time.time() - state["elapsed"]
    task = progress.add_task("sft", total=cfg.steps, completed=state["step"]) if progress and is_main else None
    while state["step"] < cfg.steps:
        step = state["step"]
        t_step = time.time()
        lr = scheduler.get_last_lr()[0]
        micros = step_micro_batches(cfg, len(train), step)
        # The whole step's target-token count normalises every micro-batch (and every rank), so the
        # accumulated gradient equals the gradient of the mean loss over the full batch.
        n_target = max(1, sum(target_tokens(train[i]) for m in micros for i in m))
        total, real_tokens = 0.0, 0
        for j, micro in enumerate(micros):
            mine = micro[rank::world]
            if not mine:
                continue
            batch = {k: v.to(device) for k, v in make_batch([train[i] for i in mine], pad_id, packing,
                                                            cfg.pack_len).items()}
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss_sum = token_losses(model, batch, mtp_weight).sum()
            scaled = loss_sum * (world / n_target)
            if deepspeed:  # its engine steps inside backward at an accumulation boundary: the last micro-batch
                acc.sync_gradients = j == len(micros) - 1
            acc.backward(scaled) if acc is not None else scaled.backward()
            total += loss_sum.item() / n_target
            real_tokens += sum(len(train[i][0]) for i in mine)
        if acc is not None:
            total = acc.reduce(torch.tensor(total, device=device), reduction="sum").item()
            real_tokens = int(acc.reduce(torch.tensor(real_tokens, device=device), reduction="sum").item())
        if not math.isfinite(total):
            raise ThinkforgeError(f"sft: loss is {total} at step {step}; last good checkpoint kept in {out_dir}")
        params = [p for p in model.parameters() if p.requires_grad]
        norm = (acc.clip_grad_norm_(params, cfg.grad_clip) if acc is not None
                else torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed clips inside its engine
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += real_tokens
        state["target_tokens"] += n_target
        dt = time.time() - t_step
        row = {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
               "tokens_per_s": round(real_tokens / dt, 1) if dt > 0 else None}
        if held and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps):
            row["heldout_loss"] = eval_loss(model, held, pad_id, eval_bs, device, packing)
        if log is not None:
            log.log(state["step"], **row)
        if task is not None:
            progress.update(task, advance=1, description=f"sft loss {total:.3f}")
        if state["step"] % cfg.save_every == 0 and state["step"] < cfg.steps:
            state["elapsed"] = time.time() - t0
            save_sft_checkpoint(out_dir, model, optimizer, scheduler, state, fp, acc)
    if log is not None:
        log.close()
    heldout = eval_loss(model, held, pad_id, eval_bs, device, packing) if held else None
    wall = time.time() - t0
    path = save_final(cfg, out_dir, model, tokenizer, acc)
    summary = {
        "stage": "sft", "model_dir": str(path), "steps": cfg.steps, "tokens": state["tokens"],
        "target_tokens": state["target_tokens"], "train_examples": len(train), "heldout_loss": heldout,
        "wall_s": wall, "tokens_per_s": round(state["tokens"] / wall, 1) if wall > 0 else None,
        "precision": precision, "packing": packing, "mtp_weight": mtp_weight, "world_size": world,
        **run_metadata(asdict(cfg), cfg.seed),
    }
    if is_main:
        write_stage_summary(out_dir, summary)
    return summary
