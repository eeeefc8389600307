"""`/docs` and `/redoc` served from r1serve itself, so that they render on a host without internet access.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, which an air-gapped deployment cannot reach: the
page stays blank. The `fastapi-offline` package ships the dist files (Swagger UI 5, which renders the
OpenAPI 3.1 document FastAPI writes, and ReDoc's standalone bundle); they are mounted under `/docs-static`
and the pages point at them, under the server's `--root-path` when it runs behind a proxy.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PATH = "/docs-static"


def static_dir() -> str:
    """The folder of the vendored Swagger UI and ReDoc files."""
    return str(files("fastapi_offline") / "static")


def install_docs(app: FastAPI) -> None:
    """Mount the static files and add `/docs` and `/redoc` (create the app with `docs_url=None`,
    `redoc_url=None`)."""
    app.mount(STATIC_PATH, StaticFiles(directory=static_dir()), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{STATIC_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{STATIC_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
                                   oauth2_redirect_url=None)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{STATIC_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{STATIC_PATH}/favicon.png", with_google_fonts=False)
