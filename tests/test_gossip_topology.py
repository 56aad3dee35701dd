"""Gossip topologies, Metropolis-Hastings mixing and the gossip steps (protocol/topology.py,
device_runtime/gossip_math.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.device_runtime.gossip_math import average, choco_mix, consensus_distance, mix
from fedfleet.protocol.topology import TopologyError, metropolis_weights, parse_topology
from fedfleet.server.aggregation import weighted_mean

NAMES = tuple(f"phone-{i:05d}" for i in range(16))


@pytest.mark.parametrize("spec", ["ring", "torus", "regular:3", "exponential", "complete", "matching"])
@pytest.mark.parametrize("n", [2, 5, 16])
def test_mixing_matrices_are_symmetric_and_doubly_stochastic(spec: str, n: int) -> None:
    if spec == "regular:3" and n < 4:
        pytest.skip("a 3-regular graph needs 4 phones")
    if spec == "regular:3" and n % 2:
        spec = "regular:4"
    topo = parse_topology(spec, NAMES[:n], seed=3)
    for r in (1, 2, 7):
        w = topo.weights(r)
        assert w.shape == (n, n)
        np.testing.assert_array_equal(w, w.T)
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        assert (w >= 0).all()
        off = w - np.diag(np.diag(w))
        for i, js in enumerate(topo.neighbours(r)):  # nonzero off-diagonal weights are exactly the edges
            assert sorted(np.flatnonzero(off[i]).tolist()) == js


def test_graph_shapes() -> None:
    degrees = lambda spec, n: sorted({len(js) for js in parse_topology(spec, NAMES[:n], seed=1).neighbours(1)})  # noqa: E731
    assert degrees("ring", 16) == [2]
    assert degrees("torus", 16) == [4]  # 4 x 4
    assert degrees("regular:5", 16) == [5]
    assert degrees("exponential", 16) == [7]  # hops 1, 2, 4 both ways, 8 once
    assert degrees("complete", 5) == [4]
    matching = parse_topology("matching", NAMES, seed=1)
    assert degrees("matching", 16) == [1]
    assert matching.edges(1) != matching.edges(2)  # time-varying
    assert parse_topology("matching", NAMES, seed=1).edges(5) == matching.edges(5)  # the same draw on both sides
    assert parse_topology("regular:3", NAMES, seed=1) == parse_topology("regular:3", NAMES, seed=1)
    assert parse_topology("regular:3", NAMES, seed=1).fixed != parse_topology("regular:3", NAMES, seed=2).fixed


def test_metropolis_weights_of_a_path() -> None:
    w = metropolis_weights(3, [(0, 1), (1, 2)])  # degrees 1, 2, 1: edges weigh 1/3
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


def _edges_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return f"edges:{path}"


def test_edges_file(tmp_path: Path) -> None:
    spec = _edges_file(tmp_path, "# a square\nphone-00000 phone-00001\nphone-00001,phone-00002\n"
                                 "phone-00002 phone-00003  # comment\nphone-00003 phone-00000\n")
    topo = parse_topology(spec, NAMES[:4])
    assert topo.neighbours(1) == [[1, 3], [0, 2], [1, 3], [0, 2]]


@pytest.mark.parametrize(("text", "error"), [
    ("phone-00000 phone-00001\nphone-00001 stranger\n", r"line 2: unknown phone 'stranger'"),
    ("phone-00000 phone-00001\nphone-00002 phone-00002\n", r"line 2: self-loop on 'phone-00002'"),
    ("phone-00000 phone-00001\nphone-00002 phone-00003\n", r"disconnected: 2 separate groups"),
    ("phone-00000 phone-00001 phone-00002\n", r"line 1: expected two phone names"),
])
def test_bad_edges_files_are_refused_in_one_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(TopologyError, match=error) as info:
        parse_topology(_edges_file(tmp_path, text), NAMES[:4])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("spec", "error"), [
    ("star", "unknown topology 'star'"), ("regular:x", "whole degree"), ("regular:\u00b2", "whole degree"), ("regular:3", "must be even"),
    ("regular:5", r"in 1\.\.4"), ("edges:/no/such/file", "No such file"),
])
def test_bad_specs(spec: str, error: str) -> None:
    with pytest.raises(TopologyError, match=error):
        parse_topology(spec, NAMES[:5])


def _models(n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
            for _ in range(n)]


def _gossip(models: list[dict[str, np.ndarray]], w: np.ndarray, away: set[int]) -> list[dict[str, np.ndarray]]:
    out = []
    for i, x in enumerate(models):
        if i in away:
            out.append(x)
            continue
        weights = {int(j): float(w[i, j]) for j in np.flatnonzero(w[i]) if j != i}
        out.append(mix(x, {j: models[j] for j in weights if j not in away}, weights))
    return out


def test_gossip_on_identical_models_leaves_them_unchanged() -> None:
    x = _models(1, np.random.default_rng(0))[0]
    w = parse_topology("torus", NAMES).weights(1)
    for y in _gossip([x] * 16, w, away={3}):
        for n in x:
            np.testing.assert_array_equal(y[n], x[n])
    hats = {j: x for j in range(4)}
    same = choco_mix(x, x, hats, {j: 0.2 for j in hats}, gamma=0.7)
    for n in x:
        np.testing.assert_array_equal(same[n], x[n])


def test_gossip_keeps_the_average_when_phones_are_away_and_contracts() -> None:
    models = _models(16, np.random.default_rng(1))
    w = parse_topology("ring", NAMES).weights(1)
    before = average(models)
    mixed = _gossip(models, w, away={2, 9})
    after = average(mixed)
    for n in before:
        np.testing.assert_allclose(after[n], before[n], atol=1e-6)
    assert consensus_distance(mixed) < consensus_distance(models)
    assert consensus_distance([models[0]] * 3) == 0.0


def test_dpsgd_on_the_complete_graph_after_one_local_step_is_fedavg() -> None:
    """Oracle: one local SGD step on each phone, then one gossip step with the complete graph's
    weights (1/n each) equals FedAvg's merge of the same phones' deltas (equal shard sizes)."""
    from fedfleet.device_runtime.data import load_dataset
    from fedfleet.device_runtime.runtimes import TrainConfig
    from fedfleet.device_runtime.runtimes.torch_runtime import torch_runtime_for_task
    from fedfleet.device_runtime.trainer import _train_delta

    data = load_dataset("digits", seed=0)
    runtime = torch_runtime_for_task({"model": "mlp", "input_shape": data.input_shape,
                                      "num_classes": data.num_classes})
    start = runtime.get_params()
    n, size = 6, 20
    cfg = TrainConfig(local_epochs=1, batch_size=size, lr=0.1)  # one batch: one SGD step
    deltas = []
    for i in range(n):
        x, y = data.x_train[i * size:(i + 1) * size], data.y_train[i * size:(i + 1) * size]
        delta, _ = _train_delta(runtime, start, x, y, cfg, np.random.default_rng(i))
        deltas.append(delta)
    trained = [{k: start[k] + d[k] for k in start} for d in deltas]
    w = parse_topology("complete", NAMES[:n]).weights(1)
    gossiped = _gossip(trained, w, away=set())
    mean = weighted_mean([(d, float(size)) for d in deltas])
    fedavg = {k: start[k] + mean[k] for k in start}  # FedAvg with server lr 1
    assert all(any(np.abs(v).max() > 0 for v in d.values()) for d in deltas)  # the step did move
    for model in gossiped:
        for k in start:
            np.testing.assert_allclose(model[k], fedavg[k], atol=1e-6)
    assert consensus_distance(gossiped) < 1e-10


def _phones(algorithm: str, models: list[dict[str, np.ndarray]], codec: dict[str, Any], gamma: float) -> list[Any]:
    from fedfleet.device_runtime.emulated_device import PhoneClient
    from fedfleet.device_runtime.gossip import GossipPhone
    from fedfleet.protocol import EncoderConfig, UpdateEncoder

    phones = []
    for i, x in enumerate(models):
        client = PhoneClient(None, "http://unused", NAMES[i], (np.zeros((1, 1, 8, 8)), np.zeros(1)), None,  # type: ignore[arg-type]
                             np.random.default_rng(i))
        encoder = UpdateEncoder(EncoderConfig.from_mapping(codec), np.random.default_rng(100 + i))
        phones.append(GossipPhone(client, algorithm, x, encoder=encoder, gamma=gamma))
    return phones


def _gossip_round(phones: list[Any], topo: Any, r: int) -> None:
    """One exchange as the relay carries it: every phone's message body, decoded by each neighbour."""
    from fedfleet.protocol import decode_message

    bodies = [p.message(r) for p in phones]
    w = topo.weights(r)
    for i, js in enumerate(topo.neighbours(r)):
        phones[i].absorb({NAMES[j]: decode_message(bodies[j]) for j in js}, {NAMES[j]: float(w[i, j]) for j in js})


