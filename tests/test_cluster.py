"""Scale-out on a real local Ray cluster (CPU): the RL controller driving rollout engines and reward
scorers on Ray actors trains on the same groups with the same loss curve as one process; weight sync is
bitwise and versioned; dead workers are replaced without losing or duplicating samples; bad cluster
settings fail in one line before any compute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tests.test_rl_support as support
from thinkforge.cluster.config import ClusterConfig
from thinkforge.cluster.weights import WeightVersionError, pack_buckets
from thinkforge.errors import ThinkforgeError
from thinkforge.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ["tests.test_rl_support"]  # the test rewards, registered in every worker too


@pytest.fixture(scope="module")
def ray_cluster():
    from thinkforge.cluster.raycluster import connect

    ray = connect(ClusterConfig(backend="ray", num_cpus=6))  # logical CPUs: actors reserve 1 each
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return support.micro_model(tmp_path_factory.mktemp("cluster_micro"))


def _cfg(model: str, out: Path, **kw):
    from thinkforge.train.rl import RLConfig

    base = dict(model=model, tasks=["arith"], out_dir=str(out), steps=3, batch_groups=3, group_size=4,
                mini_batch_groups=1, max_tokens=10, lr=3e-3, problems_per_task=40, eval_problems=4,
                eval_max_tokens=6, rewards={"arith": "test_has_digit"}, reward_workers=2, save_every=100,
                engine_max_batch=16, device="cpu", overlong="none")
    return RLConfig(**{**base, **kw})


def _spec(model: str):
    from thinkforge.cluster.ray_rollout import EngineSpec

    return EngineSpec(model=model, device="cpu", dtype="float32", engine_dtype="float32", max_batch_size=16,
                      imports=IMPORTS)


# ------------------------------------------------------------------------------------ same run, two layouts
def test_ray_run_trains_on_the_same_groups_with_the_same_loss_curve(ray_cluster, micro, tmp_path):
    from thinkforge.train.rl import rl

    rl(_cfg(micro, tmp_path / "local"))
    rl(_cfg(micro, tmp_path / "ray", cluster={"backend": "ray", "rollout_workers": 2, "reward_workers": 2,
                                               "worker_imports": IMPORTS}))
    local, ray = (read_jsonl(tmp_path / n / "rollouts.jsonl") for n in ("local", "ray"))
    assert local == ray and len(local) == 3  # same committed groups, same rewards, same selection, every step
    a, b = ([r for r in read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("local", "ray"))
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        # Same samples; only the engines' batch composition differs (other BLAS blocking), hence a tolerance.
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
        assert rb["reward"] == ra["reward"] and rb["weight_version"] == ra["weight_version"]
        assert rb["weight_sync_s"] > 0 and rb["ray_overhead_s"] >= 0 and "ray_overhead_s" not in ra


# ------------------------------------------------------------------------------------ weight sync
def test_weight_sync_is_bitwise_versioned_and_refuses_mismatches(ray_cluster, micro):
    from thinkforge.cluster.ray_rollout import RayObjectStoreSync, RayRolloutEngine
    from thinkforge.model.io import load_model

    model, tokenizer = load_model(micro, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():  # weights the workers cannot have loaded from disk
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
    trainer = {k: v.detach() for k, v in model.named_parameters()}
    engine = RayRolloutEngine(_spec(micro), 2, tokenizer)
    try:
        sync = RayObjectStoreSync(engine, bucket_bytes=64 << 10)  # small buckets: several per update
        assert len(pack_buckets(trainer, 1, 64 << 10)) > 1
        assert sync.push(trainer, 1) > 0
        assert engine.worker_versions() == [1, 1] and engine.weight_version == 1
        for w in range(2):
            copy = engine.named_weights(w)
            assert set(copy) == set(trainer) and all(torch.equal(copy[k], trainer[k]) for k in trainer)
        with pytest.raises(WeightVersionError, match="version 1 offered to an engine at version 1"):
            sync.push(trainer, 1)  # a replayed update
        mixed = pack_buckets(trainer, 2, 64 << 10)
        mixed[1].version = 3
        with pytest.raises(WeightVersionError, match="holds buckets of version 3"):
            engine.load_weight_buckets(mixed, 2)
        with pytest.raises(WeightVersionError, match="incomplete"):
            engine.load_weight_buckets(pack_buckets(trainer, 2, 64 << 10)[1:], 2)
        assert engine.worker_versions() == [1, 1]  # refused updates leave the engines as they were
    finally:
        engine.close()


def test_controller_refuses_to_sample_from_weights_it_did_not_send(micro, tmp_path):
    """The in-process engine refuses a stale update too, and the controller checks the engine's version."""
    from thinkforge.cluster.roles import NativeRolloutEngine
    from thinkforge.cluster.weights import InProcessWeightSync
    from thinkforge.engine.native import LLMEngine
    from thinkforge.model.io import load_model

    model, tokenizer = load_model(micro, device="cpu", dtype=torch.float32)
    engine = NativeRolloutEngine(LLMEngine(load_model(micro, device="cpu", dtype=torch.float32)[0], tokenizer))
    sync = InProcessWeightSync(engine, 1 << 20)
    sync.push(dict(model.named_parameters()), 5)
    with pytest.raises(WeightVersionError, match="version 4 offered to an engine at version 5"):
        sync.push(dict(model.named_parameters()), 4)
    assert engine.weight_version == 5


