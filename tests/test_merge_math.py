"""The merge's stacked arithmetic against the loops it replaced: same bits, any chunking."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.server import aggregation, robust_math
from fedfleet.server.aggregation import stacked_rows, weighted_mean
from fedfleet.server.robust import parse_rule
from fedfleet.server.robust_math import cosines, update_norms

SHAPES = {"w": (7, 5), "b": (5,), "one": (1,), "s": ()}


def cohort(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):  # float32 off the wire, with a float64 and a transposed (non-contiguous) tensor
        d = {k: (rng.normal(size=s) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32) for k, s in SHAPES.items()}
        d["b"] = d["b"].astype(np.float64)
        d["w"] = np.ascontiguousarray(d["w"].T).T if i % 3 == 0 else d["w"]
        out.append(d)
    return out


def loop_mean(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """The weighted mean as it was computed before: one update at a time, in order."""
    total = float(sum(w for _, w in updates))
    out = {}
    for name, first in updates[0][0].items():
        acc = np.zeros(np.shape(first))
        for u, w in updates:
            acc += (w / total) * np.asarray(u[name], dtype=np.float64)
        out[name] = acc
    return out


@pytest.mark.parametrize("chunk", [1, 6, 40, 1 << 16])
def test_weighted_mean_is_the_loop_bit_for_bit(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(aggregation, "_CHUNK", chunk)  # 1: a row per chunk; 6, 40: chunks cut mid-cohort
    deltas = cohort(23, seed=chunk)
    weights = np.random.default_rng(chunk).uniform(0.5, 40.0, size=len(deltas))
    updates = [(d, float(w)) for d, w in zip(deltas, weights, strict=True)]
    got, expected = weighted_mean(updates), loop_mean(updates)
    for name in SHAPES:
        assert got[name].shape == SHAPES[name] and got[name].dtype == np.float64
        assert got[name].tobytes() == expected[name].tobytes(), name


def test_stacked_rows_cover_every_tensor_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregation, "_CHUNK", 70)  # 2 rows of 35 per chunk
    tensors = [np.full((7, 5), float(i), dtype=np.float32) for i in range(5)]
    seen = [(i, rows.copy()) for i, rows in stacked_rows(tensors)]
    assert [i for i, _ in seen] == [0, 2, 4]
    stacked = np.concatenate([rows for _, rows in seen])
    np.testing.assert_array_equal(stacked, np.repeat(np.arange(5.0), 35).reshape(5, 35))


@pytest.mark.parametrize("chunk", [1, 40, 1 << 16])
def test_cosines_match_direct_computation(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(aggregation, "_CHUNK", chunk)
    deltas = cohort(17, seed=3)
    deltas[4] = {k: np.zeros_like(v) for k, v in deltas[4].items()}  # a zero update: cosine 0
    reference = {k: np.asarray(v, dtype=np.float64) + 0.1 for k, v in deltas[0].items()}
    flat = np.stack([np.concatenate([np.ravel(d[k]).astype(np.float64) for k in SHAPES]) for d in deltas])
    ref = np.concatenate([np.ravel(reference[k]) for k in SHAPES])
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nan_to_num(flat @ ref / (np.linalg.norm(flat, axis=1) * np.linalg.norm(ref)))
    np.testing.assert_allclose(cosines(deltas, reference), expected, rtol=1e-12, atol=1e-15)
    assert cosines(deltas, {k: np.zeros_like(v) for k, v in reference.items()}).tolist() == [0.0] * len(deltas)


@pytest.mark.parametrize("block", [1, 13, 1 << 20])
@pytest.mark.parametrize("rule", ["median", "trimmed:0.2", "normbound:median*1.1+multikrum:3", "normbound+median"])
def test_block_width_changes_no_result(monkeypatch: pytest.MonkeyPatch, block: int, rule: str) -> None:
    """Robust rules stack the cohort one column block at a time: narrow blocks (one column,
    blocks cut mid-tensor) give what one block holding every tensor gives."""
    deltas = cohort(11, seed=5)
    weights = np.arange(1.0, 12.0)
    monkeypatch.setattr(robust_math, "_BLOCK", 1 << 20)
    whole, whole_report = parse_rule(rule).aggregate(deltas, weights)
    monkeypatch.setattr(robust_math, "_BLOCK", block)
    got, report = parse_rule(rule).aggregate(deltas, weights)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], whole[name], rtol=1e-12, atol=0)
    assert [(s.index, s.reason) for s in report.suspects] == [(s.index, s.reason) for s in whole_report.suspects]


def test_update_norms_of_mixed_dtypes() -> None:
    deltas = cohort(5, seed=7)
    expected = [np.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in d.values()))
                for d in deltas]
    np.testing.assert_allclose(update_norms(deltas), expected, rtol=1e-12)
