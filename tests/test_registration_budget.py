"""Registration has its own budget per address (server/ratelimit.py), through the real server on
loopback: every registration costs a token, so fresh identities (each with a fresh per-phone failure
budget) run out; 429 + Retry-After past it; trusted networks (loopback by default) have none, so an
emulated fleet registers its thousands from 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from fedfleet.server.config import ServerConfig
from tests.conftest import MakeClient

BUDGET = {"ratelimit_peer_header": "X-Forwarded-For", "register_burst": 3, "register_rate_per_s": 0.01}


async def _register(client: Any, name: str, address: str | None = None) -> Any:
    headers = {"X-Forwarded-For": address} if address else {}
    return await client.post("/v1/register", json={"name": name}, headers=headers)


async def test_an_address_runs_out_of_registrations_and_gets_429(make_server: MakeClient) -> None:
    client = await make_server(**BUDGET)
    attacker = "203.0.113.7"
    assert (await _register(client, "bad name!", attacker)).status == 400  # a failed registration costs too
    for i in range(2):
        assert (await _register(client, f"sybil-{i}", attacker)).status == 201
    refused = await _register(client, "sybil-2", attacker)
    body = await refused.json()
    assert refused.status == 429 and body["error"] == "registration_rate_limited", body
    assert 1 <= int(refused.headers["Retry-After"]) <= 100
    assert (await _register(client, "honest", "198.51.100.1")).status == 201  # another address: its own budget
    for i in range(200):  # loopback is trusted: the emulator's fleets register without a budget
        assert (await _register(client, f"fleet-{i}")).status == 201


async def test_the_trusted_networks_are_configurable(make_server: MakeClient) -> None:
    client = await make_server(**BUDGET, register_trusted=["203.0.113.0/24"])
    for i in range(10):
        assert (await _register(client, f"campus-{i}", "203.0.113.9")).status == 201
    for i in range(3):
        assert (await _register(client, f"local-{i}")).status == 201  # loopback no longer trusted here
    assert (await _register(client, "local-3")).status == 429


@pytest.mark.parametrize("bad", [{"register_trusted": ["10.0.0.0/33"]}, {"register_trusted": "10.0.0.0/8"},
                                 {"register_burst": -1}, {"register_rate_per_s": 0.0}])
def test_bad_registration_budget_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="register_"):
        ServerConfig(**bad)
