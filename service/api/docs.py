"""/docs (Swagger UI) and /redoc with their JavaScript and CSS served by the service itself, so
that they work offline and behind a firewall (FastAPI's default pages load them from a CDN).

The assets come from the ``fastapi-offline`` package, which ships swagger-ui and redoc builds;
the pages are FastAPI's own (``get_swagger_ui_html``, ``get_redoc_html``) pointed at them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"


def install_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect, /redoc and the assets to an app created with
    ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        url = _under_root(request)
        return get_swagger_ui_html(
            openapi_url=url(openapi_url),
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=url(redirect_url),
            swagger_js_url=url(f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=url(f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=url(f"{ASSETS_URL}/favicon.png"),
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        url = _under_root(request)
        return get_redoc_html(
            openapi_url=url(openapi_url),
            title=f"{app.title} - ReDoc",
            redoc_js_url=url(f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=url(f"{ASSETS_URL}/favicon.png"),
            with_google_fonts=False,  # fonts from Google's CDN: the system's instead
        )


def _under_root(request: Request) -> Callable[[str], str]:
    """Paths as the browser must ask for them behind a proxy that mounts the app at a prefix."""
    root = request.scope.get("root_path", "")
    return lambda path: f"{root}{path}"
