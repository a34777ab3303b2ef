import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkforge.errors import ThinkforgeError
from thinkforge.train.pretrain import PretrainConfig, pretrain
from thinkforge.train.sft import IGNORE, SFTConfig, encode, normalize_conversation, sft
from thinkforge.utils import read_jsonl

SMALL = dict(model_size="micro", batch_size=4, seq_len=64, docs_per_stage=200, eval_docs=16, warmup_steps=1)


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "thinkforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_pretrain_lowers_loss_and_logs_stages(tmp_path):
    summary = pretrain(PretrainConfig(out_dir=str(tmp_path), steps=30, eval_every=10, save_every=100, lr=3e-3,
                                      **{**SMALL, "warmup_steps": 3}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    stages = [r["stage"] for r in rows]  # fractions 0.4 / 0.35 / 0.25 of 30 steps, in order
    assert stages == ["stage1"] * 12 + ["stage2"] * 10 + ["stage3"] * 8
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.7
    assert summary["tokens"] == 30 * 4 * 64
    assert not (tmp_path / "checkpoint").exists()  # removed once the final model is written
    assert (tmp_path / "model" / "model.safetensors").exists()
    # warmup then cosine decay
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(3e-3) and lrs[-1] < 0.5 * max(lrs)


def test_pretrain_continues_a_checkpoint_whose_tokenizer_has_no_pad_token(tmp_path):
    """GPT-2/Llama-style tokenizers have no pad token: documents are separated by EOS instead."""
    from thinkforge.engine.testing import build_tiny_model, build_tokenizer
    from thinkforge.train.pretrain import TokenStream

    tok = build_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    stream = TokenStream(["1 + 2 = 3", "def f(x):\n    return x"] * 30, tok, 16)
    assert int((stream.ids == tok.eos_token_id).sum()) == 60 and stream.ids[-1] == tok.eos_token_id
    ckpt = tmp_path / "padless"
    model = build_tiny_model(tok)
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    summary = pretrain(PretrainConfig(out_dir=str(tmp_path / "run"), model=str(ckpt), steps=2, eval_every=1,
                                      save_every=100, **SMALL))
    assert summary["steps"] == 2 and math.isfinite(summary["heldout_loss"])
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    tok.eos_token = None
    with pytest.raises(ThinkforgeError, match="neither a pad nor an eos token"):
        TokenStream(["1 + 2 = 3"] * 30, tok, 16)


def test_pretrain_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    cfg = dict(steps=12, save_every=4, eval_every=100, **SMALL)
    pretrain(PretrainConfig(out_dir=str(straight), **cfg))

    resumed = tmp_path / "resumed"
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from thinkforge.train.pretrain import *; pretrain(PretrainConfig(out_dir={str(resumed)!r}, **{cfg!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 240
    while not (resumed / "checkpoint" / "trainer.pt").exists():
        assert proc.poll() is None, "trainer exited before writing a checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "model").exists()
    pretrain(PretrainConfig(out_dir=str(resumed), **cfg))
    # Steps trained after the checkpoint by the killed run are logged once, by the resumed run.
    steps = [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")]
    assert steps == [r["step"] for r in read_jsonl(straight / "metrics.jsonl")] == list(range(1, 13))
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_failed_final_save_leaves_no_half_written_model(tmp_path, monkeypatch):
    """The disk fills while the final model is being written: no `model/` appears, no temp dir is left,
    the last checkpoint survives and the run resumes from it; a failed save over an existing model
    leaves that model as it was."""
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    real_save = PreTrainedModel.save_pretrained
    partial: list[int] = []

    def save_then_fail(self, save_directory, *args, **kwargs):
        real_save(self, save_directory, *args, **kwargs)
        target = Path(save_directory)
        if target.parent == out and target.name.startswith(".model."):  # the final model, not a checkpoint
            weights = target / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            partial.append(weights.stat().st_size)
            raise OSError(28, "No space left on device")

    cfg = PretrainConfig(out_dir=str(out), steps=4, eval_every=100, save_every=2, **SMALL)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        pretrain(cfg)
    assert partial and partial[0] > 0  # the failure really came mid-write
    assert not (out / "model").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp dir left behind
    ckpt = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert ckpt["state"]["step"] == 2 and load_file(str(out / "checkpoint" / "model" / "model.safetensors"))

    failed_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    summary = pretrain(cfg)  # resumes from step 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The failed run logged steps 1-4; on resume its rows past the checkpoint (3, 4) give way to the new ones.
    assert [r["step"] for r in failed_rows] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in failed_rows], rel=1e-5)
    good = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    assert not (out / "checkpoint").exists() and "model.safetensors" in good

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        pretrain(PretrainConfig(**{**vars(cfg), "seed": 1}))  # a new run into the same directory
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == good
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sft_trains_only_on_assistant_tokens(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2 + 3."},
            {"role": "assistant", "content": "2 + 3 = 5\nThe answer is \\boxed{5}."}]
    ids, labels = encode(conv, tok, 512)
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "2 + 3 = 5\nThe answer is \\boxed{5}.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # the prompt part is exactly what generation is conditioned on
    prompt = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE))
    assert tok.decode(ids[:n_prompt]) == prompt


def test_sharegpt_and_bad_rows(tmp_path):
    conv = normalize_conversation({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "x")
    assert conv == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ThinkforgeError, match="data.jsonl:3: row has neither"):
        normalize_conversation({"text": "x"}, "data.jsonl:3")


def test_sft_on_file_lowers_loss(tiny_checkpoint, tmp_path):
    from thinkforge.tasks import get_task

    task = get_task("arith")
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": task.messages(p) + [{"role": "assistant", "content": p.solution}]}
            for p in task.problems("train", n=200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = sft(SFTConfig(model=tiny_checkpoint, data=str(data), out_dir=str(tmp_path / "sft"), steps=25,
                            batch_size=8, lr=3e-3, eval_every=25, warmup_steps=2, dtype="float32"))
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["train_examples"] == 200 - 20
    assert Path(summary["model_dir"], "config.json").exists()


@pytest.mark.parametrize("args, message", [
    (["sft", "--model", "/nonexistent/model"], "error: model '/nonexistent/model' not found"),
    (["pretrain", "--recipe", "BAD", "--out", "OUT"], "malformed YAML"),
    (["pretrain", "--set", "tasks=[nope]", "--out", "OUT"], "unknown task 'nope'"),
    (["pretrain", "--set", "stepz=3", "--out", "OUT"], "unknown field(s) stepz"),
    (["pretrain", "--out", "/proc/forbidden/run"], "is not writable"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    args = [str(bad) if a == "BAD" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("preset, out, message", [
    ("nope", "OUT", "error: recipe 'speedrun-nope' not found"),
    ("smoke", "FILE/run", "is not writable"),  # the parent is a regular file
    ("smoke", "/proc/forbidden/run", "error: output directory /proc/forbidden/run is not writable"),
])
def test_speedrun_bad_input_fails_before_any_work(tmp_path, preset, out, message):
    (tmp_path / "FILE").write_text("not a directory\n")
    out = out.replace("OUT", str(tmp_path / "out")).replace("FILE", str(tmp_path / "FILE"))
    result = run_cli("speedrun", "--preset", preset, "--out", out, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "FILE").read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # no stage directory, no tokenizer, no model
