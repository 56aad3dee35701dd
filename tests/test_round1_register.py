"""Round 1's registrations made cheaper without changing a byte of what they answer: the task's JSON is
serialised once per server rather than once per phone."""

from __future__ import annotations

import json

from fedfleet.server.http import json_response
from fedfleet.server.routes import task_spec
from fedfleet.server.state import CONFIG, COORD, MODEL_FINGERPRINT
from tests.conftest import MakeClient


async def test_registration_answers_are_the_json_they_were(make_server: MakeClient) -> None:
    """The answer is byte for byte what serialising {"phone_id", "token", "task"} per phone gave."""
    client = await make_server(codec={"quant_bits": 8}, rounds=7)
    app = client.app
    spec = task_spec(app[CONFIG], app[COORD], app[MODEL_FINGERPRINT])
    assert spec["train"]["codec"] == {"quant_bits": 8} and spec["rounds"] == 7
    for name in ("a", "b-2"):
        resp = await client.post("/v1/register", json={"name": name})
        assert resp.status == 201 and resp.content_type == "application/json"
        raw = await resp.read()
        answer = json.loads(raw)
        expected = json_response({"phone_id": name, "token": answer["token"], "task": spec}, status=201)
        assert raw == expected.body
    resp = await client.post("/v1/register", json={})  # a name made by the server
    answer = json.loads(await resp.read())
    assert answer["phone_id"].startswith("phone-") and answer["task"] == spec
    task = await client.get("/v1/task")
    assert await task.read() == json_response(spec).body


async def test_each_server_sends_its_own_task(make_server: MakeClient) -> None:
    one = await make_server(rounds=3)
    other = await make_server(rounds=9, model="cnn")
    for client, rounds, model in ((one, 3, "mlp"), (other, 9, "cnn"), (one, 3, "mlp")):
        task = (await (await client.post("/v1/register", json={})).json())["task"]
        assert (task["rounds"], task["model"]) == (rounds, model)
