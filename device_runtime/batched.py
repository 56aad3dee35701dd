"""Train many emulated phones at once: one vmapped SGD step for a chunk of phones.

Phones that start from the same model version, share an architecture and get the same
``TrainConfig`` differ only in their data. ``train_many`` stacks their trainable parameters
along a leading phone axis, vmaps the forward pass (``torch.func.functional_call``) over it and
takes per-phone gradients with one autograd call, so a chunk of phones costs one batched
forward/backward per step instead of one per phone. The result equals ``TorchRuntime.train`` run phone by phone
(same batches, same SGD update, same FedProx term, same reported loss) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedfleet.device_runtime.runtimes.base import TrainConfig, TrainResult, iterate_batches

Params = dict[str, np.ndarray]
Job = tuple[np.ndarray, np.ndarray, np.random.Generator]  # x [n, C, H, W], y [n], that phone's rng
# step(stacked params of the k active phones [k, ...] (updated in place), x [k, B, C, H, W],
#      y [k, B], mask [k, B]) -> loss before the FedProx term [k]
Step = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_many(
    model: nn.Module,
    params: Mapping[str, np.ndarray],
    jobs: Sequence[Job],
    cfg: TrainConfig,
    *,
    chunk: int = 128,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[Params, TrainResult]]:
    """Train every job from ``params``; return ``(new - params, result)`` per job, in job order.

    Equal to ``RuntimePool.train`` / ``TorchRuntime.train`` one phone at a time: each phone's
    rng is consumed exactly as ``iterate_batches(len(x), cfg, rng)`` consumes it, so its state
    afterwards is the same as after the per-phone path. Only the trainable parameters are
    stacked, ``chunk`` phones at a time; frozen parameters and buffers (a transfer model's
    backbone) are shared. 128 was fastest or tied for the digits MLP and CNN on one thread
    (bench/bench_batched.py); lower it for large inputs, whose activations scale with it. Deltas come back in ``dtype`` (float32 unless a test asks for
    float64). ``model`` is put in train mode, as the reference does, and is not modified.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params lack trainable tensors {missing}")
    model.train()  # the reference's mode; TransferMobileNet keeps its backbone in eval
    _check_batch_independent(model)

    start = {n: torch.as_tensor(np.asarray(params[n]), dtype=dtype) for n in names}
    step = _make_step(model, start, cfg, dtype)
    # Draw every phone's batch order up front: the same draws, in the same order per rng,
    # as the per-phone path makes lazily.
    plans = [list(iterate_batches(len(x), cfg, rng)) for x, _, rng in jobs]
    # Longest first: phones in a chunk then have similar step counts (little padding), and
    # the phones still training at step t are a prefix of the chunk.
    order = sorted(range(len(jobs)), key=lambda i: -len(plans[i]))
    results: dict[int, tuple[Params, TrainResult]] = {}
    for lo in range(0, len(order), chunk):
        ids = order[lo : lo + chunk]
        batch = _gather([jobs[i] for i in ids], [plans[i] for i in ids], cfg.batch_size, dtype)
        for i, out in zip(ids, _train_chunk(step, start, batch), strict=True):
            results[i] = out
    return [results[i] for i in range(len(jobs))]


@dataclass(frozen=True)
class _ChunkData:
    """One chunk's data and padded batch layout; phones sorted by step count, longest first."""

    x: torch.Tensor  # [N, C, H, W]: every phone's examples, concatenated
    y: torch.Tensor  # [N] int64
    index: torch.Tensor  # [T, P, B] rows of x per step and phone; padding points at row 0
    mask: torch.Tensor  # [T, P, B] 1 for a real example, 0 for padding
    active: list[int]  # [T] phones with a batch at step t (a prefix of the chunk)
    steps: list[int]  # [P]
    sizes: list[int]  # [P] examples per phone


