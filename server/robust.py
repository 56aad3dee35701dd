"""Byzantine-robust aggregation: pure numpy functions over a cohort of update deltas.

A rule (``parse_rule``) is zero or more norm bounds (Sun et al. 2019), then one combiner: the
weighted mean, the coordinate-wise median or trimmed mean (Yin et al. 2018), or Multi-Krum
(Blanchard et al. 2017). Weights (staleness x capped examples) enter the mean and the mean of
Krum's selection; median and trimmed mean ignore them, as in Yin et al. (a weight is a claim).
The numpy building blocks (norms, cosines, coordinate-wise statistics, Krum's scores) are in
server/robust_math.py.

Every step has a default that needs no knowledge of how many phones attack (the knobs):

- ``normbound`` = ``normbound:median*2``: clip to twice the cohort's median norm. Honest IID
  updates rarely exceed 1.5x the median, and a bound relative to the cohort follows the norms
  down as training converges, which a constant bound cannot.
- ``trimmed`` = ``trimmed:0.25``: drop the 25% largest and 25% smallest values per coordinate.
  It tolerates up to a quarter of the cohort attacking; a sampled cohort drawn from a fleet
  with 20% attackers often holds more than 20% of them, hence the margin.
- ``krum`` / ``multikrum`` = ``krum:25%`` / ``multikrum:25%``: assume f = 25% of each merge's
  updates attack, capped at Krum's limit f <= (n - 3) / 2, so the rule runs at any cohort size
  (3 or more updates) and follows a changing cohort (sampling, async buffers). ``multikrum``
  averages the n - f best-scored updates.

The report names suspects by four tests: a robust z-score of the log-norm above ``z_threshold``
(``norm_z``, on every rule), clipping (``clipped``), a mostly trimmed update (``trimmed``), not
selected by Krum (``krum``), and a direction far from the cohort's (``direction``: the cosine to
the rule's aggregate has a robust z-score below -``z_threshold``, e.g. sign-flipped or noise
updates whose norm looks honest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.server.aggregation import Params, weighted_mean
from fedfleet.server.robust_math import (
    Deltas,
    clip_factors,
    coordinate_median,
    cosines,
    gram_matrix,
    krum_scores,
    multi_krum_select,
    pairwise_sq_distances,
    robust_z,
    trimmed_mean,
    update_norms,
)

Weights = Sequence[float] | np.ndarray
DEFAULT_NORM_FACTOR = 2.0  # ``normbound``: clip at this multiple of the cohort's median norm
DEFAULT_TRIM = 0.25  # ``trimmed``: beta, the share trimmed from each end per coordinate
DEFAULT_KRUM_SHARE = 0.25  # ``krum`` / ``multikrum``: f as a share of each merge's updates


@dataclass(frozen=True)
class Suspect:
    """One update a rule found suspicious. ``value``: robust z-score (``norm_z``), L2 norm before
    clipping (``clipped``), share of coordinates trimmed (``trimmed``), Krum score (``krum``),
    cosine to the aggregate (``direction``)."""

    index: int
    reason: str
    value: float


@dataclass(frozen=True)
class RobustReport:
    """What a merge found: suspected outliers by cohort index, the clip bound, any fallback."""

    rule: str
    updates: int
    suspects: tuple[Suspect, ...] = ()
    bound: float | None = None  # the last norm bound applied (absolute, after "median*k")
    fallback: str | None = None  # set when the combiner could not run and another stood in
    krum_f: int | None = None  # the f Krum assumed in this merge (resolved from a share like 25%)

    def to_dict(self, labels: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready, for a round record's ``extra``; ``labels`` name updates (e.g. phone ids)."""
        return {
            "rule": self.rule, "updates": self.updates, "bound": self.bound, "fallback": self.fallback,
            "krum_f": self.krum_f,
            "suspects": [{"update": labels[s.index] if labels is not None else s.index,
                          "reason": s.reason, "value": float(f"{s.value:.6g}")} for s in self.suspects],
        }


# --- the rule: bounds, then one combiner ----------------------------------------------------------
def _scaled_mean(deltas: Deltas, weights: np.ndarray, scales: np.ndarray, idx: np.ndarray) -> Params:
    """sum_{i in idx} w_i s_i u_i / sum_{i in idx} w_i: the weighted mean of the clipped updates."""
    coef = weights[idx] * scales[idx]
    if not coef.sum() > 0:  # every weighted update was clipped to zero
        return {n: np.zeros(np.shape(v)) for n, v in deltas[0].items()}
    mean = weighted_mean([(deltas[i], c) for i, c in zip(idx.tolist(), coef.tolist(), strict=True)])
    ratio = coef.sum() / weights[idx].sum()
    return mean if ratio == 1.0 else {n: v * ratio for n, v in mean.items()}


