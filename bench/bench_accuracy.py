"""What federated training costs in accuracy, bytes and privacy, all measured in one run each.

    python -m bench.bench_accuracy central   # FedAvg (IID and Dirichlet 0.5) vs the same CNN trained centrally
    python -m bench.bench_accuracy codec     # accuracy vs upload bytes: dense, int8, int8+top10%, int4+topk+EF(+zlib)
    python -m bench.bench_accuracy codec-seeds  # the codec rows of seeds 0,1,2 side by side, with means
    python -m bench.bench_accuracy privacy   # accuracy vs local-DP epsilon per phone over the whole run

Writes bench/results/accuracy_<part>.json and prints a table. ``codec --jobs 2`` runs two
settings at once; ``--only`` picks rows by name (e.g. a second seed of two rows), written to
accuracy_codec_seed<N>.json when the seed is not 0.

``codec`` runs on the virtual clock (``--clock virtual``, the default): the phones' order
of check-ins and uploads, hence every round's cohort, then follows from the seed alone, so
the same command gives the same accuracy run to run and under any machine load (on the
wall clock, cohorts depended on timing and dense varied +-1.2 points between runs). Rounds
wait for their whole cohort (``--round-timeout``, default 900 s, instead of the server's
60 s), which matters on the wall clock: a 60 s round on a loaded machine closes with a
fraction of the updates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from bench.common import run_sim, table, write
from fedfleet.device_runtime.data import load_dataset
from fedfleet.device_runtime.runtimes import TrainConfig
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.models import ModelSpec, build_model
from fedfleet.simulate_config import SimulateConfig


def central_accuracy(dataset: str, model: str, epochs: int, seed: int, batch_size: int = 32,
                     lr: float = 0.05) -> tuple[float, float]:
    """The same model trained on the union of every phone's data (the upper bound): plain SGD, as a
    phone trains, for ``epochs`` passes; its test accuracy and the seconds it took."""
    data = load_dataset(dataset, seed=seed)
    rt = TorchRuntime(build_model(ModelSpec(model, data.input_shape, data.num_classes), seed=seed))
    t0 = time.perf_counter()
    rt.train(data.x_train, data.y_train, TrainConfig(local_epochs=epochs, batch_size=batch_size, lr=lr),
             np.random.default_rng(seed))
    return rt.evaluate(data.x_test, data.y_test).accuracy, time.perf_counter() - t0


def part_central(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dataset in ("digits", "mnist5k"):
        acc, secs = central_accuracy(dataset, "cnn", args.central_epochs, args.seed)
        rows.append({"dataset": dataset, "setting": f"central, {args.central_epochs} epochs", "accuracy": acc,
                     "wall_s": round(secs, 1)})
        for partition in ("iid", "dirichlet:0.5"):
            cfg = SimulateConfig(phones=50, rounds=args.rounds, dataset=dataset, partition=partition, seed=args.seed,
                                 out=f"runs/bench_accuracy/{dataset}-{partition}")
            records, summary, wall = run_sim(cfg)
            rows.append({"dataset": dataset, "setting": f"FedAvg 50 phones {partition}, {args.rounds} rounds",
                         "accuracy": summary["final_accuracy"], "best": summary["best_accuracy"],
                         "bytes_up": summary["bytes_up"], "wall_s": round(wall, 1)})
    return rows


# Each row: SimulateConfig fields, and under "encoder" any further EncoderConfig fields
# (protocol/codec/config.py) that SimulateConfig has no field for; they reach the phones
# through the task's codec, which the server hands out unchanged.
CODECS: dict[str, dict[str, Any]] = {
    "dense float32": {},
    "int8": {"quant_bits": 8},
    "int8 + top10%": {"quant_bits": 8, "topk": 0.1},
    "int4 + top3% + EF": {"quant_bits": 4, "topk": 0.03, "error_feedback": True},
    "int4 + top2% + EF": {"quant_bits": 4, "topk": 0.02, "error_feedback": True},
    "int4 + top1% + EF": {"quant_bits": 4, "topk": 0.01, "error_feedback": True},
    # zlib over the payload and the header (FORMAT.md flag bits 0 and 1): lossless, so the same
    # accuracy as the row without it; the JSON header was 57% of a top-2% update's bytes
    "int4 + top3% + EF + zlib": {"quant_bits": 4, "topk": 0.03, "error_feedback": True, "compress": True},
    "int4 + top4% + EF + zlib": {"quant_bits": 4, "topk": 0.04, "error_feedback": True, "compress": True},
    # deterministic rounding with least-squares scales (quant_scale="fit", protocol/quant.py
    # fit_scales): at 1 bit each kept value is sent as sign * mean|x| of its chunk (STC,
    # Sattler et al. 2019), so the bytes int4 spends on values buy more coordinates instead
    "int4 fit + top4% + EF + zlib": {"quant_bits": 4, "topk": 0.04, "error_feedback": True, "compress": True,
                                     "encoder": {"stochastic_rounding": False, "quant_scale": "fit"}},
    "int1 fit + top6% + EF + zlib": {"quant_bits": 1, "topk": 0.06, "error_feedback": True, "compress": True,
                                     "encoder": {"stochastic_rounding": False, "quant_scale": "fit"}},
    "int1 fit + top4% + EF + zlib": {"quant_bits": 1, "topk": 0.04, "error_feedback": True, "compress": True,
                                     "encoder": {"stochastic_rounding": False, "quant_scale": "fit"}},
    # ablation: the same bits and coordinates with the max|x| scale, i.e. every value sent as +-max
    "int1 nearest + top6% + EF + zlib": {"quant_bits": 1, "topk": 0.06, "error_feedback": True, "compress": True,
                                         "encoder": {"stochastic_rounding": False}},
}
# the rows run when --only is not given: the issue's four and the >= 50x candidates
TABLE = ["dense float32", "int8", "int8 + top10%", "int4 + top1% + EF", "int4 + top3% + EF + zlib",
         "int4 + top4% + EF + zlib", "int1 fit + top6% + EF + zlib", "int1 fit + top4% + EF + zlib"]


def row_config(base: SimulateConfig, name: str, out: str = "runs/bench_accuracy") -> SimulateConfig:
    """The simulation of one CODECS row on top of ``base``."""
    fields = dict(CODECS[name])
    encoder = fields.pop("encoder", {})
    cfg = base.replace(out=f"{out}/codec-s{base.seed}-{name.replace(' ', '')}", **fields)
    if encoder:
        cfg = cfg.replace(server={**cfg.server, "codec": {**cfg.codec(), **encoder}})
    return cfg


def _codec_row(name: str, cfg: SimulateConfig) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # two settings share a 2-core machine with --jobs 2
    records, summary, wall = run_sim(cfg)
    update_bytes = sum(r["update_bytes"] for r in records)
    dense = sum(r["dense_bytes"] for r in records)
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    return {"codec": name, "seed": cfg.seed, "accuracy": summary["final_accuracy"], "best": summary["best_accuracy"],
            # the last 5 rounds' mean: less round-to-round jitter than the final round alone
            "acc_last5": round(float(np.mean(accs[-5:])), 4) if accs else None,
            "acc_mid": accs[len(accs) // 2 - 1] if accs else None,  # after half the rounds: how fast it gets there
            "update_bytes": update_bytes, "bytes_up_http": summary["bytes_up"], "compression": dense / update_bytes,
            "updates": sum(r["updates"] for r in records), "wall_s": round(wall, 1)}


def part_codec(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = SimulateConfig(phones=50, rounds=args.rounds, dataset="mnist5k", partition="dirichlet:0.5",
                          seed=args.seed, model=args.model, clock=args.clock,
                          server={"round_timeout_s": args.round_timeout})
    names = [n.strip() for n in args.only.split(",")] if args.only else TABLE
    unknown = sorted(set(names) - set(CODECS))
    if unknown or names[0] != "dense float32":
        raise SystemExit(f"--only: names from {list(CODECS)}, dense float32 first; unknown {unknown}")
    cfgs = [row_config(base, n) for n in names]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_codec_row, names, cfgs))
    dense = rows[0]
    for r in rows:
        r["acc_drop_points"] = round(100 * (dense["accuracy"] - r["accuracy"]), 2)
        r["last5_drop_points"] = round(100 * (dense["acc_last5"] - r["acc_last5"]), 2)
        r["mid_drop_points"] = round(100 * (dense["acc_mid"] - r["acc_mid"]), 2)
    return rows


def part_codec_seeds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per codec over the seeds' accuracy_codec*.json (written by ``codec --seed S``):
    accuracy and drop vs dense per seed, their mean, and the worst drop. Refuses files whose
    rounds or clock differ, or that lack dense float32."""
    import json

    from bench.common import RESULTS

    runs = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        payload = json.loads((RESULTS / f"accuracy_codec{f'_seed{seed}' if seed else ''}.json").read_text())
        runs[seed] = payload
    settings = {(p["args"]["rounds"], p["args"].get("clock", "wall")) for p in runs.values()}
    if len(settings) != 1:
        raise SystemExit(f"the seeds' files differ in (rounds, clock): {sorted(settings)}")
    by_codec: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, payload in runs.items():
        for r in payload["rows"]:
            by_codec.setdefault(r["codec"], {})[seed] = r
    rows = []
    for name, seeds in by_codec.items():
        row: dict[str, Any] = {"codec": name, "compression": round(float(np.mean([r["compression"] for r in
                                                                                   seeds.values()])), 1)}
        for seed in runs:
            r = seeds.get(seed)
            row[f"acc_s{seed}"] = r["accuracy"] if r else None
            row[f"drop_s{seed}"] = r["acc_drop_points"] if r else None
        if len(seeds) == len(runs):
            row["acc_mean"] = round(float(np.mean([r["accuracy"] for r in seeds.values()])), 4)
            row["drop_mean"] = round(float(np.mean([r["acc_drop_points"] for r in seeds.values()])), 2)
            row["drop_max"] = max(r["acc_drop_points"] for r in seeds.values())
            for key in ("last5", "mid"):
                if all(f"{key}_drop_points" in r for r in seeds.values()):
                    drops = [r[f"{key}_drop_points"] for r in seeds.values()]
                    row[f"{key}_drop_mean"] = round(float(np.mean(drops)), 2)
        rows.append(row)
    return rows


