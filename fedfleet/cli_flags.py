"""The flags of ``fedfleet``'s subcommands, and the SimulateConfig values they (and a TOML file) give."""

from __future__ import annotations

import argparse
from typing import Any

from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.protocol.plan import TrainPlan
from fedfleet.server.config import load_toml

# Settings of the server's task: `simulate` starts its own server and takes them; `fleet` and `phone`
# join a running server whose task decides them, so there they are refused (see refuse).
SERVER_SETTINGS = ("mode", "concurrency", "buffer", "staleness", "max_staleness", "server_optimizer", "server_lr",
                   "clip", "noise", "noise_multiplier", "epsilon", "delta", "topk", "randk", "quant_bits",
                   "error_feedback", "compress", "quant_rounding", "quant_scale", "epsilon_budget", "central_clip",
                   "central_noise_multiplier", "robust", "server_process", "strategy", "init_weights",
                   "local_state", "secure_agg", "secagg_threshold", "secagg_degree", "distributed_noise_multiplier",
                   "metrics")
# What only a fleet of several phones takes: refused on `phone`.
FLEET_SETTINGS = ("phones", "workers", "trainer", "attack", "attack_fraction")


def phone_side_flags(p: argparse.ArgumentParser, fleet: bool) -> None:
    """The flags of the phones' side, for simulate and fleet (``fleet``) or one phone (not ``fleet``)."""
    p.add_argument("--config", help="TOML file with any of these settings (flags override it)")
    if fleet:
        p.add_argument("--phones", type=int, help="number of emulated phones (default 50)")
    p.add_argument("--dataset", help=DATASET_HELP)
    add_image_size_flag(p)
    p.add_argument("--partition", help="how the training set is split among phones: iid | dirichlet:ALPHA | "
                                       "shards:K (default iid)")
    p.add_argument("--quantity-skew", type=float, help="iid: lognormal sigma of phone data sizes (default 0)")
    p.add_argument("--seed", type=int, help="seed of the phones' data split and every random choice (default 0)")
    if fleet:
        p.add_argument("--workers", metavar="N|auto", type=_workers,
                       help="training threads: phones trained at once with --trainer pool, a group's chunks trained "
                            "side by side with batched (default 2; auto: the cores this process may use)")
        p.add_argument("--trainer", choices=["batched", "pool"], help="batched: phones on one version train in one "
                                                                       "vmapped step (default); pool: one by one")
    p.add_argument("--runtime", choices=RUNTIME_NAMES, help="on-device runtime (default torch)")
    p.add_argument("--out", help="output folder for metrics.jsonl, summary.json, devices.csv (default runs/latest)")
    p.add_argument("--devices", help="none | default | PATH.csv: emulated device speeds, links, availability "
                                     "(default none)")
    p.add_argument("--compute-ms", type=float, help="default devices: mean ms per training sample (default 5)")
    p.add_argument("--diurnal", type=float, help="default devices: fraction available only at night (default 0)")
    p.add_argument("--dropout", type=float, help="default devices: probability of vanishing mid-task (default 0)")
    p.add_argument("--hours", type=float, help="stop after this much (virtual) time, e.g. 24 for a day "
                                               "(default 0: no limit)")
    if fleet:
        p.add_argument("--attack", help="Byzantine phones: none | signflip | scale:F | noise:STD | labelflip "
                                        "(default none)")
        p.add_argument("--attack-fraction", type=float, help="share of phones that attack (default 0)")
    p.add_argument("--inline-model", choices=["yes", "no"],
                   help="phones take the model in the check-in's answer (yes, default: one request per task "
                        "less) or download it with GET /v1/model (no)")
    p.add_argument("--chain-checkin", choices=["yes", "no"],
                   help="phones without an emulated device make their next check-in in the same request as "
                        "their upload (yes: one request per task less) or on its own (no); default: yes, except "
                        "for fleets of over 1,000 phones sharing their process with the server")


