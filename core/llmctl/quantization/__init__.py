"""Quantized linear layers: checkpoint formats unpacked into core's weight formats, and the kernels that run them.

``resolve_quant_config`` picks the method (``--quantization``, or detected from the checkpoint) before the model
is built; ``attach_quantization`` / ``finish_quantization`` (``layers``) wire it into the model's ``Linear``s.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from llmctl.quantization.base import LinearQuantizer, QuantConfig

if TYPE_CHECKING:
    from llmctl.loader.source import ModelSource

logger = logging.getLogger("llmctl.quantization")

# vLLM's names. gguf, compressed-tensors, gptq and awq describe a checkpoint; int8 and fp8 quantize at load.
# "none" (llmctl's own) loads a GGUF's weights as plain tensors in the model dtype, as transformers does.
QUANTIZATION_METHODS: tuple[str, ...] = ("gguf", "compressed-tensors", "gptq", "awq", "int8", "fp8", "none")
DEQUANTIZE = "none"
CHECKPOINT_METHODS = frozenset({"gguf", "compressed-tensors", "gptq", "awq"})
_ALIASES = {"compressed_tensors": "compressed-tensors"}


def normalize_method(value: Any) -> str | None:
    """None for unset; raises naming ``quantization`` for anything unknown."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"quantization: expected a method name, got {type(value).__name__}")
    name = _ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization: unknown method {value!r}; supported: {', '.join(QUANTIZATION_METHODS)}")
    return name


def checkpoint_quantization(source: ModelSource) -> tuple[str | None, dict[str, Any] | None]:
    """The method a checkpoint is stored in, and its config (config.json ``quantization_config``)."""
    if source.gguf_file is not None:
        return "gguf", None
    qc = getattr(source.hf_config, "quantization_config", None)
    if qc is None:
        return None, None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = str(qc.get("quant_method", "")).lower()
    method = _ALIASES.get(method, method)
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization: the checkpoint's quantization_config names quant_method {method!r}, "
                         f"which llmctl does not load; supported: {', '.join(sorted(CHECKPOINT_METHODS))}")
    return method, qc


def resolve_quant_config(requested: str | None, source: ModelSource) -> QuantConfig | None:
    """The method to run with: the checkpoint's own, or ``requested`` on an unquantized checkpoint."""
    requested = normalize_method(requested)
    stored, qc = checkpoint_quantization(source)
    if requested == DEQUANTIZE:
        if stored not in (None, "gguf"):
            raise ValueError(f"quantization: none dequantizes GGUF files at load; this checkpoint is stored as "
                             f"{stored}, which is run as it is (leave quantization unset)")
        return None
    if stored is not None and requested not in (None, stored):
        raise ValueError(f"quantization: the checkpoint is already quantized with {stored}; it cannot be run as "
                         f"{requested} (leave quantization unset, or set it to {stored})")
    if requested in ("int8", "fp8"):
        from llmctl.quantization.load_time import LoadTimeConfig

        return LoadTimeConfig(requested)
    if requested in CHECKPOINT_METHODS and stored is None:
        raise ValueError(f"quantization: {requested} describes a quantized checkpoint, but {source.model} has no "
                         f"quantization_config (to quantize an unquantized model at load use int8 or fp8)")
    if stored == "gguf":
        return _gguf_config(source, explicit=requested == "gguf")
    if stored == "compressed-tensors":
        from llmctl.quantization.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig.from_config(qc or {})
    if stored == "gptq":
        from llmctl.quantization.gptq_awq import GPTQConfig

        return GPTQConfig.from_config(qc or {})
    if stored == "awq":
        from llmctl.quantization.gptq_awq import AWQConfig

        return AWQConfig.from_config(qc or {})
    return None


def _gguf_config(source: ModelSource, explicit: bool) -> QuantConfig | None:
    """GGUF weights stay quantized, as vLLM and llama.cpp run them: a quarter to a half of the bytes per decode step,
    and on the CPU plugin's kernels a faster step than the same weights dequantized (docs/performance.md).
    ``quantization="none"`` dequantizes at load instead (the caller handles it). Architectures whose tensor names
    llmctl does not map itself load through transformers, dequantized: refused when gguf was asked for by name,
    dequantized with a log line when it was not."""
    from llmctl.loader.gguf_file import open_gguf
    from llmctl.loader.gguf_hf import KEPT_QUANTIZED_ARCHS, mapped_tensor_names
    from llmctl.quantization.gguf import GGUFConfig

    g = open_gguf(source.local_dir / str(source.gguf_file))
    if g.architecture not in KEPT_QUANTIZED_ARCHS:
        if explicit:
            raise ValueError(f"quantization: gguf weights are kept quantized for architectures "
                             f"{', '.join(sorted(KEPT_QUANTIZED_ARCHS))}; this file is {g.architecture!r} (leave "
                             f"quantization unset, or set it to none, to load it dequantized)")
        logger.info("quantization: %s GGUF files are dequantized at load (kept quantized: %s)", g.architecture,
                    ", ".join(sorted(KEPT_QUANTIZED_ARCHS)))
        return None
    config = GGUFConfig.from_file(g, mapped_tensor_names(g, source.hf_config))
    return config if config.quantized_types() else None


__all__ = ["CHECKPOINT_METHODS", "DEQUANTIZE", "LinearQuantizer", "QUANTIZATION_METHODS", "QuantConfig",
           "checkpoint_quantization", "normalize_method", "resolve_quant_config"]
