"""``--quantization int8`` and ``--quantization fp8``: an unquantized checkpoint is loaded as usual and each
linear layer's weight is quantized per output channel when loading ends (vLLM's dynamic fp8 does the same), and so
is each routed expert's (``llmctl.quantization.moe``).

int8 is W8A16: the activations stay in ``--dtype``. Quantizing them per token as well (W8A8, which the int8
format and the CPU's VNNI kernel run for compressed-tensors W8A8 checkpoints) needs a calibrated checkpoint:
done naively, at load, SmolLM2-135M no longer names the capital of France. fp8 runs W8A8 with dynamic
per-token e4m3 activations, as vLLM's fp8 does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llmctl.quantization.base import LinearQuantizer, QParam, QuantConfig, QuantizedPart
from llmctl.quantization.reference import FP8_MAX
from llmctl.quantization.sharding import rank_split

if TYPE_CHECKING:
    from llmctl.layers.linear import Linear
    from llmctl.models.moe import SparseMoE
    from llmctl.quantization.moe import MoEQuantMethod


def quantize_int8_per_channel(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 [N, K], float32 scales [N, 1]); ``amax``: each row's largest magnitude
    when ``w`` holds only some of the row's columns (a row-parallel rank's)."""
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1, keepdim=True) if amax is None else amax
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(wf / scales).clamp_(-127, 127).to(torch.int8), scales


def quantize_fp8_per_channel(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1, keepdim=True) if amax is None else amax
    scales = torch.clamp(amax / FP8_MAX, min=1e-12)
    return (wf / scales).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


class LoadTimeLinear(LinearQuantizer):
    def __init__(self, prefix: str, method: str) -> None:
        super().__init__(prefix)
        self.method = method

    def params(self, layer: Linear, dtype: torch.dtype) -> dict[str, QParam]:
        return {"weight": QParam((layer.out_features, layer.in_features), dtype, in_dim=1)}

    def finish(self, layer: Linear) -> list[QuantizedPart]:
        w = self.take(layer, "weight")
        amax = None
        split = rank_split(layer)
        if split is not None and split[2] == "input":
            # Each rank holds some columns of every row: the scale is the whole row's, as with one rank (every
            # rank finishes its layers in the same order, so these gathers pair up).
            local = w.to(torch.float32).abs().amax(dim=1, keepdim=True)
            amax = layer.tp.all_gather(local, dim=1).amax(dim=1, keepdim=True)  # type: ignore[attr-defined]
        if self.method == "int8":
            q, scales = quantize_int8_per_channel(w, amax)
            spec = self.spec(layer, "int8", 8, layer.in_features)
        else:
            q, scales = quantize_fp8_per_channel(w, amax)
            spec = self.spec(layer, "fp8", 8, layer.in_features, act="fp8")
        return [QuantizedPart(spec, {"qweight": q, "scales": scales})]


class LoadTimeConfig(QuantConfig):
    def __init__(self, method: str) -> None:
        if method not in ("int8", "fp8"):
            raise ValueError(f"quantization: {method!r} cannot quantize at load; use int8 or fp8")
        self.name = method

    def describe(self) -> str:
        acts = "dynamic per-token fp8 activations" if self.name == "fp8" else "activations in the model dtype"
        return f"{self.name} (quantized at load, per channel, {acts})"

    def linear_quantizer(self, prefix: str, layer: Linear, shard_names: Sequence[str]) -> LinearQuantizer | None:
        if layer.dequantize_after_load:  # read as a plain weight after loading: rounding it would only add error
            return None
        return LoadTimeLinear(prefix, self.name)

    def moe_method(self, prefix: str, moe: SparseMoE) -> MoEQuantMethod | None:
        from llmctl.quantization.moe import LoadTimeExperts

        return LoadTimeExperts(prefix, self.name)
