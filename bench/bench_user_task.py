"""A user's own models, federated, against the same models trained centrally (issue 20's goals).

    python -m bench.bench_user_task [--seeds 0,1,2] [--jobs 2] [--local-epochs E --batch-size B --lr LR]

Two models of examples/custom_task.py, given as a user gives them (``MODULE:ATTR``):

- ``bn_cnn`` (batch norm + dropout CNN) on ``mnist5k`` images [1, 28, 28]; goal: within 5 points;
- ``gru`` on ``examples.custom_task:mnist5k_rows``, the same digits as 28 rows of 28 features
  (the same test split); goal: within 12 points.

Federated: ``fedfleet.run_simulation``, 20 phones, Dirichlet(0.5) labels, 10 rounds, every phone
in every round (sample 1.0), the virtual clock, the default trainer (batched; the GRU group falls
back to the per-phone loop by itself). Central: the same model, seed, batch size and learning rate,
plain SGD (bench_accuracy's ``central_accuracy``) for as many passes over the training split as
the fleet makes: rounds x local epochs x sample (50 with fedfleet's training plan defaults, 5 local
epochs of batches of 8 at lr 0.1, which are this benchmark's defaults). Writes
bench/results/user_task.json (``--only``: user_task_bn_cnn.json or user_task_gru.json).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.bench_accuracy import central_accuracy
from bench.common import table, write
from fedfleet.protocol.plan import TrainPlan

PHONES, ROUNDS, PARTITION, SAMPLE = 20, 10, "dirichlet:0.5", 1.0


@dataclass(frozen=True)
class UserTask:
    model: str  # MODULE:ATTR
    dataset: str
    goal_points: float  # the largest gap to central training the goal allows


TASKS = {
    "BN CNN": UserTask("examples.custom_task:bn_cnn", "mnist5k", 5.0),
    "GRU": UserTask("examples.custom_task:gru", "examples.custom_task:mnist5k_rows", 12.0),
}


def central_passes(args: argparse.Namespace) -> int:
    """Passes over the data the fleet makes: each round every sampled phone trains its share for the
    local epochs."""
    return round(ROUNDS * args.local_epochs * SAMPLE)


def run_one(name: str, kind: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training of TASKS[name]: ``kind`` central or federated; its accuracy and wall seconds."""
    import torch

    torch.set_num_threads(1)  # two runs share a 2-core machine with --jobs 2
    task = TASKS[name]
    if kind == "central":
        acc, secs = central_accuracy(task.dataset, task.model, central_passes(args), seed,
                                     batch_size=args.batch_size, lr=args.lr)
        return _done({"model": name, "kind": kind, "seed": seed, "accuracy": acc, "wall_s": round(secs, 1)})
    import fedfleet

    fedfleet.tune_process()  # as the command line's simulate
    t0 = time.perf_counter()
    summary = fedfleet.run_simulation(
        model=task.model, dataset=task.dataset, phones=PHONES, rounds=ROUNDS, partition=PARTITION,
        sample=SAMPLE, local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
        clock="virtual", out=f"runs/bench_user_task/{task.model.rpartition(':')[2]}-s{seed}")
    return _done({"model": name, "kind": kind, "seed": seed, "accuracy": summary["final_accuracy"],
                  "best": summary["best_accuracy"], "wall_s": round(time.perf_counter() - t0, 1)})


def _done(run: dict[str, Any]) -> dict[str, Any]:
    print(f"done: {run}", flush=True)  # a long run shows its trainings as they end
    return run


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model and seed, then one per model over the seeds: gap = central - federated, in
    points; met when the gap is within the model's goal."""
    by = {(r["model"], r["seed"], r["kind"]): r for r in runs}
    rows = []
    for name, task in TASKS.items():
        seeds = sorted({s for (m, s, _) in by if m == name})
        per_seed = []
        for seed in seeds:
            central, fed = by[(name, seed, "central")]["accuracy"], by[(name, seed, "federated")]["accuracy"]
            per_seed.append((central, fed))
            rows.append(_row(name, str(seed), central, fed, task.goal_points))
        if len(seeds) > 1:
            central, fed = (float(np.mean(v)) for v in zip(*per_seed, strict=True))
            rows.append(_row(name, "mean", central, fed, task.goal_points))
    return rows


def _row(name: str, seed: str, central: float, fed: float, goal: float) -> dict[str, Any]:
    gap = round(100 * (central - fed), 2)
    return {"model": name, "seed": seed, "central": round(central, 4), "federated": round(fed, 4),
            "gap_points": gap, "goal_points": goal, "met": "yes" if gap <= goal else "no"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--only", choices=sorted(TASKS), help="one model instead of both")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once, each on one thread")
    # what a user tunes, the same for every seed and for both trainings; fedfleet's defaults
    parser.add_argument("--local-epochs", type=int, default=TrainPlan.local_epochs)
    parser.add_argument("--batch-size", type=int, default=TrainPlan.batch_size)
    parser.add_argument("--lr", type=float, default=TrainPlan.lr)
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if args.jobs < 1 or args.local_epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--jobs, --local-epochs and --batch-size must be at least 1, --lr positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [args.only] if args.only else list(TASKS)
    jobs = [(n, k, s) for s in args.seed_list for n in names for k in ("federated", "central")]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(run_one, *zip(*jobs, strict=True), [args] * len(jobs)))
    print(table(runs, ["model", "kind", "seed", "accuracy", "best", "wall_s"]))
    rows = compare(runs)
    print(table(rows, list(rows[0])))
    settings = {"phones": PHONES, "rounds": ROUNDS, "partition": PARTITION, "sample": SAMPLE,
                "central_epochs": central_passes(args), "clock": "virtual", "trainer": "batched"}
    out = {"args": {k: v for k, v in vars(args).items() if k != "seed_list"}, "settings": settings,
           "tasks": {n: vars(t) for n, t in TASKS.items()}, "runs": runs, "rows": rows}
    name = "user_task" + (f"_{args.only.replace(' ', '_').lower()}" if args.only else "")
    print(f"wrote {write(name, out)}")


if __name__ == "__main__":
    main()
