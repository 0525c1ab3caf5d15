"""Images from requests: ``data:`` URLs always; ``http(s)`` URLs only from ``--allowed-media-domains``; ``file:``
URLs only under ``--allowed-local-media-path``. Every refusal is a 400 naming the field and the limit.

Fetching on a client's behalf is a server-side request forgery surface, so each step is narrowed:

- The host must be listed exactly (no suffix matching). Its name is resolved once, and every address it resolves
  to must be a public one: loopback, private, link-local (cloud metadata at 169.254.169.254), multicast and
  reserved addresses are refused, unless the operator listed that very IP literal. The connection then goes to
  the checked address (the Host header and TLS name stay the URL's), so a second, different DNS answer cannot
  redirect it (DNS rebinding).
- Redirects are followed only to the same scheme, host and port, at most a few times.
- The response must say it is an accepted image type, and its size is capped while reading (a ``Content-Length``
  over the cap is refused before the body is read); the whole fetch has one deadline.
- Local files are resolved with symlinks followed and must still lie under the allowed directory.

Decoding is the same for every source: the header's pixel count is capped before any pixel is decoded (which is
what stops decompression bombs: a few KB of PNG that inflate to gigabytes), and the data must be the format it
claims.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl_server.errors import bad_request

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF"}
_FORMAT_NAMES = sorted(set(IMAGE_TYPES) - {"image/jpg"})
MAX_REDIRECTS = 3
_READ_CHUNK = 64 * 1024


def decode_image(raw: bytes, field: str, max_pixels: int, mime: str | None = None) -> Any:
    """A decoded RGB PIL image, its pixel count checked from the header first. ``mime``: the type the source
    claimed (the data must be that format); None: any accepted format."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            accepted = {IMAGE_TYPES[mime]} if mime else set(IMAGE_TYPES.values())
            if img.format not in accepted:
                want = f"the {mime} the URL names" if mime else f"an accepted image type ({', '.join(_FORMAT_NAMES)})"
                raise bad_request(f"{field}: the data is {img.format or 'not an image'}, not {want}", param=field)
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
        raise bad_request(f"{field}: the data is not a decodable {mime or 'image'}", param=field) from None


