"""The sync coordinator's secure rounds: one ``SecureGroup`` per round (server/secagg.py),
the finished group's sum turned into the round's contribution, and the configuration's
secure-aggregation fields checked where they are defined."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedfleet.protocol.secagg.coords import shared_coordinates
from fedfleet.protocol.secagg.integer import mean_from_sum, unflatten
from fedfleet.server.secagg import SecAggSettings, SecureGroup
from fedfleet.server.secagg_journal import Journal, replay
from fedfleet.server.store import Store
from fedfleet.server.updates import Contribution


class SecureRounds:
    """The sync coordinator's secure groups: one per round, made at its first secure message.
    Counts aborted groups until the next merge, and turns a finished group's sum into the
    round's one contribution (the mean of the survivors' integer updates, back in floats).
    Each acknowledged message is committed to the store first (server/secagg_journal.py): a
    restart rebuilds the open round's group as it was."""

    def __init__(self, settings: SecAggSettings, shapes: Mapping[str, tuple[int, ...]],
                 clock: Callable[[], float], store: Store, round_number: int) -> None:
        self.settings, self.shapes, self.clock = settings, dict(shapes), clock
        self.dim = sum(int(np.prod(s)) for s in self.shapes.values())
        self.current: SecureGroup | None = None
        self.aborted = 0  # groups aborted since the last merge
        self.last_aborted: SecureGroup | None = None
        self.journal = Journal(store.db)
        for number, entries in self.journal.groups().items():  # only the open round's group is live
            if number != round_number or entries[0][0] != "round":
                self.journal.end(number)
                continue
            g = SecureGroup(number, int(entries[0][2]), self.dim, settings, clock)
            for kind, phone, body in entries[1:]:
                replay(g, kind, phone, body)
            self.current, g.journal = g, self._writer(number)

    def _writer(self, number: int) -> Callable[[str, str, bytes], None]:
        return lambda kind, phone, body: self.journal.write(number, kind, phone, body)

    def group(self, round_number: int, target: int) -> SecureGroup:
        g = self.current
        if g is None or g.round != round_number:
            self.journal.keep_only(round_number)  # earlier rounds' groups merged or aborted
            self.journal.write(round_number, "round", "", str(target).encode())
            g = self.current = SecureGroup(round_number, target, self.dim, self.settings, self.clock)
            g.journal = self._writer(round_number)
        return g

    def tick(self) -> bool:
        """Step deadlines; True when the current group has aborted (the round restarts)."""
        g = self.current
        if g is None:
            return False
        if g.step not in ("done", "aborted"):
            g.tick()
        if g.step == "aborted":
            self.journal.end(g.round)
            self.aborted += 1
            self.last_aborted, self.current = g, None
            return True
        return False

    def abort_notice(self, phone: str, group: SecureGroup) -> str | None:
        """Why the group of ``phone`` aborted, if it did and the phone is not in the round's new one."""
        gone = self.last_aborted
        if gone is not None and phone in gone.keys and phone not in group.keys:
            return f"{gone.name} aborted ({gone.abort_reason}); check in again"
        return None

    def took_part(self, phone: str, round_number: int) -> bool:
        """Whether ``phone`` advertised keys in this round's group, or came too late to: either
        way it waits for the next round instead of training for this one."""
        g = self.current
        return g is not None and g.round == round_number and (phone in g.keys or g.step != "advertise")

    def done(self, round_number: int) -> bool:
        g = self.current
        return g is not None and g.round == round_number and g.step == "done"

    def contribution(self, ledger: Callable[[], Any], store: Store) -> tuple[Contribution, dict[str, Any]]:
        """The finished group as the round's one contribution, and its round-record fields."""
        g = self.current
        assert g is not None, "merge only a finished group"
        out = group_contribution(g, self.shapes, self.clock, self.aborted, ledger, store)
        self.aborted, self.current = 0, None
        return out


