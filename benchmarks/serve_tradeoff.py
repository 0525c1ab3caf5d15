#!/usr/bin/env python
"""The served TTFT/TPOT trade-off: ``llmctl serve`` launched once per step token budget
(``--max-num-batched-tokens``), each driven at the same concurrency with the same prompts as
``serve_compare.py`` (warm-up prompts first, discarded), then one curve of TTFT against TPOT.

    .venv/bin/python benchmarks/serve_tradeoff.py --model "$SMOLLM2_HF_FP32" --dtype float32 \
        --budgets 2048,1024,512,256 --plot-dir plots --out tradeoff.json

Writes ``tradeoff.png`` (the curve, through ``llmctl_cli.serve_load.plot_tradeoff``, the same plot as
``llmctl bench serve --tradeoff``) and one ``llmctl bench serve --plot`` figure per budget into ``--plot-dir``.
A budget of ``default`` launches the server without the flag (the platform's own choice). ``--repeat`` runs the
budgets in turn that many times (ABAB), so drift on a shared machine shows as spread rather than as a trend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmctl_cli.serve_load import TradeoffPoint, make_prompts, plot_tradeoff  # noqa: E402
from serve_compare import bench_server, llmctl_command  # noqa: E402


def label_of(spec: str) -> str:
    mnbt, parts, gap = (spec.split("/") + ["", ""])[:3]
    return f"mnbt={mnbt}" + (f", mnpp={parts}" if parts else "") + (f", gap={gap}" if gap else "")


def flags_of(spec: str) -> list[str]:
    """``BUDGET[/P[/G]]`` as ``llmctl serve`` flags; an empty field (or ``default``) leaves the platform's choice."""
    mnbt, parts, gap = (spec.split("/") + ["", ""])[:3]
    return ([] if mnbt in ("", "default") else ["--max-num-batched-tokens", mnbt]) + \
        (["--max-num-partial-prefills", parts] if parts else []) + \
        (["--min-decode-steps-between-prefills", gap] if gap else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--budgets", default="2048,1024,512,256",
                    help="comma-separated BUDGET[/P[/G]] ('default' or an empty field: the platform's choice); P "
                         "passes --max-num-partial-prefills, G --min-decode-steps-between-prefills")
    ap.add_argument("--llmctl-args", default="", help="extra 'llmctl serve' args for every launch")
    ap.add_argument("--port", type=int, default=8211)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--warmup-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--out", default="tradeoff.json")
    a = ap.parse_args()
    # A SIGTERM (an outer `timeout`) unwinds like Ctrl-C, so bench_server's finally stops the server it started
    # instead of leaving it bound to the port the next launch needs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    budgets = a.budgets.split(",")
    a.vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    # bench_server's options: one concurrency, the measured prompts keyed by it
    a.concurrency = [a.concurrency]
    prompts_for = {a.concurrency[0]: make_prompts(a.num_prompts, a.input_len, "token-ids", a.vocab, seed=0)}
    name = Path(a.model).name
    runs: list[dict] = []
    for rep in range(a.repeat):
        for budget in budgets:
            extra = a.llmctl_args.split() + flags_of(budget)
            label = label_of(budget)
            cmd = llmctl_command(a.model, a.dtype, a.port, name, extra)
            res = bench_server(f"llmctl_{budget.replace('/', '_')}_r{rep}", cmd, {}, f"http://127.0.0.1:{a.port}",
                               name, prompts_for, a)
            runs.append({"label": label, "repeat": rep, **res})
    points = []
    for budget in budgets:
        mine = [r["runs"][str(a.concurrency[0])] for r in runs if r["label"] == label_of(budget) and "runs" in r]
        if not mine:
            continue
        med = sorted(mine, key=lambda r: r["ttft_ms"]["p50"])[len(mine) // 2]  # the median run by TTFT
        points.append(TradeoffPoint(label_of(budget), med["ttft_ms"]["p50"], med["ttft_ms"]["p90"],
                                    med["tpot_ms"]["p50"], med["output_throughput"], a.concurrency[0]))
        print(f"{label_of(budget):<24}" + "  ".join(
            f"[{r['output_throughput']:.1f} tok/s, TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
            f"TPOT p50 {r['tpot_ms']['p50']:.1f} ms]" for r in mine))
    if points:
        curve = Path(a.out).with_suffix(".png")
        plot_tradeoff(points, str(curve), title=f"{name} ({a.dtype}), {a.concurrency[0]} streams, "
                                                  f"{a.input_len} in / {a.output_len} out")
        print(f"wrote {curve}")
    Path(a.out).write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                       "model": a.model, "dtype": a.dtype, "argv": sys.argv, "runs": runs},
                                      indent=2))
    return 0 if points else 1


if __name__ == "__main__":
    sys.exit(main())
