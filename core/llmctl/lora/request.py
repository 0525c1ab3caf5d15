"""What a request says about its adapter, with vLLM's field names so scripts carry over."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_int_id`` identifies the adapter (and keys its KV prefix cache); two requests with the same id must
    name the same adapter. ``lora_path`` is a PEFT adapter directory (``adapter_config.json`` + weights)."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_request.lora_name: must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_request.lora_int_id: must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_request.lora_path: must be a path to a PEFT adapter directory")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id
