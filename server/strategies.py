"""The built-in strategies, and the strategy a ServerConfig names.

``FedAvg`` is the weighted mean of the updates (through a Byzantine-robust rule, server/robust.py)
stepped by a server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi; server/optimizers.py).
``CentralDP`` wraps another strategy (DP-FedAvg, McMahan et al. 2018): it hands the inner strategy
one update, the noised mean of the clipped updates, so the privacy guarantee holds whatever the
inner strategy does with it. A user's own strategy comes in as a ``Strategy`` object or as
``MODULE:ATTR`` (``load_strategy``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfleet.server.optimizers import ServerOptimizer
from fedfleet.server.privacy import central_dp_mean
from fedfleet.server.robust import RobustRule, parse_rule
from fedfleet.server.strategy import MergeContext, MergeResult, Params, Strategy, Update

if TYPE_CHECKING:
    from fedfleet.server.config import ServerConfig


@dataclass(frozen=True)
class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017) and its server optimizers (Reddi et al. 2021), through a robust rule.

    The pseudo-gradient is ``rule``'s aggregate of the deltas with their weights (staleness x capped
    examples), scaled by sum(weights) / sum(examples): below 1 when stale updates were down-weighted
    (FedBuff, Nguyen et al. 2022). ``optimizer`` then steps the parameters with it; its moments are
    the strategy's state. The round record gets the rule's report (``robust``, ``robust_suspects``).
    E.g. ``FedAvg(ServerOptimizer("fedadam", lr=0.03), parse_rule("normbound+trimmed"))``."""

    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    rule: RobustRule = field(default_factory=lambda: parse_rule("none"))

    @property
    def min_updates(self) -> int:
        return self.rule.min_updates

    @property
    def name(self) -> str:
        return self.optimizer.name

    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        examples = [u.examples for u in updates]
        weights = [u.weight for u in updates]
        norms = [u.norm for u in updates]
        mean, report = self.rule.aggregate([u.delta for u in updates], weights,
                                           None if None in norms else np.array(norms, dtype=np.float64))
        scale = sum(weights) / sum(examples)  # < 1 when stale updates were down-weighted (FedBuff)
        pseudo_grad = {n: v * scale for n, v in mean.items()}
        new_params, new_state = self.optimizer.step(params, pseudo_grad, state)
        metrics = {"robust": report.to_dict([u.phone for u in updates]),
                   "robust_suspects": len({s.index for s in report.suspects})}
        return MergeResult(new_params, new_state, metrics)


@dataclass(frozen=True)
class CentralDP(Strategy):
    """Central differential privacy around ``inner`` (DP-FedAvg, McMahan et al. 2018): every update
    clipped to L2 norm ``clip``, summed, N(0, (noise_multiplier x clip)^2) added, divided by the
    number of updates (equal weights: a weight would be a phone's claim the noise does not cover).
    The inner strategy merges that one noised mean as a single update of weight 1 (its server
    optimizer steps with it); what it reports about a one-update cohort is not recorded. The noise
    comes from the merge's seeded generator (``MergeContext.rng``)."""

    inner: Strategy
    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"central DP: the clipping norm should be a positive value, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"central DP: the noise multiplier should be positive, got {self.noise_multiplier}")
        if self.inner.min_updates > 1:
            raise ValueError(f"central DP hands {self.inner.name} one update (the noised mean); "
                             f"it needs {self.inner.min_updates}")

    @property
    def name(self) -> str:
        return f"CentralDP({self.inner.name})"

    def aggregate(self, params: Params, state: Params, updates: Sequence[Update], ctx: MergeContext) -> MergeResult:
        noised = central_dp_mean([u.delta for u in updates], self.clip, self.noise_multiplier, ctx.rng())
        total = sum(u.num_examples for u in updates)
        one = Update(noised, total, examples=1.0, weight=1.0, staleness=0, norm=None, phone="central-dp")
        merged = self.inner.aggregate(params, state, [one], ctx)
        return MergeResult(merged.params, merged.state, {})


def builtin_strategy(config: ServerConfig) -> Strategy:
    """FedAvg with the config's server optimizer and robust rule."""
    optimizer = ServerOptimizer(config.server_optimizer, config.server_lr, config.server_momentum,
                                config.server_beta1, config.server_beta2, config.server_tau)
    return FedAvg(optimizer, parse_rule(config.robust))


def config_strategy(config: ServerConfig) -> Strategy:
    """The strategy ``config`` describes: its ``strategy`` (a Strategy, or MODULE:ATTR) or the built-in
    FedAvg, wrapped in CentralDP when ``central_noise_multiplier`` > 0."""
    given = config.strategy
    if given is None:
        strategy = builtin_strategy(config)
    elif isinstance(given, Strategy):
        strategy = given
    else:
        strategy = load_strategy(given)
    if config.central_noise_multiplier > 0:
        strategy = CentralDP(strategy, config.central_clip, config.central_noise_multiplier)
    return strategy


def load_strategy(spec: str) -> Strategy:
    """The Strategy ``MODULE:ATTR`` names: a Strategy object, or a class or function that makes one
    when called without arguments. The module is imported as Python imports any module (its folder
    must be on ``sys.path``, e.g. through PYTHONPATH). Raises ValueError saying what is wrong."""
    module_name, sep, attr = spec.partition(":")
    where = f"strategy {spec!r}"
    if not (sep and module_name and attr):
        raise ValueError(f"{where}: give MODULE:ATTR, e.g. my_strategies:Median")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module, whatever it raises while importing
        raise ValueError(f"{where}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                         "is its folder on PYTHONPATH?") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if isinstance(obj, Strategy):
        return obj
    if not callable(obj):
        raise ValueError(f"{where}: {attr} is a {type(obj).__name__}, not a Strategy")
    if isinstance(obj, type) and not issubclass(obj, Strategy):
        raise ValueError(f"{where}: {attr} is a class that is not a Strategy subclass "
                         "(fedfleet.server.strategy.Strategy)")
    try:
        made = obj()
    except TypeError as exc:
        raise ValueError(f"{where}: calling {attr}() failed ({exc}); give a Strategy object or a "
                         "class or function taking no arguments") from None
    if not isinstance(made, Strategy):
        raise ValueError(f"{where}: {attr}() returned a {type(made).__name__}, not a Strategy")
    return made