# ------------------------------------------------------------------------------------ faults
def test_killed_reward_worker_is_replaced_and_its_samples_rescored(ray_cluster):
    from thinkforge.cluster.ray_reward import RayRewardPool
    from thinkforge.rewards import RewardRouter
    from thinkforge.tasks import get_task

    problems = get_task("arith").problems("train", n=8, seed=0)
    responses = [f"answer {i}" if i % 3 else "no digits here" for i in range(48)]
    items = [(problems[i % len(problems)], r) for i, r in enumerate(responses)]
    route = {"arith": {"name": "test_slow_digit", "delay_s": 0.05}}
    pool = RayRewardPool(route, {}, ["arith"], workers=2, timeout_s=30.0, imports=IMPORTS)
    try:
        futures = [pool.submit(p, r) for p, r in items]
        while sum(f.done() for f in futures) < 4:
            time.sleep(0.01)
        os.kill(pool.pids[0], signal.SIGKILL)  # mid-batch: it holds about half of the queue
        results = [pool.result(f) for f in futures]
        assert pool.restarts == 1 and pool.rescored > 0
        # Restarts are bounded: past cluster.max_restarts the samples of a dead worker fail the run in one line.
        pool.max_restarts = 1
        pid = ray_cluster.get(pool.actors[0].pid.remote())  # asked first: actor calls run in order
        more = [pool.submit(p, r) for p, r in items[:8]]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ThinkforgeError, match="reward worker 0 died; 1 restarts already used"):
            for f in more:
                pool.result(f)
    finally:
        pool.close()
    inline = RewardRouter(route)
    assert [r.reward for r in results] == [inline.score_now(p, r).reward for p, r in items]
    assert all(r.reason in ("correct", "wrong_answer") for r in results)  # none lost, none scored 0 by a fault


def test_killed_rollout_worker_has_its_requests_readmitted(ray_cluster, micro):
    from thinkforge.cluster.ray_rollout import RayRolloutEngine
    from thinkforge.engine.base import SamplingParams
    from thinkforge.engine.native import LLMEngine
    from thinkforge.model.io import load_model

    model, tokenizer = load_model(micro, device="cpu", dtype=torch.float32)
    prompts = [tokenizer(f"Question {i}: what is {i} + {2 * i}?", add_special_tokens=False)["input_ids"]
               for i in range(6)]
    params = [SamplingParams(temperature=1.0, max_tokens=24, n=3, seed=100 + i, logprobs=True) for i in range(6)]
    reference = LLMEngine(model, tokenizer, max_batch_size=16)
    expected = {f"r{i}": reference.generate([p], params[i])[0] for i, p in enumerate(prompts)}
    engine = RayRolloutEngine(_spec(micro), 2, tokenizer)
    try:
        engine.load_weight_buckets(pack_buckets(dict(model.named_parameters()), 0, 1 << 20), 0)
        for i, p in enumerate(prompts):
            engine.add_request(p, params[i], request_id=f"r{i}")
        got: dict[tuple[str, int], list[int]] = {}
        steps = 0
        while engine.has_unfinished():
            if steps == 3:
                os.kill(engine.pids[0], signal.SIGKILL)  # mid-generation, with requests in flight
            for out in engine.step():
                assert (out.request_id, out.index) not in got  # nothing delivered twice
                got[(out.request_id, out.index)] = out.completion.token_ids
            steps += 1
        assert engine.restarts == 1 and engine.stats["readmitted"] > 0
        assert engine.worker_versions() == [0, 0]  # the replacement got the current weights
    finally:
        engine.close()
    assert got == {(rid, j): c.token_ids for rid, comps in expected.items() for j, c in enumerate(comps)}