def training_flags(p: argparse.ArgumentParser, server_here: bool) -> None:
    """Local training: the task's plan on a server of one's own, or overrides of a running server's plan."""
    what = "" if server_here else "override the server's plan on these phones: "
    plan = TrainPlan()  # the defaults, as protocol/plan.py defines them

    def default(value: object, note: str = "") -> str:
        return f" (default {value}{note})" if server_here else ""

    p.add_argument("--local-epochs", type=int, help=f"{what}local epochs per task" + default(plan.local_epochs))
    p.add_argument("--batch-size", type=int, help=f"{what}local batch size" + default(plan.batch_size))
    p.add_argument("--lr", type=float, help=f"{what}local SGD learning rate" + default(plan.lr))
    p.add_argument("--prox-mu", type=float, help=f"{what}FedProx proximal weight"
                                                 + default(f"{plan.prox_mu:g}", " = FedAvg"))


def server_task_flags(p: argparse.ArgumentParser) -> None:
    """The task of simulate's own server: rounds, cohorts, merging, codec and privacy, robustness."""
    p.add_argument("--rounds", type=int, help="federated rounds (default 10; 0 = until stopped with Ctrl-C)")
    p.add_argument("--sample", type=float, help="fraction of the phones whose updates each round waits for "
                                                "(default 0.5)")
    add_model_flags(p)
    p.add_argument("--mode", choices=["sync", "async", "gossip"],
                   help="synchronous rounds, FedBuff, or decentralized gossip (default sync)")
    p.add_argument("--concurrency", type=int, help="async: phones training at once (default 20)")
    p.add_argument("--buffer", type=int, help="async: updates per merge, K (default 10)")
    p.add_argument("--staleness", help="async: constant | inverse | poly:A | hinge:A:B (default poly:0.5)")
    p.add_argument("--max-staleness", type=int, help="async: older updates are refused (default 20)")
    p.add_argument("--server-optimizer", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"],
                   help="how the server applies the mean update (default fedavg)")
    p.add_argument("--server-lr", type=float, help="server learning rate (default 1.0)")
    p.add_argument("--clock", choices=["auto", "wall", "virtual"],
                   help="virtual time (default auto: virtual when devices are emulated)")
    p.add_argument("--clip", type=float, help="L2 clipping norm C of each update (default: none)")
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
    p.add_argument("--server-process", choices=["auto", "yes", "no"],
                   help="run the server in its own process (wall clock only; auto, the default: for 1,000+ "
                        "phones on 2+ cores)")


def add_accelerator_flags(p: argparse.ArgumentParser) -> None:
    """Where simulate's training arithmetic runs: docs/accelerators.md."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="batched training and the server's evaluation on the CPU (default), a CUDA GPU, or "
                        "auto: CUDA when torch sees one")
    p.add_argument("--train-threads", metavar="N|auto",
                   help="torch intra-op threads of the training (default 1; auto: the cores this process may use)")


def add_strategy_flags(p: argparse.ArgumentParser) -> None:
    """A merge of one's own (serve and simulate): see docs/strategies.md."""
    p.add_argument("--strategy", metavar="MODULE:ATTR",
                   help="merge with this fedfleet.server.strategy.Strategy (an object, or a class or function "
                        "making one) instead of the built-in FedAvg; its module must be importable "
                        "(PYTHONPATH) (default: none)")


def add_state_flags(p: argparse.ArgumentParser) -> None:
    """How the model's state (batch norm running statistics) is federated: docs/model-state.md."""
    p.add_argument("--local-state", action="store_true", default=None,
                   help="FedBN: each phone keeps its own batch norm statistics (default: the server merges the "
                        "phones' statistics, weighted by examples, and ships them with the model)")


def add_secagg_flags(p: argparse.ArgumentParser) -> None:
    """Secure aggregation (docs/secure-aggregation.md), for simulate and serve."""
    p.add_argument("--secure-agg", action="store_true", default=None,
                   help="phones mask their integer updates (SecAgg+); the server sees only the sum of a sync "
                        "round's cohort or of an async group of K (buffer_size) phones (default: off)")
    p.add_argument("--secagg-threshold", type=float,
                   help="fraction of each phone's neighbours and of the group needed to unmask (default 0.55)")
    p.add_argument("--secagg-degree", type=int, help="neighbours per phone, even (default 0: about 2 log2 n)")
    p.add_argument("--distributed-noise-multiplier", type=float,
                   help="distributed DP: the phones' summed noise is the central Gaussian's with this z (with "
                        "--clip, --delta; default 0: none)")


