"""8-bit KV caches (``kv_cache_dtype``): the argument, the quantization's reference, the block budget, and the engine's
promises in that dtype (agreement with the full-precision cache, prefix caching, preemption, batch invariance).

Agreement figures are printed (run with ``-s``) and recorded in docs/quantization.md."""

from __future__ import annotations

import json
import random

import pytest
import torch
from llmctl import LLM, SamplingParams
from llmctl.config import EngineArgs
from llmctl.kv.cache_dtype import (
    KV_CACHE_DTYPES,
    QMAX,
    dequantize_rows,
    kv_row_width,
    kv_storage_dtype,
    pack_rows,
    quantize_rows,
    row_scales,
)
from llmctl.ops.paged_attention import paged_attention_reference, write_kv_reference

from tests._engine_util import _single_thread, assert_all_blocks_free  # noqa: F401

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
PROMPTS = [f"Request {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 37))
           for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
EIGHT_BIT = ("int8", "fp8_e4m3", "fp8_e5m2")


# -- the argument ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["fp16", "int4", "", "FP9", 8, "e4m3"])
def test_bad_kv_cache_dtype_names_the_field_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"kv_cache_dtype: must be one of auto, fp8, fp8_e4m3, fp8_e5m2, int8"):
        EngineArgs(model="m", kv_cache_dtype=bad)


def test_kv_cache_dtype_names_map_to_storage():
    assert EngineArgs(model="m").kv_cache_dtype == "auto"
    assert EngineArgs(model="m", kv_cache_dtype="FP8").kv_cache_dtype == "fp8"
    assert kv_storage_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_storage_dtype("fp8", torch.bfloat16) is torch.float8_e4m3fn
    assert kv_storage_dtype("fp8_e4m3", torch.float32) is torch.float8_e4m3fn
    assert kv_storage_dtype("fp8_e5m2", torch.float32) is torch.float8_e5m2
    assert kv_storage_dtype("int8", torch.float16) is torch.int8
    assert set(KV_CACHE_DTYPES) == {"auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8"}


