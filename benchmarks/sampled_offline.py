"""Offline throughput with random sampling (temperature 1.0, top_p 1.0, as vLLM's throughput benchmark samples),
64 prompts of 128 random token ids, 64 tokens out, ignore_eos. ``llmctl bench throughput`` decodes greedily, which
never runs the sampler's random draw; this is the figure that does.

    .venv/bin/python benchmarks/sampled_offline.py MODEL LABEL [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from llmctl import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("label")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=64)
    a = ap.parse_args()
    llm = LLM(a.model, dtype=a.dtype)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(128)]} for _ in range(a.num_prompts)]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=1.0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in out)
    print(f"{a.label}: {n / dt:.1f} output tok/s ({dt:.1f} s), load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
