"""The benchmark scripts' command lines (no benchmark runs here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_compare_creates_its_log_dir(tmp_path):
    log_dir = tmp_path / "logs" / "nested"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_compare.py"), "--model",
                           str(tmp_path / "no-model"), "--skip-llmctl", "--log-dir", str(log_dir)],
                          capture_output=True, text=True, timeout=120)
    assert log_dir.is_dir(), proc.stderr[-2000:]


def test_benchmark_help_names_no_absolute_directory():
    for script in ("offline_throughput.py", "serve_compare.py", "profile_decode.py", "spec_decode_bench.py",
                   "structured_output.py", "tp_bench.py"):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "/work/" not in proc.stdout and "/home/" not in proc.stdout, proc.stdout
