"""``fedfleet`` subcommands: serve, phone, fleet, simulate (and export)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from fedfleet.cli_errors import checking_input, user_error
from fedfleet.cli_flags import (
    DATASET_HELP,
    FLEET_SETTINGS,
    PHONE_ONLY,
    SERVER_SETTINGS,
    SERVER_SIDE,
    add_accelerator_flags,
    add_enrolment_flags,
    add_gossip_flags,
    add_gossip_fleet_flags,
    add_gossip_serve_flags,
    add_image_size_flag,
    add_loss_flags,
    add_model_flags,
    add_secagg_flags,
    add_state_flags,
    add_strategy_flags,
    fleet_task_flags,
    phone_side_flags,
    refuse,
    run_values,
    server_task_flags,
    shard_spec,
    tcp_port,
    toml_values,
    training_flags,
)
from fedfleet.cli_fleet import cmd_fleet, cmd_phone
from fedfleet.cli_serve import cmd_serve
from fedfleet.output import check_out_dir
from fedfleet.tuning import tune_process


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.serving import ServerProcess
    from fedfleet.simulate import Interrupt, run
    from fedfleet.simulate_config import merge_config
    from fedfleet.startup import Timeline
    from fedfleet.task import prepare_task

    timeline = Timeline()  # summary.json's "startup": the stages from the command to round 1 (fedfleet.startup)
    timeline.mark("command parsed")
    with checking_input():
        cfg = merge_config(toml_values(args, "simulate"), run_values(args), args.config)
        check_out_dir(cfg.out, create=False)
        own_process = cfg.use_server_process  # raises for --server-process yes on a virtual clock
    # A server process starts now, unconfigured: its interpreter and imports (torch included) run on
    # another core while this process loads the data and checks the model; a bad task stops it unused.
    server = ServerProcess() if own_process and cfg.mode != "gossip" else None
    if server is not None:
        timeline.mark("server process started")
    try:
        with checking_input():
            data = load_dataset(cfg.dataset, seed=cfg.seed, image_size=cfg.image_size)
            timeline.mark("data loaded")
            task = prepare_task(cfg.model, data, cfg.seed, cfg.image_size, cfg.init_weights, cfg.loss,
                                cfg.metrics, cfg.partition, cfg.runtime, cfg.attack)
    except BaseException:
        if server is not None:
            server.kill()
        raise
    timeline.mark("task checked")
    tune_process()  # before a server process starts, so that it inherits the open-file limit too
    print(f"fedfleet simulate: {cfg.phones} phones, {cfg.dataset}, {cfg.model}, {cfg.rounds or 'unlimited'} rounds, "
          f"sample {cfg.sample}, partition {cfg.partition}, runtime {cfg.runtime}", flush=True)
    interrupt = Interrupt()
    if cfg.mode == "gossip":  # phones average with their neighbours; the server relays (fedfleet/gossip_run.py)
        from fedfleet.gossip_run import run_gossip
        from fedfleet.tuning import parse_threads, set_torch_threads

        set_torch_threads(parse_threads(cfg.train_threads))
        summary = run_gossip(cfg)
        interrupt.signum = signal.Signals[summary["interrupted"]].value if "interrupted" in summary else 0
    else:
        summary = run(cfg, interrupt, data=task.data, timeline=timeline, server=server)
    accuracy = summary["final_accuracy"]
    print(f"final accuracy {'-' if accuracy is None else f'{accuracy:.4f}'} after {summary['rounds']} rounds, "
          f"{summary['bytes_up']} bytes up, {summary['bytes_down']} bytes down, {summary['wall_s']:.1f} s; "
          f"wrote {cfg.out}/metrics.jsonl, summary.json" + (", devices.csv" if summary["phones"] else "")
          + (", final_weights.safetensors" if summary.get("final_weights") else ""), flush=True)
    if interrupt.signum:
        print(f"fedfleet simulate: stopped by {summary['interrupted']} after {summary['rounds']} rounds",
              file=sys.stderr, flush=True)
        return 128 + interrupt.signum
    return 0


class Parser(argparse.ArgumentParser):
    """fedfleet's parsers, its subcommands' included: a flag is spelt out in full (no prefix of a longer
    one: ``--phone 3`` is not taken for ``--phones 3``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log server and client details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the aggregation server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                                                        "IPv4 interface)")
    p.add_argument("--port", type=tcp_port, default=8080, help="TCP port to listen on (default 8080)")
    p.add_argument("--data-dir", help="where the server keeps its state (SQLite, metrics.jsonl); a restarted "
                                      "server resumes from it (default: in memory, lost on exit)")
    p.add_argument("--config", help="TOML with a [server] table of ServerConfig fields (server/config.py); "
                                    "flags override it (default: none)")
    p.add_argument("--dataset", help="held-out split for evaluation, and the input shape: " + DATASET_HELP)
    add_image_size_flag(p)
    add_model_flags(p)
    add_loss_flags(p)
    p.add_argument("--weights-out", help="where the trained model is written at shutdown, as a safetensors "
                                         "state_dict (default: DATA_DIR/final_weights.safetensors with --data-dir)")
    p.add_argument("--mode", choices=["sync", "async", "gossip"], help="sync: FedAvg rounds; async: FedBuff merges; "
                                                                      "gossip: relay phones' messages (default sync)")
    p.add_argument("--rounds", type=int, help="rounds (merges) to run (default 10; 0 = until stopped)")
    p.add_argument("--sample", type=float, help="sync: fraction of the registered phones whose updates each "
                                                "round waits for (default 0.5)")
    p.add_argument("--seed", type=int, help="seed of the initial model, the test split and the server's random "
                                            "choices (default 0)")
    p.add_argument("--bundle", help="the task's exported bundle directory (fedfleet export), served to phones "
                                    "(default: none)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ... (default: plain HTTP)")
    p.add_argument("--tls-key", help="... and this private key (PEM) (default: none)")
    add_strategy_flags(p)
    add_gossip_serve_flags(p)
    add_state_flags(p)
    add_secagg_flags(p)
    add_enrolment_flags(p, "serve")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="a server on loopback plus an emulated fleet")
    phone_side_flags(p, fleet=True)
    training_flags(p, server_here=True)
    server_task_flags(p)
    add_loss_flags(p)
    add_strategy_flags(p)
    add_gossip_flags(p)
    add_state_flags(p)
    add_secagg_flags(p)
    add_accelerator_flags(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fleet", help="an emulated fleet against a running server")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--name-prefix", default="phone", help="phones are named PREFIX-00000, ... (default phone)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: every phone in this process (default); ray: phones sharded over a Ray cluster")
    p.add_argument("--address", help="ray: 'local' (default) starts a Ray cluster on this machine; 'auto' or "
                                      "HOST:PORT joins a running one (`ray start --head`)")
    p.add_argument("--shards", type=int, help="ray: shards of phones, one Ray task each (default: one per CPU)")
    fleet_task_flags(p)
    add_loss_flags(p, metrics=False)
    phone_side_flags(p, fleet=True)
    training_flags(p, server_here=False)
    p.add_argument("--clock", choices=["auto", "wall", "virtual"], help=argparse.SUPPRESS)  # only to refuse virtual
    add_gossip_fleet_flags(p)
    add_enrolment_flags(p, "fleet")
    refuse(p, SERVER_SETTINGS, SERVER_SIDE)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("phone", help="one phone against a running server")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--name", default="phone", help="the phone registers as NAME (default phone); names are "
                                                   "unique on a server")
    p.add_argument("--shard", type=shard_spec, default=(0, 50),
                   help="train on shard I of the training set split N ways (--partition, --seed), as phone I "
                        "of an N-phone fleet would (default 0/50)")
    fleet_task_flags(p)
    add_loss_flags(p, metrics=False)
    phone_side_flags(p, fleet=False)
    training_flags(p, server_here=False)
    p.add_argument("--clock", choices=["auto", "wall", "virtual"], help=argparse.SUPPRESS)
    add_enrolment_flags(p, "phone")
    refuse(p, SERVER_SETTINGS, SERVER_SIDE)
    refuse(p, FLEET_SETTINGS + ("name_prefix", "backend", "address", "shards"), PHONE_ONLY)
    p.set_defaults(func=cmd_phone)
    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    from fedfleet.report import register as register_report

    register_report(sub)
    try:
        from fedfleet.export.cli import register
    except ImportError:
        return
    register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: --model/--dataset
        sys.path.insert(0, os.getcwd())  # MODULE:ATTR import from the current directory too
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = f"fedfleet {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as exc:
        interrupted = sys.modules.get("fedfleet.simulate")
        if interrupted is not None and isinstance(exc, interrupted.Interrupted):
            print(f"{command}: {exc}", file=sys.stderr, flush=True)
            return 128 + exc.signum
        message = user_error(exc)
        if message is None:
            raise  # a fault of ours, not the user's: its traceback is the report
        print(f"{command}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
