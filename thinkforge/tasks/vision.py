"""Synthetic visual tasks (MiMo-VL's data kinds in miniature), drawn with PIL.

Every image is drawn at a size `smart_resize` leaves unchanged (sides multiples of 28, inside the pixel
caps), so the pixels drawn are the pixels the ViT sees and boxes/points are in that frame; `meta.frames`
records each image's (height, width) after `smart_resize` and the build asserts it equals the drawn
size. A problem's images travel as base64 PNGs in `meta.images`; `messages` returns Qwen2-VL content
parts. Splits are disjoint by construction (held-out iff a hash of the scene falls in a fixed bucket),
draws are seeded, each problem has a teacher solution, and `score` is the task's reward
(`thinkforge.rewards.vision`), so evaluation and RL agree.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from thinkforge.tasks.base import Problem, Score, Task, register_task

SIZE = 112  # 8 x 8 patches -> 16 image tokens: cheap on a CPU, and still 4 x 4 merged positions
COLORS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 60, 220), "orange": (240, 140, 0)}
HELDOUT_BUCKETS = 5


def _split_of(key: str) -> str:
    return "heldout" if int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % HELDOUT_BUCKETS == 0 else "train"


def _canvas(size: int = SIZE) -> tuple[Any, Any]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _place(rng: random.Random, n: int, size: int, lo: int = 14, hi: int = 24) -> list[tuple[int, int, int, int]]:
    """`n` non-overlapping boxes (2 px apart) inside a size x size canvas (restarts when crowded)."""
    boxes: list[tuple[int, int, int, int]] = []
    tries = 0
    while len(boxes) < n:
        tries += 1
        if tries % 200 == 0:
            boxes = []
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        x, y = rng.randint(2, size - w - 2), rng.randint(2, size - h - 2)
        b = (x, y, x + w, y + h)
        if all(b[2] + 2 <= o[0] or o[2] + 2 <= b[0] or b[3] + 2 <= o[1] or o[3] + 2 <= b[1] for o in boxes):
            boxes.append(b)
    return boxes


def _shape(draw: Any, kind: str, box: tuple[int, int, int, int], color: str) -> None:
    # Integer boxes, no antialiasing: the same pixels on every machine.
    if kind == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLORS[color])


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system fonts needed


class VisionTask(Task):
    """Shared machinery: seeded draws, disjoint splits, image payload, content-part messages."""

    kind = "vl_exact"
    max_difficulty = 3

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        """(scene key, images, prompt, answer, solution, extra meta)."""
        raise NotImplementedError

    def problems(self, split: str = "heldout", n: int | None = None, seed: int = 0,
                 difficulty: int | None = None) -> list[Problem]:
        from thinkforge.vl.images import encode_png, smart_resize

        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")
        n = 200 if n is None else n
        rng = random.Random(f"{self.name}/{split}/{seed}/{difficulty}")
        out, seen, attempts = [], set(), 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ValueError(f"{self.name}: cannot draw {n} distinct {split} problems")
            level = difficulty if difficulty is not None else rng.randint(1, self.max_difficulty)
            key, images, prompt, answer, solution, meta = self.draw(rng, level)
            if _split_of(key) != split or (split == "heldout" and key in seen):
                continue
            seen.add(key)
            frames = [list(smart_resize(img.height, img.width)) for img in images]
            assert all(f == [img.height, img.width] for f, img in zip(frames, images, strict=True)), frames
            out.append(Problem(
                id=f"{self.name}/L{level}/{hashlib.sha1(key.encode()).hexdigest()[:12]}", task=self.name,
                prompt=prompt, answer=answer, solution=solution, difficulty=level,
                meta={"level": level, "images": [encode_png(img) for img in images], "frames": frames, **meta},
            ))
        return out

    def messages(self, problem: Problem, system_prompt: str | None = None) -> list[dict[str, Any]]:
        system = system_prompt if system_prompt is not None else self.system_prompt
        parts: list[dict[str, Any]] = [{"type": "image", "image": "data:image/png;base64," + b64}
                                       for b64 in problem.meta.get("images", [])]
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": parts + [{"type": "text", "text": problem.prompt}]}]

    reward_name = "vl_exact"

    def score(self, problem: Problem, response: str) -> Score:
        from thinkforge.rewards import get_reward
        from thinkforge.rewards.vision import as_score

        return as_score(get_reward(self.reward_name)(problem, response))


@register_task("vl_count")
class CountTask(VisionTask):
    """How many shapes (1..1+2*level, squares and circles of mixed colours)."""

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        n = rng.randint(1, 1 + 2 * level)
        img, d = _canvas()
        scene = []
        for b in _place(rng, n, SIZE, 10, 20):
            kind, color = rng.choice(["square", "circle"]), rng.choice(list(COLORS))
            _shape(d, kind, b, color)
            scene.append((kind, color, b))
        steps = ", ".join(str(i + 1) for i in range(n))
        return (json.dumps(scene), [img], "How many shapes are in the image?", str(n),
                f"Counting the shapes: {steps}. The answer is \\boxed{{{n}}}.", {})


@register_task("vl_ground")
class GroundTask(VisionTask):
    """Box grounding: the red square among distractors; answer [x1, y1, x2, y2] in pixels."""

    kind = "box"
    reward_name = "giou"

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        boxes = _place(rng, 1 + level, SIZE, 16, 40)
        img, d = _canvas()
        _shape(d, "square", boxes[0], "red")
        for b in boxes[1:]:
            _shape(d, rng.choice(["square", "circle"]), b, rng.choice(["green", "blue", "orange"]))
        box = list(boxes[0])
        text = f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"
        return (json.dumps(boxes), [img], "Give the bounding box of the red square as [x1, y1, x2, y2].", text,
                f"The red square spans x {box[0]} to {box[2]} and y {box[1]} to {box[3]}. The answer is \\boxed{{{text}}}.",
                {"box": box})


@register_task("vl_point")
class PointTask(VisionTask):
    """Point grounding: a point (x, y) inside the blue circle."""

    kind = "point"
    reward_name = "point_in_box"

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        boxes = _place(rng, 1 + level, SIZE, 16, 30)
        img, d = _canvas()
        _shape(d, "circle", boxes[0], "blue")
        for b in boxes[1:]:
            _shape(d, rng.choice(["square", "circle"]), b, rng.choice(["red", "green", "orange"]))
        x1, y1, x2, y2 = boxes[0]
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        return (json.dumps(boxes), [img], "Point to the blue circle as (x, y).", f"({cx}, {cy})",
                f"The blue circle is centred at \\boxed{{({cx}, {cy})}}.", {"box": list(boxes[0])})


@register_task("vl_digits")
class DigitsTask(VisionTask):
    """Read two numbers drawn in the image and combine them; verified by math-verify (kind math)."""

    kind = "math"
    reward_name = "math"

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        hi = 9 if level == 1 else 49 if level == 2 else 99
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = "+" if level < 3 or rng.random() < 0.5 else "-"
        if op == "-" and b > a:
            a, b = b, a
        img, d = _canvas()
        font = _font(30)
        d.text((rng.randint(4, 30), rng.randint(4, 20)), str(a), fill=(0, 0, 0), font=font)
        d.text((rng.randint(44, 70), rng.randint(60, 74)), str(b), fill=(0, 0, 0), font=font)
        result = a + b if op == "+" else a - b
        verb = "sum" if op == "+" else "difference (larger minus smaller)"
        return (f"{a}{op}{b}", [img], f"What is the {verb} of the two numbers in the image?", str(result),
                f"The numbers are {a} and {b}. {a} {op} {b} = {result}. The answer is \\boxed{{{result}}}.", {})


@register_task("vl_chart")
class ChartTask(VisionTask):
    """Bar-chart reading: bars A.. with integer heights on a unit grid; the value of one bar."""

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        n = 2 + level
        values = [rng.randint(1, 9) for _ in range(n)]
        img, d = _canvas()
        unit, base, width = 10, 100, (SIZE - 8) // n
        for v in range(10):  # grid lines, one per unit
            d.line((0, base - v * unit, SIZE, base - v * unit), fill=(210, 210, 210))
        names = "ABCDE"[:n]
        font = _font(10)
        for i, v in enumerate(values):
            x = 6 + i * width
            d.rectangle((x + 2, base - v * unit, x + width - 3, base - 1), fill=COLORS["blue"])
            d.text((x + width // 2 - 3, base + 1), names[i], fill=(0, 0, 0), font=font)
        which = rng.randrange(n)
        return (json.dumps([values, which]), [img], f"What is the value of bar {names[which]}?", str(values[which]),
                f"Bar {names[which]} reaches grid line {values[which]}. The answer is \\boxed{{{values[which]}}}.", {})


@register_task("vl_compare")
class CompareTask(VisionTask):
    """Two images (interleaved data): which one has more shapes; answer 1 or 2."""

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        top = 1 + 2 * level
        k1 = rng.randint(1, top)
        k2 = rng.choice([k for k in range(1, top + 1) if k != k1])
        images, scene = [], []
        for k in (k1, k2):
            img, d = _canvas()
            boxes = _place(rng, k, SIZE, 10, 20)
            for b in boxes:
                _shape(d, "square", b, "green")
            images.append(img)
            scene.append(boxes)
        more = 1 if k1 > k2 else 2
        return (json.dumps(scene), images, "Which image has more shapes, image 1 or image 2?", str(more),
                f"Image 1 has {k1} shapes and image 2 has {k2}. The answer is \\boxed{{{more}}}.", {})


@register_task("vl_caption")
class CaptionTask(VisionTask):
    """Image-caption pairs (stages 1-2): "<n> <colour> <shape>s"; scored by token F1."""

    kind = "caption"
    reward_name = "caption_f1"

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        n = rng.randint(1, 2 + level)
        kind, color = rng.choice(["square", "circle"]), rng.choice(list(COLORS))
        img, d = _canvas()
        boxes = _place(rng, n, SIZE)
        for b in boxes:
            _shape(d, kind, b, color)
        caption = f"{n} {color} {kind}{'s' if n > 1 else ''}"
        return json.dumps([kind, color, boxes]), [img], "Describe the image.", caption, caption, {}


@register_task("vl_describe")
class DescribeTask(CaptionTask):
    """Open-ended description, MiMo-VL's human-preference data in miniature: no verifier, scored by the
    Bradley-Terry reward model (kind "preference" -> `bt_preference`; it needs a trained model, see
    `thinkforge.train.reward_model`). The reference caption is the teacher solution."""

    kind = "preference"
    reward_name = "bt_preference"

    def draw(self, rng: random.Random, level: int) -> tuple[str, list[Any], str, str, str, dict[str, Any]]:
        key, images, _, answer, solution, meta = super().draw(rng, level)
        return key, images, "Describe the image in a few words.", answer, solution, meta


VISION_TASKS = ("vl_count", "vl_ground", "vl_point", "vl_digits", "vl_chart", "vl_compare", "vl_caption")

# The hub vision benchmarks, and the hf-vl backend `thinkforge eval --backend hf-vl` runs every VL task with.
import thinkforge.vl.backend  # noqa: E402,F401
from thinkforge.tasks import vision_bench  # noqa: E402,F401
