"""LLaVA (``LlavaForConditionalGeneration``, the llava-1.5 layout) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``): a CLIP/SigLIP vision tower, a two-layer projector, and a native
Llama-family language model.

The vision tower is transformers' own module (``AutoModel.from_config(vision_config)``): it runs eagerly, once
per image, on the image's preprocessed pixels, outside the paged KV cache (every patch attends to every patch and
nothing of it is reused by later tokens). Its hidden states at ``vision_feature_layer`` (the CLS row dropped under
the ``default`` strategy) go through the projector, and the resulting rows replace the embeddings of the image's
placeholder tokens before the language model runs; from there on, an image is just a run of prompt positions in
the KV cache.

LLaVA-NeXT ("anyres") encodes a downscaled whole image plus the tiles of the image resized to the closest
``image_grid_pinpoints`` resolution; the tiles' features are laid out as one grid, the padding the resize added
is cut off, and a learned ``image_newline`` row ends every grid row, so an image's token count depends on its
size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmctl.layers._module import EngineModule
from llmctl.layers._params import empty_param
from llmctl.layers.linear import Linear
from llmctl.models.base import ModelContext
from llmctl.models.language_model_wrapper import WrapsLanguageModel
from llmctl.multimodal.inputs import MultiModalFeature

ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def _feature_layers(cfg: Any) -> list[int]:
    layer = getattr(cfg, "vision_feature_layer", -2)
    return [int(x) for x in layer] if isinstance(layer, (list, tuple)) else [int(layer)]


def image_feature_size(cfg: Any) -> int:
    """Placeholder tokens per image: one per patch, plus CLIP's class token unless the strategy drops it."""
    vc = cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    has_cls = vc.model_type == "clip_vision_model"
    drop = 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "default" else 0
    return patches + int(has_cls) - drop


def check_config(cfg: Any) -> None:
    """Refuses, before anything is built, the LLaVA variants this module does not reproduce."""
    text_type = getattr(cfg.text_config, "model_type", None)
    if text_type not in _TEXT_MODEL_TYPES:
        raise ValueError(f"model: LLaVA with a {text_type!r} language model is not supported natively "
                         f"(supported: {', '.join(_TEXT_MODEL_TYPES)})")
    vision_type = getattr(cfg.vision_config, "model_type", None)
    if vision_type not in _VISION_MODEL_TYPES:
        raise ValueError(f"model: LLaVA with a {vision_type!r} vision tower is not supported natively "
                         f"(supported: {', '.join(_VISION_MODEL_TYPES)})")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"model: vision_feature_select_strategy {strategy!r} is not supported (default, full)")


def _vision_tower(vision_config: Any, ctx: ModelContext) -> nn.Module:
    """transformers' module, allocated without running its random initialisation (the checkpoint overwrites
    every weight, and initialising a 300M-parameter tower costs seconds)."""
    import copy

    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    cfg = copy.deepcopy(vision_config)
    cfg._attn_implementation = "sdpa"
    with no_init_weights():
        tower = AutoModel.from_config(cfg)
    tower = tower.to(device=ctx.device, dtype=ctx.dtype).eval()
    tower.requires_grad_(False)
    return tower


def _trim_tower(tower: nn.Module, layers: list[int]) -> tuple[list[int], int]:
    """Drops the tower's layers after the last one the features are read from (LLaVA reads the second-to-last:
    its last layer would run for nothing). Returns the feature layers as absolute hidden-state indices (0: the
    embeddings) and the number of layers kept."""
    encoder = getattr(tower, "vision_model", tower).encoder
    n = len(encoder.layers)
    absolute = [i if i >= 0 else n + 1 + i for i in layers]
    if not all(0 <= i <= n for i in absolute):
        raise ValueError(f"model: vision_feature_layer {layers} is outside the tower's {n} layers")
    keep = max(absolute)
    if keep < n:
        encoder.layers = encoder.layers[:keep]
    return absolute, keep


