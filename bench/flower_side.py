"""The Flower half of bench/bench_flower.py: a Flower 1.41 simulation (Ray backend) of the
same federated workload fedfleet runs, in Flower's own virtual environment.

Standalone on purpose: it imports nothing of fedfleet (Flower's pins conflict with ours), and
it runs only under ``bench/.flower-venv/bin/python``. The data, the phones' shards and the
initial parameters come from an ``.npz`` that bench_flower.py writes with fedfleet's own
loader and partitioner, so both systems train the same model (fedfleet's MLP, CNN, the CNN with a
pretrained frozen backbone of bench/transfer_task.py, or the MobileNetV3-small transfer model: the
classes below, loaded strictly from fedfleet's initial state) from the same start on the same shards, with the same plain-SGD local
training (1 epoch, the batch order drawn from a
seeded numpy Generator, as fedfleet's ``iterate_batches`` does).

    bench/.flower-venv/bin/python bench/flower_side.py --data D.npz --rounds R
        [--fraction 0.5] [--client-cpus 1.0] [--ray-cpus 2] [--lr 0.05] [--batch-size 16]
        [--local-epochs 1] [--seed 0] [--out RESULT.json]

The ServerApp records a timestamp before round 1 and after each round (its ``evaluate_fn``,
the central evaluation on the held-out split, runs at those points), so ``wall_s`` covers the
rounds only: Ray start-up and the creation of the simulation engine are outside it, but the
Ray actors' first use (importing torch, building the model) falls in round 1, which is why
the steady-state figure over rounds 2..R is reported too. Prints one JSON object on the last
line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

DATA_ENV = "FLOWER_BENCH_DATA"  # the .npz, read by every Ray actor process
# Optional: a file every finished client training appends a line to (and the ServerApp a
# "start" line before round 1), so that a run killed at its time limit still shows how many
# client updates Flower had trained by then. Small O_APPEND writes from many processes do not
# interleave.
PROGRESS_ENV = "FLOWER_BENCH_PROGRESS"


def progress(line: str) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)
_DATA: dict[str, np.ndarray] = {}  # per process: the arrays of the .npz
_MODEL: list[nn.Module] = []  # per process: one model that every client task reuses


class MLP(nn.Module):
    """fedfleet's export.models.MLP: Flatten -> Linear -> ReLU -> Linear (64-32-10 on digits)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """fedfleet's export.models.CNN: two conv(3x3)+ReLU+maxpool(2) blocks and a linear classifier."""

    def __init__(self, in_channels: int, height: int, width_px: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class TransferMobileNet(nn.Module):
    """fedfleet's export.models.TransferMobileNet: torchvision's MobileNetV3-small features, frozen
    and in eval mode, and a trainable linear head; grey inputs repeated to 3 channels."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_small

        self.features = mobilenet_v3_small(weights=None).features
        self.head = nn.Linear(576, num_classes)
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()

    def train(self, mode: bool = True) -> TransferMobileNet:
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_net(d: dict[str, np.ndarray]) -> nn.Module:
    """The .npz's model (``model``: mlp | cnn | cnn-frozen | mobilenet) with its initial state (``state:NAME``,
    every parameter and buffer of fedfleet's model), loaded strictly: a name or shape that differs
    from fedfleet's fails here."""
    name, shape, classes = str(d["model"]), d["x_train"].shape[1:], int(d["num_classes"])
    state = {k.split(":", 1)[1]: torch.from_numpy(np.array(d[k])) for k in d if k.startswith("state:")}
    net: nn.Module
    if name == "mlp":
        net = MLP(int(np.prod(shape)), classes, int(state["fc1.weight"].shape[0]))
    elif name in ("cnn", "cnn-frozen"):  # cnn-frozen: bench/transfer_task.py's, pretrained convolutions frozen
        net = CNN(int(shape[0]), int(shape[1]), int(shape[2]), classes, int(state["conv1.weight"].shape[0]))
        if name == "cnn-frozen":
            for p in [*net.conv1.parameters(), *net.conv2.parameters()]:
                p.requires_grad_(False)
    elif name == "mobilenet":
        net = TransferMobileNet(classes)
    else:
        raise ValueError(f"flower_side.py has no model {name!r}")
    net.load_state_dict(state, strict=True)
    return net


def trainable(net: nn.Module) -> dict[str, torch.Tensor]:
    """What a round federates: the trainable parameters (a frozen backbone stays on the clients)."""
    return {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}


def data() -> dict[str, np.ndarray]:
    if not _DATA:
        with np.load(os.environ[DATA_ENV]) as f:
            _DATA.update({k: f[k] for k in f.files})
    return _DATA


def model() -> nn.Module:
    if not _MODEL:
        torch.set_num_threads(1)  # as fedfleet's trainer: phone-sized models, parallelism across clients
        _MODEL.append(build_net(data()))
    return _MODEL[0]


