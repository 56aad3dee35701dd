"""How one batched training step is split into calls: phones at a partial batch train in narrower calls.

A step of ``train_many`` stacks its phones' batches to one width, the batch size, so a phone at its
partial last batch of an epoch (``iterate_batches``) computes padding rows. With phones of 20-40
examples at batch 16 a fifth of the rows were padding. ``split_step`` cuts a step's phones into
contiguous calls, each as wide as its widest phone, where the rows saved outweigh the extra call's
fixed cost (dispatch and Python, whatever the width). That cost is counted in rows of the model's own
arithmetic (``rows_per_call``): a call is worth about 2.2e7 forward FLOPs (``CALL_FLOPS``), which is 128 rows
of the digits BN CNN, where 96 to 300 measured alike (bench/bench_batched.py, one thread), and more rows
than any step has for the digits MLP, whose rows cost next to nothing: it is never split.

The choice depends on the model and the batch layout only, never on a timer, so seeded runs stay
byte-for-byte reproducible.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfleet.export.model_state import probing

CALL_FLOPS = 2.2e7
_FLOPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = weakref.WeakKeyDictionary()


def _layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """A linear or convolution layer's multiply-adds times 2, as ``torch.utils.flop_counter`` counts
    its matrix product or convolution (the bias not counted); 0 for any other layer."""
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return 2 * output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 0


def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model``'s linear and convolution layers (``nn.Linear``, ``nn.ConvNd``) in a forward pass on
    ``example`` (one example with its batch axis), run in eval mode without gradients (no running
    statistic moves); cached per model and input shape. Products a model writes as functions are not
    counted: its calls then look cheaper, so it is split less, as for a light model. (``FlopCounterMode``
    counts those too, but any Python dispatch mode imports ``torch._dynamo`` on first use: 1.1-1.8 s of
    a fleet's first round.) The model is left in train mode, as ``train_many`` puts it."""
    shapes = _FLOPS.setdefault(model, {})
    key = tuple(example.shape)
    if key not in shapes:
        total = [0]

        def count(module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                total[0] += _layer_flops(module, output)

        handles = [m.register_forward_hook(count) for m in model.modules()
                   if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        try:
            with probing(model):
                model(example)
        finally:
            for h in handles:
                h.remove()
        shapes[key] = total[0]
    return shapes[key]


def rows_per_call(model: nn.Module, example: torch.Tensor) -> int:
    """A step call's fixed cost in rows of ``model``'s computation (at least 1)."""
    return max(1, round(CALL_FLOPS / max(forward_flops(model, example), 1)))


def split_step(rows: np.ndarray, call_rows: int) -> list[tuple[int, int, int]]:
    """One step's phones (their real rows, at least one each) split into contiguous calls
    ``(lo, hi, width)``, each as wide as its widest phone: the fewest rows computed, a call counting
    ``call_rows`` rows more. Cuts fall only where the rows change; ``train_many`` sorts a chunk's phones
    so that a step's phones at their partial batch come last, the widest first."""
    starts = [0, *(i for i in range(1, len(rows)) if rows[i] != rows[i - 1])]
    bounds = [*starts, len(rows)]
    runs = len(starts)
    best = [0.0] + [float("inf")] * runs
    cut = [0] * (runs + 1)
    for hi in range(1, runs + 1):  # runs [lo, hi) form one call
        width = 0
        for lo in range(hi - 1, -1, -1):
            width = max(width, int(rows[starts[lo]]))
            cost = best[lo] + call_rows + (bounds[hi] - bounds[lo]) * width
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    out = []
    hi = runs
    while hi > 0:
        lo = cut[hi]
        out.append((bounds[lo], bounds[hi], max(1, int(rows[bounds[lo] : bounds[hi]].max()))))
        hi = lo
    return out[::-1]


# A chunk cut for a second training thread keeps at least this many calls' worth of rows per step, and at
# least MIN_CHUNK phones: on one thread, chunks of 25 digits-CNN phones cost 10-15% more CPU than one chunk of
# 50, chunks of 13 25-50% more, while the MNIST CNN (28x28) trains as fast in chunks of 8 to 25 as in one of 50
# (bench/bench_batched.py --chunks, 2026-12-07).
CHUNK_CALLS = 3
MIN_CHUNK = 8


def chunk_phones(call_rows: int, batch_size: int) -> int:
    """The fewest phones a chunk should stack so that a step call's fixed cost stays a small share."""
    return max(MIN_CHUNK, -(-CHUNK_CALLS * call_rows // max(batch_size, 1)))


def chunk_bounds(phones: int, most: int, least: int, threads: int = 1) -> list[tuple[int, int]]:
    """``phones`` cut into contiguous chunks ``(lo, hi)`` of equal size (within one): enough to hold at
    most ``most`` each, and one per training thread where each keeps at least ``least`` phones. One
    thread keeps the fewest chunks (the cheapest in CPU); more threads may cut more, which moves a
    phone's floats only by rounding (a chunk's arithmetic is its phones', summed the same way)."""
    if phones <= 0:
        return []
    k = max(1, -(-phones // max(most, 1)), min(phones // max(least, 1), threads))
    size, extra = divmod(phones, k)
    bounds, lo = [], 0
    for j in range(k):
        hi = lo + size + (1 if j < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds
