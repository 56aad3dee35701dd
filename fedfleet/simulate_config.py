"""``fedfleet simulate``'s settings: SimulateConfig (every value checked when it is made, with
messages that name its flag) and merge_config (defaults < TOML file < command-line flags). The
server's and the fleet's settings are their configs' own (fedfleet/simulate_routes.py); the configs
they are given are built from it here; running them is fedfleet.simulate."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.device_runtime.attacks import parse_attack
from fedfleet.device_runtime.data import Dataset, check_dataset_name, parse_partition
from fedfleet.device_runtime.fleet_plan import FleetConfig
from fedfleet.device_runtime.gossip_math import MODEL_CODEC
from fedfleet.device_runtime.profiles import ProfileSpec, load_profiles
from fedfleet.device_runtime.runtimes import RUNTIME_NAMES
from fedfleet.export.accelerator import resolve_device
from fedfleet.export.refs import check_model_name
from fedfleet.protocol.plan import PLAN_FIELDS
from fedfleet.protocol.topology import TIME_VARYING
from fedfleet.server.config import ServerConfig, check_type, check_types
from fedfleet.simulate_routes import DEFAULTS, ROUTES, component_field, component_values, field_default
from fedfleet.tuning import parse_threads, parse_workers

AUTO_SERVER_PROCESS_PHONES = 1000  # server_process "auto": its own process from this fleet size on


@dataclass(frozen=True, init=False)
class SimulateConfig:
    """Every setting of a simulate run. The server's and the fleet's settings (phones, rounds, sample,
    lr, ...: fedfleet/simulate_routes.py) are taken as keywords and read as attributes like the run's
    own fields below, but declared once, by ServerConfig, FleetConfig and ProfileSpec (their types,
    defaults and limits): ``settings`` holds their values under simulate's names, and server_config /
    fleet_config build those components from them (the task's input shape and the clock are known
    only when the run starts)."""

    dataset: str = "digits"  # a built-in name | npz:PATH | imagefolder:PATH | MODULE:ATTR (device_runtime/task_data.py)
    image_size: int = 32  # the side imagefolder:PATH images are resized to (docs/your-own-task.md)
    out: str = "runs/latest"
    mode: str = "sync"  # the server's sync | async (FedBuff), or gossip (the server relays, see below)
    clock: str = "auto"  # wall | virtual | auto (virtual when devices are emulated)
    server_process: str = "auto"  # auto | yes | no: the server in a child process (wall clock only; see use_server_process)
    # gossip mode (--mode gossip): phones average with their neighbours, the server only relays (docs/gossip.md)
    topology: str = "ring"  # the relay's graph: ring | ring-matchings | torus | regular:D | exponential | complete | matching | edges:PATH
    gossip: str = "dpsgd"  # dpsgd | choco | admm (CHOCO-SGD compresses with the codec flags: --topk, --quant-bits, ...)
    gossip_gamma: float = 0.5  # CHOCO-SGD's consensus step size gamma, in (0, 1]
    admm_rho: float = 0.1  # decentralized ADMM's penalty rho (local proximal weight 2 * rho * degree)
    # update codec and privacy: the flags' names for the server's codec (codec(); protocol/FORMAT.md)
    clip: float | None = None  # L2 clipping norm C of each update
    noise: str | None = None  # gaussian | laplace (default gaussian when a noise level is given)
    noise_multiplier: float | None = None  # local DP noise std = z * C ...
    epsilon: float | None = None  # ...or calibrated to this epsilon per release, at delta
    topk: float | None = None  # fraction of each tensor sent (top-k by magnitude)
    randk: float | None = None  # ...or a random fraction (unbiased, rescaled)
    quant_bits: int = 32  # 32 | 8 | 4 | 2 | 1 (stochastic, per-chunk scales)
    error_feedback: bool = False  # keep what sparsification dropped for the next update
    compress: bool = False  # zlib over the payload
    quant_rounding: str = "stochastic"  # stochastic (unbiased) | nearest (deterministic; for error feedback)
    quant_scale: str = "max"  # max | fit (least-squares scale per chunk; needs quant_rounding nearest)
    # where training arithmetic runs (docs/accelerators.md): the device is the server's and the fleet's setting
    train_threads: str = "1"  # torch intra-op threads of the process: N | auto (the cores it may use)
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))  # the server's and fleet's (ROUTES)
    server: dict[str, Any] = field(default_factory=dict)  # any other ServerConfig field ([simulate.server])

    def __init__(self, **values: Any) -> None:
        settings = {**DEFAULTS, **values.pop("settings", {})}
        for where in (settings, values):  # workers = "auto": the cores this process may use, resolved now
            if where.get("workers") == "auto":
                where["workers"] = parse_workers("auto")
        for f in dataclasses.fields(self):
            if f.name != "settings":
                object.__setattr__(self, f.name, values.pop(f.name) if f.name in values else field_default(f))
        unknown = sorted((set(values) | set(settings)) - set(ROUTES))
        if unknown:
            raise TypeError(f"SimulateConfig got unknown settings: {', '.join(unknown)}")
        object.__setattr__(self, "settings", {**settings, **values})
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        """The server's and the fleet's settings, by simulate's names (``cfg.phones``, ``cfg.sample``)."""
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes: Any) -> SimulateConfig:
        """This config with ``changes`` (any setting, by simulate's name) made, checked again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting under simulate's name (as summary.json records it), and the other server fields."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("settings", "server")}
        return {**own, **self.settings, "server": dict(self.server)}

    def __post_init__(self) -> None:
        """Every setting checked before anything starts, with messages that name it as the flag (and
        TOML key) a user gave: a bad value must not surface later as a traceback or an obscure error."""
        check_types(self, _flag)
        for name, value in self.settings.items():
            check_type(name, component_field(name).type, value, _flag(name))
        if self.strategy is not None and not isinstance(self.strategy, str):  # by name: the server may be a child process
            raise ValueError(f"strategy (--strategy) must be a string, got {self.strategy!r}")
        _check_range(self, [
            ("phones", self.phones >= 1, "at least 1"), ("image_size", self.image_size >= 1, "at least 1"), ("rounds", self.rounds >= 0, ">= 0 (0 = until stopped)"),
            ("sample", 0 < self.sample <= 1, "a fraction in (0, 1]"),
            ("quantity_skew", 0 <= self.quantity_skew < math.inf, ">= 0"),
            ("attack_fraction", 0 <= self.attack_fraction <= 1, "a fraction in [0, 1]"),
            ("workers", self.workers >= 1, "at least 1"), ("trainer", self.trainer in ("batched", "pool"), "batched or pool"),
            ("runtime", self.runtime in RUNTIME_NAMES, "one of " + ", ".join(RUNTIME_NAMES)),
            ("mode", self.mode in ("sync", "async", "gossip"), "sync, async or gossip"),
            ("concurrency", self.concurrency >= 1, "at least 1"), ("buffer", self.buffer >= 1, "at least 1"),
            ("max_staleness", self.max_staleness >= 0, ">= 0"),
            ("server_lr", 0 < self.server_lr < math.inf, "a positive number"),
            ("compute_ms", 0 < self.compute_ms < math.inf, "a positive number of ms per sample"),
            ("diurnal", 0 <= self.diurnal <= 1, "a fraction of phones in [0, 1]"),
            ("dropout", 0 <= self.dropout < 1, "a probability in [0, 1)"),
            ("clock", self.clock in ("auto", "wall", "virtual"), "auto, wall or virtual"),
            ("hours", 0 <= self.hours < math.inf, ">= 0 (0 = no time limit)"),
            ("server_process", self.server_process in ("auto", "yes", "no"), "auto, yes or no"),
            ("start_spread_s", 0 <= self.start_spread_s < math.inf, ">= 0"),
            ("clip", self.clip is None or 0 < self.clip < math.inf, "a positive number"),
            ("noise", self.noise in (None, "gaussian", "laplace"), "gaussian or laplace"),
            ("noise_multiplier", self.noise_multiplier is None or 0 <= self.noise_multiplier < math.inf, ">= 0"),
            ("epsilon", self.epsilon is None or 0 < self.epsilon < math.inf, "a positive number"),
            ("delta", 0 < self.delta < 1, "in (0, 1)"),
            ("topk", self.topk is None or 0 < self.topk <= 1, "a fraction in (0, 1]"),
            ("randk", self.randk is None or 0 < self.randk <= 1, "a fraction in (0, 1]"),
            ("quant_bits", self.quant_bits in (32, 8, 4, 2, 1), "one of 32, 8, 4, 2, 1"),
            ("quant_rounding", self.quant_rounding in ("stochastic", "nearest"), "stochastic or nearest"),
            ("quant_scale", self.quant_scale in ("max", "fit"), "max or fit"),
            ("epsilon_budget", 0 <= self.epsilon_budget < math.inf, ">= 0 (0 = no limit)"),
            ("central_clip", 0 <= self.central_clip < math.inf, ">= 0"),
            ("central_noise_multiplier", 0 <= self.central_noise_multiplier < math.inf, ">= 0"),
        ])
        if self.quant_scale == "fit" and (self.quant_bits == 32 or self.quant_rounding != "nearest"):
            raise ValueError("--quant-scale fit needs --quant-bits below 32 and --quant-rounding nearest")
        if self.noise_multiplier is not None and self.epsilon is not None:
            raise ValueError("choose --noise-multiplier or --epsilon, not both")
        if self.devices not in ("none", "default") and not Path(self.devices).is_file():
            raise ValueError(f"devices (--devices) must be none, default or a CSV file of device profiles; "
                             f"{self.devices!r} is not a file")
        if self.devices not in ("none", "default"):
            load_profiles(self.devices)
        if self.mode == "gossip":
            _check_gossip(self)
        check_dataset_name(self.dataset)
        check_model_name(self.model)
        parse_threads(self.train_threads)
        if self.device == "cuda" and (self.mode == "gossip" or self.trainer != "batched" or self.runtime != "torch"):
            raise ValueError("--device cuda trains with --trainer batched and --runtime torch, in sync or async "
                             "mode; these phones would train on the CPU")
        if self.device != "auto":  # auto never fails; cuda without a GPU does, now, in one line
            resolve_device(self.device)
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ValueError(f"--init-weights {self.init_weights}: no such file")
        parse_partition(self.partition)
        parse_attack(self.attack)
        from fedfleet.population import BULK_BYTES_PER_PHONE, BYTES_PER_PHONE, check_population

        # a population that cannot fit, refused with its estimate
        check_population(self.phones, per_phone=BULK_BYTES_PER_PHONE if self.register_in_bulk else BYTES_PER_PHONE)
        FleetConfig(**component_values(self.settings, "fleet"))  # what the fleet would refuse, refused now
        try:  # what the server would refuse, refused now (the shape is the dataset's, known later)
            self._server_config((1, 8, 8), 10, None)
        except ValueError as exc:
            named = [k for k in self.server if str(exc).startswith(k + " ")]
            plan = [k for k in PLAN_FIELDS if str(exc).startswith(k + " ")]  # checked by protocol/plan.py
            if plan and not named:
                raise ValueError(f"{plan[0]} ({_flag(plan[0])}){str(exc)[len(plan[0]):]}") from None
            raise ValueError(f"server.{exc}" if named else str(exc)) from None

    def codec(self) -> dict[str, Any]:
        """The EncoderConfig fields phones are told to use (empty = dense float32)."""
        c: dict[str, Any] = {}
        if self.clip is not None:
            c["clip"] = self.clip
        if self.noise_multiplier is not None or self.epsilon is not None or self.noise is not None:
            c["noise"] = self.noise or "gaussian"
            if c["noise"] == "laplace":
                c["clip_ord"] = 1
            if self.noise_multiplier is not None:
                c["noise_multiplier"] = self.noise_multiplier
            else:
                c.update(epsilon=self.epsilon, delta=self.delta)
        if self.topk is not None and self.randk is not None:
            raise ValueError("choose --topk or --randk, not both")
        if self.topk is not None or self.randk is not None:
            c.update(sparsify="topk" if self.topk is not None else "randk", density=self.topk or self.randk)
        if self.quant_bits != 32:
            c["quant_bits"] = self.quant_bits
        if self.error_feedback:
            c["error_feedback"] = True
        if self.compress:
            c["compress"] = True
        if self.quant_rounding not in ("stochastic", "nearest"):
            raise ValueError("quant_rounding must be stochastic or nearest")
        if self.quant_rounding == "nearest":
            c["stochastic_rounding"] = False
        if self.quant_scale != "max":
            c["quant_scale"] = self.quant_scale
        return c

    def server_config(self, data: Dataset, data_dir: str | None) -> ServerConfig:
        return self._server_config(data.input_shape, data.num_classes, data_dir)

    def _server_config(self, input_shape: tuple[int, ...], num_classes: int, data_dir: str | None) -> ServerConfig:
        base = ServerConfig(
            **component_values(self.settings, "server"),
            input_shape=input_shape,
            num_classes=num_classes,
            # Over-selection guards against stragglers and dropouts; phones without emulated devices
            # have neither, so the extra phones' work would only be thrown away.
            over_selection=ServerConfig.over_selection if self.devices != "none" else 1.0,
            checkin_retry_s=5.0 if self.virtual else 0.25,
            # Long polls on the wall clock only, held up to 25 s: a phone left out of a round waits for
            # the next one in one request (at 10,000 phones, rounds take ~20 s; a 5 s hold cost ~1.8
            # check-ins per update).
            checkin_hold_s=0.0 if self.virtual else 25.0,
            data_dir=data_dir,
            sqlite_sync="normal",  # an emulation's state need not survive a power cut, only a crash
            mode="sync" if self.mode == "gossip" else self.mode,  # gossip: the server's rounds stay idle
            codec=self.codec(),
            secagg_clip=self.clip or ServerConfig.secagg_clip,
        )
        if self.mode == "gossip":  # the relay's graph: the fleet's phones, named as the fleet names them
            base = base.replace(topology=self.topology, gossip_phones=self.phones)
        return base.replace(**self.server) if self.server else base

    @property
    def use_server_process(self) -> bool:
        if self.server_process not in ("auto", "yes", "no"):
            raise ValueError("server_process must be auto, yes or no")
        if self.server_process == "yes" and self.virtual:
            raise ValueError("--server-process yes needs the wall clock: a virtual clock is shared in one process "
                             "(use --clock wall, or --server-process no)")
        # auto: measured with bench_flower on 2 cores, its own process gave 10,000 phones 1.3x the
        # updates/s and 100 phones nothing (their rounds are latency-bound, not CPU-bound).
        return not self.virtual and (self.server_process == "yes" or (
            self.server_process == "auto" and (os.cpu_count() or 1) >= 2 and self.phones >= AUTO_SERVER_PROCESS_PHONES))

    @property
    def virtual(self) -> bool:
        if self.clock not in ("auto", "wall", "virtual"):
            raise ValueError("clock must be auto, wall or virtual")
        return self.clock == "virtual" or (self.clock == "auto" and self.devices != "none")

    def fleet_config(self) -> FleetConfig:
        values = {**component_values(self.settings, "fleet"), "device": resolve_device(self.settings["device"])}
        return FleetConfig(**values, server_here=not self.use_server_process,
                           profile_spec=ProfileSpec(**component_values(self.settings, "profile")))


def _flag(name: str) -> str | None:
    """The command-line flag of a SimulateConfig field (None: a TOML-only setting)."""
    return None if name in ("server", "settings", "start_spread_s", "register_when_active", "register_in_bulk") else "--" + name.replace("_", "-")


def _check_range(cfg: SimulateConfig, checks: list[tuple[str, bool, str]]) -> None:
    for name, ok, wanted in checks:
        if not ok:
            raise ValueError(f"{name} ({_flag(name)}) must be {wanted}, got {getattr(cfg, name)!r}")


def setting_names() -> set[str]:
    """The names SimulateConfig takes: its own fields (but ``settings``) and the components' (ROUTES)."""
    return {f.name for f in dataclasses.fields(SimulateConfig) if f.name != "settings"} | set(ROUTES)


