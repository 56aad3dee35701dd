import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedfleet.device_runtime.attacks import (
    Attack,
    choose_attackers,
    gaussian,
    label_flip,
    parse_attack,
    scale,
    sign_flip,
)
from fedfleet.server import robust, robust_math
from fedfleet.server.aggregation import weighted_mean
from fedfleet.server.robust import parse_rule
from fedfleet.server.robust_math import (
    TooFewUpdates,
    coordinate_median,
    gram_matrix,
    krum_scores,
    multi_krum_select,
    pairwise_sq_distances,
    trimmed_mean,
)

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def cohort(n: int, seed: int = 0, dtype: type = np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(n)]


def stacked(deltas: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(d[name], dtype=np.float64) for d in deltas])


def oracle_krum(deltas: list[dict[str, np.ndarray]], f: int, m: int) -> tuple[list[int], list[float]]:
    """Blanchard et al. 2017 read literally: double loop over pairs, sort, sum, pick."""
    flat = [np.concatenate([np.ravel(d[k]).astype(np.float64) for k in SHAPES]) for d in deltas]
    n = len(flat)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return sorted(range(n), key=lambda i: (scores[i], i))[:m], scores


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robust_math, "_BLOCK", 32)  # several column blocks per tensor even in tiny tests


# --- every rule against an independent oracle -------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_matches_numpy(n: int) -> None:
    deltas = cohort(n)
    got, report = parse_rule("median").aggregate(deltas, [1.0] * n)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.median(stacked(deltas, k), axis=0), rtol=1e-12, atol=0)
    assert report.fallback is None and report.rule == "median"


def test_scales_act_as_clipping_inside_the_blocks() -> None:
    deltas, factors = cohort(5, seed=2), np.array([1.0, 0.5, 0.25, 2.0, 0.0])
    got = coordinate_median(deltas, factors)
    for k in SHAPES:
        scaled = stacked(deltas, k) * factors.reshape(-1, *[1] * len(SHAPES[k]))
        np.testing.assert_allclose(got[k], np.median(scaled, axis=0), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("n", "beta"), [(10, 0.1), (10, 0.25), (7, 0.2), (20, 0.45), (5, 0.0), (3, 0.1)])
def test_trimmed_mean_matches_scipy(n: int, beta: float) -> None:
    deltas = cohort(n, seed=n)
    got, _ = parse_rule(f"trimmed:{beta}").aggregate(deltas, np.arange(1.0, n + 1))  # weights ignored
    for k in SHAPES:
        oracle = stats.trim_mean(stacked(deltas, k), beta, axis=0)
        np.testing.assert_allclose(got[k], oracle, rtol=1e-12, atol=1e-15)


def test_trimmed_share_counts_extreme_coordinates() -> None:
    deltas = cohort(10, seed=3)
    _, share = trimmed_mean(deltas, 0.2)
    flat = np.concatenate([stacked(deltas, k).reshape(10, -1) for k in SHAPES], axis=1)
    order = np.argsort(flat, axis=0)  # continuous data: no ties
    hits = np.concatenate([order[:2].ravel(), order[-2:].ravel()])
    expected = np.bincount(hits, minlength=10) / flat.shape[1]
    np.testing.assert_allclose(share, expected)


@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 1), (10, 3, 4), (12, 2, 10), (5, 1, 1)])
def test_multi_krum_matches_double_loop(n: int, f: int, m: int) -> None:
    deltas = cohort(n, seed=10 * n + f)
    weights = np.random.default_rng(n).uniform(1, 50, size=n)
    got, report = parse_rule(f"multikrum:{f}:{m}").aggregate(deltas, weights)
    chosen, scores = oracle_krum(deltas, f, m)
    dist = pairwise_sq_distances(gram_matrix(deltas))
    np.testing.assert_allclose(krum_scores(dist, f), scores, rtol=1e-9)
    assert sorted(multi_krum_select(dist, f, m)) == sorted(chosen)
    for k in SHAPES:
        oracle = np.average(stacked(deltas, k)[chosen], axis=0, weights=weights[chosen])
        np.testing.assert_allclose(got[k], oracle, rtol=1e-10)
    assert {s.index for s in report.suspects if s.reason == "krum"} == set(range(n)) - set(chosen)


