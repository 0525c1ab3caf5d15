"""Offline ``LLM.chat`` with images: OpenAI-style content parts become a placeholder line per image before the
message's text (templates see plain strings), and the images go to ``multi_modal_data``.

Offline, the caller is trusted with its own process, so nothing here fetches: images come as ``image_pil`` parts
(vLLM's name) or as ``data:`` URLs in ``image_url`` parts; the server's ``http(s)``/``file:`` policy lives in
``llmctl_server.media``.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

MAX_OFFLINE_IMAGE_PIXELS = 8192 * 8192


def _decode_data_url(url: str, field: str) -> Any:
    from PIL import Image

    if not url.startswith("data:"):
        raise ValueError(f"{field}: offline chat takes data: URLs or image_pil parts; other URLs are not fetched")
    header, sep, payload = url[5:].partition(",")
    if not sep or "base64" not in header.lower().split(";")[1:]:
        raise ValueError(f"{field}: expected data:image/...;base64,...")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: the data is not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_OFFLINE_IMAGE_PIXELS:
            raise ValueError(f"{field}: {img.width}x{img.height} pixels, more than {MAX_OFFLINE_IMAGE_PIXELS}")
        img.load()
    except (OSError, SyntaxError, Image.DecompressionBombError):
        raise ValueError(f"{field}: the data is not a decodable image") from None
    return img.convert("RGB")


def split_chat_images(conversation: list[dict[str, Any]], multimodal: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with string content, and the images in order. ``multimodal``: the engine's processor, or None
    for a text-only model (which then refuses any image part)."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, msg in enumerate(conversation):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list) or not any(
                isinstance(p, dict) and p.get("type") in ("image_url", "image_pil") for p in content):
            messages.append(msg)  # text-only content goes to the template as the caller gave it
            continue
        texts: list[str] = []
        own: list[Any] = []
        for j, part in enumerate(content):
            field = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_pil":
                own.append(part.get("image_pil"))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                own.append(_decode_data_url(str(url), f"{field}.image_url"))
            else:
                raise ValueError(f"{field}: unsupported content part type {kind!r} (text, image_url, image_pil)")
        if own and multimodal is None:
            raise ValueError(f"messages[{i}].content: this model does not take images (a text-only model)")
        placeholder = multimodal.image_prompt_text() if own else ""
        sep = multimodal.chat_image_separator if own else "\n"
        messages.append({**msg, "content": sep.join([placeholder] * len(own) + (["\n".join(texts)] if texts else []))})
        images.extend(own)
    return messages, images
