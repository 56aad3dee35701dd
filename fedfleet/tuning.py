"""Process-wide settings for a process that serves or emulates thousands of phones.

Only the command line's entry points (and a server process they start) call ``tune_process``;
building an app or running a fleet in a process of one's own changes none of these settings. A
program embedding fedfleet at that scale calls it once itself, before it starts.
"""

from __future__ import annotations

import gc
import os

from fedfleet.device_runtime.limits import raise_open_file_limit

# The cyclic GC's thresholds (generation 0 allocations, then collections of the younger generation).
# Thousands of requests in flight survive every young collection, so at Python's defaults
# (700, 10, 10) a 10,000-phone fleet spent ~5 s of a 30 s run collecting (14 full collections of
# ~0.18 s, 415 middle ones), and a server facing it 4.5 s of 30 s; collecting 70x less often, full
# collections about never while a fleet runs, steady rounds went from ~740 to ~1,000+ updates/s.
GC_THRESHOLDS = (50_000, 20, 1000)


def tune_process(*, torch_threads: int | None = None, freeze: bool = True) -> None:
    """Set this process up to serve or emulate many phones: the open-file limit up to its hard limit
    (each long poll holds a socket; children started later inherit it), the GC thresholds above
    (never lowered), everything alive now frozen out of the GC's walks (``freeze``: the modules, a
    loaded model, an app built before this call live as long as the process), numpy's BLAS on one
    thread (see limit_blas_threads), and torch's intra-op threads (``torch_threads``; importing torch
    if need be)."""
    limit_blas_threads()
    raise_open_file_limit()
    now = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(now, GC_THRESHOLDS, strict=True)))
    if freeze:
        gc.freeze()
    if torch_threads is not None:
        set_torch_threads(torch_threads)


def limit_blas_threads(threads: int = 1) -> None:
    """numpy's BLAS (OpenBLAS) on ``threads`` threads. The server's and the fleet's products are of
    one update at a time (an update's norm, a row of a merge), and OpenBLAS hands a 20,000-element
    dot product to its thread pool: on 2 cores shared with a fleet, a server and other processes,
    ``update_norms`` of one CNN update took 5.5 ms with the pool and 0.06 ms on one thread (a whole
    process's CPU profile had 13% of the CNN run's wall time in it; bench/stage_profile.py)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def set_torch_threads(threads: int) -> None:
    """Torch's intra-op threads for the whole process, before its training thread first runs (a thread
    keeps the OpenMP team size it started with). The command line's ``--train-threads`` (default 1):
    OpenMP's teams wait for their slowest thread, so on cores other processes share, 2 threads made the
    batched CNN step slower, not faster (bench/bench_threads.py, docs/accelerators.md)."""
    import torch

    torch.set_num_threads(threads)


def parse_workers(value: object) -> int:
    """``--workers`` (and ``workers`` in a TOML file or the Python API): a positive count, or ``auto``: the
    cores this process may run on."""
    return _count_or_auto(value, "--workers", "training threads")


def parse_threads(value: str) -> int:
    """``--train-threads``: a positive count, or ``auto``: the cores this process may run on."""
    return _count_or_auto(value, "--train-threads", "threads")


def _count_or_auto(value: object, flag: str, what: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())) \
            or int(value) < 1:
        raise ValueError(f"{flag} {value}: give a number of {what} (at least 1) or auto")
    return int(value)
