"""What a request carries for each image: where its placeholder run sits in the prompt, its preprocessed pixels,
and a hash of its content.

The hash joins the prefix-cache block hashes of every block the placeholder run touches: two prompts with the same
token ids (the same number of placeholders) but different images must never share KV blocks, and the same image
in the same place must. It also keys the encoder-output cache, so a repeated image is encoded once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class MultiModalFeature:
    modality: str  # "image"
    offset: int  # first placeholder position in the prompt
    length: int  # placeholder tokens (= rows of encoder output)
    mm_hash: bytes
    # what the encoder takes: [3, H, W], [tiles, 3, H, W] (LLaVA-NeXT, padded) or [patches, patch features]
    # (Qwen2-VL's flattened patches)
    pixel_values: torch.Tensor
    image_size: tuple[int, int] | None = None  # the original (height, width), where the layout depends on it
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL: the patch grid (temporal, height, width)

    @property
    def end(self) -> int:
        return self.offset + self.length


def hash_image(image: Any) -> bytes:
    """The decoded content (mode, size and pixels), not the bytes it was sent as: the same picture sent as PNG and
    as a data: URL of that PNG, or fetched twice, is the same image."""
    h = hashlib.blake2b(digest_size=16, person=b"llmctl-mm-image")
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.digest()


def block_extra_keys(features: list[MultiModalFeature], start: int, end: int) -> bytes:
    """The hashes of the images whose placeholders overlap token positions ``[start, end)``, in prompt order."""
    return b"".join(f.mm_hash for f in features if f.offset < end and start < f.end)
