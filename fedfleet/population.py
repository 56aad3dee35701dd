"""Whether a population of emulated phones fits in this machine's memory, said before it starts.

A fleet and its server cost memory per registered phone (the fleet's phone, its asyncio task and
counters; the server's registration row, caches and books) on top of a fixed base (the
interpreter, torch, the model). The figures below are measured (tracemalloc and peak RSS, see
docs/emulation.md, "Population scale"); a run whose estimate exceeds the memory available now is
refused in one line with the estimate, before the server starts or any phone registers.
"""

from __future__ import annotations

import os
from pathlib import Path

# Resident bytes per registered phone, fleet and server together, with headroom: peak RSS grew by
# 6.8 KB a phone from 10,000 to 100,000 phones registered up front, each running and holding a 4-sample
# shard (`python -m bench.bench_scale --population --eager`, docs/benchmarks.md); 830 MB at 10,000.
BYTES_PER_PHONE = 8_000
BASE_BYTES = 1_000_000_000  # the process before any phone: interpreter, torch, numpy, aiohttp, the server
# Registered in bulk and released while they sleep (register_in_bulk), an idle phone is a row of columns
# on each side: peak RSS grew by ~1.3 KB a phone from 10,000 to 1,000,000 phones (`bench_scale --population`),
# 1 KB of it the phone's 4 samples; with headroom.
BULK_BYTES_PER_PHONE = 2_000


def estimate_bytes(phones: int, dataset_bytes: int = 0, per_phone: int = BYTES_PER_PHONE) -> int:
    """Peak memory of a ``phones``-phone simulation, its dataset (``dataset_bytes``) aside."""
    return BASE_BYTES + phones * per_phone + dataset_bytes


def available_bytes() -> int | None:
    """Memory available to a new process now (Linux: MemAvailable), else the machine's; None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_population(phones: int, available: int | None = None, per_phone: int = BYTES_PER_PHONE) -> None:
    """ValueError, one line with the estimate, if ``phones`` phones cannot fit in ``available``
    bytes (default: what the machine has available now), at ``per_phone`` bytes a phone."""
    available = available_bytes() if available is None else available
    need = estimate_bytes(phones, per_phone=per_phone)
    if available is not None and need > available:
        raise ValueError(
            f"phones (--phones): {phones:,} phones need about {need / 1e9:.1f} GB (fleet and server, "
            f"~{per_phone / 1e3:.0f} KB a phone over a {BASE_BYTES / 1e9:.1f} GB base) but "
            f"{available / 1e9:.1f} GB is available; run fewer phones, or shard the fleet over machines "
            f"(fedfleet fleet --shard)")
