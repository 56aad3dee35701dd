"""Privacy on the server: the per-phone ledger of local-DP releases, and central DP.

Local DP: phones noise their own updates with the task's codec; every accepted update is
one release charged to that phone in ``protocol.privacy.PrivacyLedger`` (dp_accounting's
RDP accountant). Central DP (DP-FedAvg, McMahan et al. 2018): the server clips every
update to S, sums, adds N(0, (zS)^2) and divides by the number of updates; its epsilon
is accounted under the cohort sampling rate with the Poisson-subsampled Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedfleet.protocol import EncoderConfig
from fedfleet.protocol.codec.encoder import resolve_noise_multiplier

Params = dict[str, np.ndarray]


def task_release(codec: dict[str, Any]) -> Any:
    """The ``Release`` one update of this task costs, or None when the codec adds no noise."""
    cfg = EncoderConfig.from_mapping(codec)
    z = resolve_noise_multiplier(cfg)
    if cfg.noise is None or z is None:
        return None
    from fedfleet.protocol.privacy import Release

    return Release(cfg.noise, z)


def central_dp_mean(deltas: Sequence[Params], clip: float, noise_multiplier: float,
                    rng: np.random.Generator) -> Params:
    """(sum_i clip_S(delta_i) + N(0, (z S)^2)) / n, in float64. Pure: the noise comes from ``rng``."""
    if not deltas:
        raise ValueError("central DP needs at least one update")
    total: Params = {n: np.zeros(np.shape(v), dtype=np.float64) for n, v in deltas[0].items()}
    for delta in deltas:
        norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for n, v in delta.items():
            total[n] += scale * np.asarray(v, dtype=np.float64)
    sigma = noise_multiplier * clip
    return {n: (v + rng.normal(0.0, sigma, size=v.shape)) / len(deltas) for n, v in total.items()}
