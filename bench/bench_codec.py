"""Encode/decode throughput of the update codec on one core, next to a memcpy baseline.

A 1M-parameter float32 update goes through each encoder config; throughput is MB of dense
float32 input per second (1 MB = 10**6 bytes), median of ``--repeats`` runs. The memcpy
baseline (numpy copy of the same 4 MB) is measured in the same run, so the ratios hold on
any machine. Writes bench/results/codec.json.

    .venv/bin/python bench/bench_codec.py [--repeats 15] [--out bench/results/codec.json]

``--breakdown`` instead shows where the bytes of one real update go: the CNN of the accuracy
benchmark is trained on one phone's mnist5k shard (Dirichlet 0.5, 5 local epochs), and its
delta is encoded with each sparse config, with and without ``compress`` (zlib over payload
and header). Every byte of the message is attributed: the fixed container (prefix, payload
length, CRC), the header (meta, each tensor's entry) and, per tensor, index / scales /
codes. Writes bench/results/codec_breakdown.json.

    .venv/bin/python -m bench.bench_codec --breakdown
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy loads BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fedfleet.protocol import EncoderConfig, TensorSpec, UpdateEncoder, decode_message, dense_float32_nbytes  # noqa: E402
from fedfleet.protocol.canonical import canonical_header  # noqa: E402
from fedfleet.protocol.quant import num_chunks, packed_nbytes  # noqa: E402
from fedfleet.protocol.wire import FLAG_ZLIB_HEADER  # noqa: E402

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


BREAKDOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "int4+top1%+EF": {"quant_bits": 4, "sparsify": "topk", "density": 0.01, "error_feedback": True},
    "int4+top2%+EF": {"quant_bits": 4, "sparsify": "topk", "density": 0.02, "error_feedback": True},
    "int4+top3%+EF": {"quant_bits": 4, "sparsify": "topk", "density": 0.03, "error_feedback": True},
    "int8+top10%": {"quant_bits": 8, "sparsify": "topk", "density": 0.1},
}


def trained_cnn_delta(seed: int = 0, phone: int = 3) -> dict[str, np.ndarray]:
    """One phone's real update of the accuracy benchmark's setting (mnist5k, Dirichlet 0.5,
    50 phones, CNN, 5 local epochs, batch 8, lr 0.1), from the initial model."""
    import torch

    from fedfleet.device_runtime.data import load_dataset, partition
    from fedfleet.device_runtime.runtimes import TrainConfig
    from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
    from fedfleet.export.models import ModelSpec, build_model

    torch.set_num_threads(1)
    data = load_dataset("mnist5k", seed=seed)
    shard = partition(data.y_train, 50, "dirichlet:0.5", np.random.default_rng(seed))[phone]
    rt = TorchRuntime(build_model(ModelSpec("cnn", data.input_shape, data.num_classes), seed=seed))
    before = rt.get_params()
    rt.train(data.x_train[shard], data.y_train[shard], TrainConfig(local_epochs=5, batch_size=8, lr=0.1),
             np.random.default_rng(seed))
    return {n: a - before[n] for n, a in rt.get_params().items()}


def byte_breakdown(body: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """Attribute every byte of one encoded update (FORMAT.md sections 1-5)."""
    flags = int.from_bytes(body[6:8], "little")
    header_len = int.from_bytes(body[8:12], "little")
    header = body[12 : 12 + header_len]
    if flags & FLAG_ZLIB_HEADER:
        header = zlib.decompress(header)
    parsed = json.loads(header)
    empty = canonical_header(parsed["kind"], meta, [])
    tensors = []
    for t in parsed["tensors"]:
        entry = canonical_header(parsed["kind"], meta, [t])
        row = {"name": t["name"], "n": math.prod(t["shape"]), "encoding": t["encoding"], "nnz": t.get("nnz"),
               "index_coding": t.get("index"), "header_entry": len(entry) - len(empty), "blob": t["nbytes"]}
        count = t["nnz"] if t["encoding"] == "sparse" else row["n"]
        bits = t.get("bits", 32)
        values = 4 * count if bits == 32 else 4 * num_chunks(count, t["chunk"]) + packed_nbytes(count, bits)
        row["scales"] = 0 if bits == 32 else 4 * num_chunks(count, t["chunk"])
        row["codes"] = values - row["scales"]
        row["index"] = t["nbytes"] - values
        tensors.append(row)
    payload_len = len(body) - 20 - header_len
    return {
        "total": len(body),
        "container_fixed": 20,
        "header_wire": header_len,
        "header_json": len(header),
        "header_meta_and_frame": len(empty),
        "header_entries": sum(r["header_entry"] for r in tensors),
        "payload_wire": payload_len,
        "payload_plain": sum(r["blob"] for r in tensors),
        "index": sum(r["index"] for r in tensors),
        "scales": sum(r["scales"] for r in tensors),
        "codes": sum(r["codes"] for r in tensors),
        "tensors": tensors,
    }


def main_breakdown(out: Path) -> None:
    delta = trained_cnn_delta()
    dense = dense_float32_nbytes(delta)
    meta = {"base_version": 7, "num_examples": 83, "round": 7, "train_loss": 0.12345678901234566,
            "update_id": "phone-31-12"}  # a typical phone's meta (17-digit float loss)
    rows = []
    for name, settings in BREAKDOWN_CONFIGS.items():
        for compress in (False, True):
            body = UpdateEncoder(EncoderConfig(**settings, compress=compress), np.random.default_rng(0)).encode(
                delta, meta)
            b = byte_breakdown(body, meta)
            rows.append({"config": name + (" +zlib" if compress else ""), "ratio": dense / b["total"], **b})
    cols = ["total", "ratio", "container_fixed", "header_wire", "header_json", "header_meta_and_frame",
            "header_entries", "payload_wire", "payload_plain", "index", "scales", "codes"]
    print(f"one real CNN update ({sum(a.size for a in delta.values())} params, dense float32 {dense} bytes); "
          "bytes per part")
    labels = ["total", "ratio", "fixed", "hdr wire", "hdr json", "hdr meta", "hdr ents", "pay wire", "pay raw",
              "index", "scales", "codes"]  # hdr meta: meta + the header's frame; hdr ents: tensor entries
    print(f"{'config':<22}" + "".join(f"{c:>9}" for c in labels))
    for r in rows:
        print(f"{r['config']:<22}" + "".join(
            f"{r[c]:>9.1f}" if isinstance(r[c], float) else f"{r[c]:>9}" for c in cols))
    print("\nper tensor, int4+top2%+EF (plain):")
    print(f"{'tensor':<14}{'n':>7}{'nnz':>6}{'coding':>8}{'hdr entry':>10}{'index':>7}{'scales':>7}{'codes':>7}")
    for t in rows[2]["tensors"]:
        print(f"{t['name']:<14}{t['n']:>7}{t['nnz']:>6}{t['index_coding']:>8}{t['header_entry']:>10}"
              f"{t['index']:>7}{t['scales']:>7}{t['codes']:>7}")
    result = {"benchmark": "codec_breakdown", "params": sum(a.size for a in delta.values()), "dense_bytes": dense,
              "meta": meta, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--breakdown", action="store_true", help="where the bytes of one real CNN update go")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    if args.breakdown:
        main_breakdown(args.out or results / "codec_breakdown.json")
        return
    args.out = args.out or results / "codec.json"
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
