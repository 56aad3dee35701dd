"""One typed config for the server; defaults in one place, loadable from TOML."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfleet.export.accelerator import resolve_device
from fedfleet.protocol.plan import PLAN_FIELDS, TrainPlan

if TYPE_CHECKING:
    from fedfleet.protocol.topology import Topology
    from fedfleet.server.strategy import Strategy


@dataclass(frozen=True)
class ServerConfig:
    # --- the task: which model, trained how -------------------------------------------
    model: str = "cnn"  # mlp | cnn | mobilenet | MODULE:ATTR (a callable returning a torch.nn.Module)
    input_shape: tuple[int, ...] = (1, 8, 8)  # one example: C, H, W (images), T, F (sequences), F (features)
    init_weights: str | None = None  # safetensors or torch state_dict file: version 0 (default: drawn from seed)
    num_classes: int = 10
    seed: int = 0  # initial parameters are drawn from this seed
    # the task's loss and metrics (export/task_loss.py; docs/your-own-task.md): MODULE:ATTR, phones train the loss
    loss: str | None = None  # None or "cross_entropy": the built-in; part of the model fingerprint otherwise
    metrics: str | None = None  # evaluated on the test split with each version, beside accuracy and loss
    # the training plan sent to phones with each task: defaults and limits in protocol/plan.py
    local_epochs: int = TrainPlan.local_epochs
    batch_size: int = TrainPlan.batch_size
    lr: float = TrainPlan.lr  # client SGD learning rate
    prox_mu: float = TrainPlan.prox_mu  # FedProx proximal weight; 0 = FedAvg
    # --- synchronous rounds -------------------------------------------------------------
    rounds: int = 10  # 0 = run until stopped
    sample_fraction: float = 0.5  # fraction of registered phones that must report per round
    min_cohort: int = 1  # never fewer than this many phones per round
    over_selection: float = 1.3  # hand out work to this many times the target (stragglers)
    round_timeout_s: float = 60.0  # sync: close with what arrived after this; async: task timeout
    min_updates: int = 1
    # a phone past its appointment (a task's deadline, a wait's retry) by more than this is away: sync rounds
    # size their cohort on the phones not away (server/appointments.py). None: round_timeout_s; inf: never away
    cohort_grace_s: float | None = None
    example_cap: int = 10_000  # an update weighs min(num_examples, example_cap)
    # --- merging (both modes) ------------------------------------------------------------
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi (Reddi et al. 2021)
    server_lr: float = 1.0  # new = old + server_lr * optimizer(weighted mean of deltas)
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam / fedyogi
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # --- model state: batch norm running statistics (docs/model-state.md) -------------------
    local_state: bool = False  # FedBN (Li et al. 2021): phones keep their own; False: merged and shipped
    # --- asynchronous mode (FedBuff, Nguyen et al. 2022) ---------------------------------
    mode: str = "sync"  # sync | async
    concurrency: int = 20  # async: phones training at once
    buffer_size: int = 10  # async: K updates per merge
    staleness: str = "poly:0.5"  # constant | inverse | poly:A | hinge:A:B
    max_staleness: int = 20  # async: older updates get 409 (refresh)
    # --- the update codec phones must use, and privacy ------------------------------------
    codec: dict[str, Any] = field(default_factory=dict)  # protocol.EncoderConfig fields; {} = dense float32
    dp_delta: float = 1e-5  # delta at which epsilon is reported
    epsilon_budget: float = 0.0  # a phone whose local-DP epsilon would pass this gets no more work (0 = none)
    central_clip: float = 0.0  # central DP (DP-FedAvg): clip each update to this L2 norm (0 = off)
    central_noise_multiplier: float = 0.0  # ...and add N(0, (z * clip)^2) to the sum
    # --- secure aggregation, sync mode (server/secagg.py, docs/secure-aggregation.md) -----
    secure_agg: bool = False  # the round's cohort masks its integer updates (SecAgg+): the server sees only the sum
    secagg_threshold: float = 0.55  # fraction of neighbours (shares) and of the group (survivors) needed to unmask
    secagg_degree: int = 0  # neighbours per phone (0 = about 2 log2 n)
    secagg_clip: float = 1.0  # L2 clip of each update before it becomes integers
    secagg_modulus_bits: int = 0  # b, bits per masked value (0 = the smallest b >= 12 at which the sum fits)
    distributed_noise_multiplier: float = 0.0  # z of the central Gaussian the phones' summed noise amounts to
    secagg_step_timeout_s: float = 30.0  # phones that have not acted by then are dropped from the step
    # --- Byzantine robustness (server/robust.py) -------------------------------------------
    robust: str = "none"  # none | normbound:C | normbound:median*K | median | trimmed:B | krum:F | multikrum:F[:M], '+'-chained
    # --- a strategy of one's own (server/strategy.py; docs/strategies.md) --------------------
    strategy: Strategy | str | None = None  # a Strategy object or "MODULE:ATTR" merges instead of the built-in
    # FedAvg (server_optimizer and robust then stay at their defaults; central DP wraps it)
    # --- limits -------------------------------------------------------------------------
    max_update_bytes: int = 16 << 20  # bodies over this get 413
    max_examples: int = 10_000_000  # a phone claiming more is refused (400)
    max_update_norm: float = 1e6  # an update whose L2 norm exceeds this is refused (400; 0 = no limit)
    checkin_retry_s: float = 1.0  # how long a phone without work should wait
    rest_after_update_s: float = 0.0  # a phone that just contributed checks in again after this
    checkin_hold_s: float = 0.0  # long poll: a check-in finding no work waits up to this for some (0 = answer now;
    # keep 0 when the server follows a virtual clock: a held phone would stop that clock)
    checkin_pace: float = 4.0  # pace steering: check-ins wanted per task handed out (<= 1: fixed checkin_retry_s)
    max_checkin_retry_s: float = 6 * 3600.0  # pace steering never asks a phone to stay away longer
    max_concurrent_uploads: int = 64  # bodies read and checked at once; later uploads queue for a slot (FIFO)
    max_waiting_uploads: int = 16384  # ...this many at most (a waiting upload's body stays in its socket);
    upload_wait_s: float = 30.0  # ...for this long at most; beyond either, 503 + Retry-After (backpressure)
    request_timeout_s: float = 30.0  # a body that takes longer to arrive gets 408 (slow-loris)
    inline_model_max_bytes: int = 1 << 20  # a check-in asking for it gets its task and model in one answer
    # when the model message is at most this size (one round trip less per task; 0 = never)
    # Failed-request budgets (server/ratelimit.py): each 4xx costs its client a token; a client with
    # none left gets 429 + Retry-After from its headers alone. Honest phones almost never see a 4xx.
    reject_burst: int = 30  # failed requests a phone may make at once (0 = no failure budgets at all)
    reject_rate_per_s: float = 1.0  # ...and per second after that
    peer_reject_burst: int = 600  # unauthenticated failures per address: large, many phones share one behind NAT
    peer_reject_rate_per_s: float = 20.0
    ratelimit_peer_header: str | None = None  # behind a trusted proxy: the header with the client address
    # (e.g. "X-Forwarded-For"; its last entry is used). Leave None on a direct connection: clients could forge it.
    idle_timeout_s: float = 20.0  # a connection with no complete request for this long is closed (idle
    # keep-alive and slow-loris headers alike); above aiohttp's client keep-alive (15 s), so clients close first
    require_signatures: bool = False  # phones must enrol an Ed25519 key and sign every upload
    signature_skew_s: float = 300.0  # accepted distance of a signature's nonce from the server clock
    admin_token: str | None = None  # bearer token for /v1/admin/*; None disables admin endpoints
    # --- enrolment (server/enrolment.py) and its rate budget (server/ratelimit.py) ---------------
    enrolment_codes: str | None = None  # file of admin-issued single-use codes: registration then needs one
    # registrations (successful or not) per address: a fresh identity cannot buy a fresh failure budget
    register_burst: int = 100  # registrations an address may make at once (0 = no registration budget)
    register_rate_per_s: float = 0.1  # ...and per second after that (360 an hour)
    # addresses without a registration budget (CIDR): loopback, where an emulated fleet registers its thousands
    register_trusted: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # --- gossip mode: phones average with their neighbours; the server only relays (server/relay.py) ---
    topology: str = "none"  # none | ring | ring-matchings | torus | regular:D | exponential | complete | matching | edges:PATH
    gossip_phones: int = 0  # the topology's phones, named {gossip_prefix}-00000, -00001, ... (edges files name them)
    gossip_prefix: str = "phone"
    # --- state ---------------------------------------------------------------------------
    data_dir: str | None = None  # SQLite file and metrics live here; None = in memory
    sqlite_sync: str = "full"  # full: fsync every commit (survives power loss) | normal: survives kill -9 only
    bundle_dir: str | None = None  # the task's exported bundle (fedfleet export), served at /v1/bundle
    # --- accelerator (export/accelerator.py): where the evaluation's arithmetic runs: auto | cpu | cuda ---
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self)
        if self.device != "auto":  # cuda on a machine without one is refused here, not at the first evaluation
            resolve_device(self.device)
        TrainPlan(self.local_epochs, self.batch_size, self.lr, self.prox_mu)  # what phones would refuse
        if self.checkin_pace < 0 or self.checkin_retry_s < 0 or self.checkin_hold_s < 0:
            raise ValueError("checkin_pace, checkin_retry_s and checkin_hold_s must be >= 0")
        if self.max_concurrent_uploads < 1 or self.max_waiting_uploads < 0 or not self.upload_wait_s >= 0:
            raise ValueError("max_concurrent_uploads must be >= 1, max_waiting_uploads and upload_wait_s >= 0")
        if self.inline_model_max_bytes < 0:
            raise ValueError("inline_model_max_bytes must be >= 0 (0 = never inline the model)")
        if self.sqlite_sync not in ("full", "normal"):
            raise ValueError("sqlite_sync must be 'full' or 'normal'")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")
        if self.over_selection < 1:
            raise ValueError("over_selection must be at least 1")
        if self.min_cohort < 1 or self.min_updates < 1:
            raise ValueError("min_cohort and min_updates must be at least 1")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0 (0 = forever)")
        if self.register_burst < 0 or not (self.register_rate_per_s > 0 and math.isfinite(self.register_rate_per_s)):
            raise ValueError("register_burst must be >= 0 and register_rate_per_s a positive number")
        object.__setattr__(self, "register_trusted", trusted_networks(self.register_trusted))
        if self.cohort_grace_s is not None and not self.cohort_grace_s >= 0:
            raise ValueError("cohort_grace_s must be >= 0 (inf: never count a phone as away)")
        for name in ("server_lr", "round_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number")
        if self.mode not in ("sync", "async"):
            raise ValueError("mode must be 'sync' or 'async'")
        if self.concurrency < 1 or self.buffer_size < 1 or self.max_staleness < 0:
            raise ValueError("concurrency and buffer_size must be >= 1, max_staleness >= 0")
        from fedfleet.server.optimizers import ServerOptimizer
        from fedfleet.server.staleness import parse_staleness

        parse_staleness(self.staleness)
        from fedfleet.protocol import EncoderConfig

        EncoderConfig.from_mapping(self.codec)
        if not 0 < self.dp_delta < 1 or self.epsilon_budget < 0:
            raise ValueError("dp_delta must be in (0, 1) and epsilon_budget >= 0")
        if (self.central_clip > 0) != (self.central_noise_multiplier > 0) or self.central_clip < 0:
            raise ValueError("central DP needs both central_clip > 0 and central_noise_multiplier > 0")
        ServerOptimizer(self.server_optimizer, self.server_lr, self.server_momentum, self.server_beta1,
                        self.server_beta2, self.server_tau)
        from fedfleet.server.robust import parse_rule

        rule = parse_rule(self.robust)
        if self.central_noise_multiplier > 0 and rule.text != "none":
            raise ValueError("robust aggregation cannot be combined with central DP: its noise is calibrated to a clipped sum")
        if self.mode == "async" and self.buffer_size < rule.min_updates:
            raise ValueError(f"robust {self.robust!r} needs buffer_size >= {rule.min_updates}")
        self._check_strategy()
        self._check_loss_metrics()
        if not (self.max_update_norm >= 0 and math.isfinite(self.max_update_norm)):
            raise ValueError("max_update_norm must be a finite number >= 0 (0 = no limit)")
        if min(self.reject_burst, self.peer_reject_burst) < 0 or not min(self.reject_rate_per_s,
                                                                          self.peer_reject_rate_per_s) > 0:
            raise ValueError("reject_burst and peer_reject_burst must be >= 0, their rates > 0")
        if not self.idle_timeout_s > 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.secure_agg:
            from fedfleet.server.secagg_rounds import check_secure_config

            check_secure_config(self)
        elif self.distributed_noise_multiplier:
            raise ValueError("distributed_noise_multiplier needs secure_agg (--secure-agg): phones of a secure group "
                             "add that noise")
        if self.example_cap < 1 or self.max_update_bytes < 1024:
            raise ValueError("example_cap must be >= 1 and max_update_bytes >= 1024")
        if self.topology != "none":
            self.gossip_topology()  # raises TopologyError (a ValueError) for a bad spec or edges file

    def gossip_topology(self) -> Topology:
        """The relay's graph (gossip mode): ``topology`` over ``gossip_phones`` phones, seeded by ``seed``."""
        from fedfleet.protocol.topology import parse_topology, phone_names

        return parse_topology(self.topology, phone_names(self.gossip_prefix, self.gossip_phones), self.seed)

    def _check_loss_metrics(self) -> None:
        """The task's loss and metrics are named MODULE:ATTR (imported where they run: fedfleet.task checks them)."""
        from fedfleet.export.refs import is_ref

        for name, value, builtin in (("loss", self.loss, "cross_entropy"), ("metrics", self.metrics, None)):
            if value is not None and value != builtin and not is_ref(value):
                raise ValueError(f"{name} (--{name}) must be MODULE:ATTR (a callable)"
                                 f"{' or cross_entropy' if builtin else ''}, got {value!r}")

    def _check_strategy(self) -> None:
        """A strategy of one's own replaces the built-in merge its settings describe; it must load."""
        if self.strategy is None:
            return
        from fedfleet.server.strategies import config_strategy
        from fedfleet.server.strategy import Strategy

        if not isinstance(self.strategy, str | Strategy):
            raise ValueError(f"strategy must be a Strategy object or 'MODULE:ATTR', got {self.strategy!r}")
        builtin = ("server_optimizer", "robust", "server_lr", "server_momentum", "server_beta1", "server_beta2",
                   "server_tau")
        changed = [n for n in builtin if getattr(self, n) != getattr(ServerConfig, n)]
        if changed:
            raise ValueError(f"strategy replaces the built-in merge: leave {', '.join(changed)} at the default "
                             "(configure your strategy instead)")
        strategy = config_strategy(self)
        if self.mode == "async" and self.buffer_size < strategy.min_updates:
            raise ValueError(f"strategy {strategy.name} needs buffer_size >= {strategy.min_updates}")

    def train_plan(self) -> dict[str, Any]:
        """The local-training part of a task, as sent to phones: the TrainPlan's fields and the codec."""
        return {**{name: getattr(self, name) for name in PLAN_FIELDS}, "codec": dict(self.codec),
                **({"secure_agg": True} if self.secure_agg else {})}

    def replace(self, **changes: Any) -> ServerConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown server settings: {sorted(unknown)}")
        if "input_shape" in changes:
            changes["input_shape"] = tuple(changes["input_shape"])
        return dataclasses.replace(self, **changes)


