#!/usr/bin/env python
"""Where a served request's time to first token goes, at N closed-loop streams on the real engine.

Why: a client sees one number, TTFT, and the levers against it differ by part: the wait for the step already
running when the request arrives (nothing in the scheduler shortens it, only shorter steps), the steps it spends
in the waiting queue (the step-sharing policy), the steps that compute its prompt (the prompt's own cost plus
whatever shares those steps with it) and the hand-over of the token to the consumer. This drives ``AsyncLLM`` in
process, the engine the server runs, with the load of ``llmctl bench serve --max-concurrency N`` (each stream
sends its next request when the previous one ends), and times every engine step and every request's passage
through it by wrapping the scheduler's ``add``/``schedule`` and the core's ``step`` on the instances. HTTP is
left out: compare its TTFT with ``llmctl bench serve`` against ``llmctl serve`` for that leg.

    .venv/bin/python benchmarks/ttft_breakdown.py --model "$SMOLLM2_HF" --dtype bfloat16 --streams 16 \
        [--max-num-batched-tokens 1024 --max-num-partial-prefills 1] [--json out.json]

Per request (medians over the measured ones):
  arrival wait   sent -> taken off the command queue (the step in flight when it arrived)
  queued         taken in -> start of the step with its first prompt chunk (steps spent in the waiting queue)
  prompt steps   start of that step -> end of the step that sampled its first token
  hand-over      end of that step -> the consumer holds the token
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llmctl import AsyncLLM, EngineArgs, SamplingParams
from llmctl.bench.common import random_token_prompts


@dataclass
class StepRecord:
    start: float
    end: float = 0.0
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens in this step
    decodes: int = 0


@dataclass
class RequestTimes:
    sent: float
    added: float = 0.0
    first_chunk_start: float = 0.0
    first_token_step_end: float = 0.0
    received: float = 0.0
    last: float = 0.0
    prompt_steps: int = 0
    decodes_beside: list[int] = field(default_factory=list)  # decodes in each of its prompt steps
    waited_steps: int = 0  # steps that started after it was taken in and before its first chunk


class Tracer:
    """Times steps and requests by wrapping the engine's instances (nothing in core knows about it)."""

    def __init__(self, engine: AsyncLLM) -> None:
        core = engine.engine.core
        self.steps: list[StepRecord] = []
        self.requests: dict[str, RequestTimes] = {}
        self._current: StepRecord | None = None
        sched = core.scheduler
        add, schedule, step = sched.add, sched.schedule, core.step

        def traced_add(request: Any) -> None:
            rec = self.requests.get(request.request_id)
            if rec is not None and not rec.added:
                rec.added = time.perf_counter()
            add(request)

        def traced_schedule(*a: Any, **kw: Any) -> Any:
            out = schedule(*a, **kw)
            cur = self._current
            if cur is not None:
                for item in out.scheduled:
                    req = item.request
                    if req.num_computed_tokens < len(req.prompt_token_ids):
                        cur.prompt_tokens[req.request_id] = item.num_new_tokens
                    else:
                        cur.decodes += 1
            return out

        def traced_step() -> Any:
            self._current = StepRecord(time.perf_counter())
            try:
                return step()
            finally:
                self._current.end = time.perf_counter()
                if self._current.prompt_tokens or self._current.decodes:
                    self.steps.append(self._current)
                self._current = None

        sched.add, sched.schedule, core.step = traced_add, traced_schedule, traced_step

    def attribute(self) -> None:
        """Fill each request's step-level times from the step records."""
        for s in self.steps:
            for rid, _n in s.prompt_tokens.items():
                rec = self.requests.get(rid)
                if rec is None:
                    continue
                if not rec.first_chunk_start:
                    rec.first_chunk_start = s.start
                rec.prompt_steps += 1
                rec.decodes_beside.append(s.decodes)
                rec.first_token_step_end = s.end  # the last prompt step samples the first token
        for rec in self.requests.values():
            if rec.added and rec.first_chunk_start:
                rec.waited_steps = sum(1 for s in self.steps if rec.added <= s.start < rec.first_chunk_start)


