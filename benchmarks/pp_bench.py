#!/usr/bin/env python
"""Pipeline parallelism on this machine: ``pipeline_parallel_size`` 1 against 2, with and without micro-batches
in flight, in one run (batched throughput).

Each configuration starts its own engine and, after an untimed warm-up, generates ``--num-prompts`` prompts of
``--input-len`` random token ids, ``--output-len`` greedy tokens each, EOS ignored, in one ``generate``
(``llmctl bench throughput``'s workload). A configuration is ``PP`` or ``PP:off``; ``off`` keeps one batch in
flight (``LLMCTL_PP_MICRO_BATCHES=1``: the stages take turns, as before micro-batches), so ``2:off`` against ``2``
isolates what the overlap of the stages gives.

    .venv/bin/python benchmarks/pp_bench.py --model smollm2 --configs 1 2:off 2 1 --out pp.json
    .venv/bin/python benchmarks/pp_bench.py --model tiny   # a tiny random Llama, built on the fly (smoke test)

``smollm2`` is SmolLM2-135M (30 layers) from the testkit's packaged GGUF, dequantized to float32 safetensors. With
the ``mp`` executor each stage is bound to its own share of this process's CPUs: on a 2-core host, pp=1 runs two
threads in one process and pp=2 one thread in each of two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmctl.bench.common import cpu_model, report_ratios_and_record, rounded
from llmctl.bench.throughput import random_requests, run_requests, run_throughput
from llmctl.engine.batch_queue import MICRO_BATCHES_ENV


def parse_config(text: str) -> tuple[int, bool]:
    pp, _, mode = text.partition(":")
    if not pp.isdigit() or int(pp) < 1 or mode not in ("", "off"):
        raise ValueError(f"--configs: {text!r} is not PP or PP:off")
    return int(pp), mode != "off"


def bench_one(model: str, pp: int, micro_batches: bool, args: argparse.Namespace) -> dict[str, Any]:
    from llmctl import LLM

    if micro_batches:
        os.environ.pop(MICRO_BATCHES_ENV, None)
    else:
        os.environ[MICRO_BATCHES_ENV] = "1"
    kwargs: dict[str, Any] = {"pipeline_parallel_size": pp, "seed": 0, "max_num_seqs": args.num_prompts,
                              "max_model_len": args.input_len + args.output_len + 16}
    if args.num_threads:
        kwargs["num_threads"] = args.num_threads
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, **kwargs)
    load_s = time.perf_counter() - t0
    try:
        vocab = int(llm.llm_engine.model_config.vocab_size)
        run_requests(llm, random_requests(min(4, args.num_prompts), min(args.input_len, 16), 4, vocab, 1_000_003))
        before = llm.get_stats()
        thr = run_throughput(model, input_len=args.input_len, output_len=args.output_len,
                             num_prompts=args.num_prompts, seed=0, warmup=False, llm=llm)
        after = llm.get_stats()
    finally:
        llm.llm_engine.shutdown()
        os.environ.pop(MICRO_BATCHES_ENV, None)
    steps = after["num_steps"] - before["num_steps"]
    return {"pipeline_parallel_size": pp, "micro_batches": micro_batches and pp > 1, "load_s": load_s,
            "output_tokens": thr.output_tokens, "elapsed_s": thr.elapsed_s,
            "output_tokens_per_s": thr.output_tokens_per_s, "total_tokens_per_s": thr.total_tokens_per_s,
            "batches": steps, "max_batches_in_flight": after.get("pipeline_max_in_flight", 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model directory or id, 'smollm2' or 'tiny'")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", nargs="+", default=["1", "2:off", "2"],
                    help="PP or PP:off, in order; repeat 1 at the end to see drift on a shared host")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=None, help="CPU threads per rank")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as exc:
        ap.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="llmctl-pp-bench-") as tmp:
        model = args.model
        if model == "tiny":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from tp_bench import make_tiny_llama

            model = str(make_tiny_llama(Path(tmp) / "tiny-llama"))
        elif model == "smollm2":
            from llmctl_testkit.smollm2 import make_truncated_smollm2

            model = str(make_truncated_smollm2(Path(tmp) / "smollm2", 30))
        load_before = os.getloadavg()
        results = []
        for pp, micro in configs:
            print(f"[pp_bench] pipeline_parallel_size={pp} micro_batches={micro}", file=sys.stderr, flush=True)
            results.append(bench_one(model, pp, micro, args))
            print(json.dumps({"partial": rounded(results[-1]), "loadavg": os.getloadavg()}), file=sys.stderr,
                  flush=True)
        load_after = os.getloadavg()
    base = next((r for r in results if r["pipeline_parallel_size"] == 1), None)
    ratios = {} if base is None else {
        f"run{i}_pp{r['pipeline_parallel_size']}{'' if r['micro_batches'] else '_one_batch'}_vs_pp1":
            r["output_tokens_per_s"] / base["output_tokens_per_s"] for i, r in enumerate(results) if r is not base}
    record = rounded({
        "bench": "pp", "model": args.model, "dtype": args.dtype,
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "greedy": True, "ignore_eos": True},
        "host": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": load_after},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": results, "ratios": ratios,
    })
    print(f"{'pp':>3} {'micro':>6} {'tok/s':>8} {'wall s':>7} {'batches':>8} {'in flight':>9}")
    for r in results:
        print(f"{r['pipeline_parallel_size']:>3} {str(r['micro_batches']):>6} {r['output_tokens_per_s']:8.2f} "
              f"{r['elapsed_s']:7.2f} {r['batches']:>8} {r['max_batches_in_flight']:>9}")
    report_ratios_and_record(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