# -- the reference quantization ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EIGHT_BIT)
def test_quantized_rows_round_trip_within_the_format(name):
    dtype = kv_storage_dtype(name, torch.float32)
    x = torch.randn(7, 3, 64) * torch.logspace(-3, 2, 7)[:, None, None]
    x[2, 1] = 0.0  # an all-zero head row
    codes, scale = quantize_rows(x, dtype)
    assert codes.dtype is dtype and scale.shape == (7, 3)
    back = codes.float() * scale[..., None]
    amax = x.abs().amax(-1)
    # the row's largest element sits at the top of the range, so it comes back exactly (up to the scale's rounding)
    assert torch.allclose(codes.float().abs().amax(-1)[amax > 0], torch.tensor(QMAX[dtype]))
    step = {torch.int8: 0.5 / 127, torch.float8_e4m3fn: 2 ** -4, torch.float8_e5m2: 2 ** -3}[dtype]
    err = (back - x).abs()
    bound = (amax[..., None] * step if dtype is torch.int8 else x.abs() * step + amax[..., None] * 2 ** -16) * 1.001
    assert (err <= bound + 1e-30).all(), float((err - bound).max())
    assert torch.equal(back[2, 1], torch.zeros(64))
    packed = pack_rows(x, dtype)
    assert packed.shape == (7, 3, 64 + 4) and packed.dtype is dtype
    assert torch.equal(row_scales(packed), scale)
    assert torch.equal(dequantize_rows(packed), back)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_reference_attention_reads_what_it_wrote(name):
    """The oracle in an 8-bit dtype is attention over the dequantized values: written through write_kv_reference into
    a paged cache with shuffled blocks, and read back as the same float32 rows a full-precision cache would hold."""
    rng = random.Random(3)
    torch.manual_seed(3)  # the draws below, whatever ran before in this process
    dtype = kv_storage_dtype(name, torch.float32)
    block_size, kv_heads, heads, d = 16, 2, 6, 64
    specs = [(0, 13), (37, 1), (20, 9), (64, 1)]
    from tests.test_cpu_plugin import make_batch

    query, cache, md = make_batch(rng, specs, block_size, kv_heads, heads, d, torch.float32)
    q8 = torch.zeros(*cache.shape[:-1], kv_row_width(d, dtype), dtype=dtype)
    full = torch.zeros_like(cache)
    # every context slot: the sequences' whole prefixes are (re)written so both caches hold the same tokens
    slots = []
    for i, (ctx, ql) in enumerate(specs):
        table = md.block_tables[i]
        slots += [int(table[p // block_size]) * block_size + p % block_size for p in range(ctx + ql)]
    slot_t = torch.tensor(slots)
    k_all, v_all = torch.randn(len(slots), kv_heads, d), torch.randn(len(slots), kv_heads, d)
    write_kv_reference(k_all, v_all, q8, slot_t)
    write_kv_reference(dequantize_rows(pack_rows(k_all, dtype)), dequantize_rows(pack_rows(v_all, dtype)), full,
                       slot_t)
    got = paged_attention_reference(query, q8, md, d ** -0.5)
    want = paged_attention_reference(query, full, md, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    exact = paged_attention_reference(query, _full_cache(k_all, v_all, cache, slot_t), md, d ** -0.5)
    tol = {"int8": 0.03, "fp8_e4m3": 0.15, "fp8_e5m2": 0.3}[name]
    assert (got - exact).abs().max() < tol


def _full_cache(k, v, like, slots):
    cache = torch.zeros_like(like)
    write_kv_reference(k, v, cache, slots)
    return cache


# -- the engine --------------------------------------------------------------------------------------------------------

def _bytes_per_block(model_dir, elem: int, row_extra: int = 0, block_size: int = 16) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * (head + row_extra) * elem


def _engine(model_dir, kv_cache_dtype: str, blocks: int, dtype: str = "bfloat16", **kw) -> LLM:
    """An engine whose KV budget is ``blocks`` blocks of a cache in the model's ``dtype``."""
    elem = 4 if dtype == "float32" else 2
    return LLM(str(model_dir), dtype=dtype, num_threads=1, kv_cache_dtype=kv_cache_dtype,
               kv_cache_memory=blocks * _bytes_per_block(model_dir, elem), **kw)


def test_kv_budget_counts_scales_and_gives_about_twice_the_blocks(tiny_llama_dir):
    bf16 = _engine(tiny_llama_dir, "auto", 40, attention_backend="torch-reference")
    q8 = _engine(tiny_llama_dir, "int8", 40, attention_backend="torch-reference")
    n16, n8 = bf16.get_stats()["kv_blocks_total"], q8.get_stats()["kv_blocks_total"]
    assert n16 == 40
    budget = 40 * _bytes_per_block(tiny_llama_dir, 2)
    assert n8 == budget // _bytes_per_block(tiny_llama_dir, 1, row_extra=4)  # codes plus a float32 scale per row
    assert 1.5 * n16 < n8 < 2 * n16


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions that agree, each sequence counted up to its first difference (after which the contexts
    differ and a comparison means nothing) and then as disagreeing."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / total


@pytest.fixture(scope="module")
def bf16_reference(tiny_llama_dir):
    llm = _engine(tiny_llama_dir, "auto", 256, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    return outs


@pytest.mark.parametrize("name", ["int8", "fp8", "fp8_e5m2"])
def test_tiny_llama_8bit_cache_agrees_with_bf16(tiny_llama_dir, bf16_reference, name):
    """The random tiny model's next-token distribution is nearly flat (top-1 logprob about -4, top-2 often within
    0.01 of it), so one flipped near-tie changes the rest of a sequence: the sequence agreement is reported, and
    the asserts are on the first generated token, which both caches compute from the same prompt."""
    llm = _engine(tiny_llama_dir, name, 256, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    ref = [list(o.outputs[0].token_ids) for o in bf16_reference]
    agree = _agreement(ids, ref)
    first = sum(a[0] == b[0] for a, b in zip(ids, ref, strict=True)) / len(ref)
    # the logprob of the bf16 cache's first token, in both runs
    diffs = [abs(o.outputs[0].logprobs[0][r.outputs[0].token_ids[0]].logprob -
                 r.outputs[0].logprobs[0][r.outputs[0].token_ids[0]].logprob)
             for o, r in zip(outs, bf16_reference, strict=True)
             if o.outputs[0].token_ids[0] == r.outputs[0].token_ids[0]]
    print(f"\n[kv {name}] tiny llama (bf16): sequences agree with the bf16 cache on {agree:.1%} of "
          f"{sum(map(len, ref))} greedy tokens (up to the first difference); first tokens {first:.0%}; "
          f"max |logprob diff| of the first token {max(diffs):.4f}; backend {llm.llm_engine.core.attention.name}")
    assert first >= {"int8": 0.75, "fp8": 0.55, "fp8_e5m2": 0.4}[name]
    assert max(diffs) < {"int8": 0.2, "fp8": 0.5, "fp8_e5m2": 0.75}[name]


@pytest.mark.parametrize("name,dtype", [("int8", "float32"), ("fp8", "float32"), ("int8", "bfloat16"),
                                        ("fp8_e5m2", "bfloat16")])
def test_prefix_cache_preemption_and_batching_keep_tokens_in_8bit(tiny_llama_dir, name, dtype):
    """In an 8-bit cache: a prefix-cache hit reads the scales its blocks were written with, a preempted request
    recomputes the same codes and scales, and a request gives the same greedy tokens batched and alone."""
    roomy = _engine(tiny_llama_dir, name, 256, dtype, enable_prefix_caching=False)
    alone = [roomy.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    # about 24 8-bit blocks for 16 requests of up to 40 tokens: forces preemption
    tight = _engine(tiny_llama_dir, name, 6 if dtype == "float32" else 12, dtype, max_num_batched_tokens=32)
    before = tight.get_stats()
    outs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    after = tight.get_stats()
    assert after["num_preemptions"] > before["num_preemptions"], "the test must force preemption"
    for i, (out, want) in enumerate(zip(outs, alone, strict=True)):
        assert out.outputs[0].token_ids == want, f"request {i} differs batched / preempted"
    assert_all_blocks_free(after)

    shared = "A long shared system prompt that many requests start with. " * 4
    cold = roomy.generate(shared + "Second question!", GREEDY, use_tqdm=False)[0]
    hits = tight.get_stats()["prefix_cache_hit_tokens"]
    tight.generate(shared + "First question?", GREEDY, use_tqdm=False)
    warm = tight.generate(shared + "Second question!", GREEDY, use_tqdm=False)[0]
    assert warm.num_cached_tokens > 0 and tight.get_stats()["prefix_cache_hit_tokens"] > hits
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_backend_without_8bit_support_falls_back_to_the_reference(tiny_llama_dir, caplog):
    """A backend whose ``supports`` does not list the cache's feature is skipped, with a log line naming why."""
    import logging

    from llmctl.plugins import get_plugin_manager

    pm = get_plugin_manager()
    cpu = pm.registry.attention_backends.get("cpu-sdpa")
    if cpu is None:
        pytest.skip("the CPU plugin is not installed")
    backend = cpu.item
    features = frozenset({"chunked_prefill", "prefix_caching", "kv_cache_fp8_e5m2"})
    original = type(backend).supports

    def without(self, dtype, head_size, block_size, feats):
        if any(f.startswith("kv_cache_") for f in feats):
            from llmctl.plugins.types import Support
            return Support(False, "features not supported: kv_cache_fp8_e5m2")
        return original(self, dtype, head_size, block_size, feats)

    platform = pm.select_platform("cpu")
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="llmctl.plugins.manager"):
        mp.setattr(type(backend), "supports", without)
        chosen = pm.select_attention_backend(platform, torch.bfloat16, 64, 16, features)
    assert chosen.name == "torch-reference"
    assert "skipped cpu-sdpa: features not supported: kv_cache_fp8_e5m2" in caplog.text


def test_cli_flags_reach_the_engine_and_bad_values_are_readable(monkeypatch, tmp_path):
    from llmctl.bench import cli as bench_cli
    from llmctl_cli import main as cli_main
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(cli_main.app, ["serve", str(tmp_path), "--kv-cache-dtype", "fp16"])
    assert r.exit_code == 2 and "kv_cache_dtype: must be one of auto, fp8, fp8_e4m3, fp8_e5m2, int8" in r.output
    seen = []

    def fake_load(args):
        seen.append(args)
        raise cli_main.UserError("stop here")

    monkeypatch.setattr(cli_main, "load_engine", fake_load)
    runner.invoke(cli_main.app, ["serve", str(tmp_path), "--kv-cache-dtype", "fp8_e5m2"])
    assert seen and seen[0].kv_cache_dtype == "fp8_e5m2"
    assert bench_cli._engine_kwargs(None, None, None, None, "int8") == {"kv_cache_dtype": "int8"}
    assert "kv_cache_dtype" not in bench_cli._engine_kwargs(None, None, None, None)


def test_doctor_lists_the_8bit_kv_dtypes_per_platform():
    from llmctl_cli.doctor import collect

    report = collect()
    by_name = {p["name"]: p for p in report["platforms"]}
    cpu = by_name.get("cpu")
    if cpu is None:
        pytest.skip("the CPU plugin is not installed")
    assert cpu["kv_cache_dtypes"] == {"fp8_e4m3": "cpu-sdpa", "fp8_e5m2": "cpu-sdpa", "int8": "cpu-sdpa"}
    if "cuda" in by_name:  # the Triton backend reads them; flash-attn and flashinfer do not declare them
        assert set(by_name["cuda"]["kv_cache_dtypes"].values()) == {"triton"}


def test_encoder_embeddings_with_an_8bit_cache():
    """Bidirectional attention (pooling models) over an 8-bit cache: the CPU backend hands it to the reference."""
    from tests.pooling_factory import minilm_dir

    model = minilm_dir()
    if model is None:
        pytest.skip("the all-MiniLM-L6-v2 test package is not installed")
    texts = ["hello world", "The capital of France is Paris.", "def f(x): return x * 2"]
    full = LLM(str(model), kv_cache_memory=8 << 20).embed(texts, use_tqdm=False)
    for name in ("int8", "fp8"):
        q8 = LLM(str(model), kv_cache_memory=8 << 20, kv_cache_dtype=name).embed(texts, use_tqdm=False)
        a = torch.tensor([o.outputs.embedding for o in full])
        b = torch.tensor([o.outputs.embedding for o in q8])
        assert (torch.nn.functional.cosine_similarity(a, b) > 0.999).all(), name


@pytest.mark.parametrize("name", ["int8", "fp8_e5m2"])
def test_speculative_decoding_keeps_greedy_tokens_in_8bit(tiny_llama_dir, name):
    """n-gram drafts are verified as multi-row chunks and rejected drafts are overwritten later: in an 8-bit cache a
    verified row gives its decode's bits, so the greedy tokens equal those of plain decoding exactly."""
    prompts = ["one two three four five six seven one two three four five six seven one two three",
               "alpha beta gamma alpha beta gamma alpha beta", "Hello, my name is"]
    from tests.test_spec_decode import OracleProposer

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = _engine(tiny_llama_dir, name, 256, "bfloat16").generate(prompts, params, use_tqdm=False)
    spec = _engine(tiny_llama_dir, name, 256, "bfloat16", speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
    # drafts of the plain run's continuation, every third one wrong: steps accept some and reject others
    references = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in plain]
    spec.llm_engine.core.speculator.proposer = OracleProposer(references, spec.llm_engine.model_config.vocab_size)
    outs = spec.generate(prompts, params, use_tqdm=False)
    stats = spec.get_stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    for a, b in zip(outs, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