async def drive(engine: AsyncLLM, tracer: Tracer | None, prompts: list[list[int]], streams: int, output_len: int,
                tag: str) -> list[RequestTimes]:
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    todo = list(enumerate(prompts))
    done: list[RequestTimes] = []

    async def stream() -> None:
        while todo:
            i, prompt = todo.pop(0)
            rid = f"{tag}{i}"
            rec = RequestTimes(time.perf_counter())
            if tracer is not None:
                tracer.requests[rid] = rec
            async for out in engine.generate({"prompt_token_ids": prompt}, sp, request_id=rid):
                if out.outputs[0].token_ids:
                    rec.last = time.perf_counter()
                    rec.received = rec.received or rec.last
            done.append(rec)

    await asyncio.gather(*(stream() for _ in range(streams)))
    return done


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(recs: list[RequestTimes], steps: list[StepRecord], output_len: int) -> dict[str, Any]:
    ms = 1000.0
    ok = [r for r in recs if r.added and r.first_chunk_start and r.received]
    parts = {
        "ttft": [(r.received - r.sent) * ms for r in ok],
        "arrival_wait": [(r.added - r.sent) * ms for r in ok],
        "queued": [(r.first_chunk_start - r.added) * ms for r in ok],
        "prompt_steps": [(r.first_token_step_end - r.first_chunk_start) * ms for r in ok],
        "hand_over": [(r.received - r.first_token_step_end) * ms for r in ok],
        "tpot": [(r.last - r.received) * ms / (output_len - 1) for r in ok] if output_len > 1 else [],
    }
    decode_only = [(s.end - s.start) * ms for s in steps if not s.prompt_tokens]
    with_prompt = [(s.end - s.start) * ms for s in steps if s.prompt_tokens]
    return {
        "requests": len(ok),
        **{f"{k}_ms": {"p50": round(statistics.median(v), 1), "p90": round(pct(v, 0.9), 1),
                       "mean": round(statistics.fmean(v), 1)} for k, v in parts.items() if v},
        "waited_steps_mean": round(statistics.fmean(r.waited_steps for r in ok), 2) if ok else None,
        "prompt_steps_per_request_mean": round(statistics.fmean(r.prompt_steps for r in ok), 2) if ok else None,
        "decodes_beside_prompt_mean": round(statistics.fmean(d for r in ok for d in r.decodes_beside), 1)
        if ok else None,
        "steps": len(steps),
        "decode_only_step_ms": {"count": len(decode_only), "p50": round(statistics.median(decode_only), 1)}
        if decode_only else None,
        "prompt_step_ms": {"count": len(with_prompt), "p50": round(statistics.median(with_prompt), 1),
                           "prompt_tokens_mean": round(statistics.fmean(sum(s.prompt_tokens.values())
                                                                        for s in steps if s.prompt_tokens), 1),
                           "decodes_mean": round(statistics.fmean(s.decodes for s in steps if s.prompt_tokens), 1)}
        if with_prompt else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--warmup-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-partial-prefills", type=int, default=None)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=0)
    ap.add_argument("--min-decode-steps-between-prefills", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the summary (and the argv) here")
    a = ap.parse_args()
    vocab = json.loads(open(f"{a.model}/config.json").read())["vocab_size"]
    engine = AsyncLLM(EngineArgs(model=a.model, dtype=a.dtype, enable_prefix_caching=False,
                                 max_num_batched_tokens=a.max_num_batched_tokens,
                                 max_num_partial_prefills=a.max_num_partial_prefills,
                                 long_prefill_token_threshold=a.long_prefill_token_threshold,
                                 min_decode_steps_between_prefills=a.min_decode_steps_between_prefills))
    try:
        cfg = engine.engine.core.scheduler.config
        print(f"scheduler: max_num_batched_tokens={cfg.max_num_batched_tokens} "
              f"max_num_partial_prefills={cfg.max_num_partial_prefills} "
              f"long_prefill_token_threshold={cfg.long_prefill_token_threshold}", file=sys.stderr)
        if a.warmup_prompts:
            warm = random_token_prompts(a.warmup_prompts, a.input_len, vocab, seed=1)
            asyncio.run(drive(engine, None, warm, a.streams, a.output_len, "w"))
        tracer = Tracer(engine)
        prompts = random_token_prompts(a.num_prompts, a.input_len, vocab, seed=0)
        t0 = time.perf_counter()
        recs = asyncio.run(drive(engine, tracer, prompts, a.streams, a.output_len, "m"))
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown()
    tracer.attribute()
    summary = {"scheduler": {"max_num_batched_tokens": cfg.max_num_batched_tokens,
                             "max_num_partial_prefills": cfg.max_num_partial_prefills,
                             "long_prefill_token_threshold": cfg.long_prefill_token_threshold},
               "min_decode_steps_between_prefills": cfg.min_decode_steps_between_prefills,
               "output_tok_s": round(a.num_prompts * a.output_len / wall, 1),
               **summarize(recs, tracer.steps, a.output_len)}
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": sys.argv, "summary": summary, "steps": [asdict(s) for s in tracer.steps]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
