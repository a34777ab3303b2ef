"""`thinkforge serve` on a VL checkpoint: the official openai client sends base64 PNG content parts."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn

from thinkforge.serve.server import ServeConfig, create_app
from thinkforge.tasks import get_task
from thinkforge.vl.model import build_tiny_vl, save_vl

TEXTS = ["How many shapes are in the image?", "The answer is \\boxed{3}.", "Describe the image."]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model, proc = build_tiny_vl(TEXTS, "micro", seed=1)
    path = tmp_path_factory.mktemp("vl") / "model"
    save_vl(model.eval(), proc, path)
    app = create_app(ServeConfig(model=str(path), served_name="vl", device="cpu", dtype="float32"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    srv.should_exit = True
    thread.join(timeout=10)


def _msg(url: str, text: str = "How many shapes are in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_chat_with_a_base64_png_and_bad_images_are_400s(client):
    png = "data:image/png;base64," + get_task("vl_count").problems("heldout", n=1)[0].meta["images"][0]
    r = client.chat.completions.create(model="vl", messages=_msg(png), max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens > 16 and 1 <= r.usage.completion_tokens <= 6  # 16 image tokens in the prompt
    cases = [("data:image/png;base64,AAAA", "corrupt"), ("data:text/plain;base64,aGk=", "not a base64 image"),
             (png, "2 image placeholders but 1 images")]
    for url, message in cases:
        text = "<image> How many?" if url == png else "How many?"
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(model="vl", messages=_msg(url, text), max_tokens=2)
        assert err.value.body["param"] == "messages" and "\n" not in err.value.body["message"]
    again = client.chat.completions.create(model="vl", messages=_msg(png), max_tokens=6, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content  # still serving, same greedy answer


def test_image_sizes_and_missing_images_are_400s_and_the_server_keeps_serving(client):
    import base64
    import io

    from PIL import Image

    from thinkforge.vl.images import DEFAULT_MAX_PIXELS

    def url(w: int, h: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), "white").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 28  # one row of merged patches past the cap on each side
    cases = [
        (_msg(url(20, 112)), "image is 20x112; both sides must be >= 28"),
        (_msg(url(side, side)), f"above the pixel cap {DEFAULT_MAX_PIXELS}"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text", "text": "hi"}]}],
         "image_url without a url"),
        ([{"role": "user", "content": "<image> How many?"}], "1 image placeholders but 0 images"),
        (_msg("data:image/png;base64,not base64!"), "not valid base64"),
    ]
    for messages, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(model="vl", messages=messages, max_tokens=2)
        assert err.value.status_code == 400 and "\n" not in err.value.body["message"]
        where = "request: " if "placeholder" in message else "request.messages[0].content[0]"
        assert err.value.body["param"] == "messages" and err.value.body["message"].startswith(where)
    ok = client.chat.completions.create(model="vl", messages=_msg(url(56, 56)), max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.prompt_tokens > 4  # 56 px: 4 image tokens
