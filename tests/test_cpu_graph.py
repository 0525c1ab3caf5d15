"""The CPU plugin's recorded decode steps (``llmctl_cpu.graph``): replayed steps must give the eager step's bits,
steps the recorder cannot repeat must run eagerly, and bad inputs must fail loudly instead of reading past a
buffer."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.attention import AttentionMetadata
from llmctl.ops.paged_attention import paged_attention_reference
from llmctl_cpu import graph, native
from llmctl_cpu.attention import CpuSdpaAttention
from llmctl_cpu.platform import CpuPlatform

from tests._engine_util import assert_all_blocks_free, one_torch_thread
from tests.test_cpu_plugin import make_batch

LIB = native.kernels()
BF16 = LIB is not None and LIB.has_gemm_bf16 and torch.bfloat16 in CpuPlatform().supported_dtypes()
needs_native = pytest.mark.skipif(LIB is None, reason="CPU kernels not built here")
needs_bf16 = pytest.mark.skipif(not BF16, reason="no native bf16 kernels on this CPU")
KV = 8 << 20


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


def _run(model_dir, eager: bool, prompts, params, **kw):
    llm = LLM(str(model_dir), dtype="bfloat16", enforce_eager=eager, kv_cache_memory=KV, num_threads=1, **kw)
    runner = llm.llm_engine.core.runner.decode_runner
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(llm.llm_engine.core.get_stats())
    return runner, [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


@needs_bf16
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_replayed_decodes_equal_eager_bits(tiny_model_dirs, kind):
    """Tokens and logprobs of a replayed run equal the eager run's exactly: batches shrink as requests finish at
    different lengths (replays at many sizes, one recording), a sliding window (mistral) and qkv biases (qwen2)."""
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(5, 200) for _ in range(rng.randint(3, 40))]} for _ in range(9)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(5, 40), ignore_eos=True, logprobs=3)
              for _ in prompts]
    _, eager = _run(tiny_model_dirs[kind], True, prompts, params, max_num_seqs=6)
    runner, replayed = _run(tiny_model_dirs[kind], False, prompts, params, max_num_seqs=6)
    assert isinstance(runner, graph.CpuDecodeGraphRunner) and runner.program is not None, runner
    assert runner.max_batch == 6
    assert replayed == eager


@needs_native
def test_steps_with_torch_ops_are_not_recorded(tiny_model_dirs, caplog, monkeypatch):
    """float32 linears pinned to oneDNN (torch ops): the recorder refuses the step, says why, and the engine decodes
    eagerly with the same results as with enforce_eager."""
    from llmctl_cpu import f32_linear

    monkeypatch.setenv(f32_linear.PATH_ENV, "onednn")
    caplog.set_level(logging.INFO)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(tiny_model_dirs["llama"]), dtype="float32", kv_cache_memory=KV, num_threads=1)
    assert llm.llm_engine.core.runner.decode_runner is None
    assert "captured no batch size: the decode step runs torch op aten." in caplog.text
    eager = LLM(str(tiny_model_dirs["llama"]), dtype="float32", kv_cache_memory=KV, num_threads=1,
                enforce_eager=True)
    assert (llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
            == eager.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pack", ["pack_wq_panels", "pack_wq_act8"])
def test_quantized_panel_gemm_is_recorded_and_replayed_at_fewer_rows(dtype, pack):
    """quant.c's weight-only panel GEMMs (another library; float activations, or int8 ones for GGUF layers) are
    recordable calls: the record holds the address, and a replay at fewer rows writes what a direct call at that row
    count writes."""
    from llmctl_cpu.quant import quant_kernels

    qlib, lib = quant_kernels(), native.kernels()
    if qlib is None or not qlib.has_avx2:
        pytest.skip("the panel GEMM is the AVX2 + FMA build's")
    n, k = 40, 64
    panels = getattr(qlib, pack)(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), 4, torch.rand(n, 2),
                                 -torch.rand(n, 2), 32)
    bias = torch.randn(n)
    x = torch.randn(6, k).to(dtype)
    calls: list = []
    with lib.recording(calls):
        y = qlib.gemm_wq_panels(x, panels, 4, 32, bias, n)
    assert [code for code, _ in calls] == [native.OPCODES["QUANT_GEMM_WQ"]]
    program = torch.tensor([native.encode_call(code, args) for code, args in calls], dtype=torch.int64)
    y.fill_(float("nan"))
    x[:3] = torch.randn(3, k).to(dtype)
    assert lib.run_program(program, 3) == (-1, 0)
    assert torch.equal(y[:3], qlib.gemm_wq_panels(x[:3], panels, 4, 32, bias, n))
    assert torch.isnan(y[3:]).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_gate_up_with_silu_and_mul_is_recorded(dtype):
    """A quantized gate/up projection's GEMM and its SiLU-and-mul are both recorded calls (torch's silu and mul would
    stop the recording of every kept-quantized model's step), and replay at fewer rows as direct calls do."""
    from llmctl.plugins.types import QuantLinearSpec
    from llmctl.quantization.packing import pack_nibbles
    from llmctl_cpu.quant import CpuInt4Kernel, quant_kernels

    if quant_kernels() is None or not quant_kernels().has_avx2:
        pytest.skip("the panel GEMM is the AVX2 + FMA build's")
    n, k = 64, 64
    spec = QuantLinearSpec(format="int4", in_features=k, out_features=n, bits=4, group_size=32)
    kernel = CpuInt4Kernel()
    weights = kernel.process_weights({"qweight": pack_nibbles(torch.randint(0, 16, (n, k), dtype=torch.uint8)),
                                      "scales": torch.rand(n, 2) * 0.1, "mins": -torch.rand(n, 2)}, spec)
    assert kernel.fuses_silu_and_mul(weights, spec)
    x = torch.randn(6, k).to(dtype)
    calls: list = []
    # The kernels the product calls now (another test file may have reloaded them since this module's LIB).
    lib = native.kernels()
    recorder = graph._StepRecorder(lib)  # keeps the intermediate [6, n] alive (the replay writes into it), as a
    with lib.recording(calls), recorder:  # recorded step does, and refuses any torch op that computes
        out = kernel.apply_silu_and_mul(x, weights, None, spec)
    assert [code for code, _ in calls] == [native.OPCODES["QUANT_GEMM_WQ"], native.OPCODES["SILU_AND_MUL"]]
    program = torch.tensor([native.encode_call(code, args) for code, args in calls], dtype=torch.int64)
    out.fill_(float("nan"))
    x[:3] = torch.randn(3, k).to(dtype)
    assert lib.run_program(program, 3) == (-1, 0)
    assert torch.equal(out[:3], kernel.apply_silu_and_mul(x[:3], weights, None, spec))
    assert torch.isnan(out[3:]).all()


