"""MORL on the text RL stack: VL rollouts (thinkforge.vl.rollout) feeding the GRPO trainer (thinkforge.train.grpo)."""

from __future__ import annotations

import copy

import pytest
import torch

import tests.test_rl_support  # noqa: F401  (registers the test rewards, test_slow_digit among them)
from thinkforge.rewards import RewardResult, RewardRouter, register_reward
from thinkforge.rollout import ProblemSampler, RolloutConfig
from thinkforge.tasks import get_task
from thinkforge.train.grpo import TrainSample, collate, token_logprobs
from thinkforge.train.rl import RLConfig, _train_step
from thinkforge.vl.model import build_tiny_vl
from thinkforge.vl.rollout import VLRolloutEngine, VLSeamlessRollout


@register_reward("test_length")
class LengthReward:
    """Longer answers score higher: an untrained model's groups then have unequal rewards (valid groups)."""

    def __call__(self, problem, response):
        r = min(1.0, len(response) / 25)
        return RewardResult(r, r >= 0.5, "length")


@pytest.fixture(scope="module")
def setup():
    tasks = {name: get_task(name) for name in ("vl_count", "vl_compare", "vl_ground")}
    texts = [f"{p.prompt} {p.solution}" for t in tasks.values() for p in t.problems("train", n=20)]
    model, proc = build_tiny_vl(texts, "micro", seed=0)
    return model.train(), proc, tasks


