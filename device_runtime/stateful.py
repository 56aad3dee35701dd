"""What makes a model more than its trainable parameters during local training.

- **State**: the running statistics of batch norm layers that train (``running_mean``,
  ``running_var``, ``num_batches_tracked``). A phone starts a task from a given state (the
  server's, or its own under ``--local-state``) and reports the state it ends with. A layer the
  model keeps in eval mode (a frozen backbone) has no state here: it never changes.
- **Dropout masks**: drawn from an explicit ``torch.Generator`` seeded from the phone's numpy
  generator, never from torch's global one, so that the eager and the batched trainer draw the
  same masks and a seed reproduces a run. ``nn.Dropout`` drops elements, ``Dropout1d/2d/3d``
  whole channels; either keeps a value with probability ``1 - p`` and scales it by ``1 / (1 - p)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedfleet.export.model_state import probing

_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
MaskSource = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (dropout layer, its output) -> mask


def set_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n, value in state.items():
            buffers[n].copy_(torch.from_numpy(np.asarray(value)).to(buffers[n].dtype))


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """Dropout layers that drop something; refuses kinds whose masks this cannot draw."""
    layers: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            if not isinstance(module, (nn.Dropout, *_CHANNEL_DROPOUT)):
                raise ValueError(f"{name}: {type(module).__name__} is not supported; use nn.Dropout or Dropout1d/2d/3d")
            layers.append(module)
    return layers


def mask_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``layer``'s mask for an output of ``shape`` (batch first)."""
    if isinstance(layer, _CHANNEL_DROPOUT):
        return (*shape[:2], *(1,) * (len(shape) - 2))
    return shape


def draw_mask(layer: nn.Module, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Keep with probability 1 - p, scaled by 1 / (1 - p); uniforms drawn in float32 whatever ``dtype``."""
    p = float(layer.p)  # type: ignore[arg-type]
    keep = torch.rand(mask_shape(layer, shape), generator=gen) >= p
    return keep.to(dtype) / (1.0 - p)


def dropout_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@contextmanager
def masked_dropout(layers: Sequence[nn.Module], source: MaskSource) -> Iterator[None]:
    """While inside, each layer is the identity times ``source(layer, output)``: its own draw
    (from torch's global generator) is switched off by eval mode, and a forward hook applies
    the mask. Modes and hooks are restored on exit."""
    modes = [layer.training for layer in layers]
    handles = []
    for layer in layers:
        layer.train(False)
        handles.append(layer.register_forward_hook(lambda m, _i, out: out * source(m, out)))
    try:
        yield
    finally:
        for layer, mode, handle in zip(layers, modes, handles, strict=True):
            handle.remove()
            layer.train(mode)


def generator_masks(gen: torch.Generator) -> MaskSource:
    """Masks drawn at each call from ``gen``: the eager trainer's source."""

    def source(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return draw_mask(layer, tuple(out.shape), gen, out.dtype)

    return source


def queued_masks(masks: Sequence[torch.Tensor]) -> MaskSource:
    """Masks drawn beforehand, taken in call order: the batched trainer's source (inside vmap
    each is one phone's slice)."""
    it = iter(masks)

    def source(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return next(it)

    return source


def dropout_call_shapes(model: nn.Module, layers: Sequence[nn.Module], example: torch.Tensor) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Each dropout call of one forward pass, in order, with its output's shape per example
    (found by running ``example``, one example with its batch axis, without gradients)."""
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        calls.append((layer, tuple(out.shape[1:])))
        return torch.ones(())

    with probing(model), masked_dropout(layers, record):  # shapes only: one example is a valid batch
        model(example)
    return calls
