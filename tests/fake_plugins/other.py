"""A second well-formed plugin (to prove one broken plugin does not stop the others)."""

from llmctl.plugins import hookimpl

from tests.fake_plugins.common import FakePlatform

LLMCTL_API_VERSION = "2.3"


@hookimpl
def llmctl_register_platforms(register) -> None:
    register(FakePlatform("fake-other", device_type="otherdev"))
