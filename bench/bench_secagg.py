"""What secure aggregation costs, per group of 100 and 1,000 phones, on a 20,000-parameter update.

    python -m bench.bench_secagg                 # n = 100 and 1,000, b the smallest >= 12 that fits, z = 1
    python -m bench.bench_secagg --phones 100 --modulus-bits 14   # one group size, a wider field

Every phone of the group runs the protocol's arithmetic (protocol/secagg: keys, Shamir shares,
sealing, masks) in this process, and the server unmasks with 10% of the phones dropped after
their masked upload (their self-mask seeds are rebuilt) ... and, unless ``--drop-after masked``,
that same 10% drops after sharing keys instead (their pairwise masks are removed). No HTTP:
the bytes are the messages' sizes as FORMAT.md section 12 defines them, compared with the same
update as plain dense int8 (fedfleet's codec, quant_bits = 8). ``--density`` sends a shared random
fraction of the coordinates. Writes bench/results/secagg.json (``--out`` names another).

Columns: ``b`` the field's bits per value, ``B`` the per-coordinate bound, ``masked_bytes`` the
masked update (D rotated values of b bits, packed), ``vs_int8`` that over the plain int8 upload of
the same update, ``keys_bytes`` what else a phone uploads (advertise 64 B, k sealed shares of 48 B,
its unmask shares of 16 B each), ``up_bytes`` a phone's upload over all four steps and
``up_vs_int8`` that over the plain int8 upload, ``rel_err`` the L2 error of the unmasked mean against the mean of the phones' clipped
float updates, relative to that mean's norm (noise, rounding and clipping; the phones' updates share a
direction, as gradients of one model do, with a spread of their own), ``central_err`` the same
error expected of central DP's float Gaussian at the same z (z * clip * sqrt(d) / n over the mean's
norm), ``phone_ms`` a phone's CPU time for the protocol (median; integers, noise, keys, shares,
masks), ``unmask_ms`` the server's unmasking of the group. Both are CPU time of this process
(``time.process_time``: the protocol is single-threaded), so other load on the machine does not count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from bench.common import table, write
from fedfleet.protocol import EncoderConfig, UpdateEncoder
from fedfleet.protocol.secagg import SecAggPhone, group_params, unmask_sum
from fedfleet.protocol.secagg.coords import kept, shared_coordinates
from fedfleet.protocol.secagg.crypto import KEY_BYTES
from fedfleet.protocol.secagg.integer import group_rotation, mean_from_sum, pack, to_integers
from fedfleet.protocol.secagg.phone import SEALED_SHARE_BYTES
from fedfleet.protocol.secagg.shamir import SHARE_BYTES

DIM = 20_000
META = {"update_id": "u", "base_version": 0, "num_examples": 32, "train_loss": 1.0, "round": 1}


def clip(x: np.ndarray) -> np.ndarray:
    return x / max(1.0, float(np.linalg.norm(x)))


def int8_bytes(update: np.ndarray) -> int:
    encoder = UpdateEncoder(EncoderConfig(quant_bits=8), np.random.default_rng(0))
    return len(encoder.encode({"w": update.astype(np.float32)}, META))


def run_group(n: int, bits: int, z: float, drop: float, drop_after: str, threshold: float,
              seed: int, density: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    params = group_params(f"bench/{n}", n, kept(DIM, density), clip=1.0, modulus_bits=bits or None,
                          noise_multiplier=z, threshold=threshold, graph_seed=b"bench", full_dim=DIM)
    coords = shared_coordinates(params.graph_seed, params.context, DIM, params.dim)
    common = rng.normal(0, 1 / np.sqrt(DIM), DIM)  # norm about 1: the clip's scale

    def update(i: int) -> np.ndarray:  # phone i's update: the shared direction plus its own
        return common + np.random.default_rng([seed, i, 1]).normal(0, 0.5 / np.sqrt(DIM), DIM)

    cpu: dict[int, float] = {}
    phones = {}
    for i in range(1, n + 1):
        t = time.process_time()
        phones[i] = SecAggPhone(params, i, rng.bytes(32))
        cpu[i] = time.process_time() - t
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {}
    for i, p in phones.items():
        t = time.process_time()
        sealed[i] = p.share_keys(roster)
        cpu[i] += time.process_time() - t
    gone = set(rng.choice(np.arange(1, n + 1), int(drop * n), replace=False).tolist())
    sharers = frozenset(phones)
    uploaders = sharers - gone if drop_after == "share" else sharers
    masked = {}
    for i in sorted(uploaders):
        x = update(i)[coords]
        t = time.process_time()
        values = to_integers(x, params, np.random.default_rng([seed, i]), group_rotation(params))
        masked[i] = phones[i].masked_upload({j: out[i] for j, out in sealed.items() if i in out}, values)
        pack(masked[i], params.modulus_bits)  # the wire bytes
        cpu[i] += time.process_time() - t
    responders = uploaders - gone
    responses = {}
    for i in sorted(responders):
        t = time.process_time()
        responses[i] = phones[i].unmask(uploaders, sharers - uploaders)
        cpu[i] += time.process_time() - t
    t = time.process_time()
    total = unmask_sum(params, roster, sharers, masked, responses)
    mean = mean_from_sum(total, params, len(masked))
    unmask_ms = (time.process_time() - t) * 1e3
    truth = np.mean([clip(update(i)[coords]) for i in sorted(uploaders)], axis=0)
    answered = responses[min(responses)]
    keys = 2 * KEY_BYTES + SEALED_SHARE_BYTES * len(sealed[1]) + SHARE_BYTES * (len(answered.seeds) + len(answered.keys))
    up = keys + params.upload_bytes
    plain = int8_bytes(update(1))
    return {"phones": n, "density": density, "z": z, "degree": params.degree, "t": params.share_threshold,
            "b": params.modulus_bits, "B": params.clip_bound, "dropped": f"{len(gone)} after {drop_after}",
            "masked_bytes": params.upload_bytes, "int8_bytes": plain, "vs_int8": params.upload_bytes / plain,
            "keys_bytes": keys, "up_bytes": up, "up_vs_int8": up / plain,
            "rel_err": float(np.linalg.norm(mean - truth) / np.linalg.norm(truth)),
            "central_err": z * np.sqrt(params.dim) / len(masked) / float(np.linalg.norm(truth)),
            "phone_ms": statistics.median(cpu[i] for i in responders) * 1e3, "unmask_ms": unmask_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--modulus-bits", type=int, nargs="*", default=[0],
                        help="b, bits per masked value (0: the smallest b >= 12 at which the group's sum fits)")
    parser.add_argument("--z", type=float, default=1.0, help="distributed noise multiplier")
    parser.add_argument("--drop", type=float, default=0.1)
    parser.add_argument("--drop-after", nargs="*", default=["masked", "share"])
    parser.add_argument("--threshold", type=float, default=0.55,
                        help="fraction f (t = ceil(f k)); at 2/3 and k = 20, 10%% random drops leave some of 1,000 "
                             "neighbourhoods below t and the group aborts")
    parser.add_argument("--out", default="secagg", help="bench/results/OUT.json")
    parser.add_argument("--density", type=float, nargs="*", default=[1.0],
                        help="shared random-k: the fraction of coordinates each phone sends")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_before = os.getloadavg()  # the machine is shared: say how busy it was (CPU times are this process's)
    rows = [run_group(n, b, args.z, args.drop, when, args.threshold, args.seed, density)
            for n in args.phones for density in args.density for b in args.modulus_bits for when in args.drop_after]
    print(table(rows, ["phones", "density", "degree", "t", "b", "B", "dropped", "masked_bytes", "int8_bytes", "vs_int8",
                       "keys_bytes", "up_bytes", "up_vs_int8", "rel_err", "central_err", "phone_ms", "unmask_ms"]))
    path = write(args.out, {"command": "python -m bench.bench_secagg " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dim": DIM,
        "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
