"""Hostile image URLs: server-side request forgery (loopback, link-local metadata, private addresses, redirects
to other hosts), oversized and slow bodies, decompression bombs, wrong types, bad base64, local path escapes.
Each is a 400 naming the field and the limit; a local HTTP server counts requests to prove what was not fetched.

Most cases run against ``MediaConnector`` directly (the policy), and a set runs through a live LLaVA server (the
wiring: 400s with the field, nothing fetched before the count and model checks, KV blocks all freed)."""

from __future__ import annotations

import base64
import ipaddress
import os
import socket

import httpx
import numpy as np
import pytest
from llmctl_server import ServerSettings
from llmctl_server.errors import APIError
from llmctl_server.media import MediaConnector
from PIL import Image

from tests.media_server import MediaServer, bomb_png, png_bytes

FIELD = "messages[0].content[0].image_url"


def _image(seed: int = 0, size: tuple[int, int] = (20, 16)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def media():
    srv = MediaServer(_image())
    yield srv
    srv.stop()


def _refused(connector: MediaConnector, url: str, *words: str) -> str:
    with pytest.raises(APIError) as info:
        connector.load(url, FIELD)
    err = info.value
    assert err.status == 400, err
    assert err.param == FIELD and err.message.startswith(FIELD), err.message
    for w in words:
        assert w in err.message, err.message
    return err.message


def test_allowed_fetch_and_same_host_redirect(media):
    c = MediaConnector(allowed_media_domains=("127.0.0.1",))
    for path in ("/img.png", "/redirect-same"):
        img = c.load(media.url(path), FIELD)
        assert img.size == (20, 16)


def test_http_needs_the_allowlist(media):
    before = len(media.hits)
    _refused(MediaConnector(), media.url("/img.png"), "--allowed-media-domains")
    _refused(MediaConnector(allowed_media_domains=("example.com",)), media.url("/img.png"),
             "not in --allowed-media-domains")
    _refused(MediaConnector(allowed_media_domains=("example.com",)), "http://169.254.169.254/latest/meta-data/",
             "not in --allowed-media-domains")
    # suffix tricks: the host must be listed exactly
    _refused(MediaConnector(allowed_media_domains=("example.com",)), "http://example.com.evil.test/x.png",
             "not in --allowed-media-domains")
    _refused(MediaConnector(allowed_media_domains=("example.com",)), "http://example.com@127.0.0.1/x.png",
             "credentials")
    assert len(media.hits) == before, "something was fetched"


def test_listed_name_resolving_to_loopback_is_refused(media):
    """'localhost' is listed, but it resolves to 127.0.0.1: names never reach non-public addresses."""
    before = len(media.hits)
    _refused(MediaConnector(allowed_media_domains=("localhost",)), media.url("/img.png", host="localhost"),
             "non-public address")
    assert len(media.hits) == before


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.7", "192.168.1.1", "127.0.0.1", "::1",
                                     "::ffff:127.0.0.1", "fe80::1", "0.0.0.0", "100.64.0.1", "224.0.0.1"])
