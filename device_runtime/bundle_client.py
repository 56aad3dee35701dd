"""Download the task's bundle from the server and verify every file against its manifest."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from fedfleet.export.bundle import verify_bundle, verify_file_bytes
from fedfleet.export.manifest import MANIFEST, Manifest


async def fetch_bundle(session: aiohttp.ClientSession, server: str, token: str, dest: Path) -> tuple[Manifest, int]:
    """Write the bundle into ``dest``; returns its manifest and the bytes downloaded. A file
    whose sha256 differs from the manifest raises ``HashMismatch`` before anything loads it."""
    headers = {"Authorization": f"Bearer {token}"}
    base = server.rstrip("/") + "/v1/bundle"
    dest.mkdir(parents=True, exist_ok=True)
    async with session.get(base, headers=headers) as resp:
        resp.raise_for_status()
        manifest_bytes = await resp.read()
    manifest = Manifest.from_json(manifest_bytes.decode())
    total = len(manifest_bytes)
    for name, info in sorted(manifest.artifacts.items()):
        if not info.available:
            continue
        async with session.get(f"{base}/{name}", headers=headers) as resp:
            resp.raise_for_status()
            data = await resp.read()
        verify_file_bytes(manifest, name, data)
        (dest / name).write_bytes(data)
        total += len(data)
    (dest / MANIFEST).write_bytes(manifest_bytes)
    return verify_bundle(dest), total
