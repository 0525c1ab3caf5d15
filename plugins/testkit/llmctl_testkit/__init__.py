"""llmctl-testkit: the contract a backend plugin must meet, as tests a vendor runs against their own package.

    pip install llmctl-testkit my-backend
    pytest --pyargs llmctl_testkit --llmctl-platform my-platform

Every assertion message starts with the contract clause it checks in brackets (``[attention.forward] ...``), so
a failure report says which promise of :mod:`llmctl.plugins.types` the backend broke, not just which line.
The checks themselves live in :mod:`llmctl_testkit.checks` and can be called outside pytest as well.
"""

__version__ = "0.1.0"
