"""Where torch arithmetic runs: ``--device auto|cpu|cuda`` turned into a torch device, and how many rows
of work fit in an accelerator's free memory.

The batched trainer (device_runtime/batched.py) and the server's evaluation (server/evaluation.py) both
take the resolved device; the codec, the wire and everything else stay on the CPU. On the CPU the
callers keep their own chunk sizes (measured, see bench/bench_batched.py); on CUDA the chunk is what fits
in half of the memory ``torch.cuda.mem_get_info`` reports free, so one call covers as many phones (or
test examples) as the device can hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
FREE_SHARE = 0.5  # of the free memory a chunk may fill: the allocator's fragmentation and other tensors take the rest


class DeviceUnavailable(ValueError):
    """``--device cuda`` on a machine without a CUDA device: a user's input error, never a silent CPU run."""


def check_device_name(name: str) -> None:
    """Refuse a name other than auto, cpu, cuda (no torch import)."""
    if name not in DEVICES:
        raise ValueError(f"--device {name}: choose auto, cpu or cuda")


def resolve_device(name: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a ``--device`` value: auto is CUDA when torch sees a CUDA device;
    ``cuda`` without one raises DeviceUnavailable. Imports torch only for auto and cuda."""
    check_device_name(name)
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise DeviceUnavailable("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    return "cpu"


def rows_that_fit(device: torch.device | str, bytes_per_row: int, cap: int) -> int:
    """How many rows of ``bytes_per_row`` to run in one call: ``cap`` on the CPU; on CUDA, what fits in
    FREE_SHARE of the free memory (at least 1, at most ``cap``)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return cap
    free, _total = torch.cuda.mem_get_info(dev)
    return fit_rows(free, bytes_per_row, cap)


def fit_rows(free_bytes: int, bytes_per_row: int, cap: int) -> int:
    """Rows of ``bytes_per_row`` in FREE_SHARE of ``free_bytes``: at least 1 (a row that does not fit
    fails in torch with its own out-of-memory error), at most ``cap``."""
    return max(1, min(cap, int(free_bytes * FREE_SHARE) // max(bytes_per_row, 1)))


def training_bytes_per_phone(model: torch.nn.Module, example: torch.Tensor, batch_size: int, itemsize: int) -> int:
    """A phone's share of one batched training step: its trainable parameters four times (the stacked
    copy, the gradient, the start, the delta) and, per example of its batch, every module's output kept
    for the backward pass twice (the activation and its gradient)."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return itemsize * 4 * params + 2 * batch_size * activation_bytes(model, example, itemsize)


def activation_bytes(model: torch.nn.Module, example: torch.Tensor, itemsize: int) -> int:
    """Bytes of every module's output for one example: one forward pass of ``example`` (one example
    with its batch axis) without gradients, in eval mode; the model is not modified."""
    import torch

    outputs = [0]

    def count(_module: torch.nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs[0] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return itemsize * outputs[0]
