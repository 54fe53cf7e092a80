"""/docs and /redoc reference only assets the service serves itself (they work offline)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import make_settings, service_client

pytestmark = pytest.mark.anyio

# Attributes (src, href, redoc's spec-url) and swagger-ui's `url: '...'` option.
ASSET_REFERENCE = re.compile(
    r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]"""
)
EXPECTED_TYPES = {
    ".js": "javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


@pytest.fixture
async def client(artifact_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(make_settings(artifact_dir)) as client:
        yield client


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"}),
    ],
)
async def test_docs_pages_load_every_asset_from_the_service(
    client: httpx.AsyncClient, page: str, expected: set[str]
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "://" not in html, "the page names an absolute (remote) URL"
    references = {a or b for a, b in ASSET_REFERENCE.findall(html)}
    assert {reference.rsplit("/", 1)[-1] for reference in references} == expected
    for reference in references:
        assert reference.startswith("/"), reference
        asset = await client.get(reference)
        assert asset.status_code == 200, reference
        suffix = Path(reference).suffix
        assert EXPECTED_TYPES[suffix] in asset.headers["content-type"], reference
        assert len(asset.content) > 100, reference


async def test_swagger_ui_oauth2_redirect_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs/oauth2-redirect")
    assert response.status_code == 200
    assert "://" not in response.text
