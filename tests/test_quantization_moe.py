"""Mixture-of-experts checkpoints whose routed experts stay quantized (Mixtral, Qwen2-MoE with its shared expert):
llmctl's greedy tokens and logprobs against transformers running the same dequantized weights in float32, the
routed experts' inputs fake-quantized per token by compressed-tensors where the scheme quantizes activations. The
experts' weights as their kernels compute them (the product with an identity) equal the format's own
decompressed or dequantized weights. Each case prints its top-1 agreement and largest logprob difference.

Tensor-parallel and expert-parallel ranks on the same kinds of checkpoints: tests/test_quantization_tensor_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from llmctl import LLM

from tests._engine_util import _single_thread  # noqa: F401  (module-wide one-thread fixture)
from tests.family_factory import make_family_model
from tests.quant_checkpoints import (
    _fake_quant,
    _linear_names,
    _load_state,
    activation_args,
    dense_checkpoint,
    fake_quantize_experts,
    write_awq,
    write_compressed_tensors_state,
    write_gptq,
)
from tests.test_quantization_e2e import ACT_QUANT_TOLERANCE, ENGINE, compare


def at_load(method: str):
    """``--quantization int8|fp8`` on the plain checkpoint: the dense weights are llmctl's own per-channel rule
    (MLA's kv_b_proj, read as a plain weight, stays as it is)."""
    from llmctl.quantization.load_time import quantize_fp8_per_channel, quantize_int8_per_channel

    quantize = quantize_int8_per_channel if method == "int8" else quantize_fp8_per_channel

    def write(base, out):
        state = _load_state(base)
        dense = {}
        for prefix in _linear_names(state):
            if prefix.endswith(".kv_b_proj"):
                continue
            q, s = quantize(state[prefix + ".weight"].float())
            dense[prefix] = q.float() * s
        return base, dense, activation_args("fp8") if method == "fp8" else None

    return write


def ct(preset: str, **args):
    return lambda b, o: write_compressed_tensors_state(b, o, preset, **args)


def gptq(bits: int, group: int, act_order: bool):
    return lambda b, o: (*write_gptq(b, o, bits, group, act_order), None)


def awq(group: int):
    return lambda b, o: (*write_awq(b, o, group), None)


# id -> (family, writer (base, out) -> (checkpoint, dense weights by checkpoint prefix, activation args), quantization)
# Qwen2-MoE's shared expert is 48 wide: group 16 (GPTQ, AWQ) or per channel (compressed-tensors' groups are 32+).
CASES = {
    "mixtral-ct-w4a16-g32": ("mixtral", ct("W4A16", group_size=32), None),
    "mixtral-ct-w8a16-asym-g64": ("mixtral", ct("W8A16", group_size=64, symmetric=False), None),
    "mixtral-ct-w8a8-int8": ("mixtral", ct("W8A8"), None),
    "mixtral-ct-fp8-dynamic": ("mixtral", ct("FP8_DYNAMIC"), None),
    "mixtral-gptq-4bit-g32-act-order": ("mixtral", gptq(4, 32, True), None),
    "mixtral-gptq-8bit-g64": ("mixtral", gptq(8, 64, False), None),
    "mixtral-awq-g32": ("mixtral", awq(32), None),
    "mixtral-int8-at-load": ("mixtral", at_load("int8"), "int8"),
    "mixtral-fp8-at-load": ("mixtral", at_load("fp8"), "fp8"),
    "qwen2_moe-ct-w4a16-asym-channel": ("qwen2_moe", ct("W4A16", strategy="channel", group_size=None,
                                                         symmetric=False), None),
    "qwen2_moe-ct-w8a8-int8": ("qwen2_moe", ct("W8A8"), None),
    "qwen2_moe-gptq-4bit-g16-act-order": ("qwen2_moe", gptq(4, 16, True), None),
    "qwen2_moe-awq-g16": ("qwen2_moe", awq(16), None),
    "qwen2_moe-fp8-at-load": ("qwen2_moe", at_load("fp8"), "fp8"),
    # DeepSeek-V2's MLA reads kv_b_proj's weight to absorb it: dequantized once at load, the other MLA projections
    # quantized (q_b_proj is 24 wide: per channel)
    "deepseek_v2-ct-w4a16-channel": ("deepseek_v2", ct("W4A16", strategy="channel", group_size=None), None),
    "deepseek_v2-int8-at-load": ("deepseek_v2", at_load("int8"), "int8"),
}
# Qwen2-MoE's layer 1 is a dense MLP (mlp_only_layers), DeepSeek-V2's layer 0 (first_k_dense_replace)
MOE_LAYERS = {"mixtral": 2, "qwen2_moe": 1, "deepseek_v2": 1}


@pytest.fixture(scope="module")
def family_dirs(model_cache_dir, test_tokenizer):
    dirs = {}
    for kind in MOE_LAYERS:
        out = model_cache_dir / f"family-{kind}"  # shared with the tensor-parallel tests
        if not (out / "model.safetensors").exists():
            make_family_model(kind, out, test_tokenizer)
        dirs[kind] = out
    return dirs


def oracle(base, dense, act_args, out):
    """transformers on the dense weights; with ``act_args`` every quantized layer's input fake-quantized per token
    (Qwen2-MoE's shared expert sees 2D inputs, which compressed-tensors' token strategy would take per element)."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(dense_checkpoint(base, out, dense), dtype=torch.float32).eval()
    if act_args is not None:
        for prefix in dense:
            try:
                module = hf.get_submodule(prefix)
            except AttributeError:  # a routed expert's projection: transformers holds them as 3D tensors
                continue
            module.forward = lambda x, plain=module.forward: plain(_fake_quant(x, act_args))
        fake_quantize_experts(hf, act_args)
    return hf


def expert_mismatches(model, dense: dict[str, torch.Tensor]) -> list[str]:
    """The quantized experts whose projections, as their kernels compute them, differ from the dense weights
    (float32 rounding of the format's scale and zero aside)."""
    from llmctl.models.moe import SparseMoE
    from llmctl.quantization.moe import run_parts

    expected = {name.rsplit(".", 1)[0]: w for name, w in
                model.canonical_weights((f"{prefix}.weight", w) for prefix, w in dense.items())}
    bad = []
    for prefix, m in model.named_modules():
        if not isinstance(m, SparseMoE):
            continue
        assert m.quant_method is not None, f"{prefix}: routed experts left dense"
        assert m.w13.numel() == 0 and m.w2.numel() == 0, f"{prefix}: dense experts still held"
        for e, (gate_up, down) in zip(m.local_experts(), m.quant_method.experts, strict=True):
            base = f"{prefix}.experts.{e}"
            want_gu = torch.cat([expected[f"{base}.gate_proj"], expected[f"{base}.up_proj"]])
            for name, parts, want in (("gate_up", gate_up, want_gu), ("down", down, expected[f"{base}.down_proj"])):
                got = run_parts(parts, torch.eye(want.shape[1])).t()
                if not torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0):
                    bad.append(f"{base}.{name}")
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_experts_match_transformers(family_dirs, tmp_path, case):
    kind, write, quant = CASES[case]
    path, dense, act_args = write(family_dirs[kind], tmp_path / "q")
    llm = LLM(str(path), quantization=quant, **ENGINE)
    model = llm.llm_engine.core.model
    summary = model.quant_summary.describe()
    assert f"routed experts of {MOE_LAYERS[kind]} MoE layers" in summary, summary
    assert expert_mismatches(model, dense) == []
    if kind == "deepseek_v2":  # every MLA projection but kv_b_proj runs quantized
        assert summary.startswith(f"{model.quant_summary.method}: 12 layers"), summary
        assert ("dequantized at load" in summary) == (quant is None), summary
    agreement, worst = compare(llm, oracle(family_dirs[kind], dense, act_args, tmp_path / "dense"), case)
    if act_args is None:  # the same weights, both in float32: only summation order differs
        assert agreement == 1.0 and worst < 1e-3
    else:  # a value on a rounding boundary of the activations' quantization may land on the other side
        assert agreement >= 0.95 and worst < ACT_QUANT_TOLERANCE


@pytest.mark.parametrize("rank", [None, 1], ids=["one-rank", "tp2-rank1"])
def test_packed_experts_unpack_to_exactly_the_quantized_values(rank):
    """GPTQ-packed experts (original format: stored zero = zero - 1) read through the MoE layer's loader come out as
    exactly the checkpoint's integers, scales and zeros in core's int4 layout; a tensor-parallel rank holds its
    intermediate columns of each expert: its rows of gate/up, its input columns (whole groups) of down."""
    from llmctl.models.base import ModelContext
    from llmctl.models.decoder import MoESpec
    from llmctl.models.moe import SparseMoE
    from llmctl.ops import Ops
    from llmctl.plugins.reference_attention import TorchReferenceAttention
    from llmctl.quantization.gptq_awq import GPTQConfig
    from llmctl.quantization.packing import pack_int32, unpack_nibbles
    from llmctl.tensor_parallel import TensorParallelGroup

    h, inter, experts, group = 64, 64, 2, 32
    tp = TensorParallelGroup() if rank is None else TensorParallelGroup(rank=rank, size=2)
    ctx = ModelContext(ops=Ops.reference(), attention=TorchReferenceAttention(), dtype=torch.float32,
                       device=torch.device("cpu"), tp=tp)
    moe = SparseMoE(h, MoESpec(experts, 2, inter), "silu", ctx)
    moe.quantize_experts(GPTQConfig(4, group, False, 1), "m")
    gen = torch.Generator().manual_seed(7)
    want = {}
    for e in range(experts):
        for proj, (n, k) in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            q = torch.randint(0, 16, (n, k), generator=gen)
            stored = torch.randint(0, 15, (k // group, n), generator=gen)
            scales = (torch.rand(k // group, n, generator=gen) + 0.5).half().float()
            want[e, proj] = (q, stored + 1, scales)
            for leaf, t in (("qweight", pack_int32(q.t(), 4, dim=0)), ("qzeros", pack_int32(stored, 4, dim=1)),
                            ("scales", scales), ("g_idx", (torch.arange(k) // group).to(torch.int32))):
                moe.load_expert_tensor(f"{e}.{proj}.{leaf}", t, f"m.experts.{e}.{proj}.{leaf}")
    assert moe.missing_expert_tensors("m.w13") == moe.missing_expert_tensors("m.w2") == []
    half = slice(None) if rank is None else slice(rank * inter // 2, (rank + 1) * inter // 2)
    for e, part in enumerate(moe.quant_method.finish(moe)):
        [gate_up], [down] = part.gate_up, part.down
        q, z, s = (torch.cat(t) for t in zip(*[(want[e, p][0][half], want[e, p][1].t()[half], want[e, p][2].t()[half])
                                               for p in ("gate_proj", "up_proj")], strict=True))
        assert torch.equal(unpack_nibbles(gate_up.weights["qweight"]).long(), q)
        assert torch.equal(gate_up.weights["scales"], s) and torch.equal(gate_up.weights["mins"], -s * z)
        q, z, s = want[e, "down_proj"]
        groups = slice(None) if rank is None else slice(rank * inter // 2 // group, (rank + 1) * inter // 2 // group)
        assert torch.equal(unpack_nibbles(down.weights["qweight"]).long(), q[:, half])
        assert torch.equal(down.weights["scales"], s.t()[:, groups])
        assert torch.equal(down.weights["mins"], -s.t()[:, groups] * z.t()[:, groups].float())


def test_dequantized_weight_matches_the_kernels_product():
    """A layer read as a plain weight after loading (MLA's kv_b_proj) gets what its quantized parts compute: a
    merged layer's parts stacked, an act-order part's input permutation undone."""
    from llmctl.layers.linear import Linear
    from llmctl.plugins.types import QuantLinearSpec
    from llmctl.quantization.base import QuantizedPart
    from llmctl.quantization.layers import dequantized_weight
    from llmctl.quantization.packing import groups_to_int4
    from llmctl.quantization.reference import reference_linear

    gen = torch.Generator().manual_seed(3)
    k, n4, n8, group = 32, 8, 6, 16
    int4 = groups_to_int4(torch.randint(0, 16, (n4, k), generator=gen), torch.rand(n4, k // group, generator=gen),
                          torch.randint(0, 16, (n4, k // group), generator=gen))
    int4["perm"] = torch.randperm(k, generator=gen)
    int8 = {"qweight": torch.randint(-127, 128, (n8, k), generator=gen, dtype=torch.int8),
            "scales": torch.rand(n8, 1, generator=gen)}
    parts = [QuantizedPart(QuantLinearSpec("int4", k, n4, 4, group, layer="m.kv_b_proj"), int4),
             QuantizedPart(QuantLinearSpec("int8", k, n8, 8, k, layer="m.kv_b_proj"), int8)]
    layer = Linear(k, n4 + n8, bias=False, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(5, k, generator=gen)
    want = torch.cat([reference_linear(x, p.weights, None, p.spec) for p in parts], dim=-1)
    torch.testing.assert_close(x @ dequantized_weight(parts, layer).t(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="m.kv_b_proj dequantizes to shape"):
        dequantized_weight(parts[:1], layer)
