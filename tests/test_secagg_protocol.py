"""SecAgg+ protocol, pure: the unmasked sum equals the plain integer sum exactly, whoever
drops; masked uploads hide each update; below the threshold the group aborts."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.protocol.secagg import (
    BelowThreshold,
    NotANeighbour,
    SecAggPhone,
    ShareRequestRefused,
    SumMayWrap,
    WrongStep,
    group_params,
    unmask_sum,
)
from fedfleet.protocol.secagg.graph import default_degree, neighbours, neighbours_of
from fedfleet.protocol.secagg.integer import from_field, to_field, to_integers
from fedfleet.protocol.secagg.params import GroupParams


def _run(
    params: GroupParams,
    values: dict[int, np.ndarray],
    *,
    drop_after_sharing: set[int] = frozenset(),  # type: ignore[assignment]
    drop_after_upload: set[int] = frozenset(),  # type: ignore[assignment]
    seed: int = 0,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Drive every step with real phones; returns (unmasked sum, masked uploads)."""
    rng = np.random.default_rng(seed)
    phones = {i: SecAggPhone(params, i, rng.bytes(32)) for i in range(1, params.size + 1)}
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {i: p.share_keys(roster) for i, p in phones.items()}
    sharers = frozenset(phones)
    uploaders = sharers - drop_after_sharing
    masked = {}
    for i in sorted(uploaders):
        incoming = {j: out[i] for j, out in sealed.items() if i in out and j in sharers}
        masked[i] = phones[i].masked_upload(incoming, values[i])
    responders = uploaders - drop_after_upload
    dropped = sharers - uploaders
    responses = {i: phones[i].unmask(uploaders, dropped) for i in sorted(responders)}
    return unmask_sum(params, roster, sharers, masked, responses), masked


def _values(params: GroupParams, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i: to_integers(rng.normal(0, 0.3, params.dim), params, np.random.default_rng([seed, i]))
        for i in range(1, params.size + 1)
    }


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("when", ["after_sharing", "after_upload"])
def test_unmasked_sum_equals_plain_sum(fraction: float, when: str) -> None:
    # at 30% dropped a sparse neighbourhood (k = 10, t = 6) can lose 5 of 10: the complete graph keeps t
    degree = 19 if fraction > 0.2 else None
    params = group_params("round/1/group/0", 20, 300, clip=1.0, threshold=0.6, degree=degree,
                          noise_multiplier=0.5, graph_seed=b"g")
    values = _values(params, 7)
    drop = set(np.random.default_rng(3).choice(np.arange(1, 21), int(fraction * 20), replace=False).tolist())
    kwargs = {"drop_after_sharing": drop} if when == "after_sharing" else {"drop_after_upload": drop}
    total, masked = _run(params, values, **kwargs)  # type: ignore[arg-type]
    uploaded = set(masked)
    expect = sum(values[i] for i in sorted(uploaded))
    assert total.dtype == np.int64
    np.testing.assert_array_equal(total, expect)


def test_no_masked_upload_equals_the_quantized_update() -> None:
    params = group_params("round/1/group/0", 8, 500, clip=1.0, graph_seed=b"x")
    values = _values(params, 1)
    _, masked = _run(params, values)
    for i, y in masked.items():
        plain = to_field(values[i], params.modulus_bits)
        assert not np.array_equal(y, plain)
        assert np.mean(y == plain) < 0.01  # no coordinate leaks beyond chance


def test_below_threshold_aborts_and_reveals_nothing() -> None:
    params = group_params("round/1/group/0", 10, 50, clip=1.0, threshold=0.7, graph_seed=b"s")
    values = _values(params, 2)
    with pytest.raises(BelowThreshold):  # 4 of 10 upload, 7 needed
        _run(params, values, drop_after_sharing={1, 2, 3, 4, 5, 6})
    with pytest.raises(BelowThreshold):  # all upload but only 5 answer, t = ceil(0.7 * 8) = 6
        _run(params, values, drop_after_upload={1, 2, 3, 4, 5})


