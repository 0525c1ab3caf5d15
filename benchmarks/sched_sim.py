#!/usr/bin/env python
"""Served TTFT/TPOT of the real scheduler under a step-cost model: closed-loop streams, no model, no noise.

Why: on a shared 2-core host a served run takes minutes and its latencies move with the neighbours' load, so a
sweep of the step token budget is slow to measure and hard to read. This drives ``llmctl.engine.Scheduler`` (the
engine's own, with its KV manager) through the same load as ``llmctl bench serve --max-concurrency N``: each
stream sends its next request when the previous one finishes, and it reaches the scheduler ``--rtt-ms`` later
(any positive value: after the next step has started, as a served request does; 0: in time for that step, as
in process), TTFT counting from then; a step takes

    step_ms = base_ms + decode_ms * decodes + prefill_ms * prompt_tokens

with the three costs measured on the host (``--calibrate MODEL`` times a one-prompt prefill, a 16-prompt prefill
and 32 decode steps at 16 sequences on the real engine, then fits them). It prints TTFT/TPOT per budget and draws
the curve with ``plot_tradeoff`` (the plot of ``llmctl bench serve --tradeoff``). The served runs
(``serve_tradeoff.py``) are the measurement; this shows why they come out as they do.

    .venv/bin/python benchmarks/sched_sim.py --budgets 2048,1024,512,256,160 --calibrate "$SMOLLM2_HF_FP32" \
        --dtype float32 --plot sim.png
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import dataclass

from llmctl import SamplingParams
from llmctl.config import SchedulerConfig
from llmctl.engine.request import Request
from llmctl.engine.scheduler import Scheduler
from llmctl.engine.step_output import ModelStepOutput
from llmctl.kv.manager import KVCacheManager


@dataclass
class StepCost:
    base_ms: float
    decode_ms: float
    prefill_ms: float

    def __call__(self, prompt_tokens: int, decodes: int) -> float:
        return self.base_ms + self.decode_ms * decodes + self.prefill_ms * prompt_tokens


@dataclass
class SimResult:
    budget: int
    ttft_ms: list[float]
    tpot_ms: list[float]
    duration_ms: float
    output_tokens: int
    max_running: int


def simulate(cost: StepCost, budget: int, *, streams: int = 16, num_prompts: int = 64, input_len: int = 128,
             output_len: int = 128, block_size: int = 16, long_prefill_token_threshold: int = 0,
             max_num_partial_prefills: int = 0, rtt_ms: float = 0.0,
             min_decode_steps_between_prefills: int = 0) -> SimResult:
    """``rtt_ms``: how long after a request ends its stream's next request reaches the engine (the client's
    round trip). Any positive value makes the next request miss the step that starts right after the end, as a
    served request does: the engine starts that step before the client's next request is through HTTP."""
    cfg = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budget, max_model_len=input_len + output_len,
                          long_prefill_token_threshold=long_prefill_token_threshold,
                          max_num_partial_prefills=max_num_partial_prefills,
                          min_decode_steps_between_prefills=min_decode_steps_between_prefills)
    blocks = streams * -(-(input_len + output_len) // block_size) + 1
    sched = Scheduler(cfg, KVCacheManager(blocks, block_size, enable_prefix_caching=False))
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    arrivals: list[tuple[float, int]] = [(0.0, i) for i in range(min(streams, num_prompts))]
    heapq.heapify(arrivals)
    sent = len(arrivals)
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft, tpot = [], []
    now = 0.0
    out_tokens = max_running = 0
    while arrivals or sched.has_unfinished():
        while arrivals and arrivals[0][0] <= now:
            t_arrival, i = heapq.heappop(arrivals)
            rid = str(i)
            prompt = [100 + (i * 7919 + j) % 30000 for j in range(input_len)]
            sched.add(Request(rid, prompt, sp, time.time(), max_tokens=output_len, all_token_ids=list(prompt)))
            arrived[rid] = t_arrival  # TTFT counts the wait for the step in flight when it arrived
        if not sched.has_unfinished():
            now = arrivals[0][0]
            continue
        step = sched.schedule()
        max_running = max(max_running, len(sched.running))
        prompt_tokens = sum(s.num_new_tokens for s in step.scheduled
                            if s.request.num_computed_tokens < len(s.request.prompt_token_ids))
        decodes = len(step.scheduled) - sum(1 for s in step.scheduled
                                            if s.request.num_computed_tokens < len(s.request.prompt_token_ids))
        now += cost(prompt_tokens, decodes)
        sampling = [s.request for s in step.scheduled if s.samples]
        sched.update_from_output(step, ModelStepOutput(sampling, [[1] for _ in sampling], [None] * len(sampling)))
        for req in sampling:
            rid = req.request_id
            out_tokens += 1
            if rid not in first:
                first[rid] = now
                ttft.append(now - arrived[rid])
            if req.finished:
                tpot.append((now - first[rid]) / max(1, req.num_output_tokens - 1))
                if sent < num_prompts:
                    heapq.heappush(arrivals, (now + rtt_ms, sent))
                    sent += 1
    return SimResult(budget, ttft, tpot, now, out_tokens, max_running)


def calibrate(model: str, dtype: str) -> StepCost:
    """Fit the step costs on the real engine: a 1-prompt and a 16-prompt prefill (each one step under a 2048
    budget) give the base and per-token costs; 32 more steps of 16 decodes give the per-decode cost."""
    from llmctl import LLM
    from llmctl.bench.common import random_token_prompts

    llm = LLM(model, dtype=dtype, max_num_batched_tokens=2048, kv_cache_memory=1 << 30, enable_prefix_caching=False)
    prompts = random_token_prompts(40, 128, 49152, seed=3)

    def timed(batch: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        llm.generate(batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return (time.perf_counter() - t) * 1000

    timed(prompts[:2], 4)
    one = min(timed(prompts[2:3], 1) for _ in range(2))
    sixteen = min(timed(prompts[4:20], 1) for _ in range(2))
    decode16 = min((timed(prompts[20:36], 33) - sixteen) / 32 for _ in range(2))
    prefill_ms = (sixteen - one) / (15 * 128)
    base_ms = max(0.0, one - 128 * prefill_ms)
    decode_ms = max(0.0, (decode16 - base_ms) / 16)
    return StepCost(base_ms, decode_ms, prefill_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="2048,1024,512,256,160",
                    help="comma-separated BUDGET[/P[/G]]: P sets max_num_partial_prefills, G "
                         "min_decode_steps_between_prefills for that point")
    ap.add_argument("--cost", default=None, help="base_ms,decode_ms,prefill_ms (instead of --calibrate)")
    ap.add_argument("--calibrate", default=None, help="model directory to measure the costs on")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rtt-ms", type=float, default=1.0,
                    help="client round trip between a request's end and its stream's next request (0: the next "
                         "request joins the very next step, which a served one never does)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.cost:
        cost = StepCost(*(float(x) for x in a.cost.split(",")))
    elif a.calibrate:
        cost = calibrate(a.calibrate, a.dtype)
    else:
        ap.error("--cost or --calibrate: the step costs are needed")
    from llmctl.bench.common import percentile
    from llmctl_cli.serve_load import TradeoffPoint, plot_tradeoff

    print(f"step cost: {cost.base_ms:.1f} ms + {cost.decode_ms:.2f} ms per decode + {cost.prefill_ms:.3f} ms per "
          f"prompt token", file=sys.stderr)
    points, rows = [], []
    for spec in a.budgets.split(","):
        b, p, g = (spec.split("/") + ["", ""])[:3]
        b, parts, gap = int(b), int(p or 0), int(g or 0)
        r = simulate(cost, b, streams=a.streams, num_prompts=a.num_prompts, input_len=a.input_len,
                     output_len=a.output_len, max_num_partial_prefills=parts,
                     rtt_ms=a.rtt_ms, min_decode_steps_between_prefills=gap)
        tput = r.output_tokens / r.duration_ms * 1000
        label = f"mnbt={b}" + (f", mnpp={parts}" if parts else "") + (f", gap={gap}" if gap else "")
        row = {"budget": b, "max_num_partial_prefills": parts, "min_decode_steps_between_prefills": gap,
               "ttft_p50_ms": percentile(r.ttft_ms, 50),
               "ttft_p90_ms": percentile(r.ttft_ms, 90),
               "tpot_p50_ms": percentile(r.tpot_ms, 50), "output_tok_s": tput, "max_running": r.max_running}
        rows.append(row)
        points.append(TradeoffPoint(label, row["ttft_p50_ms"], row["ttft_p90_ms"], row["tpot_p50_ms"], tput,
                                    a.streams))
        print(f"{label:<20} TTFT p50 {row['ttft_p50_ms']:8.0f} ms  p90 {row['ttft_p90_ms']:8.0f} ms  "
              f"TPOT p50 {row['tpot_p50_ms']:6.1f} ms  {tput:7.1f} out tok/s  (running <= {r.max_running})")
    if a.plot:
        plot_tradeoff(points, a.plot, title=f"scheduler under a step-cost model, {a.streams} streams, "
                                            f"{a.input_len} in / {a.output_len} out")
    if a.json:
        print(json.dumps({"cost": cost.__dict__, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
