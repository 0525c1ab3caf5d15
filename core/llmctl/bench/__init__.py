"""Benchmarks for llmctl: offline throughput and per-batch latency. The HTTP load generator for any
OpenAI-compatible server (``llmctl bench serve``) lives with the HTTP client in ``llmctl_cli.serve_load``.

The library modules need only llmctl-core; the CLI (``bench_app`` in ``llmctl.bench.cli``) needs ``typer`` and
``rich``. Those are imported
lazily, inside the functions that use them, so ``import llmctl.bench`` works on a bare core install.
"""

from __future__ import annotations

from llmctl.bench.common import percentiles, random_token_prompts

__all__ = ["percentiles", "random_token_prompts"]
