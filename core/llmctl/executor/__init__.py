"""How the engine's ranks are run: in this process (one rank, or one of several that a launcher started), as
worker processes of this one (``mp``) or as Ray actors (``ray``). :func:`make_core` returns what ``LLMEngine``
drives either way."""

from __future__ import annotations

from typing import Any

from llmctl.config import EngineArgs


def make_core(args: EngineArgs) -> Any:
    """An ``EngineCore``, or for ``mp`` its stand-in that drives the worker processes holding the shards."""
    if args.data_parallel_size > 1:
        from llmctl.executor.data_parallel import DataParallelCore

        return DataParallelCore(args)
    if args.executor_backend == "mp":
        from llmctl.executor.mp import MultiprocCore

        return MultiprocCore(args)
    if args.executor_backend == "ray":
        from llmctl.executor.ray_executor import RayCore

        return RayCore(args)
    from llmctl.engine.core import EngineCore

    return EngineCore(args)
