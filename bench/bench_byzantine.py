"""Byzantine phones against robust aggregation rules (issue 7), through the real server.

50 phones, IID split, MLP, synchronous FedAvg rounds with every phone in every round (sample
1.0). First one clean run per rule, then every attacker fraction x attack x rule. Each run is
``fedfleet simulate`` in-process (real aiohttp server on loopback, real SQLite, the batched
trainer). The attackers are drawn by the fleet with the run's seed, so every cell of one
fraction attacks with the same phones.

Goals (issue 7): FedAvg degrades (the attack works); each robust rule stays within 2 accuracy
points of the clean accuracy at 10% attackers and within 5 points at 20%. "Clean accuracy" is
plain FedAvg with no attackers: a rule that is itself worse than FedAvg when nobody attacks pays
that cost in the table too. Accuracy is the final round's test accuracy.

The per-version report of suspected outliers is scored against the true attackers, summed over
every round of the run: recall (attackers named / attackers merged) and the false-positive rate
(honest phones named / honest phones merged). Scored on the outlier tests (norm z-score,
direction, clipping, trimming); Krum's list of the f = 25% updates it did not select is a
decision, not a test, and is scored separately in the JSON (``suspects_all``).

``--reuse`` takes a cell from its run directory when that directory holds a finished run of the
same configuration (to resume an interrupted table, or to re-score one without re-training).

    .venv/bin/python -m bench.bench_byzantine [--dataset digits|mnist5k] [--rounds 20] [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import run_sim, table, write
from fedfleet.device_runtime.attacks import choose_attackers
from fedfleet.device_runtime.data import load_dataset, partition
from fedfleet.simulate_config import SimulateConfig

FRACTIONS = (0.02, 0.10, 0.20)
# Honest MLP deltas on digits (2,410 weights) have an L2 norm of about 0.5; noise:3 (norm ~150)
# is the smallest of std 0.1, 1 and 3 that costs plain FedAvg accuracy with a single attacker
# (0.1 and 1 did not, even at 10% attackers: their noise averages out over 50 phones and rounds).
ATTACKS = ("signflip", "scale:10", "scale:100", "noise:3", "labelflip")
# The rules as a deployment would configure them, none knowing how many phones attack.
RULES = {
    "none": "none",
    "normbound": "normbound",
    "median": "median",
    "trimmed": "trimmed",
    "multikrum": "multikrum",
}
GOALS = {0.10: 0.02, 0.20: 0.05}  # attacker fraction -> largest accuracy loss allowed to a robust rule


def base_config(args: argparse.Namespace) -> SimulateConfig:
    return SimulateConfig(phones=args.phones, rounds=args.rounds, sample=1.0, dataset=args.dataset,
                          model=args.model, partition=args.partition, seed=args.seed, workers=1,
                          trainer="batched", out=f"runs/bench_byzantine/seed{args.seed}")


def true_attackers(cfg: SimulateConfig) -> list[str]:
    """The phone ids ``run_fleet`` makes Byzantine: the same seeded draws in the same order
    (partition, per-phone generators, no device profiles, then ``choose_attackers``)."""
    if cfg.attack == "none" or cfg.attack_fraction == 0:
        return []
    if cfg.devices != "none":
        raise ValueError("the attacker replica assumes no device profiles")
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    partition(data.y_train, cfg.phones, cfg.partition, rng, cfg.quantity_skew)
    rng.spawn(cfg.phones)
    return [f"phone-{i:05d}" for i in choose_attackers(cfg.phones, cfg.attack_fraction, rng)]


def suspect_scores(rows: Sequence[dict[str, Any]], attackers: set[str], phones: int,
                   skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Precision, recall and false-positive rate of the per-version suspects (reasons not in
    ``skip``) against the true attackers, over all rounds. Every phone is in every round
    (sample 1.0, checked by the caller)."""
    flagged = hits = 0
    for row in rows:
        suspects = {str(s["update"]) for s in row.get("robust", {}).get("suspects", []) if s["reason"] not in skip}
        flagged += len(suspects)
        hits += len(suspects & attackers)
    present, honest = len(attackers) * len(rows), (phones - len(attackers)) * len(rows)
    return {"flagged": flagged, "true_positives": hits,
            "precision": hits / flagged if flagged else None,
            "recall": hits / present if present else None,
            "false_positive_rate": (flagged - hits) / honest if honest else None}


def finished_run(cfg: SimulateConfig) -> tuple[list[dict[str, Any]], dict[str, Any], float] | None:
    """The rows and summary of a finished run of exactly ``cfg`` in ``cfg.out``, if there is one."""
    out = Path(cfg.out)
    try:
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if summary.get("config") != json.loads(json.dumps(cfg.to_dict())) or len(rows) != cfg.rounds:
        return None
    return rows, summary, float(summary.get("wall_s", 0.0))


