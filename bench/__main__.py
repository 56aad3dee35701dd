"""``make bench``: every benchmark in one go; each prints its table and writes bench/results/*.json.

    .venv/bin/python -m bench [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time

QUICK = [
    ["bench.bench_codec", "--repeats", "5"],
    ["bench.bench_async", "--phones", "60", "--updates", "300", "--target", "0.7"],
]
FULL = [
    ["bench.bench_codec"],
    ["bench.bench_runtimes"],
    ["bench.bench_batched"],
    ["bench.bench_async"],
    ["bench.bench_accuracy", "central"],
    ["bench.bench_accuracy", "codec"],
    ["bench.bench_accuracy", "privacy"],
    ["bench.bench_user_task", "--seeds", "0,1,2", "--jobs", "2"],
    ["bench.bench_scale", "--phones", "1000,10000"],
    ["bench.bench_faults", "all"],
    ["bench.bench_attack"],
    ["bench.bench_load", "--conns", "100,1000,5000"],
    ["bench.bench_byzantine", "--jobs", "2"],
    ["bench.bench_ray"],
    ["bench.bench_flower", "--phones", "100,10000"],
    ["bench.bench_gossip"],
]


def main() -> int:
    runs = QUICK if "--quick" in sys.argv else FULL
    failed = []
    for args in runs:
        t0 = time.perf_counter()
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", *args])
        print(f"=== {args[0]}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(args[0])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
