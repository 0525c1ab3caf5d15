"""PluginManager: broken plugins are reported and isolated, env allow/deny lists, platform/backend selection."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint

import pytest
import torch
from llmctl.plugins import API_VERSION, PluginManager
from llmctl.plugins.manager import BUILTIN_PLUGIN, ENTRY_POINT_GROUP

FAKES = {
    "good": "tests.fake_plugins.good",
    "other": "tests.fake_plugins.other",
    "import_error": "tests.fake_plugins.import_error",
    "old_api": "tests.fake_plugins.old_api",
    "misspelled": "tests.fake_plugins.misspelled",
    "malformed": "tests.fake_plugins.malformed",
}


def eps(*names: str) -> list[EntryPoint]:
    return [EntryPoint(n, FAKES[n], ENTRY_POINT_GROUP) for n in names]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("LLMCTL_PLUGINS", "LLMCTL_DISABLE_PLUGINS", "LLMCTL_DEVICE", "LLMCTL_ATTENTION_BACKEND"):
        monkeypatch.delenv(var, raising=False)


def load(*names: str) -> PluginManager:
    return PluginManager().load(entry_points=eps(*names))


def test_import_error_is_reported_and_others_load():
    pm = load("import_error", "good", "other")
    info = pm.plugins["import_error"]
    assert info.broken
    assert "import failed" in info.error and "libfakeaccel.so" in info.error
    assert not pm.plugins["good"].broken and not pm.plugins["other"].broken
    assert {"fake-good", "fake-absent", "fake-other"} <= set(pm.registry.platforms)
    assert pm.registry.attention_backends["fake-attn-fast"].plugin == "good"


def test_wrong_api_version_is_refused_with_a_clear_message():
    pm = load("old_api", "other")
    info = pm.plugins["old_api"]
    assert info.broken and info.api_version == "1.3"
    assert "1.3" in info.error and API_VERSION in info.error and "major" in info.error
    assert "Migrating from 1.x" in info.error
    assert "fake-old-api" not in pm.registry.platforms
    # A minor version difference is fine.
    assert not pm.plugins["other"].broken and "fake-other" in pm.registry.platforms


def test_misspelled_hook_is_reported_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="llmctl.plugins.manager"):
        pm = load("misspelled", "good")
    info = pm.plugins["misspelled"]
    assert info.broken
    assert "llmctl_register_platfroms" in info.error and "misspelled" in info.error
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR and "llmctl_register_platfroms" in r.getMessage()]
    assert loud, "a misspelled hook must be logged as an error"
    assert "fake-misspelled" not in pm.registry.platforms
    assert "fake-good" in pm.registry.platforms


def test_malformed_registration_breaks_the_plugin_and_removes_its_registrations():
    pm = load("malformed", "good")
    info = pm.plugins["malformed"]
    assert info.broken
    assert "malformed" in info.error and "AttentionBackend" in info.error and "object" in info.error
    # Its valid platform (registered by another hook before the bad call) is gone too ...
    assert "fake-malformed" not in pm.registry.platforms
    assert all(e.plugin != "malformed" for e in pm.registry.attention_backends.values())
    # ... and core's backend that it had shadowed is back.
    ref = pm.registry.attention_backends.get("torch-reference")
    assert ref is not None and ref.plugin == BUILTIN_PLUGIN
    assert pm.registry.attention_backends["torch-reference"].item.priority < 1000
    assert not pm.plugins["good"].broken


def test_allow_list(monkeypatch):
    monkeypatch.setenv("LLMCTL_PLUGINS", "other, import_error")
    pm = load("good", "other", "import_error")
    assert pm.plugins["good"].disabled and not pm.plugins["good"].broken
    assert "fake-good" not in pm.registry.platforms
    assert "fake-other" in pm.registry.platforms
    assert pm.plugins["import_error"].broken  # allowed, so it was tried
    assert BUILTIN_PLUGIN in pm.plugins  # core's own registrations are never filtered
    assert "torch-reference" in pm.registry.attention_backends


def test_disable_list(monkeypatch):
    monkeypatch.setenv("LLMCTL_DISABLE_PLUGINS", "good,import_error")
    pm = load("good", "other", "import_error")
    assert pm.plugins["good"].disabled and pm.plugins["import_error"].disabled
    assert not pm.plugins["import_error"].broken  # never imported
    assert "fake-good" not in pm.registry.platforms and "fake-other" in pm.registry.platforms


def test_load_is_idempotent():
    pm = PluginManager()
    pm.load(entry_points=eps("good"))
    platforms = dict(pm.registry.platforms)
    backends = dict(pm.registry.attention_backends)
    n_ops = len(pm.registry.ops)
    assert pm.load(entry_points=eps("good", "other")) is pm
    assert pm.registry.platforms == platforms and pm.registry.attention_backends == backends
    assert len(pm.registry.ops) == n_ops
    assert "other" not in pm.plugins


def test_select_platform_device_argument_and_env(monkeypatch):
    pm = load("good", "other")
    assert pm.select_platform("fake-good").name == "fake-good"
    assert pm.select_platform("fakedev:0").name == "fake-good"  # by torch device type
    monkeypatch.setenv("LLMCTL_DEVICE", "fake-other")
    assert pm.select_platform().name == "fake-other"
    assert pm.select_platform("fake-good").name == "fake-good"  # the argument wins over the env


def test_select_platform_unavailable_gives_the_reason(monkeypatch):
    pm = load("good")
    with pytest.raises(ValueError, match="fake-absent") as e:
        pm.select_platform("fake-absent")
    assert "not available" in str(e.value) and "driver missing" in str(e.value)
    monkeypatch.setenv("LLMCTL_DEVICE", "absentdev")
    with pytest.raises(ValueError, match="driver missing"):
        pm.select_platform()
    with pytest.raises(ValueError, match="no-such-device") as e:
        pm.select_platform("no-such-device")
    assert "fake-good" in str(e.value)  # lists what is installed


def test_attention_backend_override_and_unknown_name(monkeypatch):
    pm = load("good")
    platform = pm.select_platform("fake-good")
    assert pm.select_attention_backend(platform, torch.float32, 16, 16).name == "fake-attn-fast"
    monkeypatch.setenv("LLMCTL_ATTENTION_BACKEND", "fake-attn-slow")
    assert pm.select_attention_backend(platform, torch.float32, 16, 16).name == "fake-attn-slow"
    monkeypatch.setenv("LLMCTL_ATTENTION_BACKEND", "torch-reference")  # any-platform backend
    assert pm.select_attention_backend(platform, torch.float32, 16, 16).name == "torch-reference"
    monkeypatch.setenv("LLMCTL_ATTENTION_BACKEND", "no-such-attn")
    with pytest.raises(ValueError, match="no-such-attn") as e:
        pm.select_attention_backend(platform, torch.float32, 16, 16)
    assert "fake-attn-fast" in str(e.value) and "fake-attn-slow" in str(e.value)
    # The explicit argument beats the env var.
    assert pm.select_attention_backend(platform, torch.float32, 16, 16, name="fake-attn-slow").name == "fake-attn-slow"