def test_dns_answers_to_internal_addresses_are_refused(monkeypatch, address):
    """A listed public-looking name whose DNS answer is internal (rebinding, a hostile resolver)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", (address, 80))])
    _refused(MediaConnector(allowed_media_domains=("images.example",)), "http://images.example/cat.png",
             "non-public address", str(ipaddress.ip_address(address)))


def test_mixed_dns_answer_is_refused(monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    _refused(MediaConnector(allowed_media_domains=("images.example",)), "http://images.example/cat.png",
             "169.254.169.254")


def test_redirects_to_other_hosts_are_refused(media):
    c = MediaConnector(allowed_media_domains=("127.0.0.1", "localhost"))
    before = len(media.hits)
    _refused(c, media.url("/redirect-other"), "redirect to another host")
    _refused(c, media.url("/redirect-metadata"), "redirect to another host")
    _refused(c, media.url("/loop"), "more than 3 redirects")
    # the redirect responses themselves were fetched, never their targets on another host
    assert all(h in ("/redirect-other", "/redirect-metadata", "/loop") for h in media.hits[before:])


@pytest.mark.parametrize("path, words", [
    ("/html", ["'text/html' is not an accepted image type"]),
    ("/lying-type", ["GIF", "not the image/png"]),
    ("/big-declared", ["1073741824 bytes", "limit of 1000000"]),
    ("/big-undeclared", ["more than the limit of 1000000 bytes"]),
    ("/bomb.png", ["more than the limit of 1000000 pixels"]),
    ("/nothing", ["HTTP 404"]),
])
def test_bad_fetched_bodies(media, path, words):
    c = MediaConnector(allowed_media_domains=("127.0.0.1",), max_bytes=1_000_000, max_pixels=1_000_000)
    _refused(c, media.url(path), *words)


def test_slow_server_hits_the_deadline(media):
    """The body drips a byte every 50 ms (each read succeeds, so no socket timeout fires): the one deadline for
    the whole fetch cuts it off."""
    import time

    c = MediaConnector(allowed_media_domains=("127.0.0.1",), timeout=0.5)
    t0 = time.monotonic()
    _refused(c, media.url("/slow"), "more than the limit of 0.5 s")
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,@@@not-base64@@@", ["not valid base64"]),
    ("data:image/png;base64," + "A" * 2_000_000, ["larger than the limit of 1000000 bytes"]),
    (_data_url(bomb_png()), ["more than the limit of 1000000 pixels"]),
    (_data_url(bomb_png(2000, 2000)), ["2000x2000 = 4000000 pixels", "limit of 1000000"]),
    (_data_url(png_bytes(_image()), "image/jpeg"), ["PNG", "not the image/jpeg"]),
    (_data_url(b"<svg/>", "image/svg+xml"), ["'image/svg+xml' is not an accepted image type"]),
    ("data:image/png,rawbytes", ["base64-encoded"]),
    ("ftp://example.com/x.png", ["ftp URLs are not accepted"]),
    ("gopher://127.0.0.1:6379/_FLUSHALL", ["gopher URLs are not accepted"]),
    ("", ["expected an image URL"]),
])
def test_bad_data_urls_and_schemes(url, words):
    c = MediaConnector(allowed_media_domains=("127.0.0.1",), max_bytes=1_000_000, max_pixels=1_000_000)
    _refused(c, url, *words)


def test_local_files_stay_under_the_allowed_path(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _image().save(allowed / "ok.png")
    secret = tmp_path / "secret.png"
    _image(1).save(secret)
    os.symlink(secret, allowed / "link.png")
    (allowed / "sub").mkdir()
    c = MediaConnector(allowed_local_media_path=str(allowed), max_bytes=1_000_000, max_pixels=1_000_000)
    assert c.load((allowed / "ok.png").as_uri(), FIELD).size == (20, 16)
    _refused(MediaConnector(), (allowed / "ok.png").as_uri(), "--allowed-local-media-path")
    _refused(c, f"file://{allowed}/../secret.png", "outside --allowed-local-media-path")
    _refused(c, f"file://{allowed}/%2e%2e/secret.png", "outside --allowed-local-media-path")
    _refused(c, (allowed / "link.png").as_uri(), "outside --allowed-local-media-path")
    _refused(c, "file:///etc/passwd", "outside --allowed-local-media-path")
    _refused(c, f"file://otherhost{allowed}/ok.png", "name no host")
    _refused(c, (allowed / "missing.png").as_uri(), "no readable file")
    _refused(c, (allowed / "sub").as_uri(), "not a regular file")
    (allowed / "bomb.png").write_bytes(bomb_png())
    _refused(c, (allowed / "bomb.png").as_uri(), "limit of 1000000 pixels")
    (allowed / "notes.txt").write_text("hello")
    _refused(c, (allowed / "notes.txt").as_uri(), "not a decodable image")


def test_bad_media_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="allowed_local_media_path: .* is not a directory"):
        ServerSettings(allowed_local_media_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="media_fetch_timeout"):
        ServerSettings(media_fetch_timeout=0)
    for entry in ("https://example.com", "example.com:8080", "example.com/images", "user@example.com"):
        with pytest.raises(ValueError, match="allowed_media_domains: .* is not a bare host name"):
            ServerSettings(allowed_media_domains=[entry])
    assert ServerSettings(allowed_media_domains=["[::1]", "Example.COM."]).media_connector().allowed_media_domains \
        == ("::1", "example.com")


# -- through a live server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_server(model_cache_dir, test_tokenizer, media):
    from tests.model_factory import make_tiny_llava
    from tests.reliability.conftest import build_engine
    from tests.test_server_support import start_server

    path = make_tiny_llava(model_cache_dir / "llava-hostile", model_cache_dir / "smollm2-tokenizer")
    engine = build_engine(path, dtype="float32", limit_mm_per_prompt={"image": 2})
    srv = start_server(engine, ServerSettings(served_model_names=["llava"], allowed_media_domains=["127.0.0.1"],
                                              max_image_bytes=1_000_000, max_image_pixels=1_000_000))
    yield srv
    srv.stop()
    engine.shutdown()


def _chat(urls: list[str], text: str = "What is it?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"model": "llava", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}


@pytest.mark.parametrize("urls, words", [
    (["http://169.254.169.254/latest/meta-data/"], ["not in --allowed-media-domains"]),
    (["data:image/png;base64,!!!"], ["not valid base64"]),
    ([_data_url(bomb_png())], ["limit of 1000000"]),
    (["file:///etc/passwd"], ["--allowed-local-media-path"]),
])
def test_server_names_the_field(llava_server, urls, words):
    from tests.test_server_support import wait_kv_free

    with httpx.Client(base_url=llava_server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=_chat(urls))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == FIELD, err
    for w in words:
        assert w in err["message"], err
    wait_kv_free(llava_server.engine)


def test_server_fetches_nothing_before_the_checks(llava_server, media):
    before = len(media.hits)
    ok = media.url("/img.png")
    with httpx.Client(base_url=llava_server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=_chat([ok, ok, ok]))
        assert r.status_code == 400 and "3 images, more than --limit-mm-per-prompt allows (2" in r.text, r.text
        r = http.post("/v1/chat/completions", json={**_chat([ok]), "use_beam_search": True})
        assert r.status_code == 400, r.text
        r = http.post("/tokenize", json={"model": "llava", "messages": _chat([ok])["messages"]})
        assert r.status_code == 400 and "image parts are not accepted here" in r.text, r.text
        assert len(media.hits) == before
        bad_part = {"model": "llava", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        assert http.post("/v1/chat/completions", json=bad_part).status_code == 400
        r = http.post("/v1/chat/completions", json=_chat([ok, ok], "Two images?"))  # within the limit: served
        assert r.status_code == 200, r.text
    assert len(media.hits) == before + 2


def test_text_model_refuses_images(tiny_llama_dir, media):
    from tests.reliability.conftest import build_engine
    from tests.test_server_support import start_server

    engine = build_engine(tiny_llama_dir)
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"], allowed_media_domains=["127.0.0.1"]))
    before = len(media.hits)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json={**_chat([media.url("/img.png")]), "model": "tiny"})
        assert r.status_code == 400, r.text
        assert "does not take images" in r.json()["error"]["message"]
        assert len(media.hits) == before
    finally:
        srv.stop()
        engine.shutdown()


def test_chat_route_survives_schema_fuzzing_on_an_image_model(llava_server, media):
    """Generated chat bodies (image parts with arbitrary URLs among them) on a LLaVA server: never a 5xx, answers
    that match the schema, no KV block left behind."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    from tests.reliability.conftest import scaled
    from tests.reliability.test_hostile import _fuzzer
    from tests.test_server_support import wait_kv_free

    schema = schemathesis.openapi.from_url(llava_server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/chat/completions"]
    assert len(ops) == 1
    counts = {"cases": 0, "4xx": 0, "2xx": 0}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzzer(ops[0].as_strategy(generation_mode=mode), llava_server.url,
                [not_a_server_error, response_schema_conformance], scaled(10, 300), counts)()
    assert counts.get("5xx", 0) == 0 and counts["cases"] > 0, counts
    wait_kv_free(llava_server.engine, timeout=30)


def test_https_checks_the_certificate_against_the_url_host(tmp_path):
    """The connection is pinned to the checked address, but TLS still verifies the certificate for the URL's
    host: a certificate for another name, or from an unknown CA, is refused."""
    import ssl

    from tests.media_server import TLSMediaServer, tls_files

    good_dir, other_dir = tmp_path / "good", tmp_path / "other"
    good_dir.mkdir()
    other_dir.mkdir()
    ca, cert, key = tls_files(good_dir, ["127.0.0.1"])
    other_ca, other_cert, other_key = tls_files(other_dir, ["images.example"])
    for server_cert, server_key, trust, words in ((cert, key, ca, None),
                                                  (other_cert, other_key, other_ca, "SSLCertVerificationError"),
                                                  (cert, key, None, "SSLCertVerificationError")):
        srv = TLSMediaServer(_image(), server_cert, server_key)
        try:
            ctx = ssl.create_default_context(cafile=trust) if trust else None
            c = MediaConnector(allowed_media_domains=("127.0.0.1",), ssl_context=ctx)
            if words is None:
                assert c.load(srv.url("/img.png"), FIELD).size == (20, 16)
                assert c.load(srv.url("/redirect-same"), FIELD).size == (20, 16)
            else:
                _refused(c, srv.url("/img.png"), words)
        finally:
            srv.stop()


def test_connection_is_pinned_to_the_checked_address(monkeypatch):
    """DNS rebinding: the name is resolved once, checked, and the connection goes to that address; a second
    answer (here: loopback) is never asked for nor used."""
    answers = iter([("93.184.216.34", 80), ("127.0.0.1", 80)])
    lookups, connects = [], []

    def getaddrinfo(host, port, *a, **k):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", next(answers))]

    def create_connection(address, *a, **k):
        connects.append(address)
        raise ConnectionRefusedError

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    _refused(MediaConnector(allowed_media_domains=("images.example",)), "http://images.example/cat.png",
             "fetching the image failed")
    assert lookups == ["images.example"] and connects == [("93.184.216.34", 80)]


def test_slow_image_urls_do_not_stall_text_requests(llava_server, media):
    """Slow image fetches hold the media threads, not the pool that tokenizes everyone's prompts: a text request
    is answered while more slow fetches than there are media threads are in flight."""
    import concurrent.futures
    import time

    from llmctl_server.chat_images import MEDIA_THREADS

    slow = _chat([media.url("/slow")])
    with concurrent.futures.ThreadPoolExecutor(MEDIA_THREADS + 4) as pool, \
            httpx.Client(base_url=llava_server.url, timeout=60) as http:
        pending = [pool.submit(http.post, "/v1/chat/completions", json=slow) for _ in range(MEDIA_THREADS + 4)]
        time.sleep(0.5)
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json={"model": "llava", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert all(f.result().status_code in (200, 400) for f in pending)
    assert took < 4.0, took


def test_slow_https_server_hits_the_deadline(tmp_path):
    import ssl
    import time

    from tests.media_server import TLSMediaServer, tls_files

    ca, cert, key = tls_files(tmp_path, ["127.0.0.1"])
    srv = TLSMediaServer(_image(), cert, key)
    try:
        c = MediaConnector(allowed_media_domains=("127.0.0.1",), timeout=0.5,
                           ssl_context=ssl.create_default_context(cafile=ca))
        t0 = time.monotonic()
        _refused(c, srv.url("/slow"), "more than the limit of 0.5 s")
        assert time.monotonic() - t0 < 2.0
    finally:
        srv.stop()
