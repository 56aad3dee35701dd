"""Emulated-fleet local training: the per-phone loop next to ``train_many`` at several chunk sizes.

Each phone holds ~30 digits examples (20-40, drawn from the sklearn digits training split, as
when 50-100 phones split it) and trains 1 local epoch at batch 16 from the same start. The
loop is what ``RuntimePool.train`` does per phone today (set_params, train, get_params,
delta on one eager ``TorchRuntime``). Methods are interleaved within each repeat, so load
from other processes hits all of them alike; the table shows medians (and minimums). The
"arith" column is the share of ``train_many``'s time spent inside the vmapped grad + SGD
calls (median over repeats). "cpu s" and "x loop cpu" time the same calls in this process's CPU
seconds, which other processes on a shared machine do not inflate. Writes bench/results/batched.json.

    .venv/bin/python bench/bench_batched.py [--phones 100 500] [--models mlp cnn bncnn mobilenet]
        [--chunks 16 32 64 128 0] [--repeats 5] [--threads 1] [--reference REV]   (chunk 0 = all phones)
        [--workers 1 2] [--dataset digits|mnist5k]

``--reference REV`` adds "REV chunk C" rows: ``train_many`` as the git revision REV wrote it
(``device_runtime/batched.py`` and ``stateful.py`` from that commit), timed in the same process,
interleaved with the others, so two implementations compare under the same load.

``--workers 1 2`` adds "chunk C x2" rows: ``train_many(..., workers=2)``, its chunks trained on two
threads (their CPU seconds summed in "cpu s"). ``--dataset mnist5k``: phones hold 28x28 MNIST digits.

``mobilenet`` has a frozen backbone: ``train_many`` runs it once per phone's examples in each call
(``export/frozen_prefix.py``), and the "chunk C kept" rows keep its features from one call to the
next, as a run does from one task to the next.

``bncnn`` is a user's model with state and randomness (``BNCNN`` below: batch norm and dropout):
the loop starts every phone from the same batch norm statistics, as the batched trainer does, and
both report each phone's statistics (compared in the max|diff| column).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import provenance
from fedfleet.device_runtime import batched
from fedfleet.device_runtime.batched import Job, Params, train_many
from fedfleet.device_runtime.data import load_dataset
from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainResult
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.export.frozen_prefix import FeatureCache
from fedfleet.export.models import ModelSpec, build_model
from fedfleet.protocol.state import with_state

CFG = TrainConfig(local_epochs=1, batch_size=16, lr=0.05)
Outputs = list[tuple[Params, TrainResult]]


def fleet_data(x: np.ndarray, y: np.ndarray, phones: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 41, size=phones)  # mean 30
    picks = [rng.choice(len(x), size=n, replace=False) for n in sizes]
    return [(x[p], y[p]) for p in picks]


def jobs_for(data: list[tuple[np.ndarray, np.ndarray]]) -> list[Job]:
    """Fresh per-phone generators with fixed seeds: every method does identical work."""
    return [(x, y, np.random.default_rng([11, i])) for i, (x, y) in enumerate(data)]


class BNCNN(torch.nn.Module):
    """Two conv(3x3) + batch norm + ReLU + maxpool(2) blocks, dropout, a linear classifier."""

    def __init__(self, in_channels: int, side: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.BatchNorm2d(2 * width), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.25),
        )
        self.fc = torch.nn.Linear(2 * width * (side // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    if name == "bncnn":
        torch.manual_seed(0)  # the benchmark's model initialisation only
        return BNCNN(input_shape[0], input_shape[1], num_classes)
    return build_model(ModelSpec(name, input_shape, num_classes), seed=0)


def per_phone_loop(model: torch.nn.Module, params: Params, jobs: list[Job]) -> Outputs:
    runtime = TorchRuntime(copy.deepcopy(model))  # its buffers move; train_many starts from the model's
    out = []
    for x, y, rng in jobs:
        runtime.set_params(params)
        runtime.set_state({})  # every phone from the model's initial statistics
        result = runtime.train(x, y, CFG, rng)
        new = runtime.get_params()
        delta = {n: (new[n] - params[n]).astype(np.float32) for n in params}
        out.append((with_state(delta, runtime.get_state()), result))
    return out


@contextmanager
def timed_steps() -> Iterator[list[float]]:
    """Accumulate the time spent in the vmapped step calls of ``train_many`` (grad + SGD
    update, excluding batch gathering and bookkeeping) by wrapping the step factory."""
    spent = [0.0]
    original = batched._make_step

    def make(*args: Any, **kwargs: Any) -> batched.Step:
        step = original(*args, **kwargs)

        def timed(*step_args: Any) -> torch.Tensor:
            start = time.perf_counter()
            out = step(*step_args)
            spent[0] += time.perf_counter() - start
            return out

        return timed

    batched._make_step = make  # type: ignore[assignment]
    try:
        yield spent
    finally:
        batched._make_step = original  # type: ignore[assignment]


def max_diff(a: Outputs, b: Outputs) -> float:
    return max(float(np.abs(da[n] - db[n]).max()) for (da, _), (db, _) in zip(a, b, strict=True) for n in db)


def reference_train_many(rev: str) -> Callable[..., Outputs]:
    """``train_many`` of git revision ``rev``, its batched.py and stateful.py loaded as ``_ref_*`` modules."""
    root = Path(__file__).resolve().parents[1]
    for name in ("stateful", "batched"):
        path = f"device_runtime/{name}.py"
        source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True,
                                text=True).stdout.replace("fedfleet.device_runtime.stateful", "_ref_stateful")
        module = types.ModuleType(f"_ref_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own repository's code
    return sys.modules["_ref_batched"].train_many  # type: ignore[no-any-return]


def bench_case(model_name: str, phones: int, chunks: list[int], repeats: int,
               reference: tuple[str, Callable[..., Outputs]] | None = None, workers: tuple[int, ...] = (1,),
               dataset: str = "digits") -> list[dict[str, Any]]:
    digits = load_dataset(dataset, seed=0)
    model = make_model(model_name, digits.input_shape, digits.num_classes)
    params = TorchRuntime(model).get_params()
    data = fleet_data(digits.x_train, digits.y_train, phones, seed=phones)

    def vectorized(size: int, threads: int) -> Callable[[list[Job]], Outputs]:
        return lambda jobs: train_many(model, params, jobs, CFG, chunk=size, workers=threads)

    methods: dict[str, Callable[[list[Job]], Outputs]] = {"loop": lambda jobs: per_phone_loop(model, params, jobs)}
    methods.update({f"chunk {c or 'all'}" + (f" x{w}" if w > 1 else ""): vectorized(c or phones, w)
                    for c in chunks for w in workers})
    if not all(p.requires_grad for p in model.parameters()):  # a frozen backbone: its features kept across calls,
        kept = FeatureCache()  # as a run keeps them from one task to the next (filled by the warm-up)
        methods.update({f"chunk {c or 'all'} kept": (lambda size: lambda jobs: train_many(
            model, params, jobs, CFG, chunk=size, features=kept))(c or phones) for c in chunks})
    if reference is not None:
        rev, ref = reference
        methods.update({f"{rev} chunk {c or 'all'}": (lambda size: lambda jobs: ref(model, params, jobs, CFG, chunk=size))(c or phones)
                        for c in chunks})
    outputs = {name: fn(jobs_for(data)) for name, fn in methods.items()}  # warm-up, equivalence check
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    # the step calls' share of wall time, on one training thread (with several, their times overlap)
    arith: dict[str, list[float]] = {name: [] for name in methods if name.startswith("chunk") and " x" not in name}
    for _ in range(repeats):
        for name, fn in methods.items():
            jobs = jobs_for(data)  # seeding 500 generators takes ~35 ms: not timed
            with timed_steps() as spent:  # two perf_counter calls per step: negligible
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(jobs)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            if name in arith:
                arith[name].append(spent[0] / times[name][-1])
    loop_s, loop_cpu = statistics.median(times["loop"]), statistics.median(cpu["loop"])
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        rows.append(
            {
                "model": model_name,
                "dataset": dataset,
                "phones": phones,
                "method": name,
                "median_s": med,
                "min_s": min(times[name]),
                "updates_per_s": phones / med,
                "speedup_vs_loop": loop_s / med,
                # this process's CPU seconds: what the work costs, without the time it waited for
                # the cores while other processes ran (one intra-op thread: CPU ~ wall when idle)
                "cpu_median_s": statistics.median(cpu[name]),
                "cpu_speedup_vs_loop": loop_cpu / statistics.median(cpu[name]),
                "arith_fraction": statistics.median(arith[name]) if name in arith else None,
                "max_abs_diff_vs_loop": max_diff(outputs[name], outputs["loop"]),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':5} {'phones':>6} {'method':16} {'median s':>9} {'min s':>7} {'upd/s':>7} {'x loop':>7} "
            f"{'cpu s':>7} {'x loop cpu':>10} {'arith':>6} {'max|diff|':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        arith = "" if r["arith_fraction"] is None else f"{r['arith_fraction']:.0%}"
        print(
            f"{r['model']:5} {r['phones']:>6} {r['method']:16} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
            f"{r['updates_per_s']:>7.0f} {r['speedup_vs_loop']:>7.2f} {r['cpu_median_s']:>7.3f} "
            f"{r['cpu_speedup_vs_loop']:>10.2f} {arith:>6} {r['max_abs_diff_vs_loop']:>9.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "bncnn", "mobilenet"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 0], help="0 = all phones")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the fleet uses 1)")
    parser.add_argument("--reference", metavar="REV", help="also time train_many as git revision REV wrote it")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="train_many's training threads (each also a row: 'chunk C xW')")
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batched.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = (args.reference, reference_train_many(args.reference)) if args.reference else None
    rows = [r for m in args.models for n in args.phones
            for r in bench_case(m, n, args.chunks, args.repeats, reference, tuple(args.workers), args.dataset)]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        **provenance(),  # command, date, machine (python, cpu, cores)
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "train_config": asdict(CFG),
        "examples_per_phone": f"uniform 20-40 from the {args.dataset} train split",
        "workers": args.workers,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