def run_cell(job: tuple[SimulateConfig, bool]) -> dict[str, Any]:
    """One run in its own process (one torch thread): accuracy and the suspects' quality."""
    import torch

    cfg, reuse = job
    torch.set_num_threads(1)
    found = finished_run(cfg) if reuse else None
    rows, summary, wall = found or run_sim(cfg)
    attackers = set(true_attackers(cfg))
    with open(Path(cfg.out) / "devices.csv") as fh:
        devices = list(csv.DictReader(fh))
    rounds = len(rows)
    if any(int(d["participations"]) != rounds for d in devices) or any(r["updates"] != cfg.phones for r in rows):
        raise RuntimeError(f"{cfg.out}: not every phone contributed to every round; suspects cannot be scored")
    norms = [s for r in rows for s in r.get("robust", {}).get("suspects", []) if s["reason"] == "clipped"]
    return {
        "attack": cfg.attack, "fraction": cfg.attack_fraction, "rule": cfg.robust,
        "accuracy": rows[-1]["accuracy"], "accuracy_curve": [r["accuracy"] for r in rows],
        "attackers": sorted(attackers), "suspects": suspect_scores(rows, attackers, cfg.phones, skip=("krum",)),
        "suspects_all": suspect_scores(rows, attackers, cfg.phones), "reused": found is not None,
        "bound_last": rows[-1].get("robust", {}).get("bound"), "clipped_reports": len(norms),
        "fallbacks": sum(1 for r in rows if r.get("robust", {}).get("fallback")),
        "wall_s": round(wall, 1), "final_summary_accuracy": summary["final_accuracy"],
    }


def cell_configs(args: argparse.Namespace, rules: dict[str, str]) -> list[SimulateConfig]:
    base = base_config(args)
    out = Path(base.out)
    cells = [base.replace(robust=spec, out=str(out / f"clean_{name}")) for name, spec in rules.items()]
    for frac in args.fractions:
        for attack in args.attacks:
            for name, spec in rules.items():
                tag = f"{int(round(frac * 100))}pct_{attack.replace(':', '')}_{name}"
                cells.append(base.replace(robust=spec, attack=attack, attack_fraction=frac,
                                                 out=str(out / tag)))
    return cells


def verdict(rule: str, frac: float, acc: float, clean: float) -> str:
    """ok / FAIL against the goals; for FedAvg, whether the attack hurt it at all (>= 2 points)."""
    if rule == "none":
        return "hurt" if clean - acc >= 0.02 else "unhurt"
    allowed = GOALS.get(frac)
    if allowed is None:  # 2%: no stated goal; hold it to the 10% goal
        allowed = GOALS[0.10]
    return "ok" if clean - acc <= allowed else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--phones", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), help=f"names from {list(RULES)} or NAME=SPEC")
    parser.add_argument("--name", default="byzantine", help="results file bench/results/NAME.json")
    parser.add_argument("--reuse", action="store_true", help="take finished runs of the same config from runs/")
    args = parser.parse_args()
    rules = dict(r.split("=", 1) if "=" in r else (r, RULES[r]) for r in args.rules)
    cells = cell_configs(args, rules)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run_cell, [(c, args.reuse) for c in cells]))
    total = time.perf_counter() - t0
    by_spec = {spec: name for name, spec in rules.items()}
    clean = {by_spec[r["rule"]]: r["accuracy"] for r in results if r["attack"] == "none"}
    reference = clean.get("none")  # plain FedAvg, nobody attacking
    reused = sum(r["reused"] for r in results)
    print(f"{args.phones} phones, {args.dataset}, {args.model}, {args.partition}, sample 1.0, {args.rounds} rounds, "
          f"seed {args.seed}; total {total / 60:.1f} min with {args.jobs} processes"
          + (f" ({reused} of {len(results)} runs reused from runs/)" if reused else ""))
    print("rules: " + ", ".join(f"{n} = {s}" for n, s in rules.items()))
    print("clean accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in clean.items()))
    print("cell: final accuracy, points vs clean FedAvg, verdict (FedAvg: hurt = lost >= 2 points; "
          "robust: ok = within 2 points at 2% and 10%, 5 at 20%)")
    rows: list[dict[str, Any]] = []
    score_rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for frac in args.fractions:
        for attack in args.attacks:
            row: dict[str, Any] = {"attackers": f"{frac:.0%}", "attack": attack}
            srow: dict[str, Any] = {"attackers": f"{frac:.0%}", "attack": attack}
            for r in results:
                if r["attack"] != attack or r["fraction"] != frac:
                    continue
                name = by_spec[r["rule"]]
                ref = reference if reference is not None else clean[name]
                r["delta_vs_clean_fedavg"] = r["accuracy"] - ref
                r["delta_vs_clean_same_rule"] = r["accuracy"] - clean[name]
                r["verdict"] = verdict(name, frac, r["accuracy"], ref)
                if r["verdict"] in ("FAIL", "unhurt"):
                    failures.append(f"{frac:.0%} {attack} {name}: {r['verdict']} ({r['accuracy']:.3f})")
                row[name] = f"{r['accuracy']:.3f} {100 * r['delta_vs_clean_fedavg']:+.1f} {r['verdict']}"
                s = r["suspects"]
                srow[name] = f"{s['recall']:.2f} / {s['false_positive_rate']:.3f}"
            rows.append(row)
            score_rows.append(srow)
    print(table(rows, ["attackers", "attack", *rules]))
    print("\nsuspected outliers vs true attackers, all rounds: recall / false-positive rate (honest phones named)")
    print(table(score_rows, ["attackers", "attack", *rules]))
    print("\nmissed: " + ("; ".join(failures) if failures else "nothing"))
    path = write(args.name, {
        "args": vars(args), "rules": rules, "clean": clean, "goals": {str(k): v for k, v in GOALS.items()},
        "accuracy_is": "final-round test accuracy", "reference": "clean plain FedAvg",
        "total_wall_s": round(total, 1), "table": rows, "suspects_table": score_rows, "missed": failures,
        "cells": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
