"""bench_flower's realistic workloads, each side timed as a whole process (start-up included).

``mlp``: the 64-32-10 MLP on digits, 20 rounds, lr 0.5. ``cnn``: fedfleet's CNN on mnist5k, 10 rounds,
lr 0.05. ``transfer``: bench/transfer_task.py's CNN whose convolutions were pretrained on upscaled digits and
are frozen, its linear head trained by the phones, on mnist5k, 10 rounds, lr 0.05. All: 100 phones with IID shards,
50% sampled per round, 1 local epoch of plain SGD at batch 16, central evaluation of every version.
fedfleet runs ``python -m fedfleet.cli simulate`` in a fresh process (real HTTP, signatures, SQLite);
Flower runs bench/flower_side.py in its own venv; both from the same .npz-described model, shards and
initial state (flower_side.py loads fedfleet's state strictly). For each side:

- ``process_s``: from starting the command to its exit (interpreter, imports, Ray or the server,
  registration, every round, writing the outputs);
- ``steady_updates_per_s``: merged updates over the wall time of rounds 2..R (from the side's own
  per-round marks);
- fedfleet's ``train_fraction``: the batched trainer's busy time over the run's wall time
  (summary.json ``emulation``), and its ``startup`` timeline (fedfleet.startup);
- one extra fedfleet run under py-spy (bench/stage_profile.py): CPU by stage (training, evaluation,
  HTTP, codec, signatures, merge, storage, start-up imports) as shares of that run's wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str
    model: str
    rounds: int
    lr: float
    phones: int = 100
    sample: float = 0.5
    local_epochs: int = 1
    batch_size: int = 16
    partition: str = "iid"
    seed: int = 0
    peer_model: str | None = None  # flower_side.py's name for the model (default: model)
    pretrained: bool = False  # initial weights from bench/transfer_task.py's pretrain (--init-weights)


WORKLOADS = {
    "mlp": Workload("mlp", "digits", "mlp", rounds=20, lr=0.5),
    "cnn": Workload("cnn", "mnist5k", "cnn", rounds=10, lr=0.05),
    "transfer": Workload("transfer", "mnist5k", "bench.transfer_task:frozen_cnn", rounds=10, lr=0.05,
                         peer_model="cnn-frozen", pretrained=True),
}


def fedfleet_command(w: Workload, out: Path, server_process: str, train_threads: str,
                     init_weights: Path | None = None) -> list[str]:
    extra = ["--init-weights", str(init_weights)] if init_weights is not None else []
    return [sys.executable, "-m", "fedfleet.cli", "simulate", "--phones", str(w.phones), "--rounds", str(w.rounds),
            "--sample", str(w.sample), "--dataset", w.dataset, "--model", w.model, "--local-epochs",
            str(w.local_epochs), "--batch-size", str(w.batch_size), "--lr", str(w.lr), "--partition", w.partition,
            "--seed", str(w.seed), "--devices", "none", "--server-process", server_process,
            "--train-threads", train_threads, "--out", str(out), *extra]


def run_fedfleet(w: Workload, out: Path, server_process: str, train_threads: str, timeout_s: float,
                 init_weights: Path | None = None) -> dict[str, Any]:
    cmd = fedfleet_command(w, out, server_process, train_threads, init_weights)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    process_s = time.perf_counter() - t0
    base = {"system": "fedfleet", "workload": w.name, "setting": f"server_process={server_process}, "
            f"train_threads={train_threads}", "process_s": process_s}
    if proc.returncode != 0:
        return {**base, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "round" in r and "wall_s" in r]
    return {**base, **_rates([int(r["updates"]) for r in rows], [float(r["wall_s"]) for r in rows]),
            "accuracy": summary["final_accuracy"], "train_fraction": summary["emulation"]["train_fraction"],
            "server_process": summary["server_process"], "startup": summary.get("startup"),
            "command": " ".join(cmd[1:])}


def run_flower(w: Workload, python: Path, npz: Path, client_cpus: float, timeout_s: float,
               log: Path) -> dict[str, Any]:
    from bench.bench_flower import run_flower as run_flower_side

    t0 = time.perf_counter()
    got = run_flower_side(python, npz, w.rounds, client_cpus, timeout_s, log, workload=asdict(w))
    got.update(workload=w.name, setting=f"cpus={client_cpus}", process_s=time.perf_counter() - t0)
    if "error" not in got:
        got.update(_rates(got["round_updates"], got["round_wall_s"]))
    return got


def _rates(updates: list[int], wall: list[float]) -> dict[str, Any]:
    return {"rounds": len(updates), "updates": sum(updates), "round_wall_s": wall, "rounds_s": sum(wall),
            "first_round_s": wall[0] if wall else None,
            "steady_updates_per_s": sum(updates[1:]) / steady_s if (steady_s := sum(wall[1:], 0.0)) else None}


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each fedfleet row against the best Flower row of its workload: whole process and steady rounds."""
    for r in rows:
        if r["system"] != "fedfleet" or "error" in r:
            continue
        peers = [f for f in rows if f["system"] == "flower" and f["workload"] == r["workload"] and "error" not in f]
        if not peers:
            continue
        fastest = min(peers, key=lambda f: f["process_s"])
        r["ratio_process"] = fastest["process_s"] / r["process_s"]
        steady = max(peers, key=lambda f: f.get("steady_updates_per_s") or 0.0)
        if r.get("steady_updates_per_s") and steady.get("steady_updates_per_s"):
            r["ratio_steady"] = r["steady_updates_per_s"] / steady["steady_updates_per_s"]


