"""A plugin that registers a good platform, a backend shadowing core's, then something that is not a backend."""

from llmctl.plugins import hookimpl

from tests.fake_plugins.common import FakeAttention, FakePlatform

LLMCTL_API_VERSION = "2.0"


@hookimpl
def llmctl_register_platforms(register) -> None:
    register(FakePlatform("fake-malformed"))


@hookimpl
def llmctl_register_attention_backends(register) -> None:
    # Same name as core's reference backend with a higher priority: it replaces core's entry for now.
    register(FakeAttention("torch-reference", "*", priority=1000))
    register(object())
