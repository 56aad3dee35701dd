"""What a released phone keeps while it is not built: a row of columns per phone of the fleet.

Kept (restored exactly when the phone is built again):
- its random stream: the PCG64 state (128 bits, as two uint64), its buffered 32-bit draw, and how
  many children its seed sequence has spawned (the increment is its seed's, made again);
- its update counter (update ids stay unique), its signing key's last nonce (no replay refusals);
- its encoder, when it has one that draws nothing (the default codec): the child of the phone's seed
  sequence it was spawned from and the codec it was made for (a phone with another encoder is not
  released: fleet_release.ReleasablePhone.may_release);
- its counters (participations, check-ins, ...) and, of each list of step times, the sum and the
  count: it comes back as ``[sum, 0.0, ...]`` (count values), whose mean (what devices.csv reports)
  equals the sum over the count. Below 8 values that is the mean of the values bit for bit; from 8
  on numpy's pairwise mean of the values themselves may differ in the last bits.
Dropped by design: nothing else survives a release (a phone holding more is not released).
About 120 bytes a phone, allocated for the whole fleet at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.device_runtime.emulated_device import PhoneClient
from fedfleet.device_runtime.fleet_columns import child_seed
from fedfleet.device_runtime.phone_stats import PhoneStats
from fedfleet.protocol import EncoderConfig, UpdateEncoder

COUNTERS = ("participations", "checkins", "rejected", "errors", "drops", "bytes_up", "bytes_down")
TIMES = ("latencies_s", "download_s", "train_s", "upload_s")
MASK64 = (1 << 64) - 1


class ParkedPhones:
    def __init__(self, phones: int) -> None:
        self.saved = np.zeros(phones, dtype=bool)  # phone i was built and released at least once
        self.rng = np.zeros((phones, 2), dtype=np.uint64)  # PCG64 state: high, low 64 bits
        self.rng_extra = np.zeros((phones, 2), dtype=np.uint32)  # has_uint32, uinteger
        self.spawned = np.zeros(phones, dtype=np.uint32)  # children spawned from its seed sequence
        self.updates_sent = np.zeros(phones, dtype=np.int64)
        self.nonce = np.zeros(phones, dtype=np.int64)
        self.encoder_child = np.full(phones, -1, dtype=np.int32)  # -1: no encoder
        self.codec = np.zeros(phones, dtype=np.int16)  # index into ``codecs``
        self.counters = np.zeros((phones, len(COUNTERS)), dtype=np.int64)
        self.time_sums = np.zeros((phones, len(TIMES)), dtype=np.float64)
        self.time_counts = np.zeros((phones, len(TIMES)), dtype=np.int32)
        self.codecs: list[dict[str, Any]] = []  # the distinct codecs phones' encoders were made for

    def save(self, i: int, p: PhoneClient) -> None:
        """Phone ``i``'s state into row ``i`` (the phone may then be dropped)."""
        bitgen = p.rng.bit_generator
        state = bitgen.state
        s = int(state["state"]["state"])
        self.rng[i] = (s >> 64, s & MASK64)
        self.rng_extra[i] = (int(state["has_uint32"]), int(state["uinteger"]))
        self.spawned[i] = _seed_seq(p.rng).n_children_spawned
        self.updates_sent[i] = p._updates_sent
        self.nonce[i] = p.key._last if p.key is not None else 0
        if p.encoder is not None:
            self.encoder_child[i] = _seed_seq(p.encoder.rng).spawn_key[-1]
            codec = dict(p._codec or {})
            if codec not in self.codecs:
                self.codecs.append(codec)
            self.codec[i] = self.codecs.index(codec)
        else:
            self.encoder_child[i] = -1
        stats = p.stats
        self.counters[i] = [getattr(stats, c) for c in COUNTERS]
        for j, name in enumerate(TIMES):
            total = 0.0
            for x in getattr(stats, name):  # in order, as _mean_cell sums fewer than 8
                total += x
            self.time_sums[i, j], self.time_counts[i, j] = total, len(getattr(stats, name))
        self.saved[i] = True

    def generator(self, i: int, fresh: np.random.Generator) -> np.random.Generator:
        """Phone ``i``'s generator as it was saved (``fresh``: the one its columns make, unused)."""
        if not self.saved[i]:
            return fresh
        root = _seed_seq(fresh)
        seq = np.random.SeedSequence(root.entropy, spawn_key=root.spawn_key, pool_size=root.pool_size,
                                     n_children_spawned=int(self.spawned[i]))
        bitgen = type(fresh.bit_generator)(seq)
        state = dict(bitgen.state)
        state["state"] = dict(state["state"])
        hi, lo = (int(v) for v in self.rng[i])
        state["state"]["state"] = (hi << 64) | lo
        state["has_uint32"], state["uinteger"] = (int(v) for v in self.rng_extra[i])
        bitgen.state = state
        return np.random.Generator(bitgen)

    def restore(self, i: int, p: PhoneClient) -> None:
        """Phone ``p``, built afresh as phone ``i`` on ``generator(i, ...)``, given the rest of its saved state."""
        if not self.saved[i]:
            return
        p._updates_sent = int(self.updates_sent[i])
        if p.key is not None:
            p.key._last = int(self.nonce[i])
        child = int(self.encoder_child[i])
        if child >= 0:
            codec = self.codecs[int(self.codec[i])]
            enc_rng = np.random.Generator(type(p.rng.bit_generator)(child_seed(_seed_seq(p.rng), child)))
            p.encoder, p._codec = UpdateEncoder(EncoderConfig.from_mapping(codec), enc_rng), dict(codec)
        self._fill(i, p.stats)

    def stats(self, i: int, name: str, examples: int) -> PhoneStats:
        """Phone ``i``'s counters as its devices.csv row needs them, without building the phone."""
        stats = PhoneStats(name, examples)
        self._fill(i, stats)
        return stats

    def _fill(self, i: int, stats: PhoneStats) -> None:
        for c, v in zip(COUNTERS, self.counters[i].tolist(), strict=True):
            setattr(stats, c, v)
        for j, field in enumerate(TIMES):
            n = int(self.time_counts[i, j])
            setattr(stats, field, [float(self.time_sums[i, j])] + [0.0] * (n - 1) if n else [])


def _seed_seq(rng: np.random.Generator) -> np.random.SeedSequence:
    seq = rng.bit_generator.seed_seq
    assert isinstance(seq, np.random.SeedSequence)  # a fleet's generators are children of its SeedSequence
    return seq
