"""The privacy ledger and central accounting agree with dp_accounting's own answers."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedfleet.protocol import EncoderConfig, UpdateEncoder
from fedfleet.protocol.privacy import (
    PrivacyLedger,
    Release,
    calibrate_noise_multiplier,
    central_epsilon,
    local_epsilon,
)

DELTA = 1e-5
GAUSS = Release("gaussian", 1.1)
LAPLACE = Release("laplace", 2.0)


def oracle(events: list[tuple[dp_accounting.DpEvent, int]], delta: float = DELTA) -> float:
    accountant = RdpAccountant()
    for event, count in events:
        accountant.compose(event, count)
    return accountant.get_epsilon(delta)


def test_gaussian_ledger_matches_dp_accounting() -> None:
    ledger = PrivacyLedger(DELTA)
    for _ in range(30):
        ledger.charge("phone-a", GAUSS)
    assert ledger.releases("phone-a") == {GAUSS: 30}
    assert ledger.epsilon("phone-a") == pytest.approx(
        oracle([(dp_accounting.GaussianDpEvent(1.1), 30)]), rel=1e-12
    )


def test_mixed_releases_match_dp_accounting() -> None:
    ledger = PrivacyLedger(DELTA)
    ledger.charge("p", GAUSS, count=5)
    ledger.charge("p", LAPLACE, count=3)
    expected = oracle([(dp_accounting.GaussianDpEvent(1.1), 5), (dp_accounting.LaplaceDpEvent(2.0), 3)])
    assert ledger.epsilon("p") == pytest.approx(expected, rel=1e-12)


def test_replace_one_doubles_the_sensitivity() -> None:
    ledger = PrivacyLedger(DELTA, neighboring="replace")
    ledger.charge("p", GAUSS, count=4)
    assert ledger.epsilon("p") == pytest.approx(oracle([(dp_accounting.GaussianDpEvent(0.55), 4)]), rel=1e-12)
    assert ledger.epsilon("p") > local_epsilon({GAUSS: 4}, DELTA)


def test_summary_over_phones() -> None:
    ledger = PrivacyLedger(DELTA)
    for phone, count in {"a": 1, "b": 4, "c": 9}.items():
        ledger.charge(phone, GAUSS, count)
    eps = {p: oracle([(dp_accounting.GaussianDpEvent(1.1), c)]) for p, c in {"a": 1, "b": 4, "c": 9}.items()}
    summary = ledger.summary()
    assert summary.phones == 3
    assert summary.max_epsilon == pytest.approx(eps["c"], rel=1e-12)
    assert summary.median_epsilon == pytest.approx(eps["b"], rel=1e-12)
    assert PrivacyLedger(DELTA).summary().phones == 0
    assert ledger.epsilon("never-seen") == 0.0


def test_can_participate_stops_a_spent_phone() -> None:
    ledger = PrivacyLedger(DELTA)
    budget = oracle([(dp_accounting.GaussianDpEvent(1.1), 3)]) * (1 + 1e-9)
    for _ in range(3):
        assert ledger.can_participate("p", budget, GAUSS)
        ledger.charge("p", GAUSS)
    assert not ledger.can_participate("p", budget, GAUSS)  # a fourth would overspend
    assert ledger.can_participate("p", budget)  # ...but epsilon so far is still under budget
    ledger.charge("p", GAUSS)
    assert not ledger.can_participate("p", budget)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
@pytest.mark.parametrize(("epsilon", "releases"), [(0.5, 1), (2.0, 1), (4.0, 20)])
def test_calibration_hits_the_target(mechanism: str, epsilon: float, releases: int) -> None:
    z = calibrate_noise_multiplier(mechanism, epsilon, DELTA, releases=releases)  # type: ignore[arg-type]
    got = local_epsilon({Release(mechanism, z): releases}, DELTA)  # type: ignore[arg-type]
    assert got <= epsilon * (1 + 1e-4) and got == pytest.approx(epsilon, rel=1e-3)


def test_encoder_release_charges_the_calibrated_epsilon() -> None:
    config = EncoderConfig(clip=1.0, noise="gaussian", epsilon=1.5, delta=DELTA)
    encoder = UpdateEncoder(config, np.random.default_rng(0))
    release = encoder.release()
    assert release is not None
    ledger = PrivacyLedger(DELTA)
    ledger.charge("p", release)
    assert ledger.epsilon("p") == pytest.approx(1.5, rel=1e-3)


def test_central_epsilon_matches_poisson_sampled_gaussian() -> None:
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))
    assert central_epsilon(1.0, 0.01, 1000, DELTA) == pytest.approx(oracle([(event, 1000)]), rel=1e-12)
    assert central_epsilon(1.0, 0.01, 2000, DELTA) > central_epsilon(1.0, 0.01, 1000, DELTA)
    assert central_epsilon(1.0, 0.01, 0, DELTA) == 0.0


def test_ledger_round_trips_through_json() -> None:
    ledger = PrivacyLedger(DELTA, neighboring="replace")
    ledger.charge("a", GAUSS, 2)
    ledger.charge("a", LAPLACE)
    ledger.charge("b", GAUSS)
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again.epsilons() == ledger.epsilons() and again.releases("a") == ledger.releases("a")


@pytest.mark.parametrize(
    "bad",
    [
        lambda: PrivacyLedger(0.0),
        lambda: PrivacyLedger(DELTA, neighboring="swap"),  # type: ignore[arg-type]
        lambda: Release("gaussian", 0.0),
        lambda: Release("uniform", 1.0),  # type: ignore[arg-type]
        lambda: PrivacyLedger(DELTA).charge("p", GAUSS, 0),
        lambda: central_epsilon(1.0, 1.5, 10, DELTA),
        lambda: calibrate_noise_multiplier("gaussian", -1.0, DELTA),
    ],
)
def test_invalid_arguments(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]
