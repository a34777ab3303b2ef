"""Rewards for the visual tasks, MiMo-VL's router table: GIoU for boxes, point-in-box for points, exact
match for counts and chart values, token F1 for captions (math-verify covers the digit arithmetic through
the built-in `math` reward), and a Bradley-Terry reward model for preference (`bt_preference`). All in [0, 1].

Boxes are [x1, y1, x2, y2] in pixels of the image the model sees (after `smart_resize`); a gold box that
is malformed or outside its image is bad data and raises (the router records it as a reward error), a
predicted one only scores low.
"""

from __future__ import annotations

import re
from typing import Any

from thinkforge.rewards.base import KIND_DEFAULTS, RewardResult, register_reward
from thinkforge.tasks.base import Problem

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def giou(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    """(IoU, GIoU) of two boxes [x1, y1, x2, y2]. GIoU = IoU - |C minus (A u B)| / |C|, C the smallest
    enclosing box; in (-1, 1]."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = area_a + area_b - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    iou = inter / union if union > 0 else 0.0
    return iou, iou - (hull - union) / hull if hull > 0 else iou


def _answer_numbers(response: str, count: int) -> list[float] | None:
    """The `count` numbers inside the final \\boxed{} (brackets/parentheses/commas allowed), else None."""
    from thinkforge.verify import extract_boxed

    boxed = extract_boxed(response)
    if boxed is None:
        return None
    nums = NUMBER.findall(boxed)
    return [float(n) for n in nums] if len(nums) == count else None


def gold_box(problem: Problem) -> tuple[float, float, float, float]:
    from thinkforge.vl.images import check_box

    frames = problem.meta.get("frames") or []
    if not frames:
        from thinkforge.errors import ThinkforgeError

        raise ThinkforgeError(f"problem {problem.id}: meta.frames is missing (the size of the image the model sees)")
    return check_box(problem.meta.get("box"), tuple(frames[0]), f"problem {problem.id}: meta.box")


@register_reward("giou")
class GIoUReward:
    """(GIoU + 1) / 2 of the predicted box against the gold box; `correct` is IoU >= `threshold` (Acc@0.5)."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        gold = gold_box(problem)
        pred = _answer_numbers(response, 4)
        if pred is None:
            return RewardResult(0.0, False, "no_answer")
        if not (pred[0] < pred[2] and pred[1] < pred[3]):
            return RewardResult(0.0, False, "empty_box", {"box": pred})
        iou, g = giou(tuple(pred), gold)
        ok = iou >= self.threshold
        return RewardResult((g + 1) / 2, ok, "correct" if ok else "low_iou", {"iou": iou, "giou": g, "box": pred})


@register_reward("point_in_box")
class PointInBoxReward:
    """1 if the predicted point (x, y) lies inside the gold box (edges included), else 0."""

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        x1, y1, x2, y2 = gold_box(problem)
        pt = _answer_numbers(response, 2)
        if pt is None:
            return RewardResult(0.0, False, "no_answer")
        ok = x1 <= pt[0] <= x2 and y1 <= pt[1] <= y2
        return RewardResult(float(ok), ok, "correct" if ok else "outside_box", {"point": pt})


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@register_reward("vl_exact")
class ExactMatchReward:
    """1 if the final \\boxed{} answer equals the gold answer (numbers compared as numbers), else 0."""

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        from thinkforge.verify import extract_boxed

        got = extract_boxed(response)
        if got is None:
            return RewardResult(0.0, False, "no_answer")
        try:
            ok = float(got.strip()) == float(problem.answer)
        except ValueError:
            ok = normalize(got) == normalize(problem.answer)
        return RewardResult(float(ok), ok, "correct" if ok else "wrong_answer", {"extracted": got})


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum(min(p.count(t), g.count(t)) for t in set(p))
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@register_reward("caption_f1")
class CaptionReward:
    """Token F1 of the response against the reference caption; `correct` on an exact (normalised) match."""

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        f1 = token_f1(response, problem.answer)
        ok = normalize(response) == normalize(problem.answer)
        return RewardResult(f1, ok, "correct" if ok else "partial" if f1 else "wrong_answer")


BT_ENV = "THINKFORGE_BT_REWARD_MODEL"


@register_reward("bt_preference")
class BTPreferenceReward:
    """A Bradley-Terry reward model's sigmoid(score) in (0, 1) (`thinkforge.vl.reward_model`, trained by
    `thinkforge.train.reward_model`): MiMo-VL's human-preference reward, for tasks without a verifier (kind
    "preference") or mixed with a verifiable reward in a route. `path`: the checkpoint directory (route or
    `reward_options` option), else $THINKFORGE_BT_REWARD_MODEL. `correct` is sigmoid(score) >= `threshold`."""

    def __init__(self, path: str | None = None, device: str = "cpu", threshold: float = 0.5) -> None:
        import os

        from thinkforge.errors import ThinkforgeError
        from thinkforge.vl.reward_model import load_bt

        path = path or os.environ.get(BT_ENV)
        if not path:
            raise ThinkforgeError(f"reward bt_preference: no reward model; give the option path=<dir> (in the route "
                                  f"or reward_options) or set {BT_ENV}")
        self.path, self.threshold = str(path), threshold
        self.model = load_bt(path, device)

    def __call__(self, problem: Problem, response: str) -> RewardResult:
        r = self.model.reward(problem.prompt, response, problem.meta.get("images", []), f"problem {problem.id}")
        ok = r >= self.threshold
        return RewardResult(r, ok, "preferred" if ok else "dispreferred", {"bt_reward": r})


# Task kind -> reward, beside the text kinds (math / code / choice).
KIND_DEFAULTS.update({"vl_exact": "vl_exact", "box": "giou", "point": "point_in_box", "caption": "caption_f1",
                      "preference": "bt_preference"})


def as_score(result: RewardResult) -> Any:
    """The same verdict as a task `Score` (tasks score with their reward, so eval and RL agree)."""
    from thinkforge.tasks.base import Score

    extracted = result.details.get("extracted")
    if extracted is None and "box" in result.details:
        extracted = str(result.details["box"])
    if extracted is None and "point" in result.details:
        extracted = str(result.details["point"])
    return Score(result.correct, result.reward, result.reason, extracted, dict(result.details))