@needs_native
def test_float32_gemm_is_recorded_and_replayed_at_fewer_rows():
    """The float32 C GEMM is a recordable kernel: a recorded call replays at any row count up to the recorded one
    and writes what a direct call at that row count writes."""
    lib = native.kernels()
    if not lib.has_gemm_f32:
        pytest.skip("the float32 C GEMM needs AVX2 + FMA")
    weight, bias = torch.randn(40, 24), torch.randn(40)
    panels = lib.pack_f32_panels(weight)
    x = torch.randn(6, 24)
    calls: list = []
    with lib.recording(calls):
        y = lib.gemm_f32(x, panels, 40, bias)
    assert [code for code, _ in calls] == [native.OP_GEMM_F32]
    program = torch.tensor([native.encode_call(code, args) for code, args in calls], dtype=torch.int64)
    y.fill_(float("nan"))
    x[:3] = torch.randn(3, 24)
    assert lib.run_program(program, 3) == (-1, 0)
    assert torch.equal(y[:3], lib.gemm_f32(x[:3], panels, 40, bias))
    assert torch.isnan(y[3:]).all()


@needs_bf16
def test_replay_rejects_out_of_range_inputs(tiny_model_dirs):
    """The replay keeps the kernels' own range checks: a block id past the cache, a slot past it or a token id
    past the vocabulary raises and names the failing kernel call instead of touching memory it does not own."""
    llm = LLM(str(tiny_model_dirs["llama"]), dtype="bfloat16", kv_cache_memory=KV, num_threads=1, max_num_seqs=4)
    core = llm.llm_engine.core
    runner = core.runner.decode_runner
    assert isinstance(runner, graph.CpuDecodeGraphRunner)
    blocks = core.cache_config.num_blocks

    def inputs(**over):
        good = dict(input_ids=torch.tensor([3, 4]), positions=torch.tensor([0, 0]),
                    slot_mapping=torch.tensor([16, 32]), seq_lens=torch.tensor([1, 1], dtype=torch.int32),
                    block_tables=torch.tensor([[1], [2]], dtype=torch.int32))
        good.update(over)
        return good

    assert runner.run(**inputs()).shape[0] == 2
    with pytest.raises(RuntimeError, match=r"decode graph: kernel call \d+ \(decode_attention\)"):
        runner.run(**inputs(block_tables=torch.tensor([[1], [blocks + 5]], dtype=torch.int32)))
    with pytest.raises(RuntimeError, match=r"\(write_kv\)"):
        runner.run(**inputs(slot_mapping=torch.tensor([16, blocks * 16])))
    with pytest.raises(RuntimeError, match=r"kernel call 0 \(gather_rows\)"):
        runner.run(**inputs(input_ids=torch.tensor([3, 10 ** 6])))
    with pytest.raises(ValueError, match="batch of 5 sequences, recorded for 1..4"):
        runner.run(**{k: torch.cat([v] * 3)[:5] for k, v in inputs().items()})
    assert runner.padded_size(4) == 4 and runner.padded_size(5) is None and runner.padded_size(0) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_length_rows_get_zero_output(dtype):
    """A captured step's padded rows are sequences of length 0 (the graph contract): the C kernel gives them a
    zero output and leaves the other rows as the reference computes them."""
    rng = random.Random(3)
    specs = [(rng.randint(0, 60), 1) for _ in range(5)]
    query, cache, md = make_batch(rng, specs, 16, 2, 6, 64, dtype)
    seq_lens = md.seq_lens.clone()
    seq_lens[[1, 3]] = 0
    padded = AttentionMetadata(
        num_tokens=md.num_tokens, num_seqs=md.num_seqs, query_start_loc=md.query_start_loc, seq_lens=seq_lens,
        block_tables=md.block_tables, slot_mapping=md.slot_mapping, max_query_len=1, max_seq_len=md.max_seq_len,
        block_size=16, query_lens_cpu=None, seq_lens_cpu=None)
    got = CpuSdpaAttention().forward(query, cache, padded, 0.125, out=torch.full_like(query, float("nan")))
    expect = paged_attention_reference(query, cache, md, 0.125)
    assert torch.equal(got[[1, 3]], torch.zeros_like(got[[1, 3]]))
    keep = [0, 2, 4]
    torch.testing.assert_close(got[keep].float(), expect[keep].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_capped_decode_attention_is_recorded_and_replayed(dtype):
    """Gemma 2's capped attention records as its own opcode (scale and cap read from memory) and replays to the
    bits of a direct call, at the recorded rows and at fewer."""
    lib = native.kernels()
    if lib is None:
        pytest.skip("the C kernels are not built")
    rng = random.Random(5)
    query, cache, md = make_batch(rng, [(rng.randint(10, 90), 1) for _ in range(5)], 16, 2, 4, 64, dtype)
    backend = CpuSdpaAttention()
    out = torch.empty_like(query)
    calls: list = []
    with lib.recording(calls):
        backend.forward(query, cache, md, 0.125, None, out=out, logits_soft_cap=2.0)
    assert [code for code, _ in calls] == [native.OPCODES["DECODE_ATTENTION_CAPPED"]]
    expect = out.clone()
    torch.testing.assert_close(expect.float(), paged_attention_reference(query, cache, md, 0.125,
                                                                         logits_soft_cap=2.0).float(),
                               atol=2e-2, rtol=2e-2)
    program = torch.tensor([native.encode_call(code, args) for code, args in calls], dtype=torch.int64)
    for rows in (5, 2):
        out.fill_(float("nan"))
        assert lib.run_program(program, rows) == (-1, 0)
        assert torch.equal(out[:rows], expect[:rows]) and torch.isnan(out[rows:]).all()


def test_program_encoding():
    words = native.encode_call(native.OP_RMS_NORM, (1, 2, 3, None, 0, None, 0, 4, 5, 6, 7, 8, 0.5, 2))
    assert len(words) == native.PROGRAM_SLOTS and words[0] == native.OP_RMS_NORM
    assert words[4] == 0 and words[13] == 0x3F000000  # None -> 0; eps 0.5 as float32 bits
    with pytest.raises(TypeError, match="argument 1 is str"):
        native.encode_call(native.OP_GEMM, (1, "x"))
    with pytest.raises(ValueError, match="do not fit"):
        native.encode_call(native.OP_GEMM, tuple(range(30)))
