"""Throughput: client updates per second of wall time, fedfleet next to Flower's simulation engine.

The same federated workload on both systems, side by side in one run: N phones each holding a
disjoint IID shard (fedfleet's own ``load_dataset`` and ``partition``, seed 0), the 64-32-10 MLP
from the same initial parameters, 1 local epoch of plain SGD at batch 16 and lr 0.5, FedAvg
over a 50% sample of the phones per round, central evaluation of every new version on the
held-out split. fedfleet runs ``fedfleet simulate`` (its aiohttp server on a loopback port,
SQLite state, every phone a real HTTP client, phones on one version trained in one vmapped
step). Flower runs ``flwr.simulation.run_simulation`` (Flower 1.41.0, Ray backend,
Message-API ServerApp/ClientApp with ``flwr.serverapp.strategy.FedAvg``) in a separate venv,
``bench/.flower-venv`` (created on first use: Flower's pins conflict with ours), through
bench/flower_side.py, at each ``--client-cpus`` setting; the best Flower figure is the
baseline.

Figures: ``updates/s`` = merged updates / the summed wall time of the rounds (round 1 opens
after process start-up: for fedfleet it includes the phones' registration, for Flower the Ray
actors' first task, which imports torch in each actor); ``steady/s`` = the same over rounds
2..R. Without emulated devices there are no stragglers, so fedfleet hands work to exactly the
cohort, as Flower does (over-selection is for emulated fleets); only merged updates count.
fedfleet runs with its server on the fleet's event loop and, ``--server-process yes``, in a
process of its own (a core each), on uvloop (its default) and, ``--loops uvloop,asyncio``, also on
the standard library's loop. When Flower gives no result within ``--flower-timeout``,
the client trainings it had finished by then (logged by flower_side.py, none aggregated)
give an upper bound of its rate, and the ratio is taken against that. 10,000 phones cannot split sklearn
digits (1,438 training examples), so scale points above ``--digits-max`` phones use
``synthetic:M`` (8x8 inputs, the same MLP) with M chosen to give each phone as many examples
as digits gives 100 phones (~14: one SGD step per round).

    .venv/bin/python -m bench.bench_flower [--phones 100,10000] [--rounds 10] [--scale-rounds 3]
        [--client-cpus 1.0,0.5] [--flower-timeout 900] [--skip-flower-above 0] [--server-process no,yes]
        [--loops uvloop[,asyncio]]

Prints a table and writes bench/results/flower.json.

``--workloads mlp,cnn,transfer`` runs instead the realistic workloads of bench/flower_workloads.py
at 100 phones (the MLP on digits for 20 rounds, the CNN on mnist5k and a transfer task with a frozen
pretrained backbone for 10), each side timed as a whole process (command to exit) and in steady
rounds, with one py-spy profile of fedfleet's CPU by stage:

    .venv/bin/python -m bench.bench_flower --workloads mlp,cnn,transfer [--client-cpus 1.0]
        [--server-process auto] [--train-threads 1,2] [--profile yes] [--out flower_workloads]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".flower-venv"
FLOWER_SIDE = ROOT / "flower_side.py"
REQUIREMENTS = ["flwr[simulation]==1.41.0", "torch==2.14.1", "torchvision==0.29.1", "psutil"]  # torchvision: mobilenet
SEED = 0
# lr 0.5: with ~14 examples a phone takes one SGD step per round, and at lr 0.05 neither system got past
# ~10% accuracy in 10 rounds (0.63 at 0.5); the speed figures do not depend on it.
WORKLOAD: dict[str, Any] = {"model": "mlp", "local_epochs": 1, "batch_size": 16, "lr": 0.5, "sample": 0.5,
                            "seed": SEED}
EXAMPLES_PER_PHONE = 1438 / 100  # digits' training split over 100 phones


def ensure_flower_venv() -> Path:
    """bench/.flower-venv with Flower 1.41 (Ray), torch and torchvision: made once, reused while it
    imports; a venv missing a requirement gets it added (pip keeps what is already there)."""
    python = VENV / "bin" / "python"
    probe = "import importlib.metadata as m, ray, torch, torchvision, psutil; assert m.version('flwr') == '1.41.0'"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    if not python.exists():
        print(f"creating {VENV} with {' '.join(REQUIREMENTS)} (once; a few minutes)", flush=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    return python


def dataset_for(phones: int, digits_max: int) -> str:
    if phones <= digits_max:
        return "digits"
    return f"synthetic:{int(round(phones * EXAMPLES_PER_PHONE / 0.8))}"  # 80% of it is the training split


def write_npz(path: Path, dataset: str, phones: int, seed: int, model_name: str = "mlp",
              init_weights: str | None = None, peer_model: str | None = None) -> None:
    """What flower_side.py needs, made with fedfleet's own code: the splits, each phone's shard
    (as fedfleet's run_fleet draws it: ``partition`` with ``default_rng(seed)``), the model's name
    on flower_side.py's side (``peer_model``, default ``model_name``) and the initial state fedfleet's
    server starts from (``state:NAME``: parameters and buffers; ``init_weights`` loaded over the seed's)."""
    from fedfleet.device_runtime.data import load_dataset, partition
    from fedfleet.export.task_model import task_model

    data = load_dataset(dataset, seed=seed)
    parts = partition(data.y_train, phones, "iid", np.random.default_rng(seed))
    model = task_model(model_name, data.input_shape, data.num_classes, seed, init_weights)  # as fedfleet's server does
    arrays: dict[str, Any] = {f"state:{n}": t.detach().numpy() for n, t in model.state_dict().items()}
    arrays.update(model=np.str_(peer_model or model_name), x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
                  y_test=data.y_test,
                  num_classes=np.int64(data.num_classes), part_index=np.concatenate(parts).astype(np.int64),
                  part_offsets=np.cumsum([0, *(len(p) for p in parts)]).astype(np.int64))
    np.savez(path, **arrays)


def _fedfleet_child(cfg_kwargs: dict[str, Any], loop: str, conn: Any) -> None:
    os.environ["FEDFLEET_LOOP"] = loop  # this process and a server process it starts
    from bench.common import run_sim
    from fedfleet.simulate_config import SimulateConfig

    rows, summary, total_s = run_sim(SimulateConfig(**cfg_kwargs))
    # With the server in its own (finished) child process, its peak counts too.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    conn.send({"rows": rows, "total_s": total_s, "peak_rss_mb": peak_kib / 1024, "event_loop": summary["event_loop"]})
    conn.close()


def run_fedfleet(phones: int, rounds: int, dataset: str, out: Path, server_process: str = "no",
                 loop: str = "uvloop") -> dict[str, Any]:
    """``fedfleet simulate`` through bench.common.run_sim, in a fresh process (clean peak RSS);
    ``server_process`` yes: the server in a child process of its own (a core each); ``loop``:
    the event loop of both (uvloop, fedfleet's default, or asyncio's own)."""
    cfg = dict(phones=phones, rounds=rounds, dataset=dataset, devices="none", out=str(out),
               server_process=server_process, **WORKLOAD)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_fedfleet_child, args=(cfg, loop, child))
    proc.start()
    child.close()
    got = parent.recv()
    proc.join()
    rows = got["rows"]
    wall = [float(r["wall_s"]) for r in rows]
    updates = [int(r["updates"]) for r in rows]
    return {
        "system": "fedfleet", "phones": phones, "dataset": dataset, "rounds": len(rows),
        "updates": sum(updates), "round_updates": updates, "selected": [int(r["selected"]) for r in rows],
        "wall_s": sum(wall), "round_wall_s": wall,
        "updates_per_s": sum(updates) / sum(wall),
        "steady_updates_per_s": sum(updates[1:]) / sum(wall[1:]) if len(rows) > 1 else None,
        "accuracy": rows[-1]["accuracy"], "accuracy_per_round": [r["accuracy"] for r in rows],
        "aggregate_ms": [r["aggregate_ms"] for r in rows],
        "total_s": got["total_s"], "peak_rss_mb": got["peak_rss_mb"], "run_dir": str(out),
        "server_process": server_process == "yes", "event_loop": got["event_loop"],
    }


def run_flower(python: Path, npz: Path, rounds: int, client_cpus: float, timeout_s: float, log: Path,
               workload: dict[str, Any] | None = None) -> dict[str, Any]:
    """flower_side.py in Flower's venv (``workload``: sample, lr, batch_size, local_epochs, seed;
    default WORKLOAD); on a failure or time-out, the record says so."""
    w = workload or WORKLOAD
    cmd = [str(python), str(FLOWER_SIDE), "--data", str(npz), "--rounds", str(rounds),
           "--fraction", str(w["sample"]), "--client-cpus", str(client_cpus), "--ray-cpus", "2",
           "--lr", str(w["lr"]), "--batch-size", str(w["batch_size"]),
           "--local-epochs", str(w["local_epochs"]), "--seed", str(w["seed"])]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    progress_path = log.with_suffix(".progress")
    progress_path.unlink(missing_ok=True)
    env.update(RAY_DISABLE_USAGE_STATS="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1",
               FLOWER_BENCH_PROGRESS=str(progress_path))
    base = {"system": "flower", "client_cpus": client_cpus, "rounds": rounds, "log": str(log)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, env=env, start_new_session=True, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed_at = time.time()
            _kill_tree(proc.pid)
            proc.communicate()
            return {**base, "error": f"timeout: no result after {timeout_s:.0f} s (killed)",
                    "elapsed_s": time.perf_counter() - t0, **partial_progress(progress_path, killed_at)}
        finally:
            _kill_tree(proc.pid)  # Ray processes the driver may have left behind
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {**base, "error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}",
                "elapsed_s": time.perf_counter() - t0}
    return {**base, **json.loads(lines[-1])}


def partial_progress(path: Path, killed_at: float) -> dict[str, Any]:
    """What a killed Flower run had done between its round 1 start and the kill: client
    trainings finished and rounds aggregated. The training rate is an upper bound of what
    Flower would have merged per second."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {"partial_trained": 0, "partial_note": "round 1 never started"}
    starts = [float(ln.split()[1]) for ln in lines if ln.startswith("start ")]
    trained = [float(ln.split()[1]) for ln in lines if ln.startswith("trained ")]
    aggregated = [ln.split()[0].split(":") for ln in lines if ln.startswith("aggregated:")]
    if not starts:
        return {"partial_trained": 0, "partial_note": "round 1 never started"}
    span = killed_at - starts[0]
    merged = sum(int(a[2]) for a in aggregated)
    return {"partial_trained": len(trained), "partial_span_s": round(span, 1),
            "partial_trained_per_s": len(trained) / span if span > 0 else None,
            "partial_rounds_aggregated": len(aggregated), "partial_aggregated": merged,
            "partial_note": f"{len(trained)} client trainings finished and {len(aggregated)} round(s) "
                            f"({merged} updates) aggregated before the kill"}


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it, found through /proc, by id."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def scale_cpus(rows: list[dict[str, Any]], spec: str, default: list[float]) -> list[float]:
    if spec != "best":
        return [float(x) for x in spec.split(",")]
    ok = [r for r in rows if r["system"] == "flower" and "error" not in r and r.get("steady_updates_per_s")]
    return [max(ok, key=lambda r: r["steady_updates_per_s"])["client_cpus"]] if ok else default


def ratios(rows: list[dict[str, Any]]) -> None:
    """fedfleet's figures over the best Flower figure at the same phone count, or over the best
    Flower figure at any count when Flower produced none there (the row says which)."""
    flower_ok = [r for r in rows if r["system"] == "flower" and "error" not in r]
    for r in rows:
        if r["system"] != "fedfleet":
            continue
        same = [f for f in flower_ok if f["phones"] == r["phones"]]
        partial = [f for f in rows if f["system"] == "flower" and f["phones"] == r["phones"]
                   and f.get("partial_trained_per_s")]
        if not same and partial:  # Flower gave no result here: compare with what it trained before the kill
            best = max(partial, key=lambda f: f["partial_trained_per_s"])
            r["ratio_updates_per_s"] = r["updates_per_s"] / best["partial_trained_per_s"]
            r["ratio_updates_per_s_vs"] = (f"flower@{best['phones']} cpus={best['client_cpus']}, killed after "
                                           f"{best['partial_span_s']} s: {best['partial_note']} (its training rate)")
            continue
        pool = same or flower_ok
        if not pool:
            continue
        for key in ("updates_per_s", "steady_updates_per_s"):
            best = max(pool, key=lambda f: f.get(key) or 0.0)
            if r.get(key) and best.get(key):
                r[f"ratio_{key}"] = r[key] / best[key]
                r[f"ratio_{key}_vs"] = f"flower@{best['phones']} cpus={best['client_cpus']}"


def main() -> None:
    from bench.common import table, write

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phones", default="100,10000", help="comma-separated phone counts")
    p.add_argument("--rounds", type=int, default=10, help="rounds at phone counts up to --digits-max")
    p.add_argument("--scale-rounds", type=int, default=3, help="rounds above --digits-max phones")
    p.add_argument("--digits-max", type=int, default=100)
    p.add_argument("--client-cpus", default="1.0,0.5", help="Flower client_resources num_cpus settings to try")
    p.add_argument("--scale-client-cpus", default="best",
                   help="Flower settings above --digits-max phones: 'best' (the best steady one so far) or a list")
    p.add_argument("--flower-timeout", type=float, default=900.0, help="seconds per Flower run before it is killed")
    p.add_argument("--out", default="flower", help="results file bench/results/OUT.json")
    p.add_argument("--server-process", default="no,yes",
                   help="fedfleet settings to run: no (server on the fleet's event loop), yes (its own process)")
    p.add_argument("--loops", default="uvloop",
                   help="fedfleet event loops to run: uvloop (its default), asyncio (the standard library's), or both")
    p.add_argument("--skip-flower-above", type=int, default=0, help="do not run Flower above this many phones (0: always)")
    p.add_argument("--workloads", default="",
                   help="mlp,cnn,transfer: the whole-process comparison of bench/flower_workloads.py at 100 phones "
                        "(instead of the --phones scale points); results in bench/results/OUT.json")
    p.add_argument("--train-threads", default="1", help="--workloads: fedfleet --train-threads settings to run")
    p.add_argument("--profile", default="yes", choices=["yes", "no"],
                   help="--workloads: one more fedfleet run per workload under py-spy, CPU by stage")
    args = p.parse_args()
    if args.workloads:
        workloads_main(args)
        return
    phone_counts = [int(x) for x in args.phones.split(",")]
    client_cpus = [float(x) for x in args.client_cpus.split(",")]
    python = ensure_flower_venv()
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    rows: list[dict[str, Any]] = []
    for phones in phone_counts:
        dataset = dataset_for(phones, args.digits_max)
        rounds = args.rounds if phones <= args.digits_max else args.scale_rounds
        npz = work / f"data-{phones}.npz"
        write_npz(npz, dataset, phones, SEED)
        print(f"== {phones} phones, {dataset}, {rounds} rounds", flush=True)
        for loop in args.loops.split(","):
            for sp in args.server_process.split(","):
                ff = run_fedfleet(phones, rounds, dataset, work / f"fedfleet-{phones}-{sp}-{loop}", server_process=sp,
                                  loop=loop)
                rows.append(ff)
                print(f"fedfleet {ff['event_loop']} server_process={sp}: {ff['updates_per_s']:.1f} updates/s "
                      f"(steady {ff['steady_updates_per_s'] or 0:.1f})", flush=True)
        if args.skip_flower_above and phones > args.skip_flower_above:
            rows.append({"system": "flower", "phones": phones, "rounds": rounds, "dataset": dataset,
                         "error": f"not run (--skip-flower-above {args.skip_flower_above})"})
            continue
        for cpus in scale_cpus(rows, args.scale_client_cpus, client_cpus) if phones > args.digits_max else client_cpus:
            fl = run_flower(python, npz, rounds, cpus, args.flower_timeout, work / f"flower-{phones}-{cpus}.log")
            fl.update(phones=phones, dataset=dataset)
            rows.append(fl)
            print(f"flower cpus={cpus}: " + (fl.get("error") or f"{fl['updates_per_s']:.1f} updates/s "
                                             f"(steady {fl['steady_updates_per_s'] or 0:.1f})"), flush=True)
    ratios(rows)
    for r in rows:
        r["setting"] = (f"cpus={r.get('client_cpus', '-')}" if r["system"] == "flower" else
                        f"vmap+http, {r['event_loop']}" + (", server process" if r.get("server_process") else ""))
        r["result"] = r.get("error", "ok")[:40]
    columns = ["system", "setting", "phones", "rounds", "updates", "wall_s", "updates_per_s", "steady_updates_per_s",
               "accuracy", "peak_rss_mb", "ratio_updates_per_s", "ratio_steady_updates_per_s", "result"]
    print()
    print(table(rows, columns))
    for r in rows:
        if r.get("ratio_updates_per_s_vs"):
            print(f"fedfleet@{r['phones']}: ratios against {r['ratio_updates_per_s_vs']} (all rounds), "
                  f"{r.get('ratio_steady_updates_per_s_vs')} (steady)")
    path = write(args.out, {"workload": WORKLOAD, "phones": phone_counts, "rounds": args.rounds,
                            "scale_rounds": args.scale_rounds, "flower_timeout_s": args.flower_timeout,
                            "runs": rows})
    print(f"wrote {path}")


def workloads_main(args: argparse.Namespace) -> None:
    from bench.common import table, write
    from bench.flower_workloads import run_workloads

    python = ensure_flower_venv()
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    result = run_workloads(args.workloads.split(","), python, work, [float(x) for x in args.client_cpus.split(",")],
                           args.server_process.split(","), args.train_threads.split(","), args.flower_timeout,
                           args.profile == "yes")
    columns = ["workload", "system", "setting", "process_s", "first_round_s", "rounds_s", "steady_updates_per_s",
               "accuracy", "train_fraction", "ratio_process", "ratio_steady"]
    print()
    print(table(result["runs"], columns))
    path = write(args.out, {**result, "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