def test_request_for_both_secrets_of_one_phone_is_refused() -> None:
    params = group_params("g", 6, 10, clip=1.0, graph_seed=b"r")
    rng = np.random.default_rng(0)
    phones = {i: SecAggPhone(params, i, rng.bytes(32)) for i in range(1, 7)}
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {i: p.share_keys(roster) for i, p in phones.items()}
    zero = np.zeros(params.rotated_dim, dtype=np.int64)
    for i, p in phones.items():
        p.masked_upload({j: out[i] for j, out in sealed.items() if i in out}, zero)
    everyone = set(phones)
    with pytest.raises(ShareRequestRefused):  # phone 2 both survived and dropped
        phones[1].unmask(everyone, {2})
    with pytest.raises(ShareRequestRefused):  # phone 1 itself declared dropped
        phones[1].unmask(everyone - {1}, {1})
    phones[1].unmask(everyone - {3}, {3})
    with pytest.raises(ShareRequestRefused):  # a second answer, now asking for 3's seed
        phones[1].unmask(everyone, set())
    with pytest.raises(WrongStep):
        phones[2].share_keys(roster)


def test_shares_from_outside_the_neighbourhood_are_refused() -> None:
    params = group_params("g", 12, 4, clip=1.0, degree=4, graph_seed=b"n")
    rng = np.random.default_rng(0)
    phones = {i: SecAggPhone(params, i, rng.bytes(32)) for i in range(1, 13)}
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {i: p.share_keys(roster) for i, p in phones.items()}
    stranger = next(j for j in phones if j != 1 and j not in phones[1].neighbours)
    incoming = {j: out[1] for j, out in sealed.items() if 1 in out}
    with pytest.raises(NotANeighbour):
        phones[1].masked_upload({**incoming, stranger: b"\x00" * 48}, np.zeros(params.rotated_dim, dtype=np.int64))


def test_a_share_sealed_under_another_nonce_or_of_another_length_is_refused() -> None:
    """The nonce is not sent: both ends use the zero nonce of a key that seals one message, so a
    share sealed under any other nonce (or cut, or padded) does not open."""
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    from fedfleet.protocol.secagg import crypto
    from fedfleet.protocol.secagg.errors import BadShare

    params = group_params("g", 4, 4, clip=1.0, graph_seed=b"n")
    entropy = {i: bytes([i]) * 32 for i in range(1, 5)}
    phones = {i: SecAggPhone(params, i, entropy[i]) for i in range(1, 5)}
    roster = {i: p.advertise() for i, p in phones.items()}
    sealed = {i: p.share_keys(roster) for i, p in phones.items()}
    incoming = {j: out[1] for j, out in sealed.items() if 1 in out}
    assert {len(b) for b in incoming.values()} == {48}
    ctx, channel_2 = params.context, crypto.hkdf(entropy[2], "channel key", params.context)
    key = crypto._channel_key(channel_2, roster[1].channel, ctx, 2, 1)
    plain = crypto.open_sealed(channel_2, roster[1].channel, ctx, 2, 1, incoming[2])  # what 2 sealed for 1
    other_nonce = crypto_aead_chacha20poly1305_ietf_encrypt(plain, crypto._aad(ctx, 2, 1), bytes(11) + b"\x01", key)
    zero = np.zeros(params.rotated_dim, dtype=np.int64)
    for bad in (other_nonce, incoming[2][:-1], incoming[2] + b"\x00"):
        with pytest.raises(BadShare):
            fresh = SecAggPhone(params, 1, entropy[1])
            fresh.share_keys(roster)
            fresh.masked_upload({**incoming, 2: bad}, zero)
    phones[1].masked_upload(incoming, zero)  # the shares as sent open


def test_graph_is_k_regular_and_symmetric() -> None:
    graph = neighbours(1000, default_degree(1000), b"seed")
    assert default_degree(1000) == 20
    assert {len(v) for v in graph.values()} == {20}
    assert all(i in graph[j] for i, near in graph.items() for j in near)
    assert neighbours(1000, 20, b"seed") == graph != neighbours(1000, 20, b"other")
    assert all(neighbours_of(1000, 20, b"seed", i) == graph[i] for i in (1, 500, 1000))