def _gather(jobs: Sequence[Job], plans: Sequence[list[np.ndarray]], batch_size: int, dtype: torch.dtype) -> _ChunkData:
    sizes = [len(x) for x, _, _ in jobs]
    steps = [len(p) for p in plans]
    offsets = np.cumsum([0, *sizes[:-1]])
    t_max, p = steps[0], len(jobs)  # longest first
    index = np.zeros((t_max, p, batch_size), dtype=np.int64)
    mask = np.zeros((t_max, p, batch_size))
    for j, batches in enumerate(plans):
        for t, rows in enumerate(batches):  # the last batch of an epoch may be partial
            index[t, j, : len(rows)] = offsets[j] + rows
            mask[t, j, : len(rows)] = 1.0
    x = np.concatenate([np.asarray(x) for x, _, _ in jobs])
    y = np.concatenate([np.asarray(y, dtype=np.int64) for _, y, _ in jobs])
    return _ChunkData(
        x=torch.from_numpy(x).to(dtype),
        y=torch.from_numpy(y),
        index=torch.from_numpy(index),
        mask=torch.from_numpy(mask).to(dtype),
        active=[sum(s > t for s in steps) for t in range(t_max)],
        steps=steps,
        sizes=sizes,
    )


def _train_chunk(step: Step, start: Mapping[str, torch.Tensor], data: _ChunkData) -> list[tuple[Params, TrainResult]]:
    p = len(data.steps)
    stacked = {n: s.expand(p, *s.shape).clone() for n, s in start.items()}  # [P, ...]
    losses = torch.zeros(len(data.active), p, dtype=data.mask.dtype)  # [T, P]
    for t, k in enumerate(data.active):
        # Phones past their last step are left out of the call entirely (not just masked),
        # so their parameters cannot move: no gradient and no FedProx pull toward start.
        rows = data.index[t, :k]  # [k, B]
        views = {n: s[:k] for n, s in stacked.items()}
        losses[t, :k] = step(views, data.x[rows], data.y[rows], data.mask[t, :k])
    deltas = {n: (s - start[n]).numpy() for n, s in stacked.items()}
    per_step = losses.double().numpy()  # float32 -> float64 is exact, like float(loss)
    out: list[tuple[Params, TrainResult]] = []
    for j, steps in enumerate(data.steps):
        total = 0.0
        for t in range(steps):  # summed in step order, like the reference's running total
            total += float(per_step[t, j])
        result = TrainResult(loss=total / max(steps, 1), num_examples=data.sizes[j], steps=steps)
        out.append(({n: d[j].copy() for n, d in deltas.items()}, result))
    return out


def _make_step(model: nn.Module, start: Mapping[str, torch.Tensor], cfg: TrainConfig, dtype: torch.dtype) -> Step:
    """The batched SGD step: per phone, masked mean cross-entropy (+ FedProx), then
    ``w -= lr * grad`` in place, the update ``torch.optim.SGD`` makes.

    Only the model's forward pass is vmapped; the loss is computed on the stacked logits and the
    gradient comes from plain autograd of the *sum* of the phones' losses with respect to the
    stacked parameters. Phone j's loss depends on its own slice ``w[j]`` only, so the gradient of
    the sum at ``w[j]`` is exactly phone j's gradient. This is what ``vmap(grad(loss))`` computes,
    without functorch's grad transform: on the digits MLP it is ~3x faster per step, and its first
    call does not pay the ~2.5 s of lazy imports (torch._dynamo, sympy for the nll_loss
    decomposition) that the grad transform triggers.
    """
    frozen = {
        n: t.detach().to(dtype) if t.is_floating_point() else t
        for n, t in chain(model.named_parameters(), model.named_buffers())
        if n not in start
    }
    mu, lr = cfg.prox_mu, cfg.lr

    def forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (frozen, w), (x,))  # [B, classes] for one phone

    batched_forward = vmap(forward)

    def step(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        leaves = {n: t.detach().requires_grad_() for n, t in w.items()}
        with torch.enable_grad():
            logits = batched_forward(leaves, x)  # [k, B, classes]
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
            w[n].add_(g, alpha=-lr)  # views into the stacked chunk: updated in place
        return data.detach()

    return step


def _check_batch_independent(model: nn.Module) -> None:
    """Padding rows would enter batch statistics, and vmap cannot update running buffers:
    batch norm in training mode cannot be trained this way (eval-mode backbones can)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(f"{name or 'model'} is batch norm in training mode; train_many needs it in eval mode")
