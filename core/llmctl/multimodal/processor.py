"""``multi_modal_data`` -> prompt token ids with each image's placeholder run expanded, plus one
:class:`MultiModalFeature` per image. Runs on the caller's thread (``LLMEngine.prepare_request``), never on the
engine loop.

A text prompt goes through the checkpoint's own processor (transformers' ``AutoProcessor``: the image processor
resizes and normalises, and the placeholder string is expanded to one token per image feature, exactly as
transformers prepares the same prompt). A token-id prompt (the server's chat path, which tokenizes the rendered
template itself) may hold either one placeholder token per image, expanded here, or the already expanded run.

Models whose joint processor cannot be built without extras (Qwen2-VL's wants a video processor, which needs
torchvision) use the image processor alone: a text prompt is tokenized by the engine's tokenizer and its
placeholders expanded here, which is what the joint processor does (it repeats the placeholder string before
tokenizing, and a special token tokenizes alone). An image processor that returns ``image_grid_thw`` gives its
patches flattened over all images; each image's rows and grid are cut out of them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmctl.multimodal.inputs import MultiModalFeature, hash_image

SUPPORTED_MODALITIES = ("image",)
DEFAULT_LIMIT_PER_PROMPT = {"image": 1}


def parse_limit_mm_per_prompt(value: Any) -> dict[str, int]:
    """vLLM's ``limit_mm_per_prompt``: a dict or its JSON text, modality -> most items in one prompt."""
    if value is None:
        return dict(DEFAULT_LIMIT_PER_PROMPT)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"limit_mm_per_prompt: not valid JSON ({exc.msg}); expected e.g. '{{\"image\": 2}}'") \
                from None
    if not isinstance(value, dict):
        raise ValueError(f"limit_mm_per_prompt: expected a JSON object such as {{\"image\": 2}}, got "
                         f"{type(value).__name__}")
    out = dict(DEFAULT_LIMIT_PER_PROMPT)
    for k, v in value.items():
        if k not in SUPPORTED_MODALITIES:
            raise ValueError(f"limit_mm_per_prompt: unknown modality {k!r} (supported: "
                             f"{', '.join(SUPPORTED_MODALITIES)})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"limit_mm_per_prompt: {k} must be an integer >= 0, got {v!r}")
        out[k] = v
    return out


def _images(mm_data: Any, limit: int) -> list[Any]:
    from PIL import Image

    if not isinstance(mm_data, dict):
        raise ValueError(f"multi_modal_data: expected a dict such as {{'image': PIL.Image}}, got "
                         f"{type(mm_data).__name__}")
    unknown = set(mm_data) - set(SUPPORTED_MODALITIES)
    if unknown:
        raise ValueError(f"multi_modal_data: unsupported modality {sorted(unknown)[0]!r} (supported: image)")
    items = mm_data.get("image")
    if items is None:
        return []
    images = list(items) if isinstance(items, (list, tuple)) else [items]
    if len(images) > limit:
        raise ValueError(f"multi_modal_data.image: {len(images)} images, more than limit_mm_per_prompt allows "
                         f"({limit})")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"multi_modal_data.image[{i}]: expected a PIL image, got {type(img).__name__}")
    return [img if img.mode == "RGB" else img.convert("RGB") for img in images]


def placeholder_runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of ``token_id``."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == token_id:
            j = i
            while j < n and ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


