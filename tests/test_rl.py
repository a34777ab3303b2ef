"""The RL trainer: GRPO/DAPO objective numbers, learning on a micro model, resume after SIGKILL with the same
data order, NaN stop with the checkpoint intact, degenerate-data stop, CLI errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tests.test_rl_support as support
from thinkforge.errors import ThinkforgeError
from thinkforge.train.grpo import group_advantages, overlong_penalty, policy_loss
from thinkforge.train.rl import RLConfig, rl
from thinkforge.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return support.micro_model(tmp_path_factory.mktemp("rl_micro"))


def _cfg(model: str, out: Path, **kw) -> RLConfig:
    base = dict(model=model, tasks=["arith"], out_dir=str(out), steps=3, batch_groups=2, group_size=4,
                mini_batch_groups=1, max_tokens=10, lr=3e-3, problems_per_task=40, eval_problems=4,
                eval_max_tokens=6, rewards={"arith": "test_has_digit"}, reward_workers=2, save_every=1,
                engine_max_batch=16, device="cpu", overlong="none")
    return RLConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- objective
def test_group_advantages_grpo_and_dr_grpo():
    assert group_advantages([1, 0, 0, 1], std_normalize=True) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert group_advantages([1, 0, 0, 0], std_normalize=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_advantages([0.5, 0.5], std_normalize=True) == [0.0, 0.0]


def test_overlong_penalty_ramps_over_the_buffer():
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(90, 100, 10, 1.0) == 0.0
    assert overlong_penalty(95, 100, 10, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 10, 0.4) == pytest.approx(-0.4)


def test_clip_higher_and_token_level_sum():
    # Two samples: A=+1 with ratios [1.5, 1.0] and A=-1 with ratios [0.5, 1.0]; eps = 0.2 / 0.28.
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    # -min(1.5, 1.28) - 1 + max(0.5, 0.8) * 1 + 1 -> -1.28 - 1 + 0.8 + 1
    assert float(loss) == pytest.approx(-1.28 - 1.0 + 0.8 + 1.0)
    assert float(stats["clipped"]) == 2.0
    # A masked token contributes nothing; the k3 KL is 0 at the reference and positive elsewhere.
    mask[0, 0] = 0
    loss2, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert float(loss2) == pytest.approx(-1.0 + 0.8 + 1.0)
    _, kl0 = policy_loss(old, old, adv, torch.ones(2, 2), 0.2, 0.28, ref_logp=old, kl_coef=0.1)
    _, kl1 = policy_loss(logp, old, adv, torch.ones(2, 2), 0.2, 0.28, ref_logp=old, kl_coef=0.1)
    assert float(kl0["kl"]) == 0.0 and float(kl1["kl"]) > 0.0


def test_config_errors():
    with pytest.raises(ThinkforgeError, match="multiple of mini_batch_groups"):
        RLConfig(model="m", batch_groups=3, mini_batch_groups=2).check()
    with pytest.raises(ThinkforgeError, match="group_size must be >= 2"):
        RLConfig(model="m", group_size=1).check()
    with pytest.raises(ThinkforgeError, match="overlong must be one of"):
        RLConfig(model="m", overlong="cut").check()


# ------------------------------------------------------------------------------------------- training
def test_rl_raises_reward_on_a_micro_model(micro, tmp_path):
    summary = rl(_cfg(micro, tmp_path / "run", steps=6, batch_groups=4, group_size=8, mini_batch_groups=2,
                      max_tokens=12, lr=6e-3, save_every=100))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert summary["steps"] == 6 and Path(summary["model_dir"], "config.json").exists()
    first, last = sum(r["reward"] for r in rows[:2]) / 2, sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 0.2, (first, last)
    for r in rows:
        assert r["logprob_drift"] < 1e-3  # engine and trainer agree on the rollout policy's log-probs
        assert r["updates"] == 2 and 0.0 <= r["clip_frac"] <= 1.0 and r["entropy"] > 0
        assert r["valid_group_ratio"] > 0 and r["rollout_s"] > 0 and r["train_s"] > 0
    assert (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "pass_rates.json").exists()
    assert set(summary["accuracy"]) == {"arith"}


def test_speculative_rollouts_keep_log_probs_and_mtp_layers_stay_frozen(tmp_path):
    """Rollouts decoded with MTP drafts (speculative sampling) report the main model's log-probs, so the
    trainer agrees with them; RL updates the main model and leaves the MTP layers as they were (MiMo)."""
    from safetensors.torch import load_file

    from thinkforge.train.pretrain import PretrainConfig, pretrain

    base = pretrain(PretrainConfig(out_dir=str(tmp_path / "pre"), model_size="micro", steps=4, batch_size=4,
                                   seq_len=64, docs_per_stage=200, eval_docs=16, eval_every=2, save_every=100,
                                   warmup_steps=1, mtp_layers=1))["model_dir"]
    summary = rl(_cfg(base, tmp_path / "run", steps=2, batch_groups=2, mini_batch_groups=1, speculative="mtp",
                      num_draft=1, save_every=100))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "logprob_drift" in r]
    assert rows and all(r["logprob_drift"] < 1e-3 for r in rows)
    before, after = load_file(Path(base) / "model.safetensors"), load_file(Path(summary["model_dir"]) / "model.safetensors")
    mtp = [k for k in before if ".mtp_layers." in k]
    assert mtp and all(torch.equal(before[k], after[k]) for k in mtp)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in mtp)
    with pytest.raises(ThinkforgeError, match="num_draft 2 > the checkpoint's 1"):
        rl(_cfg(base, tmp_path / "bad", speculative="mtp", num_draft=2))
    # spec_max_batch=0: every rollout step is above the threshold and decodes plain (the fallback a large
    # rollout batch needs on a CPU), so the run samples exactly what a plain run samples.
    plain = rl(_cfg(base, tmp_path / "plain", steps=1, batch_groups=2, mini_batch_groups=1, save_every=100))
    fell_back = rl(_cfg(base, tmp_path / "fallback", steps=1, batch_groups=2, mini_batch_groups=1, save_every=100,
                        speculative="mtp", num_draft=1, spec_max_batch=0))
    assert plain["steps"] == fell_back["steps"] == 1
    assert read_jsonl(tmp_path / "plain" / "rollouts.jsonl") == read_jsonl(tmp_path / "fallback" / "rollouts.jsonl")


@pytest.mark.parametrize("opts", [
    {"overlong": "mask"}, {"overlong": "penalty", "overlong_buffer": 4}, {"loss_agg": "sequence"},
    {"kl_coef": 0.5}, {"old_logprobs": "trainer"}, {"std_normalize": False}, {"ppo_epochs": 2},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_objective_options_train(micro, tmp_path, opts):
    rl(_cfg(micro, tmp_path / "run", steps=1, batch_groups=2, mini_batch_groups=1, max_tokens=8, save_every=100,
            **opts))
    row = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "updates" in r)
    assert row["updates"] == 2 * opts.get("ppo_epochs", 1) and row["loss"] == row["loss"]  # finite, not NaN
    assert row["logprob_drift"] < 1e-3
    if "kl_coef" in opts:  # the second update's policy has left the frozen reference
        assert row["kl"] > 0
    else:
        assert row["kl"] == 0.0
    if opts.get("overlong") == "mask":  # 8 tokens cut most answers short: they leave the loss, not the baseline
        assert row["truncated_frac"] > 0


def test_a_failing_reward_is_scored_zero_with_its_reason_logged(micro, tmp_path):
    cfg = _cfg(micro, tmp_path / "run", steps=2, rewards={"arith": "test_raises"}, max_degenerate_steps=2,
               max_slots_factor=1.0)
    with pytest.warns(RuntimeWarning, match="no valid group"):
        summary = rl(cfg)
    assert summary["steps"] == 2 and Path(summary["model_dir"], "config.json").exists()
    groups = [g for row in read_jsonl(tmp_path / "run" / "rollouts.jsonl") for g in row["groups"]]
    assert groups and all(g["rewards"] == [0.0] * 4 for g in groups)
    assert all(e.startswith("reward_error: test_raises") for g in groups for e in g["reward_errors"])


def test_on_policy_mode_is_one_plain_update(micro, tmp_path):
    rl(_cfg(micro, tmp_path / "run", steps=1, batch_groups=2, mini_batch_groups=1, on_policy=True))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["updates"] == 1 and row["clip_frac"] == 0.0 and row["ratio_mean"] == pytest.approx(1.0)


def test_a_finished_run_is_not_trained_again_unless_its_config_changed(micro, tmp_path):
    first = rl(_cfg(micro, tmp_path / "run", steps=1))
    weights = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    rows = len(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    again = rl(_cfg(micro, tmp_path / "run", steps=1))  # a resumed speedrun: the finished stage is reused
    assert again == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["wall_s"] == first["wall_s"] and again["model_dir"] == first["model_dir"]
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == weights
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == rows
    changed = rl(_cfg(micro, tmp_path / "run", steps=1, lr=1e-3))  # another config trains
    assert changed["config_hash"] != first["config_hash"] and changed["wall_s"] != first["wall_s"]


def test_all_degenerate_stops_with_a_warning(micro, tmp_path):
    cfg = _cfg(micro, tmp_path / "run", steps=10, rewards={"arith": {"name": "test_constant", "value": 1.0}},
               max_degenerate_steps=2, max_slots_factor=2.0)
    with pytest.warns(RuntimeWarning, match="consecutive steps without a valid group"):
        summary = rl(cfg)
    assert summary["steps"] == 2 and "too easy or too hard" in summary["stopped"]


@pytest.mark.parametrize("timing", [{"async_reward": False}, {"reward_lag": 3}], ids=["inline", "lagged"])
def test_same_seed_same_run_without_reward_timing(micro, tmp_path, timing):
    """Rewards scored inline, or read a fixed number of engine steps after each sample finished: which
    groups start, finish and train is then a function of the seed alone, so two fresh runs match row for
    row (the speedrun's same-seed-same-numbers promise)."""
    runs = []
    for name in ("a", "b"):
        rl(_cfg(micro, tmp_path / name, steps=3, batch_groups=3, mini_batch_groups=1, save_every=100, **timing))
        keep = ("loss", "reward", "groups_started", "tokens_generated", "grad_norm")
        runs.append([{k: r.get(k) for k in keep} for r in read_jsonl(tmp_path / name / "metrics.jsonl")])
        runs[-1].append(read_jsonl(tmp_path / name / "rollouts.jsonl"))
    assert runs[0] == runs[1] and len(runs[0][-1]) == 3


def _last_per_step(path: Path) -> dict[int, list]:
    out = {}
    for row in read_jsonl(path, tolerate_partial_last_line=True):
        out[row["step"]] = [(g["problem"], g["rewards"]) for g in row["groups"]]
    return out


def test_sigkill_resume_same_data_order_and_nan_keeps_checkpoint(micro, tmp_path):
    steps = 4
    ref = tmp_path / "ref"
    rl(_cfg(micro, ref, steps=steps))
    run = tmp_path / "run"
    cfg = json.dumps({**_cfg(micro, run, steps=steps).__dict__})
    script = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import tests.test_rl_support\n"
              "from thinkforge.train.rl import RLConfig, rl\nrl(RLConfig(**json.loads(sys.argv[1])))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, cfg], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (run / "checkpoint" / "trainer.pt").exists() and len(_last_per_step(run / "rollouts.jsonl")) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    ckpt = run / "checkpoint" / "trainer.pt"
    saved = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 1 <= saved < steps
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # A diverging resume (absurd learning rate -> inf weights -> NaN loss) stops with a clear message and
    # leaves the last good checkpoint untouched.
    with pytest.raises(ThinkforgeError, match=r"rl: (loss|gradient norm) is (nan|inf)"):
        rl(_cfg(micro, run, steps=steps, lr=1e30, batch_groups=4, mini_batch_groups=1))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    summary = rl(_cfg(micro, run, steps=steps))
    assert summary["steps"] == steps
    assert _last_per_step(run / "rollouts.jsonl") == _last_per_step(ref / "rollouts.jsonl")
    # Rows the killed and the diverged runs wrote past the checkpoint are dropped on resume: one row per step.
    for log in ("rollouts.jsonl", "metrics.jsonl"):
        assert [r["step"] for r in read_jsonl(run / log)] == [r["step"] for r in read_jsonl(ref / log)], log


def test_cli_reports_bad_input(micro, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "thinkforge.cli", "rl", "--model", micro, "--out", str(tmp_path / "o"),
                          "--set", "clip_lo=0.1"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr and "clip_lo" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "thinkforge.cli", "rl", "--model", micro, "--tasks", "nosuch",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "unknown task 'nosuch'" in bad.stderr
    # Issue 14: RL on a task with no answer-only train problems (a benchmark has a test split only; a difficulty
    # no train problem has) stops with one line before any compute, never trains on the test or on nothing.
    for args, expect in ((["--tasks", "gsm8k"], "rl: task 'gsm8k' has no answer-only train problems: it has no "
                                                "'train' split"),
                         (["--tasks", "code", "--set", "difficulty=0"], "rl: task 'code' has no answer-only train "
                                                                        "problems at difficulty 0")):
        bad = subprocess.run([sys.executable, "-m", "thinkforge.cli", "rl", "--model", micro, *args,
                              "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and expect in lines[0], bad.stderr
