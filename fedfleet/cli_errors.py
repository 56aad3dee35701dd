"""What ``fedfleet`` reports as a user's mistake: one line, exit status 2 (see fedfleet.cli.main)."""

from __future__ import annotations

import sys


class CliError(Exception):
    """A user's mistake found by the command line itself: reported as one line, exit status 2."""


def _user_error(exc: Exception) -> str | None:
    """The one-line message of an exception caused by what the user gave (a flag, a file, a server
    to reach), or None for anything else. Only classes of modules already loaded are looked up."""
    if isinstance(exc, (CliError, ValueError, FileNotFoundError)):
        return str(exc)
    mods = sys.modules
    if "fedfleet.export.manifest" in mods and isinstance(exc, mods["fedfleet.export.manifest"].BundleError):
        return f"bundle: {exc}"
    if "fedfleet.device_runtime.client" in mods and isinstance(exc, mods["fedfleet.device_runtime.client"].ServerError):
        return f"the server refused: {exc}"
    if "aiohttp" in mods:
        aiohttp = mods["aiohttp"]
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot reach the server at {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"the server answered {exc.status} {exc.message} to {exc.request_info.method} {exc.request_info.url}"
        if isinstance(exc, aiohttp.InvalidURL):
            return f"not a server URL: {exc}"
    return None
