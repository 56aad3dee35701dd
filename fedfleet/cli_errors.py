"""What ``fedfleet`` reports as a user's mistake: one line, exit status 2 (see fedfleet.cli.main).

A user's mistake is either found while the command checks what it was given (``checking_input``:
there a ValueError or FileNotFoundError is a verdict on a flag, a file or a name), or is one of the
named errors ``user_error`` knows (a server that refuses, a data dir in use or holding another
task, a dataset folder without its files). Any other exception is a fault of fedfleet's and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class CliError(Exception):
    """A user's mistake found by the command line itself: reported as one line, exit status 2."""


@contextmanager
def checking_input() -> Iterator[None]:
    """Where a command checks its flags, files and names: a ValueError or FileNotFoundError raised
    in here judges the user's input and becomes a CliError (one line). Outside, they are faults."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an exception caused by what the user gave (a flag, a file, a server
    to reach), or None for anything else. Only classes of modules already loaded are looked up."""
    if isinstance(exc, CliError):
        return str(exc)
    mods = sys.modules
    for module, name, prefix in (("fedfleet.export.manifest", "BundleError", "bundle: "),
                                 ("fedfleet.device_runtime.protocol_client", "ServerError", "the server refused: "),
                                 ("fedfleet.device_runtime.data", "DatasetUnavailable", ""),
                                 ("fedfleet.server.store", "StoreInUse", ""),
                                 ("fedfleet.server.app", "OtherTask", ""),
                                 ("fedfleet.server.admin", "StoredPlanConflict", "")):
        cls = getattr(mods.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return f"{prefix}{exc}"
    if "aiohttp" in mods:
        aiohttp = mods["aiohttp"]
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot reach the server at {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"the server answered {exc.status} {exc.message} to {exc.request_info.method} {exc.request_info.url}"
        if isinstance(exc, aiohttp.InvalidURL):
            return f"not a server URL: {exc}"
    return None
