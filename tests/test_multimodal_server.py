"""Image chat on a live server with the openai client: the answer equals transformers' greedy answer on the same
rendered prompt and image, from a data: URL, an allowed http URL and an allowed local file alike."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from llmctl_server import ServerSettings
from PIL import Image

from tests.media_server import MediaServer, png_bytes
from tests.model_factory import make_tiny_llava
from tests.reliability.conftest import build_engine
from tests.test_server_support import start_server, wait_kv_free

QUESTION = "What is in the picture?"
MAX_TOKENS = 8


def _image(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(36, 44, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def llava_server(model_cache_dir, test_tokenizer, tmp_path_factory):
    path = make_tiny_llava(model_cache_dir / "llava-srv", model_cache_dir / "smollm2-tokenizer")
    media_dir = tmp_path_factory.mktemp("media")
    _image(0).save(media_dir / "cat.png")
    http_media = MediaServer(_image(0))
    engine = build_engine(path, dtype="float32")
    srv = start_server(engine, ServerSettings(served_model_names=["llava"], allowed_media_domains=["127.0.0.1"],
                                              allowed_local_media_path=str(media_dir)))
    yield srv, path, media_dir, http_media
    srv.stop()
    http_media.stop()
    engine.shutdown()


def hf_answer(path, image: Image.Image, cls_name: str = "LlavaForConditionalGeneration") -> str:
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32).eval()
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}],
                                                   tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _chat(client: openai.OpenAI, url: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="llava", temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": QUESTION}]}],
        extra_body={"ignore_eos": True})


def test_image_chat_matches_transformers(llava_server):
    srv, path, media_dir, http_media = llava_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = hf_answer(path, _image(0))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(_image(0))).decode()
    text_only = client.chat.completions.create(model="llava", max_tokens=1, messages=[
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]).usage.prompt_tokens
    for url in (data_url, http_media.url("/img.png"), http_media.url("/redirect-same"),
                (media_dir / "cat.png").as_uri()):
        resp = _chat(client, url)
        assert resp.choices[0].message.content == want, url
        assert resp.usage.prompt_tokens == text_only + 16 + 1  # the image's 16 tokens and its line's newline
    other = _chat(client, "data:image/png;base64," + base64.b64encode(png_bytes(_image(5))).decode())
    assert other.choices[0].message.content != want
    import httpx

    metrics = httpx.get(srv.url + "/metrics").text
    queries = [line for line in metrics.splitlines() if line.startswith("llmctl_mm_encoder_cache_queries_total")]
    # the same picture from four sources is one image: the three repeats hit the prefix cache past the image and
    # never ask for its encoding; only it and the other picture were encoded
    assert queries and float(queries[0].split()[-1]) == 2
    stats = wait_kv_free(srv.engine)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_responses_api_takes_input_image(llava_server):
    srv, path = llava_server[0], llava_server[1]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(_image(0))).decode()
    resp = client.responses.create(model="llava", temperature=0, max_output_tokens=MAX_TOKENS, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": QUESTION}]}], extra_body={"ignore_eos": True})
    assert resp.output_text == hf_answer(path, _image(0))


def test_typed_placeholder_text_is_not_an_image(llava_server):
    """'<image>' typed by a client is text: it never becomes the image token (content is not parsed for special
    tokens), so a client cannot make the model read image rows that were never sent."""
    import httpx

    srv = llava_server[0]
    image_id = srv.engine.multimodal.image_token_id
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        messages = [{"role": "user", "content": "<image> describe"}]
        r = http.post("/tokenize", json={"model": "llava", "messages": messages})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        assert image_id not in tokens
        r = http.post("/v1/chat/completions", json={"model": "llava", "max_tokens": 2, "messages": messages})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tokens)  # nothing was expanded


def test_llava_next_chat_matches_transformers(model_cache_dir, test_tokenizer):
    """LLaVA-NeXT: the token count depends on the image's size, known only after it is decoded."""
    path = make_tiny_llava(model_cache_dir / "llava-next-srv", model_cache_dir / "smollm2-tokenizer",
                           kind="llava_next")
    engine = build_engine(path, dtype="float32")
    srv = start_server(engine, ServerSettings(served_model_names=["llava"]))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for seed, size in ((0, (36, 44)), (1, (90, 30))):
            rng = np.random.RandomState(seed)
            img = Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))
            resp = _chat(client, "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode())
            assert resp.choices[0].message.content == hf_answer(path, img, "LlavaNextForConditionalGeneration")
            text_only = client.chat.completions.create(model="llava", max_tokens=1, messages=[
                {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]).usage.prompt_tokens
            # the image's tokens plus its placeholder line's newline
            assert resp.usage.prompt_tokens == text_only + engine.multimodal.tokens_for((img.height, img.width)) + 1
        wait_kv_free(engine)
    finally:
        srv.stop()
        engine.shutdown()


def test_qwen2_vl_chat_matches_transformers(model_cache_dir, test_tokenizer):
    """Qwen2-VL: each image becomes vision start, its expanded placeholder run, vision end, straight before the
    text, as Qwen2-VL's own template writes it; the answer equals
    transformers' on the same rendered prompt, and the usage counts the wrapper and the image's tokens."""
    from tests.model_factory import make_tiny_qwen2_vl
    from tests.test_multimodal_qwen2_vl import HF, IMAGE

    path = make_tiny_qwen2_vl(model_cache_dir / "qwen2-vl-srv", model_cache_dir / "smollm2-tokenizer")
    engine = build_engine(path, dtype="float32")
    srv = start_server(engine, ServerSettings(served_model_names=["llava"]))
    hf = HF(path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        text = hf.tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE}{QUESTION}"}],
                                                tokenize=False, add_generation_prompt=True)
        text_only = client.chat.completions.create(model="llava", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]).usage.prompt_tokens
        for seed, size in ((0, (36, 44)), (1, (90, 30))):
            rng = np.random.RandomState(seed)
            img = Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))
            resp = _chat(client, "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode())
            ref, _ = hf.greedy(text, [img], MAX_TOKENS)
            assert resp.choices[0].message.content == hf.tokenizer.decode(ref, skip_special_tokens=True)
            # the image's tokens, vision start and end (no line break: Qwen2-VL's template writes none)
            assert resp.usage.prompt_tokens == text_only + engine.multimodal.tokens_for((img.height, img.width)) + 2
        wait_kv_free(engine)
    finally:
        srv.stop()
        engine.shutdown()
