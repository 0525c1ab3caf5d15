"""A local HTTP server for image-fetching tests: fixed routes for good images, redirects, wrong types, oversized
and slow bodies and a decompression bomb; it counts the requests it sees, so a test can prove nothing was
fetched."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG header claiming ``width x height`` grey pixels, with a few bytes of compressed data:
    decoding it would need gigabytes, reading its header costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class MediaServer:
    def __init__(self, image: Image.Image) -> None:
        self.image_png = png_bytes(image)
        image = image.copy()
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, ctype: str, body: bytes, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                server.hits.append(self.path)
                port = self.server.server_address[1]
                path = self.path.split("?", 1)[0]
                if path == "/img.png":
                    self._send(200, "image/png", server.image_png)
                elif path == "/redirect-same":
                    self._redirect("/img.png")
                elif path == "/redirect-other":
                    self._redirect(f"http://localhost:{port}/img.png")
                elif path == "/redirect-metadata":
                    self._redirect("http://169.254.169.254/latest/meta-data/")
                elif path == "/loop":
                    self._redirect("/loop")
                elif path == "/html":
                    self._send(200, "text/html", b"<html>not an image</html>")
                elif path == "/lying-type":
                    gif = io.BytesIO()
                    image.save(gif, format="GIF")
                    self._send(200, "image/png", gif.getvalue())
                elif path == "/big-declared":
                    self._send(200, "image/png", b"", length=1 << 30)
                elif path == "/big-undeclared":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(64):
                            self.wfile.write(b"\x00" * 65536)
                    except OSError:
                        pass
                    self.close_connection = True
                elif path == "/bomb.png":
                    self._send(200, "image/png", bomb_png())
                elif path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(server.image_png)))
                    self.end_headers()
                    try:
                        for b in server.image_png:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                else:
                    self._send(404, "text/plain", b"no")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tls_files(directory, names: list[str]) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for ``names`` (DNS names or IP literals), signed by it: paths of
    (CA certificate, server certificate, server key) in PEM."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False).sign(ca_key, hashes.SHA256()))
    d = Path(directory)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")


class TLSMediaServer(MediaServer):
    """The same routes over HTTPS with a certificate for ``names``."""

    def __init__(self, image: Image.Image, cert: str, key: str) -> None:
        import ssl

        super().__init__(image)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"
