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

``--population``: how memory and the wall time per merged update grow with the population while
the work stays the same: the same day, profiles and pacing, but a fixed C = 100 phones training at
once and K = 50 updates per merge whatever the population, every phone holding 4 synthetic samples
(float32, made in chunks) and a fixed test set of 2,000, the run capped at ``--versions`` merges.
Phones first check in at seeded times spread at 50 a virtual second (``start_spread_s`` = N / 50).
``--register bulk`` (the default): every phone is registered before the first check-in, through the
admin's bulk requests of 10,000 (``register_in_bulk``; its key derived, its token kept in a column),
built at its first check-in and released back to the columns whenever it sleeps a minute or more;
the registration's wall time is ``register_s``. ``--register when-active``: a phone is built and
registered over HTTP at its first check-in (``register_when_active``), and one whose start comes
after the run's end never registers. ``--register eager``: every phone is built and registered over
HTTP before the first check-in, all within the first virtual minute (the default fleet). The steady
wall per merged update is timed over the second half of the versions. Peak RSS is fleet and server
together (one process on the virtual clock). On a machine shared with other work, the CPU time per
merged update is the steadier figure.

    python -m bench.bench_scale --population --phones 10000,100000,1000000 --versions 120
    python -m bench.bench_scale --population --register when-active --phones 10000,100000,1000000
    python -m bench.bench_scale --population --register eager --phones 10000,100000 --versions 120
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.common import table, write
from fedfleet.device_runtime import aio
from fedfleet.device_runtime.data import Dataset

POPULATION_CONCURRENCY = 100  # C at every population size (K = C / 2)
ACTIVATION_RATE = 50.0  # --population: phones first checking in per virtual second


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


def population_data(phones: int, seed: int = 0, per_phone: int = 4, test: int = 2000) -> Dataset:
    """Gaussian blobs around one 8 x 8 prototype per class (as ``synthetic``), drawn in float32 chunks:
    ``per_phone`` training samples a phone, a test set of ``test`` whatever the population."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, size=(10, 1, 8, 8)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        x = np.empty((n, 1, 8, 8), dtype=np.float32)
        for a in range(0, n, 1 << 20):
            b = min(n, a + (1 << 20))
            x[a:b] = np.clip(protos[y[a:b]] + rng.normal(0, 0.35, size=(b - a, 1, 8, 8)).astype(np.float32), 0, 1)
        return x, y.astype(np.int64)

    x, y = draw(per_phone * phones)
    xt, yt = draw(test)
    return Dataset("synthetic", x, y, xt, yt, 10)


REGISTER_MODES = ("bulk", "when-active", "eager")


def population_workload(phones: int, versions: int, register: str = "bulk", seed: int = 0) -> Any:
    from fedfleet.simulate_config import SimulateConfig

    c = POPULATION_CONCURRENCY
    spread: dict[str, Any] = {} if register == "eager" else {"start_spread_s": phones / ACTIVATION_RATE}
    spread.update({"register_in_bulk": True} if register == "bulk" else
                  {"register_when_active": True} if register == "when-active" else {})
    return SimulateConfig(**spread,
        phones=phones, dataset="synthetic", model="mlp", local_epochs=1, batch_size=8, mode="async",
        concurrency=c, buffer=c // 2, rounds=versions, hours=24.0, devices="default", diurnal=0.5, dropout=0.05,
        seed=seed, out=f"runs/bench_scale_population/{phones}",
        server={"checkin_retry_s": 600.0, "rest_after_update_s": 6 * 3600.0, "checkin_pace": 4.0},
    )


def one_population(phones: int, versions: int, register: str) -> dict[str, Any]:
    from fedfleet.simulate import simulate
    from fedfleet.tuning import tune_process

    cfg = population_workload(phones, versions, register)
    tune_process()
    t0, c0 = time.perf_counter(), time.process_time()
    data = population_data(phones)
    data_s = time.perf_counter() - t0
    marks: list[tuple[float, float, int]] = []  # (wall, CPU, updates merged) as each version is recorded

    def on_row(row: dict[str, Any]) -> None:
        marks.append((time.perf_counter(), time.process_time(), int(row["updates"])))

    result, summary = aio.run(simulate(cfg, on_row, torch_threads=1, data=data))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    half = len(marks) // 2
    steady_updates = sum(u for _, _, u in marks[half + 1:])
    steady_s = marks[-1][0] - marks[half][0] if len(marks) > 1 else 0.0
    steady_cpu_s = marks[-1][1] - marks[half][1] if len(marks) > 1 else 0.0
    emu = summary["emulation"]
    return {
        "phones": phones, "register": register,
        "registered": len(result.devices) if register == "when-active" else phones,
        "built_ever": len(result.devices), "peak_built": result.population.get("peak_built"),
        "releases": result.population.get("releases"), "register_s": result.population.get("register_s"),
        "virtual_s": round(result.rounds[-1]["time_s"], 1),
        "versions": summary["rounds"], "updates": summary["updates"], "checkins": emu["checkins"],
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "data_s": round(data_s, 1),
        "first_version_s": round(marks[0][0] - t0, 1) if marks else None,
        "ms_per_update": round(1e3 * wall / max(summary["updates"], 1), 2),
        "steady_ms_per_update": round(1e3 * steady_s / steady_updates, 2) if steady_updates else None,
        "steady_cpu_ms_per_update": round(1e3 * steady_cpu_s / steady_updates, 2) if steady_updates else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "train_share": round(emu["train_compute_s"] / wall, 4), "final_accuracy": summary["final_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phones", default="1000,10000")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--population", action="store_true", help="fixed work, growing population (see above)")
    ap.add_argument("--versions", type=int, default=120, help="--population: merges a run is capped at")
    ap.add_argument("--register", choices=REGISTER_MODES, default="bulk",
                    help="--population: how the phones register (see above)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(p) for p in args.phones.split(",")]
    if args.one:
        print(json.dumps(one_population(sizes[0], args.versions, args.register) if args.population
                         else one(sizes[0], args.hours)))
        return
    rows = []
    for n in sizes:
        mode = ["--population", "--versions", str(args.versions), "--register", args.register] \
            if args.population else ["--hours", str(args.hours)]
        out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--one", "--phones", str(n), *mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    if args.population:
        print(table(rows, list(rows[0])))
        base = rows[0]
        for r in rows:  # growth from the smallest population
            r["rss_per_phone_kb_over_first"] = round((r["peak_rss_mb"] - base["peak_rss_mb"]) * 1024
                                                     / max(r["phones"] - base["phones"], 1), 2)
            for col in ("steady_ms_per_update", "steady_cpu_ms_per_update"):
                ratio = col.replace("ms_per_update", "vs_first")
                r[ratio] = round(r[col] / base[col], 3) if r[col] and base[col] else None
        name = {"bulk": "scale_population_bulk", "when-active": "scale_population",
                "eager": "scale_population_eager"}[args.register]
        print("wrote", write(name, {"workload": __doc__, "versions": args.versions, "rows": rows}))
        return
    cols = ["phones", "virtual_h", "wall_s", "cpu_s", "updates", "checkins", "updates_per_s", "peak_rss_mb",
            "train_share", "final_accuracy"]
    print(table(rows, cols))
    name = "scale" if args.hours == 24.0 else f"scale_{args.hours:g}h"
    print("wrote", write(name, {"workload": workload.__doc__ or __doc__, "rows": rows}))


if __name__ == "__main__":
    main()