# ------------------------------------------------------------------------------------ bad input
def _cli(micro: str, out: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "thinkforge.cli", "rl", "--model", micro, "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=120)


def test_bad_cluster_settings_fail_in_one_line_before_any_compute(micro, tmp_path):
    bad = _cli(micro, tmp_path / "o", "cluster.backend=ray", "cluster.address=127.0.0.1:9",
               "cluster.rollout_workers=2", "cluster.connect_timeout_s=2")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1:9" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing was started or written
    for vllm in ("cluster.rollout_engine=vllm", "cluster.backend=vllm"):
        bad = _cli(micro, tmp_path / "o", vllm)
        assert bad.returncode == 2 and "needs vllm installed" in bad.stderr, bad.stderr[-2000:]
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    bad = _cli(micro, tmp_path / "o", "cluster.backend=slurm")
    assert bad.returncode == 2 and "cluster.backend must be one of local, ray" in bad.stderr
    with pytest.raises(ThinkforgeError, match="need cluster.backend=ray"):
        ClusterConfig(rollout_workers=2).check()


# ------------------------------------------------------------------------------------ bounded staleness
def test_bounded_staleness_is_opt_in_bounded_and_logged_per_sample(micro, tmp_path):
    """max_staleness=1: groups past the selected prefix stay in flight into the next step (continuing under
    the new weights) and may be trained on one version late, never more; each sample's staleness is logged."""
    from thinkforge.train.rl import rl

    rl(_cfg(micro, tmp_path / "run", steps=4, cluster={"max_staleness": 1}))
    rows = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    lags = [lag for r in rows for g in r["groups"] if g["selected"] for lag in g["staleness"]]
    assert len(lags) == 4 * 3 * 4  # every trained sample: [first token, last token] versions behind
    assert max(first for first, _ in lags) == 1 and all(0 <= last <= first <= 1 for first, last in lags)
    metrics = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert max(r["staleness_max"] for r in metrics) == 1


# ------------------------------------------------------------------------------------ driver SIGKILL
def test_ray_driver_sigkill_then_resume_keeps_the_data_order(ray_cluster, micro, tmp_path):
    """The driver (controller) of a Ray run is SIGKILLed after a checkpoint; its actors die with it (they
    are not detached), and the rerun -- joining the same cluster -- ends as an uninterrupted run did."""
    import json

    from thinkforge.train.rl import rl

    steps = 4
    ref = tmp_path / "ref"
    rl(_cfg(micro, ref, steps=steps))
    run = tmp_path / "run"
    cluster = {"backend": "ray", "address": ray_cluster.get_runtime_context().gcs_address, "rollout_workers": 2,
               "reward_workers": 2, "worker_imports": IMPORTS}
    cfg = json.dumps(_cfg(micro, run, steps=steps, save_every=1, cluster=cluster).__dict__)
    script = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import tests.test_rl_support\n"
              "from thinkforge.train.rl import RLConfig, rl\nrl(RLConfig(**json.loads(sys.argv[1])))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, cfg], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = run / "checkpoint" / "trainer.pt"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["state"]["step"] >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    saved = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 2 <= saved < steps
    summary = rl(_cfg(micro, run, steps=steps, save_every=1, cluster=cluster))  # same cluster, new driver
    assert summary["steps"] == steps
    assert read_jsonl(run / "rollouts.jsonl") == read_jsonl(ref / "rollouts.jsonl")  # same groups, every step
    a, b = ([r for r in read_jsonl(p / "metrics.jsonl") if "loss" in r] for p in (ref, run))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    scale = max(abs(r["loss"]) for r in a)
    assert all(abs(rb["loss"] - ra["loss"]) <= 1e-3 * scale for ra, rb in zip(a, b, strict=True))
