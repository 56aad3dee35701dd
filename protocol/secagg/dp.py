"""Distributed DP: the privacy of the group's sum when each of n phones adds discrete
Gaussian noise N_Z(0, sigma**2) to its integer update.

Kairouz, Liu and Steinke, 2021 ("The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", Theorem 1): the sum satisfies (eps**2 / 2)-concentrated
DP (zCDP) with eps = min(sqrt(D2**2 / (n sigma**2) + tau d / 2), D1 / (sqrt(n) sigma) +
tau sqrt(d)), tau = 10 * sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k + 1)), for an update
of L2 sensitivity D2 and L1 sensitivity D1 <= sqrt(d) D2 in d dimensions.

The round is one ``dp_accounting.ZCDpEvent(rho)``; composing rounds and converting to
(epsilon, delta) is ``dp_accounting``'s RDP accountant (zCDP of rho is RDP of order a
at a * rho). No amplification by sampling is claimed: a phone's epsilon composes the
rounds it took part in.
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedfleet.protocol.secagg.params import GroupParams


def distributed_rho(sigma: float, survivors: int, sensitivity: float, dim: int) -> float:
    """zCDP rho of one sum of ``survivors`` phones' noise, each N_Z(0, sigma**2)."""
    if sigma < 0.5 or survivors < 1 or sensitivity <= 0 or dim < 1:
        raise ValueError("need sigma >= 1/2, survivors >= 1, sensitivity > 0, dim >= 1")
    tau = 10.0 * sum(
        math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, survivors)
    )
    n_sigma2 = survivors * sigma * sigma
    eps_l2 = math.sqrt(sensitivity**2 / n_sigma2 + tau * dim / 2.0)
    eps_l1 = math.sqrt(dim) * sensitivity / math.sqrt(n_sigma2) + tau * math.sqrt(dim)
    return min(eps_l2, eps_l1) ** 2 / 2.0


def round_event(params: GroupParams) -> dp_accounting.DpEvent:
    """One secure round's privacy, at the fewest survivors the group may unmask."""
    return dp_accounting.ZCDpEvent(
        distributed_rho(params.noise_sigma, params.min_survivors, params.sensitivity, params.rotated_dim)
    )


def ledger_release(params: GroupParams, uploads: int) -> Any:
    """One secure round as a ``protocol.privacy.Release`` for the per-phone ledger: the Gaussian
    mechanism with z = 1 / sqrt(2 rho), whose RDP (alpha / (2 z**2) = alpha * rho at every order)
    is exactly that of rho-zCDP, so the ledger composes it with local releases unchanged. rho is
    that of the sum actually unmasked: ``uploads`` phones' noise (those that dropped after their
    masked upload included), at least min_survivors by construction."""
    from fedfleet.protocol.privacy import Release

    rho = distributed_rho(params.noise_sigma, uploads, params.sensitivity, params.rotated_dim)
    return Release("gaussian", 1.0 / math.sqrt(2.0 * rho))


def distributed_epsilon(params: GroupParams, rounds: int, delta: float) -> float:
    """epsilon at ``delta`` of a phone that took part in ``rounds`` secure rounds."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if rounds <= 0:
        return 0.0
    return float(RdpAccountant().compose(round_event(params), rounds).get_epsilon(delta))
