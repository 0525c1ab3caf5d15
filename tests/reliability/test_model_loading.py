"""Hostile and mistaken loading options: each fails at load with a ValueError naming the field or the fix."""

from __future__ import annotations

import json

import pytest
from llmctl import LLM, EngineArgs


def _config_dir(tmp_path, name: str, config: dict):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_unknown_architecture_lists_supported(tmp_path):
    d = _config_dir(tmp_path, "foo", {"architectures": ["FooForCausalLM"], "model_type": "foo", "hidden_size": 64,
                                      "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100})
    with pytest.raises(ValueError, match=r"FooForCausalLM is not supported: neither natively \(supported: .*"
                                         r"Gemma2ForCausalLM.*LlamaForCausalLM.*\) nor by the installed transformers"):
        LLM(str(d))


def test_encoder_checkpoint_is_not_taken_for_a_causal_lm(tmp_path):
    d = _config_dir(tmp_path, "bert", {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    with pytest.raises(ValueError, match="BertForMaskedLM is not supported"):
        LLM(str(d))


def test_remote_code_is_off_unless_asked(tmp_path):
    d = _config_dir(tmp_path, "remote", {"architectures": ["BarForCausalLM"], "model_type": "bar",
                                         "auto_map": {"AutoConfig": "configuration_bar.BarConfig",
                                                      "AutoModelForCausalLM": "modeling_bar.BarForCausalLM"}})
    with pytest.raises(ValueError, match="trust_remote_code is off by default: pass --trust-remote-code"):
        LLM(str(d))


def test_native_only_refuses_a_non_native_architecture(tiny_llama_dir, tmp_path):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg.update(architectures=["SmolLM3ForCausalLM"], model_type="smollm3")
    d = _config_dir(tmp_path, "smollm3", cfg)
    with pytest.raises(ValueError, match=r"SmolLM3ForCausalLM is not supported natively; supported: .*"
                                         r"model_impl='transformers'"):
        LLM(str(d), model_impl="native")


@pytest.mark.parametrize("kwargs, message", [
    ({"model_impl": "vllm"}, "model_impl: must be auto, native or transformers"),
    ({"hf_overrides": "{not json"}, "hf_overrides: not valid JSON"),
    ({"hf_overrides": "[1, 2]"}, "hf_overrides: must be a JSON object"),
    ({"trust_remote_code": "yes"}, "trust_remote_code: must be True or False"),
])
def test_bad_loading_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model="any", **kwargs)


def test_unsupported_quirk_is_refused_natively_and_falls_back(tmp_path, test_tokenizer):
    """Phi's per-head q/k LayerNorm is not native: ``native`` says so naming the field, ``auto`` runs it through
    transformers. StableLM with the same quirk cannot take either path (its attention bypasses transformers'
    attention interface), and says that."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=len(test_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4, qk_layernorm=True)
    for name, cfg_cls, model_cls in (("phi", tf.PhiConfig, tf.PhiForCausalLM),
                                     ("stablelm", tf.StableLmConfig, tf.StableLmForCausalLM)):
        model_cls(cfg_cls(**small)).save_pretrained(tmp_path / name)
        test_tokenizer.save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="phi: qk_layernorm=True is not supported natively"):
        LLM(str(tmp_path / "phi"), model_impl="native", num_threads=1)
    llm = LLM(str(tmp_path / "phi"), dtype="float32", num_threads=1)
    assert llm.llm_engine.core.model_impl == "transformers"
    with pytest.raises(ValueError, match="StableLmForCausalLM cannot run through the transformers fallback"):
        LLM(str(tmp_path / "stablelm"), dtype="float32", num_threads=1)


@pytest.fixture(scope="module")
def gptq_mixtral(model_cache_dir, test_tokenizer, tmp_path_factory):
    """A tiny Mixtral whose routed experts are GPTQ 4-bit, and its tensors (to damage one at a time)."""
    from safetensors.torch import load_file

    from tests.family_factory import make_family_model
    from tests.quant_checkpoints import write_gptq

    family = model_cache_dir / "family-mixtral"
    if not (family / "model.safetensors").exists():
        make_family_model("mixtral", family, test_tokenizer)
    path, _ = write_gptq(family, tmp_path_factory.mktemp("gptq_mixtral") / "ok", 4, 32, False)
    return path, load_file(str(path / "model.safetensors"))


EXPERT = "model.layers.1.block_sparse_moe.experts.2"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda s: s.__setitem__(f"{EXPERT}.w2.qweight", s[f"{EXPERT}.w2.qweight"][:8]),
     r"quantization gptq: tensor model\.layers\.1\.mlp\.experts\.2\.down_proj\.qweight has shape \(8, 64\), "
     r"expected \(16, 64\)"),
    (lambda s: s.pop(f"{EXPERT}.w3.scales"),
     r"checkpoint is missing 1 tensor\(s\), e\.g\. model\.layers\.1\.mlp\.experts\.2\.up_proj\.scales"),
    (lambda s: s.__setitem__(f"{EXPERT}.w1.weight", s[f"{EXPERT}.w1.scales"].clone()),
     r"quantization gptq: checkpoint tensor model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight is not part "
     r"of the layout of expert model\.layers\.1\.mlp\.experts\.2\.gate_proj \(expected qweight, qzeros, scales, "
     r"g_idx\)"),
], ids=["wrong-shape", "missing-scale", "dense-tensor"])
def test_damaged_quantized_expert_fails_naming_the_tensor(gptq_mixtral, tmp_path, damage, message):
    """A quantized expert's tensor with a wrong shape, missing, or of another layout fails at load, naming it (by
    the model's name for it: Mixtral's ``block_sparse_moe.experts.{e}.w2`` is ``mlp.experts.{e}.down_proj``)."""
    import shutil

    from safetensors.torch import save_file

    src, state = gptq_mixtral
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    state = dict(state)
    damage(state)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        LLM(str(out), dtype="float32", num_threads=1, max_model_len=64)
