"""Core's two GPU seams on a CPU stand-in platform (``tests.fake_backends.gpu_seams``): KV-cache sizing by
profiling (``Platform.profile_kv_cache_bytes``) and decode-step graphs (``Platform.decode_step_runner``).

The real CUDA/ROCm implementations of both are thin (``llmctl_gpu``); what can go wrong lives in core:
the shape of the profiled step, which budget wins, the static buffers, padding and the eager fallback. The graph
stand-in keeps all of that on the production path and only swaps recording/replaying a graph for re-running
the step on the same static views.
"""

from __future__ import annotations

import gc
import json
import logging

import pytest

pytest.importorskip("llmctl_triton", reason="install llmctl-triton: pip install -e ./triton_kernels")

from llmctl import LLM, SamplingParams  # noqa: E402
from llmctl.plugins import PluginManager, reset_plugin_manager  # noqa: E402
from llmctl.plugins.types import Platform, ProbeResult  # noqa: E402

from tests._engine_util import _single_thread  # noqa: E402, F401
from tests.fake_backends.gpu_seams import RecordingAttention, SeamsPlatform, SeamsPlugin  # noqa: E402

BLOCK = 16
MAX_LEN = 64
PER_SEQ = MAX_LEN // BLOCK  # blocks one full-length sequence needs


def bytes_per_block(model_dir) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * BLOCK * cfg["num_key_value_heads"] * head * 4  # fp32


@pytest.fixture
def install():
    """Install a SeamsPlatform as a plugin for one test; restore the normal plugin set afterwards."""

    def _install(**platform_kwargs) -> SeamsPlatform:
        graph_safe = platform_kwargs.pop("graph_safe", True)
        platform = SeamsPlatform(RecordingAttention(graph_safe), **platform_kwargs)
        reset_plugin_manager(lambda: PluginManager().load(extra={"seams": SeamsPlugin(platform)}))
        return platform

    yield _install
    reset_plugin_manager()


def make_llm(model_dir, **kwargs) -> LLM:
    base = dict(device="seams", dtype="float32", num_threads=1, max_model_len=MAX_LEN, block_size=BLOCK,
                enable_prefix_caching=False)
    return LLM(str(model_dir), **{**base, **kwargs})


# -- KV-cache sizing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_num_seqs,mnbt,expected_lens", [
    (8, 200, [64, 64, 64, 8]),  # the token budget binds: full-length sequences plus the remainder
    (2, 200, [64, 64]),  # max_num_seqs binds: no more tokens than two sequences can hold
])
def test_profiling_runs_the_largest_step_and_sizes_the_cache(install, tiny_llama_dir, caplog, max_num_seqs, mnbt,
                                                             expected_lens):
    bpb = bytes_per_block(tiny_llama_dir)
    platform = install(profile_bytes=7 * bpb + 5, graphs=False)
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = make_llm(tiny_llama_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=mnbt,
                       gpu_memory_utilization=0.8)
    assert platform.profile_calls == [dict(gpu_memory_utilization=0.8, bytes_per_block=bpb, block_size=BLOCK,
                                           max_model_len=MAX_LEN, device_index=0)]
    profiled = [e for e in platform.attention.events if e.phase == "profile"]
    forwards = [e for e in profiled if e.kind == "forward"]
    assert len(forwards) == 2  # one per layer of the tiny model, i.e. exactly one forward pass
    for e in forwards:
        assert e.rows == sum(expected_lens) == min(mnbt, max_num_seqs * MAX_LEN)
        assert e.query_lens == expected_lens and e.seq_lens == expected_lens
        assert e.num_seqs <= max_num_seqs
        assert e.kv_blocks == 1  # a throwaway cache, not the real one
    assert all(not e.slots for e in profiled), "the profiled step must not write any KV slot"
    gc.collect()
    assert all(e.kv_ref() is None for e in profiled), "the profiling KV cache must be freed"
    assert llm.get_stats()["kv_blocks_total"] == 7
    text = caplog.text
    assert "7 blocks" in text and "from profiling" in text and f"max concurrency {7 / PER_SEQ:.2f}x" in text
    # The engine serves normally on the profiled cache.
    out = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_explicit_kv_cache_memory_wins_over_profiling(install, tiny_llama_dir):
    bpb = bytes_per_block(tiny_llama_dir)
    platform = install(profile_bytes=100 * bpb, graphs=False)
    llm = make_llm(tiny_llama_dir, max_num_seqs=4, kv_cache_memory=5 * bpb)
    assert platform.profile_calls == [] and llm.get_stats()["kv_blocks_total"] == 5
    llm = make_llm(tiny_llama_dir, max_num_seqs=4, kv_cache_memory=0.001)  # a fraction of memory_info's free
    assert platform.profile_calls == [] and llm.get_stats()["kv_blocks_total"] == int((1 << 30) * 0.001) // bpb


def test_platform_without_profile_keeps_memory_info_sizing(install, tiny_llama_dir):
    platform = install(profile_bytes=None, graphs=False)
    llm = make_llm(tiny_llama_dir, max_num_seqs=4)
    assert len(platform.profile_calls) == 1
    assert not [e for e in platform.attention.events if e.phase == "profile"]
    # 1 GiB free * 0.25 is far more than 4 full-length sequences use, so the "useful" cap decides.
    assert llm.get_stats()["kv_blocks_total"] == 4 * PER_SEQ + 1


