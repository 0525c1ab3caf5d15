"""Hostile input to the pooling endpoints: every case is a 400 naming the field and the limit, and nothing
reaches the engine's KV cache for good. (A generation server's refusal of these routes is tested with the
other hostile cases on its server, in test_hostile.py.)"""

from __future__ import annotations

import httpx
import pytest
from llmctl_server import ServerSettings

from tests.pooling_factory import make_tiny_encoder, minilm_dir
from tests.reliability.conftest import build_engine
from tests.test_server_support import start_server, wait_kv_free


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory):
    path = make_tiny_encoder("bert", tmp_path_factory.mktemp("hostile-encoder") / "bert", minilm_dir())
    engine = build_engine(path)
    srv = start_server(engine, ServerSettings(served_model_names=["enc"]))
    yield srv
    srv.stop()
    engine.shutdown()


LONG = "word " * 200  # 202 tokens with [CLS] and [SEP]; the tiny encoder's positions stop at 128


@pytest.mark.parametrize("route,body,param,words", [
    ("/v1/embeddings", {"input": LONG}, "prompt", ["202 tokens", "128", "max_model_len", "truncate_prompt_tokens"]),
    ("/v1/embeddings", {"input": ["ok", LONG]}, "prompt", ["202 tokens", "128"]),
    ("/v1/embeddings", {"input": [list(range(1000, 1200))]}, "prompt", ["200 tokens", "128"]),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions", ["Matryoshka"]),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 1000}, "truncate_prompt_tokens", ["128"]),
    ("/v1/embeddings", {"input": ""}, "input", ["empty"]),
    ("/v1/embeddings", {"input": []}, "input", ["empty"]),
    ("/v1/embeddings", {"input": [[]]}, "input", ["empty"]),
    ("/v1/embeddings", {"input": [[5, 99999999]]}, "input", ["outside the vocabulary"]),
    ("/v1/embeddings", {"input": ["a"] * 2049}, "input", ["2048"]),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format", []),
    ("/v1/embeddings", {"input": 5}, "input", []),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", ["2 texts for 3"]),
    ("/score", {"text_1": "a", "text_2": LONG}, "prompt", ["202 tokens", "128"]),
    ("/rerank", {"query": "q", "documents": []}, "documents", ["empty"]),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n", []),
    ("/classify", {"input": "x"}, "model", ["serves embed, score, rerank, not classify"]),
])
def test_bad_pooling_input_is_a_named_400(encoder_server, route, body, param, words):
    with httpx.Client(base_url=encoder_server.url, timeout=60) as http:
        r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    wait_kv_free(encoder_server.engine)


def test_truncation_makes_a_long_input_fit(encoder_server):
    with httpx.Client(base_url=encoder_server.url, timeout=60) as http:
        r = http.post("/v1/embeddings", json={"input": LONG, "truncate_prompt_tokens": -1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 128
        # a huge batch of valid inputs is served, and leaves no KV block behind
        r = http.post("/v1/embeddings", json={"input": ["some text"] * 300})
        assert r.status_code == 200 and len(r.json()["data"]) == 300
    wait_kv_free(encoder_server.engine)


def test_pooling_routes_survive_schema_fuzzing(encoder_server):
    """Generated bodies, valid and invalid, on the pooling routes of a pooling server: never a 5xx, and answers
    that match the documented schema; no KV block is left behind."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    from tests.reliability.conftest import scaled
    from tests.reliability.test_hostile import _fuzzer

    schema = schemathesis.openapi.from_url(encoder_server.url + "/openapi.json")
    routes = ("/v1/embeddings", "/score", "/rerank", "/classify")
    ops = [r.ok() for r in schema.get_all_operations() if r.ok().path in routes]
    assert len(ops) == len(routes)
    counts = {"cases": 0, "4xx": 0, "2xx": 0}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzzer(op.as_strategy(generation_mode=mode), encoder_server.url,
                    [not_a_server_error, response_schema_conformance], scaled(5, 200), counts)()
    assert counts.get("5xx", 0) == 0 and counts["2xx"] > 0, counts
    wait_kv_free(encoder_server.engine, timeout=30)


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    from tests.pooling_factory import make_tiny_clip

    path = make_tiny_clip("full", tmp_path_factory.mktemp("hostile-clip") / "clip", minilm_dir())
    engine = build_engine(path)
    srv = start_server(engine, ServerSettings(served_model_names=["clip"], max_image_bytes=64 * 1024,
                                              max_image_pixels=1024 * 1024))
    yield srv
    srv.stop()
    engine.shutdown()


class _Listener:
    """A TCP port on 127.0.0.1 that records whether anything connected (it must not: nothing is fetched)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image_message(url: str, n: int = 1) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * n}]}


def test_hostile_images_are_named_400s_and_nothing_is_fetched(clip_server):
    import base64

    import numpy as np
    from PIL import Image

    def data_url(raw: bytes, mime: str = "image/png") -> str:
        return f"data:{mime};base64," + base64.b64encode(raw).decode()

    bomb = _png(Image.new("1", (5000, 5000)))  # 25 M pixels in a few KB of PNG
    assert len(bomb) < 64 * 1024
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    big = _png(Image.fromarray(noise))  # ~120 KB of incompressible pixels
    small = _png(Image.fromarray(noise[:40, :40]))
    listener = _Listener()
    cases = [
        (_image_message(data_url(bomb)), ["5000x5000", "1048576"]),
        (_image_message(data_url(big)), ["65536 bytes"]),
        (_image_message(data_url(b"hello", "text/plain")), ["'text/plain'", "not an accepted image type"]),
        (_image_message(data_url(small, "image/jpeg")), ["PNG, not the image/jpeg"]),
        (_image_message(data_url(b"\x89PNG\r\n\x1a\n garbage")), ["not a decodable"]),
        (_image_message("data:image/png;base64,%%%"), ["not valid base64"]),
        (_image_message(f"http://127.0.0.1:{listener.port}/cat.png"), ["only data: URLs", "never fetched"]),
        (_image_message("http://169.254.169.254/latest/meta-data/"), ["only data: URLs"]),
        (_image_message("file:///etc/passwd"), ["only data: URLs"]),
        (_image_message(data_url(small), n=2), ["at most 1 image", "got 2"]),
    ]
    try:
        with httpx.Client(base_url=clip_server.url, timeout=60) as http:
            for body, words in cases:
                r = http.post("/v1/embeddings", json=body)
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["param"] in ("messages", "messages.image_url"), err
                for w in words:
                    assert w in err["message"], err
            assert http.post("/v1/embeddings", json=_image_message(data_url(small))).status_code == 200
    finally:
        listener.close()
    assert listener.connections == 0
    wait_kv_free(clip_server.engine)
