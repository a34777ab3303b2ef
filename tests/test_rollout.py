"""The RL data side (slot stream, Easy-Data Pool) and the Seamless Rollout Engine on a real micro model."""

from __future__ import annotations

import itertools

import pytest

import tests.test_rl_support as support
from thinkforge.rewards import RewardRouter
from thinkforge.rollout import ProblemSampler, RolloutConfig, SeamlessRollout
from thinkforge.tasks import get_task


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return support.micro_model(tmp_path_factory.mktemp("rollout_micro"))


def _problems(n=20):
    return get_task("arith").problems("train", n=n, seed=0)


def _slot_ids(sampler, k):
    draw = sampler.begin_step()
    return [(s.problem.id, s.source, s.seed) for s in (draw.next() for _ in range(k))], draw


def test_main_stream_is_shuffled_epochs_whatever_order_it_is_read_in():
    import random

    problems = _problems(7)
    s = ProblemSampler(problems, seed=5)
    want = []
    for epoch in range(4):  # each epoch: a permutation seeded by (seed, epoch), as before epochs were kept
        order = list(range(7))
        random.Random(5 * 7919 + epoch).shuffle(order)
        want += order
    assert [s.main_index(k) for k in range(28)] == want
    assert [s.main_index(k) for k in (27, 0, 15, 3)] == [want[27], want[0], want[15], want[3]]  # evicted epochs too
    assert sorted(want[7:14]) == list(range(7))


def test_slot_stream_is_deterministic_and_commit_advances():
    a, b = ProblemSampler(_problems(), seed=3), ProblemSampler(_problems(), seed=3)
    first, draw = _slot_ids(a, 6)
    assert first == _slot_ids(b, 6)[0]
    assert len({pid for pid, _, _ in first}) == 6 and len({s for _, _, s in first}) == 6
    # Committing 4 slots: the next step starts at slot 4 (slots 4, 5 are drawn again, same seeds).
    a.commit(draw, 4, [([0.0, 1.0], [False, True])] * 4)
    again, _ = _slot_ids(a, 2)
    assert again == first[4:6]
    # A fresh sampler restored from the state continues identically.
    c = ProblemSampler(_problems(), seed=3)
    c.load_state_dict(a.state_dict())
    assert _slot_ids(c, 5)[0] == _slot_ids(a, 5)[0]
    assert a.stats[first[0][0]] | {} == {"groups": 1, "samples": 2, "correct": 1, "reward_sum": 1.0, "pass_rate": 0.5,
                                         "task": "arith"}


def test_easy_pool_moves_solved_problems_and_resamples_with_alpha():
    s = ProblemSampler(_problems(10), seed=0, easy_alpha=0.3)
    draw = s.begin_step()
    slots = [draw.next() for _ in range(10)]
    s.commit(draw, 10, [([1.0] * 4, [True] * 4) if i < 5 else ([0.0, 1.0], [False, True]) for i in range(10)])
    solved = {sl.problem.id for sl in slots[:5]}
    assert set(s.easy) == solved and s.summary()["easy_pool_size"] == 5
    draw = s.begin_step()
    nxt = [draw.next() for _ in range(400)]
    easy = [sl for sl in nxt if sl.source == "easy"]
    assert 0.2 < len(easy) / len(nxt) < 0.4  # alpha = 0.3
    assert {sl.problem.id for sl in easy} <= solved
    assert not any(sl.problem.id in solved for sl in nxt if sl.source == "main")  # left the main stream
    # A pool problem that fails again goes back to the main stream.
    idx = next(i for i, sl in enumerate(nxt) if sl.source == "easy")
    s.commit(draw, idx + 1, [([0.0, 1.0], [False, True])] * (idx + 1))
    assert nxt[idx].problem.id not in s.easy


def _collect(model_dir, flags, need=3, reward="test_slow_digit", factor=6.0):
    from thinkforge.engine.loading import load_model_and_tokenizer
    from thinkforge.engine.native import LLMEngine

    model, tok = load_model_and_tokenizer(model_dir, "cpu", "float32")
    engine = LLMEngine(model, tok, max_batch_size=16, seed=0)
    router = RewardRouter({"arith": reward}, workers=2, timeout_s=10)
    cont, asy, et = flags
    rollout = SeamlessRollout(engine, router, {"arith": get_task("arith")}, RolloutConfig(
        group_size=4, max_tokens=12, continuous=cont, async_reward=asy, early_termination=et, max_slots_factor=factor))
    sampler = ProblemSampler(_problems(40), seed=1)
    try:
        draw = sampler.begin_step()
        return rollout.collect(draw, need)
    finally:
        router.close()


def test_every_mode_selects_the_same_batch(micro):
    """Naive, continuous, async and early-termination modes differ in speed only: same groups, same samples."""
    batches = {}
    for flags in itertools.product([False, True], repeat=3):
        res = _collect(micro, flags)
        assert len(res.selected) == 3
        assert all(g.complete for g in res.groups) and res.groups[-1].valid  # the prefix ends at a selected group
        st = res.stats
        assert st["tokens_used"] <= st["tokens_generated"]
        assert st["waste"] == pytest.approx(st["waste_degenerate"] + st["waste_surplus"])
        assert 0.0 <= st["idle_ratio"] <= 1.0 and st["valid_group_ratio"] == 3 / st["groups_committed"]
        batches[flags] = [(g.slot.problem.id, [tuple(s.token_ids) for s in g.samples], g.rewards) for g in res.selected]
        for g in res.selected:  # engine log-probs come with every sampled token
            assert all(len(s.logprobs) == len(s.token_ids) > 0 for s in g.samples)
    reference = batches[(False, False, False)]
    assert all(b == reference for b in batches.values())


def test_all_degenerate_groups_end_the_step_bounded(micro):
    res = _collect(micro, (True, True, True), need=2, reward={"name": "test_constant", "value": 0.0}, factor=2.0)
    assert res.selected == [] and res.stats["groups_started"] == 4 and res.stats["waste_degenerate"] == 1.0
