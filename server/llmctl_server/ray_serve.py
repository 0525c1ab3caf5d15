"""Ray Serve integration: llmctl's OpenAI-compatible app as a Ray Serve deployment, one ``AsyncLLM`` per replica.

Each replica builds its engine and serves ``build_app(engine, settings)`` as the deployment's ASGI ingress, so
every route (``/v1/chat/completions`` with streaming, ``/v1/models``, ``/metrics``, ...) behaves exactly as under
``llmctl serve``. Ray Serve scales the replicas on queue length: ``target_ongoing_requests`` is the number of
requests per replica (running in its engine or waiting for it) that the autoscaler aims for.

    from ray import serve
    from llmctl_server.ray_serve import build_llm_app

    serve.run(build_llm_app({"model": "Qwen/Qwen2.5-1.5B-Instruct"}, min_replicas=1, max_replicas=4,
                            ray_actor_options={"num_gpus": 1}))

Ray is imported only here and only when this module is used (``pip install 'ray[serve]'``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmctl_server.app import build_app
from llmctl_server.settings import ServerSettings

logger = logging.getLogger("llmctl_server")


@dataclass(frozen=True)
class AutoscalingOptions:
    """Ray Serve's autoscaling knobs, with llmctl's defaults for an LLM engine (which batches many requests at
    once, so a replica is only "full" with a queue well beyond one request)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: int = 16  # per replica: running + waiting requests the autoscaler aims for
    max_ongoing_requests: int = 256  # per replica: beyond this Ray Serve queues at the proxy (back-pressure)
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"max_replicas: must be >= max(1, min_replicas={self.min_replicas}), "
                             f"got {self.max_replicas}")
        if self.target_ongoing_requests < 1:
            raise ValueError(f"target_ongoing_requests: must be >= 1, got {self.target_ongoing_requests}")
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(f"max_ongoing_requests: must be >= target_ongoing_requests "
                             f"({self.target_ongoing_requests}), got {self.max_ongoing_requests}")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
        }


class LLMServerReplica:
    """One Ray Serve replica: an engine and the HTTP app on top of it (built in the replica's own process)."""

    def __init__(self, engine_kwargs: dict[str, Any], settings: ServerSettings | None = None) -> None:
        from llmctl import AsyncLLM, EngineArgs

        self.engine = AsyncLLM.from_engine_args(EngineArgs(**engine_kwargs))
        self.settings = settings or ServerSettings()

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.engine, self.settings)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception as exc:  # shutting down during interpreter exit
                logger.debug("engine shutdown on replica exit: %s", exc)


def build_llm_app(engine_kwargs: dict[str, Any], settings: ServerSettings | None = None, *, name: str = "llmctl",
                  min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: int = 16,
                  max_ongoing_requests: int = 256, ray_actor_options: dict[str, Any] | None = None) -> Any:
    """A Ray Serve application (pass it to ``serve.run``) serving ``EngineArgs(**engine_kwargs)``."""
    from llmctl import EngineArgs
    from ray import serve

    EngineArgs(**engine_kwargs)  # bad engine arguments fail here, in the caller, not in every replica
    scaling = AutoscalingOptions(min_replicas=min_replicas, max_replicas=max_replicas,
                                 target_ongoing_requests=target_ongoing_requests,
                                 max_ongoing_requests=max_ongoing_requests)
    ingress = serve.ingress()(LLMServerReplica)
    deployment = serve.deployment(ingress, name=name, ray_actor_options=ray_actor_options or {"num_cpus": 1},
                                  health_check_period_s=10, graceful_shutdown_timeout_s=(
                                      settings.shutdown_timeout if settings else ServerSettings().shutdown_timeout),
                                  **scaling.deployment_options())
    return deployment.bind(dict(engine_kwargs), settings)
