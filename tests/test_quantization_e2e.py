"""Quantized checkpoints end to end: llmctl's greedy tokens and logprobs against transformers running the same
dequantized weights (the formats' own decompressors or dequantizers give those weights). Each case prints its
top-1 agreement and largest logprob difference."""

from __future__ import annotations

import json

import pytest
import torch
from llmctl import LLM, SamplingParams

from tests._engine_util import _single_thread  # noqa: F401  (module-wide one-thread fixture)
from tests.family_factory import make_family_model
from tests.model_factory import gguf_parsed_once, make_tiny_model
from tests.quant_checkpoints import (
    activation_args,
    hf_model_with,
    write_awq,
    write_compressed_tensors,
    write_family_gguf,
    write_gguf,
    write_gptq,
)

PROMPTS = [[1, 510, 3575, 282, 4649, 314], [28, 4, 900, 77, 1024, 3, 5, 60, 61], [9000, 12, 13]]
MAX_TOKENS = 8
ACT_QUANT_TOLERANCE = 0.05
ENGINE = dict(dtype="float32", max_num_batched_tokens=64, num_threads=1, max_model_len=128)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, test_tokenizer):
    """A tiny llama wide enough for group size 128 (hidden 128, intermediate 256)."""
    out = tmp_path_factory.mktemp("quant") / "base"
    return make_tiny_model("llama", out, test_tokenizer, hidden_size=128, intermediate_size=256)


def compare(llm: LLM, hf, label: str) -> tuple[float, float]:
    """(top-1 agreement, largest |logprob difference| of llmctl's chosen tokens), transformers teacher-forced on
    llmctl's own output."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    agree = total = 0
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        toks = list(out.outputs[0].token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:-1]
        lp = logits.float().log_softmax(-1)
        for i, t in enumerate(toks):
            total += 1
            agree += int(lp[i].argmax().item() == t)
            worst = max(worst, abs(out.outputs[0].logprobs[i][t].logprob - lp[i, t].item()))
    stats = llm.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    print(f"\n{label}: top-1 agreement {agree}/{total}, max logprob diff {worst:.2e}")
    return agree / total, worst


def kernels_of(llm: LLM) -> str:
    return llm.llm_engine.core.model.quant_summary.describe()


CT_CASES = [
    ("W4A16", {"group_size": 32}),
    ("W4A16_ASYM", {"group_size": 64}),
    ("W4A16", {"group_size": 128, "symmetric": False}),
    ("W8A16", {"group_size": 64}),
    ("W8A16", {"group_size": 128, "symmetric": False}),
    ("W8A8", {}),
    ("FP8", {}),
    ("FP8_DYNAMIC", {}),
]


@pytest.mark.parametrize(("preset", "args"), CT_CASES, ids=[f"{p}-{a}" for p, a in CT_CASES])
def test_compressed_tensors(base_dir, tmp_path, preset, args):
    path, dense, act_args, input_scales = write_compressed_tensors(base_dir, tmp_path / "ct", preset, **args)
    llm = LLM(str(path), **ENGINE)
    hf = hf_model_with(base_dir, dense, act_args, input_scales)
    agreement, worst = compare(llm, hf, f"compressed-tensors {preset} {args}")
    if act_args is None:  # the same weights, both in float32: only summation order differs
        assert agreement == 1.0 and worst < 1e-3
    else:  # activations fake-quantized by compressed-tensors on the transformers side: a value on a rounding
        # boundary may land on the other side, nothing more
        assert agreement >= 0.95 and worst < ACT_QUANT_TOLERANCE


@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, 32, True), (8, 64, True), (4, 128, False)])
def test_gptq(base_dir, tmp_path, bits, group, act_order):
    path, dense = write_gptq(base_dir, tmp_path / "gptq", bits, group, act_order)
    llm = LLM(str(path), **ENGINE)
    agreement, worst = compare(llm, hf_model_with(base_dir, dense), f"gptq {bits}-bit g{group} act_order={act_order}")
    assert agreement == 1.0 and worst < 1e-3


def test_awq(base_dir, tmp_path):
    path, dense = write_awq(base_dir, tmp_path / "awq", 64)
    llm = LLM(str(path), **ENGINE)
    agreement, worst = compare(llm, hf_model_with(base_dir, dense), "awq 4-bit g64")
    assert agreement == 1.0 and worst < 1e-3


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantize_at_load(base_dir, method):
    from llmctl.quantization.load_time import quantize_fp8_per_channel, quantize_int8_per_channel
    from safetensors.torch import load_file

    state = load_file(str(base_dir / "model.safetensors"))
    dense = {}
    for name, w in state.items():
        if name.endswith("_proj.weight"):
            if method == "int8":
                q, s = quantize_int8_per_channel(w)
                dense[name[:-7]] = q.float() * s
            else:
                q, s = quantize_fp8_per_channel(w)
                dense[name[:-7]] = q.float() * s
    llm = LLM(str(base_dir), quantization=method, **ENGINE)
    assert ("fp8 w8a8" if method == "fp8" else "int8 w8a16") in kernels_of(llm)
    # int8 is weight-only; fp8 quantizes the activations per token too (compressed-tensors fake-quantizes them on
    # the transformers side)
    hf = hf_model_with(base_dir, dense, activation_args(method) if method == "fp8" else None)
    agreement, worst = compare(llm, hf, f"--quantization {method}")
    assert agreement == 1.0 and worst < 1e-3


GGUF_TYPES = {
    "0.attn_q": "Q4_K", "0.attn_k": "Q6_K", "0.attn_v": "Q8_0", "0.attn_output": "Q4_0", "0.ffn_gate": "Q4_1",
    "0.ffn_up": "Q4_1", "0.ffn_down": "Q5_K",
    "1.attn_q": "Q5_0", "1.attn_k": "Q5_0", "1.attn_v": "Q5_0", "1.attn_output": "Q5_1", "1.ffn_gate": "Q2_K",
    "1.ffn_up": "Q2_K", "1.ffn_down": "Q3_K",
}


def test_gguf_kept_quantized(tmp_path, test_tokenizer, monkeypatch):
    """Every block type, mixed inside a merged q/k/v, and the tied output projection in its Q8_0 blocks, against
    transformers loading the same file dequantized: with float activations (the CPU default, pinned here), since the
    oracle's activations are float; the opt-in int8 activations (llama.cpp's arithmetic) are checked against their
    own arithmetic in tests/test_cpu_quant_kernels.py and on SmolLM2 in tests/test_quantization_smollm2.py. Kept
    quantized is the default; quantization="none" dequantizes at load."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LLMCTL_CPU_GGUF_INT8_ACT", "0")

    path = write_gguf(tmp_path / "tiny.gguf", test_tokenizer, GGUF_TYPES, embed_type="Q8_0")
    assert getattr(LLM(str(path), quantization="none", **ENGINE).llm_engine.core.model, "quant_summary", None) is None
    llm = LLM(str(path), **ENGINE)
    summary = kernels_of(llm)
    for t in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "lm_head Q8_0 g32"):
        assert t in summary, summary
    with gguf_parsed_once():
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    agreement, worst = compare(llm, hf, "gguf kept quantized (all block types)")
    assert agreement == 1.0 and worst < 1e-3