def shard(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    d = data()
    idx = d["part_index"][d["part_offsets"][partition_id] : d["part_offsets"][partition_id + 1]]
    return d["x_train"][idx], d["y_train"][idx]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One phone's local training: load the global model, SGD over shuffled batches, send it back."""
    cfg = msg.content["config"]
    pid = int(context.node_config["partition-id"])
    x, y = shard(pid)
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)  # the trainable part
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=float(cfg["lr"]))
    rng = np.random.default_rng([int(cfg["seed"]), pid, int(cfg["server-round"])])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    total, steps = 0.0, 0
    for _ in range(int(cfg["local-epochs"])):
        order = rng.permutation(len(x))
        for start in range(0, len(x), int(cfg["batch-size"])):
            ti = torch.from_numpy(order[start : start + int(cfg["batch-size"])])
            loss = nn.functional.cross_entropy(net(xt[ti]), yt[ti])
            total += float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    metrics = MetricRecord({"train_loss": total / max(steps, 1), "num-examples": len(x)})
    content = RecordDict({"arrays": ArrayRecord(trainable(net)), "metrics": metrics})
    progress("trained")
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
RUN: dict[str, Any] = {}  # what the ServerApp measured, read by main() after run_simulation returns


class CountingFedAvg(FedAvg):
    """Flower's FedAvg, counting the training replies it aggregates (and the failed ones)."""

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        errors = sum(1 for m in replies if m.has_error())
        RUN.setdefault("updates", []).append(len(replies) - errors)
        progress(f"aggregated:{server_round}:{len(replies) - errors}")
        RUN.setdefault("errors", []).append(errors)
        return super().aggregate_train(server_round, replies)


class RssSampler(threading.Thread):
    """Peak resident memory of this process and all its descendants (Ray's raylet, GCS and
    actors), sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mb, self.stop = 0.0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.2):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    args = RUN["args"]
    d = data()
    net = build_net(d)
    initial = ArrayRecord({n: t.clone() for n, t in trainable(net).items()})
    xt, yt = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    marks: list[float] = []
    accuracy: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation on the held-out split (fedfleet evaluates every version too)."""
        net.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        net.eval()
        with torch.no_grad():
            acc = float((net(xt).argmax(1) == yt).float().mean())
        accuracy.append(acc)
        marks.append(time.perf_counter())
        return MetricRecord({"accuracy": acc})

    strategy = CountingFedAvg(
        fraction_train=args.fraction,
        fraction_evaluate=0.0,  # no client-side evaluation: fedfleet's phones do not evaluate either
        min_train_nodes=1,
        min_available_nodes=args.phones,  # start once every simulated phone is there
    )
    train_config = ConfigRecord({"lr": args.lr, "batch-size": args.batch_size, "local-epochs": args.local_epochs,
                                 "seed": args.seed})
    progress("start")
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, train_config=train_config,
                            evaluate_fn=evaluate, timeout=args.round_timeout)
    RUN["marks"], RUN["accuracy"] = marks, accuracy
    RUN["train_metrics"] = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=3600.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ[DATA_ENV] = os.path.abspath(args.data)
    d = data()
    args.phones = len(d["part_offsets"]) - 1
    RUN["args"] = args
    backend_config = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.ray_cpus, "num_gpus": 0},
    }
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.phones,
                   backend_config=backend_config)  # type: ignore[arg-type]
    total_s = time.perf_counter() - t0
    sampler.stop.set()
    marks, rounds = RUN.get("marks", []), args.rounds
    if len(marks) != rounds + 1:
        raise RuntimeError(f"the simulation recorded {max(len(marks) - 1, 0)} of {rounds} rounds (see the log above)")
    per_round = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    updates = RUN["updates"]
    steady_s = sum(per_round[1:])
    out = {
        "system": "flower",
        "flwr": _version("flwr"), "ray": _version("ray"), "torch": torch.__version__,
        "phones": args.phones, "rounds": rounds, "fraction": args.fraction,
        "client_cpus": args.client_cpus, "ray_cpus": args.ray_cpus,
        "updates": sum(updates), "round_updates": updates, "failed_updates": sum(RUN["errors"]),
        "wall_s": sum(per_round), "round_wall_s": per_round,
        "updates_per_s": sum(updates) / sum(per_round),
        "steady_updates_per_s": sum(updates[1:]) / steady_s if rounds > 1 else None,
        "accuracy": RUN["accuracy"][-1], "accuracy_per_round": RUN["accuracy"],
        "train_loss": [RUN["train_metrics"][r].get("train_loss") for r in sorted(RUN["train_metrics"])],
        "total_s": total_s,
        "peak_rss_mb": sampler.peak_mb,  # driver + Ray processes
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    # Run as the importable module ``flower_side`` (not ``__main__``), so that cloudpickle sends
    # the ClientApp to Ray's actors by reference and each actor imports this file (via
    # PYTHONPATH) and keeps its data and model cached between tasks.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), *filter(None, [os.environ.get("PYTHONPATH")])])
    import flower_side

    flower_side.main()
