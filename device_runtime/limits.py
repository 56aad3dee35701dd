"""Process limits an emulated fleet (and a server facing one) needs; no torch here, so the
server's start-up path can use it."""

from __future__ import annotations

import resource

# Connections a server's socket queues before accepting them (the kernel caps it at
# net.core.somaxconn): thousands of phones connect at once when a fleet starts, and with
# aiohttp's default of 128 the kernel dropped their SYNs, whose retries (1, 3, 7, 15 s ...)
# pushed some phones' first check-in of a 10,000-phone fleet past round 1's 60 s deadline.
ACCEPT_BACKLOG = 4096


def open_file_limit() -> int:
    """This process's soft limit on open files (changed by nobody here: see raise_open_file_limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 16


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (children started later
    inherit it) and return the soft limit now in force: each emulated phone's long poll holds a
    socket, and a server in the same process holds the other end. Process-wide: called by
    fedfleet.tuning.tune_process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # not allowed here: live with the soft limit
            pass
    return open_file_limit()
