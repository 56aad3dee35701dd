"""Encode/decode throughput of the update codec on one core, next to a memcpy baseline.

A 1M-parameter float32 update goes through each encoder config; throughput is MB of dense
float32 input per second (1 MB = 10**6 bytes), median of ``--repeats`` runs. The memcpy
baseline (numpy copy of the same 4 MB) is measured in the same run, so the ratios hold on
any machine. Writes bench/results/codec.json.

    .venv/bin/python bench/bench_codec.py [--repeats 15] [--out bench/results/codec.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy loads BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from protocol import EncoderConfig, TensorSpec, UpdateEncoder, decode_message, dense_float32_nbytes  # noqa: E402

SHAPES = {  # 1,000,000 parameters
    "fc1.weight": (768, 1024),
    "fc1.bias": (1024,),
    "fc2.weight": (200, 1024),
    "fc2.bias": (200,),
    "conv.weight": (7544,),
}
META = {"update_id": "bench", "base_version": 0, "num_examples": 64, "train_loss": 0.5, "round": 0}
NOISE = {"clip": 1.0, "noise": "gaussian", "noise_multiplier": 1.0}
CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "int8": {"quant_bits": 8},
    "int8+top10%": {"quant_bits": 8, "sparsify": "topk", "density": 0.1},
    "int4+top1%+EF": {"quant_bits": 4, "sparsify": "topk", "density": 0.01, "error_feedback": True},
}


def timings(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) seconds; the min shows the cost without interference from other
    processes, the median what a busy phone or CI box sees."""
    fn()  # warm-up: first-touch page faults and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def memcpy_mb_s(nbytes: int, repeats: int) -> float:
    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    return nbytes / 1e6 / timings(lambda: np.copyto(dst, src), max(repeats, 50))[0]


def bench_config(
    name: str, settings: dict[str, Any], delta: dict[str, np.ndarray], repeats: int
) -> dict[str, Any]:
    config = EncoderConfig(**settings)
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    specs = {n: TensorSpec(a.shape) for n, a in delta.items()}
    body = encoder.encode(delta, META)
    mb = dense_float32_nbytes(delta) / 1e6
    enc_s, enc_min = timings(lambda: encoder.encode(delta, META), repeats)
    dec_s, dec_min = timings(lambda: decode_message(body, expected=specs, max_bytes=len(body)), repeats)
    return {
        "config": name,
        "settings": settings,
        "wire_bytes": len(body),
        "compression_ratio": dense_float32_nbytes(delta) / len(body),
        "encode_ms": enc_s * 1e3,
        "encode_mb_s": mb / enc_s,
        "decode_ms": dec_s * 1e3,
        "decode_mb_s": mb / dec_s,
        "encode_ms_min": enc_min * 1e3,
        "decode_ms_min": dec_min * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "codec.json")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # pin to one core
    rng = np.random.default_rng(1)
    delta = {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
    memcpy = memcpy_mb_s(dense_float32_nbytes(delta), args.repeats)
    rows = []
    for name, settings in CONFIGS.items():
        for noisy in (False, True):
            label = name + (" +noise" if noisy else "")
            rows.append(bench_config(label, {**settings, **(NOISE if noisy else {})}, delta, args.repeats))
    for row in rows:
        row["encode_vs_memcpy"] = row["encode_mb_s"] / memcpy
        row["decode_vs_memcpy"] = row["decode_mb_s"] / memcpy
    print(
        f"1M float32 params ({dense_float32_nbytes(delta) / 1e6:.1f} MB), one core; memcpy {memcpy:,.0f} MB/s"
    )
    print(
        f"{'config':<22}{'bytes':>10}{'ratio':>7}{'enc ms':>8}{'(min)':>7}{'enc MB/s':>9}{'x memcpy':>9}"
        f"{'dec ms':>8}{'(min)':>7}{'dec MB/s':>9}{'x memcpy':>9}"
    )
    for r in rows:
        print(
            f"{r['config']:<22}{r['wire_bytes']:>10,}{r['compression_ratio']:>7.1f}"
            f"{r['encode_ms']:>8.1f}{r['encode_ms_min']:>7.1f}{r['encode_mb_s']:>9.0f}{r['encode_vs_memcpy']:>9.4f}"
            f"{r['decode_ms']:>8.1f}{r['decode_ms_min']:>7.1f}{r['decode_mb_s']:>9.0f}{r['decode_vs_memcpy']:>9.4f}"
        )
    result = {
        "benchmark": "codec",
        "params": sum(a.size for a in delta.values()),
        "repeats": args.repeats,
        "statistic": "median (and min) of repeats; MB = 1e6 bytes of float32 input",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores_used": 1,
        },
        "memcpy_mb_s": memcpy,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
