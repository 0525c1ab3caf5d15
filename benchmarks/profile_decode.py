#!/usr/bin/env python
"""Where a decode step's time goes, at a fixed batch: per C kernel, per engine phase, and the replayed step.

torch.profiler sees none of this any more (the CPU plugin's kernels are C called through ctypes, and a replayed
step is one C call), so the step is measured twice in one process on the same requests' shape:

* eagerly (``enforce_eager``), with a timer around every C kernel call: time per kernel kind, and what is left
  outside them (module calls, scheduling, batch preparation, sampling bookkeeping, detokenization);
* as the engine runs by default (decode steps replayed from a recording, where the platform offers one), with the
  replay program's own clock around each kernel call.

    .venv/bin/python benchmarks/profile_decode.py --model "$SMOLLM2_HF" --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import torch
from llmctl import LLM, SamplingParams
from llmctl.bench.common import random_token_prompts


def _decode_steps(llm: LLM, batch: int, input_len: int, steps: int, seed: int,
                  before: Any = None, after: Any = None) -> list[float]:
    """Wall time of ``steps`` pure decode steps of ``batch`` sequences (after their prefill and two more), every
    sequence running throughout; ``before()`` and ``after()`` are called just before and after the timed steps."""
    eng = llm.llm_engine
    # sequences prefilled in the first chunks decode while later ones prefill: leave them room to spare
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8 + batch * input_len // 256, ignore_eos=True)
    for i, p in enumerate(random_token_prompts(batch, input_len, eng.model_config.vocab_size, seed=seed)):
        eng.add_request(f"prof-{seed}-{i}", {"prompt_token_ids": p}, params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (possibly chunked) until every request has its first token
        for out in eng.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
    for _ in range(2):
        eng.step()
    if before is not None:
        before()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    if after is not None:
        after()
    while eng.has_unfinished_requests():
        eng.step()
    return walls


def _timed_kernels(lib: Any, totals: dict[str, float]) -> None:
    """Wrap the library's ctypes entry points so every call adds its duration to ``totals``."""
    from llmctl_cpu import native

    entry_points = [(name, attr) for name, (attr, _) in native.RECORDED_KERNELS.items()]
    for name, attr in entry_points + [("argmax (sampler)", "_argmax")]:
        fn = getattr(lib, attr)

        def timed(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
            t = time.perf_counter()
            try:
                return _fn(*args)
            finally:
                # quantized GEMMs by shape (k -> n), so the output projection shows apart from the layers
                key = f"{_name} {args[3]}->{args[10]}" if _name == "gemm_wq_panels" else _name
                totals[key] += time.perf_counter() - t

        setattr(lib, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--quantization", default=None, help="e.g. gguf: a GGUF file kept in its quantized blocks")
    a = ap.parse_args()

    try:
        from llmctl_cpu import native

        lib = native.kernels()
    except ImportError:
        lib = None
    # The replayed engine first (the one a user runs; the C program's own per-kernel clock on), then the eager one
    # with timed kernels.
    kw = {"quantization": a.quantization} if a.quantization else {}
    llm = LLM(a.model, dtype=a.dtype, max_num_seqs=max(a.batch, 1), **kw)
    graphs = llm.llm_engine.core.runner.decode_runner is not None
    replay_kernels: dict[str, float] = {}
    replayed = _decode_steps(llm, a.batch, a.input_len, a.steps, seed=3,
                             before=None if lib is None else lambda: lib.program_timing(True),
                             after=None if lib is None else lambda: replay_kernels.update(lib.program_timing(False)))
    del llm

    totals: dict[str, float] = defaultdict(float)
    llm = LLM(a.model, dtype=a.dtype, max_num_seqs=max(a.batch, 1), enforce_eager=True, **kw)
    _decode_steps(llm, a.batch, a.input_len, 2, seed=4)  # warm
    if lib is not None:
        _timed_kernels(lib, totals)
    timed: dict[str, float] = {}
    eager = _decode_steps(llm, a.batch, a.input_len, a.steps, seed=3, before=totals.clear,
                          after=lambda: timed.update(totals))

    def per_step(seconds: float) -> float:
        return 1e3 * seconds / a.steps

    kernels_ms = {k: per_step(v) for k, v in sorted(timed.items(), key=lambda kv: -kv[1])}
    eager_ms = per_step(sum(eager))
    outside = eager_ms - sum(kernels_ms.values())
    print(f"batch {a.batch}, prompt {a.input_len} tokens, dtype {a.dtype}, torch threads {torch.get_num_threads()}, "
          f"{a.steps} decode steps")
    print(f"replayed step ({'decode graphs on' if graphs else 'graphs off: eager'}): "
          f"mean {1e3 * sum(replayed) / len(replayed):.2f} ms, min {1e3 * min(replayed):.2f} ms")
    replay_ms = {k: per_step(v) for k, v in sorted(replay_kernels.items(), key=lambda kv: -kv[1])}
    for name, ms in replay_ms.items():
        print(f"  {name:18s} {ms:7.2f}")
    if replay_ms:
        print(f"  {'outside the program':18s} {1e3 * sum(replayed) / len(replayed) - sum(replay_ms.values()):7.2f}"
              "  (Python: scheduling, batch preparation, sampling, outputs)")
    print(f"eager step: mean {eager_ms:.2f} ms, min {1e3 * min(eager):.2f} ms; per C kernel (ms per step):")
    for name, ms in kernels_ms.items():
        print(f"  {name:28s} {ms:7.2f}")
    print(f"  {'outside C kernels':28s} {outside:7.2f}  (Python: modules, scheduling, preparation, outputs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch": a.batch, "input_len": a.input_len, "dtype": a.dtype, "steps": a.steps,
                       "decode_graphs": graphs, "replayed_step_ms_mean": 1e3 * sum(replayed) / len(replayed),
                       "replayed_step_ms_min": 1e3 * min(replayed), "replayed_kernels_ms": replay_ms,
                       "eager_step_ms_mean": eager_ms,
                       "eager_kernels_ms": kernels_ms, "eager_outside_kernels_ms": outside}, f, indent=2)


if __name__ == "__main__":
    main()
