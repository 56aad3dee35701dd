"""``fedfleet`` subcommands: serve, phone, fleet, simulate (and export)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from device_runtime import aio
from server.config import load_toml


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by simulate and fleet; unset flags fall back to --config, then defaults."""
    p.add_argument("--config", help="TOML file with any of these settings (flags override it)")
    p.add_argument("--phones", type=int, help="number of emulated phones (default 50)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 10)")
    p.add_argument("--sample", type=float, help="fraction of phones per round (default 0.5)")
    p.add_argument("--dataset", help="digits | mnist5k | synthetic[:N] | mnist:PATH ... (default digits)")
    p.add_argument("--model", help="mlp | cnn | mobilenet (default cnn)")
    p.add_argument("--partition", help="iid | dirichlet:ALPHA | shards:K (default iid)")
    p.add_argument("--quantity-skew", type=float, help="lognormal sigma of phone data sizes (iid)")
    p.add_argument("--local-epochs", type=int, help="local epochs per task (default 5)")
    p.add_argument("--batch-size", type=int, help="local batch size (default 8)")
    p.add_argument("--lr", type=float, help="local SGD learning rate (default 0.1)")
    p.add_argument("--prox-mu", type=float, help="FedProx proximal weight (default 0 = FedAvg)")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--workers", type=int, help="local trainings in parallel with --trainer pool (default 2)")
    p.add_argument("--trainer", choices=["batched", "pool"], help="batched: phones on one version train in one "
                                                                   "vmapped step (default); pool: one by one")
    p.add_argument("--runtime", choices=["torch", "executorch", "onnx"], help="on-device runtime (default torch)")
    p.add_argument("--out", help="output folder (default runs/latest)")
    p.add_argument("--mode", choices=["sync", "async"], help="synchronous rounds or FedBuff (default sync)")
    p.add_argument("--concurrency", type=int, help="async: phones training at once (default 20)")
    p.add_argument("--buffer", type=int, help="async: updates per merge, K (default 10)")
    p.add_argument("--staleness", help="async: constant | inverse | poly:A | hinge:A:B (default poly:0.5)")
    p.add_argument("--max-staleness", type=int, help="async: older updates are refused (default 20)")
    p.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"])
    p.add_argument("--server-lr", type=float, help="server learning rate (default 1.0)")
    p.add_argument("--devices", help="none | default | PATH.csv: emulated device speeds, links, availability")
    p.add_argument("--compute-ms", type=float, help="default devices: mean ms per training sample (5)")
    p.add_argument("--diurnal", type=float, help="default devices: fraction available only at night (0)")
    p.add_argument("--dropout", type=float, help="default devices: probability of vanishing mid-task (0)")
    p.add_argument("--clock", choices=["auto", "wall", "virtual"], help="virtual time (default: when devices are emulated)")
    p.add_argument("--hours", type=float, help="stop after this much (virtual) time, e.g. 24 for a day")
    p.add_argument("--clip", type=float, help="L2 clipping norm C of each update")
    p.add_argument("--noise", choices=["gaussian", "laplace"], help="local DP mechanism (default gaussian)")
    p.add_argument("--noise-multiplier", type=float, help="local DP noise = z * C per update")
    p.add_argument("--epsilon", type=float, help="...or calibrate the noise to this epsilon per update")
    p.add_argument("--delta", type=float, help="delta for calibration and reporting (default 1e-5)")
    p.add_argument("--topk", type=float, help="send this fraction of each tensor (largest magnitudes)")
    p.add_argument("--randk", type=float, help="send a random fraction of each tensor (unbiased)")
    p.add_argument("--quant-bits", type=int, choices=[32, 8, 4, 2, 1], help="bits per value sent (default 32)")
    p.add_argument("--error-feedback", action="store_true", default=None, help="carry unsent residuals forward")
    p.add_argument("--compress", action="store_true", default=None, help="zlib over the update payload and header")
    p.add_argument("--quant-rounding", choices=["stochastic", "nearest"],
                   help="stochastic (unbiased, default) or nearest (deterministic; pair with --error-feedback)")
    p.add_argument("--quant-scale", choices=["max", "fit"],
                   help="per-chunk scale: max|x| (default) or fit (least squares; needs --quant-rounding nearest; "
                        "at 1 bit: sign x mean|x|, STC)")
    p.add_argument("--epsilon-budget", type=float, help="stop scheduling phones past this local epsilon")
    p.add_argument("--central-clip", type=float, help="central DP: clip each update on the server")
    p.add_argument("--central-noise-multiplier", type=float, help="central DP: noise on the clipped sum")
    p.add_argument("--robust", help="none | normbound[:C|:median*K] | median | trimmed[:B] | krum[:F|:P%%] | "
                                    "multikrum[:F|:P%%][:M], chained with '+' (default none; bare forms need no "
                                    "attacker count)")
    p.add_argument("--attack", help="Byzantine phones: signflip | scale:F | noise:STD | labelflip")
    p.add_argument("--attack-fraction", type=float, help="share of phones that attack (default 0)")
    p.add_argument("--inline-model", choices=["yes", "no"],
                   help="phones take the model in the check-in's answer (yes, default: one request per task "
                        "less) or download it with GET /v1/model (no)")
    p.add_argument("--chain-checkin", choices=["yes", "no"],
                   help="phones without an emulated device make their next check-in in the same request as "
                        "their upload (yes: one request per task less) or on its own (no); default: yes, except "
                        "for fleets of over 1,000 phones sharing their process with the server")