def test_profiled_budget_too_small_names_the_field(install, tiny_llama_dir):
    platform = install(profile_bytes=(PER_SEQ - 1) * bytes_per_block(tiny_llama_dir), graphs=False)
    with pytest.raises(ValueError) as e:
        make_llm(tiny_llama_dir, max_num_seqs=4, gpu_memory_utilization=0.5)
    msg = str(e.value)
    assert msg.startswith("gpu_memory_utilization:"), msg
    assert "0.5" in msg and f"max_model_len={MAX_LEN}" in msg and "kv_cache_memory" in msg
    assert len(platform.profile_calls) == 1


def test_default_platform_seams_are_off():
    class Bare(Platform):
        name = "bare"

        def probe(self) -> ProbeResult:
            return ProbeResult(True)

    bare = Bare()
    assert bare.profile_kv_cache_bytes(lambda: None, gpu_memory_utilization=None, bytes_per_block=1, block_size=16,
                                       max_model_len=16) is None
    assert bare.decode_step_runner(None) is None  # type: ignore[arg-type]
    cpu = pytest.importorskip("llmctl_cpu.platform")
    assert type(cpu.CpuPlatform()).profile_kv_cache_bytes is Platform.profile_kv_cache_bytes
    # the CPU plugin records decode steps (tests/test_cpu_graph.py); it keeps the default KV sizing


# -- decode graphs ---------------------------------------------------------------------------------------------------
PROMPTS = [f"Request {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4]) for i in range(6)]
# Requests end one after another, so the decode batch shrinks 6, 5, 4, 3, 2, 1.
MAX_TOKENS = [3, 5, 7, 9, 11, 13]


def _generate(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture
def eager_run(install, tiny_llama_dir):
    """Greedy tokens and KV writes of the plain eager engine (the platform would offer graphs, enforce_eager)."""
    platform = install(graph_max_batch=4)
    llm = make_llm(tiny_llama_dir, max_num_seqs=8, kv_cache_memory=64 * bytes_per_block(tiny_llama_dir),
                   enforce_eager=True)
    assert platform.runner_requests == [], "enforce_eager must keep core from asking the platform"
    assert llm.llm_engine.core.runner.decode_runner is None
    tokens = _generate(llm)
    return tokens, platform.attention.written_slots()


def test_decode_graphs_match_eager(install, tiny_llama_dir, eager_run, caplog):
    eager_tokens, eager_writes = eager_run
    platform = install(graph_max_batch=4)  # captures 1, 2, 4: batches of 5 and 6 must fall back to eager
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = make_llm(tiny_llama_dir, max_num_seqs=8, kv_cache_memory=64 * bytes_per_block(tiny_llama_dir),
                       enforce_eager=False)
    assert "decode_graphs=on (batch sizes 1..4" in caplog.text
    spec = platform.runner_requests[0]
    assert spec.batch_sizes == (1, 2, 4, 8)  # core asks for up to max_num_seqs; this platform caps at 4
    assert spec.static_inputs["block_tables"].shape == (8, PER_SEQ)
    runner = platform.runner
    assert runner is not None and sorted(runner.captured_sizes) == [1, 2, 4]
    captured = [e for e in platform.attention.events if e.phase == "capture"]
    assert captured and all(not e.slots for e in captured), "capture must run on padding that writes nothing"

    tokens = _generate(llm)
    assert tokens == eager_tokens
    assert {(3, 4), (4, 4), (2, 2), (1, 1)} <= set(runner.replays), runner.replays
    assert all(n <= 4 for n, _ in runner.replays)
    events = platform.attention.events
    eager_decodes = {e.num_seqs for e in events
                     if e.kind == "forward" and e.phase == "eager" and set(e.query_lens) == {1}}
    assert {5, 6} <= eager_decodes, "batches above the largest captured size run eagerly"
    replayed = [e for e in events if e.kind == "forward" and e.phase == "replay"]
    assert {e.num_seqs for e in replayed} <= {1, 2, 4}  # the model only ever sees captured sizes

    # Padded rows are empty sequences with slot -1 and never reach the KV cache: every write of a replay has
    # exactly the live rows' slots, and the cache sees the same writes, step by step, as the eager engine.
    for slots, seq_lens in runner.padding_seen:
        assert set(slots) <= {-1} and set(seq_lens) <= {0}
    replay_writes = [e for e in events if e.kind == "write" and e.phase == "replay"]
    padded = {n: b for n, b in runner.replays}
    assert any(e.rows == 4 and len(e.slots) == 3 for e in replay_writes) and padded[3] == 4
    assert platform.attention.written_slots() == eager_writes


def test_graphs_need_a_capture_safe_attention_backend(install, tiny_llama_dir, caplog):
    platform = install(graph_safe=False)
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = make_llm(tiny_llama_dir, max_num_seqs=4, kv_cache_memory=32 * bytes_per_block(tiny_llama_dir))
    assert platform.runner_requests == [] and llm.llm_engine.core.runner.decode_runner is None
    assert "decode_graphs=off (attention backend seams-attn cannot be captured)" in caplog.text


def test_platform_declining_graphs_runs_eagerly(install, tiny_llama_dir, caplog):
    platform = install(graphs=False)
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        llm = make_llm(tiny_llama_dir, max_num_seqs=4, kv_cache_memory=32 * bytes_per_block(tiny_llama_dir))
    assert len(platform.runner_requests) == 1 and llm.llm_engine.core.runner.decode_runner is None
    assert "decode_graphs=off (platform seams has none)" in caplog.text