Outcome = tuple[Params, list[Suspect], str | None]  # aggregate, suspects, fallback


@dataclass(frozen=True)
class NormBound:
    """Clip each norm to ``bound``, or to ``bound`` x the cohort's median norm if ``relative``."""

    bound: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (np.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"the norm bound should be a positive finite value, got {self.bound}")

    def resolve(self, norms: np.ndarray) -> float:
        return float(self.bound * np.median(norms)) if self.relative else self.bound


@dataclass(frozen=True)
class Mean:
    """FedAvg of the (clipped) updates, with their weights."""
    def __call__(self, deltas: Deltas, weights: np.ndarray, scales: np.ndarray) -> Outcome:
        return _scaled_mean(deltas, weights, scales, np.arange(len(deltas))), [], None


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median; weights ignored."""
    def __call__(self, deltas: Deltas, weights: np.ndarray, scales: np.ndarray) -> Outcome:
        return coordinate_median(deltas, scales), [], None


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise beta-trimmed mean, unweighted after trimming. An update is suspect when
    its trimmed share passes halfway between the share expected by chance (2k/n) and 1."""

    beta: float

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"the trim fraction beta should be in [0, 0.5), got {self.beta}")

    def __call__(self, deltas: Deltas, weights: np.ndarray, scales: np.ndarray) -> Outcome:
        out, share = trimmed_mean(deltas, self.beta, scales)
        n, k = len(deltas), int(self.beta * len(deltas))
        limit = (2 * k / n + 1) / 2
        return out, [Suspect(i, "trimmed", float(v)) for i, v in enumerate(share) if k and v > limit], None