def _dropped_layer(name: str, kept: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layers" and parts[2].isdigit() \
        and int(parts[2]) >= kept


class LlavaProjector(EngineModule):
    def __init__(self, cfg: Any, ctx: ModelContext) -> None:
        super().__init__()
        from llmctl.models.decoder import activation

        kw = dict(dtype=ctx.dtype, device=ctx.device)
        bias = bool(getattr(cfg, "multimodal_projector_bias", True))
        width = cfg.vision_config.hidden_size * len(_feature_layers(cfg))
        self.linear_1 = Linear(width, cfg.text_config.hidden_size, bias=bias, **kw)
        self.act = activation(getattr(cfg, "projector_hidden_act", "gelu"))
        self.linear_2 = Linear(cfg.text_config.hidden_size, cfg.text_config.hidden_size, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(WrapsLanguageModel):
    """Follows :class:`llmctl.models.base.CausalLM`, plus the multimodal hooks: ``image_token_id`` and
    ``image_token_count`` for the input processor, ``embed_input_ids`` and ``embed_multimodal`` for the model
    runner, ``largest_image`` and ``dummy_features`` for start-up profiling."""

    supports_multimodal = True

    @classmethod
    def attention_features(cls, hf_config: Any) -> frozenset[str]:
        check_config(hf_config)  # get_model_class calls this: an unsupported variant falls back or is refused
        return frozenset()

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__()
        from llmctl.models.llama import LlamaForCausalLM

        check_config(hf_config)
        self.config = hf_config
        self.ctx = ctx
        token = getattr(hf_config, "image_token_id", None)  # transformers 5's name; older configs: image_token_index
        self.image_token_id = int(token if token is not None else hf_config.image_token_index)
        self.drop_cls = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
        self.num_image_tokens = image_feature_size(hf_config)
        self.vision_tower = _vision_tower(hf_config.vision_config, ctx)
        self.feature_layers, self.tower_layers = _trim_tower(self.vision_tower, _feature_layers(hf_config))
        self.multi_modal_projector = LlavaProjector(hf_config, ctx)
        self.language_model = LlamaForCausalLM(hf_config.text_config, ctx)

    # -- the engine's calls ---------------------------------------------------------------------------------------
    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Placeholder tokens for an image of ``image_size`` (height, width): fixed for LLaVA-1.5."""
        return self.num_image_tokens

    def largest_image(self) -> tuple[tuple[int, int], int]:
        """The (height, width) whose encoding costs most, and its token count (start-up memory profiling)."""
        side = int(self.config.vision_config.image_size)
        return (side, side), self.num_image_tokens

    def dummy_features(self, count: int) -> list[MultiModalFeature]:
        """``count`` distinct worst-case images (zero pixels), for start-up memory profiling."""
        size, length = self.largest_image()
        side = int(self.config.vision_config.image_size)
        tiles = self._tiles_for(size)
        shape = (tiles, 3, side, side) if tiles else (3, side, side)
        return [MultiModalFeature("image", 0, length, f"profile-{i}".encode(), torch.zeros(shape), size)
                for i in range(count)]

    def _tiles_for(self, image_size: tuple[int, int]) -> int:
        return 0  # one [3, H, W] input per image

    def _project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] tiles -> [n, tokens per tile, text hidden]."""
        out = self.vision_tower(pixel_values.to(device=self.ctx.device, dtype=self.ctx.dtype),
                                output_hidden_states=True, return_dict=True)
        feats = [out.hidden_states[i] for i in self.feature_layers]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        selected = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        if selected.shape[1] != self.num_image_tokens:
            raise ValueError(f"multi_modal_data: the image gives {selected.shape[1]} features, the model expects "
                             f"{self.num_image_tokens} (its image_size is {self.config.vision_config.image_size})")
        return self.multi_modal_projector(selected)

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, num_image_tokens, text hidden]: the rows that replace the placeholders."""
        return self._project(pixel_values)

    @torch.inference_mode()
    def embed_multimodal(self, features: list[MultiModalFeature]) -> list[torch.Tensor]:
        """One [length, text hidden] tensor per feature; images of one pixel shape go through the tower together."""
        out: list[torch.Tensor | None] = [None] * len(features)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(features):
            by_shape.setdefault(tuple(f.pixel_values.shape), []).append(i)
        for idx in by_shape.values():
            encoded = self._project(torch.stack([features[i].pixel_values for i in idx]))
            for j, i in enumerate(idx):
                out[i] = encoded[j]
        return out  # type: ignore[return-value]

    # -- loading ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes both checkpoint layouts: the hub's (``language_model.model.*``, ``language_model.lm_head.*``,
        ``vision_tower.vision_model.*``) and transformers 5's (``model.language_model.*``, ``lm_head.*``,
        ``model.vision_tower.*``). Unknown or missing tensors raise, as for every native model."""
        tower = dict(self.vision_tower.named_parameters())
        tower.update(dict(self.vision_tower.named_buffers()))
        tower_prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower) else ""
        proj = dict(self.multi_modal_projector.named_parameters())
        own = {k: v for k, v in self.named_parameters(recurse=False)}  # LLaVA-NeXT's image_newline
        loaded: set[str] = set()

        def text_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("model.") and name.split(".", 2)[1] in (
                        "vision_tower", "multi_modal_projector", "language_model", "image_newline"):
                    name = name[len("model."):]
                    if name.startswith("language_model."):  # transformers 5: the base model has no "model."
                        name = "language_model.model." + name[len("language_model."):]
                if name.startswith("lm_head."):
                    name = "language_model." + name
                if name.startswith("vision_tower."):
                    rest = name[len("vision_tower."):].removeprefix("vision_model.")
                    key = tower_prefix + rest
                    if key not in tower:
                        if "position_ids" in key or _dropped_layer(rest, self.tower_layers):
                            continue  # a buffer some exports keep; a layer past the last one features come from
                        raise ValueError(f"checkpoint tensor {name} has no place in the vision tower")
                    _copy(tower[key], tensor, name)
                    loaded.add(key)
                elif name.startswith("multi_modal_projector."):
                    key = name[len("multi_modal_projector."):]
                    if key not in proj:
                        raise ValueError(f"checkpoint tensor {name} has no place in the projector")
                    _copy(proj[key], tensor, name)
                    loaded.add("projector." + key)
                elif name in own:
                    _copy(own[name], tensor, name)
                    loaded.add(name)
                elif name.startswith("language_model."):
                    yield name[len("language_model."):], tensor
                else:
                    raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__}")

        self.language_model.load_weights(text_weights())
        missing = [k for k, _ in self.vision_tower.named_parameters() if k not in loaded]
        missing += [f"multi_modal_projector.{k}" for k in proj if f"projector.{k}" not in loaded]
        missing += [k for k in own if k not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT (llava-v1.6): anyres tiling with the "spatial_unpad" layout transformers implements."""

    def __init__(self, hf_config: Any, ctx: ModelContext) -> None:
        super().__init__(hf_config, ctx)
        if not self.drop_cls or hf_config.vision_config.model_type != "clip_vision_model":
            raise ValueError("model: LLaVA-NeXT is supported with a CLIP tower and vision_feature_select_strategy "
                             "'default'")
        self.image_newline = empty_param(hf_config.text_config.hidden_size, dtype=ctx.dtype, device=ctx.device)
        self.grid_pinpoints = [list(p) for p in hf_config.image_grid_pinpoints]
        self.tile = int(hf_config.vision_config.image_size)
        self.side = self.tile // int(hf_config.vision_config.patch_size)

    def _grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        rows, cols = get_anyres_image_grid_shape(tuple(image_size), self.grid_pinpoints, self.tile)
        return int(rows), int(cols)

    def num_patches(self, image_size: tuple[int, int]) -> int:
        rows, cols = self._grid(image_size)
        return 1 + rows * cols  # the downscaled whole image, then the grid's tiles

    def _tiles_for(self, image_size: tuple[int, int]) -> int:
        return self.num_patches(image_size)

    def largest_image(self) -> tuple[tuple[int, int], int]:
        """The pinpoint resolution with the most tiles (ties: the most tokens)."""
        best = max(((int(h), int(w)) for h, w in self.grid_pinpoints),
                   key=lambda s: (self.num_patches(s), self.image_token_count(s)))
        return best, self.image_token_count(best)

    def _unpadded(self, grid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        return unpad_image(grid, tuple(image_size))

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        rows, cols = self._grid(image_size)
        h, w = self._unpadded(torch.empty(1, rows * self.side, cols * self.side, device="meta"), image_size).shape[1:]
        return self.num_image_tokens + h * (w + 1)

    @torch.inference_mode()
    def embed_multimodal(self, features: list[MultiModalFeature]) -> list[torch.Tensor]:
        """All tiles of all images through the tower at once, then each image's grid laid out and unpadded."""
        if any(f.image_size is None for f in features):
            raise ValueError("multi_modal_data: LLaVA-NeXT needs each image's original size")
        counts = [self.num_patches(f.image_size) for f in features]  # type: ignore[arg-type]
        tiles = torch.cat([f.pixel_values[:n] for f, n in zip(features, counts, strict=True)])
        encoded = self._project(tiles).split(counts)
        return [self._pack(e, f.image_size) for e, f in zip(encoded, features, strict=True)]  # type: ignore[arg-type]

    def _pack(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        base, tiles = feats[0], feats[1:]
        rows, cols = self._grid(image_size)
        s = self.side
        grid = tiles.view(rows, cols, s, s, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = self._unpadded(grid, image_size)  # [hidden, h, w]
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, grid])


ARCHITECTURE_CLASSES = {"LlavaForConditionalGeneration": LlavaForConditionalGeneration,
                        "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration}


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name}: shape {tuple(src.shape)} does not match {tuple(dst.shape)}")
    dst.data.copy_(src.to(dtype=dst.dtype, device=dst.device))