def test_choco_without_compression_and_gamma_1_is_dpsgd() -> None:
    models = _models(5, np.random.default_rng(2))
    topo = parse_topology("ring", NAMES[:5])
    choco, dpsgd = _phones("choco", models, {}, 1.0), _phones("dpsgd", models, {}, 1.0)
    for r in (1, 2, 3):
        _gossip_round(choco, topo, r)
        _gossip_round(dpsgd, topo, r)
        for c, d in zip(choco, dpsgd, strict=True):
            for n in c.x:
                np.testing.assert_allclose(c.x[n], d.x[n], atol=1e-5)


def test_choco_with_top_k_keeps_the_average_and_reaches_consensus() -> None:
    from fedfleet.protocol import decode_message

    models = _models(6, np.random.default_rng(3))
    topo = parse_topology("ring", NAMES[:6])
    phones = _phones("choco", models, {"sparsify": "topk", "density": 0.25}, 0.2)
    before = average(models)
    start = consensus_distance(models)
    for r in range(1, 151):
        _gossip_round(phones, topo, r)
    after = average([p.x for p in phones])
    for n in before:
        np.testing.assert_allclose(after[n], before[n], atol=1e-4)
    assert consensus_distance([p.x for p in phones]) < 1e-3 * start
    sent = decode_message(phones[0].message(151)).tensors  # what goes on the wire: a quarter of each tensor
    assert all(0 < np.count_nonzero(v) <= round(0.25 * v.size) for v in sent.values())


