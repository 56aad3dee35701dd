"""Pure gossip arithmetic: numpy in, numpy out; no clock, network or logging (docs/gossip.md).

D-PSGD (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized Algorithms?"):
each phone trains locally, then replaces its model by a weighted average with its neighbours'
(``mix``). CHOCO-SGD (Koloskova et al. 2019, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication", Algorithm 2): each phone keeps a public copy x_hat of
its own model and of each neighbour's, sends only a compressed q = Q(x - x_hat), adds every q it
sends or receives to the matching copy, and moves by gamma * sum_j w_ij (x_hat_j - x_hat_i)
(``choco_mix``).

A neighbour whose message did not come (it was away) is left out and its weight goes to the
phone itself: the matrix stays symmetric and doubly stochastic over the phones that took part,
so the average of the models is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# the task codec's settings D-PSGD's models take: quantization and zlib (no sparsification)
MODEL_CODEC = ("quant_bits", "stochastic_rounding", "chunk", "quant_scale", "compress")

Params = dict[str, np.ndarray]


def mix(own: Mapping[str, np.ndarray], received: Mapping[int, Mapping[str, np.ndarray]],
        weights: Mapping[int, float]) -> Params:
    """x_i + sum_{j received} w_ij (x_j - x_i), in float64, returned in the parameters' dtype.
    ``weights``: w_ij of every neighbour j (those missing from ``received`` count as x_j = x_i)."""
    out: Params = {}
    for name, x in own.items():
        acc = np.asarray(x, dtype=np.float64).copy()
        for j in sorted(received):
            acc += weights[j] * (np.asarray(received[j][name], dtype=np.float64) - x)
        out[name] = acc.astype(np.asarray(x).dtype)
    return out


def choco_mix(own: Mapping[str, np.ndarray], own_hat: Mapping[str, np.ndarray],
              hats: Mapping[int, Mapping[str, np.ndarray]], weights: Mapping[int, float], gamma: float) -> Params:
    """CHOCO's consensus step: x_i + gamma * sum_{j in hats} w_ij (x_hat_j - x_hat_i)."""
    out: Params = {}
    for name, x in own.items():
        step = np.zeros(np.shape(x), dtype=np.float64)
        for j in sorted(hats):
            step += weights[j] * (np.asarray(hats[j][name], dtype=np.float64) - own_hat[name])
        out[name] = (np.asarray(x, dtype=np.float64) + gamma * step).astype(np.asarray(x).dtype)
    return out


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Params:
    """a + b, in a's dtype (a copy of x_hat plus a received q)."""
    return {n: (np.asarray(a[n], dtype=np.float64) + b[n]).astype(np.asarray(a[n]).dtype) for n in a}


def average(models: Sequence[Mapping[str, np.ndarray]]) -> Params:
    """The plain mean of the phones' models (float64 accumulation, float32 out)."""
    if not models:
        raise ValueError("cannot average zero models")
    return {n: np.mean([np.asarray(m[n], dtype=np.float64) for m in models], axis=0).astype(np.float32)
            for n in models[0]}


def consensus_distance(models: Sequence[Mapping[str, np.ndarray]]) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over all parameters: 0 when every phone holds the same model."""
    if not models:
        raise ValueError("no models")
    total = 0.0
    for name in models[0]:
        stack = np.stack([np.asarray(m[name], dtype=np.float64) for m in models])
        total += float(((stack - stack.mean(axis=0)) ** 2).sum())
    return total / len(models)


def admm_center(own: Mapping[str, np.ndarray], heard: Mapping[int, Mapping[str, np.ndarray]],
                dual: Mapping[str, np.ndarray], rho: float) -> Params:
    """Decentralized consensus ADMM (Shi et al. 2014, "On the Linear Convergence of the ADMM in
    Decentralized Consensus Optimization"), the x-update

        argmin_x f_i(x) + <a_i, x> + rho * sum_{j in N_i} ||x - (x_i + x_j) / 2||^2

    is  argmin_x f_i(x) + (mu / 2) ||x - c||^2  with mu = 2 rho d_i and
    c = mean_j (x_i + x_j) / 2 - a_i / (2 rho d_i): FedProx's local problem around c, which is
    returned (float64). ``heard``: the neighbours' latest models (d_i = their count, >= 1)."""
    d = len(heard)
    out: Params = {}
    for name, x in own.items():
        mean = np.mean([np.asarray(heard[j][name], dtype=np.float64) for j in sorted(heard)], axis=0)
        out[name] = (np.asarray(x, dtype=np.float64) + mean) / 2 - np.asarray(dual[name]) / (2 * rho * d)
    return out


def admm_dual(dual: Mapping[str, np.ndarray], own: Mapping[str, np.ndarray],
              heard: Mapping[int, Mapping[str, np.ndarray]], rho: float) -> Params:
    """ADMM's dual ascent: a_i + rho * sum_j (x_i - x_j) over the neighbours heard from (float64)."""
    out: Params = {}
    for name, a in dual.items():
        x = np.asarray(own[name], dtype=np.float64)
        out[name] = np.asarray(a, dtype=np.float64) + rho * sum(x - np.asarray(heard[j][name], dtype=np.float64)
                                                                 for j in sorted(heard))
    return out
