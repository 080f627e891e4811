"""Image input through the official SDK: tiers with an mmproj (the tiny random-weight idefics3 and
LLaVA fixtures of tests/data/vision, on which ferrum's encoders are checked against llama.cpp in
the Rust tests) read data-URL and file_id images in chat completions and the Responses API, count
image tokens in usage, cache them, and refuse bad images with clear 400s."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import openai
import pytest

from conftest import REPO_ROOT, FerrumServer
from helpers import NANO, assert_error, wait_for_batch

DATA = REPO_ROOT / "tests" / "data" / "vision"
IDEFICS = "tiny-vlm"
LLAVA = "tiny-llava"

CONFIG = """\
[[tier]]
id = "{idefics}"
price = {{ input = 1.0, cached_input = 0.25, output = 4.0 }}
weights = {{ path = "{data}/tiny-lm.gguf" }}
mmproj = {{ path = "{data}/tiny-idefics3-mmproj.gguf" }}

[[tier]]
id = "{llava}"
price = {{ input = 1.0, cached_input = 0.25, output = 4.0 }}
weights = {{ path = "{data}/tiny-lm.gguf" }}
mmproj = {{ path = "{data}/tiny-llava-mmproj.gguf" }}

[[tier]]
id = "mismatched-vlm"
load = "lazy"
price = {{ input = 1.0, cached_input = 0.25, output = 4.0 }}
weights = {{ path = "{nano_weights}" }}
mmproj = {{ path = "{data}/tiny-idefics3-mmproj.gguf" }}

