"""The full SFT trainer: packing without leakage, exact gradient accumulation, kill + resume, LoRA, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkforge.data.packing import IGNORE, first_fit, pack
from thinkforge.errors import ThinkforgeError
from thinkforge.train.sft import SFTConfig, collate, encode, sft, token_losses


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from a second thread, and on a shared 2-core box two threads spin
    against other processes (10x slower measured); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from thinkforge.tasks import get_task

    rows = []
    for name, n in (("arith", 60), ("code", 20)):
        task = get_task(name)
        rows += [{"messages": task.messages(p) + [{"role": "assistant", "content": p.solution}]}
                 for p in task.problems("train", n=n, seed=1)]
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small(tiny_checkpoint, data_file, out, **kw):
    base = dict(model=tiny_checkpoint, data=str(data_file), out_dir=str(out), steps=4, batch_size=8, lr=3e-3,
                warmup_steps=1, eval_every=100, eval_examples=8, save_every=100, dtype="float32", device="cpu",
                tensorboard=False)
    return SFTConfig(**{**base, **kw})


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "model" / "model.safetensors")


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol)


def assert_same_update(base, a, b, rel=1e-4):
    """Two trainings that differ only in summation order (packing, grad accumulation, processes) made the same
    update: per tensor, |dA - dB| <= rel * |dA| in the 2-norm. Elementwise tolerances on weights after Adam
    depend on the CPU's kernels: Adam divides each element by its own gradient scale, so order noise in a
    near-zero gradient element moves that one weight by a visible fraction of lr (one weight of 12,288 moved
    4.5e-5 on an AMD EPYC). The runs are in float64, so that noise is ~1e-12 of the update; a wrong mask or
    normaliser changes the update's direction by far more than 1e-4 of its size."""
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        start = base[key].double() if key in base else torch.zeros_like(a[key], dtype=torch.float64)
        da, db = a[key].double() - start, b[key].double() - start
        assert float((da - db).norm()) <= rel * float(da.norm()) + 1e-12, (key, float((da - db).norm()), float(da.norm()))
        moved += float(da.norm()) > 0
    assert moved > 0  # training moved the weights


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(tiny_checkpoint, attn):
    from thinkforge.model.io import load_model
    from thinkforge.tasks import get_task

    model, tok = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    model.set_attn_implementation(attn)
    convs = []
    for name in ("arith", "code"):
        task = get_task(name)
        convs += [task.messages(p) + [{"role": "assistant", "content": p.solution}]
                  for p in task.problems("heldout", n=4, seed=2)]
    examples = [encode(c, tok, 512) for c in convs]
    lengths = [len(ids) for ids, _ in examples]
    assert len(set(lengths)) > 3  # really different lengths

    with torch.no_grad():
        padded = token_losses(model, collate(examples, tok.pad_token_id))
        unpacked = [padded[i, : lengths[i] - 1].sum().item() for i in range(len(examples))]
        for pack_len in (0, 200):
            batch = pack(examples, tok.pad_token_id, pack_len)
            width = batch["input_ids"].shape[1]
            bins = first_fit(lengths, width)
            assert len(bins) < len(examples)  # several samples really share rows
            assert sum(len(b) for b in bins) == len(examples)
            losses = token_losses(model, batch)
            packed = {}
            for row, members in enumerate(bins):
                pos = 0
                for i in sorted(members):
                    # targets of sample i sit at logit positions pos .. pos+len-2
                    packed[i] = losses[row, pos: pos + lengths[i] - 1].sum().item()
                    pos += lengths[i]
            for i in range(len(examples)):
                assert packed[i] == pytest.approx(unpacked[i], rel=1e-4, abs=1e-4), (pack_len, i)
        # Negative control: the same rows with plain causal attention (no position reset) leak across samples.
        leaky = token_losses(model, {**batch, "position_ids": None})
        assert not torch.allclose(leaky.sum(), losses.sum(), rtol=1e-4)
    # labels: the first token of every packed sample is never a target
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE).all()


def test_grad_accum_and_packing_give_the_same_training(tiny_checkpoint, data_file, tmp_path):
    s1 = sft(small(tiny_checkpoint, data_file, tmp_path / "a", steps=3, dtype="float64"))
    s2 = sft(small(tiny_checkpoint, data_file, tmp_path / "b", steps=3, grad_accum=2, dtype="float64"))
    s3 = sft(small(tiny_checkpoint, data_file, tmp_path / "c", steps=3, packing=False, dtype="float64"))
    assert s1["target_tokens"] == s2["target_tokens"] == s3["target_tokens"] > 0
    assert s1["tokens"] == s3["tokens"]
    base = load_file(Path(tiny_checkpoint) / "model.safetensors")
    assert_same_update(base, weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert_same_update(base, weights(tmp_path / "a"), weights(tmp_path / "c"))
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in "abc"}
    # the loss itself is taken in float32 (token_losses), so its order noise is ~1e-7 of it
    assert losses["b"] == pytest.approx(losses["a"], rel=1e-6) and losses["c"] == pytest.approx(losses["a"], rel=1e-6)


