"""Which of ``fedfleet simulate``'s settings belong to the server, the fleet or the emulated devices:
each one's name as simulate spells it (a flag, a [simulate] key, a SimulateConfig keyword) and the
component field it is. Types, defaults and limits are the component's, declared once there
(ServerConfig, FleetConfig, ProfileSpec); a component setting simulate takes is one line here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.profiles import ProfileSpec
from fedfleet.server.config import ServerConfig

COMPONENTS: dict[str, type] = {"server": ServerConfig, "fleet": FleetConfig, "profile": ProfileSpec}
Target = tuple[str, str]  # (component, field)


def _same(component: str, *names: str) -> dict[str, tuple[Target, ...]]:
    return {name: ((component, name),) for name in names}


ROUTES: dict[str, tuple[Target, ...]] = {
    # the task, its training plan (protocol/plan.py), merging and privacy: ServerConfig
    **_same("server", "model", "init_weights", "loss", "metrics", "rounds", "local_epochs", "batch_size", "lr", "prox_mu",
            "concurrency", "staleness", "max_staleness", "server_optimizer", "server_lr", "robust",
            "epsilon_budget", "central_clip", "central_noise_multiplier", "strategy", "local_state",
            "secure_agg", "secagg_threshold", "secagg_degree", "distributed_noise_multiplier"),
    "sample": (("server", "sample_fraction"),),
    "buffer": (("server", "buffer_size"),),
    "delta": (("server", "dp_delta"),),  # also the codec's delta when its noise is calibrated to --epsilon
    "seed": (("server", "seed"), ("fleet", "seed")),  # one seed: the initial model and every draw of the fleet
    "device": (("server", "device"), ("fleet", "device")),  # evaluation and batched training (docs/accelerators.md)
    # the phones: FleetConfig
    **_same("fleet", "phones", "partition", "quantity_skew", "attack", "attack_fraction", "workers", "trainer",
            "runtime", "hours", "inline_model", "chain_checkin", "start_spread_s", "devices",
            "register_when_active", "register_in_bulk"),
    # --devices default: how the emulated devices are drawn (FleetConfig.profile_spec)
    **_same("profile", "compute_ms", "diurnal", "dropout"),
}


def component_field(name: str) -> dataclasses.Field[Any]:
    """The component field simulate's setting ``name`` is (the first, for the shared seed)."""
    component, field_name = ROUTES[name][0]
    return next(f for f in dataclasses.fields(COMPONENTS[component]) if f.name == field_name)


def field_default(f: dataclasses.Field[Any]) -> Any:
    factory = f.default_factory
    return factory() if callable(factory) else f.default


DEFAULTS: dict[str, Any] = {name: field_default(component_field(name)) for name in ROUTES}


def component_values(settings: Mapping[str, Any], component: str) -> dict[str, Any]:
    """``settings`` (simulate's names) as keyword arguments of ``component``'s config."""
    return {field_name: settings[name] for name, targets in ROUTES.items()
            for comp, field_name in targets if comp == component}


def simulate_name(component: str, field_name: str) -> str | None:
    """Simulate's name of a component field, None when simulate does not take it by a name of its own."""
    return next((name for name, targets in ROUTES.items() if (component, field_name) in targets), None)
