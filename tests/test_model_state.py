"""Batch norm statistics as federated state: the merge against a numpy oracle, and both treatments
(merged and shipped; kept on the phone, FedBN) through the real server over loopback."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.runtimes.base import TrainConfig
from fedfleet.device_runtime.runtimes.torch_runtime import TorchRuntime
from fedfleet.device_runtime.trainer import BatchedTrainer
from fedfleet.export.model_state import initial_state
from fedfleet.protocol import EncoderConfig, UpdateEncoder, decode_message, encode_message
from fedfleet.protocol.state import STATE_PREFIX, split_state, with_state
from fedfleet.server.app import make_app
from fedfleet.server.config import ServerConfig
from fedfleet.server.model_state import merge_state
from fedfleet.server.state import COORD
from fedfleet.server.store import Store
from tests.test_batched_state import BNDropoutCNN


def oracle(states: list[dict[str, np.ndarray]], examples: list[int]) -> dict[str, np.ndarray]:
    """np.average over the phones, weighted by examples; counters rounded."""
    out = {}
    for n in states[0]:
        mean = np.average(np.stack([s[n].astype(np.float64) for s in states]), axis=0, weights=examples)
        out[n] = np.rint(mean).astype(states[0][n].dtype) if states[0][n].dtype.kind == "i" else mean
    return out


def random_states(rng: np.random.Generator, k: int) -> list[dict[str, np.ndarray]]:
    return [{"bn.running_mean": rng.normal(size=4).astype(np.float32),
             "bn.running_var": rng.random(4).astype(np.float32) + 0.5,
             "bn.num_batches_tracked": np.array(rng.integers(0, 50), dtype=np.int64)} for _ in range(k)]


def test_merge_is_the_example_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    states, examples = random_states(rng, 5), [3, 10, 1, 40, 7]
    current = random_states(rng, 1)[0]
    got = merge_state(current, list(zip(states, examples, strict=True)))
    want = oracle(states, examples)
    for n in want:
        assert got[n].dtype == current[n].dtype
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6)
    # Reports without state or without examples take no part; none at all keep the state.
    got = merge_state(current, [(states[0], 3), ({}, 100), (states[1], 0), (states[2], 1)])
    np.testing.assert_allclose(got["bn.running_mean"], oracle([states[0], states[2]], [3, 1])["bn.running_mean"],
                               rtol=1e-6)
    kept = merge_state(current, [({}, 5)])
    assert all(np.array_equal(kept[n], current[n]) for n in current)


def seeded_config(tmp_path: Path, model: torch.nn.Module, **overrides: Any) -> ServerConfig:
    """A server whose version 0 is ``model``'s parameters and state, resumed from its data dir."""
    cfg = ServerConfig(model="mlp", input_shape=(1, 8, 8), num_classes=10, round_timeout_s=30.0,
                       data_dir=str(tmp_path), **overrides)
    store = Store(tmp_path / "server.sqlite")
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    store.set_meta("model_spec", json.dumps({"model": cfg.model, "input_shape": list(cfg.input_shape),
                                             "classes": cfg.num_classes}))
    store.save_version(0, encode_message("model", {"version": 0}, with_state(params, initial_state(model))))
    store.close()
    return cfg


