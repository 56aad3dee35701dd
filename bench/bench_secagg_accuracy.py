"""Accuracy at equal (epsilon, delta): central DP-FedAvg, secure aggregation with distributed DP,
and local DP, side by side on the same model, data, phones and rounds.

    python -m bench.bench_secagg_accuracy                       # 1,000 phones a round, 10 rounds, z = 1, seeds 0 1
    python -m bench.bench_secagg_accuracy --phones 500 --rounds 20 --seeds 0

The setting: mnist5k's 4,000 training images split over the phones (4 each at 1,000), an MLP
784-25-10 (19,885 parameters, about the 20k of the cost goal), every phone in every round (no
amplification by sampling for any mechanism), one local SGD step per round (DP-FedSGD), each
update clipped to L2 norm ``--clip``, the server adding the mean at learning rate 1.

* central: the server adds N(0, (z C)^2) to the sum of clipped updates (DP-FedAvg, McMahan et
  al. 2018); epsilon from ``protocol.privacy.central_epsilon`` at sampling rate 1.
* distributed: each phone runs the secure-round codec of ``protocol/secagg`` (rotation, scale,
  per-coordinate bound, conditional rounding, discrete Gaussian noise; batched over phones here
  with the module's own functions) and the server rotates the integer sum back
  (``mean_from_sum``). The masks are left out: they cancel exactly (tests/test_secagg_protocol.py).
  The group's noise multiplier is solved so that the per-phone ledger's epsilon (``ledger_release``
  at all phones uploading, composed over the rounds) equals central's.
* local: each phone adds N(0, (z C)^2) to its own clipped update (the same Gaussian release, so the
  same epsilon per phone as central), and the server averages.

Writes bench/results/secagg_accuracy.json.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
from dp_accounting.rdp import RdpAccountant

from bench.common import table, write
from fedfleet.device_runtime.data import load_dataset
from fedfleet.protocol.privacy import Release, central_epsilon, release_event
from fedfleet.protocol.secagg import group_params
from fedfleet.protocol.secagg.dp import ledger_release
from fedfleet.protocol.secagg.integer import (
    discrete_gaussian,
    group_rotation,
    mean_from_sum,
    stochastic_round,
    unflatten,
)
from fedfleet.protocol.secagg.params import GroupParams
from fedfleet.protocol.secagg.rotation import hadamard

HIDDEN = 25
SHAPES = {"w1": (784, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, 10), "b2": (10,)}
DIM = sum(math.prod(s) for s in SHAPES.values())  # 19,885


def unflat(w: np.ndarray) -> dict[str, np.ndarray]:
    return unflatten(w, SHAPES)


def init(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.normal(0, 1 / math.sqrt(784), 784 * HIDDEN), np.zeros(HIDDEN),
                           rng.normal(0, 1 / math.sqrt(HIDDEN), HIDDEN * 10), np.zeros(10)]).astype(np.float32)


def phone_updates(w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float) -> np.ndarray:
    """One SGD step per phone on its own examples: x (n, k, 784), y (n, k) -> updates (n, DIM)."""
    p = unflat(w)
    h = np.maximum(x @ p["w1"] + p["b1"], 0)  # (n, k, H)
    logits = h @ p["w2"] + p["b2"]
    logits -= logits.max(axis=-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=-1, keepdims=True)
    prob[np.arange(y.shape[0])[:, None], np.arange(y.shape[1])[None, :], y] -= 1
    d_logits = prob / y.shape[1]  # (n, k, 10)
    d_h = (d_logits @ p["w2"].T) * (h > 0)
    grads = [np.einsum("nki,nkh->nih", x, d_h).reshape(len(x), -1), d_h.sum(axis=1),
             np.einsum("nkh,nkc->nhc", h, d_logits).reshape(len(x), -1), d_logits.sum(axis=1)]
    return -lr * np.concatenate(grads, axis=1)


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    p = unflat(w)
    logits = np.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    return float(np.mean(logits.argmax(axis=1) == y))


def clip_rows(u: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return u * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def secure_sum(u: np.ndarray, params: GroupParams, rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """The sum of the phones' integers, each as ``integer.to_integers`` makes it (clip, rotate, scale,
    bound, conditionally round, noise), batched over phones."""
    r = group_rotation(params)
    total = np.zeros(params.rotated_dim, dtype=np.int64)
    for at in range(0, len(u), chunk):
        part = clip_rows(u[at : at + chunk].astype(np.float64), params.clip)
        padded = np.zeros((len(part), params.rotated_dim))
        padded[:, : params.dim] = part
        v = np.clip(hadamard((padded * r.signs)[:, r.order], r.blocks) * params.scale,
                    -params.clip_bound, params.clip_bound)
        q = stochastic_round(v.reshape(-1), rng).reshape(v.shape)
        while True:  # conditional rounding: redraw the rows past the sensitivity
            over = np.einsum("ij,ij->i", q, q) > params.sensitivity**2
            if not over.any():
                break
            q[over] = stochastic_round(v[over].reshape(-1), rng).reshape(int(over.sum()), -1)
        q = q + discrete_gaussian(params.noise_sigma, q.size, params.noise_tail, rng).reshape(q.shape)
        total += q.sum(axis=0)
    return total


def ledger_epsilon(release: Release, rounds: int, delta: float) -> float:
    return float(RdpAccountant().compose(release_event(release), rounds).get_epsilon(delta))


def solve_distributed(n: int, clip: float, target: float, rounds: int, delta: float,
                      bits: int | None) -> tuple[GroupParams, float, float]:
    """The group parameters whose per-phone epsilon over ``rounds`` (all n uploading) is ``target``."""
    def eps(z: float) -> tuple[GroupParams, float]:
        p = group_params("bench/round", n, DIM, clip=clip, noise_multiplier=z, modulus_bits=bits)
        return p, ledger_epsilon(ledger_release(p, n), rounds, delta)

    lo, hi = 0.05, 20.0
    for _ in range(40):  # epsilon falls as z grows
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid)[1] > target else (lo, mid)
    return (*eps(hi), hi)


def run(mech: str, args: argparse.Namespace, seed: int, z: float, params: GroupParams | None = None) -> float:
    data = load_dataset("mnist5k", seed=seed)
    rng = np.random.default_rng(seed)
    n, k = args.phones, len(data.x_train) // args.phones
    order = rng.permutation(len(data.x_train))[: n * k]
    x = data.x_train.reshape(len(data.x_train), -1)[order].reshape(n, k, 784)
    y = data.y_train[order].reshape(n, k).astype(np.int64)
    x_test, y_test = data.x_test.reshape(len(data.x_test), -1), data.y_test
    w = init(np.random.default_rng([seed, 1]))
    noise = np.random.default_rng([seed, 2])
    for r in range(args.rounds):
        u = phone_updates(w, x, y, args.lr)
        if mech == "none":
            mean = clip_rows(u, args.clip).mean(axis=0)
        elif mech == "central":
            mean = (clip_rows(u, args.clip).sum(axis=0) + noise.normal(0, z * args.clip, DIM)) / n
        elif mech == "local":
            mean = (clip_rows(u, args.clip) + noise.normal(0, z * args.clip, u.shape)).mean(axis=0)
        else:
            assert params is not None
            p = group_params(f"round/{r}/group/0", n, DIM, clip=args.clip, noise_multiplier=z,
                             modulus_bits=params.modulus_bits, graph_seed=f"bench {seed}".encode())
            mean = mean_from_sum(secure_sum(u, p, noise), p, n)
        w = (w + mean).astype(np.float32)
    return accuracy(w, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--z", type=float, default=1.0, help="central DP's noise multiplier; the others match its epsilon")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--modulus-bits", type=int, nargs="*", default=[0],
                        help="b of the secure groups, one distributed row each (0: the smallest b >= 12 that fits)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--out", default="secagg_accuracy")
    args = parser.parse_args()
    eps = central_epsilon(args.z, 1.0, args.rounds, args.delta)
    columns = ["mechanism", "z", "epsilon", "b", "B", "noise_vs_central", "accuracy_mean", "seconds"]
    rows: list[dict[str, Any]] = []

    def add(mech: str, z: float, epsilon: float | None, params: GroupParams | None = None) -> None:
        t0 = time.perf_counter()
        accs = [run(mech, args, s, z, params) for s in args.seeds]
        rows.append({"mechanism": mech, "z": z, "epsilon": epsilon, "delta": args.delta,
                     "b": params.modulus_bits if params else None, "B": params.clip_bound if params else None,
                     # the sum's noise over central DP's at this epsilon: Delta / (gamma C), all phones uploading
                     "noise_vs_central": z * math.sqrt(args.phones / params.min_survivors) * params.sensitivity
                     / (params.scale * args.clip) / args.z if params else None,
                     "accuracy_mean": float(np.mean(accs)), "accuracy_by_seed": accs,
                     "seconds": time.perf_counter() - t0})
        print(table(rows[-1:], columns), flush=True)

    add("none", 0.0, None)
    add("central", args.z, eps)
    add("local", args.z, eps)
    for bits in args.modulus_bits:
        params, eps_d, z_d = solve_distributed(args.phones, args.clip, eps, args.rounds, args.delta, bits or None)
        add("distributed", z_d, eps_d, params)
    print(table(rows, columns))
    central = next(r for r in rows if r["mechanism"] == "central")["accuracy_mean"]
    for r in rows:
        if r["mechanism"] == "distributed":
            print(f"distributed at b = {r['b']} - central: {100 * (r['accuracy_mean'] - central):+.2f} points")
    path = write(args.out, {"setting": {"dataset": "mnist5k", "model": f"mlp 784-{HIDDEN}-10", "dim": DIM,
                                        "phones": args.phones, "examples_per_phone": 4000 // args.phones,
                                        "rounds": args.rounds, "clip": args.clip, "lr": args.lr,
                                        "local_steps": 1, "sampling": 1.0, "seeds": args.seeds},
                            "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
