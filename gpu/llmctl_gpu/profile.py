"""KV-cache sizing by measurement on a GPU: what is left of the card after the weights and the worst step."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

GPU_MEMORY_UTILIZATION_ENV = "LLMCTL_GPU_MEMORY_UTILIZATION"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def gpu_memory_utilization_from_env() -> float:
    """The share of a GPU the engine may fill (weights, activations and KV cache) when neither
    ``gpu_memory_utilization`` nor ``kv_cache_memory`` is set; an environment variable so a deployment can tune
    it without touching the command line."""
    raw = os.environ.get(GPU_MEMORY_UTILIZATION_ENV)
    if raw is None:
        return DEFAULT_GPU_MEMORY_UTILIZATION
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{GPU_MEMORY_UTILIZATION_ENV}: expected a number in (0, 1], got {raw!r}") from exc
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{GPU_MEMORY_UTILIZATION_ENV}: expected a number in (0, 1], got {raw!r}")
    return value



@dataclass(frozen=True)
class KvBudget:
    kv_bytes: int
    num_blocks: int | None
    max_concurrency: float | None


def kv_budget(kv_bytes: int, bytes_per_block: int | None = None, block_size: int | None = None,
              max_model_len: int | None = None) -> KvBudget:
    """Blocks and full-length sequences that ``kv_bytes`` holds (what the profile reports to the user)."""
    blocks = kv_bytes // bytes_per_block if bytes_per_block else None
    conc = None
    if blocks is not None and block_size and max_model_len:
        conc = blocks / -(-max_model_len // block_size)
    return KvBudget(kv_bytes, blocks, conc)


def profile_kv_cache_size(
    run_forward: Callable[[], Any],
    gpu_memory_utilization: float = 0.9,
    *,
    bytes_per_block: int | None = None,
    block_size: int | None = None,
    max_model_len: int | None = None,
    device: int | None = None,
) -> int:
    """Bytes left for the KV cache after the model is loaded.

    Runs ``run_forward`` (a forward at the maximum batch the engine will schedule) and takes its peak
    activation memory from ``torch.cuda.max_memory_allocated``. Everything already in use on the device
    (weights, the CUDA context, other processes) comes from ``mem_get_info``. The KV cache gets
    ``total * gpu_memory_utilization`` minus both; the block count and max concurrency are logged.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization}")
    if not torch.cuda.is_available():
        raise RuntimeError("profile_kv_cache_size needs a GPU: torch.cuda.is_available() is False")
    dev = torch.cuda.current_device() if device is None else device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info(dev)
    baseline = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    run_forward()
    torch.cuda.synchronize(dev)
    activation_peak = torch.cuda.max_memory_allocated(dev) - baseline
    used_before = total - free_before
    kv_bytes = max(0, int(total * gpu_memory_utilization) - used_before - activation_peak)
    budget = kv_budget(kv_bytes, bytes_per_block, block_size, max_model_len)
    logger.info("KV cache profile: total %.2f GiB, in use %.2f GiB, activation peak %.2f GiB -> KV %.2f GiB%s%s",
                total / 2**30, used_before / 2**30, activation_peak / 2**30, kv_bytes / 2**30,
                f", {budget.num_blocks} blocks" if budget.num_blocks is not None else "",
                f", max concurrency {budget.max_concurrency:.1f}x at max_model_len" if budget.max_concurrency
                else "")
    return kv_bytes
