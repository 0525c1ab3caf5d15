"""Images from requests, accepted only as ``data:`` URLs and decoded under limits.

Nothing is ever fetched: an ``http(s)``, ``file`` or any other URL is refused before a connection or a file is
opened (fetching with a domain allowlist and private-address checks is not implemented). A ``data:`` URL must
name an image type, its decoded size is capped (checked on the base64 length first, so an oversized payload is
never decoded), and its pixel count is read from the header and capped before any pixel is decoded, which is
what stops decompression bombs (a few KB of PNG that inflate to gigabytes). Every refusal is a 400 naming the
field and the limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from llmctl_server.errors import bad_request

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF"}


def load_image(url: Any, field: str, max_bytes: int, max_pixels: int) -> Any:
    """A decoded PIL image (RGB) from a ``data:`` URL, or a 400 naming ``field``."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{field}: expected a data: URL", param=field)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        raise bad_request(f"{field}: only data: URLs are accepted (base64 images); {scheme or 'this'} URLs are "
                          f"never fetched", param=field)
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{field}: malformed data: URL (no comma before the data)", param=field)
    parts = [p.strip().lower() for p in header.split(";")]
    mime = parts[0]
    if mime not in IMAGE_TYPES:
        raise bad_request(f"{field}: content type {mime or '(none)'!r} is not an accepted image type "
                          f"({', '.join(sorted(set(IMAGE_TYPES) - {'image/jpg'}))})", param=field)
    if "base64" not in parts[1:]:
        raise bad_request(f"{field}: the image must be base64-encoded (data:{mime};base64,...)", param=field)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise bad_request(f"{field}: the image is larger than the limit of {max_bytes} bytes", param=field)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field}: the data is not valid base64", param=field) from None
    if len(raw) > max_bytes:
        raise bad_request(f"{field}: the image is {len(raw)} bytes, more than the limit of {max_bytes}", param=field)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            if img.format != IMAGE_TYPES[mime]:
                raise bad_request(f"{field}: the data is {img.format or 'not an image'}, not the {mime} the URL "
                                  f"names", param=field)
            pixels = img.width * img.height
            if pixels > max_pixels:
                raise bad_request(f"{field}: the image is {img.width}x{img.height} = {pixels} pixels, more than the "
                                  f"limit of {max_pixels}", param=field)
            img.load()
            return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"{field}: the image decodes to more than the limit of {max_pixels} pixels",
                          param=field) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise bad_request(f"{field}: the data is not a decodable {mime} image", param=field) from None
