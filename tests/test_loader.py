"""Model resolution, weight streaming, architecture lookup and dtype choice."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from llmctl.loader import (
    get_model_class,
    iter_weights,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from llmctl.loader.weights import INDEX_FILE
from llmctl.models.llama import LlamaForCausalLM

from tests.test_models import make_ctx, make_registry


def test_sharded_safetensors_load_like_single_file(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tiny_model_dirs["qwen2"]
    hf = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="2MB")
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture must really be sharded"

    seen = dict(iter_weights(resolve_model(str(sharded))))
    assert set(seen) == set(index["weight_map"])
    expected = dict(hf.state_dict())
    for name, tensor in seen.items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)

    reg = make_registry()
    a = load_model(resolve_model(str(single)), make_ctx(), reg)
    b = load_model(resolve_model(str(sharded)), make_ctx(), reg)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_native_architectures_resolve(tiny_model_dirs):
    reg = make_registry()
    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        assert get_model_class(resolve_model(str(tiny_model_dirs[kind])).hf_config, reg) is LlamaForCausalLM


def test_unknown_architecture_lists_supported():
    cfg = SimpleNamespace(architectures=["FooForCausalLM"])
    with pytest.raises(ValueError, match=r"^model: architecture FooForCausalLM is not supported") as e:
        get_model_class(cfg, make_registry())
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(e.value)


@pytest.mark.parametrize("missing", ["/nonexistent/model-dir", "./no/such/dir", "weights/missing.gguf"])
def test_missing_path_names_model_field(missing):
    with pytest.raises(ValueError, match=r"^model: .*not found"):
        resolve_model(missing)


def test_uncached_repo_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ValueError, match=r"^model: .*not found in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("some-org/not-downloaded")


def test_repo_id_resolves_from_hf_home_cache(monkeypatch, tmp_path, tiny_model_dirs):
    """A repo already in the cache under HF_HOME is found offline, as after an earlier download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    source = resolve_model("tiny-org/tiny-llama")
    assert source.local_dir == repo / "snapshots" / commit
    assert source.gguf_file is None and source.hf_config.architectures == ["LlamaForCausalLM"]


def test_directory_without_safetensors_is_refused(tiny_model_dirs, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dirs["llama"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"^model: no \*\.safetensors"):
        list(iter_weights(resolve_model(str(d))))


def test_tokenizer_from_checkpoint_dir(tiny_model_dirs, test_tokenizer):
    tok = load_tokenizer(resolve_model(str(tiny_model_dirs["mistral"])))
    text = "Paged attention keeps blocks."
    assert tok(text)["input_ids"] == test_tokenizer(text)["input_ids"]


@pytest.mark.parametrize(("requested", "ckpt", "platform", "expected"), [
    ("auto", torch.bfloat16, [torch.bfloat16, torch.float32], torch.bfloat16),
    ("auto", "bfloat16", [torch.float16, torch.float32], torch.float16),
    ("auto", None, [torch.bfloat16, torch.float32], torch.float32),
    ("auto", None, [torch.bfloat16], torch.bfloat16),
    ("fp16", torch.bfloat16, [torch.bfloat16, torch.float16], torch.float16),
    (torch.float32, torch.bfloat16, [torch.bfloat16, torch.float32], torch.float32),
])
def test_resolve_dtype(requested, ckpt, platform, expected):
    assert resolve_dtype(requested, SimpleNamespace(dtype=ckpt), platform) == expected


def test_resolve_dtype_quantized_checkpoint_takes_the_fastest_dtype():
    cfg = SimpleNamespace(dtype=None)
    assert resolve_dtype("auto", cfg, [torch.bfloat16, torch.float32], quantized_checkpoint=True) == torch.bfloat16
    assert resolve_dtype("float32", cfg, [torch.bfloat16, torch.float32], quantized_checkpoint=True) == torch.float32


def test_resolve_dtype_takes_an_emulated_dtype_only_when_named(caplog):
    cfg = SimpleNamespace(dtype=torch.bfloat16)
    assert resolve_dtype("auto", cfg, [torch.float32], emulated_dtypes=[torch.bfloat16]) == torch.float32
    with caplog.at_level("WARNING"):
        assert resolve_dtype("bfloat16", cfg, [torch.float32], emulated_dtypes=[torch.bfloat16]) == torch.bfloat16
    assert "emulated" in caplog.text
    with pytest.raises(ValueError, match=r"^dtype: float16 .*supported: float32 \(emulated: bfloat16\)"):
        resolve_dtype("float16", cfg, [torch.float32], emulated_dtypes=[torch.bfloat16])


@pytest.mark.parametrize("requested", ["float64x", "int8", "bfloat16"])
def test_resolve_dtype_rejects(requested):
    with pytest.raises(ValueError, match=r"^dtype: "):
        resolve_dtype(requested, SimpleNamespace(dtype=None), [torch.float32])
