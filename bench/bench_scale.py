"""How an emulated fleet's wall time and memory grow with the number of phones.

Each point is one ``fedfleet simulate`` run in its own process (so peak RSS is that run's):
a virtual day (or ``--hours``) of N phones with drawn device profiles (lognormal compute,
4G/5G/Wi-Fi links, half the phones available only at night, 5% dropout), each holding 20
synthetic samples, training the MLP, asynchronous FedBuff with C = max(50, N/100) phones
training at once and K = C/2 updates per merge, every phone resting 6 hours after it
contributed, check-ins paced by the server (10 min floor). Real HTTP, real bytes, real
training; time is virtual. Reports wall and CPU seconds, updates and check-ins per wall
second, peak RSS, and the share of wall time spent in the training arithmetic itself.

    python -m bench.bench_scale --phones 1000,10000 --hours 24
    python -m bench.bench_scale --phones 100000 --hours 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench.common import table, write
from fedfleet.device_runtime import aio


def workload(phones: int, hours: float, seed: int = 0) -> Any:
    from fedfleet.simulate_config import SimulateConfig

    concurrency = max(50, phones // 100)
    return SimulateConfig(
        phones=phones, dataset=f"synthetic:{20 * phones}", model="mlp", local_epochs=1, batch_size=8,
        mode="async", concurrency=concurrency, buffer=concurrency // 2, rounds=0, hours=hours,
        devices="default", diurnal=0.5, dropout=0.05, seed=seed, out=f"runs/bench_scale/{phones}",
        server={"checkin_retry_s": 600.0, "rest_after_update_s": 6 * 3600.0, "checkin_pace": 4.0},
    )


def one(phones: int, hours: float) -> dict[str, Any]:
    from fedfleet.simulate import simulate
    from fedfleet.tuning import tune_process

    cfg = workload(phones, hours)
    tune_process()  # as the command line's simulate (see fedfleet.tuning)
    t0, c0 = time.perf_counter(), time.process_time()
    result, summary = aio.run(simulate(cfg, torch_threads=1))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    emu = summary["emulation"]
    return {
        "phones": phones, "virtual_h": hours, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "updates": summary["updates"], "versions": summary["rounds"], "checkins": emu["checkins"],
        "updates_per_s": round(summary["updates"] / wall, 1),
        "requests_per_s": round((emu["checkins"] + 2 * summary["updates"]) / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "train_compute_s": emu["train_compute_s"], "train_share": round(emu["train_compute_s"] / wall, 4),
        "final_accuracy": summary["final_accuracy"],
        "wall_s_per_virtual_h": round(wall / hours, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phones", default="1000,10000")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(p) for p in args.phones.split(",")]
    if args.one:
        print(json.dumps(one(sizes[0], args.hours)))
        return
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--one", "--phones", str(n),
                              "--hours", str(args.hours)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    cols = ["phones", "virtual_h", "wall_s", "cpu_s", "updates", "checkins", "updates_per_s", "peak_rss_mb",
            "train_share", "final_accuracy"]
    print(table(rows, cols))
    name = "scale" if args.hours == 24.0 else f"scale_{args.hours:g}h"
    print("wrote", write(name, {"workload": workload.__doc__ or __doc__, "rows": rows}))


if __name__ == "__main__":
    main()
