"""The built-in strategies against the merge they replaced, bit for bit, and the seam's own checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedfleet.server.aggregation import example_weight
from fedfleet.server.config import ServerConfig
from fedfleet.server.optimizers import ServerOptimizer
from fedfleet.server.privacy import central_dp_mean
from fedfleet.server.robust import parse_rule
from fedfleet.server.staleness import parse_staleness
from fedfleet.server.strategies import CentralDP, FedAvg, config_strategy
from fedfleet.server.strategy import (
    MergeContext,
    MergeResult,
    Params,
    Strategy,
    StrategyError,
    Update,
    check_result,
)

SHAPES = {"fc1.weight": (6, 4), "fc1.bias": (6,), "fc2.weight": (3, 6)}


def old_merge(cfg: ServerConfig, params: Params, state: Params, updates: list[Update],
              weight: Callable[[int], float], version: int) -> tuple[Params, Params, dict[str, Any]]:
    """The merge as Coordinator._publish computed it before strategies, written out as the oracle."""
    optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum, cfg.server_beta1,
                                cfg.server_beta2, cfg.server_tau)
    extra: dict[str, Any] = {}
    if cfg.central_noise_multiplier > 0:
        rng = np.random.default_rng([cfg.seed, version])
        pseudo_grad = central_dp_mean([u.delta for u in updates], cfg.central_clip, cfg.central_noise_multiplier, rng)
    else:
        examples = [example_weight(u.num_examples, cfg.example_cap) for u in updates]
        weights = [weight(u.staleness) * e for u, e in zip(updates, examples, strict=True)]
        norm = sum(examples)
        norms = [u.norm for u in updates]
        mean, report = parse_rule(cfg.robust).aggregate([u.delta for u in updates], weights,
                                                        None if None in norms else np.array(norms, dtype=np.float64))
        scale = sum(weights) / norm
        pseudo_grad = {n: v * scale for n, v in mean.items()}
        extra = {"robust": report.to_dict([u.phone for u in updates]),
                 "robust_suspects": len({s.index for s in report.suspects})}
    new_params, new_state = optimizer.step(params, pseudo_grad, state)
    return new_params, new_state, extra


def _updates(rng: np.random.Generator, n: int, weight: Callable[[int], float], cap: int,
             with_norms: bool) -> list[Update]:
    out = []
    for i in range(n):
        delta = {k: (rng.normal(size=s) * (30.0 if i == 0 else 1.0)).astype(np.float32) for k, s in SHAPES.items()}
        examples, staleness = int(rng.integers(1, 400)), int(rng.integers(0, 4))
        norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
        e = example_weight(examples, cap)
        out.append(Update(delta, examples, e, weight(staleness) * e, staleness, norm if with_norms else None, f"p{i}"))
    return out


CASES = [
    dict(),
    dict(server_optimizer="fedavgm", server_lr=0.5, example_cap=100),
    dict(server_optimizer="fedadam", server_lr=0.03, robust="normbound+trimmed"),
    dict(server_optimizer="fedyogi", robust="multikrum:2", mode="async", buffer_size=9, staleness="poly:0.5"),
    dict(robust="median", mode="async", buffer_size=9, staleness="hinge:2:1"),
    dict(robust="normbound:median*3+krum:25%"),
    dict(central_clip=0.5, central_noise_multiplier=1.3, seed=7),
    dict(central_clip=2.0, central_noise_multiplier=0.7, server_optimizer="fedadam", server_lr=0.1),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_builtin_strategies_equal_the_old_merge_bit_for_bit(settings: dict[str, Any]) -> None:
    cfg = ServerConfig(model="mlp", **settings)
    weight = parse_staleness(cfg.staleness) if cfg.mode == "async" else (lambda s: 1.0)
    strategy = config_strategy(cfg)
    rng = np.random.default_rng(len(str(settings)))
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    ours: tuple[Params, Params] = (params, {})
    theirs: tuple[Params, Params] = (params, {})
    for version in range(3):  # three merges: optimizer moments carried from one to the next
        updates = _updates(rng, 9, weight, cfg.example_cap, with_norms=version != 1)
        got = strategy.aggregate(ours[0], ours[1], updates, MergeContext(version, cfg.mode, cfg.seed))
        want = old_merge(cfg, theirs[0], theirs[1], updates, weight, version)
        assert got.metrics == want[2]
        for mine, old in ((got.params, want[0]), (got.state, want[1])):
            assert sorted(mine) == sorted(old)
            for name in old:
                assert mine[name].dtype == old[name].dtype and mine[name].tobytes() == old[name].tobytes(), name
        ours, theirs = (got.params, got.state), (want[0], want[1])
    assert isinstance(strategy, CentralDP) == (cfg.central_noise_multiplier > 0)


def test_central_dp_is_a_wrapper_around_any_strategy() -> None:
    class Record(Strategy):
        def __init__(self) -> None:
            self.seen: list[Update] = []

        def aggregate(self, params: Params, state: Params, updates: Any, ctx: MergeContext) -> MergeResult:
            self.seen = list(updates)
            return MergeResult({n: p + updates[0].delta[n].astype(p.dtype) for n, p in params.items()})

    inner = Record()
    dp = CentralDP(inner, clip=1.0, noise_multiplier=0.5)
    rng = np.random.default_rng(3)
    params = {"w": np.zeros(4, dtype=np.float32)}
    updates = [Update({"w": rng.normal(size=4).astype(np.float32) * 5}, 10, 10.0, 10.0, 0, None, f"p{i}")
               for i in range(5)]
    ctx = MergeContext(4, "sync", 11)
    out = dp.aggregate(params, {}, updates, ctx)
    want = central_dp_mean([u.delta for u in updates], 1.0, 0.5, np.random.default_rng([11, 4]))
    assert len(inner.seen) == 1 and inner.seen[0].weight == 1.0 and inner.seen[0].num_examples == 50
    np.testing.assert_array_equal(inner.seen[0].delta["w"], want["w"])
    np.testing.assert_array_equal(out.params["w"], want["w"].astype(np.float32))
    assert dp.name == "CentralDP(Record)"
    with pytest.raises(ValueError, match="clipping norm"):
        CentralDP(inner, clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="needs 5"):  # Krum cannot merge the one noised mean
        CentralDP(FedAvg(rule=parse_rule("krum:1")), clip=1.0, noise_multiplier=1.0)


def test_a_result_the_server_cannot_publish_is_named() -> None:
    strategy = FedAvg()
    params = {"w": np.zeros((2, 3), dtype=np.float32)}
    with pytest.raises(StrategyError, match="not a MergeResult"):
        check_result(strategy, params, params)
    with pytest.raises(StrategyError, match=r"named \['v'\]"):
        check_result(strategy, params, MergeResult({"v": params["w"]}))
    with pytest.raises(StrategyError, match=r"float64 \(2, 3\), expected float32"):
        check_result(strategy, params, MergeResult({"w": np.zeros((2, 3))}))
    with pytest.raises(StrategyError, match="state m is list"):
        check_result(strategy, params, MergeResult(params, {"m": [1.0]}))  # type: ignore[dict-item]


def test_a_strategy_object_in_the_config_replaces_the_builtin_merge() -> None:
    keep = FedAvg(ServerOptimizer("fedadam", lr=0.01))
    assert config_strategy(ServerConfig(strategy=keep)) is keep
    with pytest.raises(ValueError, match="leave server_optimizer, robust at the default"):
        ServerConfig(strategy=keep, server_optimizer="fedadam", robust="median")
    with pytest.raises(ValueError, match="needs buffer_size >= 5"):
        ServerConfig(strategy=FedAvg(rule=parse_rule("krum:1")), mode="async", buffer_size=4)
    with pytest.raises(ValueError, match="must be a Strategy object or 'MODULE:ATTR'"):
        ServerConfig(strategy=5)  # type: ignore[arg-type]
    wrapped = config_strategy(ServerConfig(strategy=keep, central_clip=1.0, central_noise_multiplier=1.0))
    assert isinstance(wrapped, CentralDP) and wrapped.inner is keep
