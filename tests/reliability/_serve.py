"""A server process for the reliability tests: ``python -m tests.reliability._serve MODEL --port P [...]``.

It is ``llmctl serve`` (the same ``run_server``) plus test seams that need to live inside the server process:
``--num-threads`` (the CLI has no flag for it; tiny models are fastest single-threaded), ``--die-file PATH``
(once PATH exists, the engine's next step raises a ``BaseException`` that is not an ``Exception``: the engine loop
dies the way a real crash kills it) and ``--stall-file PATH`` (while PATH exists, every engine step first sleeps
``STALL_STEP_S``, so running requests stay running whatever the machine's speed) and ``--probe-log PATH`` (the stall
probes of ``_probe.py``: steps, gc pauses, event-loop lag, preemptions, as JSON lines) and ``--mem-probe PATH``
(memory snapshots on request: ``_probe.install_memory_probe``). Exits with ``run_server``'s
exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

STALL_STEP_S = 0.05


class EngineKilled(BaseException):
    """Not an Exception: nothing between the step and the engine loop may swallow it."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--kv-cache-memory", type=int, default=64 << 20)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=0)
    ap.add_argument("--max-queued-requests", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--shutdown-timeout", type=float, default=30.0)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--die-file", default=None)
    ap.add_argument("--stall-file", default=None)
    ap.add_argument("--probe-log", default=None)
    ap.add_argument("--mem-probe", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--stream-write-timeout", type=float, default=30.0)
    ap.add_argument("--header-read-timeout", type=float, default=20.0)
    ap.add_argument("--max-idle-connections-per-client", type=int, default=512)
    a = ap.parse_args(argv)

    from llmctl import AsyncLLM, EngineArgs
    from llmctl_server import ServerSettings
    from llmctl_server.launcher import run_server

    logging.basicConfig(level=logging.WARNING)
    engine = AsyncLLM.from_engine_args(EngineArgs(
        model=a.model, kv_cache_memory=a.kv_cache_memory, max_num_seqs=a.max_num_seqs, seed=0,
        max_num_batched_tokens=a.max_num_batched_tokens, long_prefill_token_threshold=a.long_prefill_token_threshold,
        platform_options={"num_threads": a.num_threads}, max_model_len=a.max_model_len))
    if a.die_file:
        real_step = engine.engine.step
        die_file = a.die_file

        def step():  # type: ignore[no-untyped-def]
            if os.path.exists(die_file):
                raise EngineKilled("engine loop killed by the reliability test")
            return real_step()

        engine.engine.step = step
    if a.stall_file:
        slow_step = engine.engine.step
        stall_file = a.stall_file

        def stalled_step():  # type: ignore[no-untyped-def]
            if os.path.exists(stall_file):
                time.sleep(STALL_STEP_S)
            return slow_step()

        engine.engine.step = stalled_step
    if a.probe_log:
        from tests.reliability._probe import install

        install(engine, a.probe_log)
    if a.mem_probe:
        from tests.reliability._probe import install_memory_probe

        install_memory_probe(a.mem_probe)
    settings = ServerSettings(served_model_names=["tiny"], max_queued_requests=a.max_queued_requests,
                              shutdown_timeout=a.shutdown_timeout, engine_poll_interval=0.1, api_key=a.api_key,
                              stream_write_timeout=a.stream_write_timeout, header_read_timeout=a.header_read_timeout,
                              max_idle_connections_per_client=a.max_idle_connections_per_client)
    try:
        code = run_server(engine, settings, host="127.0.0.1", port=a.port, log_level="warning")
    finally:
        engine.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
