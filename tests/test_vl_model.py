"""The tiny Qwen2.5-VL model, its processor and checkpoints (thinkforge.vl)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import pytest
import torch
from PIL import Image, ImageDraw

from thinkforge.errors import ThinkforgeError
from thinkforge.vl.images import data_url, encode_png, smart_resize
from thinkforge.vl.model import VL_PRESETS, TinyVLSpec, build_tiny_vl, load_vl, module_parameters, save_vl

TEXTS = ["How many shapes are there? The answer is \\boxed{3}. red blue green square circle 0123456789"] * 20


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny_vl(TEXTS, "micro", seed=0)
    return model.eval(), proc


def _image(w: int = 168, h: int = 168, box=(10, 20, 60, 90)) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).rectangle(box, fill="red")
    return img


def _msgs(n_images: int, text: str = "How many?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_image_tokens_follow_the_grid_and_positions_are_3d(tiny):
    model, proc = tiny
    enc = proc.encode_chat(_msgs(2), [_image(168, 112), _image(56, 84, (1, 1, 20, 20))])
    grids = enc.image_grid_thw.tolist()
    assert grids == [[1, 8, 12], [1, 6, 4]]  # H/14, W/14
    assert sum(enc.mm_token_type_ids) == (8 * 12 + 6 * 4) // 4
    assert enc.pixel_values.shape == (8 * 12 + 6 * 4, 3 * 2 * 14 * 14)
    batch = proc.collate([enc])
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"])
    img = batch["mm_token_type_ids"][0].bool()
    assert pos.shape[0] == 3
    # On the first image, height and width positions vary over a 4 x 6 merged grid; time stays put.
    first = pos[:, 0, img][:, :24]
    assert len(set(first[0].tolist())) == 1 and len(set(first[1].tolist())) == 4 and len(set(first[2].tolist())) == 6
    # transformers 5.x builds 3D MRoPE only when mm_token_type_ids is passed: without it, logits differ.
    with torch.no_grad():
        full = model(**batch).logits
        flat = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits
    assert (full - flat).abs().max() > 1e-4 * full.abs().max()


def test_vit_geometry_has_windows_and_full_attention(tiny):
    model, proc = tiny
    cfg = model.config.vision_config
    assert (cfg.patch_size, cfg.spatial_merge_size, cfg.window_size, cfg.temporal_patch_size) == (14, 2, 112, 2)
    assert all(i < cfg.depth for i in cfg.fullatt_block_indexes)
    grid = proc.encode("<image>", [_image(224, 224)]).image_grid_thw
    from transformers.vision_utils import get_vision_window_index

    _, cu_window = get_vision_window_index(grid, spatial_merge_size=2, window_size=cfg.window_size, patch_size=14)
    assert len(torch.unique_consecutive(torch.as_tensor(cu_window))) - 1 == 4  # 224 px = 2 x 2 windows of 112 px
    with pytest.raises(ThinkforgeError, match="fullatt_block_indexes"):
        TinyVLSpec(vision_depth=2, fullatt_block_indexes=[7]).check()
    with pytest.raises(ThinkforgeError, match="mrope_section"):
        TinyVLSpec(mrope_section=[4, 4, 4]).check()


def test_checkpoint_loads_with_auto_classes_and_identical_logits(tiny, tmp_path):
    from safetensors import safe_open
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model, proc = tiny
    save_vl(model, proc, tmp_path / "ck")
    keys = list(safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt").keys())
    assert any(k.startswith("model.visual.merger.") for k in keys)
    assert any(k.startswith("model.visual.blocks.") for k in keys)
    assert any(k.startswith("model.language_model.") for k in keys)
    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "ck"), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    batch = proc.collate([proc.encode_chat(_msgs(1), [_image()]), proc.encode_chat(_msgs(0, "hi"))],
                         padding_side="left")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    # The processor files are the HF ones: AutoTokenizer / AutoImageProcessor read them unchanged.
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ck"))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    ip = AutoImageProcessor.from_pretrained(str(tmp_path / "ck"))
    assert ip.size == proc.image_processor.size and ip.merge_size == 2
    assert json.loads((tmp_path / "ck" / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    m2, p2 = load_vl(tmp_path / "ck", device="cpu", dtype="float32")
    again = p2.collate([p2.encode_chat(_msgs(1), [_image()]), p2.encode_chat(_msgs(0, "hi"))], padding_side="left")
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert module_parameters(m2) == module_parameters(model)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers' Qwen2_5_VLProcessor cannot be built without torchvision (video processor)")
def test_auto_processor_matches(tiny, tmp_path):
    from transformers import AutoProcessor

    model, proc = tiny
    save_vl(model, proc, tmp_path / "ck")
    hf = AutoProcessor.from_pretrained(str(tmp_path / "ck"))
    text = proc.render(_msgs(1))
    ours = proc.collate([proc.encode(text, [_image()])])
    theirs = hf(text=[text], images=[_image()], return_tensors="pt")
    for key in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype))


def test_smart_resize_keeps_multiples_of_28():
    assert smart_resize(168, 112) == (168, 112)
    h, w = smart_resize(100, 150)
    assert h % 28 == 0 and w % 28 == 0


def test_bad_images_and_placeholders_are_one_line_errors(tiny):
    _, proc = tiny
    good = _image()
    png = base64.b64decode(encode_png(good))
    cases = [
        ("<image>", [png[:40]], "row 3.images\\[0\\]: corrupt"),
        ("<image>", [b"not an image at all"], "row 3.images\\[0\\]: corrupt"),
        ("<image>", ["data:text/plain;base64,aGVsbG8="], "not a base64 image data URL"),
        ("<image>", ["data:image/png;base64,@@@"], "not valid base64"),
        ("<image>", [_image(20, 100, (1, 1, 5, 5))], "both sides must be >= 28"),
        ("<image>", [Image.new("RGB", (28 * 40, 28 * 40))], "above the pixel cap"),
        ("<image> <image>", [good], "2 image placeholders but 1 images"),
        ("<image>", [None], "image 0 is missing"),
        ("no placeholder", [good], "1 images but only 0 image placeholders"),
    ]
    for text, images, message in cases:
        with pytest.raises(ThinkforgeError, match=message) as err:
            proc.encode(text, images, where="row 3")
        assert "\n" not in str(err.value)
    enc = proc.encode("<image>", [data_url(good)])  # data URLs and bytes decode to the same pixels
    assert torch.equal(enc.pixel_values, proc.encode("<image>", [io.BytesIO(png).getvalue()]).pixel_values)


def test_presets_are_valid():
    for spec in VL_PRESETS.values():
        spec.check()
