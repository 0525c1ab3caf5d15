"""Benchmarks for llmctl: offline throughput, per-batch latency and an HTTP load generator for any
OpenAI-compatible server.

The library modules need only llmctl-core (``serve_load`` needs ``httpx``); the CLI (``bench_app`` in
``llmctl.bench.cli``) needs ``typer`` and ``rich``, and ``--plot`` needs ``matplotlib``. Those are imported
lazily, inside the functions that use them, so ``import llmctl.bench`` works on a bare core install.
"""

from __future__ import annotations

from llmctl.bench.common import percentiles, random_token_prompts

__all__ = ["percentiles", "random_token_prompts"]
