"""llmctl's OpenAI-compatible HTTP server: ``build_app(engine, settings)`` returns the FastAPI app."""

from __future__ import annotations

from llmctl_server.app import build_app
from llmctl_server.settings import ServerSettings

__version__ = "0.1.0"

__all__ = ["build_app", "ServerSettings", "__version__"]
