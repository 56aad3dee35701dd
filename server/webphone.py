"""The zero-install phone: serve ``android_demo/web`` (a PWA that trains with onnxruntime-web) at ``/phone/``.

``setup_webphone(app)`` adds:

* ``GET /phone/``: the page; ``GET /phone/{file}``: its modules, styles, service worker,
  web manifest and bundled sample digits (only those parts of the directory, never
  ``node_modules``, tests or tools);
* ``GET /phone/vendor/{file}``: the onnxruntime-web files the page runs (the WASM build only),
  from ``android_demo/web/node_modules/onnxruntime-web/dist`` after ``npm ci``, so that
  nothing is fetched from a CDN at run time.

The page talks to the same server's ``/v1/*`` API like any phone. Static files are answered
with ``Cache-Control: no-cache``: the page's service worker keeps the offline copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger("fedfleet.webphone")

DEFAULT_WEB_DIR = Path(__file__).resolve().parent.parent / "android_demo" / "web"
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"
# The WASM-only ES module build and the single-threaded SIMD runtime it loads: all the page needs.
VENDOR_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
APP_FILES = ("index.html", "app.css", "sw.js", "manifest.webmanifest", "icon.svg")
APP_DIRS = ("src", "data")
CONTENT_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".wasm": "application/wasm",  # needed for WebAssembly.instantiateStreaming
}
WEB_DIR_KEY = web.AppKey("webphone_dir", Path)


def setup_webphone(app: web.Application, web_dir: Path | None = None) -> None:
    """Serve the web phone at ``/phone/``; skip (with a log line) when its directory is absent.
    Calling it again on the same app does nothing."""
    if WEB_DIR_KEY in app:
        return
    root = Path(web_dir) if web_dir is not None else DEFAULT_WEB_DIR
    if not (root / "index.html").is_file():
        log.info("web phone not served: %s has no index.html", root)
        return
    if not (root / ORT_DIST / VENDOR_FILES[0]).is_file():
        log.warning("web phone: onnxruntime-web is not installed; run `npm ci` in %s", root)
    app[WEB_DIR_KEY] = root.resolve()
    app.router.add_routes(
        [
            web.get("/phone", _redirect),
            web.get("/phone/vendor/{name}", _vendor),
            web.get("/phone/{path:.*}", _app_file),
        ]
    )


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/phone/")


def _file_response(path: Path) -> web.FileResponse:
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


def _not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=f'{{"error": "not_found", "message": "{what}"}}', content_type="application/json")


async def _vendor(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in VENDOR_FILES:
        raise _not_found("not a vendored onnxruntime-web file")
    path = request.app[WEB_DIR_KEY] / ORT_DIST / name
    if not path.is_file():
        raise _not_found("onnxruntime-web is not installed: run `npm ci` in android_demo/web")
    return _file_response(path)


async def _app_file(request: web.Request) -> web.StreamResponse:
    """Only the app's own files: a fixed list at the top and the ``src``/``data`` trees."""
    root = request.app[WEB_DIR_KEY]
    rel = request.match_info["path"] or "index.html"
    path = (root / rel).resolve()  # ".." is resolved first, so it cannot reach another part
    parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
    allowed = len(parts) == 1 and parts[0] in APP_FILES or len(parts) > 1 and parts[0] in APP_DIRS
    if not allowed or not path.is_file():
        raise _not_found(f"no such web phone file: {rel}")
    return _file_response(path)
