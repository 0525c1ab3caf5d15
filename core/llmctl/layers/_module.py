"""The base class of llmctl's layers and models."""

from __future__ import annotations

from typing import Any

from torch import nn


class EngineModule(nn.Module):
    """An ``nn.Module`` whose call goes straight to ``forward``.

    ``nn.Module.__call__`` checks a dozen hook registries on every call; the engine registers none, and a decode
    step makes ~335 module calls (11 per layer), which cost 0.5-1 ms per step: 4 % of a one-sequence step and 2-3 %
    of a 16-sequence one on 2 cores. Hooks registered on these modules are therefore not run.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.__call__ = cls.forward  # type: ignore[method-assign]
