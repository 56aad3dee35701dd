"""/metrics, /v1/dashboard and /v1/events against the real app on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

import tests.conftest
from fedfleet.server.observability import OBS, setup_observability
from tests.conftest import MakeClient, register, update_body

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def make_observed(make_server: MakeClient, monkeypatch: pytest.MonkeyPatch) -> MakeClient:
    """``make_server`` with observability, whether or not make_app already sets it up."""
    make_app = tests.conftest.make_app

    def observed(*args: Any, **kwargs: Any) -> web.Application:
        app = make_app(*args, **kwargs)
        if OBS not in app:
            setup_observability(app)
        return app

    monkeypatch.setattr(tests.conftest, "make_app", observed)
    return make_server


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    families = text_string_to_metric_families(await resp.text())
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_recorded(client: TestClient, rounds: int) -> None:
    for _ in range(200):
        if (await (await client.get("/v1/status")).json())["rounds_recorded"] >= rounds:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"round {rounds} was not recorded")


async def one_round(client: TestClient, phones: list[tuple[str, dict[str, str], dict[str, Any]]],
                    base_version: int = 0) -> int:
    """Every phone checks in and uploads; returns the bytes of the update bodies sent."""
    for _, auth, _ in phones:
        assert (await (await client.post("/v1/checkin", headers=auth)).json())["action"] == "train"
    sent = 0
    for i, (_, auth, task) in enumerate(phones):
        body = update_body(task, update_id=f"v{base_version}-{i}", base_version=base_version)
        sent += len(body)
        assert (await client.post("/v1/update", data=body, headers=auth)).status == 200
    return sent


async def test_metrics_count_requests_bytes_rejections_and_state(make_observed: MakeClient) -> None:
    client = await make_observed(evaluate=True, sample_fraction=1.0)
    before = await scrape(client)
    assert value(before, "fedfleet_model_version") == 0 and value(before, "fedfleet_rounds_recorded_total") == 0
    phones = [await register(client, f"p{i}") for i in range(2)]
    for _, auth, _ in phones:
        await client.post("/v1/checkin", headers=auth)
    mid = await scrape(client)
    assert value(mid, "fedfleet_phones_registered") == 2 and value(mid, "fedfleet_phones_active") == 2
    assert value(mid, "fedfleet_phones_online") == 2
    sent = await one_round(client, phones)
    await wait_recorded(client, 1)
    # Rejections are labelled with the `error` field of the 4xx JSON answer.
    assert (await client.post("/v1/update", data=b"\x00" * 64, headers=phones[0][1])).status == 400
    assert (await client.post("/v1/checkin")).status == 401
    after = await scrape(client)
    assert value(after, "fedfleet_http_requests_total", method="POST", endpoint="/v1/register", status="201") == 2
    assert value(after, "fedfleet_http_requests_total", method="POST", endpoint="/v1/update", status="200") == 2
    assert value(after, "fedfleet_http_request_duration_seconds_count", method="POST", endpoint="/v1/update",
                 status="200") == 2
    assert value(after, "fedfleet_rejected_requests_total", endpoint="/v1/update", reason="malformed") == 1
    assert value(after, "fedfleet_rejected_requests_total", endpoint="/v1/checkin", reason="unauthenticated") == 1
    assert value(after, "fedfleet_http_request_bytes_total", endpoint="/v1/update") == sent + 64
    model = await (await client.get("/v1/model", headers=phones[0][1])).read()
    downloaded = await scrape(client)
    assert value(downloaded, "fedfleet_http_response_bytes_total", endpoint="/v1/model") == len(model)
    assert value(after, "fedfleet_model_version") == 1 and value(after, "fedfleet_rounds_recorded_total") == 1
    assert value(after, "fedfleet_updates_merged_total") == 2 and value(after, "fedfleet_phones_active") == 0
    history = (await (await client.get("/v1/rounds")).json())["rounds"]
    assert value(after, "fedfleet_model_accuracy") == pytest.approx(history[0]["accuracy"])
    # Scrapes count themselves: the earlier three were answered with 200.
    assert value(downloaded, "fedfleet_http_requests_total", method="GET", endpoint="/metrics", status="200") == 3


async def test_unmatched_paths_share_one_label(make_observed: MakeClient) -> None:
    client = await make_observed()
    for path in ("/nope", "/wp-admin", "/v1/nothing"):
        assert (await client.get(path)).status == 404
    samples = await scrape(client)
    assert value(samples, "fedfleet_http_requests_total", method="GET", endpoint="unmatched", status="404") == 3
    assert value(samples, "fedfleet_rejected_requests_total", endpoint="unmatched", reason="http_404") == 3
    for method in ("PROPFIND", "MKCOL", "LOCK"):  # WebDAV and other methods the parser knows share one label value
        assert 400 <= (await client.request(method, "/v1/status")).status < 500
    samples = await scrape(client)
    assert sum(v for (name, labels), v in samples.items()
               if name == "fedfleet_http_requests_total" and dict(labels)["method"] == "other") == 3
    assert not [key for key in samples if dict(key[1]).get("method") in ("PROPFIND", "MKCOL", "LOCK")]


async def test_dashboard_json_matches_status_and_rounds(make_observed: MakeClient) -> None:
    client = await make_observed(evaluate=True, sample_fraction=1.0)
    phones = [await register(client, f"p{i}") for i in range(3)]
    await one_round(client, phones)
    await wait_recorded(client, 1)
    snap = await (await client.get("/v1/dashboard")).json()
    status = await (await client.get("/v1/status")).json()
    rounds = (await (await client.get("/v1/rounds")).json())["rounds"]
    assert snap["version"] == status["version"] == 1 and snap["round"] == status["round"] == 2
    assert snap["records"] == rounds and snap["accuracy"] == rounds[-1]["accuracy"]
    assert snap["phones_registered"] == 3 and snap["phones_online"] == 3
    assert snap["bytes_up"] >= rounds[0]["bytes_up"] > 0
    assert snap["updates_per_s"] == pytest.approx(3 / 10)  # three accepted uploads in the 10 s window
    later = await (await client.get("/v1/dashboard?since=1")).json()
    assert later["records"] == [] and later["since"] == 1


async def next_event(resp: ClientResponse, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
    fields: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the event stream ended"
            if line == "\n":
                return fields["id"], json.loads(fields["data"])
            key, _, val = line.rstrip("\n").partition(": ")
            fields[key] = val


async def test_events_push_a_snapshot_then_each_new_round(make_observed: MakeClient) -> None:
    client = await make_observed(evaluate=True, sample_fraction=1.0)
    phones = [await register(client, f"p{i}") for i in range(2)]
    resp = await client.get("/v1/events")
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    event_id, first = await next_event(resp)
    assert event_id == "0" and first["version"] == 0 and first["records"] == [] and first["since"] == 0
    t0 = time.monotonic()
    _, idle = await next_event(resp)  # the periodic push
    assert idle["version"] == 0 and 0.5 < time.monotonic() - t0 < 3.0
    await one_round(client, phones)
    event_id, snap = await next_event(resp)
    while not snap["records"]:  # a push may land between the merge and its recording
        event_id, snap = await next_event(resp)
    assert event_id == "1" and snap["version"] == 1 and [r["round"] for r in snap["records"]] == [1]
    assert snap["accuracy"] == snap["records"][0]["accuracy"]
    resp.close()
    # A reconnecting browser sends the last id it saw and gets only what it missed.
    again = await client.get("/v1/events", headers={"Last-Event-ID": "1"})
    _, resumed = await next_event(again)
    assert resumed["since"] == 1 and resumed["records"] == [] and resumed["version"] == 1
    again.close()


async def test_shutdown_ends_open_event_streams(make_observed: MakeClient) -> None:
    client = await make_observed()
    resp = await client.get("/v1/events")
    await next_event(resp)
    t0 = time.monotonic()
    await client.server.close()  # runner.cleanup(): must not wait for the stream's own end
    assert time.monotonic() - t0 < 2.0
    async with asyncio.timeout(2.0):
        await resp.content.read()  # returns at EOF instead of hanging
    assert resp.content.at_eof()


async def test_dashboard_page_and_vendored_chart_library_are_served(make_observed: MakeClient) -> None:
    client = await make_observed()
    page = await client.get("/")
    text = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    for asset in ("/static/uPlot.iife.min.js", "/static/uPlot.min.css", "/static/dashboard.js"):
        assert asset in text
        resp = await client.get(asset)
        assert resp.status == 200 and len(await resp.read()) > 1000
    assert "MIT License" in await (await client.get("/static/uPlot.LICENSE")).text()
