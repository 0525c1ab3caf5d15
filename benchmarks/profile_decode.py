#!/usr/bin/env python
"""Where a decode step's time goes: torch.profiler over a few llmctl engine steps at a fixed batch.

Submits ``--batch`` requests of ``--input-len`` random tokens, steps the engine past the prefill, then profiles
``--steps`` pure decode steps. Prints the step's wall time, the share spent inside torch operators (the rest is
Python: scheduling, input preparation, sampling bookkeeping, detokenization), and the top operators by self CPU
time. ``--trace FILE.json`` also saves a Chrome trace.

    .venv/bin/python benchmarks/profile_decode.py --model /work/smollm2-hf --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch
from llmctl import LLM, SamplingParams
from llmctl.bench.common import random_token_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None)
    a = ap.parse_args()

    llm = LLM(a.model, dtype=a.dtype, max_num_seqs=max(a.batch, 1))
    eng = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=a.steps + 8, ignore_eos=True)
    for i, p in enumerate(random_token_prompts(a.batch, a.input_len, eng.model_config.vocab_size, seed=3)):
        eng.add_request(f"prof-{i}", {"prompt_token_ids": p}, params)
    started: set[str] = set()
    while len(started) < a.batch:  # prefill (possibly chunked) until every request has its first token
        for out in eng.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
    for _ in range(2):  # settle
        eng.step()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            t = time.perf_counter()
            with torch.profiler.record_function("engine.step"):
                eng.step()
            walls.append(time.perf_counter() - t)
    while eng.has_unfinished_requests():
        eng.step()
    avg = prof.key_averages()
    step_total = sum(e.cpu_time_total for e in avg if e.key == "engine.step") / 1e3 / a.steps
    op_self = sum(e.self_cpu_time_total for e in avg if not e.key.startswith("engine.step")) / 1e3 / a.steps
    print(f"batch {a.batch}, context ~{a.input_len}, dtype {a.dtype}, torch threads {torch.get_num_threads()}")
    print(f"decode step wall (unprofiled timer inside profile): mean {1e3 * sum(walls) / len(walls):.1f} ms, "
          f"min {1e3 * min(walls):.1f} ms")
    print(f"profiled step {step_total:.1f} ms; inside torch ops {op_self:.1f} ms "
          f"({100 * op_self / max(step_total, 1e-9):.0f}%), outside (Python) {step_total - op_self:.1f} ms")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=60))
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
