"""The same fleet run locally (one process) and sharded over a local Ray cluster: updates per second.

Each run gets a fresh ``fedfleet serve`` subprocess and a ``fedfleet fleet`` subprocess against it.
"total upd/s" counts the whole fleet command (Ray start-up included); "steady upd/s" counts the
updates merged after the first round over the server time between the first and the last publish.

    .venv/bin/python -m bench.bench_ray [--phones 40] [--rounds 6] [--model cnn] [--dataset digits] [--shards 2]

Results go to bench/results/ray_DATASET.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import table, wait_listening, write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfleet.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
         "--model", args.model, "--dataset", args.dataset, "--rounds", str(args.rounds), "--sample", str(args.sample),
         "--seed", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(proc, port)
    return proc


def run(backend: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = _free_port()
    server = _serve(work / f"server-{backend}", port, args)
    out = work / f"run-{backend}"
    cmd = [sys.executable, "-m", "fedfleet.cli", "fleet", "--server", f"http://127.0.0.1:{port}", "--backend", backend,
           "--phones", str(args.phones), "--dataset", args.dataset, "--model", args.model, "--rounds", str(args.rounds),
           "--seed", "0", "--out", str(out)]
    if backend == "ray":
        cmd += ["--shards", str(args.shards)]
    env = {**os.environ, "RAY_TMPDIR": str(work / "ray")}
    try:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = sum(r["updates"] for r in rows)
    steady = sum(r["updates"] for r in rows[1:]) / max(rows[-1]["time_s"] - rows[0]["time_s"], 1e-9)
    return {"backend": backend if backend == "local" else f"ray x{args.shards}", "rounds": len(rows),
            "updates": updates, "fleet_wall_s": round(wall, 2), "total_upd_per_s": round(updates / wall, 3),
            "steady_upd_per_s": round(steady, 3), "final_accuracy": rows[-1]["accuracy"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phones", type=int, default=40)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sample", type=float, default=0.5)
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ffbr-"))  # short: Ray's socket paths live under it
    try:
        rows = [run("local", args, work), run("ray", args, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, list(rows[0])))
    name = f"ray_{args.dataset.split(':')[0]}"
    path = write(name, {"config": vars(args), "cpus": os.cpu_count(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
