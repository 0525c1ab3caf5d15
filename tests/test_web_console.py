"""The browser console at ``/``: public static files, API calls with the key, and a real headless Chromium that
chats (streamed) and watches the metrics move.

The browser is Debian's ``chromium`` (``make test`` installs it when missing and it can), driven by Playwright's
Python API pointed at that executable; Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from llmctl import AsyncLLM, EngineArgs
from llmctl_server import ServerSettings

from tests.test_server_support import start_server

KV = 64 << 20
KEY = "sk-console-test"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    return os.environ.get("LLMCTL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = AsyncLLM.from_engine_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory=KV, seed=0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"], api_key=KEY))
    yield srv
    srv.stop()


def test_static_files_are_public_and_the_api_is_not(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/ui/console.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("/ui/console.js", "/ui/console.css"):
        r = httpx.get(server.url + asset)
        assert r.status_code == 200 and r.content, asset
        assert "http://" not in r.text and "https://" not in r.text, f"{asset} must not load anything remote"
    assert "https://" not in page.text and "http://" not in page.text
    assert httpx.get(server.url + "/ui/nothing-here.js").status_code == 404
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401, path
    ok = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_no_web_ui(engine):
    srv = start_server(engine, ServerSettings(served_model_names=["tiny"], web_ui=False))
    try:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/ui/console.js").status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("BROWSER TEST SKIPPED: Debian's chromium is not installed and `make test` could not install it "
                    "(needs root and apt-get); install it with `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TEST SKIPPED: the playwright package is missing (pip install -r requirements-test.txt)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _cell(page, element_id: str) -> str:
    return page.locator(f"#{element_id}").inner_text()


def _count(text: str) -> float:
    return float(text.replace(",", "")) if text.strip() not in ("", "-") else 0.0


def test_chat_streams_and_metrics_move(server, browser, tmp_path):
    prompt = "Tell me a story about a cat"
    max_tokens = 16
    # The reference answer: the same request through the API (greedy, so the console must show exactly this).
    ref = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": 0}).json()
    expected = ref["choices"][0]["message"]["content"]
    assert expected.strip()

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    remote: list[str] = []
    page.on("request", lambda req: remote.append(req.url) if not req.url.startswith(server.url) else None)
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('conn-status').textContent === 'API key needed'")

    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('conn-status').textContent === 'connected'")
    assert page.locator("#model option").all_inner_texts()[0].startswith("tiny")
    assert page.evaluate("sessionStorage.getItem('llmctl.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0 and context.cookies() == []

    page.wait_for_function("() => document.getElementById('m-gen-tokens').textContent !== '-'")
    gen_before = _count(_cell(page, "m-gen-tokens"))
    finished_before = _count(_cell(page, "m-finished"))

    # Record every length the answer takes on screen, to see it arrive in pieces rather than at once.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const body = document.querySelector('.msg.assistant .body');
            if (body) window.__lengths.push(body.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    answer = page.locator(".msg.assistant .body").inner_text()
    assert answer.strip() == expected.strip()
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if 0 < n < len(expected)}) >= 2, f"answer did not stream: {lengths}"
    assert "tokens" in _cell(page, "chat-stats")

    # The live view picks the request up on its next scrapes.
    completion_tokens = ref["usage"]["completion_tokens"]
    at_least = "([id, n]) => parseFloat(document.getElementById(id).textContent.replace(/,/g, '')) >= n"
    page.wait_for_function(at_least, arg=["m-gen-tokens", gen_before + completion_tokens], timeout=15_000)
    page.wait_for_function(at_least, arg=["m-finished", finished_before + 1], timeout=15_000)
    for cell in ("ttft-p50", "itl-p50", "e2e-p99"):
        assert _cell(page, cell).endswith("s"), cell
    assert _cell(page, "m-kv").endswith("%")

    shot = Path(os.environ.get("LLMCTL_SCREENSHOT_DIR", tmp_path)) / "web_console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    assert not remote, f"the console fetched something outside the server: {remote}"
    context.close()


def test_wrong_key_is_reported(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", "sk-wrong")
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('conn-status').textContent === 'API key needed'")
    page.wait_for_function("() => document.getElementById('metrics-age').textContent === '(API key needed)'")
    context.close()
