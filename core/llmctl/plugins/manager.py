"""Entry points -> pluggy -> registry, with a broken plugin reported instead of fatal.

Load order: core's built-in registrations first (reference attention and the native models), then every
entry point of the group ``llmctl.plugins`` that ``LLMCTL_PLUGINS`` (comma-separated allow-list) admits and
``LLMCTL_DISABLE_PLUGINS`` does not name. Each plugin is imported, version-checked, validated against the
hookspecs and asked to register on its own, so one bad plugin cannot take the others down.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any

import pluggy
import torch

from llmctl.plugins import hookspecs
from llmctl.plugins.registry import MalformedRegistration, Registry
from llmctl.plugins.types import AttentionBackend, Platform, ProbeResult

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmctl.plugins"
BUILTIN_PLUGIN = "llmctl-core"

_HOOKS: dict[str, str] = {
    "llmctl_register_platforms": "add_platform",
    "llmctl_register_attention_backends": "add_attention_backend",
    "llmctl_register_ops": "add_op",
    "llmctl_register_quantization": "add_quant_method",
    "llmctl_register_communicators": "add_communicator",
    "llmctl_register_models": "add_model",
    "llmctl_doctor_checks": "add_doctor_check",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    api_version: str | None = None
    broken: bool = False
    error: str | None = None
    disabled: bool = False


@dataclass
class PluginManager:
    """Loads plugins once and answers which platform, attention backend and ops to use."""

    registry: Registry = field(default_factory=Registry)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    pm: pluggy.PluginManager = field(default_factory=lambda: pluggy.PluginManager(hookspecs.PROJECT_NAME))
    _probes: dict[str, ProbeResult] = field(default_factory=dict)
    _loaded: bool = False

    def __post_init__(self) -> None:
        self.pm.add_hookspecs(hookspecs)

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, entry_points: Iterable[metadata.EntryPoint] | None = None, extra: dict[str, Any] | None = None,
             include_entry_points: bool = True) -> PluginManager:
        """Load built-ins, entry points and ``extra`` objects (name -> plugin object, for tests). Idempotent."""
        if self._loaded:
            return self
        self._loaded = True
        from llmctl.plugins import builtin

        self._add_plugin(BUILTIN_PLUGIN, builtin, PluginInfo(BUILTIN_PLUGIN, builtin.__name__, "llmctl-core"))
        allow = _env_set("LLMCTL_PLUGINS")
        deny = _env_set("LLMCTL_DISABLE_PLUGINS")
        eps = list(entry_points) if entry_points is not None else (
            list(metadata.entry_points(group=ENTRY_POINT_GROUP)) if include_entry_points else [])
        for ep in eps:
            info = PluginInfo(ep.name, ep.value)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                info.distribution, info.version = dist.metadata["Name"], dist.version
            if ep.name in self.plugins:
                continue  # the same entry point seen twice (e.g. editable + regular install)
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                info.disabled = True
                self.plugins[ep.name] = info
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a plugin's import error must not stop the engine
                self._mark_broken(info, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._add_plugin(ep.name, obj, info)
        for name, obj in (extra or {}).items():
            self._add_plugin(name, obj, PluginInfo(name, getattr(obj, "__name__", type(obj).__name__)))
        return self

    def _add_plugin(self, name: str, obj: Any, info: PluginInfo) -> None:
        info.api_version = getattr(obj, "LLMCTL_API_VERSION", None)
        if name != BUILTIN_PLUGIN:
            problem = _api_version_problem(info.api_version)
            if problem:
                self._mark_broken(info, problem)
                return
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            self._mark_broken(info, f"registration failed: {exc}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            logger.error("plugin %s implements a hook that does not exist (misspelled?): %s", name, exc)
            self._mark_broken(info, f"unknown hook (misspelled?): {exc}")
            return
        self.plugins[name] = info
        for hook_name, adder in _HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name != name:
                    continue
                try:
                    impl.function(register=partial(getattr(self.registry, adder), plugin=name))
                except MalformedRegistration as exc:
                    self._fail_plugin(name, info, f"{hook_name}: malformed registration: {exc}")
                    return
                except Exception as exc:
                    self._fail_plugin(name, info, f"{hook_name} raised {type(exc).__name__}: {exc}")
                    return

    def _fail_plugin(self, name: str, info: PluginInfo, error: str) -> None:
        self.registry.drop_plugin(name)
        self.pm.unregister(name=name)
        self._mark_broken(info, error)

    def _mark_broken(self, info: PluginInfo, error: str) -> None:
        info.broken, info.error = True, error
        self.plugins[info.name] = info
        logger.warning("llmctl plugin %r is broken and was skipped: %s", info.name, error)

    # -- queries ---------------------------------------------------------------------------------------------
    def probe(self, platform: str) -> ProbeResult:
        if platform not in self._probes:
            p = self.registry.platforms[platform].item
            try:
                result = p.probe()
                if not isinstance(result, ProbeResult):
                    result = ProbeResult(False, f"probe() returned {type(result).__name__}, not ProbeResult")
            except Exception as exc:  # the contract says probe never raises; we do not trust it
                result = ProbeResult(False, f"probe() raised {type(exc).__name__}: {exc}")
            self._probes[platform] = result
        return self._probes[platform]

    def platforms_by_priority(self) -> list[Platform]:
        return sorted((e.item for e in self.registry.platforms.values()), key=lambda p: -p.priority)

    def select_platform(self, device: str | None = None) -> Platform:
        """The platform to run on: ``device`` (or ``LLMCTL_DEVICE``) by platform name or torch device type,
        otherwise the highest-priority available one."""
        device = device or os.environ.get("LLMCTL_DEVICE") or None
        if device in (None, "", "auto"):
            reasons = []
            for p in self.platforms_by_priority():
                probe = self.probe(p.name)
                if probe.available:
                    return p
                reasons.append(f"{p.name}: {probe.reason}")
            raise RuntimeError("no usable llmctl platform. " + ("; ".join(reasons) or
                               "No platform plugin is installed: pip install llmctl-cpu (or llmctl-cuda, ...)"))
        device_type = device.split(":")[0]
        candidates = [p for p in self.platforms_by_priority() if device_type in (p.name, p.device_type)]
        if not candidates:
            known = ", ".join(sorted(self.registry.platforms)) or "none"
            raise ValueError(f"device={device!r}: no platform of that name or device type is installed "
                             f"(installed platforms: {known})")
        for p in candidates:
            if self.probe(p.name).available:
                return p
        raise ValueError(f"device={device!r}: platform {candidates[0].name!r} is not available: "
                         f"{self.probe(candidates[0].name).reason}")

    def select_attention_backend(self, platform: Platform, dtype: torch.dtype, head_size: int, block_size: int,
                                 features: frozenset[str] = frozenset(), name: str | None = None) -> AttentionBackend:
        name = name or os.environ.get("LLMCTL_ATTENTION_BACKEND") or None
        backends = self.registry.backends_for(platform.name)
        if name:
            chosen = [b for b in backends if b.name == name]
            if not chosen:
                raise ValueError(f"attention backend {name!r} (LLMCTL_ATTENTION_BACKEND) is not registered for "
                                 f"platform {platform.name!r}; available: {', '.join(b.name for b in backends)}")
            support = chosen[0].supports(dtype, head_size, block_size, features)
            if not support:
                raise ValueError(f"attention backend {name!r} cannot run this model: {support.reason}")
            return chosen[0]
        reasons = []
        for b in backends:
            support = b.supports(dtype, head_size, block_size, features)
            if support:
                if reasons:  # a faster backend was passed over (an 8-bit KV cache it cannot read, say): say why
                    logger.info("attention backend %s selected; skipped %s", b.name, "; ".join(reasons))
                return b
            reasons.append(f"{b.name}: {support.reason}")
        raise ValueError(f"no attention backend on platform {platform.name!r} supports dtype={dtype}, "
                         f"head_size={head_size}, block_size={block_size}: " + "; ".join(reasons))


def _env_set(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None if var == "LLMCTL_PLUGINS" else set()
    return {x.strip() for x in raw.split(",") if x.strip()}


def _api_version_problem(version: Any) -> str | None:
    if version is None:
        return "plugin does not declare LLMCTL_API_VERSION"
    major = str(version).split(".")[0]
    want = hookspecs.API_VERSION.split(".")[0]
    if major != want:
        return (f"plugin was written for plugin API {version}, this llmctl-core speaks {hookspecs.API_VERSION} "
                f"(major versions must match); upgrade the plugin or llmctl-core"
                + ("; see 'Migrating from 1.x' in llmctl's docs/plugins.md" if major == "1" else ""))
    return None


_default: PluginManager | None = None
_default_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginManager().load()
        return _default


def reset_plugin_manager(factory: Callable[[], PluginManager] | None = None) -> PluginManager:
    """Reload plugins (tests change LLMCTL_PLUGINS or install fakes)."""
    global _default
    with _default_lock:
        _default = (factory or (lambda: PluginManager().load()))()
        return _default
