"""Reference ops (the oracle), reference paged attention, and the op table layers call (``Ops``).

Nothing here knows about plugins: the registry in :mod:`llmctl.plugins` fills an :class:`Ops` table per platform.
"""

from llmctl.ops.op_table import Ops

__all__ = ["Ops"]
