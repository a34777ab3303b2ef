"""`thinkforge rl --set cluster.trainer_procs=2`: the trainer as two gloo FSDP2 ranks (the driver is rank 0
and spawns rank 1) takes the same run as one process -- same groups, same loss curve, same final weights
within float64 round-off -- and a SIGKILLed driver resumes from its gathered checkpoint with the same data
order (a one-process run can load that checkpoint too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tests.test_rl_support as support
from thinkforge.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# float64 trainer weights: the sharded and the one-process updates differ only by summation order, and the
# engine (float32) then rounds both to the same weights, so the rollouts -- and the selected groups -- match.
SETS = {"tasks": ["arith"], "steps": STEPS, "batch_groups": 3, "group_size": 4, "mini_batch_groups": 1,
        "max_tokens": 10, "lr": 3e-3, "problems_per_task": 40, "eval_problems": 4, "eval_max_tokens": 6,
        "rewards": {"arith": "test_has_digit"}, "reward_workers": 2, "save_every": 1, "engine_max_batch": 16,
        "device": "cpu", "overlong": "none", "dtype": "float64", "engine_dtype": "float32", "micro_batch_size": 2}
# The real CLI, with the test rewards registered first (as a user's --set cluster.worker_imports would).
CLI = ("import sys; sys.path.insert(0, {root!r}); import tests.test_rl_support\n"
       "from thinkforge.cli import main\nsys.argv = ['thinkforge', *sys.argv[1:]]\nmain()\n")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return support.micro_model(tmp_path_factory.mktemp("trainer_micro"))


@pytest.fixture(scope="module")
def reference(micro, tmp_path_factory):
    """The one-process run every layout is compared with."""
    from thinkforge.train.rl import RLConfig, rl

    out = tmp_path_factory.mktemp("trainer_ref") / "run"
    rl(RLConfig(model=micro, out_dir=str(out), **SETS))
    return out


def _cli(micro: str, out: Path, procs: int) -> list[str]:
    args = [sys.executable, "-c", CLI.format(root=str(ROOT)), "rl", "--model", micro, "--out", str(out)]
    for k, v in {**SETS, "cluster.trainer_procs": procs}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _losses(out: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_same_run(ref: Path, run: Path, micro: str) -> None:
    assert read_jsonl(run / "rollouts.jsonl") == read_jsonl(ref / "rollouts.jsonl")  # same groups, every step
    a, b = _losses(ref), _losses(run)
    assert len(a) == len(b) == STEPS
    # The behaviour log-probs come from the float32 engine, whose rounding depends on the process's BLAS
    # path; the loss (a mean of nearly cancelling terms) is compared relative to the run's largest loss.
    scale = max(abs(la) for la, _ in a)
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(lb - la) <= 1e-3 * scale and gb == pytest.approx(ga, rel=1e-4)
    start = _weights(Path(micro))
    wa, wb = _weights(ref / "model"), _weights(run / "model")
    assert set(wa) == set(wb) and all(wa[k].dtype == torch.float64 for k in wa)
    moved = sum(float((wa[k] - start[k].double()).pow(2).sum()) for k in wa) ** 0.5
    gap = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    assert moved > 0 and gap <= 1e-4 * moved, (gap, moved)


def test_two_fsdp2_ranks_train_the_same_run_as_one_process(micro, reference, tmp_path):
    out = tmp_path / "fsdp"
    proc = subprocess.run(_cli(micro, out, 2), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rl: {STEPS} steps" in proc.stdout
    _assert_same_run(reference, out, micro)
    assert not (out / "checkpoint").exists() and not (out / ".trainer_ranks.json").exists()


def _rank_pids(out: Path) -> list[int]:
    """Trainer ranks started for `out` (found by the rank spec file on their command line)."""
    spec = str(out / ".trainer_ranks.json").encode()
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and spec in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_sigkill_of_the_driver_then_resume_keeps_the_data_order(micro, reference, tmp_path):
    from thinkforge.model.io import load_model
    from thinkforge.train.common import load_checkpoint, make_optimizer
    from thinkforge.train.rl import RLConfig, rl

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(micro, run, 2), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env())
    ckpt = run / "checkpoint" / "trainer.pt"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["state"]["step"] >= 1 and _rank_pids(run):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        ranks = _rank_pids(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert ranks
    deadline = time.time() + 20  # the spawned rank notices its driver is gone and exits
    while _rank_pids(run) and time.time() < deadline:
        time.sleep(0.2)
    assert not _rank_pids(run)
    saved = torch.load(ckpt, weights_only=False)
    assert 1 <= saved["state"]["step"] < STEPS

    # The gathered checkpoint is a one-process checkpoint: it loads into an unsharded policy and AdamW.
    copy = tmp_path / "copy"
    shutil.copytree(run / "checkpoint", copy / "checkpoint")
    model, _ = load_model(micro, device="cpu", dtype=torch.float64)
    optimizer = make_optimizer(model, 1e-3, 0.0)
    state = load_checkpoint(copy, model, optimizer)
    assert state["step"] == saved["state"]["step"]
    on_disk = _weights(copy / "checkpoint" / "model")
    assert all(torch.equal(p.detach(), on_disk[k]) for k, p in model.named_parameters())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(optimizer.state) == len(params)
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in params)

    # Resume on two ranks again: the run ends as the uninterrupted one-process run did.
    summary = rl(RLConfig(model=micro, out_dir=str(run), **{**SETS, "cluster": {"trainer_procs": 2}}))
    assert summary["steps"] == STEPS
    _assert_same_run(reference, run, micro)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [r["step"] for r in
                                                                      read_jsonl(reference / "metrics.jsonl")]