def load_image(url: Any, field: str, max_bytes: int, max_pixels: int) -> Any:
    """A decoded PIL image (RGB) from a ``data:`` URL, or a 400 naming ``field``."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{field}: expected a data: URL", param=field)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        raise bad_request(f"{field}: only data: URLs are accepted (base64 images); {scheme or 'this'} URLs are "
                          f"never fetched", param=field)
    return _data_url(url, field, max_bytes, max_pixels)


def _data_url(url: str, field: str, max_bytes: int, max_pixels: int) -> Any:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{field}: malformed data: URL (no comma before the data)", param=field)
    parts = [p.strip().lower() for p in header.split(";")]
    mime = parts[0]
    if mime not in IMAGE_TYPES:
        raise bad_request(f"{field}: content type {mime or '(none)'!r} is not an accepted image type "
                          f"({', '.join(_FORMAT_NAMES)})", param=field)
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
    return decode_image(raw, field, max_pixels, mime)


def _normalize_domain(d: str) -> str:
    d = d.strip().lower().rstrip(".")
    return d[1:-1] if d.startswith("[") and d.endswith("]") else d


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass
class MediaConnector:
    """The server's media policy (``--allowed-media-domains``, ``--allowed-local-media-path``, size, pixel and
    time limits). ``load`` is blocking: callers run it in a worker thread."""

    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    timeout: float = 5.0
    ssl_context: ssl.SSLContext | None = None  # None: the system's trust store, hostname checked

    def __post_init__(self) -> None:
        self.allowed_media_domains = tuple(_normalize_domain(d) for d in self.allowed_media_domains if d.strip())
        for d in self.allowed_media_domains:
            if ("/" in d or "@" in d or (":" in d and _ip_literal(d) is None)) or not d:
                raise ValueError(f"allowed_media_domains: {d!r} is not a bare host name or IP address (no scheme, "
                                 f"port or path)")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path: {self.allowed_local_media_path!r} is not a directory")
            self._root = os.path.realpath(root)

    def load(self, url: Any, field: str) -> Any:
        if not isinstance(url, str) or not url:
            raise bad_request(f"{field}: expected an image URL (data:, http(s): or file:)", param=field)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return _data_url(url, field, self.max_bytes, self.max_pixels)
        if scheme in ("http", "https"):
            return self._fetch(url, field)
        if scheme == "file":
            return self._local(url, field)
        raise bad_request(f"{field}: {scheme or 'this'} URLs are not accepted (data:, http(s): with "
                          f"--allowed-media-domains, file: with --allowed-local-media-path)", param=field)

    # -- local files -------------------------------------------------------------------------------------------
    def _local(self, url: str, field: str) -> Any:
        if self.allowed_local_media_path is None:
            raise bad_request(f"{field}: file: URLs are refused; the server was started without "
                              f"--allowed-local-media-path", param=field)
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{field}: file: URLs name no host (file:///path), got {parsed.netloc!r}", param=field)
        path = urllib.parse.unquote(parsed.path)
        if "\x00" in path or not path.startswith("/"):
            raise bad_request(f"{field}: not an absolute file path", param=field)
        real = os.path.realpath(path)  # symlinks and .. resolved before the containment check
        if os.path.commonpath([real, self._root]) != self._root:
            raise bad_request(f"{field}: the file is outside --allowed-local-media-path", param=field)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise bad_request(f"{field}: no readable file at that path", param=field) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise bad_request(f"{field}: not a regular file", param=field)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > self.max_bytes:
                raise bad_request(f"{field}: the image is {st.st_size} bytes, more than the limit of "
                                  f"{self.max_bytes}", param=field)
            raw = f.read(self.max_bytes + 1)
        if len(raw) > self.max_bytes:
            raise bad_request(f"{field}: the image is more than the limit of {self.max_bytes} bytes", param=field)
        return decode_image(raw, field, self.max_pixels)

    # -- http(s) -----------------------------------------------------------------------------------------------
    def _check_host(self, host: str, port: int, field: str) -> str:
        """The address to connect to, after the allowlist and the public-address checks."""
        host = _normalize_domain(host)
        if not self.allowed_media_domains:
            raise bad_request(f"{field}: http(s) image URLs are refused; the server was started without "
                              f"--allowed-media-domains", param=field)
        if host not in self.allowed_media_domains:
            raise bad_request(f"{field}: host {host!r} is not in --allowed-media-domains", param=field)
        literal = _ip_literal(host)
        if literal is not None:  # the operator listed this very address: it is allowed even if private
            return str(literal)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise bad_request(f"{field}: host {host!r} does not resolve", param=field) from None
        addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        bad = [str(a) for a in addrs if not _public(a)]
        if bad or not addrs:
            raise bad_request(f"{field}: host {host!r} resolves to a non-public address ({', '.join(bad)}); "
                              f"loopback, private and link-local addresses are refused", param=field)
        return str(addrs[0])

    def _fetch(self, url: str, field: str) -> Any:
        deadline = time.monotonic() + self.timeout
        origin = None
        for _ in range(MAX_REDIRECTS + 1):
            parsed = urllib.parse.urlparse(url)
            scheme = parsed.scheme.lower()
            try:
                port = parsed.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise bad_request(f"{field}: malformed URL port", param=field) from None
            host = parsed.hostname or ""
            if parsed.username or parsed.password:
                raise bad_request(f"{field}: URLs with credentials are refused", param=field)
            if origin is not None and (scheme, _normalize_domain(host), port) != origin:
                raise bad_request(f"{field}: redirect to another host ({host}) refused", param=field)
            origin = (scheme, _normalize_domain(host), port)
            ip = self._check_host(host, port, field)
            status, headers, body = self._request(scheme, host, ip, port, parsed, field, deadline)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise bad_request(f"{field}: redirect without a Location", param=field)
                url = urllib.parse.urljoin(url, location)
                continue
            if status != 200:
                raise bad_request(f"{field}: fetching the image failed with HTTP {status}", param=field)
            mime = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if mime not in IMAGE_TYPES:
                raise bad_request(f"{field}: content type {mime or '(none)'!r} is not an accepted image type "
                                  f"({', '.join(_FORMAT_NAMES)})", param=field)
            return decode_image(body, field, self.max_pixels, mime)
        raise bad_request(f"{field}: more than {MAX_REDIRECTS} redirects", param=field)

    def _request(self, scheme: str, host: str, ip: str, port: int, parsed: Any, field: str,
                 deadline: float) -> tuple[int, dict[str, str], bytes]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise bad_request(f"{field}: fetching the image took more than the limit of {self.timeout} s",
                              param=field)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = _PinnedHTTPS(host, ip, port, left, self.ssl_context or ssl.create_default_context())
        else:
            conn = _PinnedHTTP(host, ip, port, left)
        path = parsed.path or "/"
        if parsed.query:
            path += "?" + parsed.query
        # One deadline for the whole exchange: a server that drips its headers or body a byte at a time would
        # otherwise reset the per-read socket timeout forever; at the deadline the socket is shut down under it.
        timer = threading.Timer(left, _shutdown, args=(conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "llmctl"})
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            body = b""
            if resp.status == 200:
                length = headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise bad_request(f"{field}: the image is {length} bytes, more than the limit of "
                                      f"{self.max_bytes}", param=field)
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    chunk = resp.read(_READ_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise bad_request(f"{field}: the image is more than the limit of {self.max_bytes} bytes",
                                          param=field)
                    chunks.append(chunk)
                body = b"".join(chunks)
            return resp.status, headers, body
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                raise bad_request(f"{field}: fetching the image took more than the limit of {self.timeout} s",
                                  param=field) from None
            raise bad_request(f"{field}: fetching the image failed ({type(exc).__name__})", param=field) from None
        finally:
            timer.cancel()
            conn.close()


def _shutdown(conn: http.client.HTTPConnection) -> None:
    # conn.sock is None once http.client hands a closing connection's socket to the response; the pinned
    # connections keep their own reference, which is what a blocked read is waiting on.
    sock = getattr(conn, "raw_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever DNS says now; the Host header stays the URL's."""

    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, ip: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._ctx = context
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.raw_sock = sock  # until the handshake: wrapping detaches it, and the TLS socket takes its place
        self.sock = self.raw_sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