def _run_values(args: argparse.Namespace) -> dict[str, Any]:
    keys = ["phones", "rounds", "sample", "dataset", "model", "partition", "quantity_skew", "local_epochs",
            "batch_size", "lr", "prox_mu", "seed", "workers", "runtime", "out", "mode", "concurrency", "buffer",
            "staleness", "max_staleness", "server_optimizer", "server_lr", "devices", "compute_ms", "diurnal",
            "dropout", "clock", "clip", "noise", "noise_multiplier", "epsilon", "delta", "topk", "randk",
            "quant_bits", "error_feedback", "compress", "quant_rounding", "quant_scale", "epsilon_budget",
            "central_clip", "central_noise_multiplier", "robust", "attack", "attack_fraction", "trainer", "hours"]
    values = {k: getattr(args, k) for k in keys}
    values["inline_model"] = None if args.inline_model is None else args.inline_model == "yes"
    values["chain_checkin"] = None if args.chain_checkin is None else args.chain_checkin == "yes"
    return values


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedfleet.simulate import merge_config, run

    cfg = merge_config(load_toml(args.config, "simulate") if args.config else {},
                       {**_run_values(args), "server_process": args.server_process})
    print(f"fedfleet simulate: {cfg.phones} phones, {cfg.dataset}, {cfg.model}, {cfg.rounds} rounds, "
          f"sample {cfg.sample}, partition {cfg.partition}, runtime {cfg.runtime}", flush=True)
    summary = run(cfg)
    print(f"final accuracy {summary['final_accuracy']:.4f} after {summary['rounds']} rounds, "
          f"{summary['bytes_up']} bytes up, {summary['bytes_down']} bytes down, {summary['wall_s']:.1f} s; "
          f"wrote {cfg.out}/metrics.jsonl, summary.json, devices.csv", flush=True)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from device_runtime.data import load_dataset
    from device_runtime.fleet import run_fleet
    from device_runtime.runtimes.torch_runtime import torch_runtime_for_task
    from fedfleet.output import RoundTable, summarize, write_run
    from fedfleet.simulate import merge_config

    cfg = merge_config(load_toml(args.config, "fleet") if args.config else {}, _run_values(args))
    backend = getattr(args, "backend", "local")
    if backend != "ray" and (getattr(args, "address", None) or getattr(args, "shards", None)):
        raise ValueError("--address and --shards go with --backend ray")
    if backend == "ray" and cfg.clock == "virtual":
        raise ValueError("--backend ray runs on the wall clock: a virtual clock cannot be shared by phones in "
                         "several processes; drop --clock virtual or use --backend local")
    # Training settings the user gave explicitly override the server's plan on these phones.
    overrides = {k: getattr(args, k) for k in ("local_epochs", "batch_size", "lr", "prox_mu")
                 if getattr(args, k) is not None}
    fleet_cfg = dataclasses.replace(cfg.fleet_config(), max_rounds=args.rounds or 0, runtime=cfg.runtime, server_here=False,
                                    availability=args.sample or 1.0, name_prefix=args.name_prefix)
    t0 = time.perf_counter()
    table = RoundTable(stream=sys.stdout, total=args.rounds or 0)
    try:
        if backend == "ray":
            result = _fleet_on_ray(args, cfg.dataset, cfg.seed, fleet_cfg, overrides, table)
        else:
            result = aio.run(run_fleet(args.server, load_dataset(cfg.dataset, seed=cfg.seed), fleet_cfg,
                                         torch_runtime_for_task, on_round=table, train_overrides=overrides))
    finally:
        table.close()
    summary = summarize(result.rounds, result.devices, time.perf_counter() - t0)
    write_run(Path(cfg.out), result.rounds, result.devices, summary)
    print(json.dumps({k: summary[k] for k in ("rounds", "final_accuracy", "bytes_up", "bytes_down")}))
    return 0


