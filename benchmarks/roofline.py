#!/usr/bin/env python
"""This CPU's ceilings, measured once with torch: matmul FLOP/s (fp32, bf16) and memory bandwidth.

Used by docs/performance.md to put llmctl's decode step next to what the machine can do: a decode step at batch
B reads every weight once (bandwidth-bound for small B) and does 2 * params * B FLOPs.

    .venv/bin/python benchmarks/roofline.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def best_time(fn, reps: int, min_time: float = 0.3) -> float:
    fn()  # warm-up
    best = float("inf")
    start = time.perf_counter()
    n = 0
    while n < reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def matmul_flops(dtype: torch.dtype, m: int, n: int, k: int) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    t = best_time(lambda: torch.matmul(a, b, out=out), reps=5)
    return 2.0 * m * n * k / t


def bandwidth(nbytes: int) -> dict[str, float]:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_t = best_time(lambda: dst.copy_(src), reps=5)
    read_t = best_time(lambda: src.sum(), reps=5)
    return {"copy_GBps": 2 * nbytes / copy_t / 1e9, "read_GBps": nbytes / read_t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--size", type=int, default=2048, help="square GEMM size")
    ap.add_argument("--bytes", type=int, default=512 << 20, help="bandwidth buffer size")
    a = ap.parse_args()
    s = a.size
    res = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "fp32_gemm_GFLOPs": matmul_flops(torch.float32, s, s, s) / 1e9,
        "bf16_gemm_GFLOPs": matmul_flops(torch.bfloat16, s, s, s) / 1e9,
        # Decode-shaped GEMMs: [batch, hidden] x [hidden, 4*hidden-ish] (SmolLM2-135M: hidden 576, mlp 1536).
        "fp32_decode_gemm_64x576x1536_GFLOPs": matmul_flops(torch.float32, 64, 1536, 576) / 1e9,
        "bf16_decode_gemm_64x576x1536_GFLOPs": matmul_flops(torch.bfloat16, 64, 1536, 576) / 1e9,
        **bandwidth(a.bytes),
    }
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