[[tier]]
id = "{nano}"
load = "lazy"
price = {{ input = 0.10, cached_input = 0.025, output = 0.40 }}
weights = {{ path = "{nano_weights}" }}
"""

# idefics3 fixture: 64-px tiles of 16 tokens, images resized to a longest side of 128 px.
TOKENS_PER_TILE = 16


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A small RGB PNG written by hand (no imaging library needed)."""
    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 3 + seed * 50) % 256, (x * y + seed) % 256, (y * 11) % 256)[c]
                        for x in range(width) for c in range(3))
        for y in range(height)
    )

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def image_part(url: str, detail: str | None = None) -> dict:
    inner = {"url": url}
    if detail:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def ask(client, model: str, *parts: dict, text: str = "Describe the image.", **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        max_tokens=kwargs.pop("max_tokens", 8),
        temperature=0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def vision_server(ferrum_bin, nano_weights, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vision")
    config = workdir / "ferrum.toml"
    config.write_text(CONFIG.format(idefics=IDEFICS, llava=LLAVA, nano=NANO, data=DATA, nano_weights=nano_weights))
    server = FerrumServer(ferrum_bin, config, workdir / "server", [])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vision_server) -> openai.OpenAI:
    return vision_server.client()


@pytest.fixture(scope="module")
def http(vision_server):
    with vision_server.http() as h:
        yield h


def test_a_data_url_image_is_read_and_counted(client):
    img = (DATA / "img-64x64.png").read_bytes()
    r = ask(client, IDEFICS, image_part(data_url(img)))
    assert r.choices[0].message.content is not None
    d = r.usage.prompt_tokens_details
    # 64x64 -> 128x128: a 2x2 grid of tiles and the overview, 16 tokens each.
    assert d.image_tokens == 5 * TOKENS_PER_TILE
    assert d.text_tokens == r.usage.prompt_tokens - d.image_tokens > 0
    # The same image again: its tokens come from the prefix cache.
    again = ask(client, IDEFICS, image_part(data_url(img)))
    assert again.usage.prompt_tokens == r.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens >= 5 * TOKENS_PER_TILE


def test_the_answer_depends_on_the_image(client):
    answers = {
        ask(client, IDEFICS, image_part(data_url(png(40, 40, seed=s))), max_tokens=12).choices[0].message.content
        for s in range(3)
    }
    assert len(answers) > 1, answers


def test_detail_low_reads_only_the_overview(client):
    img = data_url((DATA / "img-200x150.png").read_bytes())
    high = ask(client, IDEFICS, image_part(img, "high"))
    low = ask(client, IDEFICS, image_part(img, "low"))
    auto = ask(client, IDEFICS, image_part(img, "auto"))
    assert low.usage.prompt_tokens_details.image_tokens == TOKENS_PER_TILE
    # 200x150 -> 128x96: 2x2 tiles and the overview.
    assert high.usage.prompt_tokens_details.image_tokens == 5 * TOKENS_PER_TILE
    assert auto.usage.prompt_tokens_details.image_tokens == 5 * TOKENS_PER_TILE
    assert low.usage.prompt_tokens < high.usage.prompt_tokens


def test_several_images_in_one_message(client):
    wide = data_url((DATA / "img-100x37.png").read_bytes())  # 2x1 tiles
    tall = data_url((DATA / "img-30x90.png").read_bytes())  # 1x2 tiles
    r = client.chat.completions.create(
        model=IDEFICS,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Image one"}, image_part(wide),
            {"type": "text", "text": "Image two"}, image_part(tall),
            {"type": "text", "text": "What differs?"},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    assert r.usage.prompt_tokens_details.image_tokens == 2 * 3 * TOKENS_PER_TILE
    swapped = client.chat.completions.create(
        model=IDEFICS,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Image one"}, image_part(tall),
            {"type": "text", "text": "Image two"}, image_part(wide),
            {"type": "text", "text": "What differs?"},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    assert swapped.usage.prompt_tokens == r.usage.prompt_tokens


def test_a_llava_tier_reads_one_padded_image(client):
    for name in ["img-64x64.png", "img-200x150.png", "img-rgba-50x50.png"]:
        r = ask(client, LLAVA, image_part(data_url((DATA / name).read_bytes())))
        assert r.usage.prompt_tokens_details.image_tokens == TOKENS_PER_TILE, name


def test_streaming_with_an_image_equals_the_response(client):
    img = image_part(data_url((DATA / "img-30x90.png").read_bytes()))
    # Compared on a warm prefix cache both times: the first request warms it, and this random
    # model's near ties may go either way on the last bits a cached prefix changes.
    ask(client, IDEFICS, img, max_tokens=10)
    whole = ask(client, IDEFICS, img, max_tokens=10)
    stream = client.chat.completions.create(
        model=IDEFICS,
        messages=[{"role": "user", "content": [img, {"type": "text", "text": "Describe the image."}]}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage.prompt_tokens_details.image_tokens == whole.usage.prompt_tokens_details.image_tokens


def test_responses_take_input_images_by_url_and_by_file_id(client):
    raw = (DATA / "img-100x37.png").read_bytes()
    chat = ask(client, IDEFICS, image_part(data_url(raw)), text="What is this?", max_tokens=16)
    f = client.files.create(file=("wide.png", raw), purpose="vision")
    outputs = []
    for source in ({"image_url": data_url(raw)}, {"file_id": f.id}):
        r = client.responses.create(
            model=IDEFICS,
            input=[{"role": "user", "content": [
                {"type": "input_image", "detail": "auto", **source},
                {"type": "input_text", "text": "What is this?"},
            ]}],
            max_output_tokens=16,
            temperature=0,
        )
        assert r.status in ("completed", "incomplete")
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        outputs.append(r.output_text)
        items = client.responses.input_items.list(r.id)
        content = items.data[0].content
        assert [c.type for c in content] == ["input_image", "input_text"]
    # The same image by URL or by file: the same greedy answer. (Not compared with the chat
    # completion's: that one ran on a cold prefix cache, and this random model's near ties may
    # go either way on the last bits a warm cache changes.)
    assert outputs[0] == outputs[1]


def test_a_conversation_keeps_its_image_across_turns(client):
    """previous_response_id: the first turn's image is in the rebuilt conversation, and its
    tokens come from the prefix cache."""
    img = data_url((DATA / "img-30x90.png").read_bytes())
    first = client.responses.create(
        model=IDEFICS,
        input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": img, "detail": "auto"},
            {"type": "input_text", "text": "What is this?"},
        ]}],
        max_output_tokens=16,
        temperature=0,
    )
    second = client.responses.create(
        model=IDEFICS, previous_response_id=first.id, input="And the colours?", max_output_tokens=16, temperature=0,
    )
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= 3 * TOKENS_PER_TILE


def test_a_batch_line_may_carry_an_image(client):
    body = {
        "model": IDEFICS, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": [
            image_part(data_url((DATA / "img-64x64.png").read_bytes())),
            {"type": "text", "text": "Describe the image."},
        ]}],
    }
    lines = [{"custom_id": f"img-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
             for i in range(2)]
    f = client.files.create(file=("lines.jsonl", "\n".join(map(json.dumps, lines)).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed", batch
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert {o["custom_id"] for o in out} == {"img-0", "img-1"}
    for o in out:
        usage = o["response"]["body"]["usage"]
        assert usage["prompt_tokens_details"]["image_tokens"] == 5 * TOKENS_PER_TILE


def test_bad_images_are_clear_400s(http):
    def post(*parts, model=IDEFICS):
        return http.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, *parts]}],
        })

    good = (DATA / "img-64x64.png").read_bytes()
    param = "messages[0].content[1].image_url.url"
    e = assert_error(post(image_part(data_url(good[: len(good) // 2]))), 400, param=param, code="invalid_image")
    assert "decoded" in e["message"]
    assert_error(post(image_part(data_url(good, "image/jpeg"))), 400, param=param, code="invalid_image_format")
    assert_error(post(image_part(data_url(good, "image/tiff"))), 400, param=param, code="invalid_image_format")
    assert_error(post(image_part(data_url(b"not an image at all"))), 400, param=param, code="invalid_image_format")
    assert_error(post(image_part("data:image/png,rawbytes")), 400, param=param, code="invalid_image_url")
    e = assert_error(post(image_part("https://example.com/cat.png")), 400, param=param, code="invalid_image_url")
    assert "data URL" in e["message"] and "file_id" in e["message"]
    e = assert_error(post(image_part(data_url(png(9000, 1)))), 400, param=param, code="invalid_image")
    assert "8192" in e["message"]
    e = assert_error(post(*[image_part(data_url(good))] * 51), 400, param="messages")
    assert "Too many images" in e["message"]
    e = assert_error(post(image_part(data_url(good)), model=NANO), 400,
                     param="messages[0].content[1].type", code="unsupported_value")
    assert "mmproj" in e["message"]
    # llama.cpp's image marker in a client's text is only text (this server's marker is random
    # per process, as llama-server's is), and counts no image.
    r = post(image_part(data_url(good)), {"type": "text", "text": "<__media__>"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 5 * TOKENS_PER_TILE


def test_an_mmproj_of_another_model_is_refused_at_load(http):
    """nano embeds in 576 dimensions; the fixture's projector writes 128."""
    r = http.post("/v1/chat/completions", json={
        "model": "mismatched-vlm", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
    })
    e = assert_error(r, 503)
    assert "128" in e["message"] and "576" in e["message"] and "another model" in e["message"]


def test_bad_file_ids_are_400(http, client):
    other = client.files.create(file=("notes.txt", b"not an image"), purpose="assistants")
    for file_id, word in [("file-missing", "No such File"), (other.id, "purpose")]:
        r = http.post("/v1/responses", json={
            "model": IDEFICS,
            "input": [{"role": "user", "content": [{"type": "input_image", "detail": "auto", "file_id": file_id}]}],
        })
        e = assert_error(r, 400, param="input[0].content[0].file_id")
        assert word in e["message"]


@pytest.fixture(scope="module")
def image_site():
    """A local web server holding the fixture images (what `--fetch-image-urls` downloads)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DATA))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_urls_are_downloaded_only_when_the_operator_allows(ferrum_bin, nano_weights, tmp_path_factory,
                                                                 image_site, http):
    url = f"{image_site}/img-64x64.png"
    # The module's server does not download: a 400 that says what to send instead.
    assert_error(http.post("/v1/chat/completions", json={
        "model": IDEFICS, "max_tokens": 4,
        "messages": [{"role": "user", "content": [image_part(url)]}],
    }), 400, param="messages[0].content[0].image_url.url", code="invalid_image_url")
    workdir = tmp_path_factory.mktemp("vision-urls")
    config = workdir / "ferrum.toml"
    config.write_text(CONFIG.format(idefics=IDEFICS, llava=LLAVA, nano=NANO, data=DATA, nano_weights=nano_weights))
    server = FerrumServer(ferrum_bin, config, workdir / "server", ["--fetch-image-urls"])
    try:
        client = server.client()
        by_url = ask(client, IDEFICS, image_part(url))
        by_data = ask(client, IDEFICS, image_part(data_url((DATA / "img-64x64.png").read_bytes())))
        assert by_url.usage.prompt_tokens_details.image_tokens == 5 * TOKENS_PER_TILE
        # The same pixels: the data URL's encoding came from the cache, its tokens from the
        # prefix cache.
        assert by_data.usage.prompt_tokens_details.cached_tokens >= 5 * TOKENS_PER_TILE
        with server.http() as h:
            e = assert_error(h.post("/v1/chat/completions", json={
                "model": IDEFICS, "max_tokens": 4,
                "messages": [{"role": "user", "content": [image_part(f"{image_site}/missing.png")]}],
            }), 400, param="messages[0].content[0].image_url.url", code="invalid_image_url")
            assert "404" in e["message"]
            e = assert_error(h.post("/v1/chat/completions", json={
                "model": IDEFICS, "max_tokens": 4,
                "messages": [{"role": "user", "content": [image_part(f"{image_site}/README.md")]}],
            }), 400, param="messages[0].content[0].image_url.url", code="invalid_image_format")
    finally:
        server.stop()