def group_contribution(g: SecureGroup, shapes: Mapping[str, tuple[int, ...]], clock: Callable[[], float],
                       aborted: int, ledger: Callable[[], Any], store: Store) -> tuple[Contribution, dict[str, Any]]:
    """A finished group as one contribution (the mean of the survivors' integer updates, back in
    floats), and its round-record fields. With noise, each survivor is charged one round of
    distributed DP in the privacy ledger (``ledger()``), saved before the merge commits: a crash
    in between over-counts, never under-counts."""
    assert g.total is not None and g.params is not None, "merge only a finished group"
    survivors = len(g.masked)
    p = g.params
    mean = mean_from_sum(g.total, p, survivors)
    if p.dim < p.model_dim:  # shared random-k: back to every coordinate, unbiased (x D / k)
        full = np.zeros(p.model_dim)
        full[shared_coordinates(p.graph_seed, p.context, p.model_dim, p.dim)] = mean * (p.model_dim / p.dim)
        mean = full
    delta = unflatten(mean, shapes)  # float64: the optimizer adds it in float64
    c = Contribution(f"secagg:{g.name}", f"{g.name}/sum", delta, survivors, None,
                     clock() - g.opened_at, 0, g.bytes_up)
    masked_bytes = survivors * p.upload_bytes
    extra = {"updates": survivors, "dropped": g.dropped(), "update_bytes": masked_bytes,
             "dense_bytes": 4 * p.dim * survivors, "compression_ratio": 4 * p.dim / p.upload_bytes,
             "secagg_bytes_up": g.bytes_up, "secagg_bytes_down": g.bytes_down,
             "secagg_unmask_ms": g.unmask_ms, "secagg_dropped": g.dropped(), "secagg_aborted": aborted,
             "secagg_survivors": survivors, "secagg_modulus_bits": g.params.modulus_bits}
    if g.params.noise_sigma > 0:
        from fedfleet.protocol.secagg.dp import ledger_release  # dp_accounting: imported when used

        book, release = ledger(), ledger_release(g.params, survivors)
        by_index = {i: phone for phone, i in g.index.items()}
        for i in sorted(g.masked):
            book.charge(by_index[i], release)
        store.set_meta("ledger", json.dumps(book.to_dict()))
        summary = book.summary()
        extra.update(distributed_noise_sigma=g.params.noise_sigma, distributed_noise_multiplier=release.noise_multiplier,
                     delta=summary.delta, distributed_epsilon_max=summary.max_epsilon,
                     distributed_epsilon_median=summary.median_epsilon)
    return c, extra


def settings_of(config: Any) -> SecAggSettings:
    return SecAggSettings(config.secagg_threshold, config.secagg_degree or None, config.secagg_clip,
                          config.secagg_modulus_bits, config.distributed_noise_multiplier,
                          config.secagg_step_timeout_s, config.seed,
                          float(config.codec.get("density", 1.0)) if config.codec.get("sparsify") == "randk" else 1.0)


def check_secure_config(config: Any) -> None:
    """ServerConfig's secure-aggregation fields, checked where they are defined."""
    if config.mode not in ("sync", "async"):
        raise ValueError(f"secure aggregation runs in sync or async mode, not {config.mode!r}")
    if config.mode == "async" and not 2 <= config.buffer_size <= config.concurrency:
        raise ValueError("secure async groups are buffers of K phones training at once: buffer_size must be "
                         f">= 2 and <= concurrency, got buffer_size {config.buffer_size}, "
                         f"concurrency {config.concurrency}")
    if config.robust != "none" or config.central_noise_multiplier > 0:
        raise ValueError("secure aggregation cannot be combined with robust rules or central DP: "
                         "the server never sees single updates")
    if config.codec.get("sparsify") == "topk":
        raise ValueError("top-k cannot be combined with secure aggregation: the kept coordinates leak the update")
    if config.codec.get("sparsify") == "randk" and "density" not in config.codec:
        raise ValueError("secure aggregation's shared random-k takes a density (--randk), not a count")
    unused = sorted(set(config.codec) - {"clip", "sparsify", "density"})
    if unused:
        raise ValueError(f"codec settings {unused} do not apply to secure aggregation (its updates are integers "
                         "mod 2**b; only --clip and --randk do)")
    if not 0.5 < config.secagg_threshold <= 1:
        raise ValueError(f"secagg_threshold must be in (0.5, 1], got {config.secagg_threshold!r}")
    if config.secagg_degree < 0 or config.secagg_degree % 2:
        raise ValueError(f"secagg_degree must be even and >= 0 (0 = about 2 log2 n), got {config.secagg_degree}")
    if not config.secagg_clip > 0 or not (config.secagg_modulus_bits == 0 or 2 <= config.secagg_modulus_bits <= 62):
        raise ValueError("secagg_clip must be > 0 and secagg_modulus_bits 0 (smallest that fits, at least 12) "
                         f"or in [2, 62], got {config.secagg_modulus_bits}")
    if not config.distributed_noise_multiplier >= 0 or not config.secagg_step_timeout_s > 0:
        raise ValueError("distributed_noise_multiplier must be >= 0 and secagg_step_timeout_s > 0")