def test_modulus_fits_the_largest_signal_sum_and_refuses_a_smaller_one() -> None:
    p = group_params("g", 1000, 10, clip=1.0)
    assert p.modulus_bits == 12 and 1000 * p.clip_bound < 2 ** (p.modulus_bits - 1)
    with pytest.raises(SumMayWrap):
        group_params("g", 1000, 10, clip=1.0, modulus_bits=10)
    extreme = np.full(p.rotated_dim, p.clip_bound, dtype=np.int64)
    total = sum(to_field(extreme, p.modulus_bits) for _ in range(1000)) & np.uint64(2**p.modulus_bits - 1)
    np.testing.assert_array_equal(from_field(np.asarray(total), p.modulus_bits), 1000 * extreme)
    np.testing.assert_array_equal(from_field(to_field(-extreme, p.modulus_bits), p.modulus_bits), -extreme)


def test_distributed_noise_has_the_central_variance() -> None:
    p = group_params("g", 50, 20000, clip=1.0, noise_multiplier=1.0)
    rng = np.random.default_rng(5)
    noise = np.sum([to_integers(np.zeros(p.dim), p, rng) for _ in range(p.min_survivors)], axis=0)
    central_sigma = 1.0 * p.sensitivity
    assert noise.shape == (p.rotated_dim,)
    assert abs(noise.std() / central_sigma - 1) < 0.02
    assert abs(noise.mean()) < 4 * central_sigma / np.sqrt(p.rotated_dim)


def test_sparse_graph_survives_ten_percent_dropped() -> None:
    params = group_params("round/2/group/1", 60, 40, clip=1.0, threshold=0.6, graph_seed=b"sparse")
    assert params.degree == 12 and params.share_threshold == 8
    values = _values(params, 11)
    total, masked = _run(params, values, drop_after_sharing={5, 17, 33}, drop_after_upload={8, 40, 59})
    np.testing.assert_array_equal(total, sum(values[i] for i in sorted(masked)))


def test_distributed_epsilon_matches_the_central_gaussian() -> None:
    """With sigma well above 1, tau vanishes and the sum is the central Gaussian of noise
    multiplier z: the same epsilon as dp_accounting's GaussianDpEvent(z)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedfleet.protocol.secagg.dp import distributed_epsilon

    p = group_params("g", 100, 1000, clip=1.0, noise_multiplier=1.1)
    central = RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.1), 50).get_epsilon(1e-5)
    assert distributed_epsilon(p, 50, 1e-5) == pytest.approx(central, rel=1e-3)
    assert distributed_epsilon(p, 0, 1e-5) == 0.0


def test_shamir_rebuilds_from_any_t_shares_and_catches_a_wrong_one() -> None:
    from fedfleet.protocol.secagg import shamir
    from fedfleet.protocol.secagg.errors import BadShare

    rng = np.random.default_rng(9)
    secret = int.from_bytes(rng.bytes(16), "big") % shamir.PRIME
    coefficients = [int.from_bytes(rng.bytes(32), "big") % shamir.PRIME for _ in range(4)]  # t = 5
    points = list(zip(range(1, 10), shamir.split(secret, range(1, 10), coefficients), strict=True))
    assert shamir.combine(points[:5], 5) == shamir.combine(points[4:], 5) == secret
    assert shamir._lagrange_at(points[:4], 0) != secret  # t - 1 shares: another value
    assert all(len(shamir.element_to_bytes(y)) == 16 for _, y in points)
    with pytest.raises(ValueError):  # a secret must be a field element
        shamir.split(shamir.PRIME, range(1, 10), coefficients)
    with pytest.raises(BadShare):  # 2**127 - 1 fits 16 bytes but is no field element
        shamir.element_from_bytes(shamir.PRIME.to_bytes(16, "big"))
    wrong = [*points[:2], (points[2][0], (points[2][1] + 1) % shamir.PRIME), *points[3:]]
    with pytest.raises(BadShare):
        shamir.combine(wrong, 5)


def test_shared_coordinates_are_a_seeded_sample_of_k() -> None:
    from fedfleet.protocol.secagg.coords import kept, shared_coordinates

    k = kept(1000, 0.1)
    a = shared_coordinates(b"seed", b"g", 1000, k)
    assert k == 100 and a.size == 100 and len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert 0 <= a.min() and a.max() < 1000
    assert np.array_equal(a, shared_coordinates(b"seed", b"g", 1000, k))
    assert not np.array_equal(a, shared_coordinates(b"other", b"g", 1000, k))
    np.testing.assert_array_equal(shared_coordinates(b"seed", b"g", 10, 10), np.arange(10))
