"""Rotary position embedding with the RoPE scaling variants of Hugging Face configs.

Frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` so every scaling type (linear, dynamic NTK,
llama3, yarn, ...) matches the reference bit for bit; only the application runs through ``ctx.ops``.
"""

from __future__ import annotations

from typing import Any

import torch

from llmctl.layers._module import EngineModule
from llmctl.ops import Ops


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's RoPE settings in transformers' standardized form (``rope_type``, ``rope_theta``, ...)."""
    standardize = getattr(hf_config, "standardize_rope_params", None)
    if callable(standardize):
        standardize()
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def compute_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim // 2] float32, attention_scaling)`` exactly as transformers computes them.

    Dynamic NTK is evaluated at the config's ``max_position_embeddings``, i.e. the value transformers starts
    from; transformers re-derives it per call once a sequence grows past that, which a static cache cannot.
    """
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(EngineModule):
    """Holds the ``[max_position, rotary_dim]`` cos|sin table the ``rotary_embedding`` op indexes by position.

    The table stays float32 whatever the model dtype: it is tiny, and rounding it would shift every position.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_position: int, ops: Ops,
                 *, is_neox_style: bool = True, device: torch.device | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.is_neox_style = is_neox_style
        self.rotary_dim = 2 * inv_freq.numel()
        self.max_position = max_position
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq.float()[None, :]
        cache = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` [T, H, D], ``key`` [T, Hk, D] -> rotated copies (or in place, depending on the kernel)."""
        return self.ops.rotary_embedding(positions, query, key, self.cos_sin_cache, self.is_neox_style)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL): each rotary frequency band takes its angle from one of three position rows
    (temporal, height, width; ``mrope_section`` frequencies each, in that order, both neox halves alike).

    ``positions`` [3, T] picks, per token, each band's cos|sin from its row, and the gathered per-token table goes
    to the same ``rotary_embedding`` op indexed by ``arange(T)``, so every platform's kernel applies it. Text
    tokens have three equal rows, which is plain RoPE: decode steps pass ``positions`` [T] and skip the gather.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_position: int, ops: Ops,
                 mrope_section: list[int], *, device: torch.device | None = None) -> None:
        super().__init__(inv_freq, attention_scaling, max_position, ops, is_neox_style=True, device=device)
        half = inv_freq.numel()
        if len(mrope_section) != 3 or sum(mrope_section) != half:
            raise ValueError(f"rope_parameters.mrope_section: {list(mrope_section)} must be three sizes summing to "
                             f"the {half} rotary frequencies")
        rows = torch.repeat_interleave(torch.arange(3), torch.tensor([int(x) for x in mrope_section]))
        self.register_buffer("section_rows", rows.to(device), persistent=False)
        self.register_buffer("columns", torch.arange(half, device=device), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, query, key)
        half = self.columns.numel()
        chosen = positions[self.section_rows].t()  # [T, half]: each band's position
        cos = self.cos_sin_cache[chosen, self.columns]
        sin = self.cos_sin_cache[chosen, self.columns + half]
        table = torch.cat((cos, sin), dim=-1)
        index = torch.arange(positions.shape[1], device=positions.device)
        return self.ops.rotary_embedding(index, query, key, table, True)


def get_rope(hf_config: Any, head_dim: int, ops: Ops, device: torch.device) -> RotaryEmbedding:
    inv_freq, scaling = compute_inv_freq(hf_config, head_dim)
    params = rope_parameters(hf_config)
    section = params.get("mrope_section")
    if section:
        max_position = int(getattr(hf_config, "max_position_embeddings", 4096))
        return MRotaryEmbedding(inv_freq, scaling, max_position, ops, list(section), device=device)
    max_position = int(getattr(hf_config, "max_position_embeddings", 4096))
    if params["rope_type"] == "dynamic":
        # The config's window is the one before scaling; the factor is how far it is meant to stretch.
        max_position = int(max_position * float(params.get("factor", 1.0)))
    return RotaryEmbedding(inv_freq, scaling, max_position, ops, is_neox_style=True, device=device)
