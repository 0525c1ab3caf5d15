"""Attach a quantization config to a built model's linear layers before loading, and bind each layer to its
platform kernel after loading."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from llmctl.layers.linear import Linear
from llmctl.plugins.registry import Registry
from llmctl.plugins.types import QuantLinearSpec, QuantMethod
from llmctl.quantization.base import DEFAULT_PACKED_MODULES, QuantConfig, QuantizedPart

logger = logging.getLogger("llmctl.quantization")


@dataclass
class QuantSummary:
    """What the start-up log and the engine's stats say about the model's quantization."""

    method: str
    layers: int = 0
    kernels: Counter[str] = field(default_factory=Counter)  # "format (detail) -> kernel" -> layers
    fallbacks: Counter[str] = field(default_factory=Counter)  # reason -> layers
    weight_bytes: int = 0
    moe_layers: int = 0  # MoE layers whose routed experts are kept quantized
    moe_methods: Counter[str] = field(default_factory=Counter)  # "MoE method (quantization)" -> MoE layers
    moe_kernels: Counter[str] = field(default_factory=Counter)  # "format (detail) -> kernel" -> expert projections
    dequantized: Counter[str] = field(default_factory=Counter)  # "format (detail)" -> layers dequantized at load

    def describe(self) -> str:
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items()))
        text = f"{self.method}: {self.layers} layers, {kernels}"
        if self.dequantized:
            formats = ", ".join(f"{k} x{n}" for k, n in sorted(self.dequantized.items()))
            text += f"; dequantized at load (read as plain weights): {formats}"
        if self.moe_layers:
            methods = ", ".join(sorted(self.moe_methods))
            experts = ", ".join(f"{k} x{n}" for k, n in sorted(self.moe_kernels.items()))
            text += f"; routed experts of {self.moe_layers} MoE layers by {methods}: {experts}"
        return text


def shard_names(model: nn.Module, prefix: str, layer: Linear) -> list[str]:
    """The checkpoint prefixes a (merged) layer was loaded from."""
    if getattr(layer, "output_sizes", None) is None:
        return [prefix]
    mapping = getattr(model, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
    parent, _, leaf = prefix.rpartition(".")
    parts = mapping.get(leaf)
    if parts is None or len(parts) != len(layer.output_sizes):  # type: ignore[attr-defined]
        raise ValueError(f"quantization: merged layer {prefix} has no packed_modules_mapping entry naming its "
                         f"{len(layer.output_sizes)} checkpoint projections")  # type: ignore[attr-defined]
    return [f"{parent}.{p}" if parent else p for p in parts]


def attach_quantization(model: nn.Module, config: QuantConfig) -> dict[str, tuple[Linear, int | None]]:
    """Give each linear layer the config covers its quantizer; returns checkpoint prefix -> (layer, shard index
    or None for an unmerged layer) for the layers it covers."""
    covered: dict[str, tuple[Linear, int | None]] = {}
    module_name = getattr(model, "module_name", None)
    if module_name is not None:
        config.use_module_names(module_name)
    for prefix, module in list(model.named_modules()):
        quantize_experts = getattr(module, "quantize_experts", None)  # a MoE layer's routed experts
        if quantize_experts is not None:
            quantize_experts(config, prefix)
        if isinstance(module, Linear) and module.quantizable:
            names = shard_names(model, prefix, module)
            quantizer = config.linear_quantizer(prefix, module, names)
            if quantizer is not None:
                module.set_quantizer(quantizer)
                merged = getattr(module, "output_sizes", None) is not None
                for i, name in enumerate(names):
                    covered[name] = (module, i if merged else None)
    return covered


def checked_tensors(weights: Iterable[tuple[str, torch.Tensor]], covered: dict[str, tuple[Linear, int | None]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, each of a quantized layer checked against the method's layout first, so a
    checkpoint whose config and tensors disagree fails naming the method and the tensor."""
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        hit = covered.get(prefix)
        if hit is not None and leaf != "bias":
            layer, shard = hit
            quantizer = layer.quantizer
            assert quantizer is not None
            check_tensor(quantizer.method, layer, leaf, shard, tensor, name, f"layer {quantizer.prefix}",
                         [f"{prefix}.{p}" for p in quantizer.param_names()])
        yield name, tensor