def test_gram_distances_match_direct_differences() -> None:
    deltas = cohort(6, seed=4, dtype=np.float64)
    dist = pairwise_sq_distances(gram_matrix(deltas))
    for i in range(6):
        for j in range(6):
            direct = sum(float(np.sum((deltas[i][k] - deltas[j][k]) ** 2)) for k in SHAPES)
            assert dist[i, j] == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_none_is_weighted_mean_and_multikrum_default_keeps_n_minus_f() -> None:
    deltas, weights = cohort(9), [3.0, 1.0, 7.0, 2.0, 2.0, 5.0, 1.0, 9.0, 4.0]
    got, report = parse_rule("none").aggregate(deltas, weights)
    expected = weighted_mean(list(zip(deltas, weights, strict=True)))
    assert all(np.array_equal(got[k], expected[k]) for k in SHAPES)
    assert got["s"].shape == () and got["w"].dtype == np.float64
    assert report.suspects == () and report.bound is None
    _, kr = parse_rule("multikrum:2").aggregate(deltas, weights)
    assert len([s for s in kr.suspects if s.reason == "krum"]) == 2


@pytest.mark.parametrize("rule", ["normbound:1.5", "normbound:median*0.8"])
def test_normbound_clips_then_weighted_mean(rule: str) -> None:
    deltas, weights = cohort(8, seed=5), np.arange(1.0, 9.0)
    norms = np.array([np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in d.values()))
                      for d in deltas])
    bound = 1.5 if rule.endswith("1.5") else 0.8 * np.median(norms)
    factors = np.minimum(1.0, bound / norms)
    got, report = parse_rule(rule).aggregate(deltas, weights)
    for k in SHAPES:
        oracle = np.sum(stacked(deltas, k) * (weights * factors).reshape(-1, *[1] * len(SHAPES[k])), axis=0)
        np.testing.assert_allclose(got[k], oracle / weights.sum(), rtol=1e-10)
    assert report.bound == pytest.approx(bound)
    assert {s.index for s in report.suspects if s.reason == "clipped"} == set(np.flatnonzero(norms > bound))


def test_composition_clips_before_trimming() -> None:
    deltas = cohort(10, seed=6)
    norms = robust_math.update_norms(deltas)
    factors = np.minimum(1.0, 0.5 / norms)
    clipped = [{k: v * c for k, v in d.items()} for d, c in zip(deltas, factors, strict=True)]
    got, _ = parse_rule("normbound:0.5+trimmed:0.2").aggregate(deltas, [1.0] * 10)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], stats.trim_mean(stacked(clipped, k), 0.2, axis=0), rtol=1e-10)


def test_weights_enter_mean_and_krum_but_not_median_or_trimmed() -> None:
    deltas, flat, ramp = cohort(9, seed=7), [1.0] * 9, list(range(1, 10))
    for rule, weighted in [("none", True), ("multikrum:2", True), ("median", False), ("trimmed:0.2", False)]:
        a, _ = parse_rule(rule).aggregate(deltas, flat)
        b, _ = parse_rule(rule).aggregate(deltas, ramp)
        assert np.allclose(a["w"], b["w"]) != weighted, rule


# --- robustness: f attackers sending huge vectors ----------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n_honest=st.integers(7, 14), f=st.integers(1, 3), seed=st.integers(0, 2**16),
       magnitude=st.sampled_from([1e3, 1e6]), same_direction=st.booleans())