class MultiModalProcessor:
    def __init__(self, model_dir: Path, image_token_id: int, tokens_for: Callable[[tuple[int, int]], int],
                 limit_per_prompt: dict[str, int] | None = None, trust_remote_code: bool = False,
                 tokenizer: Any = None, wrap_token_ids: tuple[int, int] | None = None,
                 chat_image_separator: str = "\n") -> None:
        """``tokens_for``: the model's placeholder count for an image of (height, width). ``tokenizer``: given,
        only the checkpoint's image processor is loaded and text prompts are tokenized with it.
        ``wrap_token_ids``: the tokens a chat turn puts before and after each image's placeholder (Qwen2-VL's
        vision start and end). ``chat_image_separator``: what a chat message puts between an image's placeholder
        and what follows it (a line break, or nothing where the model's own template writes nothing)."""
        self.model_dir = model_dir
        self.image_token_id = image_token_id
        self.tokens_for = tokens_for
        self.limits = dict(limit_per_prompt or DEFAULT_LIMIT_PER_PROMPT)
        self.trust_remote_code = trust_remote_code
        self.tokenizer = tokenizer
        self.wrap_token_ids = wrap_token_ids
        self.chat_image_separator = chat_image_separator
        self._processor: Any = None
        self._lock = threading.Lock()

    @property
    def processor(self) -> Any:
        with self._lock:
            if self._processor is None:
                from transformers import AutoImageProcessor, AutoProcessor

                try:
                    if self.tokenizer is not None:
                        self._processor = _ImageOnly(AutoImageProcessor.from_pretrained(
                            str(self.model_dir), trust_remote_code=self.trust_remote_code), self.tokenizer,
                            self.image_token_id)
                    else:
                        self._processor = AutoProcessor.from_pretrained(str(self.model_dir),
                                                                        trust_remote_code=self.trust_remote_code)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"multi_modal_data: the checkpoint's processor could not be loaded: {exc}") \
                        from None
            return self._processor

    def image_token_text(self) -> str:
        """The placeholder string a chat template or prompt uses for one image (``<image>`` for LLaVA)."""
        tok = getattr(self.processor, "tokenizer", None)
        text = getattr(self.processor, "image_token", None)
        if isinstance(text, str):
            return text
        return str(tok.convert_ids_to_tokens(self.image_token_id))

    def image_prompt_ids(self) -> list[int]:
        """What a chat turn holds for one image before expansion: the placeholder, wrapped where the model wraps
        it."""
        if self.wrap_token_ids is None:
            return [self.image_token_id]
        return [self.wrap_token_ids[0], self.image_token_id, self.wrap_token_ids[1]]

    def image_prompt_text(self) -> str:
        """``image_prompt_ids`` as text (offline chat puts it in the message; the server shows it in the prompt)."""
        if self.wrap_token_ids is None:
            return self.image_token_text()
        tok = getattr(self.processor, "tokenizer", None)
        start, end = (str(t) for t in tok.convert_ids_to_tokens(list(self.wrap_token_ids)))
        return start + self.image_token_text() + end

    def process(self, text: str | None, ids: list[int] | None,
                mm_data: Any) -> tuple[list[int], list[MultiModalFeature]]:
        images = _images(mm_data, self.limits.get("image", 0))
        if not images:
            if ids is None:
                raise ValueError("multi_modal_data: holds no image")
            return ids, []
        proc = self.processor
        if ids is None:
            self._check_count(str(text).count(self.image_token_text()), len(images))
            try:
                out = proc(text=text, images=images, return_tensors="pt")
            except (ValueError, OSError) as exc:
                raise ValueError(f"multi_modal_data: the processor refused the input: {exc}") from None
            ids = [int(t) for t in out["input_ids"][0]]
        else:
            ids = self._expand(ids, [self.tokens_for((img.height, img.width)) for img in images])
            try:
                out = proc.image_processor(images=images, return_tensors="pt")
            except (ValueError, OSError) as exc:
                raise ValueError(f"multi_modal_data: the image processor refused the input: {exc}") from None
        pixels, grids = _per_image(out, len(images))
        runs = placeholder_runs(ids, self.image_token_id)
        self._check_count(len(runs), len(images))
        features = []
        for i, ((offset, length), img, px, grid) in enumerate(zip(runs, images, pixels, grids, strict=True)):
            want = self.tokens_for((img.height, img.width))
            if length != want:
                raise ValueError(f"prompt: image {i}'s placeholder run has {length} tokens; the model takes {want} "
                                 f"for a {img.width}x{img.height} image")
            features.append(MultiModalFeature("image", offset, length, hash_image(img), px.contiguous(),
                                              (img.height, img.width), grid))
        return ids, features

    def expand_placeholders(self, ids: list[int], images: list[Any]) -> list[int]:
        """``ids`` with one placeholder token per image expanded to that image's run (the server does this before
        the engine, so its usage and prompt-logprob positions count the image tokens)."""
        return self._expand(ids, [self.tokens_for((img.height, img.width)) for img in images])

    def _check_count(self, placeholders: int, images: int) -> None:
        if placeholders != images:
            raise ValueError(f"prompt: {placeholders} image placeholder(s) ({self.image_token_text()}) for {images} "
                             f"image(s) in multi_modal_data; put one placeholder per image")

    def _expand(self, ids: list[int], counts: list[int]) -> list[int]:
        """One placeholder token per image becomes the model's run of ``counts[i]`` tokens; runs already expanded
        stay as they are (a count mismatch is reported by the caller)."""
        out = list(ids)
        runs = placeholder_runs(out, self.image_token_id)
        if len(runs) != len(counts):
            self._check_count(len(runs), len(counts))
        for (offset, length), count in reversed(list(zip(runs, counts, strict=True))):
            if length == 1:
                out[offset:offset + 1] = [self.image_token_id] * count
        return out


def _per_image(out: Any, count: int) -> tuple[list[Any], list[tuple[int, int, int] | None]]:
    """Each image's pixels and, where the processor gives one, its patch grid (``image_grid_thw``; the pixels are
    then every image's patches in one flat run)."""
    pixels = out["pixel_values"]
    grids = out.get("image_grid_thw") if hasattr(out, "get") else None
    if grids is None:
        return list(pixels), [None] * count
    thw = [tuple(int(x) for x in g) for g in grids.tolist()]
    return list(pixels.split([t * h * w for t, h, w in thw])), thw  # type: ignore[misc]


class _ImageOnly:
    """The joint processor's text + images call from the image processor and the engine's tokenizer: each
    placeholder string is repeated to its image's token count (from the grid the image processor chose), then
    the text is tokenized."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_token_id: int) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = str(tokenizer.convert_ids_to_tokens(image_token_id))

    def __call__(self, text: str, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        out = dict(self.image_processor(images=images, return_tensors=return_tensors))
        grids = out.get("image_grid_thw")
        if grids is None:
            raise ValueError("the image processor gives no image_grid_thw")
        merge = int(getattr(self.image_processor, "merge_size", 1)) ** 2
        token = self.image_token
        pieces = text.split(token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} placeholders for {len(images)} images")
        expanded = pieces[0]
        for grid, piece in zip(grids.tolist(), pieces[1:], strict=True):
            expanded += token * (int(grid[0] * grid[1] * grid[2]) // merge) + piece
        out["input_ids"] = torch.tensor([self.tokenizer(expanded)["input_ids"]])
        return out
