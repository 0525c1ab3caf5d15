"""The images of a chat request: checked against the model and ``limit_mm_per_prompt`` before anything is
fetched, then loaded under the server's media policy (``media.MediaConnector``) in worker threads."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmctl_server.errors import bad_request
from llmctl_server.media import MediaConnector


def check_images(engine: Any, images: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """400 when the model takes no images or the request holds more than the per-prompt limit."""
    if not images:
        return images
    mm = getattr(engine, "multimodal", None)
    if mm is None:
        name = getattr(getattr(engine, "model_config", None), "served_model_name", None) or "this model"
        raise bad_request(f"{images[0][0]}: model {name} does not take images (a text-only model)",
                          param="messages")
    limit = mm.limits.get("image", 0)
    if len(images) > limit:
        raise bad_request(f"messages: {len(images)} images, more than --limit-mm-per-prompt allows ({limit} per "
                          f"request)", param="messages")
    return images


def expand_placeholders(engine: Any, ids: list[int], images: list[Any]) -> list[int]:
    """The prompt ids with each image's placeholder expanded to the model's tokens for that image (known only
    once the image is decoded, for models whose count depends on its size), so that usage, ``max_tokens`` and
    prompt logprobs count them."""
    if not images:
        return ids
    try:
        return engine.multimodal.expand_placeholders(ids, images)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from None


# Fetching and decoding run on their own few threads, not the event loop's default pool: a flood of slow image
# URLs then delays only image requests (each fetch ends at its deadline), never the tokenization of the others.
MEDIA_THREADS = 8
_pool: ThreadPoolExecutor | None = None


def _media_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="llmctl-media")
    return _pool


async def load_images(media: MediaConnector, images: list[tuple[str, str]]) -> list[Any]:
    """Fetch and decode concurrently; the first failure (a 400 naming its field) fails the request."""
    loop = asyncio.get_running_loop()
    pool = _media_pool()
    return list(await asyncio.gather(*(loop.run_in_executor(pool, media.load, url, field) for field, url in images)))
