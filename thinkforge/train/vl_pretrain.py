"""MiMo-VL's four-stage VL pretraining, in miniature: freezing by module, one stage after another.

    1 projector warm-up      only `model.visual.merger` trains     image-caption pairs          lr 1e-3
    2 VL alignment           ViT + projector                       + interleaved (two images)   lr 1e-4
    3 multimodal pretraining everything                            + counting, grounding, OCR-  lr 1e-5 (x)
                                                                     style digits, charts
    4 long-context SFT       everything                            all tasks, longer sequences  lr 2.5e-5 (x)

(x) the report's rates are for a pretrained 7B LLM; a tiny model from scratch gets larger ones in the
recipes. MiMo-VL starts from a pretrained LLM; a from-scratch one gets a stage 0 (`trainable: llm`, `text_only:
true`: the tasks' prompts and solutions without images) so that stages 1-2, with the LLM frozen, can only lower
the loss by carrying information from the image (without it the tiny VL model ignored shape and count). Each
stage trains on the tasks' teacher solutions (loss on the response tokens only) and asserts its trainable-parameter
count: exactly the LLM, the projector, the ViT + projector, or all parameters. A sample is
never truncated (that would cut image tokens and desynchronise them from the image features): samples
over the stage's `max_seq_len` are dropped and counted. By default rows are padded, and the model builds every
row's MRoPE positions from its own `mm_token_type_ids`. With `pack: true` a step's samples are packed (first-fit
decreasing) into rows of at most `max_seq_len` tokens: each sample's 3D positions are computed alone (`get_rope_index`) and
laid side by side, with text positions restarting at 0 per sample, which is what makes transformers build a
block-diagonal causal mask (the `[4, B, T]` packed form; no attention mask, no cache). The same samples make
the same loss either way: packing saves the padding, nothing else.

Every stage writes `out_dir/<stage>/model`, a plain HF directory (`AutoModelForImageTextToText`,
weights under `model.visual.*`) and `summary.json`; a rerun skips the stages that finished.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkforge.errors import ThinkforgeError
from thinkforge.train.common import MetricLog, cosine_lr, make_optimizer, write_stage_summary
from thinkforge.utils import asdict, ensure_writable_dir, run_metadata, seed_everything

IGNORE = -100
TRAINABLE = ("llm", "projector", "vit+projector", "all")
CAPTION_TASKS = ["vl_caption"]
INTERLEAVED_TASKS = ["vl_caption", "vl_compare"]
ALL_TASKS = ["vl_caption", "vl_compare", "vl_count", "vl_ground", "vl_point", "vl_digits", "vl_chart"]


def _default_stages() -> list[dict[str, Any]]:
    return [
        {"name": "stage1_projector", "trainable": "projector", "tasks": CAPTION_TASKS, "steps": 40, "lr": 1e-3},
        {"name": "stage2_vit_projector", "trainable": "vit+projector", "tasks": INTERLEAVED_TASKS, "steps": 40,
         "lr": 1e-4},
        {"name": "stage3_all", "trainable": "all", "tasks": ALL_TASKS, "steps": 80, "lr": 1e-3},
        {"name": "stage4_long_sft", "trainable": "all", "tasks": ALL_TASKS, "steps": 40, "lr": 2.5e-4,
         "max_seq_len": 512},
    ]


@dataclass
class VLPretrainConfig:
    model: str = ""  # an HF VL directory to continue from; "" = the tiny VL model from scratch
    preset: str = "tiny"  # thinkforge.vl.model.VL_PRESETS (from scratch only)
    out_dir: str = "runs/vl-pretrain"
    stages: list[dict[str, Any]] = field(default_factory=_default_stages)
    problems_per_task: int = 400  # training problems drawn per task and stage
    batch_size: int = 16
    max_seq_len: int = 160  # a stage's own `max_seq_len` overrides it
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    tokenizer_vocab: int = 512  # from scratch: BPE vocabulary trained on the tasks' text
    pack: bool = False  # pack a step's samples into rows of max_seq_len tokens instead of padding each

    def check(self) -> None:
        if not self.stages:
            raise ThinkforgeError("vl_pretrain: stages is empty")
        names = set()
        for i, st in enumerate(self.stages):
            where = f"vl_pretrain: stages[{i}]"
            for key in ("name", "trainable", "tasks", "steps", "lr"):
                if key not in st:
                    raise ThinkforgeError(f"{where}: missing field {key!r}")
            if st.get("text_only") and st["trainable"] != "llm":
                raise ThinkforgeError(f"{where}.text_only: only a trainable: llm stage can drop the images")
            if st["trainable"] not in TRAINABLE:
                raise ThinkforgeError(f"{where}.trainable: must be one of {', '.join(TRAINABLE)}, got {st['trainable']!r}")
            if st["name"] in names:
                raise ThinkforgeError(f"{where}.name: {st['name']!r} appears twice")
            names.add(st["name"])
            if int(st["steps"]) < 1 or not float(st["lr"]) > 0:
                raise ThinkforgeError(f"{where}: steps must be >= 1 and lr > 0")
        if self.batch_size < 1 or self.max_seq_len < 8:
            raise ThinkforgeError("vl_pretrain: batch_size must be >= 1 and max_seq_len >= 8")


# ---------------------------------------------------------------------------------------- freezing
def set_trainable(model: Any, which: str) -> int:
    """Freezes all but `which` (llm | projector | vit+projector | all); returns the trainable-parameter count
    after asserting it is exactly that part's size."""
    from thinkforge.vl.model import module_parameters

    counts = module_parameters(model)
    model.requires_grad_(which in ("all", "llm"))
    if which == "llm":
        model.model.visual.requires_grad_(False)
    elif which == "projector":
        model.model.visual.merger.requires_grad_(True)
    elif which == "vit+projector":
        model.model.visual.requires_grad_(True)
    expected = {"llm": counts["llm"], "projector": counts["projector"], "vit+projector": counts["projector"] + counts["vit"],
                "all": counts["total"]}[which]
    got = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if got != expected:
        raise ThinkforgeError(f"vl_pretrain: {which} should train {expected} parameters, {got} are trainable")
    return got


