"""Train many emulated phones at once: one vmapped SGD step for a chunk of phones.

Phones that start from the same model version, share an architecture and get the same
``TrainConfig`` differ only in their data (and, under ``--local-state``, their batch norm
statistics). ``train_many`` stacks their trainable parameters and their state along a leading
phone axis, vmaps the forward pass (``torch.func.functional_call``) over it and takes per-phone
gradients with one autograd call, so a chunk of phones costs one batched forward/backward per step
instead of one per phone. The result equals ``TorchRuntime.train`` run phone by phone (same
batches, same dropout masks, same SGD update, same FedProx term, same running statistics, same
reported loss) up to float rounding.

A phone's tensors are its trainable parameters plus its state under ``"state:<buffer>"`` names
(``protocol.state``): parameters come back as deltas, state as the values training ended with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedfleet.device_runtime import batched_conv, batched_pool
from fedfleet.device_runtime.batched_calls import chunk_bounds, chunk_phones, rows_per_call, split_step
from fedfleet.device_runtime.batched_norm import masked_batch_norm
from fedfleet.device_runtime.batched_threads import in_threads
from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainResult, iterate_batches
from fedfleet.device_runtime.stateful import (
    MaskSource,
    dropout_call_shapes,
    dropout_generator,
    dropout_layers,
    mask_shape,
    masked_dropout,
    queued_masks,
)
from fedfleet.export import frozen_prefix
from fedfleet.export.accelerator import rows_that_fit, training_bytes_per_phone
from fedfleet.export.frozen_prefix import FeatureCache
from fedfleet.export.model_state import state_names
from fedfleet.export.task_loss import LossFn
from fedfleet.protocol.state import split_state, with_state

Params = dict[str, np.ndarray]
Job = tuple[np.ndarray, np.ndarray, np.random.Generator]  # x [n, ...], y [n], that phone's rng
Tensors = dict[str, torch.Tensor]
# step(params [k, ...], state [k, ...] (both updated in place), dropout masks [k, B, ...] in call order,
#      x [k, B, ...], y [k, B], mask [k, B]) -> loss before the FedProx term [k]
Step = Callable[[Tensors, Tensors, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_many(
    model: nn.Module,
    params: Mapping[str, np.ndarray],
    jobs: Sequence[Job],
    cfg: TrainConfig,
    *,
    states: Sequence[Mapping[str, np.ndarray]] | None = None,
    chunk: int = 128,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    loss: LossFn | None = None,
    call_rows: int | None = None,
    workers: int = 1,
    cpu_seconds: list[float] | None = None,
    features: FeatureCache | None = None,
) -> list[tuple[Params, TrainResult]]:
    """Train every job from ``params``; return ``(new - params, result)`` per job, in job order,
    with the phone's end state under ``"state:"`` names when the model has state.

    The start state is ``params``' state entries, or the model's own buffers; ``states[i]``
    (buffer names, no prefix), where given and not empty, is job i's own (``--local-state``).
    Equal to ``RuntimePool.train`` / ``TorchRuntime.train`` one phone at a time: each phone's
    rng is consumed exactly as the eager runtime consumes it (a dropout generator's seed first,
    for a model with dropout, then ``iterate_batches``), so its state afterwards is the same.
    Frozen parameters and other buffers (a transfer model's backbone) are shared. 128 was fastest
    or tied for the digits MLP and CNN on one thread (bench/bench_batched.py); lower it for large
    inputs, whose activations scale with it. Deltas come back in ``dtype`` (float32 unless a test
    asks for float64). ``model`` is put in train mode, as the reference does, and is not modified.

    ``device`` (a resolved one, export.accelerator.resolve_device): where the stacked parameters, the
    batches and the arithmetic live; ``model`` itself stays where it is. On CUDA a chunk is every phone
    that fits in the free memory (``chunk`` is ignored); each chunk's results come back to the host in
    one transfer.

    ``loss``: the task's own (export/task_loss.py), applied to each phone's real rows under ``vmap``
    (phones grouped by their number of real rows); None: cross-entropy, on the stacked logits at once.

    ``call_rows``: what one more call of a step costs, in rows of the model's computation; phones at a
    partial batch train in narrower calls where that saves more rows (``batched_calls.split_step``).
    None: estimated from the model's forward FLOPs (``batched_calls.rows_per_call``).

    ``chunk`` is the most phones one call stacks; the phones are cut into equal chunks (within one
    phone) of at most that many, and into one per thread of ``workers`` where each keeps at least
    ``batched_calls.CHUNK_CALLS`` calls' worth of rows (``batched_calls.chunk_bounds``). The threads train
    the chunks side by side, each on a copy of ``model``'s modules (``functional_call`` swaps a
    module's tensors while it runs, so two threads cannot share one). Which thread trains a chunk
    changes nothing; a cut into more chunks changes a phone's floats only by rounding.
    ``cpu_seconds``, when given, gets each training thread's CPU seconds appended.

    A model whose first layers are frozen (a backbone and a trained head) is cut after them where
    ``frozen_prefix.split`` finds the cut sound (on the CPU): the backbone's features of each phone's
    examples are computed once, kept in ``features`` (a run's ``FeatureCache``: from one call to the
    next; None: this call's), and the steps train the rest of the model on them.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    params, shared_state = split_state(params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params lack trainable tensors {missing}")
    model.train()  # the reference's mode; TransferMobileNet keeps its backbone in eval
    snames = state_names(model)
    dev = torch.device(device)
    cache = features if features is not None else FeatureCache()
    t0, pool0 = time.thread_time(), cache.pool_cpu_s
    model, jobs = _cut_backbone(model, jobs, snames, dtype, dev, cache, max(workers, 1))
    cut_s = time.thread_time() - t0 + cache.pool_cpu_s - pool0  # the backbone's passes, where the model is cut
    layers = dropout_layers(model)
    buffers = dict(model.named_buffers())
    default = {n: np.asarray(shared_state.get(n, buffers[n].detach().numpy())) for n in snames}
    own = states if states is not None else [{}] * len(jobs)
    job_states = [{n: np.asarray(s.get(n, default[n])) for n in snames} for s in own]

    start = {n: torch.as_tensor(np.asarray(params[n]), dtype=dtype).to(dev) for n in names}
    # The same draws, in the same order per rng, as the per-phone path makes lazily.
    gens = [dropout_generator(rng) if layers else None for _, _, rng in jobs]
    plans = [list(iterate_batches(len(x), cfg, rng)) for x, _, rng in jobs]
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []
    example = next((x[:1] for x, _, _ in jobs if len(x)), None)
    if layers and example is not None:
        calls = dropout_call_shapes(model, layers, torch.as_tensor(example).to(next(model.parameters()).dtype))
    if dev.type != "cpu" and example is not None:
        per_phone = training_bytes_per_phone(model, torch.as_tensor(example).to(next(model.parameters()).dtype),
                                             cfg.batch_size, dtype.itemsize)
        chunk = rows_that_fit(dev, per_phone, cap=len(jobs))
    if call_rows is None:
        call_rows = 1 << 30 if example is None else rows_per_call(
            model, torch.as_tensor(example).to(next(model.parameters()).dtype))
    # Longest first: phones in a chunk then have similar step counts (little padding), and
    # the phones still training at step t are a prefix of the chunk.
    # Among phones with as many steps, the larger last batch first: a step's rows per phone then fall
    # along the chunk, and the phones at their partial last batch train in narrower calls (batched_calls).
    order = sorted(range(len(jobs)), key=lambda i: (-len(plans[i]), -len(plans[i][-1]) if plans[i] else 0))
    least = chunk_phones(call_rows, cfg.batch_size) if dev.type == "cpu" else chunk  # on a GPU, all that fit
    chunks = [order[lo:hi] for lo, hi in chunk_bounds(len(order), chunk, least, max(workers, 1))]
    frozen = _frozen(model, start, snames, dtype, dev)
    # pooling written as a function, caught only where the model has some (the catching costs ~5% otherwise)
    functional = dev.type == "cpu" and example is not None and batched_pool.pools_functionally(
        model, torch.as_tensor(example).to(next(model.parameters()).dtype))

    def train(step: Step, ids: list[int]) -> list[tuple[int, tuple[Params, TrainResult]]]:
        batch = _gather([jobs[i] for i in ids], [plans[i] for i in ids], cfg.batch_size, dtype, dev)
        state0 = {n: _as_state(np.stack([job_states[i][n] for i in ids]), dtype).to(dev) for n in snames}
        drops = _Drops(calls if layers else [], [gens[i] for i in ids], dtype, dev)
        return list(zip(ids, _train_chunk(step, start, state0, batch, drops, call_rows), strict=True))

    def make(m: nn.Module) -> AbstractContextManager[Step]:
        return _patched_step(m, start, frozen, snames, cfg, dtype, dev, loss, functional)

    first = len(cpu_seconds) if cpu_seconds is not None else 0
    results = dict(in_threads(model, chunks, min(workers, len(chunks)), make, train, cpu_seconds))
    if cpu_seconds is not None and len(cpu_seconds) > first:
        cpu_seconds[first] += cut_s  # counted with the first training thread's
    return [results[i] for i in range(len(jobs))]


def _cut_backbone(model: nn.Module, jobs: Sequence[Job], snames: Sequence[str], dtype: torch.dtype,
                  device: torch.device, cache: FeatureCache, threads: int) -> tuple[nn.Module, Sequence[Job]]:
    """(the model after its frozen prefix, the jobs with their examples' features, those not kept computed
    on ``threads`` threads) where ``frozen_prefix`` cuts it; else (model, jobs)."""
    cut = frozen_cut(model, jobs, snames) if device.type == "cpu" else None
    if cut is None:
        return model, jobs
    features = cache.features(cut, [x for x, _, _ in jobs], dtype, threads)
    return cut.rest, [(f, y, rng) for f, (_, y, rng) in zip(features, jobs, strict=True)]


def frozen_cut(model: nn.Module, jobs: Sequence[Job], snames: Sequence[str] | None = None) -> frozen_prefix.Split | None:
    """``model`` (in train mode) cut after its frozen prefix (``frozen_prefix.find`` on the examples of
    ``jobs``) with its state in the rest, or None. ``snames``: its state (``state_names``, found when not given)."""
    snames = state_names(model) if snames is None else snames
    cut = frozen_prefix.find(model, [x for x, _, _ in jobs], snames)
    return cut if cut is not None and state_names(cut.rest) == list(snames) else None


def _as_state(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(value))  # a fresh stack: trained in place, shared with nothing
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class _Drops:
    """Dropout calls of one forward pass (layer, output shape per example) and the chunk's generators."""

    calls: list[tuple[nn.Module, tuple[int, ...]]]
    gens: list[torch.Generator | None]
    dtype: torch.dtype
    device: torch.device  # masks are drawn on the CPU (the phones' generators), then moved here

    def masks(self, counts: Sequence[int], width: int, first: int = 0) -> list[torch.Tensor]:
        """[k, width, ...] per call: phone ``first + j``'s masks for its ``counts[j]`` real rows of one step, drawn
        in its eager order (``stateful.draw_mask``'s uniforms, straight into the chunk's buffers), padded
        with ones."""
        if not self.calls:
            return []
        uniforms = [torch.empty((len(counts), *mask_shape(m, (width, *s)))) for m, s in self.calls]  # float32
        for j, rows in enumerate(counts):
            gen = self.gens[first + j]
            assert gen is not None
            for u in uniforms:
                torch.rand((int(rows), *u.shape[2:]), generator=gen, out=u[j, : int(rows)])
        real = (torch.arange(width)[None, :] < torch.as_tensor(counts)[:, None])  # [k, width]
        out = []
        for (m, _), u in zip(self.calls, uniforms, strict=True):
            p = float(m.p)  # type: ignore[arg-type]
            keep = (u >= p).to(self.dtype) / (1.0 - p)
            out.append(torch.where(real.reshape(*real.shape, *(1,) * (u.dim() - 2)), keep, 1.0).to(self.device))
        return out


@dataclass(frozen=True)
class _ChunkData:
    """One chunk's data and padded batch layout; phones sorted by step count, longest first."""

    x: torch.Tensor  # [N, ...]: every phone's examples, concatenated
    y: torch.Tensor  # [N] int64 labels, or [N, ...] float targets (a regression)
    index: torch.Tensor  # [T, P, B] rows of x per step and phone; padding points at row 0
    mask: torch.Tensor  # [T, P, B] 1 for a real example, 0 for padding
    rows: np.ndarray  # [T, P] real examples per step and phone
    active: list[int]  # [T] phones with a batch at step t (a prefix of the chunk)
    steps: list[int]  # [P]
    sizes: list[int]  # [P] examples per phone


def _gather(jobs: Sequence[Job], plans: Sequence[list[np.ndarray]], batch_size: int, dtype: torch.dtype,
            device: torch.device) -> _ChunkData:
    sizes = [len(x) for x, _, _ in jobs]
    steps = [len(p) for p in plans]
    offsets = np.cumsum([0, *sizes[:-1]])
    t_max, p = steps[0], len(jobs)  # longest first
    index = np.zeros((t_max, p, batch_size), dtype=np.int64)
    mask = np.zeros((t_max, p, batch_size))
    rows = np.zeros((t_max, p), dtype=np.int64)
    for j, batches in enumerate(plans):
        for t, picked in enumerate(batches):  # the last batch of an epoch may be partial
            index[t, j, : len(picked)] = offsets[j] + picked
            mask[t, j, : len(picked)] = 1.0
            rows[t, j] = len(picked)
    x = np.concatenate([np.asarray(x) for x, _, _ in jobs])
    y = np.concatenate([np.asarray(y) for _, y, _ in jobs])
    return _ChunkData(
        x=torch.from_numpy(x).to(device, dtype),
        y=torch.from_numpy(y).to(device, dtype) if y.dtype.kind == "f" else torch.from_numpy(y.astype(np.int64)).to(device),
        index=torch.from_numpy(index).to(device),
        mask=torch.from_numpy(mask).to(device, dtype),
        rows=rows,
        active=[sum(s > t for s in steps) for t in range(t_max)],
        steps=steps,
        sizes=sizes,
    )


def _train_chunk(step: Step, start: Mapping[str, torch.Tensor], state: Tensors, data: _ChunkData,
                 drops: _Drops, call_rows: int) -> list[tuple[Params, TrainResult]]:
    p = len(data.steps)
    stacked = {n: s.expand(p, *s.shape).clone() for n, s in start.items()}  # [P, ...]
    losses = torch.zeros(len(data.active), p, dtype=data.mask.dtype)  # [T, P]
    for t, k in enumerate(data.active):
        # Phones past their last step are left out of the call entirely (not just masked),
        # so their parameters cannot move: no gradient and no FedProx pull toward start.
        for lo, hi, width in split_step(data.rows[t, :k], call_rows):
            rows = data.index[t, lo:hi, :width]  # [k, width]
            views = {n: s[lo:hi] for n, s in stacked.items()}
            bufs = {n: s[lo:hi] for n, s in state.items()}
            masks = drops.masks(data.rows[t, lo:hi].tolist(), width, lo)
            losses[t, lo:hi] = step(views, bufs, masks, data.x[rows], data.y[rows], data.mask[t, lo:hi, :width])
    host = _to_host({**{"delta:" + n: s - start[n] for n, s in stacked.items()}, "loss": losses,
                     **{"end:" + n: s for n, s in state.items()}})
    deltas = {n: host["delta:" + n] for n in stacked}
    ends = {n: host["end:" + n] for n in state}
    per_step = host["loss"].astype(np.float64)  # float32 -> float64 is exact, like float(loss)
    out: list[tuple[Params, TrainResult]] = []
    for j, steps in enumerate(data.steps):
        total = 0.0
        for t in range(steps):  # summed in step order, like the reference's running total
            total += float(per_step[t, j])
        result = TrainResult(loss=total / max(steps, 1), num_examples=data.sizes[j], steps=steps)
        delta = {n: d[j].copy() for n, d in deltas.items()}
        out.append((with_state(delta, {n: e[j].copy() for n, e in ends.items()}), result))
    return out


def _to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays, fetched in one transfer per dtype (on the CPU, one copy)."""
    out: dict[str, np.ndarray] = {}
    for dt in {t.dtype for t in tensors.values()}:
        group = [n for n, t in tensors.items() if t.dtype == dt]
        flat = torch.cat([tensors[n].detach().reshape(-1) for n in group]).cpu().numpy()
        for n, part in zip(group, np.split(flat, np.cumsum([tensors[n].numel() for n in group])[:-1]), strict=True):
            out[n] = part.reshape(tensors[n].shape)
    return out


def _frozen(model: nn.Module, start: Mapping[str, torch.Tensor], snames: Sequence[str], dtype: torch.dtype,
            device: torch.device) -> Tensors:
    """The model's other parameters and buffers (a transfer model's backbone), shared by every phone."""
    return {
        n: (t.detach().to(dtype) if t.is_floating_point() else t).to(device)
        for n, t in chain(model.named_parameters(), model.named_buffers())
        if n not in start and n not in snames
    }


@contextmanager
def _patched_step(model: nn.Module, start: Mapping[str, torch.Tensor], frozen: Tensors, snames: Sequence[str],
                  cfg: TrainConfig, dtype: torch.dtype, dev: torch.device, loss: LossFn | None,
                  functional_pools: bool = False) -> Iterator[Step]:
    """The step of ``model`` (the user's, or a thread's copy of it), with its layers swapped for their
    batched forms while inside."""
    model.train()  # the reference's mode; TransferMobileNet keeps its backbone in eval
    holder: list[MaskSource] = []
    rows: list[torch.Tensor] = []  # the phone's real rows, for batch norm's statistics
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    cpu = dev.type == "cpu"  # measured faster than the kernels vmap picks there (docs/model-state.md)
    pools = [m for m in model.modules() if cpu and isinstance(m, nn.MaxPool2d) and batched_pool.fits(m)]
    convs = [m for m in model.modules() if cpu and isinstance(m, nn.Conv2d) and batched_conv.fits(m)]
    with (masked_dropout(dropout_layers(model), lambda m, out: holder[-1](m, out)), masked_batch_norm(norms, rows),
          batched_pool.strided_pooling(pools), batched_conv.matmul_convolutions(convs),
          batched_pool.functional_pooling() if functional_pools else nullcontext()):
        yield _make_step(model, start, frozen, cfg, holder, rows, loss)


def _make_step(model: nn.Module, start: Mapping[str, torch.Tensor], frozen: Tensors, cfg: TrainConfig,
               holder: list[MaskSource], rows: list[torch.Tensor], loss: LossFn | None = None) -> Step:
    """The batched SGD step: per phone, masked mean cross-entropy or the task's loss (+ FedProx), then
    ``w -= lr * grad`` in place, the update ``torch.optim.SGD`` makes.

    Only the model's forward pass is vmapped; the loss is computed on the stacked logits and the
    gradient comes from plain autograd of the *sum* of the phones' losses with respect to the
    stacked parameters. Phone j's loss depends on its own slice ``w[j]`` only, so the gradient of
    the sum at ``w[j]`` is exactly phone j's gradient. This is what ``vmap(grad(loss))`` computes,
    without functorch's grad transform: on the digits MLP it is ~3x faster per step, and its first
    call does not pay the ~2.5 s of lazy imports (torch._dynamo, sympy for the nll_loss
    decomposition) that the grad transform triggers. Batch norm takes each phone's statistics over
    its real rows and updates its running statistics in place, inside vmap, as the eager layer does
    (``batched_norm.masked_batch_norm``).
    """
    mu, lr = cfg.prox_mu, cfg.lr

    def forward(w: Tensors, s: Tensors, masks: list[torch.Tensor], real: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        holder.append(queued_masks(masks))  # this phone's dropout masks, in call order
        rows.append(real)  # [B]: this phone's real rows, for batch norm
        try:
            return functional_call(model, (frozen, s, w), (x,))  # [B, classes] for one phone
        finally:
            holder.pop()
            rows.pop()

    batched_forward = vmap(forward)

    def step(w: Tensors, s: Tensors, masks: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        leaves = {n: t.detach().requires_grad_() for n, t in w.items()}
        with torch.enable_grad():
            logits = batched_forward(leaves, s, masks, mask, x)  # [k, B, classes]
            if loss is not None:
                data = _task_loss(loss, logits, y, mask)  # [k]
            else:
                k, b = y.shape
                ce = nn.functional.cross_entropy(logits.reshape(k * b, -1), y.reshape(-1), reduction="none").reshape(k, b)
                # Mean over each phone's real examples only; equal to the reference's mean over a
                # (possibly partial) batch. max(.., 1) keeps an all-padding row finite.
                data = (ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [k]
            total = data.sum()
            if mu > 0:  # FedProx (Li et al. 2020): mu/2 * ||w - w_global||^2 per phone, start is shared
                total = total + 0.5 * mu * sum(((leaves[n] - start[n]) ** 2).sum() for n in leaves)
            grads = torch.autograd.grad(total, list(leaves.values()))
        for n, g in zip(leaves, grads, strict=True):
            w[n].add_(g, alpha=-lr)  # views into the stacked chunk (or copies written back): updated in place
        return data.detach()

    return step


def _task_loss(loss: LossFn, outputs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[k]: ``loss`` (a mean over a batch) of each phone's real rows, which come first in its row of the
    step (outputs [k, B, ...], y [k, B], mask [k, B]). Phones with as many real rows share one vmapped
    call: usually all of them, or two groups when some have a partial last batch."""
    counts = mask.sum(dim=1).to(torch.int64).tolist()
    out = outputs.new_zeros(len(counts))
    for r in sorted(set(counts)):
        ids = torch.tensor([j for j, c in enumerate(counts) if c == r], device=outputs.device)
        if r > 0:  # a phone in the step has at least one real row
            out = out.index_copy(0, ids, vmap(loss)(outputs[ids, :r], y[ids, :r]).to(out.dtype))
    return out


def vmap_failure(model: nn.Module, params: Mapping[str, np.ndarray], example: np.ndarray,
                 loss: LossFn | None = None, target: np.ndarray | None = None) -> str | None:
    """Why ``train_many`` cannot train ``model`` with ``loss`` (an op without a batching rule, such
    as ``aten::gru``, or a loss calling ``.item()``), or None: one vmapped step of two phones on two
    copies of ``example`` (one example, with its batch axis). Run once per model; the model is not
    modified. ``target``: the example's target, with its batch axis (default: class 0)."""
    x = np.concatenate([example, example])
    y = np.zeros(2, dtype=np.int64) if target is None else np.concatenate([target, target])
    jobs = [(x, y, np.random.default_rng(0)) for _ in range(2)]
    try:
        train_many(model, params, jobs, TrainConfig(batch_size=2), chunk=2, loss=loss)
    except Exception as exc:  # whatever vmap raises; the per-phone path runs the same code eagerly
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None