def test_robust_rules_stay_in_honest_hull_while_mean_is_destroyed(
        n_honest: int, f: int, seed: int, magnitude: float, same_direction: bool) -> None:
    rng = np.random.default_rng(seed)
    honest = [{k: (1.0 + 0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
              for _ in range(n_honest)]
    direction = {k: rng.choice([-1.0, 1.0], size=s) for k, s in SHAPES.items()}
    evil = [{k: (magnitude * (direction[k] if same_direction else rng.choice([-1.0, 1.0], size=s)))
             .astype(np.float32) for k, s in SHAPES.items()} for _ in range(f)]
    deltas = evil[: f // 2] + honest + evil[f // 2:]  # attackers not all at the end
    n = len(deltas)
    evil_idx = set(range(f // 2)) | set(range(f // 2 + n_honest, n))
    weights = [1.0] * n
    lo = {k: stacked(honest, k).min(axis=0) for k in SHAPES}
    hi = {k: stacked(honest, k).max(axis=0) for k in SHAPES}
    mean, _ = parse_rule("none").aggregate(deltas, weights)
    assert max(np.max(np.abs(mean[k] - 1.0)) for k in SHAPES) > 10  # the attack works on FedAvg
    rules = ["median", f"trimmed:{(f + 0.5) / n}", f"krum:{f}", f"multikrum:{f}",
             "normbound:median*3+median", f"normbound:median*3+trimmed:{(f + 0.5) / n}"]
    if int(0.25 * n) >= f:  # the defaults assume up to a quarter of the cohort attacks
        rules += ["trimmed", "multikrum", "krum", "normbound+trimmed"]
    for rule in rules:
        got, report = parse_rule(rule).aggregate(deltas, weights)
        for k in SHAPES:
            assert np.all(got[k] >= lo[k] - 1e-6) and np.all(got[k] <= hi[k] + 1e-6), rule
        assert evil_idx <= {s.index for s in report.suspects}, rule  # each attacker is named


def test_signflip_minority_is_outvoted_by_median() -> None:
    honest = cohort(9, seed=8)
    honest = [{k: v + 2.0 for k, v in d.items()} for d in honest]
    deltas = honest + [sign_flip(d) for d in honest[:3]]
    got, _ = parse_rule("median").aggregate(deltas, [1.0] * 12)
    assert np.all(got["w"] > 0)  # honest direction kept


# --- reports, fallbacks and validation ---------------------------------------------------------
def test_report_flags_norm_outliers_and_is_json_ready() -> None:
    deltas = cohort(10, seed=9)
    deltas[4] = scale(deltas[4], 100.0)
    _, report = parse_rule("normbound:median*3").aggregate(deltas, [1.0] * 10)
    assert {(s.index, s.reason) for s in report.suspects} == {(4, "norm_z"), (4, "clipped")}
    labels = [f"phone-{i}" for i in range(10)]
    row = json.loads(json.dumps(report.to_dict(labels)))
    assert {s["update"] for s in row["suspects"]} == {"phone-4"} and row["rule"] == "normbound:median*3"


def test_trimmed_mean_names_updates_that_are_mostly_trimmed() -> None:
    deltas = cohort(10, seed=14)
    for i in (2, 7):
        deltas[i] = scale(deltas[i], 100.0)
    _, report = parse_rule("trimmed:0.2").aggregate(deltas, [1.0] * 10)
    trimmed = {s.index: s.value for s in report.suspects if s.reason == "trimmed"}
    assert set(trimmed) == {2, 7} and min(trimmed.values()) > 0.9


def test_krum_with_too_few_updates_falls_back_to_median() -> None:
    deltas = cohort(6, seed=11)
    with pytest.raises(TooFewUpdates, match="more than 6"):
        multi_krum_select(pairwise_sq_distances(gram_matrix(deltas)), f=2)
    rule = parse_rule("krum:2")
    assert rule.min_updates == 7 and parse_rule("median").min_updates == 1
    got, report = rule.aggregate(deltas, [1.0] * 6)
    assert report.fallback is not None and report.fallback.startswith("median")
    np.testing.assert_allclose(got["w"], np.median(stacked(deltas, "w"), axis=0))


@pytest.mark.parametrize("text", ["bogus", "krum:", "krum:-1", "krum:1.5", "multikrum:1:0", "trimmed:0.5",
                                  "trimmed:-0.1", "trimmed:x", "trimmed:", "normbound:0", "normbound:-2",
                                  "normbound:inf", "normbound:median*0", "normbound:", "median:3",
                                  "median+trimmed:0.1", "trimmed:0.1+normbound:3", "none+median", "median+none",
                                  "krum:1:2", "multikrum::3", "multikrum:50%", "krum:-5%", "krum:nan%", "krum:x%"])
def test_parse_rule_rejects_bad_rules(text: str) -> None:
    with pytest.raises(ValueError, match="robust rule"):
        parse_rule(text)


def test_parse_rule_accepts_the_documented_forms() -> None:
    rule = parse_rule(" NormBound:median*3+normbound:10+trimmed:0.1 ")
    assert [(b.bound, b.relative) for b in rule.bounds] == [(3.0, True), (10.0, False)]
    assert rule.combine == robust.TrimmedMean(0.1)
    assert rule.text == "NormBound:median*3+normbound:10+trimmed:0.1"
    assert parse_rule("normbound:median").bounds == (robust.NormBound(1.0, relative=True),)
    assert parse_rule("multikrum:2:5").combine == robust.MultiKrum(2, 5)
    assert parse_rule("krum:0").combine == robust.MultiKrum(0, 1)


def test_aggregate_rejects_bad_weights() -> None:
    rule, deltas = parse_rule("median"), cohort(3)
    for weights in ([1.0, 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, np.nan, 1.0]):
        with pytest.raises(ValueError, match="weight"):
            rule.aggregate(deltas, weights)
    with pytest.raises(ValueError):
        rule.aggregate([], [])


# --- attacks -----------------------------------------------------------------------------------
def test_model_attacks_behave_as_specified() -> None:
    delta = cohort(1, seed=12)[0]
    assert all(np.array_equal(sign_flip(delta)[k], -delta[k]) for k in SHAPES)
    big = scale(delta, 100.0)
    assert all(big[k].dtype == np.float32 and np.allclose(big[k], 100 * delta[k]) for k in SHAPES)
    noise = gaussian({"x": np.zeros(100_000, np.float32)}, 2.0, np.random.default_rng(0))["x"]
    assert noise.dtype == np.float32 and abs(noise.std() - 2.0) < 0.02 and abs(noise.mean()) < 0.02
    again = gaussian({"x": np.zeros(100_000, np.float32)}, 2.0, np.random.default_rng(0))["x"]
    assert np.array_equal(noise, again)  # the seed reproduces the attack


def test_label_flip_maps_y_to_c_minus_one_minus_y() -> None:
    y = np.array([0, 1, 2, 9, 5], dtype=np.int64)
    assert label_flip(y, 10).tolist() == [9, 8, 7, 0, 4]
    assert np.array_equal(label_flip(label_flip(y, 10), 10), y) and label_flip(y, 10).dtype == y.dtype
    with pytest.raises(ValueError, match="labels"):
        label_flip(np.array([0, 10]), 10)


def test_attack_specs_parse_and_apply() -> None:
    delta, rng = cohort(1, seed=13)[0], np.random.default_rng(1)
    y = np.arange(10)
    assert parse_attack("scale:10") == Attack("scale", 10.0)
    assert np.allclose(parse_attack("scale:10").apply_delta(delta, rng)["w"], 10 * delta["w"])
    assert np.array_equal(parse_attack("signflip").apply_delta(delta, rng)["b"], -delta["b"])
    assert parse_attack("noise:1.0").apply_delta(delta, rng)["w"].shape == (3, 4)
    flip = parse_attack(" LabelFlip ")
    assert flip.poisons_data and flip.apply_labels(y, 10).tolist() == list(range(9, -1, -1))
    assert flip.apply_delta(delta, rng)["w"] is delta["w"]
    assert parse_attack("signflip").apply_labels(y, 10) is y and parse_attack("none") == Attack()
    for bad in ["scale", "noise:0", "noise:-1", "signflip:2", "scale:x", "backdoor", "scale:inf"]:
        with pytest.raises(ValueError, match="attack"):
            parse_attack(bad)


def test_choose_attackers_is_seeded_and_sized() -> None:
    a = choose_attackers(50, 0.2, np.random.default_rng(3))
    assert len(a) == 10 and len(set(a.tolist())) == 10 and a.max() < 50
    assert np.array_equal(a, choose_attackers(50, 0.2, np.random.default_rng(3)))
    with pytest.raises(ValueError):
        choose_attackers(10, 1.5, np.random.default_rng(0))


# --- defaults that need no attacker count, Krum's f as a share, direction suspects --------------
def test_bare_steps_take_the_documented_defaults() -> None:
    assert parse_rule("normbound").bounds == (robust.NormBound(robust.DEFAULT_NORM_FACTOR, relative=True),)
    assert parse_rule("normbound").bounds == parse_rule("normbound:median*2").bounds
    assert parse_rule("trimmed").combine == robust.TrimmedMean(0.25)
    assert parse_rule("multikrum").combine == robust.MultiKrum(0, None, 0.25)
    assert parse_rule("krum").combine == robust.MultiKrum(0, 1, 0.25)
    assert parse_rule("multikrum:10%:4").combine == robust.MultiKrum(0, 4, 0.1)
    rule = parse_rule("normbound+median")
    assert rule.bounds == parse_rule("normbound").bounds and rule.combine == robust.Median()


@pytest.mark.parametrize(("n", "f"), [(3, 0), (4, 0), (5, 1), (8, 2), (10, 2), (12, 3), (50, 12)])
def test_krum_share_resolves_f_per_merge_and_never_falls_back(n: int, f: int) -> None:
    # f = min(floor(n / 4), (n - 3) // 2): 25% of each cohort, capped where Krum is defined.
    deltas = cohort(n, seed=20 + n)
    weights = np.random.default_rng(n).uniform(1, 5, size=n)
    rule = parse_rule("multikrum:25%")
    assert rule.min_updates == 3 and rule.combine.f_for(n) == f  # type: ignore[union-attr]
    got, report = rule.aggregate(deltas, weights)
    fixed, _ = parse_rule(f"multikrum:{f}").aggregate(deltas, weights)  # the same as f given as a count
    for k in SHAPES:
        np.testing.assert_allclose(got[k], fixed[k], rtol=1e-12)
    assert report.fallback is None and report.krum_f == f and report.to_dict()["krum_f"] == f
    assert len([s for s in report.suspects if s.reason == "krum"]) == f


def test_krum_share_with_two_updates_falls_back_to_median() -> None:
    deltas = cohort(2, seed=21)
    got, report = parse_rule("multikrum").aggregate(deltas, [1.0, 1.0])
    assert report.fallback is not None and report.krum_f is None
    np.testing.assert_allclose(got["w"], np.median(stacked(deltas, "w"), axis=0))


def test_cosines_match_direct_computation() -> None:
    deltas = cohort(6, seed=22)
    ref = cohort(1, seed=23)[0]
    flat = [np.concatenate([np.ravel(d[k]).astype(np.float64) for k in SHAPES]) for d in deltas]
    r = np.concatenate([np.ravel(ref[k]).astype(np.float64) for k in SHAPES])
    expected = [float(u @ r / np.linalg.norm(u) / np.linalg.norm(r)) for u in flat]
    np.testing.assert_allclose(robust_math.cosines(deltas, ref), expected, rtol=1e-12)
    deltas[2] = {k: np.zeros_like(v) for k, v in deltas[2].items()}
    assert robust_math.cosines(deltas, ref)[2] == 0.0
    assert not robust_math.cosines(deltas, {k: np.zeros_like(v) for k, v in ref.items()}).any()


@pytest.mark.parametrize("rule", ["none", "median", "trimmed", "multikrum", "normbound"])
def test_direction_names_sign_flipped_updates_whose_norm_looks_honest(rule: str) -> None:
    rng = np.random.default_rng(24)
    honest = [{k: (1.0 + 0.5 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(16)]
    deltas = honest[:5] + [sign_flip(honest[0]), sign_flip(honest[1])] + honest[5:] + [sign_flip(honest[2])]
    flipped = {5, 6, 18}
    _, report = parse_rule(rule).aggregate(deltas, [1.0] * len(deltas))
    assert not [s for s in report.suspects if s.reason == "norm_z"]  # same norms: only direction tells
    direction = {s.index: s.value for s in report.suspects if s.reason == "direction"}
    assert set(direction) == flipped and max(direction.values()) < 0, rule
