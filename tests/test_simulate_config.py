"""SimulateConfig is made of the server's and the fleet's own configs: each setting is declared once,
and the names of the on-device runtimes come from one tuple."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from fedfleet.cli import build_parser
from fedfleet.device_runtime.data import Dataset
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.profiles import ProfileSpec
from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.server.config import ServerConfig
from fedfleet.simulate_config import SimulateConfig, merge_config
from fedfleet.simulate_routes import ROUTES, component_field, field_default


def _choices(command: str, dest: str) -> tuple[str, ...]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if a.dest == dest)
    return tuple(action.choices or ())


def test_every_runtime_name_is_taken_and_no_other() -> None:
    for command in ("simulate", "fleet", "phone"):
        assert _choices(command, "runtime") == RUNTIME_NAMES
    for name in RUNTIME_NAMES:
        assert FleetConfig(runtime=name).runtime == SimulateConfig(runtime=name).runtime == name
    with pytest.raises(ValueError, match="runtime must be one of " + ", ".join(RUNTIME_NAMES)):
        FleetConfig(runtime="tflite")
    with pytest.raises(ValueError, match=r"runtime \(--runtime\) must be one of " + ", ".join(RUNTIME_NAMES)):
        SimulateConfig(runtime="tflite")


# SimulateConfig's own fields that share a component field's name: the run widens them (mode adds gossip,
# whose relay graph is topology; outside gossip mode the server has no topology).
WIDENED = {"mode", "topology"}


def _component_names() -> set[str]:
    names = {f.name for config in (ServerConfig, FleetConfig, ProfileSpec) for f in dataclasses.fields(config)}
    return names | set(ROUTES)  # and simulate's own spellings of them (sample, buffer, delta)


def test_no_setting_of_the_server_or_fleet_is_declared_again() -> None:
    own = {f.name for f in dataclasses.fields(SimulateConfig)} - {"server", "settings"}
    assert own & _component_names() == WIDENED
    cfg = SimulateConfig()
    for name in ROUTES:  # each is the component's field: its default is the component's
        assert getattr(cfg, name) == field_default(component_field(name)), name


def _data() -> Dataset:
    x = np.zeros((4, 1, 8, 8), np.float32)
    y = np.arange(4, dtype=np.int64)
    return Dataset("zeros", x, y, x, y, 10)


def test_every_setting_reaches_the_component_it_belongs_to() -> None:
    cfg = SimulateConfig(phones=7, sample=0.9, buffer=3, delta=1e-6, seed=4, compute_ms=9.0, dropout=0.1, lr=0.2,
                         runtime="onnx", mode="async", robust="median", devices="default", trainer="pool")
    server, fleet = cfg.server_config(_data(), None), cfg.fleet_config()
    built = {"server": server, "fleet": fleet, "profile": fleet.profile_spec}
    for name, targets in ROUTES.items():
        for component, field_name in targets:
            assert getattr(built[component], field_name) == getattr(cfg, name), name
    assert (server.sample_fraction, server.buffer_size, server.dp_delta, server.seed, fleet.seed) == (0.9, 3, 1e-6, 4, 4)
    assert (fleet.phones, fleet.runtime, fleet.profile_spec.compute_ms, fleet.profile_spec.dropout) == (7, "onnx", 9.0, 0.1)


def test_settings_are_keywords_attributes_and_replaceable_and_stay_checked() -> None:
    cfg = SimulateConfig(phones=7, out="runs/x", server={"min_cohort": 2})
    again = cfg.replace(rounds=3)
    assert (again.phones, again.rounds, again.out, again.server) == (7, 3, "runs/x", {"min_cohort": 2})
    assert dataclasses.replace(cfg, rounds=3) == again  # type: ignore[call-arg]  # mypy sees only declared fields
    assert again.to_dict()["phones"] == 7 and again.to_dict()["server"] == {"min_cohort": 2}
    with pytest.raises(ValueError, match=r"^phones \(--phones\) must be at least 1, got 0$"):
        cfg.replace(phones=0)
    with pytest.raises(ValueError, match=r"^sample \(--sample\) must be a number, got 'half'$"):
        SimulateConfig(sample="half")
    with pytest.raises(TypeError, match="unknown settings: sample_fraction"):
        SimulateConfig(sample_fraction=0.5)  # the server's name of --sample
    with pytest.raises(ValueError, match="unknown settings: phonez"):
        merge_config({"phonez": 3}, {})
