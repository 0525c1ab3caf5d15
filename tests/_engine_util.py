"""Shared helpers of the engine behaviour tests (not a test module)."""

from __future__ import annotations

import contextlib

import pytest
import torch

# Stats that must return to their idle values once nothing is in flight.
IDLE_KEYS = ("kv_blocks_free", "num_running", "num_waiting")


@contextlib.contextmanager
def one_torch_thread():
    """The tiny models are ~30x faster on one intra-op thread when the cores are shared with other work (engines
    in these tests also pass ``num_threads=1``, since an engine sets the thread count when it starts)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


def assert_all_blocks_free(stats: dict) -> None:
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats


def greedy_ids(out) -> list[int]:
    return list(out.outputs[0].token_ids)
