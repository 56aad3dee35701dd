"""Training on every core: the batched CNN step and a whole ``fedfleet simulate`` with 1 or 2 torch
intra-op threads and 1 or 2 training threads (``train_many``'s ``workers``: chunks side by side).

Two measurements, each side by side in one run, alternating the settings (A B A B ...) so that load
from other processes hits both alike; the table shows medians, and the load average is recorded
around every repeat:

- **step**: ``train_many`` on a group of ``--group`` phones (the built-in ``cnn`` on mnist5k-shaped
  1x28x28 inputs, ``--examples`` each, one local epoch at batch 16), run on a worker thread as
  ``BatchedTrainer`` runs it, with that thread's torch intra-op threads set to T and the group's chunks
  trained on W threads (setting ``TxW``). Beside it the
  arithmetic floor: FLOPs per update (``torch.utils.flop_counter.FlopCounterMode`` over one group's
  training) and this machine's measured rate on a 3x3 convolution and a matmul at the same
  thread count.
- **simulate**: ``fedfleet simulate --phones 100 --rounds 5 --sample 0.5 --dataset mnist5k --model cnn
  --local-epochs 1 --batch-size 16 --lr 0.05 --partition iid --train-threads T --workers W``, each a whole process
  (wall time, CPU time of the process and its children, steady-round updates/s from summary.json).

Writes bench/results/threads.json.

    python -m bench.bench_threads [--repeats 5] [--sim-repeats 3] [--settings 1x1 2x1 1x2] [--skip-sim]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import table, write
from fedfleet.device_runtime.batched import Job, train_many
from fedfleet.device_runtime.data import load_dataset
from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.export.models import ModelSpec, build_model

CFG = TrainConfig(local_epochs=1, batch_size=16, lr=0.05)
SIM_ARGS = ["--phones", "100", "--rounds", "5", "--sample", "0.5", "--dataset", "mnist5k", "--model", "cnn",
            "--local-epochs", "1", "--batch-size", "16", "--lr", "0.05", "--partition", "iid"]


def _load() -> float:
    return os.getloadavg()[0]


def group_jobs(x: np.ndarray, y: np.ndarray, phones: int, examples: int) -> list[Job]:
    """Fresh seeded generators per call: every repeat does identical work."""
    return [(x[i * examples:(i + 1) * examples], y[i * examples:(i + 1) * examples], np.random.default_rng([7, i]))
            for i in range(phones)]


def flops_per_update(model: torch.nn.Module, params: dict[str, np.ndarray], job: Job) -> dict[str, int]:
    """FLOPs of one phone's training (``FlopCounterMode``): the eager step (the arithmetic an update needs)
    and the vmapped step of that phone alone (its last batch padded to 16 rows). A vmapped group of
    many phones is not counted: the counter's rule for a grouped convolution's weight gradient ignores
    the groups and counts every phone against every other (P^2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime

    eager, vmapped = FlopCounterMode(display=False), FlopCounterMode(display=False)
    runtime = TorchRuntime(build_model(ModelSpec("cnn", (1, 28, 28), 10), seed=0))
    with eager:
        runtime.train(job[0], job[1], CFG, np.random.default_rng(0))
    with vmapped:
        train_many(model, params, [job], CFG)
    return {"eager": int(eager.get_total_flops()), "vmapped": int(vmapped.get_total_flops())}


def kernel_rates(threads: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of this machine at ``threads`` threads: the CNN's second convolution over a batch of
    16 x 50 phones (forward), and a 1024^2 float32 matmul. Best of ``repeats``."""
    def run() -> dict[str, float]:
        torch.set_num_threads(threads)
        x, w = torch.randn(800, 16, 14, 14), torch.randn(32, 16, 3, 3)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        out: dict[str, float] = {}
        for name, fn, flops in (("conv", lambda: torch.conv2d(x, w, padding=1), 2 * 800 * 32 * 16 * 9 * 14 * 14),
                                ("matmul", lambda: a @ b, 2 * 1024**3)):
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            out[f"{name}_gflops"] = flops / best / 1e9
        return out

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_once(threads: int, workers: int, model: torch.nn.Module, params: dict[str, np.ndarray], x: np.ndarray,
              y: np.ndarray, phones: int, examples: int) -> dict[str, float]:
    """One group on a fresh worker thread with ``threads`` intra-op threads (a thread's OpenMP team size
    is fixed at its first parallel region, so each setting gets a thread of its own)."""
    def run() -> tuple[float, float]:
        torch.set_num_threads(threads)
        train_many(model, params, group_jobs(x, y, phones, examples), CFG, workers=workers)  # warm-up
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        train_many(model, params, group_jobs(x, y, phones, examples), CFG, workers=workers)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - t0, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)

    load = _load()
    with ThreadPoolExecutor(1) as pool:
        wall, cpu = pool.submit(run).result()
    return {"wall_s": wall, "cpu_s": cpu, "load": load}


def sim_once(threads: int, workers: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fedfleet.cli", "simulate", *SIM_ARGS, "--train-threads", str(threads),
           "--workers", str(workers), "--out", str(out)]
    load = _load()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.getcwd()})
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # round 1: start-up
    steady = sum(r["updates"] for r in rounds) / sum(r["wall_s"] for r in rounds)
    return {"wall_s": wall, "cpu_s": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), "load": load,
            "steady_updates_per_s": steady, "train_fraction": summary["emulation"]["train_fraction"],
            "accuracy": summary.get("final_accuracy")}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs if r.get(key) is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["1x1", "2x1", "1x2"],
                    help="TxW: T torch intra-op threads, W training threads (chunks side by side)")
    ap.add_argument("--group", type=int, default=50, help="phones per vmapped group")
    ap.add_argument("--examples", type=int, default=50, help="examples per phone (mnist5k over 100 phones)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sim-repeats", type=int, default=3)
    ap.add_argument("--skip-sim", action="store_true")
    args = ap.parse_args()

    data = load_dataset("mnist5k", seed=0)
    model = build_model(ModelSpec("cnn", (1, 28, 28), 10), seed=0)
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    x, y = data.x_train, data.y_train
    counted = flops_per_update(model, params, group_jobs(x, y, 1, args.examples)[0])
    flops = counted["eager"]

    settings = [tuple(int(v) for v in name.split("x")) for name in args.settings]
    steps: dict[str, list[dict[str, float]]] = {n: [] for n in args.settings}
    for _ in range(args.repeats):
        for name, (t, w) in zip(args.settings, settings, strict=True):
            steps[name].append(step_once(t, w, model, params, x, y, args.group, args.examples))
    rates = {t: kernel_rates(t, 5) for t in sorted({t for t, _ in settings})}
    rows = []
    for name, (t, w) in zip(args.settings, settings, strict=True):
        wall = _median(steps[name], "wall_s")
        achieved = flops * args.group / wall / 1e9
        cores = max(t, w)  # the floor: the faster kernel rate at one thread, times the cores in use
        best = max(rates[1].values()) * cores if 1 in rates else max(rates[t].values())
        rows.append({"setting": name, "group_ms": round(wall * 1e3, 1), "updates_per_s": round(args.group / wall, 1),
                     "cpu_pct": round(100 * _median(steps[name], "cpu_s") / wall), "gflops": round(achieved, 2),
                     "conv_gflops": round(rates[t]["conv_gflops"], 2), "matmul_gflops": round(rates[t]["matmul_gflops"], 2),
                     "floor_ms_per_update": round(flops / best / 1e6, 2),
                     "ms_per_update": round(wall / args.group * 1e3, 2),
                     "cpu_ms_per_update": round(_median(steps[name], "cpu_s") / args.group * 1e3, 2),
                     "load": round(_median(steps[name], "load"), 2)})
    print(f"batched CNN step: {args.group} phones x {args.examples} examples, batch 16, "
          f"{flops / 1e6:.1f} MFLOP per update (FlopCounterMode; {counted['vmapped'] / 1e6:.1f} with the vmapped "
          f"step's padding); medians of {args.repeats} alternating repeats; floor = FLOPs / (the faster kernel "
          "rate on one thread x the cores the setting uses); setting TxW: T intra-op threads, W training threads")
    print(table(rows, list(rows[0])))

    sims: dict[str, list[dict[str, float]]] = {n: [] for n in args.settings}
    sim_rows = []
    if not args.skip_sim:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.sim_repeats):
                for name, (t, w) in zip(args.settings, settings, strict=True):
                    sims[name].append(sim_once(t, w, Path(tmp) / f"{name}r{r}"))
        for name in args.settings:
            wall = _median(sims[name], "wall_s")
            sim_rows.append({"setting": name, "wall_s": round(wall, 2),
                             "cpu_pct": round(100 * _median(sims[name], "cpu_s") / wall),
                             "steady_updates_per_s": round(_median(sims[name], "steady_updates_per_s"), 1),
                             "train_fraction": round(_median(sims[name], "train_fraction"), 3),
                             "load": round(_median(sims[name], "load"), 2)})
        print(f"fedfleet simulate {' '.join(SIM_ARGS)} --train-threads T --workers W: medians of {args.sim_repeats} "
              "alternating whole processes")
        print(table(sim_rows, list(sim_rows[0])))
    path = write("threads", {"flops_per_update": counted, "group": args.group, "examples": args.examples,
                             "step": rows, "step_runs": steps, "kernel_rates": rates,
                             "simulate_args": SIM_ARGS, "simulate": sim_rows, "simulate_runs": sims})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