# Other architectures' files, named as llama.cpp's converter names them: Gemma 2 and 3 (norms stored +1, soft-caps,
# sliding windows), StableLM (LayerNorm, partial rotary), Starcoder2 (biases, a plain MLP whose c_fc/c_proj the
# model calls fc1/fc2) and Phi-3 (fused attn_qkv, and ffn_up holding gate and up), with projections of several
# block types.
FAMILY_GGUF_TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q5_1", "attn_qkv": "Q5_1", "attn_output": "Q4_1",
                     "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q5_0"}


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "stablelm", "starcoder2", "phi3"])
def test_gguf_of_other_architectures_kept_quantized(kind, model_cache_dir, test_tokenizer, tmp_path):
    """Kept quantized by default (every projection: 7 tensors a layer, Phi-3's fused ones 4), against transformers
    reading the same file (dequantized)."""
    from llmctl.loader.gguf_file import open_gguf
    from transformers import AutoModelForCausalLM

    family = model_cache_dir / f"family-{kind}"
    if not (family / "model.safetensors").exists():
        make_family_model(kind, family, test_tokenizer)
    path = write_family_gguf(family, tmp_path / kind, kind, FAMILY_GGUF_TYPES)
    llm = LLM(str(path), **ENGINE)
    summary = kernels_of(llm)
    written = {n.split(".")[2]: FAMILY_GGUF_TYPES[n.split(".")[2]] for n in open_gguf(path).tensors
               if n.startswith("blk.0.") and n.endswith(".weight") and n.split(".")[2] in FAMILY_GGUF_TYPES}
    assert len(written) == (4 if kind == "phi3" else 6 if kind == "starcoder2" else 7), written
    for t in set(written.values()):
        assert t in summary, summary
    # q/k/v, o, gate/up (or fc1), down (or fc2) in each of the two layers
    assert summary.startswith(f"gguf ({', '.join(sorted(set(written.values())))}): 8 layers"), summary
    with gguf_parsed_once():
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    agreement, worst = compare(llm, hf, f"{kind} GGUF kept quantized")
    assert agreement == 1.0 and worst < 1e-3


