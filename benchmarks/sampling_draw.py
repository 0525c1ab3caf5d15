"""CPU time of one random draw per row: the engine's inverse-CDF draw against an exponential race.

    .venv/bin/python benchmarks/sampling_draw.py [--rows 1 16 64] [--vocab 49152 128256]

The race (argmax of p / E, one Exp(1) per vocabulary entry) is what the sampler used before; it is kept here only as
the baseline. Single thread, CPU time (``time.thread_time``), best of ``--repeat``: a shared host inflates wall time
far more than CPU time. Prints one line per shape with the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from llmctl.engine.sampler import Sampler
from llmctl.ops import Ops


class _Row:
    generator = None


def _best_cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sampler = Sampler(Ops.reference(), seed=0)
    g = torch.Generator().manual_seed(0)
    for vocab in a.vocab:
        for rows in a.rows:
            probs = torch.randn(rows, vocab).softmax(-1)
            row_list = [_Row()] * rows
            def race_draw(p: torch.Tensor = probs) -> torch.Tensor:
                return (p / torch.empty(p.shape).exponential_(generator=g)).argmax(-1)

            def icdf_draw(p: torch.Tensor = probs, r: list[_Row] = row_list) -> torch.Tensor:
                return sampler.draw(p, r)

            race = _best_cpu_ms(race_draw, a.repeat)
            icdf = _best_cpu_ms(icdf_draw, a.repeat)
            print(f"rows={rows} vocab={vocab}: exponential race {race:.2f} ms, inverse CDF {icdf:.2f} ms, "
                  f"{race / icdf:.1f}x")


if __name__ == "__main__":
    main()
