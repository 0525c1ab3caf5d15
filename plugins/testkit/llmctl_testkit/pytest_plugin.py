"""The pytest side of the testkit: command-line options and the session fixtures the contract tests use.

pytest auto-loads this module (entry point group ``pytest11``) in every session of an environment where the
testkit is installed, so it must stay cheap and inert: it only declares options and fixtures, imports neither
torch nor llmctl at import time, and its fixtures are all prefixed ``testkit_`` so they cannot shadow a
project's own fixtures.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from llmctl.plugins import Platform, PluginManager

EXTRA_PLUGINS_ENV = "LLMCTL_TESTKIT_EXTRA_PLUGINS"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmctl-testkit", "llmctl backend contract tests")
    group.addoption("--llmctl-platform", action="store", default=None, metavar="NAME",
                    help="platform (as registered by its plugin) that the llmctl contract tests run against")
    group.addoption("--llmctl-extra-plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE and load it as an llmctl plugin besides the installed entry points "
                         f"(repeatable; also ${EXTRA_PLUGINS_ENV}, comma-separated). For plugins under "
                         "development that are not pip-installed yet, and for the testkit's own self-test.")


def extra_plugin_modules(config: pytest.Config) -> list[str]:
    """Module names given by option and environment, in that order, without duplicates."""
    names = list(config.getoption("--llmctl-extra-plugin") or [])
    names += [x.strip() for x in os.environ.get(EXTRA_PLUGINS_ENV, "").split(",") if x.strip()]
    return list(dict.fromkeys(names))


def platform_name(config: pytest.Config) -> str | None:
    return config.getoption("--llmctl-platform")


def get_manager(config: pytest.Config) -> PluginManager:
    """Load plugins once per session and install the result as the process-wide manager, so that the engine
    built by the end-to-end test (``llmctl.LLM``) sees exactly the plugins the other tests checked."""
    cached = getattr(config, "_llmctl_testkit_manager", None)
    if cached is None:
        from llmctl_testkit.harness import load_plugin_manager

        cached = load_plugin_manager(extra_plugin_modules(config))
        config._llmctl_testkit_manager = cached  # type: ignore[attr-defined]
    return cached


@pytest.fixture(scope="session")
def testkit_platform_name(pytestconfig: pytest.Config) -> str:
    name = platform_name(pytestconfig)
    if not name:
        pytest.skip("llmctl contract tests need --llmctl-platform NAME")
    return name


@pytest.fixture(scope="session")
def testkit_extra_plugins(pytestconfig: pytest.Config) -> list[str]:
    return extra_plugin_modules(pytestconfig)


@pytest.fixture(scope="session")
def testkit_manager(pytestconfig: pytest.Config, testkit_platform_name: str) -> PluginManager:
    return get_manager(pytestconfig)


@pytest.fixture(scope="session")
def testkit_platform(testkit_manager: PluginManager, testkit_platform_name: str) -> Platform:
    from llmctl_testkit.harness import describe_plugins

    entry = testkit_manager.registry.platforms.get(testkit_platform_name)
    if entry is None:
        pytest.fail(f"[registration.platform] no plugin registers a platform named {testkit_platform_name!r}; "
                    f"registered platforms: {sorted(testkit_manager.registry.platforms) or 'none'}; plugins: "
                    f"{describe_plugins(testkit_manager)}", pytrace=False)
    return entry.item


@pytest.fixture(scope="session")
def testkit_device(testkit_manager: PluginManager, testkit_platform: Platform) -> Any:
    """The torch device of the platform under test; tests that need the hardware skip when it is absent."""
    probe = testkit_manager.probe(testkit_platform.name)
    if not probe.available:
        pytest.skip(f"platform {testkit_platform.name!r} is not available here: {probe.reason}")
    return testkit_platform.torch_device(0)
