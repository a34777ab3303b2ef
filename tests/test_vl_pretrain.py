"""Four-stage VL pretraining (thinkforge.train.vl_pretrain): freezing by module, checkpoints, no truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from thinkforge.errors import ThinkforgeError
from thinkforge.train.vl_pretrain import VLPretrainConfig, set_trainable, stage_examples, vl_pretrain
from thinkforge.vl.model import build_tiny_vl, module_parameters

STAGES = [
    {"name": "s1", "trainable": "projector", "tasks": ["vl_caption"], "steps": 2, "lr": 1e-2},
    {"name": "s2", "trainable": "vit+projector", "tasks": ["vl_caption", "vl_compare"], "steps": 2, "lr": 1e-2},
    {"name": "s3", "trainable": "all", "tasks": ["vl_count", "vl_ground"], "steps": 2, "lr": 1e-2},
    {"name": "s4", "trainable": "all", "tasks": ["vl_digits", "vl_compare"], "steps": 2, "lr": 1e-2,
     "max_seq_len": 75},
]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _part(weights: dict[str, torch.Tensor], prefix: str, exclude: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith(prefix) and not (exclude and k.startswith(exclude))}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlpt")
    cfg = VLPretrainConfig(preset="micro", out_dir=str(out), stages=[dict(s) for s in STAGES], problems_per_task=6,
                           batch_size=4, max_seq_len=160, device="cpu", warmup_steps=0, seed=0)
    return cfg, vl_pretrain(cfg)


def test_each_stage_trains_exactly_its_modules(run):
    from thinkforge.vl.model import load_vl

    cfg, result = run
    model, _ = load_vl(result["stages"][0]["model_dir"], device="cpu", dtype="float32")
    counts = module_parameters(model)
    got = [s["trainable_params"] for s in result["stages"]]
    assert got == [counts["projector"], counts["projector"] + counts["vit"], counts["total"], counts["total"]]
    assert counts["projector"] < counts["vit"] < counts["llm"]
    # Weights that a stage froze are bit-identical to the previous stage's; the trained ones moved.
    paths = [Path(s["model_dir"]) for s in result["stages"]]
    w1, w2, w3 = _weights(paths[0]), _weights(paths[1]), _weights(paths[2])
    merger, visual, llm = "model.visual.merger.", "model.visual.", "model.language_model."
    assert _same(_part(w1, llm), _part(w2, llm))  # stage 2 froze the LLM
    assert not _same(_part(w1, visual, merger), _part(w2, visual, merger))  # ...and trained the ViT
    assert not _same(_part(w1, merger), _part(w2, merger))
    assert not _same(_part(w2, llm), _part(w3, llm))  # stage 3 trains everything
    with pytest.raises(ThinkforgeError, match="trainable"):
        VLPretrainConfig(stages=[{**STAGES[0], "trainable": "vit"}]).check()
    assert set_trainable(model, "projector") == counts["projector"]
    assert all(not p.requires_grad for p in model.model.language_model.parameters())


def test_first_stage_freezes_vit_and_llm(run):
    _, result = run
    # The ViT is built first from the seed, so its initial weights do not depend on the vocabulary.
    fresh, _ = build_tiny_vl(["x"], "micro", seed=0)
    w1 = _weights(Path(result["stages"][0]["model_dir"]))
    init_vit = {f"model.visual.{k}": v for k, v in fresh.model.visual.state_dict().items() if not k.startswith("merger.")}
    assert _same(_part(w1, "model.visual.", "model.visual.merger."), init_vit)
    init_merger = {f"model.visual.merger.{k}": v for k, v in fresh.model.visual.merger.state_dict().items()}
    assert not _same(_part(w1, "model.visual.merger."), init_merger)


def test_every_stage_checkpoint_is_a_plain_hf_vl_directory(run):
    from transformers import AutoModelForImageTextToText

    _, result = run
    for s in result["stages"]:
        keys = list(safe_open(s["model_dir"] + "/model.safetensors", "pt").keys())
        assert any(k.startswith("model.visual.merger.") for k in keys) and any(k.startswith("model.visual.blocks.")
                                                                             for k in keys)
        model = AutoModelForImageTextToText.from_pretrained(s["model_dir"])
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert s["final_loss"] == s["final_loss"]  # finite (NaN != NaN)


def test_overlong_samples_are_dropped_never_truncated(run):
    cfg, result = run
    s4 = result["stages"][3]
    assert s4["dropped_overlong"] > 0 and s4["examples"] > 0  # two-image prompts exceed 75 tokens
    from thinkforge.vl.model import load_vl

    _, proc = load_vl(s4["model_dir"], device="cpu", dtype="float32")
    kept, dropped = stage_examples(cfg, STAGES[3], proc)
    assert dropped == s4["dropped_overlong"]
    for ex in kept:
        assert ex.enc.length <= 75
        assert sum(ex.enc.mm_token_type_ids) == sum(int(g.prod()) // 4 for g in ex.enc.image_grid_thw)
    with pytest.raises(ThinkforgeError, match="every sample is longer than max_seq_len 20"):
        stage_examples(cfg, {**STAGES[3], "max_seq_len": 20}, proc)


def test_rerun_skips_finished_stages(run):
    cfg, result = run
    again = vl_pretrain(cfg)
    assert again["stages"] == result["stages"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_rows_keep_each_samples_own_mrope_positions_and_logits(padding_side):
    """vl_pretrain pads rows (right; generation pads left) and does not pack: every row of a batch gets the 3D
    MRoPE positions and the logits it gets alone (float64, so only the padding could make them differ)."""
    from thinkforge.tasks import get_task
    from thinkforge.train.vl_pretrain import collate, encode_example

    tasks = [get_task(n) for n in ("vl_compare", "vl_count", "vl_caption")]
    probs = [(t, p) for t in tasks for p in t.problems("train", n=1, seed=0)]
    model, proc = build_tiny_vl([f"{p.prompt} {p.solution}" for _, p in probs], "micro", seed=0)
    model = model.double().eval()
    rows = [encode_example(proc, t, p, p.solution) for t, p in probs]
    text_only = proc.encode_chat([{"role": "user", "content": "no image"}])
    rows.append(type(rows[0])(proc.extend(text_only, [5, 6]), [-100] * text_only.length + [5, 6]))
    lengths = [r.enc.length for r in rows]
    assert len(set(lengths)) == len(lengths)  # different lengths: real padding in the batch
    if padding_side == "right":
        batch = collate(proc, rows, "cpu")  # the trainer's own collate
    else:
        batch = proc.collate([r.enc for r in rows], padding_side="left")
    width = batch["input_ids"].shape[1]
    rope = model.model.get_rope_index
    pos, _ = rope(batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
                  attention_mask=batch["attention_mask"])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for i, r in enumerate(rows):
        alone = proc.collate([r.enc])
        alone_pos, _ = rope(alone["input_ids"], alone["mm_token_type_ids"], alone.get("image_grid_thw"),
                            attention_mask=alone["attention_mask"])
        real = slice(0, r.enc.length) if padding_side == "right" else slice(width - r.enc.length, width)
        assert torch.equal(pos[:, i, real], alone_pos[:, 0])
        if r.enc.image_grid_thw is not None:  # image tokens: time constant, height/width over the merged grid
            img = torch.tensor(r.enc.mm_token_type_ids, dtype=torch.bool)
            assert len(set(alone_pos[1, 0, img].tolist())) > 1 and len(set(alone_pos[2, 0, img].tolist())) > 1
        with torch.no_grad():
            ref = model(**alone).logits[0]
        scale = ref.abs().max()
        assert (logits[i, real] - ref).abs().max() <= 1e-9 * scale


def test_packed_rows_keep_each_samples_mrope_positions_and_logits():
    from thinkforge.tasks import get_task
    from thinkforge.train.vl_pretrain import collate_packed, encode_example, pack_rows

    tasks = [get_task(n) for n in ("vl_compare", "vl_count", "vl_caption", "vl_ground")]
    probs = [(t, p) for t in tasks for p in t.problems("train", n=1, seed=0)]
    model, proc = build_tiny_vl([f"{p.prompt} {p.solution}" for _, p in probs], "micro", seed=0)
    model = model.double().eval()
    rows = [encode_example(proc, t, p, p.solution) for t, p in probs]
    max_len = max(r.enc.length for r in rows) + min(r.enc.length for r in rows)
    bins = pack_rows(rows, max_len)
    assert len(bins) < len(rows) and any(len(b) > 1 for b in bins)  # real packing: several samples in a row
    assert all(sum(r.enc.length for r in b) <= max_len for b in bins)
    batch = collate_packed(proc, model, rows, max_len, "cpu")
    assert "attention_mask" not in batch and batch["position_ids"].shape[:2] == (4, len(bins))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    seen = 0
    for b, row in enumerate(bins):
        off = 0
        for r in row:
            alone = proc.collate([r.enc])
            pos, _ = model.model.get_rope_index(alone["input_ids"], alone["mm_token_type_ids"], alone.get("image_grid_thw"))
            seg = slice(off, off + r.enc.length)
            assert torch.equal(batch["position_ids"][1:, b, seg], pos[:, 0])
            assert torch.equal(batch["position_ids"][0, b, seg], torch.arange(r.enc.length))
            with torch.no_grad():
                ref = model(**alone).logits[0]
            assert (logits[b, seg] - ref).abs().max() <= 1e-9 * ref.abs().max()  # block-diagonal attention
            assert torch.equal(batch["labels"][b, seg], torch.tensor(r.labels))
            off += r.enc.length
            seen += 1
    assert seen == len(rows)


def test_packed_training_matches_padded_training(tmp_path):
    stages = [{"name": "s3", "trainable": "all", "tasks": ["vl_count", "vl_compare", "vl_caption"], "steps": 2,
               "lr": 1e-2, "max_seq_len": 220}]
    runs = {}
    for pack in (False, True):
        cfg = VLPretrainConfig(preset="micro", out_dir=str(tmp_path / str(pack)), stages=stages, problems_per_task=2,
                               batch_size=6, device="cpu", dtype="float64", warmup_steps=0, seed=0, pack=pack)
        runs[pack] = vl_pretrain(cfg)
    import json

    logs = {k: [json.loads(x) for x in (tmp_path / str(k) / "s3" / "metrics.jsonl").read_text().splitlines()]
            for k in runs}
    for a, b in zip(logs[False], logs[True], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)  # same samples, same loss
        assert b["rows"] < a["rows"] == 6
    fresh, _ = build_tiny_vl(["x"], "micro", seed=0)
    start = {k: v.double() for k, v in fresh.model.visual.state_dict().items()}
    w = {k: _weights(Path(r["stages"][0]["model_dir"])) for k, r in runs.items()}
    vit = [k for k in w[False] if k.startswith("model.visual.blocks.")]
    update = torch.cat([(w[False][k] - start[k.removeprefix("model.visual.")]).flatten() for k in vit]).norm()
    gap = torch.cat([(w[True][k] - w[False][k]).flatten() for k in vit]).norm()
    assert update > 0 and gap <= 1e-6 * update  # the same update, relative to its size


def test_llm_text_warmup_stage_trains_only_the_llm_on_image_free_prompts(tmp_path):
    """A from-scratch LLM can learn the tasks' language first (`trainable: llm`, `text_only: true`): the ViT and
    projector stay bit-identical, the prompts carry no image tokens, and only an llm stage may drop images."""
    stage = {"name": "s0", "trainable": "llm", "text_only": True, "tasks": ["vl_count", "vl_compare"], "steps": 2,
             "lr": 1e-2}
    cfg = VLPretrainConfig(preset="micro", out_dir=str(tmp_path), stages=[stage], problems_per_task=4, batch_size=4,
                           device="cpu", warmup_steps=0, seed=0)
    result = vl_pretrain(cfg)
    fresh, _ = build_tiny_vl(["x"], "micro", seed=0)
    s0 = result["stages"][0]
    from thinkforge.vl.model import load_vl

    model, proc = load_vl(s0["model_dir"], device="cpu", dtype="float32")
    assert s0["trainable_params"] == module_parameters(model)["llm"]
    w = _weights(Path(s0["model_dir"]))
    assert _same(_part(w, "model.visual."), {f"model.visual.{k}": v for k, v in fresh.model.visual.state_dict().items()})
    kept, _ = stage_examples(cfg, stage, proc)
    assert len(kept) == 8 and all(sum(ex.enc.mm_token_type_ids) == 0 and ex.enc.pixel_values is None for ex in kept)
    with_images, _ = stage_examples(cfg, {**stage, "text_only": False}, proc)
    assert all(sum(ex.enc.mm_token_type_ids) > 0 for ex in with_images)
    with pytest.raises(ThinkforgeError, match=r"stages\[0\]\.text_only: only a trainable: llm stage"):
        VLPretrainConfig(stages=[{**stage, "trainable": "all"}]).check()