def run_workloads(names: list[str], python: Path, work: Path, client_cpus: list[float], server_process: list[str],
                  train_threads: list[str], flower_timeout: float, profile: bool) -> dict[str, Any]:
    from bench.bench_flower import write_npz
    from bench.stage_profile import profile_command

    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for name in names:
        w = WORKLOADS[name]
        npz = work / f"data-{name}.npz"
        weights = None
        if w.pretrained:
            from bench.transfer_task import pretrain
            from fedfleet.device_runtime.data import load_dataset

            data = load_dataset(w.dataset, seed=w.seed)
            weights = pretrain(work / f"init-{name}.safetensors", data.input_shape, data.num_classes, w.seed)
        write_npz(npz, w.dataset, w.phones, w.seed, w.model, None if weights is None else str(weights), w.peer_model)
        print(f"== {name}: {w.model} on {w.dataset}, {w.phones} phones, {w.rounds} rounds", flush=True)
        for sp in server_process:
            for threads in train_threads:
                row = run_fedfleet(w, work / f"ff-{name}-{sp}-{threads}", sp, threads, 900, weights)
                rows.append(row)
                print(_line(row), flush=True)
        for cpus in client_cpus:
            row = run_flower(w, python, npz, cpus, flower_timeout, work / f"flower-{name}-{cpus}.log")
            rows.append(row)
            print(_line(row), flush=True)
        if profile:
            cmd = fedfleet_command(w, work / f"ff-{name}-profiled", server_process[0], train_threads[0], weights)
            profiles[name] = {"command": " ".join(cmd[1:]),
                              **profile_command(cmd, work / f"profile-{name}.txt")}
            shares = profiles[name]["share_of_wall_by_stage"]
            print("profile: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), flush=True)
    ratios(rows)
    return {"workloads": {n: asdict(WORKLOADS[n]) for n in names}, "runs": rows, "profiles": profiles}


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['system']} {r['setting']}: {r['error'][:200]}"
    return (f"{r['system']} {r['setting']}: process {r['process_s']:.1f} s, rounds {r['rounds_s']:.1f} s, "
            f"steady {r.get('steady_updates_per_s') or 0:.1f} updates/s, accuracy {r.get('accuracy')}")
