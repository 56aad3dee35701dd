"""SimulateConfig is made of the server's and the fleet's own configs: each setting is declared once,
and the names of the on-device runtimes come from one tuple."""

from __future__ import annotations

import argparse

import pytest

from fedfleet.cli import build_parser
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.simulate_config import SimulateConfig


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