# ---------------------------------------------------------------------------------------- data
@dataclass
class VLExample:
    enc: Any  # thinkforge.vl.processor.VLEncoding of prompt + response
    labels: list[int]


def encode_example(processor: Any, task: Any, problem: Any, response: str, text_only: bool = False) -> VLExample:
    """Prompt (chat template, images expanded) + response + <|im_end|>, loss on the response only. `text_only`
    drops the images (the LLM warm-up stage: a from-scratch LLM learns the tasks' language first)."""
    messages = task.messages(problem)
    if text_only:
        messages = [{**m, "content": [c for c in m["content"] if c.get("type") != "image"]}
                    if isinstance(m["content"], list) else m for m in messages]
    images = [] if text_only else problem.meta.get("images", [])
    prompt = processor.encode_chat(messages, images, where=f"problem {problem.id}")
    tok = processor.tokenizer
    reply = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return VLExample(processor.extend(prompt, reply), [IGNORE] * prompt.length + reply)


def stage_examples(cfg: VLPretrainConfig, stage: dict[str, Any], processor: Any, split: str = "train",
                   n: int | None = None) -> tuple[list[VLExample], int]:
    """The stage's examples (teacher solutions of its tasks) and how many were dropped as overlong."""
    from thinkforge.tasks import get_task

    max_len = int(stage.get("max_seq_len", cfg.max_seq_len))
    out, dropped = [], 0
    for name in stage["tasks"]:
        task = get_task(name)
        for p in task.problems(split, n=n or cfg.problems_per_task, seed=cfg.seed, difficulty=stage.get("difficulty")):
            ex = encode_example(processor, task, p, p.solution, text_only=bool(stage.get("text_only", False)))
            if ex.enc.length > max_len:
                dropped += 1  # never truncated: a cut inside image tokens breaks the image/feature match
                continue
            out.append(ex)
    if not out:
        raise ThinkforgeError(f"vl_pretrain: stage {stage['name']}: every sample is longer than max_seq_len "
                              f"{max_len} ({dropped} dropped)")
    return out, dropped


