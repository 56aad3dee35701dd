"""Gossip against FedAvg on one fleet: the same data, phones, device profiles and local training.

    python -m bench.bench_gossip                       # mnist5k, Dirichlet 0.5, 50 phones, 10 rounds
    python -m bench.bench_gossip --rounds 20 --only fedavg,dpsgd-ring-matchings --set quant_bits=8 --lr 0.2

Rows: FedAvg (the server merges half the phones each round); D-PSGD on a ring, on the ring's edges
taken one neighbour per round (ring-matchings), on time-varying random matchings and on the
exponential graph (every phone each round, its model posted once to the relay, which hands it to
each neighbour); CHOCO-SGD on a ring with 1% top-k (q = top-k(x - x_hat)); decentralized ADMM on a
ring (--rho). ``--set KEY=VALUE`` gives every row the same simulate setting (``quant_bits=8``: FedAvg's
updates and gossip's messages alike). Each row reports the average model's accuracy (final and
best), the spread over phones (p10, p90) and consensus distance of gossip, the bytes per phone up
and down over the run (as the server counted them), the virtual time (drawn device profiles:
compute speed, links) and its curve of accuracy against cumulative bytes per phone; the
same-budget table holds every row to the total bytes per phone of ``--budget-of`` (FedAvg), from
this run or from an earlier result (``--reference``).

Writes bench/results/OUT.json (the command, date and machine with the rows) as each row ends, and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import run_sim, table, write
from bench.gossip_budget import curve, same_budget
from fedfleet.device_runtime import aio
from fedfleet.gossip_run import gossip
from fedfleet.simulate_config import SimulateConfig

SETTINGS: dict[str, dict[str, Any]] = {
    "fedavg": {"mode": "sync"},
    "dpsgd-ring": {"mode": "gossip", "topology": "ring"},
    "dpsgd-matching": {"mode": "gossip", "topology": "matching"},
    "dpsgd-ring-matchings": {"mode": "gossip", "topology": "ring-matchings"},
    "dpsgd-exponential": {"mode": "gossip", "topology": "exponential"},
    "choco-ring-top1%": {"mode": "gossip", "topology": "ring", "gossip": "choco", "topk": 0.01},
    "admm-ring": {"mode": "gossip", "topology": "ring", "gossip": "admm"},
}


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    shared = dict(phones=args.phones, rounds=args.rounds, dataset=args.dataset, partition=args.partition,
                  model=args.model, local_epochs=args.local_epochs, lr=args.lr, seed=args.seed, devices=args.devices,
                  gossip_gamma=args.gamma, admm_rho=args.rho)
    cfg = SimulateConfig(**{**shared, **args.set, **SETTINGS[name], "out": f"runs/bench_gossip/{args.out}/{name}"})
    t0 = time.perf_counter()
    if cfg.mode == "gossip":
        rows = aio.run(gossip(cfg)).rounds
    else:
        rows, _, _ = run_sim(cfg)
    wall = time.perf_counter() - t0
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    last = rows[-1] if rows else {}
    return {
        "setting": name,
        "rounds": len(rows),
        "accuracy": last.get("accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "accuracy_p10": last.get("accuracy_p10"),
        "accuracy_p90": last.get("accuracy_p90"),
        "consensus_distance": last.get("consensus_distance"),
        "up_per_phone": sum(r["bytes_up"] for r in rows) // args.phones,
        "down_per_phone": sum(r["bytes_down"] for r in rows) // args.phones,
        "messages_dropped": sum(r.get("messages_dropped", 0) for r in rows) if cfg.mode == "gossip" else None,
        "virtual_s": last.get("time_s"),
        "wall_s": round(wall, 1),
        "curve": curve(rows, args.phones),
    }


def _reference(path: str, setting: str) -> list[dict[str, Any]]:
    """The ``setting`` row of an earlier result, named after its file."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["setting"] == setting]
    if not rows:
        raise SystemExit(f"bench_gossip: {path} has no {setting!r} row")
    return rows


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or key not in SimulateConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE with KEY a simulate setting, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phones", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--model", default="cnn")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--gamma", type=float, default=0.5, help="CHOCO-SGD's consensus step size")
    p.add_argument("--rho", type=float, default=0.1, help="ADMM's penalty")
    p.add_argument("--devices", default="default", help="device profiles (virtual clock); none: wall clock")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated settings: " + ", ".join(SETTINGS))
    p.add_argument("--set", type=_assignment, action="append", default=[], metavar="KEY=VALUE",
                   help="a simulate setting for every row (FedAvg's and gossip's alike), e.g. quant_bits=8")
    p.add_argument("--budget-of", default="fedavg",
                   help="the setting whose total bytes per phone the same-budget table holds every row to")
    p.add_argument("--reference", metavar="RESULT.json",
                   help="hold every row to the --budget-of row of an earlier result (same fleet and settings)")
    p.add_argument("--out", default="gossip", help="bench/results/OUT.json")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    rows: list[dict[str, Any]] = []
    for name in names:
        rows.append(run_one(name, args))
        print(f"{name}: accuracy {rows[-1]['accuracy']}, {rows[-1]['wall_s']} s", file=sys.stderr, flush=True)
        ref = _reference(args.reference, args.budget_of) if args.reference else []
        held = ref + rows
        budget = same_budget(held, args.budget_of) if args.budget_of in [r["setting"] for r in held] else []
        path = write(args.out, {"settings": vars(args), "rows": rows, "same_budget": budget})  # each row as it ends
    columns = ["setting", "accuracy", "best_accuracy", "accuracy_p10", "accuracy_p90", "consensus_distance",
               "up_per_phone", "down_per_phone", "messages_dropped", "virtual_s", "wall_s"]
    print(table(rows, columns))
    if budget:
        print(f"\nat {args.budget_of}'s bytes per phone ({budget[0]['budget_per_phone']:,}):")
        print(table(budget, ["setting", "round", "bytes_per_phone", "accuracy", "points_behind"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
