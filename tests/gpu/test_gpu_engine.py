"""The engine on a real GPU (CUDA or ROCm): KV-cache sizing by profiling and decode steps replayed from captured
graphs, against the same engine with ``enforce_eager``. Skipped on hosts without a GPU; run in its own process
so ``TRITON_INTERPRET`` is unset::

    pytest tests/gpu -q
"""

from __future__ import annotations

import logging

from llmctl import LLM, SamplingParams

from tests.gpu import REQUIRES_GPU

pytestmark = REQUIRES_GPU

MAX_LEN = 256  # below 2 x the split-K partition: graphs (worst-case max_seq_len) and eager use the same kernel
MAX_SEQS = 8
PROMPTS = [f"Request {i}: " + " ".join(["alpha", "beta", "gamma", "delta", "epsilon"][: 1 + i % 5])
           for i in range(7)]
MAX_TOKENS = [4, 6, 9, 12, 15, 18, 24]  # the decode batch shrinks 7 (padded to 8), 6, 5 (to 8), 4, 3 (to 4), ...


def _engine(model_dir, **kwargs) -> LLM:
    return LLM(str(model_dir), device="cuda", dtype="float32", max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS,
               enable_prefix_caching=False, **kwargs)


def _greedy(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_decode_graphs_match_eager_and_kv_is_profiled(tiny_model_dirs, caplog):
    model = tiny_model_dirs["llama"]
    with caplog.at_level(logging.INFO, logger="llmctl.engine.core"):
        graphs = _engine(model)
    assert "from profiling" in caplog.text and "max concurrency" in caplog.text
    # A tiny model leaves the GPU nearly empty, so the cap at what max_num_seqs full-length sequences use binds.
    assert graphs.get_stats()["kv_blocks_total"] == MAX_SEQS * (MAX_LEN // 16) + 1
    runner = graphs.llm_engine.core.runner.decode_runner
    assert runner is not None and sorted(runner.graphs) == [1, 2, 4, 8]
    replays = []
    replay = runner._replay
    runner._replay = lambda graph: (replays.append(graph), replay(graph))[1]
    got = _greedy(graphs)
    assert len(replays) >= max(MAX_TOKENS) - 1, "every decode step (all batches <= 8) should replay a graph"

    eager = _engine(model, enforce_eager=True)
    assert eager.llm_engine.core.runner.decode_runner is None
    assert got == _greedy(eager)
