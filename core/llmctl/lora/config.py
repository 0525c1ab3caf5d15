"""The engine-wide LoRA limits (vLLM's names), checked once before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass

MAX_SUPPORTED_RANK = 64


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1  # adapters resident on the device at once: the most distinct adapters in one step
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters cached on the host (LRU); None = max_loras

    def __post_init__(self) -> None:
        for name, lo, hi in (("max_loras", 1, 256), ("max_lora_rank", 1, MAX_SUPPORTED_RANK)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name}: must be an integer in [{lo}, {hi}], got {value!r}")
        cpu = self.max_cpu_loras
        if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < self.max_loras):
            raise ValueError(f"max_cpu_loras: must be an integer >= max_loras ({self.max_loras}), got {cpu!r}")

    @property
    def cpu_cache_size(self) -> int:
        return self.max_cpu_loras or self.max_loras