def collate(processor: Any, rows: list[VLExample], device: Any) -> dict[str, torch.Tensor]:
    batch = processor.collate([r.enc for r in rows], padding_side="right")
    labels = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def sample_positions(model: Any, enc: Any) -> torch.Tensor:
    """[4, L] positions of one sample alone: text positions 0..L-1, then its 3D MRoPE positions."""
    ids = torch.tensor([enc.input_ids])
    mrope, _ = model.model.get_rope_index(ids, torch.tensor([enc.mm_token_type_ids]), enc.image_grid_thw)
    return torch.cat([torch.arange(enc.length)[None], mrope[:, 0].cpu()], 0)


def pack_rows(rows: list[VLExample], max_len: int) -> list[list[VLExample]]:
    """First-fit decreasing: longest first, each sample into the first row with room for it (deterministic: ties
    keep their order). The loss is a mean over the step's response tokens, so placement does not change it."""
    bins: list[list[VLExample]] = []
    room: list[int] = []
    for r in sorted(rows, key=lambda r: -r.enc.length):
        i = next((j for j, free in enumerate(room) if free >= r.enc.length), None)
        if i is None:
            bins.append([])
            room.append(max_len)
            i = len(bins) - 1
        bins[i].append(r)
        room[i] -= r.enc.length
    return bins