def test_sigkill_resume_equals_uninterrupted_run(tiny_checkpoint, data_file, tmp_path):
    kw = dict(steps=8, save_every=3, eval_every=4, warmup_steps=2)
    sft(small(tiny_checkpoint, data_file, tmp_path / "straight", **kw))

    resumed = tmp_path / "resumed"
    cfg = small(tiny_checkpoint, data_file, resumed, **kw)
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from thinkforge.train.sft import *; sft(SFTConfig(**{cfg.__dict__!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 240
    while not (resumed / "checkpoint" / "trainer.pt").exists():
        assert proc.poll() is None, "trainer exited before writing a checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "model").exists()

    # a checkpoint from another model is refused, and left intact
    from thinkforge.engine.testing import save_tiny_checkpoint

    other = str(save_tiny_checkpoint(tmp_path / "other"))
    with pytest.raises(ThinkforgeError, match="checkpoint is from another run"):
        sft(small(other, data_file, resumed, **kw))
    assert (resumed / "checkpoint" / "trainer.pt").exists()

    summary = sft(cfg)
    assert_same_weights(weights(tmp_path / "straight"), weights(resumed))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # rows past the checkpoint were dropped and re-logged once
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["heldout_loss"] == pytest.approx(straight["heldout_loss"], rel=1e-5)


def test_lora_with_gradient_checkpointing_merges_into_plain_checkpoint(tiny_checkpoint, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    summary = sft(small(tiny_checkpoint, data_file, out, steps=6, lora_r=4, lr=1e-2, gradient_checkpointing=True,
                        tensorboard=True, eval_every=1))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert list((out / "tb").iterdir())  # tensorboard events
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the adapters learn: the same held-out examples' loss falls (step losses differ by batch, so they can't say)
    assert rows[-1]["heldout_loss"] < rows[0]["heldout_loss"]
    merged = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")) for n in changed)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_bad_inputs(tiny_checkpoint, data_file, tmp_path):
    with pytest.raises(ThinkforgeError, match="qlora needs a CUDA GPU"):
        sft(small(tiny_checkpoint, data_file, tmp_path / "q", qlora=True))
    notemplate = tmp_path / "notemplate"
    shutil.copytree(tiny_checkpoint, notemplate)
    for f in notemplate.iterdir():
        if f.name == "chat_template.jinja":
            f.unlink()
        elif f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            f.write_text(json.dumps(cfg))
    with pytest.raises(ThinkforgeError, match="tokenizer has no chat template"):
        sft(small(str(notemplate), data_file, tmp_path / "t"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                      '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ThinkforgeError, match=r"broken.jsonl:2: field 'messages' must be a list"):
        sft(small(tiny_checkpoint, broken, tmp_path / "b"))
    with pytest.raises(ThinkforgeError, match="grad_accum .* cannot exceed batch_size"):
        sft(small(tiny_checkpoint, data_file, tmp_path / "g", grad_accum=16))


def test_encode_errors_name_file_and_line_and_empty_file(tiny_checkpoint, tmp_path):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    no_reply = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]}
    data = tmp_path / "data.jsonl"
    # a blank line in between: the error names the file's line 4, not the 3rd row
    data.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n\n" + json.dumps(no_reply) + "\n")
    with pytest.raises(ThinkforgeError, match=r"data\.jsonl:4: conversation has no assistant turn to train on "
                                              r"\(roles: system, user\)"):
        sft(small(tiny_checkpoint, data, tmp_path / "a"))
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}]}) + "\n")
    with pytest.raises(ThinkforgeError, match=r"sharegpt\.jsonl:1: conversation has no assistant turn"):
        sft(small(tiny_checkpoint, sharegpt, tmp_path / "b"))
    empty = tmp_path / "empty.jsonl"
    for text in ("", "\n  \n"):
        empty.write_text(text)
        with pytest.raises(ThinkforgeError, match=r"empty\.jsonl: no rows \(the data file is empty\)"):
            sft(small(tiny_checkpoint, empty, tmp_path / "c"))
    with pytest.raises(ThinkforgeError, match=r"missing\.jsonl: file not found"):
        sft(small(tiny_checkpoint, tmp_path / "missing.jsonl", tmp_path / "d"))
    assert not (tmp_path / "a" / "model").exists()


