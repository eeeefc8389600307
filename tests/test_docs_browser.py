"""`/docs` and `/redoc` render in a real browser with no network: headless Chromium opens the pages of a real
server on loopback while every other host name fails to resolve, so an asset fetched from a CDN would leave the
page blank. Chromium comes from the system packages (`apt-get install chromium`); without it the tests skip."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_utils import ServerHandle, running_server

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine: apt-get install chromium")
OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"  # every name but loopback fails to resolve


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_model_dir) as handle:
        yield handle


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran (virtual time lets the OpenAPI fetch and the rendering finish)."""
    assert BROWSER is not None
    result = subprocess.run(
        [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--host-resolver-rules={OFFLINE}", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_swagger_ui_renders_every_route_offline(server: ServerHandle) -> None:
    dom = rendered(f"{server.url}/docs")
    for path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert f'class="opblock-summary-path" data-path="{path}"' in dom, path
    assert 'class="title">r1serve<' in dom


def test_redoc_renders_offline(server: ServerHandle) -> None:
    dom = rendered(f"{server.url}/redoc")
    assert "/v1/chat/completions" in dom and "redoc" in dom.lower()
    assert len(dom) > 20_000  # the rendered reference, not the bare loader page