def load_toml(path: str | Path, section: str = "server") -> dict[str, Any]:
    """Read one section of a TOML file (the whole file when it has no such table). Errors name the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror or exc}") from None
    sub = data.get(section, data)
    if not isinstance(sub, dict):
        raise ValueError(f"--config {path}: [{section}] must be a table")
    return sub


_KINDS = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false"}


def trusted_networks(value: Any) -> tuple[str, ...]:
    """``register_trusted`` as a tuple of CIDR strings, each checked (ValueError naming a bad one)."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"register_trusted must be a list of networks (CIDR strings), got {value!r}")
    for v in value:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueError(f"register_trusted: {v!r} is not a network such as 10.0.0.0/8 or ::1/128") from None
    return tuple(value)


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind.startswith("tuple[int"):
        return isinstance(value, (tuple, list)) and all(_is_kind(v, "int") for v in value)
    if kind.startswith("dict["):
        return isinstance(value, dict)
    return True  # a type this check does not know: the field's own validation decides


def check_types(obj: Any, flag: Any = None) -> None:
    """Raise ValueError naming the first field of dataclass ``obj`` whose value is not of its annotated
    type (from a TOML file, say: ``phones = "four"``), before arithmetic on it fails obscurely.
    ``flag(name)``: the command-line flag of a field, added to the message when not None."""
    for f in dataclasses.fields(obj):
        check_type(f.name, f.type, getattr(obj, f.name), flag(f.name) if flag is not None else None)


def check_type(name: str, annotation: Any, value: Any, where: str | None = None) -> None:
    """Raise ValueError naming ``name`` (and its flag ``where``) when ``value`` is not of the
    dataclass field type ``annotation``."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return
    kind = kinds[0]
    if not _is_kind(value, kind):
        words = _KINDS.get(kind, "a list of whole numbers" if kind.startswith("tuple") else "a table")
        raise ValueError(f"{name}{f' ({where})' if where else ''} must be {words}, got {value!r}")
