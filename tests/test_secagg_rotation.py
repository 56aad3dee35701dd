"""The rotated, bounded, bit-packed integers of secure rounds: the rotation is orthogonal and
seeded per group, packing round-trips b-bit values, the per-coordinate bound and the rounding's
norm bound hold on every phone, the sum of 1,000 phones fits 12 bits (at most 1.5 times int8 on the
wire) without wrapping, and the mean comes back close to the mean of the clipped updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfleet.protocol import EncoderConfig, UpdateEncoder
from fedfleet.protocol.secagg import SumMayWrap, group_params
from fedfleet.protocol.secagg.integer import from_field, mean_from_sum, pack, to_field, to_integers, unpack
from fedfleet.protocol.secagg.params import P_WRAP, noise_sum_bound
from fedfleet.protocol.secagg.rotation import blocks, hadamard, rotated_dim, rotation


def test_rotation_is_orthogonal_and_seeded_per_group() -> None:
    assert (blocks(20_000), rotated_dim(20_000)) == ((4096,) * 4 + (2048, 1024, 512, 32), 20_000)  # no padding
    assert (blocks(19_885), rotated_dim(19_885)) == ((4096,) * 4 + (2048, 1024, 256, 128, 64), 19_904)
    assert (blocks(5000), rotated_dim(5000)) == ((4096, 512, 256, 128, 32), 5024)
    assert blocks(1) == (32,) and blocks(8192) == (4096, 4096)
    r = rotation(b"seed", b"round/1/group/0", 20_000)
    x = np.random.default_rng(0).normal(0, 1, 20_000)
    y = r.apply(x)
    assert y.shape == (20_000,)
    assert float(np.linalg.norm(y)) == pytest.approx(float(np.linalg.norm(x)), rel=1e-12)
    np.testing.assert_allclose(r.invert(y), x, rtol=0, atol=1e-12)
    assert np.array_equal(y, rotation(b"seed", b"round/1/group/0", 20_000).apply(x))
    assert not np.allclose(y, rotation(b"seed", b"round/2/group/0", 20_000).apply(x))
    spike = np.zeros(20_000)
    spike[123] = 1.0  # all the energy in one coordinate: spread over the whole block it lands in
    lands = int(np.flatnonzero(r.order == 123)[0])
    size = next(b for b, end in zip(r.blocks, np.cumsum(r.blocks), strict=True) if lands < end)
    assert np.abs(r.apply(spike)).max() == pytest.approx(1 / math.sqrt(size))
    assert np.count_nonzero(r.apply(spike)) == size


def test_mixed_blocks_are_each_one_orthonormal_hadamard() -> None:
    """The block-diagonal transform equals a dense oracle: H_L / sqrt(L) built by
    Sylvester's recursion, block by block; batched rows give the same as one row at a time."""
    sizes = (64, 32)
    x = np.random.default_rng(3).normal(0, 1, (3, 96))

    def sylvester(n: int) -> np.ndarray:
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return h / math.sqrt(n)

    dense = np.zeros((96, 96))
    dense[:64, :64], dense[64:, 64:] = sylvester(64), sylvester(32)
    np.testing.assert_allclose(hadamard(x, sizes), x @ dense.T, rtol=0, atol=1e-12)
    assert np.array_equal(hadamard(x, sizes)[1], hadamard(x[1], sizes))
    np.testing.assert_allclose(hadamard(hadamard(x, sizes), sizes), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 5, 8, 12, 13, 31, 62])
def test_packing_round_trips_b_bit_values(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, 1001, dtype=np.uint64)
    packed = pack(values, bits)
    assert len(packed) == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack(packed, 1001, bits), values)


def test_a_thousand_phones_fit_twelve_bits_at_one_and_a_half_times_int8() -> None:
    p = group_params("g", 1000, 20_000, clip=1.0, noise_multiplier=1.0)
    assert p.modulus_bits == 12 and p.clip_bound >= 1
    plain = np.random.default_rng(0).normal(0, 0.01, 20_000).astype(np.float32)
    meta = {"update_id": "u", "base_version": 0, "num_examples": 32, "train_loss": 1.0, "round": 1}
    int8 = len(UpdateEncoder(EncoderConfig(quant_bits=8), np.random.default_rng(0)).encode({"w": plain}, meta))
    assert p.upload_bytes == 20_000 * 12 // 8 <= 1.5 * int8
    # the proof: n * B for the signal, the noise's bound (exceeded with probability < 2**-40)
    noise = noise_sum_bound(p.noise_sigma, 1000, p.rotated_dim)
    assert 1000 * p.clip_bound + noise < 2**11
    assert P_WRAP <= 2.0**-40
    with pytest.raises(SumMayWrap):
        group_params("g", 1000, 20_000, clip=1.0, noise_multiplier=1.0, modulus_bits=11)


def test_every_phone_keeps_its_bounds_and_the_sum_neither_wraps_nor_drifts() -> None:
    n, d = 200, 3000
    p = group_params("g", n, d, clip=1.0, noise_multiplier=0.5, graph_seed=b"s")
    rng = np.random.default_rng(1)
    direction = rng.normal(0, 1, d)
    updates = [direction / np.linalg.norm(direction) * 2.0 + rng.normal(0, 0.05, d) for _ in range(n)]  # all clipped
    ints = [to_integers(u, p, np.random.default_rng([1, i])) for i, u in enumerate(updates)]
    for q in ints:
        assert np.abs(q).max() <= p.value_bound
    total = np.sum(ints, axis=0)
    residues = np.bitwise_and(np.sum([to_field(q, p.modulus_bits) for q in ints], axis=0),
                              np.uint64(2**p.modulus_bits - 1))
    np.testing.assert_array_equal(from_field(residues, p.modulus_bits), total)  # no wrap
    mean = mean_from_sum(total, p, n)
    clipped = np.mean([u / max(1.0, float(np.linalg.norm(u))) for u in updates], axis=0)
    # the error: the summed noise (sigma z * sensitivity / gamma / n per coordinate) and the roundings
    noise_sd = 0.5 * p.sensitivity * math.sqrt(n / p.min_survivors) / (p.scale * n)
    err = mean - clipped
    assert float(np.std(err)) < 1.5 * math.hypot(noise_sd, 0.5 / (p.scale * math.sqrt(n)))
    assert abs(float(np.dot(mean, clipped)) / float(np.dot(clipped, clipped)) - 1) < 0.05  # unbiased direction


def test_rounding_stays_within_the_sensitivity() -> None:
    p = group_params("g", 1000, 20_000, clip=1.0)
    rng = np.random.default_rng(2)
    for i in range(5):
        x = rng.normal(0, 1, 20_000)
        q = to_integers(x, p, np.random.default_rng(i))
        assert float(np.linalg.norm(q)) <= p.sensitivity and np.abs(q).max() <= p.clip_bound
