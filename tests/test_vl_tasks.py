"""Visual tasks (thinkforge.tasks.vision) and their rewards (thinkforge.rewards.vision)."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from thinkforge.errors import ThinkforgeError
from thinkforge.rewards import RewardRouter, get_reward
from thinkforge.rewards.vision import giou, token_f1
from thinkforge.tasks import get_task
from thinkforge.tasks.vision import VISION_TASKS
from thinkforge.vl.images import smart_resize, to_model_frame


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_giou_values():
    assert giou((0, 0, 2, 2), (0, 0, 2, 2)) == (1.0, 1.0)
    iou, g = giou((0, 0, 2, 2), (1, 0, 3, 2))  # inter 2, union 6, hull 6
    assert iou == pytest.approx(1 / 3) and g == pytest.approx(1 / 3)
    iou, g = giou((0, 0, 1, 1), (2, 0, 3, 1))  # disjoint: union 2, hull 3
    assert iou == 0 and g == pytest.approx(-1 / 3)
    iou, g = giou((0, 0, 1, 1), (100, 100, 101, 101))  # far apart: GIoU tends to -1
    assert g < -0.99


def test_box_and_point_rewards_in_the_model_frame():
    task = get_task("vl_ground")
    p = task.problems("heldout", n=5, seed=0)[0]
    img = _decode(p.meta["images"][0])
    assert smart_resize(img.height, img.width) == (img.height, img.width) == tuple(p.meta["frames"][0])
    # The gold box is exactly the red square's pixels in the image the model sees.
    red = np.argwhere((np.asarray(img) == (220, 30, 30)).all(-1))
    (y1, x1), (y2, x2) = red.min(0), red.max(0) + 1
    assert p.meta["box"] == [x1, y1, x2, y2]
    reward = get_reward("giou")
    assert reward(p, p.solution).reward == 1.0
    x1, y1, x2, y2 = p.meta["box"]
    w = x2 - x1
    shifted = reward(p, f"\\boxed{{[{x1 + w // 2}, {y1}, {x2 + w // 2}, {y2}]}}")
    assert 0.5 < shifted.reward < 1.0 and not shifted.correct  # IoU about 1/3: GIoU credit, not Acc@0.5
    far = reward(p, "\\boxed{[0, 0, 1, 1]}" if x1 > 10 else "\\boxed{[110, 110, 111, 111]}")
    assert 0.0 <= far.reward < 0.5
    assert reward(p, "\\boxed{[5, 5, 5, 9]}").reason == "empty_box"
    assert reward(p, "no box").reason == "no_answer"
    # A box drawn on a 100 x 150 original maps into the 112 x 140 frame the model sees.
    frame = smart_resize(100, 150)
    assert frame == (112, 140)
    assert to_model_frame((10, 20, 30, 40), (100, 150), frame) == pytest.approx([10 * 140 / 150, 20 * 1.12,
                                                                                 30 * 140 / 150, 40 * 1.12])
    point = get_task("vl_point").problems("heldout", n=1)[0]
    fn = get_reward("point_in_box")
    bx1, by1, bx2, by2 = point.meta["box"]
    assert fn(point, point.solution).correct
    assert fn(point, f"\\boxed{{({bx1}, {by2})}}").reward == 1.0  # edges count
    assert fn(point, f"\\boxed{{({bx2 + 1}, {by1})}}").reward == 0.0


def test_bad_gold_boxes_raise_naming_the_field_and_the_router_survives():
    p = get_task("vl_ground").problems("heldout", n=1)[0]
    outside = dataclasses.replace(p, meta={**p.meta, "box": [100, 10, 130, 40]})
    with pytest.raises(ThinkforgeError, match=r"problem vl_ground/.*: meta.box: box \[100, 10, 130, 40\] is empty or "
                                              r"outside the 112x112 image"):
        get_reward("giou")(outside, p.solution)
    with pytest.raises(ThinkforgeError, match="meta.box: a box is"):
        get_reward("giou")(dataclasses.replace(p, meta={**p.meta, "box": [1, 2]}), p.solution)
    with pytest.raises(ThinkforgeError, match="meta.frames is missing"):
        get_reward("point_in_box")(dataclasses.replace(p, meta={"box": p.meta["box"]}), "\\boxed{(1, 1)}")
    router = RewardRouter(workers=1)
    try:
        res = router.score(outside, p.solution)
        assert res.reward == 0.0 and res.reason.startswith("reward_error: giou: ThinkforgeError")
    finally:
        router.close()


def test_every_task_is_seeded_disjoint_solved_by_its_teacher_and_routed():
    router = RewardRouter(workers=2)
    try:
        for name in VISION_TASKS:
            task = get_task(name)
            train, held = task.problems("train", n=30, seed=0), task.problems("heldout", n=30, seed=0)
            assert {p.id for p in train}.isdisjoint({p.id for p in held})
            assert [p.id for p in held] == [p.id for p in task.problems("heldout", n=30, seed=0)]
            for p in held[:6]:
                score = task.score(p, p.solution)
                assert score.correct and score.reward == 1.0, (name, p.id, score)
                assert router.score(p, p.solution).reward == 1.0
                assert 0.0 <= router.score(p, "The answer is \\boxed{7}.").reward <= 1.0
                n_parts = sum(1 for part in task.messages(p)[-1]["content"] if part["type"] == "image")
                assert n_parts == len(p.meta["images"]) == (2 if name == "vl_compare" else 1)
        assert router.route("vl_ground")[0][0] == "giou" and router.route("vl_digits")[0][0] == "math"
        assert router.route("vl_count")[0][0] == "vl_exact" and router.route("vl_point")[0][0] == "point_in_box"
    finally:
        router.close()


def test_counting_and_caption_scores():
    p = get_task("vl_count").problems("heldout", n=1)[0]
    fn = get_reward("vl_exact")
    assert fn(p, f"\\boxed{{{p.answer}}}").correct
    assert not fn(p, f"\\boxed{{{int(p.answer) + 1}}}").correct
    assert token_f1("2 red squares", "2 red squares") == 1.0
    assert token_f1("2 blue squares", "2 red squares") == pytest.approx(2 / 3)
    cap = get_task("vl_caption").problems("heldout", n=1)[0]
    assert get_reward("caption_f1")(cap, "nothing alike").reward == 0.0


def test_bad_images_in_a_problem_are_one_line_errors_naming_the_problem():
    from thinkforge.train.vl_pretrain import encode_example
    from thinkforge.vl.model import build_tiny_vl

    _, proc = build_tiny_vl(["How many shapes?"], "micro", seed=0)
    task = get_task("vl_count")
    p = task.problems("heldout", n=1)[0]
    tiny = io.BytesIO()
    Image.new("RGB", (112, 20), "white").save(tiny, format="PNG")
    cases = [
        (["AAAA"], "corrupt or non-image bytes"),
        ([base64.b64encode(tiny.getvalue()).decode()], "image is 112x20; both sides must be >= 28"),
        ([], "1 image placeholders but 0 images"),  # the prompt's image part lost its image
        ([p.meta["images"][0]] * 2, "2 image placeholders but 1 images"),
    ]
    for images, message in cases:
        bad = dataclasses.replace(p, meta={**p.meta, "images": images})
        if len(images) == 2:  # more placeholders than images: two parts, then one image dropped by the caller
            msgs = task.messages(bad)
            with pytest.raises(ThinkforgeError, match=message) as err:
                proc.encode_chat(msgs, images[:1], where=f"problem {p.id}")
        elif not images:
            with pytest.raises(ThinkforgeError, match=message) as err:
                proc.encode_chat(task.messages(p), [], where=f"problem {p.id}")
        else:
            with pytest.raises(ThinkforgeError, match=message) as err:
                encode_example(proc, task, bad, bad.solution)
        assert str(err.value).startswith(f"problem {p.id}") and "\n" not in str(err.value)
