"""The ``llmctl`` command line: serve, generate, chat, doctor, plugins, version."""

from __future__ import annotations

__version__ = "0.1.0"
