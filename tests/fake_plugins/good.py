"""A well-formed plugin: an available platform, an unavailable one, and two attention backends."""

from llmctl.plugins import hookimpl

from tests.fake_plugins.common import FakeAttention, FakePlatform

LLMCTL_API_VERSION = "2.0"


@hookimpl
def llmctl_register_platforms(register) -> None:
    register(FakePlatform("fake-good", device_type="fakedev"))
    register(FakePlatform("fake-absent", available=False, reason="no fake accelerator found (driver missing)",
                          device_type="absentdev"))


@hookimpl
def llmctl_register_attention_backends(register) -> None:
    register(FakeAttention("fake-attn-fast", "fake-good", priority=10))
    register(FakeAttention("fake-attn-slow", "fake-good", priority=1))
