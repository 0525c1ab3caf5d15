"""Multimodal (image) input for generating models: validation and preprocessing on the caller's thread
(``processor``), the per-request placeholder ranges and content hashes (``inputs``), and the cache of encoder
outputs the model runner reads from (``encoder_cache``). See docs/multimodal.md."""

from llmctl.multimodal.inputs import MultiModalFeature, hash_image

__all__ = ["MultiModalFeature", "hash_image"]
