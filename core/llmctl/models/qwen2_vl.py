"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a
dynamic-resolution vision tower with a 2x2 patch merger, and a native Qwen2 language model with multimodal RoPE.

The vision tower is transformers' module, as for LLaVA: it runs eagerly on an image's flattened patches
(``[patches, 3 * temporal_patch * patch * patch]``, as many as the image processor's resize gives) outside the
paged KV cache, and its merger turns each 2x2 block of patches into one row of the language model's width.
Qwen2.5-VL's tower (window attention over most blocks, RMSNorm, a gated MLP) is a different transformers module
behind the same call, so both architectures share everything here.

M-RoPE: every token has three positions (temporal, height, width). Text tokens have three equal ones that count
on from the previous token; an image's tokens share its start position as the temporal one and add their row
and column in the merged grid to it for the other two, and the text after the image continues from the image's
largest position + 1. The positions of a prompt are computed once per request from its images' grids
(:meth:`mrope_positions`); a token after the prompt sits at its sequence index plus the request's
``mrope_position_delta`` (negative: an image takes fewer positions than tokens) on all three rows, which is plain
RoPE, so decode steps take ordinary one-row positions and may replay a captured graph.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmctl.models.base import ModelContext
from llmctl.models.language_model_wrapper import WrapsLanguageModel
from llmctl.multimodal.inputs import MultiModalFeature

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_VISION_CLASSES = {
    "qwen2_vl_vision": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl_vision": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                          "Qwen2_5_VisionTransformerPretrainedModel"),
}


def check_config(cfg: Any) -> None:
    """Refuses, before anything is built, what this module does not reproduce."""
    vision_type = getattr(cfg.vision_config, "model_type", None)
    if vision_type not in _VISION_CLASSES:
        raise ValueError(f"model: a {vision_type!r} vision tower is not supported natively "
                         f"(supported: {', '.join(_VISION_CLASSES)})")
    params = dict(getattr(cfg.text_config, "rope_parameters", None) or {})
    if not params.get("mrope_section"):
        raise ValueError("model: text_config.rope_parameters has no mrope_section")
    if params.get("mrope_interleaved"):
        raise ValueError("model: interleaved M-RoPE (rope_parameters.mrope_interleaved) is not supported")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"model: M-RoPE with rope_type {params.get('rope_type')!r} is not supported (default)")


def _text_config(cfg: Any) -> Any:
    """The language model's config read as Qwen2's (q/k/v biases, no o_proj bias), with the tying of the outer
    config, where transformers 5 keeps it."""
    text = copy.deepcopy(cfg.text_config)
    text.model_type = "qwen2"
    text.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False)
                                    or getattr(cfg.text_config, "tie_word_embeddings", False))
    return text


def _vision_tower(vision_config: Any, ctx: ModelContext) -> nn.Module:
    """transformers' module, allocated without its random initialisation (the checkpoint overwrites it)."""
    import importlib

    from transformers.initialization import no_init_weights

    module, name = _VISION_CLASSES[vision_config.model_type]
    cls = getattr(importlib.import_module(module), name)
    cfg = copy.deepcopy(vision_config)
    cfg._attn_implementation = "sdpa"
    with no_init_weights():
        tower = cls(cfg)
    tower = tower.to(device=ctx.device, dtype=ctx.dtype).eval()
    tower.requires_grad_(False)
    return tower


def mrope_positions(features: list[MultiModalFeature], num_tokens: int, merge: int) -> tuple[np.ndarray, int]:
    """``([3, num_tokens] int64 positions, delta)`` for a prompt whose images are ``features`` (in prompt order,
    each with its ``grid_thw`` in patches); ``delta`` = largest position + 1 - ``num_tokens``, what every later
    token's index is shifted by. transformers' ``get_rope_index`` for images."""
    out = np.empty((3, num_tokens), dtype=np.int64)
    pos = 0  # the next text position
    cursor = 0  # the next prompt index
    for f in sorted(features, key=lambda f: f.offset):
        if f.grid_thw is None:
            raise ValueError("multi_modal_data: an image of an M-RoPE model has no grid (image_grid_thw)")
        t, h, w = f.grid_thw[0], f.grid_thw[1] // merge, f.grid_thw[2] // merge
        if t * h * w != f.length:
            raise ValueError(f"prompt: an image's placeholder run has {f.length} tokens, its {t}x{h}x{w} grid needs "
                             f"{t * h * w}")
        text = f.offset - cursor
        out[:, cursor:f.offset] = np.arange(pos, pos + text)
        pos += text
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        out[:, f.offset:f.end] = grid + pos
        pos += max(h, w)
        cursor = f.end
    out[:, cursor:] = np.arange(pos, pos + num_tokens - cursor)
    last = int(out.max()) if num_tokens else -1
    return out, last + 1 - num_tokens


