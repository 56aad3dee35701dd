"""Process limits an emulated fleet (and a server facing one) needs; no torch here, so the
server's start-up path can use it."""

from __future__ import annotations

import resource


def open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (children started later
    inherit it) and return the soft limit now in force: each emulated phone's long poll holds a
    socket, and a server in the same process holds the other end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # not allowed here: live with the soft limit
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 16
