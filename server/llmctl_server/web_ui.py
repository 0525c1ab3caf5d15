"""The browser console served at ``/``: a chat playground and a live view of ``/metrics``.

Plain static files (no build step, nothing fetched from a CDN) that hold no data, so they are public. The page
calls the API like any other client: it asks for the API key and keeps it in the tab's ``sessionStorage`` only.
A strict Content-Security-Policy allows scripts, styles and requests from this origin alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "web"
# Route templates the auth middleware lets through without a key (the mount matches every file under /ui).
WEB_UI_PATHS = frozenset({"/", "/ui"})

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount_web_ui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def web_ui_index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_SECURITY_HEADERS)

    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="web-ui")