def fleet_task_flags(p: argparse.ArgumentParser) -> None:
    """What --rounds, --sample and --model mean against a running server (see run_fleet, _monitor)."""
    p.add_argument("--rounds", type=int, help="leave after N rounds merged since these phones joined (rounds the "
                                              "server ran before are not counted; default 0: until the server's "
                                              "task is done)")
    p.add_argument("--sample", type=float, help="probability that a phone is available at each check-in; the "
                                                "server decides cohorts (default 1)")
    p.add_argument("--model", help="the phones' model: mlp | cnn | mobilenet | MODULE:ATTR; the server refuses "
                                   "phones whose model differs from its own (default: the server's model when "
                                   "built in; a server's MODULE:ATTR must be given here)")


# The user's task (docs/your-own-task.md): the same model and dataset specs in every subcommand.
DATASET_HELP = ("the data: digits | mnist5k | synthetic[:N[:SIDE]] | mnist:PATH | fashion:PATH | cifar10:PATH | "
                "npz:PATH (arrays x_train, y_train, x_test, y_test[, num_classes]) | imagefolder:PATH (a folder "
                "per class) | MODULE:ATTR (a callable returning those four arrays or two torch Datasets) "
                "(default digits)")
MODEL_HELP = ("mlp | cnn | mobilenet | MODULE:ATTR, a callable returning a torch.nn.Module (given input_shape "
              "and num_classes if it takes them) (default cnn)")


def add_model_flags(p: argparse.ArgumentParser, init_weights: bool = True) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    if init_weights:
        p.add_argument("--init-weights", help="the initial global model: a safetensors file, or a torch state_dict "
                                              "(loaded with weights_only=True) (default: drawn from --seed)")


def add_loss_flags(p: argparse.ArgumentParser, metrics: bool = True) -> None:
    """A task's own loss and metrics (export/task_loss.py, docs/your-own-task.md); phones take the loss only."""
    p.add_argument("--loss", metavar="MODULE:ATTR",
                   help="the training loss: a callable (outputs, targets) -> the mean over the batch, a scalar "
                        "tensor; phones train it, exported bundles trace it (default: cross-entropy)")
    if metrics:
        p.add_argument("--metrics", metavar="MODULE:ATTR",
                       help="the server's evaluation: a callable (outputs, targets) -> {name: float} on the whole "
                            "test split, recorded with each version beside accuracy and loss (default: none)")


def add_image_size_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, help="imagefolder:PATH: images are resized to this side (default 32)")


class _Refused(argparse.Action):
    """A flag this subcommand does not take: a clear error instead of "unrecognized arguments"."""

    def __init__(self, option_strings: list[str], dest: str, reason: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} {self.reason}")


def refuse(p: argparse.ArgumentParser, names: tuple[str, ...], reason: str) -> None:
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), action=_Refused, reason=reason, dest="refused_" + name)


PHONE_ONLY = "is a setting of a fleet of phones: `fedfleet phone` runs one (use `fedfleet fleet`)"
SERVER_SIDE = ("is a setting of the server's task: give it to `fedfleet serve` (or its [server] TOML); "
               "phones follow the task of the server they join")


def tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def shard_spec(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N, e.g. 3/50")
    return int(index), int(count)


def run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SimulateConfig values given as flags (None: not given) of whichever subcommand ran."""
    from fedfleet.simulate_config import setting_names

    values = {name: getattr(args, name, None) for name in setting_names() - {"server", "start_spread_s", "register_when_active", "register_in_bulk"}}
    for key in ("inline_model", "chain_checkin"):
        values[key] = None if values[key] is None else values[key] == "yes"
    return values


def toml_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    return load_toml(args.config, section) if args.config else {}


def add_gossip_flags(p: argparse.ArgumentParser) -> None:
    """--mode gossip: phones average with their neighbours through the server's relay (docs/gossip.md)."""
    p.add_argument("--topology", help="gossip: ring | ring-matchings | torus | regular:D | exponential | complete | "
                                      "matching | edges:PATH (a file of 'PHONE PHONE' lines) (default ring)")
    p.add_argument("--gossip", choices=["dpsgd", "choco", "admm"],
                   help="gossip: D-PSGD (whole models), CHOCO-SGD (compressed by the codec flags) or decentralized "
                        "ADMM (default dpsgd)")
    p.add_argument("--gossip-gamma", type=float, help="gossip: CHOCO-SGD's consensus step size (default 0.5)")
    p.add_argument("--admm-rho", type=float, help="gossip: ADMM's penalty rho (default 0.1)")


def add_gossip_serve_flags(p: argparse.ArgumentParser) -> None:
    """serve --mode gossip: the server relays phones' messages along a topology (docs/gossip.md)."""
    p.add_argument("--topology", help="gossip: ring | ring-matchings | torus | regular:D | exponential | complete | "
                                      "matching | edges:PATH (default ring)")
    p.add_argument("--gossip-phones", type=int, help="gossip: the topology's phones, named phone-00000, "
                                                     "phone-00001, ... (default: none; required with --mode gossip)")


def gossip_server_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig values of ``serve --mode gossip``: the relay on, the server's own rounds idle."""
    from fedfleet.cli_errors import CliError

    if args.mode != "gossip":
        if args.topology is not None or args.gossip_phones is not None:
            raise CliError("--topology and --gossip-phones go with --mode gossip")
        return {}
    if getattr(args, "secure_agg", None):
        raise CliError("--secure-agg is not taken in gossip mode (docs/gossip.md)")
    if args.gossip_phones is None:
        raise CliError("--mode gossip needs --gossip-phones N: the topology's phones, named phone-00000, ...")
    return {"mode": "sync", "topology": args.topology or "ring", "gossip_phones": args.gossip_phones}


def add_gossip_fleet_flags(p: argparse.ArgumentParser) -> None:
    """fleet --gossip: phones gossip through a `serve --mode gossip` relay (docs/gossip.md)."""
    p.add_argument("--gossip", choices=["dpsgd", "choco", "admm"],
                   help="gossip with the neighbours the server's relay names: D-PSGD, CHOCO-SGD (compressed by "
                        "the server's codec) or decentralized ADMM (default: none, FedAvg)")
    p.add_argument("--gossip-gamma", type=float, help="gossip: CHOCO-SGD's consensus step size (default 0.5)")
    p.add_argument("--admm-rho", type=float, help="gossip: ADMM's penalty rho (default 0.1)")


def add_enrolment_flags(p: argparse.ArgumentParser, side: str) -> None:
    """Registration with admin-issued single-use codes (server/enrolment.py, docs/operations.md).
    ``side``: serve (the codes it accepts), fleet (a file, one code per phone) or phone (one code)."""
    if side == "phone":
        p.add_argument("--enrolment-code", help="the admin's single-use code this phone registers with, for a "
                                                "server started with --enrolment-codes (default: none)")
        return
    p.add_argument("--enrolment-codes", help={
        "serve": "registration needs one of the single-use codes in this file, one per line (default: none needed)",
        "fleet": "phone I registers with the code on line I of this file (one per phone; default: none)",
    }[side])


def enrolment_codes_of(args: argparse.Namespace, phones: int) -> tuple[str, ...]:
    """The codes the fleet's or phone's flags give its ``phones`` (ValueError for a bad file)."""
    from fedfleet.server.enrolment import read_codes

    code = getattr(args, "enrolment_code", None)
    if code is not None:
        return (code,)  # `fedfleet phone`: its one phone
    path = getattr(args, "enrolment_codes", None)
    if path is None:
        return ()
    codes = read_codes(path)
    if len(codes) < phones:
        raise ValueError(f"--enrolment-codes {path}: {len(codes)} codes for {phones} phones (one each)")
    return tuple(codes)


def _workers(value: str) -> int:
    from fedfleet.tuning import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--workers {value}: ")) from None
