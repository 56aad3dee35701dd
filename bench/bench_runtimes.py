"""Per-step time and peak memory of each training runtime next to eager PyTorch.

Every (model, runtime, batch) runs in its own subprocess, so the peak resident set size
(which sees native allocations that tracemalloc cannot) belongs to that runtime alone:
``peak MB`` is the whole process (``ru_maxrss``: interpreter, imports, data, runtime);
``runtime MB`` is the peak after the imports and data were loaded, above the RSS at that
point (Linux: the high-water mark is reset through ``/proc/self/clear_refs``). Each process
uses one thread (one phone core). Also reports export time and bundle size per model.

    python bench/bench_runtimes.py [--dataset mnist5k] [--steps 30] [--models mlp cnn mobilenet]

Writes ``bench/results/runtimes.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedfleet.device_runtime.runtimes import RUNTIME_NAMES

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = RUNTIME_NAMES
BATCHES = (16, 32)
WARMUP_STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def worker(bundle: Path, runtime: str, batch: int, steps: int, dataset: str) -> dict[str, float]:
    """Runs in the subprocess: load the runtime, time ``steps`` SGD steps, report memory."""
    import numpy as np

    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.device_runtime.runtimes.base import TrainConfig
    from fedfleet.device_runtime.runtimes.loader import load_runtime

    if runtime == "torch":
        import torch

        torch.set_num_threads(1)
    if runtime == "executorch":
        from fedfleet.device_runtime.runtimes.executorch_runtime import set_threads

        set_threads(1)
    data = load_dataset(dataset)
    x, y = data.x_train[: batch * steps], data.y_train[: batch * steps]
    rss_before = _reset_peak_rss()
    start = time.perf_counter()
    rt = load_runtime(runtime, bundle)
    load_s = time.perf_counter() - start
    cfg = TrainConfig(local_epochs=1, batch_size=batch, lr=0.01)
    rt.train(x[: batch * WARMUP_STEPS], y[: batch * WARMUP_STEPS], cfg, np.random.default_rng(0))
    start = time.perf_counter()
    result = rt.train(x, y, cfg, np.random.default_rng(1))
    step_ms = 1000 * (time.perf_counter() - start) / result.steps
    return {
        "step_ms": step_ms,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "runtime_peak_mb": _status_mb("VmHWM") - rss_before,
    }


def _reset_peak_rss() -> float:
    """Reset the process's RSS high-water mark (VmHWM) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def export(model: str, dataset: str, out: Path) -> dict[str, object]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "fedfleet.export.cli", "--model", model, "--dataset", dataset, "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {name: info["size"] for name, info in manifest["artifacts"].items() if info["available"]}
    return {
        "export_s": elapsed,
        "bytes": sizes,
        "pte_backend": manifest["artifacts"]["model.pte"].get("backend"),
    }


def measure(bundle: Path, runtime: str, batch: int, steps: int, dataset: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", str(bundle), runtime, str(batch), str(steps), dataset]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        bundle, runtime, batch, steps, dataset = sys.argv[2:7]
        print(json.dumps(worker(Path(bundle), runtime, int(batch), int(steps), dataset)))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "mobilenet"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtimes.json")
    args = parser.parse_args()
    # other work on the machine inflates every figure: keep the load average with the results
    results: dict[str, object] = {
        "dataset": args.dataset,
        "steps": args.steps,
        "threads": 1,
        "cpus": os.cpu_count(),
        "loadavg_1m_start": os.getloadavg()[0],
        "models": {},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            bundle = Path(tmp) / model
            info = export(model, args.dataset, bundle)
            runs = {
                f"{runtime}/b{batch}": measure(bundle, runtime, batch, args.steps, args.dataset)
                for batch in BATCHES
                for runtime in RUNTIMES
            }
            results["models"][model] = {**info, "runs": runs}  # type: ignore[index]
            for key, run in runs.items():
                rows.append((model, *key.split("/b"), run))
            print(
                f"{model}: export {info['export_s']:.1f}s, bytes {info['bytes']}, pte {info['pte_backend']}"
            )
    print(
        f"\n{'model':10s} {'runtime':11s} {'batch':>5s} {'step ms':>8s} {'load s':>7s} {'peak MB':>8s} {'runtime MB':>10s}"
    )
    for model, runtime, batch, run in rows:
        print(
            f"{model:10s} {runtime:11s} {batch:>5s} {run['step_ms']:8.2f} {run['load_s']:7.2f} "
            f"{run['peak_rss_mb']:8.0f} {run['runtime_peak_mb']:10.1f}"
        )
    results["loadavg_1m_end"] = os.getloadavg()[0]
    print(
        f"load average (1 min) {results['loadavg_1m_start']:.1f} at start, {results['loadavg_1m_end']:.1f} at end"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
