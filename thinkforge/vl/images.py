"""Images in and out: decoding (PIL objects, PNG/JPEG bytes, base64 data URLs) with the checks every VL
entry point shares, and the geometry of what the model sees (Qwen2-VL's `smart_resize`).

Coordinates in tasks and rewards are always in the frame of the image *after* `smart_resize`, i.e. the
pixels the ViT receives; `to_model_frame` maps a box drawn on the original image into that frame.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from thinkforge.errors import ThinkforgeError

PATCH, MERGE = 14, 2
FACTOR = PATCH * MERGE  # sides are multiples of 28 after smart_resize
MIN_SIDE = FACTOR  # smaller images carry less than one merged patch
DEFAULT_MIN_PIXELS = 4 * FACTOR * FACTOR
DEFAULT_MAX_PIXELS = 256 * FACTOR * FACTOR  # tiny models: at most 256 image tokens per image
MAX_DECODE_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before PIL decodes them


def smart_resize(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) the image processor resizes to (transformers' own function, from its PIL processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    return hf_smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)


def decode_image(data: Any, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """An RGB PIL image from a PIL image, raw bytes or a (data-URL) base64 string. `where` names the
    row/field in the one-line error raised for corrupt bytes, non-image data, or sizes out of range."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Image.Image):
        img = data
    else:
        if isinstance(data, str):
            text = data
            if text.startswith("data:"):
                head, _, text = text.partition(",")
                if not head.startswith("data:image/") or ";base64" not in head:
                    raise ThinkforgeError(f"{where}: not a base64 image data URL (got {head[:40]!r})")
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ThinkforgeError(f"{where}: image is not valid base64") from None
        if not isinstance(data, bytes | bytearray):
            raise ThinkforgeError(f"{where}: expected image bytes, base64 or a PIL image, got {type(data).__name__}")
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_DECODE_PIXELS:
                raise ThinkforgeError(f"{where}: image is {img.width}x{img.height}, above the decode cap")
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ThinkforgeError(f"{where}: corrupt or non-image bytes ({type(err).__name__})") from None
    if min(img.width, img.height) < MIN_SIDE:
        raise ThinkforgeError(f"{where}: image is {img.width}x{img.height}; both sides must be >= {MIN_SIDE} px")
    if img.width * img.height > max_pixels:
        raise ThinkforgeError(f"{where}: image is {img.width}x{img.height} = {img.width * img.height} px, above "
                              f"the pixel cap {max_pixels}")
    return img.convert("RGB")


def encode_png(img: Any) -> str:
    """Base64 PNG (lossless, so a drawn task image decodes to the same pixels everywhere)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def data_url(img: Any) -> str:
    return "data:image/png;base64," + encode_png(img)


def check_box(box: Any, frame: tuple[int, int], where: str) -> tuple[float, float, float, float]:
    """A gold box (x1, y1, x2, y2) in pixels of `frame` = (height, width); raises if malformed or outside."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ThinkforgeError(f"{where}: a box is [x1, y1, x2, y2], got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ThinkforgeError(f"{where}: box coordinates must be numbers, got {box!r}") from None
    h, w = frame
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ThinkforgeError(f"{where}: box {list(box)} is empty or outside the {w}x{h} image")
    return x1, y1, x2, y2


def to_model_frame(box: tuple[float, ...], original: tuple[int, int], resized: tuple[int, int]) -> list[float]:
    """A box in pixels of the `original` (h, w) image, in pixels of the `resized` (h, w) one the model sees."""
    sy, sx = resized[0] / original[0], resized[1] / original[1]
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
