"""Pick the model class for a checkpoint, choose the dtype, and build a loaded model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmctl.layers._module import EngineModule
from llmctl.loader.source import ModelSource
from llmctl.loader.weights import iter_weights
from llmctl.models.base import ModelContext
from llmctl.plugins.registry import Registry

logger = logging.getLogger(__name__)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


MODEL_IMPLS = ("auto", "native", "transformers")


def get_model_class(hf_config: Any, registry: Registry, model_impl: str = "auto") -> Any:
    """The class that runs this checkpoint. ``native``: llmctl's own implementation or an error; ``transformers``:
    the transformers fallback; ``auto`` (vLLM's default): native when llmctl implements the architecture and its
    config's quirks, otherwise the fallback when transformers can build the model."""
    from llmctl.models.transformers_fallback import TransformersForCausalLM, transformers_can_build

    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl: must be one of {', '.join(MODEL_IMPLS)}, got {model_impl!r}")
    archs = list(getattr(hf_config, "architectures", None) or [])
    asked = " / ".join(archs) if archs else "(none named in config.json)"
    supported = ", ".join(sorted(registry.models)) or "none (no model plugin registered)"
    native, why_not = None, ""
    if model_impl != "transformers":
        for arch in archs:
            entry = registry.models.get(arch)
            if entry is not None:
                native = entry.item.model_cls
                break
        if native is not None:
            try:
                check = getattr(native, "attention_features", None)
                if callable(check):
                    check(hf_config)  # reads the config into the model's spec: raises on a quirk it lacks
                return native
            except ValueError as exc:
                if model_impl == "native":
                    raise
                why_not = f" ({exc})"
                native = None
        if model_impl == "native":
            raise ValueError(f"model: architecture {asked} is not supported natively; supported: {supported} "
                             f"(model_impl='transformers' or 'auto' runs other transformers models)")
    if transformers_can_build(hf_config):
        if why_not:
            logger.info("model: %s runs through the transformers fallback%s", asked, why_not)
        return TransformersForCausalLM
    raise ValueError(f"model: architecture {asked} is not supported: neither natively (supported: {supported}) "
                     f"nor by the installed transformers")


def _as_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return _DTYPE_NAMES.get(value.lower().removeprefix("torch."))
    return None


def resolve_dtype(requested: str | torch.dtype, hf_config: Any, platform_dtypes: list[torch.dtype],
                  quantized_checkpoint: bool = False,
                  emulated_dtypes: list[torch.dtype] | tuple[torch.dtype, ...] = ()) -> torch.dtype:
    """``"auto"`` keeps the checkpoint's dtype when the platform runs it and otherwise takes the platform's
    preferred one; a checkpoint that names none is float32 (transformers' default). A quantized checkpoint
    (GGUF) is dequantized at load, and 4-8 bit weights lose nothing in bfloat16, so it takes the platform's
    fastest dtype. A dtype the platform only emulates is taken when named, never by ``"auto"``: the user who
    names it wants its numerics, the one who says auto wants speed."""
    if not platform_dtypes:
        raise ValueError("dtype: the platform lists no supported dtypes")
    if isinstance(requested, str) and requested.lower() == "auto":
        ckpt = _as_dtype(getattr(hf_config, "dtype", None)) or _as_dtype(getattr(hf_config, "torch_dtype", None))
        if quantized_checkpoint:
            return platform_dtypes[0]
        want = ckpt or torch.float32
        return want if want in platform_dtypes else platform_dtypes[0]
    dtype = _as_dtype(requested)
    if dtype is None:
        raise ValueError(f"dtype: {requested!r} is not a valid dtype; use auto, {', '.join(_DTYPE_NAMES)}")
    if dtype in platform_dtypes:
        return dtype
    name = str(dtype).removeprefix("torch.")
    if dtype in emulated_dtypes:
        logger.warning("dtype %s runs without native instructions on this platform (emulated); dtype=auto would "
                       "take %s", name, str(platform_dtypes[0]).removeprefix("torch."))
        return dtype
    names = ", ".join(str(d).removeprefix("torch.") for d in platform_dtypes)
    emulated = ", ".join(str(d).removeprefix("torch.") for d in emulated_dtypes)
    raise ValueError(f"dtype: {name} is not supported on this platform; supported: {names}"
                     + (f" (emulated: {emulated})" if emulated else ""))


def load_model(source: ModelSource, ctx: ModelContext, registry: Registry, platform: str = "*",
               model_impl: str = "auto", model_cls: Any = None,
               before_bind: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """With ``ctx.quant`` (a ``QuantConfig``) the linear layers are given their quantized parameters before
    loading and bound to ``platform``'s kernels right after (``model.quant_summary`` says which). ``model_impl``
    chooses native or the transformers fallback (see ``get_model_class``); ``model_cls``: when the caller already
    chose one (a pooling model for a decoder checkpoint). ``before_bind`` sees the loaded model before the platform
    packs its weights (LoRA attaches there, since adapters change which GEMMs may be fused)."""
    model_cls = model_cls or get_model_class(source.hf_config, registry, model_impl)
    model = model_cls(source.hf_config, ctx)
    from tqdm.auto import tqdm

    quant = ctx.quant
    keep = None
    tensors = None
    # A tensor-parallel rank reads only its slices and a pipeline stage only its layers' tensors, so the tensors
    # stay unread until the layer that takes them.
    lazy = ctx.tp.size > 1 or ctx.pp.size > 1
    if quant is not None:
        from llmctl.quantization.layers import attach_quantization, checked_tensors

        covered = attach_quantization(model, quant)
        keep = getattr(quant, "keeps_quantized", None)
        tensors = checked_tensors(iter_weights(source, keep, lazy=lazy), covered)
    # A progress bar on a terminal (tqdm turns itself off when stderr is not one): large checkpoints take a while.
    weights = tqdm(tensors or iter_weights(source, keep, lazy=lazy), desc="Loading weights", unit=" tensors",
                   disable=None, leave=False)
    model.load_weights(weights)
    if quant is not None:
        from llmctl.quantization.layers import finish_quantization

        model.quant_summary = finish_quantization(model, quant, registry, platform, ctx.dtype)
    # Parameters were allocated in ctx.dtype and loading casts into them; only non-parameter buffers that a
    # model keeps in float32 on purpose (RoPE tables) differ, so cast parameters alone.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != ctx.dtype:
            p.data = p.data.to(ctx.dtype)
    if before_bind is not None:
        before_bind(model)
    for module in model.modules():
        if hasattr(module, "bind_ops"):
            module.bind_ops(ctx.ops)
    model.eval()
    for module in model.modules():
        if isinstance(module, EngineModule):
            module.freeze_attribute_lookup()
    return model
