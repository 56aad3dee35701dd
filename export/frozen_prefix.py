"""A frozen backbone's features, computed once per phone's examples instead of at every step.

Transfer learning federates a head on a backbone the phones do not train. ``train_many`` would run
the backbone's forward pass again at every local step, on examples and weights that do not change.
``split`` traces the model (``torch.fx``) and finds its frozen prefix: the part of the graph computed
from the input alone, through parameters that do not train and layers that act the same in every
call (no dropout or batch norm in training mode, no random draws). Where that prefix ends in one
tensor read by the rest of the model (the backbone's features), and nothing else reads the input,
the model is cut there: ``Split.features`` maps examples to that tensor, ``Split.rest`` maps it to
the output, with the model's own modules and parameter names. ``FeatureCache`` keeps the features
of each phone's examples, keyed by their content and that of the frozen weights, across calls: a
run computes them at the phone's first task.

The cut changes values only by float rounding (the backbone runs on a phone's examples in one call
instead of batch by batch). It is checked once per model and input shape on two unlike examples (the
same features twice; each example's alone equal to its row of the pair; the cut model's output equal
to the model's) and not made otherwise, nor where the features are wide (``WIDEST``, ``WIDE_NUMBERS``). A model ``torch.fx`` cannot trace (Python control flow on tensor values) keeps its whole
forward pass; tracing is safe beside threads running other modules (``trace``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F  # noqa: N812

from fedfleet.export.model_state import probing

# layers whose training mode draws random numbers, or reads or changes statistics of the batch
_MODAL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.dropout._DropoutNd,
          nn.RReLU)
log = logging.getLogger(__name__)
# functions that draw random numbers, or may use the statistics of the batch (functional batch norm)
_MODAL_FUNCTIONS = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
                     torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, F.dropout,
                     F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
                     F.batch_norm, F.instance_norm}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}
CHUNK_EXAMPLES = 512  # examples per call of the features (bounds the backbone's activations)
# Features of more than this many numbers per example, and wider than WIDEST times the input, are not kept:
# a cut that early (a frozen first convolution under batch norm left in training mode) saves one layer and
# stores its whole activation per example. A deep backbone's features may be wider than a small input
# (MobileNetV3's 576 for 8x8 digits) and are kept.
WIDEST, WIDE_NUMBERS = 2, 4096


class Rest(nn.Module):
    """The model after the cut: its modules under their names, the traced graph's code, and ``train()``
    giving each module the mode the model's own ``train()`` gave it (a backbone a model keeps in eval
    mode stays there)."""

    def __init__(self, traced: fx.GraphModule, modes: dict[str, bool]) -> None:
        super().__init__()
        for name, child in traced.named_children():
            self.add_module(name, child)
        for name, param in traced.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in traced.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        for node in traced.graph.nodes:  # any other attribute the code reads (fx registers tensors as buffers)
            top = str(node.target).split(".")[0]
            if node.op == "get_attr" and not hasattr(self, top):
                setattr(self, top, getattr(traced, top))
        self.code = type(traced).forward  # the graph's Python code, reading its modules from ``self``
        self.modes = {name: modes.get(name, True) for name, _ in self.named_modules()}

    def forward(self, *args: Any) -> Any:
        return self.code(self, *args)

    def train(self, mode: bool = True) -> Rest:
        super().train(mode)
        if mode:
            for name, module in self.named_modules():
                module.training = self.modes.get(name, True)
        return self


@dataclass(frozen=True, eq=False)
class Split:
    """A model cut after its frozen prefix: ``rest(features(x))`` is ``model(x)``."""

    features: fx.GraphModule  # x [n, ...] -> features [n, ...]
    rest: Rest  # features -> the model's output; the model's trainable parameters, by name
    shape: tuple[int, ...]  # one example's features
    _copies: dict[tuple[torch.dtype, bytes], nn.Module] = field(default_factory=dict, repr=False)

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        return dict(chain(self.features.named_parameters(), self.features.named_buffers()))

    def in_dtype(self, dtype: torch.dtype, mark: bytes) -> nn.Module:
        """``features`` with its floating-point tensors in ``dtype`` (itself when they are; else a copy,
        kept per dtype and ``fingerprint`` of the tensors it was made from)."""
        if all(t.dtype == dtype for t in self.frozen_tensors().values() if t.is_floating_point()):
            return self.features
        if (dtype, mark) not in self._copies:
            self._copies[(dtype, mark)] = copy.deepcopy(self.features).to(dtype)
        return self._copies[(dtype, mark)]


_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Split | None]] = weakref.WeakKeyDictionary()


def split(model: nn.Module, examples: torch.Tensor, state: Collection[str]) -> Split | None:
    """``model`` (in the mode it trains in) cut after its frozen prefix, or None where it has none worth
    cutting or the cut fails its checks on ``examples`` (two examples, [2, ...]). ``state``: the buffers
    training changes (``export.model_state.state_names``). Found once per model, input shape and dtype."""
    key = (tuple(examples.shape[1:]), examples.dtype, model.training, tuple(state))
    found = _SPLITS.setdefault(model, {})
    if key not in found:
        found[key] = _split(model, examples, set(state))
    return found[key]


def find(model: nn.Module, xs: Sequence[np.ndarray], state: Collection[str]) -> Split | None:
    """``split`` of ``model`` checked on the first example of ``xs`` (arrays of examples) and the first one
    unlike it, on the model's device and in its dtype; None without a frozen parameter or such a pair."""
    params = list(model.parameters())
    if all(p.requires_grad for p in params):
        return None  # nothing frozen to run once
    pair = unlike_pair(xs)
    return None if pair is None else split(model, torch.as_tensor(pair).to(params[0].device, params[0].dtype), state)