@dataclass(frozen=True)
class MultiKrum:
    """Select m updates by Krum score with f assumed attackers, then take their weighted mean.
    f is a count, or with ``share`` set, ``min(floor(share x n), (n - 3) // 2)`` of each merge's
    n updates. With n <= 2f + 2 updates Krum is undefined: this merge falls back to the
    coordinate-wise median, said in the report's ``fallback`` (set sync ``min_updates`` / async
    ``buffer_size`` to at least ``min_updates`` to never fall back)."""

    f: int
    m: int | None = 1  # None: n - f
    share: float | None = None  # f as a share of the updates merged (overrides ``f``)

    def __post_init__(self) -> None:
        if self.f < 0 or (self.m is not None and self.m < 1):
            raise ValueError(f"Krum needs f >= 0 attackers and m >= 1 selected, got f={self.f}, m={self.m}")
        if self.share is not None and not 0 <= self.share < 0.5:
            raise ValueError(f"Krum's share of attackers should be in [0%, 50%), got {self.share:.0%}")

    def f_for(self, n: int) -> int:
        """The f this merge of n updates assumes."""
        if self.share is None:
            return self.f
        return max(0, min(int(self.share * n), (n - 3) // 2))

    def __call__(self, deltas: Deltas, weights: np.ndarray, scales: np.ndarray) -> Outcome:
        f = self.f_for(len(deltas))
        if len(deltas) <= 2 * f + 2:
            note = f"median: krum:{f} needs {2 * f + 3} updates, got {len(deltas)}"
            return coordinate_median(deltas, scales), [], note
        dist = pairwise_sq_distances(gram_matrix(deltas, scales))
        scores, chosen = krum_scores(dist, f), multi_krum_select(dist, f, self.m)
        dropped = sorted(set(range(len(deltas))) - set(chosen.tolist()))
        suspects = [Suspect(i, "krum", float(scores[i])) for i in dropped]
        return _scaled_mean(deltas, weights, scales, chosen), suspects, None


Combiner = Mean | Median | TrimmedMean | MultiKrum


@dataclass(frozen=True)
class RobustRule:
    """``bounds`` applied in order, then ``combine``; ``rule.aggregate(deltas, weights)``."""

    bounds: tuple[NormBound, ...] = ()
    combine: Combiner = field(default_factory=Mean)
    z_threshold: float = 3.5  # a log-norm with robust z-score above this is reported ("norm_z"); Iglewicz & Hoaglin's cut-off
    text: str = "none"

    @property
    def min_updates(self) -> int:
        """Fewest updates the combiner runs with as configured (Krum: 2f + 3, or 3 with f a
        share), else 1."""
        if not isinstance(self.combine, MultiKrum):
            return 1
        return 3 if self.combine.share is not None else 2 * self.combine.f + 3

    def aggregate(self, deltas: Deltas, weights: Weights, norms: np.ndarray | None = None) -> tuple[Params, RobustReport]:
        """The robust aggregate (float64, like ``weighted_mean``) and the report of suspects;
        ``norms``: the updates' ``update_norms`` when the caller has them already."""
        w = np.asarray(weights, dtype=np.float64)
        if not deltas or len(w) != len(deltas):
            raise ValueError(f"need updates and one weight each, got {len(deltas)} and {len(w)} weights")
        if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
            raise ValueError("aggregation weights must be finite, non-negative and sum to a positive number")
        norms = update_norms(deltas) if norms is None else np.asarray(norms, dtype=np.float64)
        if len(norms) != len(deltas):
            raise ValueError(f"need one norm per update, got {len(norms)} for {len(deltas)} updates")
        # Honest norms are right-skewed (roughly log-normal): a z-score of the norms themselves
        # named ~1 honest phone in 70 per merge; on the log scale the tail is symmetric.
        z = robust_z(np.log(np.maximum(norms, np.finfo(np.float64).tiny)))
        suspects = [Suspect(int(i), "norm_z", float(z[i])) for i in np.flatnonzero(z > self.z_threshold)]
        scales, bound = np.ones(len(deltas)), None
        for nb in self.bounds:
            bound = nb.resolve(norms * scales)
            factors = clip_factors(norms * scales, bound)
            suspects += [Suspect(int(i), "clipped", float(norms[i])) for i in np.flatnonzero(factors < 1)]
            scales = scales * factors
        out, more, fallback = self.combine(deltas, w, scales)
        cos = cosines(deltas, out, norms)
        z_cos = robust_z(cos)
        suspects += [Suspect(int(i), "direction", float(cos[i])) for i in np.flatnonzero(z_cos < -self.z_threshold)]
        krum_f = self.combine.f_for(len(deltas)) if isinstance(self.combine, MultiKrum) and not fallback else None
        return out, RobustReport(self.text, len(deltas), tuple(suspects + more), bound, fallback, krum_f)

    __call__ = aggregate


def parse_rule(text: str, z_threshold: float = 3.5) -> RobustRule:
    """``none`` | steps joined by ``+``: ``normbound[:C | :median*K]`` (any number, first), then at
    most one of ``median``, ``trimmed[:BETA]``, ``krum[:F | :P%]``, ``multikrum[:F | :P%][:M]``
    (M omitted: n - F; P%: F is P% of each merge's updates). A step without its argument takes
    the default in the module docstring. E.g. ``normbound+trimmed``,
    ``normbound:median*3+trimmed:0.1``, ``multikrum:20%``. Raises ValueError naming the bad step."""
    steps = [s.strip() for s in text.strip().lower().split("+")]
    bounds: list[NormBound] = []
    combine: Combiner | None = None
    for step in steps:
        kind, _, arg = step.partition(":")
        if combine is not None or (step == "none" and len(steps) > 1):
            raise ValueError(f"robust rule {text!r}: {step!r} must come alone or as the last step")
        if step == "none":
            continue
        try:
            if step == "normbound":
                bounds.append(NormBound(DEFAULT_NORM_FACTOR, relative=True))
            elif kind == "normbound" and arg.startswith("median"):
                factor = arg.removeprefix("median").removeprefix("*")
                bounds.append(NormBound(float(factor or 1), relative=True))
            elif kind == "normbound" and arg:
                bounds.append(NormBound(float(arg)))
            elif step == "median":
                combine = Median()
            elif step == "trimmed":
                combine = TrimmedMean(DEFAULT_TRIM)
            elif kind == "trimmed" and arg:
                combine = TrimmedMean(float(arg))
            elif step in ("krum", "multikrum") or (kind in ("krum", "multikrum") and arg):
                f, _, m = arg.partition(":")
                if (step != kind and not f) or (kind == "krum" and m):
                    raise ValueError("krum takes F or P%, multikrum F or P% and optionally M")
                combine = _krum(f, 1 if kind == "krum" else int(m) if m else None)
            else:
                raise ValueError("unknown step")
        except ValueError as exc:
            raise ValueError(f"robust rule {text!r}, step {step!r}: {exc}; use none, normbound[:C], "
                             "normbound:median*K, median, trimmed[:BETA], krum[:F|:P%] or multikrum[:F|:P%][:M]") from None
    return RobustRule(tuple(bounds), combine or Mean(), z_threshold, text.strip())


def _krum(f: str, m: int | None) -> MultiKrum:
    """Krum's f from ``F`` (a count), ``P%`` (a share of each merge) or nothing (the default share)."""
    if not f:
        return MultiKrum(0, m, DEFAULT_KRUM_SHARE)
    if f.endswith("%"):
        share = float(f[:-1]) / 100
        if not np.isfinite(share):
            raise ValueError(f"Krum's share should be a finite percentage, got {f!r}")
        return MultiKrum(0, m, share)
    return MultiKrum(int(f), m)
