"""A plugin written for another major version of the plugin API."""

from llmctl.plugins import hookimpl

from tests.fake_plugins.common import FakePlatform

LLMCTL_API_VERSION = "1.3"


@hookimpl
def llmctl_register_platforms(register) -> None:
    register(FakePlatform("fake-old-api"))
