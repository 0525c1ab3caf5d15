"""Server settings: everything ``llmctl serve`` passes to ``build_app`` besides the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    api_key: str | None = None
    chat_template: str | None = None  # template text (already read from --chat-template)
    max_n: int = 16
    max_queued_requests: int | None = None  # None: unbounded
    max_body_bytes: int = 16 * 1024 * 1024
    metrics_public: bool = False
    shutdown_timeout: float = 30.0
    engine_poll_interval: float = 0.5  # how often the watchdog checks that the engine loop is alive
    # After the engine dies, /health answers 503 for this long before the server exits, so a health checker or
    # load balancer sees "unhealthy" rather than only a refused connection (in-flight requests fail at once).
    engine_dead_linger: float = 1.0
    retry_after_seconds: int = 1
    public_paths: frozenset[str] = frozenset({"/health"})
    # images in requests (data: URLs only): decoded size and pixel count caps, checked before decoding pixels
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n: must be >= 1, got {self.max_n}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests: must be >= 0, got {self.max_queued_requests}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            self.api_key = None
