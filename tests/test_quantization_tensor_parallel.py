"""Quantized checkpoints split over two tensor-parallel ranks on gloo: for every method, the ranks' greedy tokens
equal one rank's on the same checkpoint in float32. Column-parallel layers (q/k/v, gate/up) hold their rows of the
packed weights, scales and zeros; row-parallel ones (o_proj, down_proj) their input columns in whole groups and
blocks (GPTQ act-order layers regroup the rank's columns). One pair of rank processes serves every checkpoint in
turn while this process computes the single-rank references. Splits that would cut a group or a GGUF block are
refused before any rank starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from tests._engine_util import one_torch_thread
from tests.family_factory import make_family_model
from tests.model_factory import make_tiny_model
from tests.quant_checkpoints import (
    write_awq,
    write_compressed_tensors,
    write_compressed_tensors_state,
    write_family_gguf,
    write_gguf,
    write_gptq,
)
from tests.test_quantization_e2e import FAMILY_GGUF_TYPES
from tests.test_server_support import free_ports
from tests.tp_quant_rank import generate

REPO = Path(__file__).resolve().parent.parent

# Row-parallel layers (attn_output, ffn_down) in 32-value blocks: at tp=2 each rank holds 128 of 256 columns. The
# column-parallel ones take K-quants too (a rank holds whole rows), and the q/k/v of layer 0 mix three types.
GGUF_TP_TYPES = {
    "0.attn_q": "Q4_K", "0.attn_k": "Q6_K", "0.attn_v": "Q8_0", "0.attn_output": "Q4_0", "0.ffn_gate": "Q5_K",
    "0.ffn_up": "Q5_K", "0.ffn_down": "Q5_1",
    "1.attn_q": "Q2_K", "1.attn_k": "Q2_K", "1.attn_v": "Q2_K", "1.attn_output": "Q8_0", "1.ffn_gate": "Q4_1",
    "1.ffn_up": "Q4_1", "1.ffn_down": "Q5_0",
}

# id -> (checkpoint writer, quantization argument); the writers take (base, out dir, tokenizer)
CASES = {
    "ct-w4a16-g32": (lambda b, o, t: write_compressed_tensors(b, o, "W4A16", group_size=32)[0], None),
    "ct-w8a16-asym-g64": (lambda b, o, t: write_compressed_tensors(b, o, "W8A16", group_size=64,
                                                                   symmetric=False)[0], None),
    "ct-w8a8-int8": (lambda b, o, t: write_compressed_tensors(b, o, "W8A8")[0], None),
    "ct-fp8-static": (lambda b, o, t: write_compressed_tensors(b, o, "FP8")[0], None),
    "gptq-4bit-g32-act-order": (lambda b, o, t: write_gptq(b, o, 4, 32, True)[0], None),
    "gptq-8bit-g64": (lambda b, o, t: write_gptq(b, o, 8, 64, False)[0], None),
    "awq-g64": (lambda b, o, t: write_awq(b, o, 64)[0], None),
    "int8-at-load": (lambda b, o, t: b, "int8"),
    "fp8-at-load": (lambda b, o, t: b, "fp8"),
    "gguf": (lambda b, o, t: write_gguf(o / "tiny.gguf", t, GGUF_TP_TYPES, hidden=256, ffn=256), "gguf"),
}


# The other decoder families, each on the split its layout needs: Phi-3's fused qkv_proj/gate_up_proj cut where a
# GPTQ tensor's outputs run (columns, packed words of qzeros); GPT-NeoX's per-head q/k/v de-interleaved along a
# compressed-tensors tensor's outputs (rows, packed zero points, weight_shape per part); BLOOM's with act-order
# GPTQ (g_idx shared by q/k/v); Gemma 2 with AWQ; GPT-2's Conv1D quantized at load; Qwen2-MoE quantized at load
# with its experts placed whole per rank (expert parallelism) while its shared expert and dense layer split. Mixtral's
# routed experts stay quantized: split by their intermediate columns (compressed-tensors groups, GPTQ act-order down
# projections regrouped per rank, fp8 scales over the whole down row) or placed whole per rank (AWQ, and Qwen2-MoE's
# int8 W8A8 experts next to its split shared expert). Gemma 2 and Phi-3 GGUFs kept quantized (blocks of 32: a rank
# reads its rows, or its whole blocks of each row; Phi-3's fused attn_qkv and gate/up ffn_up its rows of each part).
# id -> (family, writer -> (checkpoint, dense weights by checkpoint prefix or None), quantization, case extras)
FAMILY_CASES = {
    "phi3-gptq-4bit-g32": ("phi3", lambda b, o: write_gptq(b, o, 4, 32, False), None, {}),
    "gpt_neox-ct-w4a16-asym-g32": ("gpt_neox", lambda b, o: write_compressed_tensors(
        b, o, "W4A16", group_size=32, symmetric=False)[:2], None, {}),
    "bloom-gptq-8bit-g32-act-order": ("bloom", lambda b, o: write_gptq(b, o, 8, 32, True), None, {}),
    "gemma2-awq-g32": ("gemma2", lambda b, o: write_awq(b, o, 32), None, {}),
    "gpt2-int8-at-load": ("gpt2", lambda b, o: (b, None), "int8", {}),
    "qwen2_moe-int8-at-load-ep": ("qwen2_moe", lambda b, o: (b, None), "int8", {"ep": True}),
    "gemma2-gguf": ("gemma2", lambda b, o: (write_family_gguf(b, o, "gemma2", FAMILY_GGUF_TYPES), None), None, {}),
    "phi3-gguf": ("phi3", lambda b, o: (write_family_gguf(b, o, "phi3", FAMILY_GGUF_TYPES), None), None, {}),
    "mixtral-ct-w4a16-g32": ("mixtral", lambda b, o: write_compressed_tensors_state(b, o, "W4A16",
                                                                                   group_size=32)[:2], None, {}),
    "mixtral-gptq-4bit-g32-act-order": ("mixtral", lambda b, o: write_gptq(b, o, 4, 32, True), None, {}),
    "mixtral-fp8-at-load": ("mixtral", lambda b, o: (b, None), "fp8", {}),
    "mixtral-awq-g32-ep": ("mixtral", lambda b, o: write_awq(b, o, 32), None, {"ep": True}),
    "qwen2_moe-ct-w8a8-int8-ep": ("qwen2_moe", lambda b, o: write_compressed_tensors_state(b, o, "W8A8")[:2], None,
                                  {"ep": True}),
}

# Pipeline stages of the same checkpoints (one layer each): a stage quantizes its own layers and leaves the other's
# tensors unread. id -> the case whose checkpoint, quantization and single-rank reference it shares.
PP_CASES = {"gguf-pp2": "gguf", "ct-w4a16-g32-pp2": "ct-w4a16-g32"}

# Methods that quantize activations per token. A row-parallel rank quantizes its slice of the layer's input (as
# vLLM does), a finer rounding than one rank's over the whole row, which moves these tiny random models' logprobs by
# tenths: their single-rank reference quantizes o_proj's and down_proj's inputs per half row the same way.
ACTIVATION_QUANT = {"ct-w8a8-int8", "fp8-at-load", "mixtral-fp8-at-load", "qwen2_moe-ct-w8a8-int8-ep"}


@contextmanager
def activations_quantized_per_rank_slice(ranks: int = 2, whole_experts: bool = False):
    """Every quantized layer on core's reference kernel, whose row-parallel layers (o_proj, down_proj) compute
    their matmul as ``ranks`` partial sums over slices of the input, each quantized by itself; routed experts'
    down projections too, unless expert parallelism holds them whole (``whole_experts``)."""
    import dataclasses

    import llmctl.quantization.layers as qlayers
    import llmctl.quantization.reference as qref

    plain = qref.reference_linear

    def per_slice(x, weights, bias, spec):
        if not spec.layer.endswith(("o_proj", "down_proj")) or spec.act is None or (
                whole_experts and ".experts." in spec.layer):
            return plain(x, weights, bias, spec)
        k = spec.in_features // ranks
        part = dataclasses.replace(spec, in_features=k)
        out = sum(plain(x[..., r * k:(r + 1) * k], {**weights, "qweight": weights["qweight"][:, r * k:(r + 1) * k]},
                        None, part) for r in range(ranks))
        return out if bias is None else out + bias

    def reference_only(registry, platform, spec, dtype):
        return qref.ReferenceQuantKernel(spec.format), []

    saved = qref.reference_linear, qlayers.select_kernel
    qref.reference_linear, qlayers.select_kernel = per_slice, reference_only
    try:
        yield
    finally:
        qref.reference_linear, qlayers.select_kernel = saved


def dequantized_mismatches(model, dense: dict[str, torch.Tensor]) -> list[str]:
    """The quantized layers whose weight, as their kernel computes it (the product with an identity), differs from
    the checkpoint's dense weights mapped onto the model's layers by its own renames and transforms: a fused
    tensor cut at the wrong place (or de-interleaved along the wrong dim) fails here even if every rank cut it
    alike."""
    from llmctl.layers.linear import Linear
    from llmctl.quantization.layers import shard_names

    expected = {name.rsplit(".", 1)[0]: w for name, w in
                model.canonical_weights((f"{prefix}.weight", w) for prefix, w in dense.items())}
    bad = []
    for prefix, m in model.named_modules():
        if not isinstance(m, Linear) or not getattr(m, "quant_parts", None):
            continue
        want = expected.get(prefix)
        if want is None:
            want = torch.cat([expected[n] for n in shard_names(model, prefix, m)])
        got = m._linear(torch.eye(m.in_features), None, None).t()
        if not torch.allclose(got, want.float(), atol=1e-4, rtol=1e-4):
            bad.append(prefix)
    return bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_cache_dir, test_tokenizer):
    """(single-rank outputs, each rank's results, each family case's dequantized mismatches) by case id."""
    root = tmp_path_factory.mktemp("quant_tp")
    base = make_tiny_model("llama", root / "base", test_tokenizer, hidden_size=128, intermediate_size=256)
    models, dense, extras = {}, {}, {}
    for cid, (write, quant) in CASES.items():
        (root / cid).mkdir()
        models[cid] = (str(write(base, root / cid, test_tokenizer)), quant)
    for cid, (kind, write, quant, extra) in FAMILY_CASES.items():
        family = model_cache_dir / f"family-{kind}"  # test_tensor_parallel_families' checkpoint, if made already
        if not (family / "model.safetensors").exists():
            make_family_model(kind, family, test_tokenizer)
        path, dense[cid] = write(family, root / cid)
        models[cid], extras[cid] = (str(path), quant), extra
    ports = iter(free_ports(len(models) + len(PP_CASES)))
    cases = [{"id": cid, "model": m, "quantization": q, "port": next(ports), **extras.get(cid, {})}
             for cid, (m, q) in models.items()]
    cases += [{"id": cid, "model": models[base][0], "quantization": models[base][1], "port": next(ports), "tp": 1,
               "pp": 2} for cid, base in PP_CASES.items()]
    (root / "cases.json").write_text(json.dumps(cases))
    procs, outs = [], []
    for rank in range(2):
        out = root / f"rank{rank}.json"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tp_quant_rank", str(root / "cases.json"),
                                       str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
        outs.append(out)
    try:
        from llmctl import LLM

        refs, mismatches = {}, {}
        with one_torch_thread():  # while the ranks run
            for cid, (model, quant) in models.items():
                with activations_quantized_per_rank_slice(whole_experts=extras.get(cid, {}).get("ep", False)) \
                        if cid in ACTIVATION_QUANT else nullcontext():
                    llm = LLM(model, quantization=quant, dtype="float32", num_threads=1, seed=0,
                              max_model_len=128, kv_cache_memory=8 << 20)
                    refs[cid] = generate(llm)
                if dense.get(cid) is not None:
                    mismatches[cid] = dequantized_mismatches(llm.llm_engine.core.model, dense[cid])
                llm.llm_engine.shutdown()
        logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return refs, [json.loads(out.read_text()) for out in outs], mismatches


@pytest.mark.parametrize("case", list(CASES) + list(FAMILY_CASES) + list(PP_CASES))
def test_tp2_greedy_tokens_equal_tp1(runs, case):
    refs, ranks, mismatches = runs
    assert mismatches.get(case, []) == [], "one rank's dequantized layers differ from the checkpoint's dense weights"
    for rank, results in enumerate(ranks):
        got = results[case]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        for g, w in zip(got["outputs"], refs[PP_CASES.get(case, case)], strict=True):  # only summation order differs
            assert g["tokens"] == w["tokens"], (rank, got["kernels"])
            torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-3, rtol=0)


# -- refusals: before any rank starts, naming the layer, the unit and the size ------------------------------------
def test_group_that_does_not_divide_a_ranks_inputs_is_refused(tmp_path, test_tokenizer):
    from llmctl import LLM

    base = make_tiny_model("llama", tmp_path / "base", test_tokenizer, hidden_size=128, intermediate_size=256)
    path, _ = write_gptq(base, tmp_path / "gptq", 4, 128, False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 splits layer model\.layers\.0\.self_attn\.o_proj "
                                         r"by its 128 input columns, 64 per rank, which is not a multiple of the "
                                         r"gptq group_size=128"):
        LLM(str(path), tensor_parallel_size=2, distributed_executor_backend="external_launcher", num_threads=1)


def test_gguf_block_that_a_split_would_cut_is_refused(tmp_path, test_tokenizer):
    from llmctl import LLM

    types = {**GGUF_TP_TYPES, "1.ffn_down": "Q6_K"}  # 256-value super-blocks, 128 input columns per rank
    path = write_gguf(tmp_path / "tiny.gguf", test_tokenizer, types, hidden=256, ffn=256)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.down_proj by its 256 input columns, 128 per "
                                         r"rank, which is not a multiple of the gguf Q6_K block=256 .* or set "
                                         r"quantization to none"):
        LLM(str(path), quantization="gguf", tensor_parallel_size=2, distributed_executor_backend="external_launcher",
            num_threads=1)


def test_layers_refuse_cutting_groups_and_packed_words_themselves():
    """The layers check again as they are built (for models the start-up check does not know)."""
    from llmctl.layers.parallel import MergedColumnParallelLinear, RowParallelLinear
    from llmctl.quantization.gptq_awq import GPTQLinear
    from llmctl.tensor_parallel import TensorParallelGroup

    tp = TensorParallelGroup(rank=1, size=2)
    row = RowParallelLinear(96, 64, bias=False, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
    with pytest.raises(ValueError, match=r"splits layer x\.down by its 96 input columns, 48 per rank, which is "
                                         r"not a multiple of the gptq group_size=32"):
        row.set_quantizer(GPTQLinear("x.down", 4, 32, 1))
    col = MergedColumnParallelLinear(64, [8, 8], bias=False, dtype=torch.float32, device=torch.device("cpu"), tp=tp)
    with pytest.raises(ValueError, match=r"gives layer x\.gate_up 4 output rows per projection and rank, which is "
                                         r"not a multiple of the 8 values one gptq qzeros word packs"):
        col.set_quantizer(GPTQLinear("x.gate_up", 4, 32, 1))


def test_gguf_rank_reads_its_rows_and_blocks_from_the_map():
    """A rank's rows come out of the map in Hugging Face order (llama.cpp's q/k interleave undone) and its input
    columns as whole blocks, equal to the same part of the whole tensor."""
    import numpy as np
    from llmctl.loader.gguf_hf import LazyBlocks, _unpermute_rows

    blocks = np.arange(16 * 36, dtype=np.uint8).reshape(16, 36)
    blocks.setflags(write=False)
    lazy = LazyBlocks(blocks, n_head=2)
    whole = torch.from_numpy(_unpermute_rows(blocks, 2).copy())
    assert torch.equal(lazy.read(), whole)
    assert torch.equal(lazy.read_slice(0, 8, 8), whole[8:])
    assert torch.equal(lazy.read_slice(1, 18, 18), whole[:, 18:])


@pytest.mark.parametrize(("bits", "wrapped_zero"), [(4, False), (4, True), (8, False)],
                         ids=["4bit", "4bit-zero-16", "8bit"])
def test_act_order_rank_regroups_its_columns(bits, wrapped_zero):
    """A row-parallel rank of an act-order layer (its columns from every group) computes exactly its part of the
    product, padded slots included; a 4-bit zero point of 16, which has no 4-bit code, moves the layer to int8."""
    from llmctl.layers.parallel import RowParallelLinear
    from llmctl.quantization.gptq_awq import GPTQLinear
    from llmctl.quantization.packing import pack_int32
    from llmctl.quantization.reference import reference_linear
    from llmctl.tensor_parallel import TensorParallelGroup

    k, n, group, k0 = 256, 16, 64, 128  # rank 1 of 2 holds columns 128..255
    gen = torch.Generator().manual_seed(bits + wrapped_zero)
    qmax = (1 << bits) - 1
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)]
    q = torch.randint(0, qmax + 1, (n, k), generator=gen)
    stored_zeros = torch.randint(0, qmax, (k // group, n), generator=gen)  # the original format: zero - 1
    if wrapped_zero:
        stored_zeros[:, 3] = qmax
    scales = torch.rand(k // group, n, generator=gen) + 0.5
    layer = RowParallelLinear(k, n, bias=False, dtype=torch.float32, device=torch.device("cpu"),
                              tp=TensorParallelGroup(rank=1, size=2))
    quantizer = GPTQLinear("x.down", bits, group, 1, desc_act=True)
    layer.set_quantizer(quantizer)
    layer.qweight.data.copy_(pack_int32(q[:, k0:].t(), bits, dim=0))
    layer.qzeros.data.copy_(pack_int32(stored_zeros, bits, dim=1))  # every group's, whole
    layer.scales.data.copy_(scales)
    layer.g_idx.data.copy_(g_idx[k0:].to(torch.int32))
    [part] = quantizer.finish(layer)
    assert part.spec.format == ("int8" if bits == 8 or wrapped_zero else "int4")
    assert part.spec.in_features == len(part.weights["perm"]) > k - k0  # wider than the rank's columns: padded
    zeros = stored_zeros + 1
    dense = scales[g_idx].t() * (q - zeros[g_idx].t())  # [N, K], the whole layer
    x = torch.randn(3, k - k0, generator=gen)
    bound = float(x.abs().sum(-1).max() * dense.abs().max())  # float32 rounding of sums this large
    torch.testing.assert_close(reference_linear(x, part.weights, None, part.spec), x @ dense[:, k0:].t(),
                               atol=1e-6 * bound, rtol=1e-5)


def test_expert_group_that_a_split_would_cut_is_refused_unless_experts_stay_whole():
    """Routed experts split by their intermediate columns: a GPTQ group wider than a rank's columns of the down
    projection is refused before any rank starts, naming the expert; expert parallelism holds experts whole."""
    from llmctl.models.decoder import DecoderForCausalLM
    from llmctl.quantization.gptq_awq import GPTQConfig
    from transformers import MixtralConfig

    class Mixtral(DecoderForCausalLM):
        family = "mixtral"

    cfg = MixtralConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    gptq = GPTQConfig(4, 128, False, 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 splits layer model\.layers\.0\.mlp\.experts\.0\."
                                         r"down_proj by its 128 input columns, 64 per rank, which is not a multiple "
                                         r"of the gptq group_size=128"):
        Mixtral.check_tensor_parallel(cfg, 2, gptq)
    Mixtral.check_tensor_parallel(cfg, 2, gptq, expert_parallel=True)