def check_tensor(method: str, layer: Linear, leaf: str, shard: int | None, tensor: torch.Tensor, name: str,
                 where: str, expected_names: list[str]) -> None:
    """A checkpoint tensor against its quantized layer's layout (``where``: "layer P" or "expert P"), failing
    with a message naming the tensor, the method and what was expected."""
    quantizer = layer.quantizer
    assert quantizer is not None
    expected = quantizer.expected_shape(layer, leaf, shard)
    if expected is None:
        raise ValueError(f"quantization {method}: checkpoint tensor {name} is not part of the layout of {where} "
                         f"(expected {', '.join(expected_names)})")
    if expected != () and tuple(tensor.shape) != expected:
        raise ValueError(f"quantization {method}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                         f"{expected} for this {where.split()[0]} and quantization config")


def select_kernel(registry: Registry, platform: str, spec: QuantLinearSpec, dtype: torch.dtype
                  ) -> tuple[QuantMethod, list[str]]:
    """The best kernel that accepts the layer, and the reasons of those (better ones) that declined."""
    declined: list[str] = []
    for kernel in registry.quant_kernels(spec.format, platform):
        answer = kernel.supports(spec, dtype)
        if answer:
            return kernel, declined
        declined.append(f"{kernel.kernel or kernel.name}: {answer.reason}")
    raise ValueError(f"quantization: no kernel on platform {platform!r} runs layer {spec.layer} "
                     f"({spec.describe()}); " + ("; ".join(declined) or "none registered for this format"))


def _binder(registry: Registry, platform: str, dtype: torch.dtype, summary: QuantSummary, counts: Counter[str]
            ) -> Callable[[list[QuantizedPart]], list[tuple[QuantMethod, dict[str, torch.Tensor], QuantLinearSpec,
                                                               slice | None]]]:
    """Binds a layer's (or an expert projection's) parts to the best kernel for each, counting them in ``counts``."""
    def bind(layer_parts: list[QuantizedPart]) -> list[tuple[QuantMethod, dict[str, torch.Tensor], QuantLinearSpec,
                                                             slice | None]]:
        parts = []
        for part in layer_parts:
            kernel, declined = select_kernel(registry, platform, part.spec, dtype)
            weights = kernel.process_weights(part.weights, part.spec)
            parts.append((kernel, weights, part.spec, part.out_slice))
            counts[f"{part.spec.describe()} -> {kernel.kernel or kernel.name}"] += 1
            summary.weight_bytes += sum(t.numel() * t.element_size() for t in weights.values())
            for reason in declined:
                summary.fallbacks[reason] += 1
        return parts

    return bind


def dequantized_weight(parts: list[QuantizedPart], layer: Linear) -> torch.Tensor:
    """A finished layer's weight ``[N, K]`` in float32, in the input order of the layer's callers (a part's
    ``perm``, GPTQ's act order, undone; a column it repeats holds zero weights past the first)."""
    from llmctl.quantization.reference import dequantize_weight

    rows = []
    for part in parts:
        w = dequantize_weight(part.weights, part.spec)
        perm = part.weights.get("perm")
        if perm is not None:  # the kernel reads input perm[j] into column j
            w = w.new_zeros(w.shape[0], layer.in_features).index_add_(1, perm.long(), w)
        rows.append(w)
    weight = torch.cat(rows) if len(rows) > 1 else rows[0]
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"quantization: layer {parts[0].spec.layer} dequantizes to shape {tuple(weight.shape)}, "
                         f"expected {(layer.out_features, layer.in_features)}")
    return weight


def finish_quantization(model: nn.Module, config: QuantConfig, registry: Registry, platform: str,
                        dtype: torch.dtype) -> QuantSummary:
    summary = QuantSummary(method=config.describe())
    bind_linear = _binder(registry, platform, dtype, summary, summary.kernels)
    bind_expert = _binder(registry, platform, dtype, summary, summary.moe_kernels)
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(module, "finish_expert_quantization"):
            module.finish_expert_quantization(bind_expert)
            summary.moe_layers += 1
            summary.moe_methods[f"{type(method).__name__} ({method.method})"] += 1
            continue
        if not isinstance(module, Linear) or module.quantizer is None:
            continue
        if module.dequantize_after_load:
            parts = module.quantizer.finish(module)
            module.set_dequantized(dequantized_weight(parts, module), dtype)
            summary.dequantized[", ".join(sorted({p.spec.describe() for p in parts}))] += 1
            continue
        module.bind_quantized(bind_linear(module.quantizer.finish(module)))
        summary.layers += 1
    _quantize_lm_head(model, config, registry, platform, dtype, summary)
    for reason, n in summary.fallbacks.items():
        logger.warning("quantization: %d layer(s) fall back to a slower kernel because %s", n, reason)
    logger.info("quantization %s", summary.describe())
    return summary


def _quantize_lm_head(model: nn.Module, config: QuantConfig, registry: Registry, platform: str, dtype: torch.dtype,
                      summary: QuantSummary) -> None:
    """Bind the output projection to a kernel on the checkpoint's quantized head, where the config keeps one
    (single rank only: a tensor-parallel head splits the vocabulary, which the config's part does not)."""
    from llmctl.layers.embedding import LMHead

    heads = [m for m in model.modules() if isinstance(m, LMHead)]
    if len(heads) != 1 or getattr(getattr(heads[0], "tp", None), "size", 1) != 1:
        return
    head = heads[0]
    part = config.lm_head_part(head.vocab_size, head.hidden_size)
    if part is None:
        return
    try:
        kernel, _ = select_kernel(registry, platform, part.spec, dtype)
    except ValueError as exc:  # no kernel for the head's format here: it stays in the model dtype
        logger.info("quantization: output projection left dequantized (%s)", exc)
        return
    weights = kernel.process_weights(part.weights, part.spec)
    head.bind_quantized([(kernel, weights, part.spec, None)])
    summary.kernels[f"lm_head {part.spec.describe()} -> {kernel.kernel or kernel.name}"] += 1
    summary.weight_bytes += sum(t.numel() * t.element_size() for t in weights.values())
