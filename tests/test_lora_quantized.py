"""LoRA over a quantized base: the tiny Llama quantized at load (``quantization="int8"``, per output channel), and
GPTQ (4-bit, act-order), AWQ and kept-quantized GGUF checkpoints (every block type), with adapters on the quantized
projections (and one on the unquantized LM head and embedding too), mixed in one batch with the base model. The
oracle is peft over the dequantized base: the same codes and scales multiplied back into float32 weights, the
adapter on top; greedy tokens equal, logprobs close (fp32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.lora import LoRARequest

from tests.lora_support import make_adapter, make_adapter_on
from tests.model_factory import gguf_parsed_once
from tests.quant_checkpoints import hf_model_with, write_awq, write_gguf, write_gptq

pytest.importorskip("peft")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44]]
MAX_TOKENS = 8
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 2e-3


def _dequantized_base(base: Path):
    """transformers' model with every projection llmctl quantizes replaced by its int8 round trip."""
    from llmctl.quantization.load_time import quantize_int8_per_channel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in QUANTIZED:
                q, scales = quantize_int8_per_channel(module.weight)
                module.weight.copy_(q.float() * scales)
    return model


def _reference(base: Path, adapter: Path | None, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of peft over the dequantized base (adapter merged), and log-softmax rows of prompt + tokens."""
    import peft

    model = _dequantized_base(base)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)[0].tolist()
        rows = model(torch.tensor([out])).logits[0].double().log_softmax(-1)
    return out[len(prompt):], rows


def test_adapters_over_an_int8_base_equal_peft_over_the_dequantized_base(tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["llama"]
    adapters = {
        "proj": make_adapter(base, tmp_path / "proj", 8, 16, list(QUANTIZED), False, seed=41),
        "all": make_adapter(base, tmp_path / "all", 4, 8, [*QUANTIZED, "embed_tokens", "lm_head"], True, seed=42),
    }
    llm = LLM(str(base), dtype="float32", quantization="int8", enable_lora=True, max_loras=2, max_lora_rank=8,
              kv_cache_memory=16 << 20)
    summary = llm.llm_engine.core.model.quant_summary
    assert "int8" in str(summary), summary  # the projections really run quantized
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    jobs = [(p, name) for p in PROMPTS for name in (*loras, None)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                        lora_request=[None if n is None else loras[n] for _, n in jobs])
    got = {(tuple(p), n): o.outputs[0] for (p, n), o in zip(jobs, outs, strict=True)}
    for p in PROMPTS:
        for name in (*loras, None):
            want, rows = _reference(base, None if name is None else adapters[name], p)
            comp = got[(tuple(p), name)]
            assert comp.token_ids == want, (name, p)
            for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
                assert abs(lp[tok].logprob - float(rows[len(p) - 1 + j, tok])) < TOL, (name, p, j)
        assert len({tuple(got[(tuple(p), n)].token_ids) for n in (*loras, None)}) == 3  # adapters change outputs
    # the oracle needs the dequantized base: int8 moves this tiny model's logprobs far beyond TOL
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        moved = plain(torch.tensor([PROMPTS[0]])).logits[0].log_softmax(-1) - \
            _dequantized_base(base).eval()(torch.tensor([PROMPTS[0]])).logits[0].log_softmax(-1)
    assert float(moved.abs().max()) > 10 * TOL


# -- checkpoints quantized by their own format, kept quantized -----------------------------------------------------
GGUF_TYPES = {  # every kept block type (on the CPU kernels; Q2_K / Q3_K unpacked to int8 groups of 16), q/k/v mixed
    "0.attn_q": "Q4_K", "0.attn_k": "Q6_K", "0.attn_v": "Q8_0", "0.attn_output": "Q4_0", "0.ffn_gate": "Q4_1",
    "0.ffn_up": "Q4_1", "0.ffn_down": "Q5_K",
    "1.attn_q": "Q5_0", "1.attn_k": "Q5_0", "1.attn_v": "Q5_0", "1.attn_output": "Q5_1", "1.ffn_gate": "Q2_K",
    "1.ffn_up": "Q2_K", "1.ffn_down": "Q3_K",
}


def _format_checkpoint(fmt: str, base: Path, tmp_path: Path, tok):
    """(path to load, quantization option, the dequantized base as transformers' model: a fresh one per call)."""
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":  # tied embeddings (the file has no output.weight); the dequantized oracle is gguf's own
        path = write_gguf(tmp_path / "tiny.gguf", tok, GGUF_TYPES)
        # transformers dequantizes the K-quants in Python, seconds per load: read the file once, copy per call
        with gguf_parsed_once():
            loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        return path, "gguf", lambda: copy.deepcopy(loaded)
    if fmt == "gptq":
        path, dense = write_gptq(base, tmp_path / "gptq", 4, 32, act_order=True)
    else:
        path, dense = write_awq(base, tmp_path / "awq", 32)
    return path, None, lambda: hf_model_with(base, dense)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "gguf"])
def test_adapters_over_a_quantized_checkpoint_equal_peft_over_the_dequantized_base(fmt, tiny_model_dirs, tmp_path,
                                                                                   test_tokenizer, monkeypatch):
    """peft runs unmerged here: merging into the GGUF's tied embedding would move the LM head's weight too, which
    is not what the adapter means (nor what peft's own forward computes). GGUF layers keep float activations here
    (LLMCTL_CPU_GGUF_INT8_ACT=0): the oracle is peft over the dequantized weights, not llama.cpp's int8 activations."""
    import peft

    monkeypatch.setenv("LLMCTL_CPU_GGUF_INT8_ACT", "0")

    path, quantization, dequantized = _format_checkpoint(fmt, tiny_model_dirs["llama"], tmp_path, test_tokenizer)
    adapters = {
        "proj": make_adapter_on(dequantized(), tmp_path / "proj", 8, 16, list(QUANTIZED), False, seed=41),
        "all": make_adapter_on(dequantized(), tmp_path / "all", 4, 8, [*QUANTIZED, "embed_tokens", "lm_head"], True,
                               seed=42),
    }
    llm = LLM(str(path), dtype="float32", quantization=quantization, enable_lora=True, max_loras=2, max_lora_rank=8,
              kv_cache_memory=16 << 20)
    summary = llm.llm_engine.core.model.quant_summary
    # every projection (2 layers x qkv, o, gate_up, down) really runs quantized
    assert summary is not None and summary.describe().startswith(f"{fmt} ") and "8 layers" in summary.describe()
    loras = {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(adapters.items())}
    jobs = [(p, name) for p in PROMPTS for name in (*loras, None)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in jobs], params, use_tqdm=False,
                        lora_request=[None if n is None else loras[n] for _, n in jobs])
    got = {(tuple(p), n): o.outputs[0] for (p, n), o in zip(jobs, outs, strict=True)}
    for name in (*loras, None):
        model = dequantized() if name is None else peft.PeftModel.from_pretrained(dequantized(), adapters[name])
        model.eval()
        for p in PROMPTS:
            with torch.no_grad():
                want = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                      do_sample=False, pad_token_id=0)[0].tolist()
                rows = model(input_ids=torch.tensor([want])).logits[0].double().log_softmax(-1)
            comp = got[(tuple(p), name)]
            assert comp.token_ids == want[len(p):], (fmt, name, p)
            for j, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
                assert abs(lp[tok].logprob - float(rows[len(p) - 1 + j, tok])) < TOL, (fmt, name, p, j)
    for p in PROMPTS:
        assert len({tuple(got[(tuple(p), n)].token_ids) for n in (*loras, None)}) == 3  # adapters change outputs