def test_vl_rollout_groups_train_the_whole_model_on_policy(setup):
    model, proc, tasks = setup
    engine = VLRolloutEngine(copy.deepcopy(model).eval().requires_grad_(False), proc)
    # Mixed tasks through one router: a real per-task reward for grounding, the length reward elsewhere.
    router = RewardRouter({"vl_count": "test_length", "vl_compare": "test_length",
                           "vl_ground": [{"name": "giou", "weight": 1.0}, {"name": "test_length", "weight": 1.0}]},
                          workers=2)
    problems = [p for t in tasks.values() for p in t.problems("train", n=4, seed=0)]
    sampler = ProblemSampler(problems, seed=0, easy_alpha=0.1, easy_pool=True)
    rollout = VLSeamlessRollout(engine, router, tasks, RolloutConfig(group_size=3, max_tokens=8, temperature=1.0))
    try:
        draw = sampler.begin_step()
        res = rollout.collect(draw, 2)
        sampler.commit(draw, len(res.groups), [(g.rewards, g.correct) for g in res.groups])
    finally:
        router.close()
    assert len(res.selected) == 2
    assert not {g.slot.problem.id for g in res.groups} & set(rollout._pending)  # submitted: pixels not kept
    for g in res.selected:
        assert g.mm["pixel_values"] is not None and len(g.mm["mm_token_type_ids"]) == len(g.prompt_ids)
        assert sum(g.mm["mm_token_type_ids"]) == g.prompt_ids.count(proc.image_token_id) > 0
        for s in g.samples:
            assert not set(s.token_ids) & set(proc.vision_token_ids)
    cfg = RLConfig(model="unused", tasks=list(tasks), on_policy=True, batch_groups=2, mini_batch_groups=2,
                   group_size=3, lr=1e-3, max_tokens=8, temperature=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    stats = _train_step(model, None, optimizer, res.selected, cfg, proc.tokenizer.pad_token_id, "cpu", 1)
    # The trainer's log-probs (full forward, vision tokens excluded) are the sampler's (HF generate, KV cache).
    assert stats["logprob_drift"] < 1e-4 and stats["logprob_drift_max"] < 1e-3
    assert stats["updates"] == 1 and torch.isfinite(torch.tensor(stats["entropy"]))
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.visual.blocks.") for k in moved)  # gradients reach the ViT...
    assert any(k.startswith("model.visual.merger.") for k in moved)  # ...the projector
    assert any(k.startswith("model.language_model.") for k in moved)  # ...and the LLM
    engine.load_weights({k: v.detach() for k, v in model.named_parameters()})
    assert all(torch.equal(a, b) for a, b in zip(engine.model.parameters(), model.parameters(), strict=True))


def test_requests_with_the_same_prompt_text_sample_from_their_own_images(setup):
    """Every count prompt has the same ids (the image is 16 identical pad tokens): a request must carry its own
    problem's pixels, or rollouts answer another problem's image and the rewards grade the wrong picture."""
    from thinkforge.engine.base import SamplingParams
    from thinkforge.errors import ThinkforgeError
    from thinkforge.rollout.data import Slot

    model, proc, tasks = setup
    engine = VLRolloutEngine(copy.deepcopy(model).eval().requires_grad_(False), proc)
    rollout = VLSeamlessRollout(engine, None, tasks, RolloutConfig(group_size=2, max_tokens=6, temperature=1.0))
    problems = tasks["vl_count"].problems("train", n=3, seed=0)
    encs = []
    for i, p in enumerate(problems):
        ids = rollout.prompt_ids(Slot(i, p, "main", i, 0))
        encs.append(rollout._pending[p.id])
        assert rollout.prompt_ids(Slot(i, p, "main", i, 0)) is ids  # ids are cached, the encoding waits
    # Once submitted, an encoding is dropped (pixels of every problem seen would pile up) and re-made on a revisit.
    again = rollout._encode(problems[0])
    assert again.input_ids == encs[0].input_ids and torch.equal(again.pixel_values, encs[0].pixel_values)
    assert encs[0].input_ids == encs[1].input_ids == encs[2].input_ids
    assert not torch.equal(encs[0].pixel_values, encs[1].pixel_values)
    params = SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=7, logprobs=True)
    for i, enc in enumerate(encs):
        engine.add_encoded(enc, params, request_id=f"r{i}")
    outs = engine.step()  # one batched generate for the three requests

    def trainer_gap(enc, comp, image_of):
        mm = {"pixel_values": image_of.pixel_values, "image_grid_thw": image_of.image_grid_thw,
              "mm_token_type_ids": enc.mm_token_type_ids, "suppress_ids": proc.vision_token_ids}
        row = TrainSample(enc.input_ids + comp.token_ids, len(enc.input_ids), comp.logprobs, 0.0, True, mm=mm)
        batch = collate([row], proc.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            logp, _ = token_logprobs(model, batch, 1.0)
        return float(((logp - batch["old"]).abs() * batch["completion"]).max())

    assert sorted(o.request_id for o in outs) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    for o in outs:
        i = int(o.request_id[1:])
        # The sampler's log-probs are the trainer's on the request's own image, and not on another's.
        assert trainer_gap(encs[i], o.completion, encs[i]) < 1e-4
        assert trainer_gap(encs[i], o.completion, encs[(i + 1) % 3]) > 1e-3
    with pytest.raises(ThinkforgeError, match="image tokens but no images"):
        engine.add_request(encs[0].input_ids, params, request_id="bare")


def test_text_samples_collate_as_before_and_bad_token_types_fail():
    rows = [TrainSample([1, 2, 3, 4], 2, [-0.5, -0.2], 1.0, True), TrainSample([1, 2, 5], 2, [-0.1], -1.0, True)]
    batch = collate(rows, 0, "cpu")
    assert set(batch) == {"input_ids", "attention_mask", "completion", "old", "adv", "mask", "weight"}
    bad = TrainSample([1, 2, 3], 2, [-0.1], 1.0, True, mm={"mm_token_type_ids": [0, 0, 0]})
    with pytest.raises(ValueError, match="3 token types for a 2-token prompt"):
        collate([bad], 0, "cpu")


def test_rl_runs_on_a_vl_checkpoint_with_the_text_loop(setup, tmp_path):
    """`thinkforge.train.rl.rl` itself on a VL policy: mixed tasks, router, dynamic sampling, per-task lengths."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from thinkforge.train.rl import rl
    from thinkforge.utils import read_jsonl
    from thinkforge.vl.model import save_vl

    model, proc, tasks = setup
    start = tmp_path / "start"
    save_vl(model, proc, start)
    cfg = RLConfig(model=str(start), tasks=["vl_count", "vl_ground"], out_dir=str(tmp_path / "rl"),
                   rewards={"vl_count": "test_length", "vl_ground": [{"name": "giou"}, {"name": "test_length"}]},
                   problems_per_task=4, steps=2, batch_groups=2, mini_batch_groups=2, group_size=3, max_tokens=8,
                   on_policy=True, lr=1e-3, eval_problems=2, eval_max_tokens=8, reward_workers=1, save_every=1,
                   overlong="none",  # 8-token answers are all truncated: masking them would leave no gradient
                   device="cpu", dtype="float32", engine_dtype="float32", seed=0)
    summary = rl(cfg)
    assert summary["steps"] == 2 and set(summary["accuracy"]) == {"vl_count", "vl_ground"}
    rows = [r for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["logprob_drift"] < 1e-4 and r["grad_norm"] > 0 for r in rows)
    assert all("response_length/vl_count" in r and "response_length/vl_ground" in r for r in rows)
    final = tmp_path / "rl" / "model"
    keys = list(safe_open(str(final / "model.safetensors"), "pt").keys())
    assert any(k.startswith("model.visual.merger.") for k in keys)
    reloaded = AutoModelForImageTextToText.from_pretrained(str(final))
    start_w = {k: v for k, v in model.named_parameters()}
    assert any(not torch.equal(v, start_w[k]) for k, v in reloaded.named_parameters() if k in start_w)
    assert json.loads((final / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_vl_rl_with_a_reward_lag_is_the_same_run_whatever_the_reward_timing(setup, tmp_path):
    """The VL engine generates whatever is queued in one batch, so without a fixed reward lag the batches (and
    with them the samples) follow how fast rewards come back. With `reward_lag`, a slow reward changes nothing."""
    from thinkforge.train.rl import rl
    from thinkforge.utils import read_jsonl
    from thinkforge.vl.model import save_vl

    model, proc, _ = setup
    start = tmp_path / "start"
    save_vl(model, proc, start)
    runs = []
    for name, delay in (("fast", 0.0), ("slow", 0.03)):
        rl(RLConfig(model=str(start), tasks=["vl_count"], out_dir=str(tmp_path / name),
                    rewards={"vl_count": {"name": "test_slow_digit", "delay_s": delay}}, reward_lag=1,
                    problems_per_task=6, steps=2, batch_groups=2, mini_batch_groups=2, group_size=3, max_tokens=8,
                    on_policy=True, lr=1e-3, eval_problems=2, eval_max_tokens=8, reward_workers=2, save_every=100,
                    overlong="none", device="cpu", dtype="float32", engine_dtype="float32", seed=0))
        runs.append((read_jsonl(tmp_path / name / "rollouts.jsonl"),
                     (tmp_path / name / "model" / "model.safetensors").read_bytes()))
    (rollouts_a, weights_a), (rollouts_b, weights_b) = runs
    assert len(rollouts_a) == 2 and rollouts_a == rollouts_b
    assert weights_a == weights_b
