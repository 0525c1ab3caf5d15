"""The plugin contract: hookspecs, registry and manager. Import ``hookimpl`` to implement hooks."""

from llmctl.plugins.hookspecs import API_VERSION, hookimpl, hookspec
from llmctl.plugins.manager import PluginManager, get_plugin_manager, reset_plugin_manager
from llmctl.plugins.types import (
    AttentionBackend,
    Communicator,
    DecodeGraphSpec,
    DecodeStepRunner,
    DeviceInfo,
    DoctorCheck,
    DoctorResult,
    ModelArchitecture,
    OpOverride,
    Platform,
    ProbeResult,
    QuantLinearSpec,
    QuantMethod,
    Support,
)

__all__ = [
    "API_VERSION", "hookimpl", "hookspec", "PluginManager", "get_plugin_manager", "reset_plugin_manager",
    "AttentionBackend", "Communicator", "DecodeGraphSpec", "DecodeStepRunner", "DeviceInfo", "DoctorCheck",
    "DoctorResult", "ModelArchitecture", "OpOverride", "Platform", "ProbeResult", "QuantLinearSpec", "QuantMethod",
    "Support",
]
