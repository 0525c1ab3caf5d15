"""The base class of llmctl's layers and models."""

from __future__ import annotations

from typing import Any

from torch import nn


class EngineModule(nn.Module):
    """An ``nn.Module`` whose call goes straight to ``forward``.

    ``nn.Module.__call__`` checks a dozen hook registries on every call; the engine registers none, and a decode
    step makes ~335 module calls (11 per layer), a few percent of a small decode step (docs/performance.md). Hooks
    registered on these modules are therefore not run.
    """

    _lookup_frozen = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.__call__ = cls.forward  # type: ignore[method-assign]

    def freeze_attribute_lookup(self) -> None:
        """Mirror this module's children, parameters and buffers into plain instance attributes.

        ``nn.Module`` keeps them in side dicts reached through ``__getattr__``, which Python calls only after a
        failed normal lookup: ~430 of those per decode step (measured in docs/performance.md).
        Later assignments and deletions keep the mirror in step (``__setattr__``/``__delattr__`` below).
        """
        for name in (*self._modules, *self._parameters, *self._buffers):
            self._mirror(name)
        self._lookup_frozen = True

    def _mirror(self, name: str) -> None:
        for registry in (self._modules, self._parameters, self._buffers):
            if name in registry:
                self.__dict__[name] = registry[name]
                return

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if self._lookup_frozen:
            self._mirror(name)

    def __delattr__(self, name: str) -> None:
        if self._lookup_frozen and any(name in r for r in (self._modules, self._parameters, self._buffers)):
            self.__dict__.pop(name, None)
        super().__delattr__(name)
