"""Open, string-keyed registries filled by plugins, and the rules that pick from them.

Every entry remembers the plugin that registered it, so ``llmctl doctor`` can say who provides what and a
plugin that turns out broken can be removed wholesale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from llmctl.ops import reference
from llmctl.ops.op_table import Ops
from llmctl.plugins.types import (
    ANY_PLATFORM,
    QUANT_FORMATS,
    AttentionBackend,
    Communicator,
    DoctorCheck,
    ModelArchitecture,
    OpOverride,
    Platform,
    QuantMethod,
)

T = TypeVar("T")

__all__ = ["ANY_PLATFORM", "Entry", "MalformedRegistration", "Ops", "Registry"]


@dataclass
class Entry(Generic[T]):
    item: T
    plugin: str


class MalformedRegistration(ValueError):
    """A plugin handed the registry something that does not follow the contract."""


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedRegistration(what)


@dataclass
class Registry:
    platforms: dict[str, Entry[Platform]] = field(default_factory=dict)
    attention_backends: dict[str, Entry[AttentionBackend]] = field(default_factory=dict)
    ops: list[Entry[OpOverride]] = field(default_factory=list)
    quant_methods: dict[str, Entry[QuantMethod]] = field(default_factory=dict)
    communicators: dict[str, Entry[Communicator]] = field(default_factory=dict)
    models: dict[str, Entry[ModelArchitecture]] = field(default_factory=dict)
    doctor_checks: list[Entry[DoctorCheck]] = field(default_factory=list)
    # Every keyed registration in order (table name, key, entry, priority), winners and losers alike, so dropping
    # a broken plugin can bring back the entries it had shadowed.
    _history: list[tuple[str, str, Entry[Any], int]] = field(default_factory=list, repr=False, compare=False)

    # -- registration (called through the hooks' ``register`` callbacks) -------------------------------------
    def add_platform(self, item: Platform, plugin: str) -> None:
        _require(isinstance(item, Platform), f"platform must be a llmctl Platform, got {type(item).__name__}")
        _require(bool(item.name) and isinstance(item.name, str), "platform needs a non-empty string name")
        _require(isinstance(item.device_type, str) and bool(item.device_type), f"platform {item.name!r}: device_type")
        _require(isinstance(item.options, Mapping) and all(isinstance(k, str) and k.isidentifier() and
                                                            isinstance(v, str) for k, v in item.options.items()),
                 f"platform {item.name!r}: options must map identifiers to descriptions")
        self._put("platforms", item.name, item, plugin)

    def add_attention_backend(self, item: AttentionBackend, plugin: str) -> None:
        _require(isinstance(item, AttentionBackend), f"attention backend must subclass AttentionBackend, "
                                                     f"got {type(item).__name__}")
        _require(bool(item.name) and bool(item.platform), "attention backend needs a name and a platform")
        self._put("attention_backends", item.name, item, plugin)

    def add_op(self, item: OpOverride, plugin: str) -> None:
        _require(isinstance(item, OpOverride), f"op override must be an OpOverride, got {type(item).__name__}")
        _require(item.name in reference.OP_NAMES,
                 f"unknown op {item.name!r}; known ops: {', '.join(reference.OP_NAMES)}")
        _require(callable(item.fn), f"op {item.name!r}: fn is not callable")
        self.ops.append(Entry(item, plugin))

    def add_quant_method(self, item: QuantMethod, plugin: str) -> None:
        """Keyed ``format@platform`` (one entry per listed platform), so each platform has its own best kernel
        per format and a plugin's kernel shadows another's only on the same platform."""
        _require(isinstance(item, QuantMethod) and bool(item.name), "quantization method must be a named QuantMethod")
        _require(item.name in QUANT_FORMATS,
                 f"quantization method {item.name!r}: unknown weight format; known: {', '.join(QUANT_FORMATS)}")
        _require(bool(item.platforms) and all(isinstance(p, str) and p for p in item.platforms),
                 f"quantization method {item.name!r}: platforms must name at least one platform (or '*')")
        for platform in item.platforms:
            self._put("quant_methods", f"{item.name}@{platform}", item, plugin)

    def add_communicator(self, item: Communicator, plugin: str) -> None:
        _require(isinstance(item, Communicator) and bool(item.name), "communicator must be a named Communicator")
        self._put("communicators", item.name, item, plugin)

    def add_model(self, item: ModelArchitecture, plugin: str) -> None:
        _require(isinstance(item, ModelArchitecture) and bool(item.architecture), "model needs an architecture name")
        self._put("models", item.architecture, item, plugin, priority=item.priority)

    def add_doctor_check(self, item: DoctorCheck, plugin: str) -> None:
        _require(isinstance(item, DoctorCheck) and callable(item.run), "doctor check needs a name and run()")
        self.doctor_checks.append(Entry(item, plugin))

    def _put(self, table_name: str, key: str, item: Any, plugin: str, priority: int | None = None) -> None:
        prio = getattr(item, "priority", 0) if priority is None else priority
        entry = Entry(item, plugin)
        self._history.append((table_name, key, entry, prio))
        self._place(getattr(self, table_name), key, entry, prio)

    @staticmethod
    def _place(table: dict[str, Entry[Any]], key: str, entry: Entry[Any], prio: int) -> None:
        old = table.get(key)
        if old is None or getattr(old.item, "priority", 0) <= prio:
            table[key] = entry

    def drop_plugin(self, plugin: str) -> None:
        """Forget everything a plugin registered (used when it turns out broken half-way); an entry of another
        plugin that it had shadowed under the same name comes back."""
        self._history = [h for h in self._history if h[2].plugin != plugin]
        for table_name in ("platforms", "attention_backends", "quant_methods", "communicators", "models"):
            table = getattr(self, table_name)
            table.clear()
            for name, key, entry, prio in self._history:
                if name == table_name:
                    self._place(table, key, entry, prio)
        self.ops = [e for e in self.ops if e.plugin != plugin]
        self.doctor_checks = [e for e in self.doctor_checks if e.plugin != plugin]

    # -- selection ------------------------------------------------------------------------------------------
    def backends_for(self, platform: str) -> list[AttentionBackend]:
        found = [e.item for e in self.attention_backends.values() if e.item.platform in (platform, ANY_PLATFORM)]
        return sorted(found, key=lambda b: -b.priority)

    def resolve_ops(self, platform: str) -> Ops:
        table = {name: getattr(reference, name) for name in reference.OP_NAMES}
        best: dict[str, int] = {}
        for e in self.ops:
            op = e.item
            if op.platform not in (platform, ANY_PLATFORM):
                continue
            if op.name not in best or op.priority > best[op.name]:
                best[op.name] = op.priority
                table[op.name] = op.fn
        return Ops(**table)

    def platform_options(self) -> dict[str, list[str]]:
        """Every option some registered platform declares -> the platforms that declare it."""
        found: dict[str, list[str]] = {}
        for entry in self.platforms.values():
            for option in entry.item.options:
                found.setdefault(option, []).append(entry.item.name)
        return found

    def quant_kernels(self, fmt: str, platform: str) -> list[QuantMethod]:
        """The kernels that run weight format ``fmt`` on ``platform``, best first; the platform's own before
        the any-platform ones (core's reference) at equal priority."""
        found = [(e.item.priority, key.endswith(f"@{platform}"), e.item) for key, e in self.quant_methods.items()
                 if key in (f"{fmt}@{platform}", f"{fmt}@{ANY_PLATFORM}")]
        return [item for _, _, item in sorted(found, key=lambda t: (-t[0], not t[1]))]

    def quant_formats_for(self, platform: str) -> dict[str, str]:
        """Format -> kernel name of what ``platform`` itself accelerates (the reference is not listed)."""
        return {key.split("@", 1)[0]: e.item.kernel or e.item.name for key, e in self.quant_methods.items()
                if key.endswith(f"@{platform}")}

    def communicator_for(self, platform: str) -> Communicator | None:
        found = [e.item for e in self.communicators.values() if e.item.platform in (platform, ANY_PLATFORM)]
        return found[0] if found else None
