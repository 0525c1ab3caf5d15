"""LoRA on the real default model: peft adapters on SmolLM2-135M (its GGUF's weights written out in float32), one
at the largest rank llmctl accepts (64) on every projection, one rsLoRA adapter on the attention, served together
with the base model in one batch; greedy tokens equal transformers with each adapter merged (fp32)."""

from __future__ import annotations

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.lora import LoRARequest
from llmctl.lora.config import MAX_SUPPORTED_RANK

from tests.lora_support import make_adapter, merged_generate

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
MAX_TOKENS = 8
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2_fp32_dir(tmp_path_factory, smollm2_gguf):
    """A float32 safetensors checkpoint of the GGUF's weights (gguf's dequantizer): what peft and transformers
    need, and what llmctl loads here too, so both sides run the same weights."""
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import iter_hf_tensors
    from llmctl.loader.source import resolve_model
    from llmctl.loader.tokenizer import load_tokenizer
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("smollm2-fp32")
    source = resolve_model(str(smollm2_gguf))
    source.hf_config.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    save_file({name: t.to(torch.float32).contiguous() for name, t in iter_hf_tensors(open_gguf(smollm2_gguf))},
              str(out / "model.safetensors"))
    return out


def test_rank_64_and_rslora_adapters_on_smollm2_in_one_batch_equal_merged_transformers(smollm2_fp32_dir, tmp_path):
    base = smollm2_fp32_dir
    adapters = {
        "r64": make_adapter(base, tmp_path / "r64", MAX_SUPPORTED_RANK, 32, PROJECTIONS, False, seed=64),
        "rs16": make_adapter(base, tmp_path / "rs16", 16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], True,
                             seed=16),
    }
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=MAX_SUPPORTED_RANK,
              max_model_len=256, kv_cache_memory=64 << 20)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    jobs = [(i, name) for i in range(len(ids)) for name in (*loras, None)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids[i]} for i, _ in jobs], params, use_tqdm=False,
                        lora_request=[None if n is None else loras[n] for _, n in jobs])
    got = {job: out.outputs[0].token_ids for job, out in zip(jobs, outs, strict=True)}
    for name in (*loras, None):
        wants = merged_generate(base, None if name is None else adapters[name], ids, MAX_TOKENS)
        for i, want in enumerate(wants):
            assert got[(i, name)] == want, (name, PROMPTS[i], tok.decode(got[(i, name)]), tok.decode(want))
    for i in range(len(ids)):
        assert len({tuple(got[(i, n)]) for n in (*loras, None)}) == 3  # each adapter changes SmolLM2's answer