def collate_packed(processor: Any, model: Any, rows: list[VLExample], max_len: int, device: Any) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, mm_token_type_ids, labels [R, T] and position_ids [4, R, T] (packed form, so no
    attention_mask); images in token order. A row's padding tail is its own segment (positions from 0), label-free."""
    bins = pack_rows(rows, max_len)
    width = max(sum(r.enc.length for r in b) for b in bins)
    pad = processor.pad_token_id if processor.pad_token_id is not None else 0
    ids = torch.full((len(bins), width), pad, dtype=torch.long)
    types = torch.zeros((len(bins), width), dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((4, len(bins), width), dtype=torch.long)
    pixels, grids = [], []
    for b, row in enumerate(bins):
        off = 0
        for r in row:
            sl = slice(off, off + r.enc.length)
            ids[b, sl] = torch.tensor(r.enc.input_ids)
            types[b, sl] = torch.tensor(r.enc.mm_token_type_ids)
            labels[b, sl] = torch.tensor(r.labels)
            pos[:, b, sl] = sample_positions(model, r.enc)
            if r.enc.pixel_values is not None:
                pixels.append(r.enc.pixel_values)
                grids.append(r.enc.image_grid_thw)
            off += r.enc.length
        pos[:, b, off:] = torch.arange(width - off)
    batch = {"input_ids": ids, "mm_token_type_ids": types, "labels": labels, "position_ids": pos}
    if pixels:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    return {k: v.to(device) for k, v in batch.items()}


def vl_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # float64 stays (numerics checks)
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


# ---------------------------------------------------------------------------------------- the stages
def build_model(cfg: VLPretrainConfig, device: str, dtype: Any) -> tuple[Any, Any]:
    from thinkforge.vl.model import VL_PRESETS, build_tiny_vl, load_vl

    if cfg.model:
        return load_vl(cfg.model, device=device, dtype=dtype)
    if cfg.preset not in VL_PRESETS:
        raise ThinkforgeError(f"vl_pretrain: unknown preset {cfg.preset!r}; known: {', '.join(VL_PRESETS)}")
    tasks = sorted({name for st in cfg.stages for name in st["tasks"]})
    texts = _tokenizer_texts(tasks, cfg.seed)
    model, processor = build_tiny_vl(texts, cfg.preset, seed=cfg.seed, vocab_size=cfg.tokenizer_vocab)
    return model.to(device=device, dtype=dtype), processor


def _tokenizer_texts(tasks: list[str], seed: int) -> list[str]:
    from thinkforge.tasks import get_task

    return [f"{p.prompt}\n{p.solution}" for name in tasks for p in get_task(name).problems("train", n=60, seed=seed)]


def train_stage(cfg: VLPretrainConfig, stage: dict[str, Any], model: Any, processor: Any, out_dir: Path,
                device: str, progress: Any = None) -> dict[str, Any]:
    from thinkforge.vl.model import save_vl

    t0 = time.time()
    trainable = set_trainable(model, stage["trainable"])
    examples, dropped = stage_examples(cfg, stage, processor)
    optimizer = make_optimizer(model, float(stage["lr"]), cfg.weight_decay)
    steps = int(stage["steps"])
    log = MetricLog(out_dir, tensorboard=False)
    rng = random.Random(f"{cfg.seed}/{stage['name']}")
    order: list[int] = []
    model.train()
    bar = progress.add_task(stage["name"], total=steps) if progress else None
    losses = []
    try:
        for step in range(1, steps + 1):
            lr = cosine_lr(step - 1, steps, float(stage["lr"]), min(cfg.warmup_steps, steps // 4), cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if len(order) < cfg.batch_size:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order += fresh
            rows, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size:]
            if cfg.pack:
                batch = collate_packed(processor, model, rows, int(stage.get("max_seq_len", cfg.max_seq_len)), device)
            else:
                batch = collate(processor, rows, device)
            tokens, slots = sum(r.enc.length for r in rows), batch["input_ids"].numel()
            loss = vl_loss(model, batch)
            if not torch.isfinite(loss):
                raise ThinkforgeError(f"vl_pretrain: {stage['name']}: loss is {float(loss)} at step {step}")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            log.log(step, loss=losses[-1], lr=lr, grad_norm=float(grad_norm), rows=int(batch["input_ids"].shape[0]),
                    padding=round(1 - tokens / slots, 4))
            if progress:
                progress.update(bar, advance=1, description=f"{stage['name']} loss {losses[-1]:.3f}")
    finally:
        log.close()
    model.eval()
    path = save_vl(model, processor, out_dir / "model")
    summary = {"stage": stage["name"], "trainable": stage["trainable"], "trainable_params": trainable,
               "model_dir": str(path), "steps": steps, "examples": len(examples), "dropped_overlong": dropped,
               "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
               "wall_s": round(time.time() - t0, 2)}
    write_stage_summary(out_dir, {**summary, **run_metadata({**asdict(cfg), "stage": stage}, cfg.seed)})
    return summary


def vl_pretrain(cfg: VLPretrainConfig, progress: Any = None) -> dict[str, Any]:
    """Runs the stages in order (skipping finished ones); returns {"stages": [summary per stage]}."""
    from thinkforge.model.io import resolve_device, resolve_dtype
    from thinkforge.vl.model import load_vl

    cfg.check()
    out_dir = ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = processor = None
    summaries = []
    for i, stage in enumerate(cfg.stages):
        stage_dir = out_dir / stage["name"]
        done = stage_dir / "summary.json"
        if done.exists() and (stage_dir / "model" / "config.json").exists():
            summaries.append({k: v for k, v in json.loads(done.read_text()).items() if k in (
                "stage", "trainable", "trainable_params", "model_dir", "steps", "examples", "dropped_overlong",
                "first_loss", "final_loss", "wall_s")})
            model = None  # the next unfinished stage starts from this stage's weights
            continue
        if model is None:
            if i == 0:
                model, processor = build_model(cfg, device, dtype)
            else:
                model, processor = load_vl(summaries[-1]["model_dir"], device=device, dtype=dtype)
        seed_everything(cfg.seed + i)
        summaries.append(train_stage(cfg, stage, model, processor, ensure_writable_dir(stage_dir), device, progress))
    result = {"stages": summaries, "model_dir": summaries[-1]["model_dir"]}
    write_stage_summary(out_dir, {**result, **run_metadata(asdict(cfg), cfg.seed)})
    return result
