"""A task's model: a built-in name (mlp | cnn | mobilenet) or ``MODULE:ATTR``, a callable returning a
``torch.nn.Module``, built the same way on the server, on phones and by export.

A user's factory is called with the keyword arguments its signature names among ``input_shape``
(one example's shape, e.g. ``(1, 28, 28)`` or ``(T, F)``) and ``num_classes``; others get none.
Its default initialisation draws from torch's global generator, so it runs inside
``torch.random.fork_rng`` seeded with the task's seed: the same seed gives the same weights, and the
caller's generator state is left as it was.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from fedfleet.export.refs import call_with, resolve_ref


def build_user_model(ref: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
                     flag: str = "--model") -> nn.Module:
    """Import and call the factory ``ref`` names, its initial weights drawn from ``seed``."""
    factory = resolve_ref(ref, flag)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = call_with(factory, input_shape=tuple(input_shape), num_classes=num_classes)
        except Exception as exc:
            raise ValueError(f"{flag} {ref}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{flag} {ref}: returned a {type(model).__name__}, not a torch.nn.Module")
    bad = [f"{n} ({t.dtype})" for n, t in model.state_dict().items()
           if t.is_floating_point() and t.dtype != torch.float32]
    if bad:
        raise ValueError(f"{flag} {ref}: fedfleet trains float32 models; {', '.join(bad[:3])} "
                         "(call .float() on the module)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{flag} {ref}: the model has no trainable parameter")
    return model


def check_forward(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, flag: str, name: str,
                  regression: bool = False) -> None:
    """The model takes a batch of the dataset's examples and returns ``[batch, num_classes]`` logits;
    ValueError naming ``flag`` otherwise. The model is left in training mode."""
    x = torch.zeros((2, *input_shape), dtype=torch.float32)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ValueError(f"{flag} {name}: fails on a batch of the dataset's inputs, shape {list(x.shape)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if regression:
            raise ValueError(f"{flag} {name}: on inputs {list(x.shape)} it returns {got}; a regression of "
                             f"{num_classes} target(s) per example must return [2, {num_classes}]")
        raise ValueError(f"{flag} {name}: on inputs {list(x.shape)} it returns {got}; a classifier of the "
                         f"dataset's {num_classes} classes must return logits [2, {num_classes}]")


def model_fingerprint(model: nn.Module, loss: str | None = None) -> str:
    """sha256 of the model's state: every tensor's name, shape and dtype, in ``state_dict`` order
    (weights' values are not part of it), and the task's loss when it is not the built-in cross-entropy
    (export.task_loss: a phone training another loss would pull the model elsewhere). Phones and server
    compare it at registration."""
    entries: list[list[object]] = [[n, list(t.shape), str(t.dtype).removeprefix("torch.")]
                                   for n, t in model.state_dict().items()]
    if loss is not None and loss != "cross_entropy":
        entries.append(["loss", loss])
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def task_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0,
               weights: str | None = None, allow_torch_weights: bool = True) -> nn.Module:
    """The task's model as the server starts from it: built from ``seed``, then ``weights`` (a file,
    see export.weights) loaded over it when given."""
    from fedfleet.export.models import ModelSpec, build_model

    model = build_model(ModelSpec(name, tuple(input_shape), num_classes), seed=seed)
    if weights is not None:
        from fedfleet.export.weights import fit_weights, load_weights

        fit_weights(model, load_weights(weights, "--init-weights", allow_torch_weights), f"--init-weights {weights}")
    return model