def merge_config(file_values: dict[str, Any], cli_values: dict[str, Any], source: str | None = None) -> SimulateConfig:
    """Defaults < TOML file < command-line flags (flags left unset do not override). ``source``: the
    TOML file's name, for messages about its values."""
    known = setting_names() | {"server"}
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source + ': ' if source else ''}unknown settings: {', '.join(unknown)}")
    try:
        return SimulateConfig(**values)
    except ValueError as exc:
        from_file = source and any(k in file_values and cli_values.get(k) is None for k in _named(str(exc), values))
        raise ValueError(f"{source}: {exc}" if from_file else str(exc)) from None


def _named(message: str, values: dict[str, Any]) -> list[str]:
    return [k for k in values if message.startswith((k + " ", k + "."))]


def _check_gossip(cfg: SimulateConfig) -> None:
    """Settings of --mode gossip (the topology itself is checked with the server's config)."""
    _check_range(cfg, [
        ("gossip", cfg.gossip in ("dpsgd", "choco", "admm"), "dpsgd, choco or admm"),
        ("gossip_gamma", 0 < cfg.gossip_gamma <= 1, "a step size in (0, 1]"),
        ("admm_rho", 0 < cfg.admm_rho < math.inf, "a positive number"),
        ("runtime", cfg.runtime == "torch", "torch in gossip mode (each phone trains its own model eagerly)"),
    ])
    codec = cfg.codec()
    for name, unused in (("attack", cfg.attack != "none"), ("hours", cfg.hours > 0), ("robust", cfg.robust != "none"),
                         ("clip", "clip" in codec), ("noise", "noise" in codec), ("central-clip", cfg.central_clip > 0),
                         ("epsilon-budget", cfg.epsilon_budget > 0), ("secure-agg", cfg.secure_agg)):
        if unused:
            raise ValueError(f"--{name} is not taken in gossip mode (docs/gossip.md)")
    if cfg.gossip in ("choco", "admm") and cfg.topology in TIME_VARYING:
        raise ValueError(f"--gossip {cfg.gossip} keeps state per neighbour: it needs a static --topology, "
                         f"not {cfg.topology}")
    if cfg.gossip == "admm" and cfg.prox_mu:
        raise ValueError("--gossip admm sets each phone's proximal weight itself (2 * --admm-rho * degree): "
                         "leave out --prox-mu")
    if cfg.gossip == "choco" and cfg.error_feedback:
        raise ValueError("--gossip choco compensates its own compression error: leave out --error-feedback")
    if cfg.gossip == "admm" and codec:
        raise ValueError("--gossip admm sends whole float32 models; the codec flags (--topk, --quant-bits, ...) "
                         "choose CHOCO-SGD's compression or D-PSGD's quantization")
    if cfg.gossip == "dpsgd" and set(codec) - set(MODEL_CODEC):
        raise ValueError("--gossip dpsgd sends whole models: it takes --quant-bits and --compress, not "
                         "--topk, --randk or --error-feedback (sparsified gossip is --gossip choco)")
