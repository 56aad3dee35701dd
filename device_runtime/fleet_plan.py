"""A fleet's configuration and what it draws from its seed before any server is up: the phones'
shards, generators, device profiles, attackers and first check-in times."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from fedfleet.device_runtime.attacks import Attack, choose_attackers, parse_attack
from fedfleet.device_runtime.data import Dataset, partition
from fedfleet.device_runtime.fleet_columns import Shard, Shards, child_seed, key_seed
from fedfleet.device_runtime.profiles import (
    DeviceProfile,
    ProfileColumns,
    ProfileSpec,
    load_profiles,
    sample_profile_columns,
)
from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.protocol.signing import PhoneKey


@dataclass(frozen=True)
class FleetConfig:
    phones: int = 50
    partition: str = "iid"  # iid | dirichlet:ALPHA | shards:K
    quantity_skew: float = 0.0  # lognormal sigma of phone dataset sizes (iid)
    seed: int = 0
    workers: int = 2  # training threads: pool, local trainings at once (one runtime each); batched, chunks at once
    availability: float = 1.0  # probability a phone is available at a check-in
    name_prefix: str = "phone"
    phone_name: str | None = None  # one phone (fedfleet phone --name): it registers as exactly this
    max_rounds: int = 0  # stop after the server recorded this many rounds (0 = until it finishes)
    poll_s: float = 0.25
    hours: float = 0.0  # stop after this much (virtual) time; 0 = until the server's task is done
    devices: str = "none"  # none (no emulated delays) | default (drawn profiles) | PATH.csv (a trace)
    profile_spec: ProfileSpec = ProfileSpec()
    runtime: str = "torch"  # one of RUNTIME_NAMES: executorch and onnx run the server's bundle
    trainer: str = "batched"  # batched (phones on the same version in one vmapped step) | pool (one by one)
    attack: str = "none"  # device_runtime.attacks: none | signflip | scale:F | noise:STD | labelflip
    attack_fraction: float = 0.0  # share of phones (drawn with the fleet seed) that run ``attack``
    shard_index: int = 0  # run only this shard's phones (see ``shard_phones``); data and names as if all ran
    shard_count: int = 1
    inline_model: bool = True  # phones ask for the model inside the check-in's answer (one request less)
    # Phones make their next check-in with their upload (one request less again); None: yes, unless the fleet
    # has more than CHAIN_MAX_PHONES and shares its process (its one core) with the server. Chained uploads go
    # on the phones' own connections, all at once after a batched step, and queue at the server: 10,000 phones
    # x 3 rounds, server in its own process: 505 and 565 updates/s chained vs 388 and 486 not; in one process
    # 203 vs 298 (round 1: 40 s vs 27 s).
    chain_checkin: bool | None = None
    start_spread_s: float = 60.0  # virtual clock: phones first check in at seeded times in [0, this)
    # virtual clock: a phone is built and registers (over HTTP, as any) at its first check-in rather than
    # all before the first (fleet_activation.py): phones that never become active cost a row of columns
    register_when_active: bool = False
    # virtual clock: every phone registered before the first check-in in requests of 10,000 (POST
    # /v1/admin/phones with ``admin_token``; tokens in a column), built at its first check-in and
    # released back to the columns while it sleeps ``release_after_s`` or more (fleet_population.py)
    register_in_bulk: bool = False
    admin_token: str | None = None
    release_after_s: float = 60.0
    server_here: bool = True  # the server runs in this process (its sockets count against the same limit)
    # failed steps in a row after which a phone gives up (PhoneClient.run: backoff 0.2 s doubled up to
    # 10 s, so 20 is ~2.5 min of a server gone: time for it to be restarted on its data dir)
    phone_max_errors: int = 20
    model_fingerprint: str | None = None  # the phones' model (export.task_model): the server refuses another
    enrolment_codes: tuple[str, ...] = ()  # phone i registers with code i (a server that requires codes)
    device: str = "cpu"  # where batched training runs: cpu | cuda (resolved; export.accelerator.resolve_device)

    def __post_init__(self) -> None:
        if self.phones < 1 or self.workers < 1 or self.phone_max_errors < 0:
            raise ValueError("phones and workers must be at least 1, phone_max_errors at least 0")
        if not 0 < self.availability <= 1:
            raise ValueError("availability must be in (0, 1]")
        parse_attack(self.attack)
        if self.enrolment_codes and len(self.enrolment_codes) < self.phones:
            raise ValueError(f"{self.phones} phones need as many enrolment codes, got {len(self.enrolment_codes)}")
        if self.register_in_bulk and self.register_when_active:
            raise ValueError("register_in_bulk registers every phone up front; register_when_active, each when "
                             "active: choose one")
        if not self.release_after_s > 0:
            raise ValueError("release_after_s must be > 0")
        if self.runtime not in RUNTIME_NAMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_NAMES)}")
        if self.trainer not in ("batched", "pool"):
            raise ValueError("trainer must be 'batched' or 'pool'")
        if not 0 <= self.attack_fraction <= 1:
            raise ValueError("attack_fraction must be in [0, 1]")
        if not 0 <= self.shard_index < self.shard_count <= self.phones:
            raise ValueError(f"shard {self.shard_index} of {self.shard_count} is not a shard of {self.phones} phones")
        if self.phone_name is not None and len(shard_phones(self.phones, self.shard_index, self.shard_count)) != 1:
            raise ValueError("phone_name names one phone: the shard that runs must hold exactly one")


def shard_phones(phones: int, shard_index: int, shard_count: int) -> range:
    """The phone indices of one shard: contiguous blocks, sizes differing by at most one."""
    size, extra = divmod(phones, shard_count)
    start = shard_index * size + min(shard_index, extra)
    return range(start, start + size + (shard_index < extra))


PhoneParts = tuple[Shard, np.random.Generator, PhoneKey]  # data, generator, key


@dataclass
class FleetPlan:
    """What a fleet takes from its configuration and data alone: the phones' shards, seeded
    generators (the fleet generator's ``spawn``, child by child), device profiles, attackers and
    first check-in times, drawn in that order from ``cfg.seed``. Held as columns
    (``fleet_columns``): a phone's data, generator and key are made when it is asked for
    (``phone``), as it registers."""

    cfg: FleetConfig
    data: Dataset
    virtual: bool
    shards: Shards
    seed_root: np.random.SeedSequence  # the fleet generator's: phone i's generator is its i-th child
    bit_generator: type[np.random.BitGenerator]
    profiles: ProfileColumns | list[DeviceProfile] | None  # drawn, or a trace's (cycled)
    attack: Attack
    attackers: set[int]
    starts: np.ndarray
    shard: range
    key_secret: bytes = field(default_factory=lambda: os.urandom(32))  # phones' keys (fleet_columns.key_seed)

    def phone(self, i: int) -> PhoneParts:
        """Phone ``i``'s data, generator (the same stream as ``rng.spawn(phones)[i]``) and key."""
        data = Shard(self.data.x_train, self.data.y_train, self.shards.index(i))
        rng = np.random.Generator(self.bit_generator(child_seed(self.seed_root, i)))
        return data, rng, PhoneKey(key_seed(self.key_secret, i))

    def profile(self, i: int) -> DeviceProfile | None:
        profiles = self.profiles
        if profiles is None:
            return None
        if isinstance(profiles, list):
            return profiles[i % len(profiles)]
        return profiles.profile(i)


def plan_fleet(data: Dataset, cfg: FleetConfig, virtual: bool = False) -> FleetPlan:
    """The fleet's draws from its seed (see FleetPlan); ``virtual``: it will run on a virtual clock."""
    rng = np.random.default_rng(cfg.seed)
    shards = Shards.of(partition(data.y_train, cfg.phones, cfg.partition, rng, cfg.quantity_skew))
    # rng.spawn(cfg.phones) without building the generators or seed sequences (fleet_columns.child_seed)
    seed_root = rng.bit_generator.seed_seq
    assert isinstance(seed_root, np.random.SeedSequence)  # default_rng's is one
    profiles = fleet_profiles(cfg, rng)
    attack = parse_attack(cfg.attack)
    attackers = set(choose_attackers(cfg.phones, cfg.attack_fraction, rng).tolist())
    # On a virtual clock, requests at one instant race one another to the server (which phone takes
    # the last free slot depends on socket timing); at distinct instants they run strictly in
    # time order. So the fleet does not start at one instant: each phone's first check-in is
    # at its own seeded time (a real fleet does not wake in unison either).
    starts = rng.uniform(0.0, cfg.start_spread_s, cfg.phones) if virtual else np.zeros(cfg.phones)
    return FleetPlan(cfg, data, virtual, shards, seed_root, type(rng.bit_generator), profiles, attack, attackers,
                     starts, shard_phones(cfg.phones, cfg.shard_index, cfg.shard_count))


def fleet_profiles(cfg: FleetConfig, rng: np.random.Generator) -> ProfileColumns | list[DeviceProfile] | None:
    """The phones' profiles: none, drawn from ``cfg.profile_spec`` (columns), or a trace's, cycled."""
    if cfg.devices == "none":
        return None
    if cfg.devices == "default":
        return sample_profile_columns(cfg.phones, rng, cfg.profile_spec)
    return load_profiles(cfg.devices)