def part_privacy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each phone takes part in about sample * rounds updates; epsilon is per phone over the run."""
    base = SimulateConfig(phones=50, rounds=args.rounds, dataset="mnist5k", partition="dirichlet:0.5",
                          seed=args.seed, model=args.model, clip=args.clip)
    rows = []
    for eps in (1.0, 4.0, 8.0, None):
        extra: dict[str, Any] = {}
        if eps is not None:  # calibrate per release so that the whole run stays within eps
            from fedfleet.protocol.privacy import calibrate_noise_multiplier

            releases = int(np.ceil(base.sample * base.rounds * 1.3))
            extra = {"noise_multiplier": calibrate_noise_multiplier("gaussian", eps, base.delta, releases=releases),
                     "epsilon_budget": eps}
        cfg = base.replace(out=f"runs/bench_accuracy/eps-{eps}", **extra)
        records, summary, wall = run_sim(cfg)
        rows.append({"epsilon_target": eps if eps is not None else "inf",
                     "noise_multiplier": extra.get("noise_multiplier"),
                     "epsilon_max": summary["privacy"]["epsilon_max"], "accuracy": summary["final_accuracy"],
                     "best": summary["best_accuracy"], "wall_s": round(wall, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["central", "codec", "codec-seeds", "privacy"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--central-epochs", type=int, default=20)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="codec: settings run at once, each on one thread")
    parser.add_argument("--only", help="codec: comma-separated row names (dense float32 first)")
    parser.add_argument("--round-timeout", type=float, default=900.0, help="codec: seconds a round waits")
    parser.add_argument("--clock", choices=["virtual", "wall"], default="virtual",
                        help="codec: virtual (deterministic cohorts, the default) or wall")
    parser.add_argument("--seeds", default="0,1,2", help="codec-seeds: the seeds whose codec results to combine")
    args = parser.parse_args()
    parts = {"central": part_central, "codec": part_codec, "codec-seeds": part_codec_seeds, "privacy": part_privacy}
    rows = parts[args.part](args)
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    name = f"accuracy_{args.part}" + (f"_seed{args.seed}" if args.part == "codec" and args.seed else "")
    name = name.replace("-", "_")  # codec-seeds -> accuracy_codec_seeds.json (other seeds: ..._seeds_01234.json)
    if args.part == "codec-seeds" and args.seeds != "0,1,2":
        name += "_" + args.seeds.replace(",", "")
    print(f"wrote {write(name, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