ACCELERATE_CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def test_shipped_recipes_load_and_match_the_accelerate_configs():
    """Every `--recipe` an accelerate config names is shipped, loads into SFTConfig and passes validation."""
    import re

    import yaml
    from accelerate.utils import DeepSpeedPlugin

    from thinkforge.train.sft import fill_deepspeed_micro_batch, rank_micro_batch, validate
    from thinkforge.utils import load_config

    named = {}
    for path in sorted(ACCELERATE_CONFIGS.glob("*.yaml")):
        for name in re.findall(r"--recipe (\S+)", path.read_text()):
            named.setdefault(name, []).append(path)
    assert {"sft-7b", "sft-32b"} <= set(named)
    for name, configs in named.items():
        cfg = load_config(SFTConfig, name, "sft", {"model": "Qwen/Qwen2.5-7B-Instruct", "data": "sft.jsonl"})
        validate(cfg)
        # Sky-T1: lr 1e-5, 96 conversations a step as 1 per GPU x 12 accumulation x 8 GPUs, 16k context, 3 epochs
        # of 17k conversations, 10% warmup, cosine to 0
        assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.max_len) == (1e-5, 96, 12, 16384)
        assert cfg.steps == 3 * (17_000 // 96) and cfg.warmup_steps == cfg.steps // 10 and cfg.min_lr_ratio == 0
        assert cfg.gradient_checkpointing and cfg.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.data == "sft.jsonl"
        for path in configs:
            launch = yaml.safe_load(path.read_text())
            world = launch["num_processes"]
            assert rank_micro_batch(cfg, world) == 1
            if launch["distributed_type"] != "DEEPSPEED":
                continue
            # the plugin Accelerate builds from this file: train_micro_batch_size_per_gpu starts as "auto",
            # which `prepare(model, optimizer)` without a dataloader refuses; the trainer fills it in
            plugin = DeepSpeedPlugin(**launch["deepspeed_config"])
            assert plugin.is_auto("train_micro_batch_size_per_gpu")
            fill_deepspeed_micro_batch(plugin, cfg, world)
            assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1
            assert not plugin.is_auto("train_micro_batch_size_per_gpu")
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1  # the trainer marks the boundary
    assert named["sft-32b"] == [ACCELERATE_CONFIGS / "ds_zero3_offload.yaml"]
    plugin = DeepSpeedPlugin(zero_stage=3)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4  # an explicit value is kept
    fill_deepspeed_micro_batch(plugin, load_config(SFTConfig, "sft-32b", "sft", {"model": "m"}), 8)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4


def torchrun_sft(cfg: SFTConfig, keys: tuple[str, ...] = ()) -> None:
    """`cfg` trained by `torchrun --nproc_per_node 2 -m thinkforge.cli sft` (Accelerate, gloo on CPU)."""
    sets = [a for k in ("batch_size", "lr", "warmup_steps", "eval_every", "eval_examples", "save_every", "dtype",
                        "tensorboard", *keys) for a in ("--set", f"{k}={getattr(cfg, k)}")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "thinkforge.cli", "sft", "--model",
                           cfg.model, "--data", cfg.data, "--out", cfg.out_dir, "--steps", str(cfg.steps),
                           "--device", "cpu", *sets], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_accelerate_run_equals_single_process(tiny_checkpoint, data_file, tmp_path):
    """`torchrun --nproc_per_node 2` (Accelerate, gloo on CPU) trains exactly what one process trains: each
    rank takes half of every step's conversations, and the LR schedule built on the optimizer `prepare`
    returned drives the update."""
    kw = dict(steps=3, warmup_steps=1, eval_every=2, dtype="float64")
    single = sft(small(tiny_checkpoint, data_file, tmp_path / "single", **kw))
    torchrun_sft(small(tiny_checkpoint, data_file, tmp_path / "ddp", **kw))
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["target_tokens"] == single["target_tokens"] and ddp["tokens"] == single["tokens"]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("single", "ddp")}
    assert [r["lr"] for r in rows["ddp"]] == [r["lr"] for r in rows["single"]] == pytest.approx([3e-3, 3e-3, 1.65e-3])
    assert [r["loss"] for r in rows["ddp"]] == pytest.approx([r["loss"] for r in rows["single"]], rel=1e-5)
    assert ddp["heldout_loss"] == pytest.approx(single["heldout_loss"], rel=1e-5)
    base = load_file(Path(tiny_checkpoint) / "model.safetensors")
    assert_same_update(base, weights(tmp_path / "single"), weights(tmp_path / "ddp"))


def test_two_process_lora_run_saves_merged_plain_checkpoint(tiny_checkpoint, data_file, tmp_path):
    """LoRA under Accelerate: `model/` is the merged plain checkpoint (as in one process), the adapter is in
    `adapter/`, and the merged weights equal a single-process LoRA run's."""
    kw = dict(steps=2, warmup_steps=1, lora_r=4, lr=1e-2, dtype="float64")
    sft(small(tiny_checkpoint, data_file, tmp_path / "single", **kw))
    torchrun_sft(small(tiny_checkpoint, data_file, tmp_path / "ddp", **kw), keys=("lora_r",))
    assert (tmp_path / "ddp" / "adapter" / "adapter_config.json").exists()
    merged = weights(tmp_path / "ddp")
    assert not any("lora" in k for k in merged)
    base = load_file(Path(tiny_checkpoint) / "model.safetensors")
    assert any(not torch.equal(merged[k], base[k]) for k in base if "q_proj" in k)
    assert_same_update(base, weights(tmp_path / "single"), merged)