class Qwen2VLForConditionalGeneration(WrapsLanguageModel):
    """Follows :class:`llmctl.models.base.CausalLM`, plus LLaVA's multimodal hooks (``image_token_id``,
    ``image_token_count``, ``embed_input_ids``, ``embed_multimodal``, ``largest_image``, ``dummy_features``) and
    the M-RoPE ones (``uses_mrope``, ``mrope_positions``). The engine prepares its images with the checkpoint's
    image processor alone (``mm_image_processor_only``): transformers' joint processor also wants a video
    processor, which needs torchvision."""

    supports_multimodal = True
    uses_mrope = True
    mm_image_processor_only = True
    chat_image_separator = ""  # Qwen2-VL's template writes an image's wrapper straight before the text

    @classmethod
    def attention_features(cls, hf_config: Any) -> frozenset[str]:
        check_config(hf_config)
        return frozenset()

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        from llmctl.models.llama import LlamaForCausalLM

        check_config(hf_config)
        self.config = hf_config
        self.ctx = ctx
        vc = hf_config.vision_config
        self.image_token_id = int(hf_config.image_token_id)
        # what a chat turn puts around each image's placeholder run
        self.image_wrap_token_ids = (int(hf_config.vision_start_token_id), int(hf_config.vision_end_token_id))
        self.patch_size = int(vc.patch_size)
        self.merge_size = int(vc.spatial_merge_size)
        self.temporal_patch_size = int(vc.temporal_patch_size)
        self.in_channels = int(getattr(vc, "in_channels", 3))
        # the image processor's pixel bounds (transformers' defaults until read_processor_config)
        self.min_pixels, self.max_pixels = 56 * 56, 28 * 28 * 1280
        self.visual = _vision_tower(vc, ctx)
        self.language_model = LlamaForCausalLM(_text_config(hf_config), ctx)

    def read_processor_config(self, model_dir: Path) -> None:
        """The image processor's resize bounds decide an image's grid, so its token count; the engine core calls
        this once the checkpoint is local."""
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            return  # no preprocessor_config.json: transformers' defaults, as its processor would use
        size = getattr(proc, "size", None) or {}
        self.min_pixels = int(size.get("shortest_edge", getattr(proc, "min_pixels", None) or self.min_pixels))
        self.max_pixels = int(size.get("longest_edge", getattr(proc, "max_pixels", None) or self.max_pixels))
        for attr, own in (("patch_size", self.patch_size), ("merge_size", self.merge_size),
                          ("temporal_patch_size", self.temporal_patch_size)):
            value = getattr(proc, attr, None)
            if value is not None and int(value) != own:
                raise ValueError(f"model: preprocessor_config.json has {attr} {value}, the vision tower {own}")

    # -- the engine's calls ---------------------------------------------------------------------------------------
    # forward, compute_logits, kv_cache_spec, embed_input_ids: WrapsLanguageModel's (``positions`` may be [3, T]
    # M-RoPE rows, or [T] where all three rows are equal, as in decode steps)

    def _grid(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        try:
            h, w = smart_resize(int(image_size[0]), int(image_size[1]), factor=factor, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels)
        except ValueError as exc:
            raise ValueError(f"multi_modal_data: a {image_size[1]}x{image_size[0]} image: {exc}") from None
        return 1, h // self.patch_size, w // self.patch_size

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Tokens for an image of (height, width): its resized patch grid over the 2x2 merge."""
        t, h, w = self._grid(image_size)
        return t * h * w // self.merge_size**2

    def largest_image(self) -> tuple[tuple[int, int], int]:
        """The square image with the most tokens the pixel bound allows (start-up memory profiling)."""
        factor = self.patch_size * self.merge_size
        side = max(factor, int(self.max_pixels**0.5) // factor * factor)
        return (side, side), self.image_token_count((side, side))

    def dummy_features(self, count: int) -> list[MultiModalFeature]:
        size, length = self.largest_image()
        grid = self._grid(size)
        width = self.in_channels * self.temporal_patch_size * self.patch_size**2
        return [MultiModalFeature("image", 0, length, f"profile-{i}".encode(), torch.zeros(grid[0] * grid[1] * grid[2],
                                  width), size, grid) for i in range(count)]

    def mrope_positions(self, features: list[MultiModalFeature], num_tokens: int) -> tuple[np.ndarray, int]:
        return mrope_positions(features, num_tokens, self.merge_size)

    @torch.inference_mode()
    def embed_multimodal(self, features: list[MultiModalFeature]) -> list[torch.Tensor]:
        """All images of the step through the tower in one call (its attention stays within each image)."""
        if any(f.grid_thw is None for f in features):
            raise ValueError("multi_modal_data: an image of an M-RoPE model has no grid (image_grid_thw)")
        pixels = torch.cat([f.pixel_values for f in features]).to(device=self.ctx.device, dtype=self.ctx.dtype)
        grids = torch.tensor([f.grid_thw for f in features], dtype=torch.int64, device=self.ctx.device)
        out = self.visual(pixels, grid_thw=grids)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        return list(merged.split([int(g.prod()) // self.merge_size**2 for g in grids]))

    # -- loading ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes the hub's layout (``visual.*``, ``model.*``, ``lm_head.*``) and transformers 5's in-memory one
        (``model.visual.*``, ``model.language_model.*``). Unknown or missing tensors raise."""
        tower = dict(self.visual.named_parameters())
        tower.update(dict(self.visual.named_buffers()))
        loaded: set[str] = set()

        def text_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("model.visual."):
                    name = name[len("model."):]
                if name.startswith("visual."):
                    key = name[len("visual."):]
                    if key not in tower:
                        raise ValueError(f"checkpoint tensor {name} has no place in the vision tower")
                    _copy(tower[key], tensor, name)
                    loaded.add(key)
                    continue
                if name.startswith("model.language_model."):
                    name = "model." + name[len("model.language_model."):]
                if name.startswith(("model.", "lm_head.")):
                    yield name, tensor
                else:
                    raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")

        self.language_model.load_weights(text_weights())
        missing = [f"visual.{k}" for k, _ in self.visual.named_parameters() if k not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):  # noqa: N801 (the architecture's name)
    """Qwen2.5-VL: the same language model and M-RoPE for images; its tower (window attention, RMSNorm, gated
    MLP) is transformers' ``Qwen2_5_VisionTransformerPretrainedModel``."""


ARCHITECTURE_CLASSES = {"Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
                        "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration}


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name}: shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.data.copy_(src.to(dtype=dst.dtype, device=dst.device))
