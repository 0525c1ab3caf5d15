"""Server settings: everything ``llmctl serve`` passes to ``build_app`` besides the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    model_root: str | None = None  # /v1/models "root"; None: the model as the engine was given it
    api_key: str | None = None
    chat_template: str | None = None  # template text (already read from --chat-template)
    max_n: int = 16
    max_queued_requests: int | None = None  # None: the engine's max_num_seqs (ServerState.queue_limit)
    max_body_bytes: int = 16 * 1024 * 1024
    metrics_public: bool = False
    shutdown_timeout: float = 30.0
    engine_poll_interval: float = 0.5  # how often the watchdog checks that the engine loop is alive
    # After the engine dies, /health answers 503 for this long before the server exits, so a health checker or
    # load balancer sees "unhealthy" rather than only a refused connection (in-flight requests fail at once).
    engine_dead_linger: float = 1.0
    retry_after_seconds: int = 1
    # A stream whose client has not taken a write for this long is aborted and its connection dropped (None: never).
    stream_write_timeout: float | None = 30.0
    # A connection must send a request's complete header within this many seconds of opening (or of its previous
    # response): slowloris and never-speaking connections are closed. None: no limit.
    header_read_timeout: float | None = 20.0
    # Idle connections one client address may keep open; the longest-idle one is closed beyond this.
    max_idle_connections_per_client: int = 512
    public_paths: frozenset[str] = frozenset({"/health"})
    # Tool calling and reasoning output (vLLM's flag names).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # /v1/responses keeps finished responses for previous_response_id only when this is > 0 (at most this many).
    responses_store_size: int = 0
    metrics_prefix: str = "llmctl"  # "llmctl" or "vllm": the metric naming scheme (see metrics.py)
    web_ui: bool = True  # the browser console at "/" (static files; its API calls need the key like any client)
    otlp_traces_endpoint: str | None = None  # OpenTelemetry OTLP/HTTP traces endpoint; None: no tracing
    # LoRA adapters served by name (vLLM's --lora-modules: "name=path" or JSON); the engine needs enable_lora.
    lora_modules: list[str] = field(default_factory=list)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter exist only with this, for paths under lora_root.
    allow_runtime_lora: bool = False
    lora_root: str | None = None
    # images in requests: decoded size and pixel count caps, checked before decoding pixels
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # http(s) image URLs only to these hosts (vLLM's --allowed-media-domains; empty: none are fetched), and
    # file: URLs only under this directory (--allowed-local-media-path; None: refused); see media.py
    allowed_media_domains: list[str] = field(default_factory=list)
    allowed_local_media_path: str | None = None
    media_fetch_timeout: float = 5.0  # seconds for one image fetch, redirects included

    def __post_init__(self) -> None:
        if self.allow_runtime_lora and not self.lora_root:
            raise ValueError("allow_runtime_lora: needs --lora-root, the directory run-time adapters must lie under")
        if self.max_n < 1:
            raise ValueError(f"max_n: must be >= 1, got {self.max_n}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests: must be >= 0, got {self.max_queued_requests}")
        for name in ("stream_write_timeout", "header_read_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be > 0 seconds, got {value}")
        if self.max_idle_connections_per_client < 1:
            raise ValueError(f"max_idle_connections_per_client: must be >= 1, got "
                             f"{self.max_idle_connections_per_client}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.metrics_prefix not in ("llmctl", "vllm"):
            raise ValueError(f"metrics_prefix: expected 'llmctl' or 'vllm', got {self.metrics_prefix!r}")
        if self.api_key is not None and not self.api_key:
            self.api_key = None
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("tool_call_parser: --enable-auto-tool-choice needs --tool-call-parser")
        if self.tool_call_parser is not None:
            from llmctl_server.tools.parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)
        if self.reasoning_parser is not None:
            from llmctl_server.reasoning import get_reasoning_parser

            get_reasoning_parser(self.reasoning_parser)
        for name in ("max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.media_fetch_timeout > 0:
            raise ValueError(f"media_fetch_timeout: must be > 0 seconds, got {self.media_fetch_timeout}")
        self.media_connector()  # checks allowed_local_media_path
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size: must be >= 0, got {self.responses_store_size}")

    def media_connector(self) -> Any:
        from llmctl_server.media import MediaConnector

        return MediaConnector(tuple(self.allowed_media_domains), self.allowed_local_media_path, self.max_image_bytes,
                              self.max_image_pixels, self.media_fetch_timeout)