def _fleet_on_ray(args: argparse.Namespace, dataset: str, seed: int, fleet_cfg: Any, overrides: dict[str, Any],
                  table: Any) -> Any:
    """The same fleet, sharded over a Ray cluster (started locally unless --address names one)."""
    from device_runtime.ray_backend import LOCAL_ADDRESSES, ray_cluster, run_ray_fleet

    if args.shards is not None and not 1 <= args.shards <= fleet_cfg.phones:
        raise ValueError(f"--shards must be between 1 and the number of phones ({fleet_cfg.phones})")
    host = args.server.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if args.address not in LOCAL_ADDRESSES and host in ("127.0.0.1", "localhost", "[::1]"):
        print(f"fedfleet: warning: --server {args.server} is a loopback address; shards on other machines "
              "will not reach it", file=sys.stderr, flush=True)

    def shard_done(s: Any) -> None:
        print(f"shard {s.shard}: {len(s.devices)} phones on {s.host} (pid {s.pid}) done in {s.wall_s:.1f} s",
              flush=True)

    with ray_cluster(args.address, quiet=not args.verbose) as ray:
        print(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs on {len(ray.nodes())} node(s)", flush=True)
        return aio.run(run_ray_fleet(args.server, dataset, fleet_cfg, shards=args.shards, dataset_seed=seed,
                                       train_overrides=overrides, on_round=table, on_shard=shard_done))


def cmd_phone(args: argparse.Namespace) -> int:
    args.phones, args.name_prefix = 1, args.name
    args.rounds = args.rounds or 0
    return cmd_fleet(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from device_runtime.data import load_dataset
    from device_runtime.limits import ACCEPT_BACKLOG, open_file_limit
    from server.app import make_app
    from server.config import ServerConfig

    open_file_limit()  # each long-polling phone holds a socket: go up to the hard limit
    values = load_toml(args.config, "server") if args.config else {}
    data = load_dataset(args.dataset or values.pop("dataset", "digits"), seed=args.seed or 0)
    values.update({"input_shape": data.input_shape, "num_classes": data.num_classes})
    for key, flag in (("model", args.model), ("rounds", args.rounds), ("sample_fraction", args.sample),
                      ("seed", args.seed), ("data_dir", args.data_dir), ("bundle_dir", args.bundle)):
        if flag is not None:
            values[key] = flag
    config = ServerConfig().replace(**values)
    app = make_app(config, test_data=(data.x_test, data.y_test))
    scheme = "https" if args.tls_cert else "http"
    print(f"fedfleet server: task {config.model} on {data.name}, {config.rounds or 'unlimited'} rounds, "
          f"state in {config.data_dir or 'memory'}; listening on {scheme}://{args.host}:{args.port}", flush=True)
    ssl_context = None
    if args.tls_cert or args.tls_key:
        import ssl

        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, ssl_context=ssl_context,
                loop=aio.new_event_loop(), backlog=ACCEPT_BACKLOG)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log server and client details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the aggregation server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--data-dir", help="where the server keeps its state (SQLite, metrics.jsonl)")
    p.add_argument("--config", help="TOML with a [server] table of ServerConfig fields")
    p.add_argument("--dataset", help="held-out split for evaluation, and the input shape (default digits)")
    p.add_argument("--model", help="mlp | cnn | mobilenet")
    p.add_argument("--rounds", type=int)
    p.add_argument("--sample", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--bundle", help="the task's exported bundle directory (fedfleet export), served to phones")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    p.add_argument("--tls-key", help="... and this private key")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="a server on loopback plus an emulated fleet")
    _common_run_flags(p)
    p.add_argument("--server-process", choices=["auto", "yes", "no"],
                   help="run the server in its own process (wall clock only; auto, the default: for 1,000+ "
                        "phones on 2+ cores)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fleet", help="an emulated fleet against a running server")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--name-prefix", default="phone", help="phones are named PREFIX-00000, ...")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: every phone in this process (default); ray: phones sharded over a Ray cluster")
    p.add_argument("--address", help="ray: 'local' (default) starts a Ray cluster on this machine; 'auto' or "
                                      "HOST:PORT joins a running one (`ray start --head`)")
    p.add_argument("--shards", type=int, help="ray: shards of phones, one Ray task each (default: one per CPU)")
    _common_run_flags(p)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("phone", help="one phone against a running server")
    p.add_argument("--server", required=True)
    p.add_argument("--name", default="phone", help="the phone's name (unique on the server)")
    _common_run_flags(p)
    p.set_defaults(func=cmd_phone)
    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    from fedfleet.report import register as register_report

    register_report(sub)
    try:
        from export.cli import register
    except ImportError:
        return
    register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedfleet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
