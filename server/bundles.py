"""Serving the task's on-device bundle (``fedfleet export``): phones verify every hash.

``GET /v1/bundle`` answers the manifest, ``GET /v1/bundle/{file}`` one artifact; only the
fixed bundle names are served (``export.bundle.bundle_file``), to registered phones.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from fedfleet.export.bundle import bundle_file, content_type, verify_bundle
from fedfleet.export.manifest import MANIFEST, BundleError, Manifest
from fedfleet.protocol import TensorSpec
from fedfleet.server.http import authenticate, fail
from fedfleet.server.state import STORE

BUNDLE = web.AppKey("bundle", Path)


def check_bundle(bundle_dir: Path, model: str, specs: dict[str, TensorSpec]) -> Manifest:
    """The bundle must be intact and train exactly the task's parameters, or the server won't start."""
    manifest = verify_bundle(bundle_dir)
    trainable = {p.name: TensorSpec(tuple(p.shape), p.dtype) for p in manifest.trainable()}
    if manifest.model != model or trainable != specs:
        raise ValueError(f"bundle {bundle_dir} is for {manifest.model} with parameters {sorted(trainable)}; "
                         f"the task trains {model} with {sorted(specs)}")
    return manifest


async def bundle(request: web.Request) -> web.StreamResponse:
    authenticate(request, request.app[STORE])
    if BUNDLE not in request.app:
        fail(404, "no_bundle", "this server has no exported bundle (start it with --bundle DIR)")
    name = request.match_info.get("name", MANIFEST)
    try:
        path = bundle_file(request.app[BUNDLE], name)
        kind = content_type(name)
    except BundleError as exc:
        fail(404, "no_such_file", str(exc))
    return web.Response(body=path.read_bytes(), content_type=kind)


def setup_bundle(app: web.Application, bundle_dir: Path | None) -> None:
    if bundle_dir is not None:
        app[BUNDLE] = Path(bundle_dir)
    app.router.add_get("/v1/bundle", bundle)
    app.router.add_get("/v1/bundle/{name}", bundle)
