"""Latency at a fixed batch size: TTFT, TPOT and the batch's end-to-end time, timed at ``LLMEngine.step``.

Each iteration submits ``batch_size`` requests of ``input_len`` random token ids at once (fresh prompts each
iteration, so the prefix cache does not help) and steps the engine until all have ``output_len`` tokens
(greedy, ignore_eos). A request's TTFT is from submission to the end of the step that produced its first
token; its TPOT is (finish - first token) / (output_len - 1). Decode-step times (steps after every request of
the batch has its first token) are reported too: at a fixed batch they are the engine's per-token cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from llmctl.bench.common import percentiles, random_token_prompts


@dataclass
class LatencyResult:
    model: str
    dtype: str
    batch_size: int
    input_len: int
    output_len: int
    iterations: int
    num_requests: int
    output_tokens: int
    load_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    decode_step_ms: dict[str, float]
    batch_latency_s: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Iteration:
    ttft: list[float]
    tpot: list[float]
    decode_steps: list[float]
    elapsed: float
    output_tokens: int


def _one_iteration(engine: Any, prompts: list[list[int]], output_len: int) -> _Iteration:
    from llmctl import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = []
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    decode_steps: list[float] = []
    start = time.perf_counter()
    try:
        for p in prompts:
            rid = f"bench-lat-{engine.next_request_id()}"
            engine.add_request(rid, {"prompt_token_ids": p}, params)
            ids.append(rid)
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            all_started = len(first) == len(ids)
            for out in outs:
                n = len(out.outputs[0].token_ids) if out.outputs else 0
                if n and out.request_id not in first:
                    first[out.request_id] = now
                if out.finished:
                    done[out.request_id] = (now, n)
            if all_started and outs:
                decode_steps.append(now - t)
    except BaseException:
        engine.abort_request([i for i in ids if i not in done])
        raise
    elapsed = time.perf_counter() - start
    ttft = [first[i] - start for i in ids if i in first]
    tpot = [(done[i][0] - first[i]) / (done[i][1] - 1) for i in ids if i in done and i in first and done[i][1] > 1]
    return _Iteration(ttft, tpot, decode_steps, elapsed, sum(n for _, n in done.values()))


def run_latency(model: str, *, batch_size: int = 8, input_len: int = 128, output_len: int = 128,
                iterations: int = 5, warmup_iterations: int = 1, seed: int = 0, dtype: str = "auto",
                llm: Any = None, **engine_kwargs: Any) -> LatencyResult:
    """Time ``iterations`` batches (after ``warmup_iterations`` untimed ones) and return percentiles."""
    if batch_size < 1 or iterations < 1 or output_len < 1:
        raise ValueError("batch_size, iterations and output_len must be >= 1")
    load_s = 0.0
    if llm is None:
        from llmctl import LLM

        engine_kwargs.setdefault("max_num_seqs", max(batch_size, 1))
        t0 = time.perf_counter()
        llm = LLM(model, dtype=dtype, **engine_kwargs)
        load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    vocab = int(engine.model_config.vocab_size)
    ttft: list[float] = []
    tpot: list[float] = []
    steps: list[float] = []
    batch: list[float] = []
    out_tokens = 0
    for i in range(warmup_iterations + iterations):
        prompts = random_token_prompts(batch_size, input_len, vocab, seed=seed + 7919 * i)
        it = _one_iteration(engine, prompts, output_len)
        if i < warmup_iterations:
            continue
        ttft += it.ttft
        tpot += it.tpot
        steps += it.decode_steps
        batch.append(it.elapsed)
        out_tokens += it.output_tokens
    model_dtype = str(getattr(engine.model_config, "dtype", dtype)).replace("torch.", "")
    return LatencyResult(
        model=model, dtype=model_dtype, batch_size=batch_size, input_len=input_len, output_len=output_len,
        iterations=iterations, num_requests=batch_size * iterations, output_tokens=out_tokens, load_s=load_s,
        ttft_ms=percentiles(ttft, scale=1000.0), tpot_ms=percentiles(tpot, scale=1000.0),
        decode_step_ms=percentiles(steps, scale=1000.0), batch_latency_s=percentiles(batch))
