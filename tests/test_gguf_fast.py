"""llmctl's own GGUF reader (one parse per process) against transformers' GGUF path: same config, same tensors
bit for bit, same tokenizer; plus the parser against gguf-py's reader on small synthetic files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from llmctl.loader.gguf_file import open_gguf
from llmctl.loader.gguf_hf import build_hf_config, build_tokenizer, hf_tensor_name, iter_hf_tensors
from llmctl.loader.source import resolve_model
from llmctl.loader.tokenizer import load_tokenizer

from tests.model_factory import gguf_parsed_once

TEXTS = [
    "Hello world",
    "",
    "  leading spaces, trailing   \n\ttabs\r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>plain<|im_end|><|im_start|>",
    "naïve café — Grüße, 日本語のテキスト, 한국어, emoji 🤖🎉 and ZWJ 👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # code 12345678901234",
]


def _assert_config_equal(ours, theirs) -> None:
    a, b = ours.to_dict(), theirs.to_dict()
    assert type(ours) is type(theirs)
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)} == {}


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf):
    """transformers' config, tensors and tokenizer of the SmolLM2 GGUF, read with the file parsed once
    (``gguf_parsed_once``: each of the three would parse its metadata again)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with gguf_parsed_once():
        config = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return config, tensors, tokenizer


@pytest.fixture(scope="module")
def smollm2_ref(transformers_gguf):
    return transformers_gguf[0]


def test_config_matches_transformers(smollm2_gguf, smollm2_ref):
    g = open_gguf(smollm2_gguf)
    _assert_config_equal(build_hf_config(g), smollm2_ref)
    source = resolve_model(str(smollm2_gguf))
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert getattr(source.hf_config, "dtype", None) is None  # resolve_dtype decides (float32 for GGUF)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                  "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(source.hf_config, field) == getattr(smollm2_ref, field), field


def test_parsed_once_per_process(smollm2_gguf, tmp_path):
    assert open_gguf(smollm2_gguf) is open_gguf(str(smollm2_gguf))
    link = tmp_path / "link.gguf"
    link.symlink_to(smollm2_gguf)
    assert open_gguf(link) is open_gguf(smollm2_gguf)


def test_weights_match_transformers(smollm2_gguf, transformers_gguf):
    theirs = transformers_gguf[1]
    ours = dict(iter_hf_tensors(open_gguf(smollm2_gguf)))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), name


def test_tokenizer_matches_transformers(smollm2_gguf, transformers_gguf):
    theirs = transformers_gguf[2]
    ours = load_tokenizer(resolve_model(str(smollm2_gguf)))
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id)
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder
    assert len(ours) == len(theirs)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "Bonjour ✓"}]
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# --- synthetic files: the parser against gguf-py, the name map and q/k un-permutation against transformers ---

def _write_tiny(path: Path, arch: str, *, tied: bool, bias: bool, qk_norm: bool, name: str = "tiny",
                nested: bool = False) -> None:
    import gguf

    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn, vocab, layers = 32, 4, 2, 48, 64, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab - 3)] + ["<|a|>", "é", "日本"])
    w.add_token_types([1] * vocab)
    w.add_token_scores([float(i) for i in range(vocab)])
    w.add_array("test.u8s", [1, 2, 3])
    if nested:  # transformers' own reader refuses arrays of arrays, so only where it is not compared
        w.add_array("test.nested", [[1, 2], [3]])
    w.add_bool("test.flag", True)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 0.1)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(tname: str, *shape: int, f16: bool = False) -> None:
        a = rng.standard_normal(shape).astype(np.float16 if f16 else np.float32)
        w.add_tensor(tname, a)

    t("token_embd.weight", vocab, hidden, f16=True)
    for i in range(layers):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", heads * head_dim, hidden, f16=True)
        t(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        t(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        if bias:
            t(f"blk.{i}.attn_q.bias", heads * head_dim)
            t(f"blk.{i}.attn_k.bias", kv_heads * head_dim)
            t(f"blk.{i}.attn_v.bias", kv_heads * head_dim)
        if qk_norm:
            t(f"blk.{i}.attn_q_norm.weight", head_dim)
            t(f"blk.{i}.attn_k_norm.weight", head_dim)
        t(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    t("output_norm.weight", hidden)
    if not tied:
        t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SYNTHETIC = {
    "llama": dict(arch="llama", tied=False, bias=False, qk_norm=False),
    "llama_tied": dict(arch="llama", tied=True, bias=False, qk_norm=False),
    "mistral": dict(arch="llama", tied=False, bias=False, qk_norm=False, name="mistral"),
    "qwen2": dict(arch="qwen2", tied=True, bias=True, qk_norm=False),
    "qwen3": dict(arch="qwen3", tied=False, bias=False, qk_norm=True),
}


@pytest.mark.parametrize("kind", list(SYNTHETIC))
def test_synthetic_matches_gguf_py_and_transformers(tmp_path, kind):
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / f"{kind}.gguf"
    _write_tiny(path, **SYNTHETIC[kind])
    g = open_gguf(path)

    reader = gguf.GGUFReader(str(path))
    assert set(g.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert g.metadata[key] == field.contents(), key
    assert list(g.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        np.testing.assert_array_equal(g.raw(rt.name), rt.data)

    theirs_cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours_cfg = build_hf_config(g)
    _assert_config_equal(ours_cfg, theirs_cfg)
    assert ours_cfg.model_type == ("mistral" if kind == "mistral" else SYNTHETIC[kind]["arch"])

    # transformers cannot load a "mistral" GGUF's weights itself (gguf-py knows no such arch); a Llama skeleton
    # has the same parameter names.
    skel_cfg = theirs_cfg
    if kind == "mistral":
        skel_cfg = AutoConfig.for_model(**(theirs_cfg.to_dict() | {"model_type": "llama"}))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(skel_cfg)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = dict(iter_hf_tensors(g))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    if SYNTHETIC[kind]["arch"] == "llama":  # the un-permutation really moved rows
        assert not torch.equal(ours["model.layers.0.self_attn.k_proj.weight"],
                               torch.from_numpy(g.dequantize("blk.0.attn_k.weight").copy()))


def test_nested_arrays(tmp_path):
    path = tmp_path / "nested.gguf"
    _write_tiny(path, **SYNTHETIC["llama"], nested=True)
    assert open_gguf(path).metadata["test.nested"] == [[1, 2], [3]]


def test_reparsed_when_the_file_changes(tmp_path):
    path = tmp_path / "m.gguf"
    _write_tiny(path, **SYNTHETIC["llama"])
    first = open_gguf(path)
    assert open_gguf(path) is first
    _write_tiny(path, **SYNTHETIC["qwen2"])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_gguf(path).architecture == "qwen2"


def test_corrupt_files_raise_value_error(tmp_path):
    good = tmp_path / "good.gguf"
    _write_tiny(good, **SYNTHETIC["llama"])
    data = good.read_bytes()
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF"):
        open_gguf(bad_magic)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(data[:300])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        open_gguf(truncated)
    truncated_data = tmp_path / "trunc_data.gguf"
    truncated_data.write_bytes(data[:-64])
    with pytest.raises(ValueError, match="truncated"):
        open_gguf(truncated_data)


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


def test_tokenizer_defers_to_transformers_next_to_a_tokenizer_config(smollm2_gguf, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert build_tokenizer(open_gguf(smollm2_gguf), tmp_path) is None
