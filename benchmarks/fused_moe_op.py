#!/usr/bin/env python
"""The ``fused_moe`` op alone: core's torch reference against the CPU plugin's C kernel, in one run.

Random experts of the Mixtral-shaped benchmark model (``model_families.py``: hidden 256, 8 experts of 352, top 2,
softmax routing), at decode-sized and prefill-sized token counts; each timing is the median of ``--repeats``
calls after a warm-up. Prints one JSON line per (dtype, tokens) and writes them with ``--out``.

    .venv/bin/python benchmarks/fused_moe_op.py --threads 1 --out benchmarks/results/fused_moe_op.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def median_s(fn, args: tuple, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from llmctl.ops import reference
    from llmctl_cpu import moe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    h, i, e = args.hidden, args.intermediate, args.experts
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        w13 = (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5).to(dtype)
        w2 = (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(dtype)
        packed = moe.pack_fused_moe_weights(w13, w2)
        if packed is None:
            raise SystemExit("the CPU plugin's fused_moe kernel is not available on this host")
        for t in (int(x) for x in args.tokens.split(",")):
            x = torch.randn(t, h, generator=gen).to(dtype)
            weights, ids = torch.topk(torch.randn(t, e, generator=gen).softmax(-1), args.top_k, dim=-1)
            weights = weights.to(dtype)
            with torch.inference_mode():
                ref = median_s(reference.fused_moe, (x, w13, w2, weights, ids), args.repeats)
                ker = median_s(moe.fused_moe, (x, *packed, weights, ids), args.repeats)
            row = {"dtype": name, "tokens": t, "reference_ms": ref * 1e3, "kernel_ms": ker * 1e3,
                   "speedup": ref / ker}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
