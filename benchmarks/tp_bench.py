#!/usr/bin/env python
"""Tensor parallelism on this machine: ``tensor_parallel_size`` 1 against 2 (or any sizes), in one run, with each
step's time split into communication, the rest of the ranks' step, and the driver's overhead.

For each size, one engine runs, after an untimed warm-up:

* **throughput**: ``--num-prompts`` prompts of ``--input-len`` random token ids, ``--output-len`` greedy tokens
  each, EOS ignored, in one ``generate`` (``llmctl bench throughput``'s workload, decode-heavy by default);
* **tpot**: one stream at a time, the same lengths, ``--tpot-iterations`` times (``llmctl bench latency`` at
  batch size 1): the per-token latency of a single user.

The engine is started with ``LLMCTL_COMM_PROFILE_DIR`` set (``llmctl.engine.comm_profile``): every rank times
its communicator's collectives and its engine steps. Rank 0's totals come back with each step's stats, so each
phase is split as

* ``comm``: time rank 0 spent inside all-reduce / all-gather / all-to-all (waiting for its peer included);
* ``compute``: the rest of rank 0's engine steps (scheduling, input preparation, the forward outside the
  collectives, sampling);
* ``driver``: the phase's wall time minus rank 0's steps: the driver's pickling, pipes and output processing
  (with one rank, only the output processing).

Every rank also writes its lifetime totals to a file at shutdown; they are printed so the ranks can be compared.

    .venv/bin/python benchmarks/tp_bench.py --model "$SMOLLM2_HF_FP32" --dtype float32 --out tp.json
    .venv/bin/python benchmarks/tp_bench.py --model tiny   # a tiny random Llama, built on the fly (smoke test)
    .venv/bin/python benchmarks/tp_bench.py --model mixtral --configs 1 2 2:ep 2:ep-allreduce

``--configs`` names each run as ``TP[:ep|:ep-allreduce]``: ``ep`` adds ``enable_expert_parallel`` (experts placed
whole per rank, tokens dispatched by all-to-all), ``ep-allreduce`` the same placement with the experts' partial
outputs summed by one all-reduce (``LLMCTL_EP_ALL2ALL=0``). ``--model mixtral`` builds a small random Mixtral
(4 layers, hidden 256, 8 experts of width 512, top 2) on the fly.

With the ``mp`` executor each rank is bound to its own share of this process's CPUs, so on a 2-core host TP=1 runs
two threads in one process and TP=2 one thread in each of two.
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
from llmctl.bench.latency import run_latency
from llmctl.bench.throughput import random_requests, run_requests, run_throughput
from llmctl.engine.comm_profile import COMM_PROFILE_ENV, read_profiles, stats_delta


def make_tiny_llama(out: Path) -> Path:
    """A tiny random Llama (the test suite's shape: 2 layers, 4 heads, 2 KV heads) with the SmolLM2 tokenizer."""
    import torch
    import transformers as tf
    from llmctl_testkit.smollm2 import load_test_tokenizer

    tok = load_test_tokenizer(out.parent)
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_small_mixtral(out: Path) -> Path:
    """A small random Mixtral with the SmolLM2 tokenizer: big enough that the experts, not the step's fixed costs,
    take most of the time, small enough for a 2-core host."""
    import torch
    import transformers as tf
    from llmctl_testkit.smollm2 import load_test_tokenizer

    tok = load_test_tokenizer(out.parent)
    torch.manual_seed(1)
    cfg = tf.MixtralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, initializer_range=0.05, sliding_window=None,
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.MixtralForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def with_heads(model: str, heads: int, kv_heads: int, out: Path) -> Path:
    """``model``'s architecture and sizes with ``heads`` query and ``kv_heads`` KV heads (head size kept) and
    random weights, for a model whose own head counts the sizes to compare do not divide (SmolLM2-135M has 9 and
    3, which 2 ranks cannot split). Its cost per token is within the difference the head counts make."""
    import shutil

    import torch
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv_heads, head_dim
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().save_pretrained(
        out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (Path(model) / name).exists():
            shutil.copy(Path(model) / name, out / name)
    return out


def split(wall_s: float, delta: dict[str, float]) -> dict[str, Any]:
    """A phase's wall time in comm / compute / driver, in total and per step (ms)."""
    steps = int(delta.get("steps", 0))
    step_s, comm_s = delta.get("step_s", 0.0), delta.get("comm_s", 0.0)
    parts = {"comm": comm_s, "compute": step_s - comm_s, "driver": wall_s - step_s}
    per_step = {k: (v / steps * 1000.0 if steps else float("nan")) for k, v in parts.items()}
    return {"wall_s": wall_s, "steps": steps, "seconds": parts,
            "share": {k: v / wall_s for k, v in parts.items()},
            "per_step_ms": {"total": wall_s / steps * 1000.0 if steps else float("nan"), **per_step},
            "comm_calls_per_step": delta.get("comm_calls", 0) / steps if steps else 0.0,
            "calls": {k[:-6]: int(v) for k, v in delta.items() if k.endswith("_calls") and k != "comm_calls"}}


def parse_config(text: str) -> tuple[int, str]:
    """``TP[:ep|:ep-allreduce]`` -> (tensor_parallel_size, expert-parallel mode: "", "ep" or "ep-allreduce")."""
    tp, _, mode = text.partition(":")
    if not tp.isdigit() or int(tp) < 1 or mode not in ("", "ep", "ep-allreduce"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TP, TP:ep or TP:ep-allreduce with TP >= 1")
    return int(tp), mode


def bench_one(model: str, tp: int, args: argparse.Namespace, profile_dir: Path, ep: str = "") -> dict[str, Any]:
    from llmctl import LLM

    os.environ[COMM_PROFILE_ENV] = str(profile_dir)
    if ep == "ep-allreduce":
        os.environ["LLMCTL_EP_ALL2ALL"] = "0"  # read by the ranks as they build their MoE layers
    kwargs: dict[str, Any] = {"tensor_parallel_size": tp, "seed": 0, "max_num_seqs": args.num_prompts,
                              "max_model_len": args.input_len + args.output_len + 16,
                              "enable_expert_parallel": bool(ep)}
    if args.num_threads:
        kwargs["num_threads"] = args.num_threads
    t0 = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, **kwargs)
    load_s = time.perf_counter() - t0
    try:
        vocab = int(llm.llm_engine.model_config.vocab_size)
        # Warm-up: a short batch and one single stream, untimed, with prompts the timed runs do not share.
        run_requests(llm, random_requests(min(4, args.num_prompts), min(args.input_len, 16), 4, vocab, 1_000_003))
        run_latency(model, batch_size=1, input_len=args.input_len, output_len=min(args.output_len, 8),
                    iterations=1, warmup_iterations=0, seed=2_000_003, llm=llm)

        before = llm.get_stats()
        thr = run_throughput(model, input_len=args.input_len, output_len=args.output_len,
                             num_prompts=args.num_prompts, seed=0, warmup=False, llm=llm)
        mid = llm.get_stats()
        lat = run_latency(model, batch_size=1, input_len=args.input_len, output_len=args.output_len,
                          iterations=args.tpot_iterations, warmup_iterations=0, seed=3, llm=llm)
        after = llm.get_stats()
    finally:
        llm.llm_engine.shutdown()
    os.environ.pop(COMM_PROFILE_ENV, None)
    os.environ.pop("LLMCTL_EP_ALL2ALL", None)
    lat_wall = lat.batch_latency_s["mean"] * lat.iterations
    ranks = read_profiles(profile_dir)
    return {
        "tensor_parallel_size": tp, "expert_parallel": ep, "load_s": load_s,
        "throughput": {"output_tokens": thr.output_tokens, "elapsed_s": thr.elapsed_s,
                       "output_tokens_per_s": thr.output_tokens_per_s,
                       "total_tokens_per_s": thr.total_tokens_per_s,
                       "split": split(thr.elapsed_s, stats_delta(before, mid))},
        "tpot": {"tpot_ms": lat.tpot_ms, "ttft_ms": lat.ttft_ms, "iterations": lat.iterations,
                 "split": split(lat_wall, stats_delta(mid, after))},
        "ranks_lifetime": {r: {"steps": d["steps"], "step_s": d["step_seconds"], "comm_s": d["comm_seconds"],
                               "comm_calls": d["comm_calls"]} for r, d in sorted(ranks.items())},
    }


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'tp':>3} {'phase':<10} {'wall s':>7} {'tok/s':>8} {'TPOT ms':>8} {'steps':>6} {'ms/step':>8} "
            f"{'compute':>8} {'comm':>7} {'driver':>7} {'comm %':>6} {'calls/step':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        for phase in ("throughput", "tpot"):
            p = r[phase]
            s = p["split"]
            tok_s = f"{p['output_tokens_per_s']:8.1f}" if phase == "throughput" else f"{'':>8}"
            tpot = f"{p['tpot_ms']['mean']:8.2f}" if phase == "tpot" else f"{'':>8}"
            ms = s["per_step_ms"]
            print(f"{_label(r):>3} {phase:<10} {s['wall_s']:7.2f} {tok_s} {tpot} {s['steps']:>6} "
                  f"{ms['total']:8.2f} {ms['compute']:8.2f} {ms['comm']:7.2f} {ms['driver']:7.2f} "
                  f"{100 * s['share']['comm']:6.1f} {s['comm_calls_per_step']:10.1f}")
    for r in results:
        for rank, d in r["ranks_lifetime"].items():
            print(f"tp={_label(r)} rank {rank} lifetime: {d['steps']} steps, "
                  f"{d['step_s']:.2f} s in steps, {d['comm_s']:.2f} s in {d['comm_calls']} collectives")


def _label(r: dict[str, Any]) -> str:
    return f"{r['tensor_parallel_size']}{':' + r['expert_parallel'] if r.get('expert_parallel') else ''}"


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each size against the first run at size 1 (the baseline): throughput and TPOT ratios."""
    base = next((r for r in results if r["tensor_parallel_size"] == 1), None)
    if base is None:
        return {}
    out = {}
    for i, r in enumerate(results):
        if r is base:
            continue
        key = f"run{i}_tp{_label(r).replace(':', '_')}"
        out[f"{key}_throughput_vs_tp1"] = (r["throughput"]["output_tokens_per_s"]
                                           / base["throughput"]["output_tokens_per_s"])
        out[f"{key}_tpot_vs_tp1"] = r["tpot"]["tpot_ms"]["mean"] / base["tpot"]["tpot_ms"]["mean"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a Hugging Face model directory or id, 'tiny' for a tiny random Llama or 'mixtral' for a "
                         "small random Mixtral, built on the fly")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--with-heads", type=int, nargs=2, metavar=("HEADS", "KV_HEADS"), default=None,
                    help="run a copy of --model (a local directory) with these head counts and random weights, "
                         "for a model whose heads the sizes do not divide")
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2],
                    help="sizes to run, in order; repeat 1 at the end (1 2 1) to see drift on a shared host")
    ap.add_argument("--configs", type=parse_config, nargs="+", default=None,
                    help="runs as TP[:ep|:ep-allreduce] (overrides --tp-sizes), e.g. 1 2 2:ep 2:ep-allreduce")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--tpot-iterations", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=None,
                    help="CPU threads per rank (default: the platform's choice over the rank's CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "tpot_iterations"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(tp < 1 for tp in args.tp_sizes):
        ap.error("--tp-sizes must all be >= 1")
    configs = args.configs or [(tp, "") for tp in args.tp_sizes]

    with tempfile.TemporaryDirectory(prefix="llmctl-tp-bench-") as tmp:
        model = str(make_tiny_llama(Path(tmp) / "tiny-llama")) if args.model == "tiny" else \
            str(make_small_mixtral(Path(tmp) / "mixtral")) if args.model == "mixtral" else args.model
        if args.with_heads:
            model = str(with_heads(model, *args.with_heads, Path(tmp) / "with-heads"))
        load_before = os.getloadavg()
        results = []
        for i, (tp, ep) in enumerate(configs):
            print(f"[tp_bench] tensor_parallel_size={tp} {ep}", file=sys.stderr, flush=True)
            results.append(bench_one(model, tp, args, Path(tmp) / f"profile-{i}-tp{tp}{ep}", ep))
            # each size as it completes, so a run cut short by a time limit still leaves its figures
            print(json.dumps({"partial": rounded(results[-1]), "loadavg": os.getloadavg()}), file=sys.stderr,
                  flush=True)
        load_after = os.getloadavg()
    record = {
        "bench": "tp", "model": args.model, "with_heads": args.with_heads, "dtype": args.dtype,
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "tpot_iterations": args.tpot_iterations, "greedy": True, "ignore_eos": True},
        "host": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": load_after},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": results, "ratios": ratios(results),
    }
    record = rounded(record)
    print_table(results)
    report_ratios_and_record(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