@pytest.mark.parametrize("local", [False, True])
async def test_server_merges_reported_state_as_the_oracle(aiohttp_client: Any, tmp_path: Path, local: bool) -> None:
    """Raw uploads carrying known statistics: the next model ships their weighted mean (default),
    or ships none while the server evaluates with that mean (--local-state)."""
    torch.manual_seed(0)
    model = BNDropoutCNN()
    client = await aiohttp_client(make_app(seeded_config(tmp_path, model, sample_fraction=1.0, min_cohort=3,
                                                         local_state=local)))
    phones = []
    for i in range(3):
        body = await (await client.post("/v1/register", json={"name": f"p{i}"})).json()
        phones.append(({"Authorization": f"Bearer {body['token']}"}, body["task"]))
    task = phones[0][1]
    assert task["state_mode"] == ("local" if local else "shared")
    assert {s["name"] for s in task["state"]} == set(initial_state(model))
    first = decode_message(await (await client.get("/v1/model", headers=phones[0][0])).read()).tensors
    assert any(n.startswith(STATE_PREFIX) for n in first) is not local
    rng = np.random.default_rng(1)
    start = initial_state(model)
    states = [{n: (rng.normal(size=v.shape) + 1).astype(v.dtype) if v.dtype.kind == "f"
               else np.array(rng.integers(0, 30), np.int64) for n, v in start.items()} for _ in phones]
    examples = [10, 30, 60]
    for i, ((auth, task), state, n) in enumerate(zip(phones, states, examples, strict=True)):
        await client.post("/v1/checkin", headers=auth)
        delta = {p["name"]: np.full(p["shape"], 0.01, np.float32) for p in task["params"]}
        body = UpdateEncoder(EncoderConfig(), np.random.default_rng(i)).encode(
            delta, {"update_id": "u", "base_version": 0, "num_examples": n, "train_loss": 1.0, "round": 1}, state=state)
        resp = await client.post("/v1/update", data=body, headers=auth)
        assert resp.status == 200, await resp.text()
    want = oracle(states, examples)
    coord = client.server.app[COORD]
    assert coord.version == 1
    for name in want:
        np.testing.assert_allclose(coord.state[name], want[name], rtol=1e-6, err_msg=name)
    after = decode_message(await (await client.get("/v1/model", headers=phones[0][0])).read()).tensors
    params, shipped = split_state(after)
    if local:
        assert shipped == {}
    else:
        for name in want:
            np.testing.assert_allclose(shipped[name], want[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(params["fc2.bias"] - first["fc2.bias"], 0.01, rtol=1e-4)  # the state moved no parameter


async def test_an_update_without_the_models_state_is_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    client = await aiohttp_client(make_app(seeded_config(tmp_path, BNDropoutCNN(), sample_fraction=1.0)))
    body = await (await client.post("/v1/register", json={"name": "p"})).json()
    auth, task = {"Authorization": f"Bearer {body['token']}"}, body["task"]
    await client.post("/v1/checkin", headers=auth)
    delta = {p["name"]: np.zeros(p["shape"], np.float32) for p in task["params"]}
    resp = await client.post("/v1/update", headers=auth, data=encode_message(
        "update", {"update_id": "u", "base_version": 0, "num_examples": 5, "train_loss": 1.0, "round": 1}, delta))
    assert resp.status == 400 and "state:bn1.running_mean" in (await resp.json())["message"]


@pytest.mark.parametrize("local", [False, True])
async def test_phones_train_and_federate_state_over_loopback(aiohttp_client: Any, tmp_path: Path, digits: Any,
                                                             local: bool) -> None:
    """Real phones (batched trainer) on a BN + Dropout CNN, one round. Default: each phone starts from
    the shipped state and the server's state is the oracle mean of what eager training of each phone
    gives. FedBN: each phone keeps what its training left, and the server's state is their mean."""
    torch.manual_seed(0)
    model = BNDropoutCNN(0.2)
    client = await aiohttp_client(make_app(seeded_config(tmp_path, model, sample_fraction=1.0, min_cohort=5, rounds=1,
                                                         local_epochs=1, local_state=local)))
    url = str(client.make_url("")).rstrip("/")
    sizes = [24, 40, 16, 34, 50]
    cuts = np.cumsum([0, *sizes])
    data = [(digits.x_train[a:b], digits.y_train[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    trainer = BatchedTrainer(model, quiet_s=0.005)
    reference = TorchRuntime(copy.deepcopy(model))
    start_params = reference.get_params()
    async with aiohttp.ClientSession() as session:
        phones = [PhoneClient(session, url, f"p{i}", d, trainer, np.random.default_rng([9, i]), sign=False,
                              chain_checkin=False) for i, d in enumerate(data)]
        rngs = [copy.deepcopy(p.rng) for p in phones]
        for p in phones:
            await p.register()
        try:
            await asyncio.wait_for(asyncio.gather(*[p.run() for p in phones]), 60)
        finally:
            trainer.close()
    assert trainer.group_sizes == [5] and trainer.unbatchable == ""
    cfg = TrainConfig(local_epochs=1, batch_size=8, lr=0.1)
    ends = []
    for (x, y), rng in zip(data, rngs, strict=True):  # the oracle: each phone trained eagerly
        rng.random()  # the availability draw of the phone's check-in
        reference.set_params(start_params)
        reference.set_state({})
        reference.train(x, y, cfg, rng)
        ends.append(reference.get_state())
    want = oracle(ends, sizes)
    coord = client.server.app[COORD]
    for n in want:
        np.testing.assert_allclose(coord.state[n], want[n], rtol=1e-4, atol=1e-5, err_msg=n)
    assert not np.allclose(coord.state["bn1.running_mean"], 0)
    if local:
        for p, end in zip(phones, ends, strict=True):
            np.testing.assert_allclose(p.own_state["bn2.running_var"], end["bn2.running_var"], rtol=1e-4)
        assert split_state(decode_message(coord.model_blob).tensors)[1] == {}
    else:
        assert all(p.own_state == {} for p in phones)
        shipped = split_state(decode_message(coord.model_blob).tensors)[1]
        np.testing.assert_allclose(shipped["bn2.running_mean"], want["bn2.running_mean"], rtol=1e-4, atol=1e-5)


def test_server_evaluates_with_the_state_it_holds(digits: Any) -> None:
    """Evaluator.evaluate loads the "state:" tensors into the model's buffers: the score equals eager
    eval mode with those statistics, and differs from the model's initial ones."""
    from fedfleet.server.evaluation import Evaluator

    torch.manual_seed(0)
    model = BNDropoutCNN()
    runtime = TorchRuntime(copy.deepcopy(model))
    runtime.train(digits.x_train[:200], digits.y_train[:200], TrainConfig(local_epochs=2, batch_size=16, lr=0.1),
                  np.random.default_rng(0))
    params, state = runtime.get_params(), runtime.get_state()
    evaluator = Evaluator(("custom", (1, 8, 8), 10), digits.x_test, digits.y_test)
    evaluator._model = copy.deepcopy(model)  # a model of the user's own, as a MODULE:ATTR task builds it
    got = evaluator.evaluate(with_state(params, state))
    want = runtime.evaluate(digits.x_test, digits.y_test)
    assert got.loss == pytest.approx(want.loss, rel=1e-5) and got.accuracy == want.accuracy
    assert evaluator.evaluate(with_state(params, initial_state(model))).loss != pytest.approx(want.loss, rel=1e-3)


async def test_reported_state_survives_a_restart_before_the_merge(aiohttp_client: Any, tmp_path: Path) -> None:
    """Two acknowledged uploads, the server restarts from its data dir, a third arrives: the merge takes
    all three phones' statistics (read back with the pending updates), as the oracle says."""
    torch.manual_seed(0)
    model = BNDropoutCNN()
    cfg = seeded_config(tmp_path, model, sample_fraction=1.0, min_cohort=3)
    rng = np.random.default_rng(2)
    start = initial_state(model)
    states = [{n: (rng.normal(size=v.shape) + 1).astype(v.dtype) if v.dtype.kind == "f"
               else np.array(rng.integers(0, 30), np.int64) for n, v in start.items()} for _ in range(3)]
    examples = [5, 20, 12]
    client = await aiohttp_client(make_app(cfg))
    phones = []
    for i in range(3):
        body = await (await client.post("/v1/register", json={"name": f"p{i}"})).json()
        phones.append(({"Authorization": f"Bearer {body['token']}"}, body["task"]))
        await client.post("/v1/checkin", headers=phones[-1][0])

    async def upload(c: Any, i: int) -> None:
        auth, task = phones[i]
        delta = {p["name"]: np.zeros(p["shape"], np.float32) for p in task["params"]}
        body = UpdateEncoder(EncoderConfig(), np.random.default_rng(i)).encode(
            delta, {"update_id": "u", "base_version": 0, "num_examples": examples[i], "train_loss": 1.0, "round": 1},
            state=states[i])
        resp = await c.post("/v1/update", data=body, headers=auth)
        assert resp.status == 200, await resp.text()

    await upload(client, 0)
    await upload(client, 1)
    await client.close()
    client = await aiohttp_client(make_app(cfg))
    coord = client.server.app[COORD]
    assert sorted(c.phone for c in coord.pending()) == ["p0", "p1"] and all(c.state for c in coord.pending())
    await client.post("/v1/checkin", headers=phones[2][0])  # task hand-outs are not kept across a restart
    await upload(client, 2)
    assert coord.version == 1
    want = oracle(states, examples)
    for name in want:
        np.testing.assert_allclose(coord.state[name], want[name], rtol=1e-6, err_msg=name)