def test_admm_on_quadratics_reaches_the_average_of_the_minimisers() -> None:
    """Oracle: with f_i(x) = ||x - b_i||^2 / 2 the ADMM x-update has a closed form,
    x = (b_i + mu c) / (1 + mu); decentralized ADMM then converges to mean(b) on every phone."""
    from fedfleet.device_runtime.gossip_math import admm_center, admm_dual

    rng = np.random.default_rng(4)
    n, rho = 6, 0.5
    b = [{"w": rng.normal(size=3)} for _ in range(n)]
    topo = parse_topology("ring", NAMES[:n])
    nbrs = topo.neighbours(1)
    x = [{"w": np.zeros(3)} for _ in range(n)]
    dual = [{"w": np.zeros(3)} for _ in range(n)]
    for _ in range(300):
        new = []
        for i in range(n):
            c = admm_center(x[i], {j: x[j] for j in nbrs[i]}, dual[i], rho)
            mu = 2 * rho * len(nbrs[i])
            new.append({"w": (b[i]["w"] + mu * c["w"]) / (1 + mu)})
        x = new
        dual = [admm_dual(dual[i], x[i], {j: x[j] for j in nbrs[i]}, rho) for i in range(n)]
    target = np.mean([v["w"] for v in b], axis=0)
    for xi in x:
        np.testing.assert_allclose(xi["w"], target, atol=1e-6)
    np.testing.assert_allclose(sum(a["w"] for a in dual), 0.0, atol=1e-9)  # the duals sum to zero throughout
