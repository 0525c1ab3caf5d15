"""A plugin whose hook name is misspelled, so it would silently register nothing."""

from llmctl.plugins import hookimpl

from tests.fake_plugins.common import FakePlatform

LLMCTL_API_VERSION = "2.0"


@hookimpl
def llmctl_register_platfroms(register) -> None:
    register(FakePlatform("fake-misspelled"))