# -- bad input: a clear ValueError at load naming the method and the tensor --------------------------------------
def test_unknown_method_is_refused(base_dir):
    with pytest.raises(ValueError, match="quantization: unknown method 'int3'"):
        LLM(str(base_dir), quantization="int3", **ENGINE)


def test_checkpoint_method_needs_its_checkpoint(base_dir):
    with pytest.raises(ValueError, match="quantization: gptq describes a quantized checkpoint"):
        LLM(str(base_dir), quantization="gptq", **ENGINE)


def test_method_must_match_the_checkpoint(base_dir, tmp_path):
    path, _ = write_awq(base_dir, tmp_path / "awq", 64)
    with pytest.raises(ValueError, match="already quantized with awq"):
        LLM(str(path), quantization="int8", **ENGINE)
    with pytest.raises(ValueError, match="quantization: none dequantizes GGUF files at load; this checkpoint is "
                                         "stored as awq"):
        LLM(str(path), quantization="none", **ENGINE)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_bits_and_group_size(base_dir, tmp_path):
    path, _ = write_gptq(base_dir, tmp_path / "gptq", 4, 32, False)
    _edit_config(path, bits=3)
    with pytest.raises(ValueError, match="quantization gptq: bits=3 is not supported"):
        LLM(str(path), **ENGINE)
    ct, *_ = write_compressed_tensors(base_dir, tmp_path / "ct", "W4A16", group_size=32)
    cfg = json.loads((ct / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 48
    (ct / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        LLM(str(ct), **ENGINE)


def test_config_and_tensors_disagree(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = write_gptq(base_dir, tmp_path / "gptq", 4, 32, False)
    _edit_config(path, group_size=64)  # scales were written for groups of 32
    with pytest.raises(ValueError, match=r"quantization gptq: tensor model\.layers\.0\.mlp\.down_proj\.qzeros "
                                         r"has shape \(8, 16\), expected \(4, 16\)"):
        LLM(str(path), **ENGINE)
    _edit_config(path, group_size=32)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.down_proj\.scales"):
        LLM(str(path), **ENGINE)


def test_unexpected_tensor_of_a_quantized_layer(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = write_awq(base_dir, tmp_path / "awq", 64)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 128)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantization awq: checkpoint tensor model\.layers\.0\.self_attn\.k_proj"
                                         r"\.weight is not part of the layout"):
        LLM(str(path), **ENGINE)


def test_cli_quantization_flag_reaches_the_engine(monkeypatch, tmp_path):
    """``--quantization`` / ``-q`` on ``llmctl serve`` and on ``llmctl bench throughput`` and ``latency`` (vLLM's
    benchmarks take every engine argument, so a quantized run is benchmarked the way it is served)."""
    import llmctl.bench.latency as latency_mod
    import llmctl.bench.throughput as throughput_mod
    from llmctl.bench import cli as bench_cli
    from llmctl_cli import main as cli_main
    from typer.testing import CliRunner

    runner = CliRunner()
    seen: list = []

    def stop(*args, **kwargs):
        seen.append(kwargs.get("quantization", getattr(args[0], "quantization", None) if args else None))
        raise ValueError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", lambda args: stop(args))
    monkeypatch.setattr(throughput_mod, "run_throughput", stop)
    monkeypatch.setattr(latency_mod, "run_latency", stop)
    runner.invoke(cli_main.app, ["serve", str(tmp_path), "--quantization", "int8"])
    r = runner.invoke(bench_cli.bench_app, ["throughput", str(tmp_path), "-q", "fp8"])
    assert r.exit_code == 2 and "stop here" in r.output
    runner.invoke(bench_cli.bench_app, ["latency", str(tmp_path), "--quantization", "gguf"])
    runner.invoke(bench_cli.bench_app, ["throughput", str(tmp_path)])
    assert seen == ["int8", "fp8", "gguf", None]