def unlike_pair(xs: Sequence[np.ndarray]) -> np.ndarray | None:
    """The first example of ``xs`` and the first one unlike it ([2, ...]; a batch statistic of two equal
    examples would pass for a function of each), or None."""
    first = next((x[:1] for x in xs if len(x)), None)
    if first is None:
        return None
    for x in xs:
        rows = np.asarray(x).reshape(len(x), -1)
        other = np.flatnonzero((rows != first.reshape(1, -1)).any(axis=1))
        if len(other):
            return np.concatenate([first, x[other[:1]]])
    return None


class _ThisThreadTracer(fx.Tracer):
    """``torch.fx``'s tracer, tracing the thread that runs it only. While it traces, fx patches
    ``nn.Module.__call__`` and ``__getattr__`` for the whole process: a module another thread calls
    meanwhile (a fleet's training, a server's evaluation) would be taken for part of the trace and fail
    (``module is not installed as a submodule``). Here it runs as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACING = threading.Lock()  # one trace at a time: two would stack their patches of nn.Module


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, safe beside threads running other modules."""
    with _TRACING:
        tracer = _ThisThreadTracer()
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _split(model: nn.Module, examples: torch.Tensor, state: set[str]) -> Split | None:
    try:
        traced = trace(model)
    except Exception:  # control flow on tensor values, and whatever else fx cannot trace: no cut
        return None
    nodes = list(traced.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if not inputs:
        return None
    x = inputs[0]
    frozen, from_x, weights = _frozen_nodes(traced, x, state)
    cut = [n for n in nodes if n in from_x and n is not x and any(u not in frozen for u in n.users)]
    if len(cut) != 1 or not weights or any(u not in frozen for u in x.users):
        return None
    try:
        features = _graph_module(traced, [n for n in nodes if n in frozen], {}, cut[0])
        modes = {name: m.training for name, m in model.named_modules()}
        rest = Rest(_graph_module(traced, [n for n in nodes if n not in from_x], {cut[0]: "features"}, None), modes)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if {n for n, p in rest.named_parameters() if p.requires_grad} != trainable:
            return None  # a trainable parameter the forward pass never reads: its zero update would go missing
        shape = _faithful(model, features, rest, examples)
    except Exception as exc:  # the model's own forward pass on the cut: it trains whole, as it would anyway
        log.debug("no frozen-prefix cut of %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
        return None
    if shape is None:
        return None
    if math.prod(shape) > max(WIDEST * math.prod(examples.shape[1:]), WIDE_NUMBERS):
        log.debug("no frozen-prefix cut of %s: its features %s are wider than its input %s", type(model).__name__,
                  list(shape), list(examples.shape[1:]))
        return None
    frozen_numbers = sum(t.numel() for t in chain(features.parameters(), features.buffers()))
    log.info("%s: its frozen first layers (%d numbers) run once per example, features %s",
             type(model).__name__, frozen_numbers, list(shape))
    return Split(features, rest, shape)


def _frozen_nodes(traced: fx.GraphModule, x: fx.Node, state: set[str]) -> tuple[set[fx.Node], set[fx.Node], bool]:
    """(the nodes computed from the input and frozen tensors alone, deterministically; those of them that
    read the input; whether any of those reads a frozen weight)."""
    frozen: set[fx.Node] = set()
    from_x: set[fx.Node] = set()
    weights = False
    for node in traced.graph.nodes:
        reads = node.all_input_nodes
        if node.op == "placeholder":
            ok = node is x
        elif node.op == "get_attr":
            value = _attr(traced, str(node.target))
            ok = isinstance(value, torch.Tensor) and not value.requires_grad and str(node.target) not in state
        elif node.op == "call_module":
            module = traced.get_submodule(str(node.target))
            ok = (all(r in frozen for r in reads) and not any(p.requires_grad for p in module.parameters())
                  and not any(isinstance(m, _MODAL) and m.training for m in module.modules())
                  and not any(f"{node.target}.{b}" in state for b, _ in module.named_buffers()))
            weights = weights or (ok and any(r in from_x for r in reads) and any(True for _ in module.parameters()))
        elif node.op in ("call_function", "call_method"):
            ok = all(r in frozen for r in reads) and node.target not in _MODAL_FUNCTIONS \
                and not (node.op == "call_method" and node.target in _RANDOM_METHODS)
            weights = weights or (ok and any(r in from_x for r in reads) and any(r.op == "get_attr" for r in reads))
        else:
            ok = False
        if ok:
            frozen.add(node)
            if node is x or any(r in from_x for r in reads):
                from_x.add(node)
    return frozen, from_x, weights


def _attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _graph_module(traced: fx.GraphModule, keep: Iterable[fx.Node], inputs: dict[fx.Node, str],
                  out: fx.Node | None) -> fx.GraphModule:
    """A module of ``traced``'s nodes ``keep`` (in order; none dropped as unused: an in-place call's result
    may be), the nodes of ``inputs`` read as new inputs of those names, returning ``out`` (None: the
    graph's own output)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(name) for n, name in inputs.items()}
    for node in keep:
        if node not in env:
            env[node] = graph.node_copy(node, env.__getitem__)
    if out is not None:
        graph.output(env[out])
    return fx.GraphModule(traced, graph)


def _faithful(model: nn.Module, features: fx.GraphModule, rest: Rest, examples: torch.Tensor) -> tuple[int, ...] | None:
    """One example's features shape, where on two examples the features are the same twice and per
    example, and the cut model's output is the model's (in eval mode, without gradients: no statistics
    move); else None."""
    with torch.no_grad():
        pair, again = features(examples), features(examples)
        if not isinstance(pair, torch.Tensor) or pair.dim() == 0 or pair.shape[0] != 2 or not torch.equal(pair, again):
            return None
        alone = torch.cat([features(examples[:1]), features(examples[1:])])
        if not torch.allclose(pair, alone, rtol=1e-4, atol=1e-5 * float(pair.abs().max()) + 1e-12):
            return None
    with probing(model):
        want, got = model(examples), rest(features(examples))
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return None
    ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12)
    return tuple(pair.shape[1:]) if ok else None


class FeatureCache:
    """Features of phones' examples, by the examples' content and the frozen weights', least recently
    used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._kept: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self.computed = 0  # examples whose features were computed (for tests and benchmarks)
        self.pool_cpu_s = 0.0  # CPU seconds of the threads computing them, beside the calling thread

    def features(self, cut: Split, xs: Sequence[np.ndarray], dtype: torch.dtype, threads: int = 1) -> list[np.ndarray]:
        """``cut.features`` of each of ``xs`` in ``dtype``: those kept, and the others computed together, in
        calls of ``CHUNK_EXAMPLES`` examples on up to ``threads`` threads."""
        mark = fingerprint(cut.frozen_tensors())
        xs = [np.ascontiguousarray(x) for x in xs]
        keys = [(cut, mark, dtype, x.shape, x.dtype.str, hashlib.blake2b(x.data, digest_size=16).digest()) for x in xs]
        found: dict[tuple[Any, ...], np.ndarray] = {}
        missing: dict[tuple[Any, ...], np.ndarray] = {}
        for key, x in zip(keys, xs, strict=True):
            if key in self._kept:
                found[key] = self._kept[key]
                self._kept.move_to_end(key)
            elif key not in missing:
                missing[key] = x
        if missing:
            rows = np.concatenate(list(missing.values()))
            module = cut.in_dtype(dtype, mark)

            def run(start: int) -> tuple[torch.Tensor, float]:
                t0 = time.thread_time()
                with torch.no_grad():
                    out = module(torch.from_numpy(rows[start:start + CHUNK_EXAMPLES]).to(dtype))
                return out, time.thread_time() - t0

            starts = range(0, len(rows), CHUNK_EXAMPLES)
            if threads > 1 and len(starts) > 1:  # a module's forward without gradients: safe to share
                with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="fedfleet-features") as pool:
                    done = list(pool.map(run, starts))
                self.pool_cpu_s += sum(cpu for _, cpu in done)
            else:
                done = [run(a) for a in starts]
            parts = [part for part, _ in done]
            out = torch.cat(parts).numpy() if parts else np.empty((0, *cut.shape), dtype=np.dtype(str(dtype)[6:]))
            self.computed += len(rows)
            sizes = np.cumsum([len(x) for x in missing.values()])[:-1]
            for key, part in zip(missing, np.split(out, sizes), strict=True):
                found[key] = part
                self._kept[key] = part
                self.bytes += part.nbytes
            while self.bytes > self.max_bytes and len(self._kept) > 1:
                _, dropped = self._kept.popitem(last=False)
                self.bytes -= dropped.nbytes
        return [found[key] for key in keys]


def fingerprint(tensors: dict[str, torch.Tensor]) -> bytes:
    """A hash of the names and values of ``tensors``."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.device.type == "cpu" else t.cpu().numpy().tobytes())
    return h.digest()
