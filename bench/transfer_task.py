"""bench_flower's transfer-learning task: a backbone pretrained elsewhere, frozen, and a head trained
by the phones.

The model is fedfleet's CNN (``--model cnn``'s layers and names) with both convolution blocks frozen;
only the linear head ``fc.*`` is trainable and federated. Its backbone is pretrained here, centrally,
on another dataset, scikit-learn's 8x8 digits upscaled to the task's 28x28 (``pretrain``), and reaches
the run through ``--init-weights`` (safetensors). No weights are downloaded. The built-in
``mobilenet`` is not used for this: its seeded, untrained backbone in eval mode maps mnist5k images
to features of about 1e-10 (measured), from which no head learns anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfleet.export.models import CNN

MODEL = "bench.transfer_task:frozen_cnn"


def frozen_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The CNN of ``--model cnn`` with conv1 and conv2 frozen (requires_grad False)."""
    model = CNN(input_shape[0], input_shape[1], num_classes, width=16, width_px=input_shape[2])
    for p in [*model.conv1.parameters(), *model.conv2.parameters()]:
        p.requires_grad_(False)
    return model


def pretrain(path: Path, input_shape: tuple[int, ...], num_classes: int, seed: int = 0, epochs: int = 3) -> Path:
    """Train a whole CNN on upscaled digits, then write the task's initial weights to ``path``: the
    task's seeded model (as fedfleet's server builds it) with the pretrained convolutions copied in."""
    from fedfleet.device_runtime.builtin_data import digits_arrays
    from fedfleet.export.task_model import task_model
    from fedfleet.export.weights import save_weights

    images, labels = digits_arrays()
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 16.0)
    x = nn.functional.interpolate(x, size=tuple(input_shape[1:]), mode="bilinear", align_corners=False)
    x = x.expand(-1, input_shape[0], -1, -1).contiguous()
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        source = CNN(input_shape[0], input_shape[1], 10, width=16, width_px=input_shape[2])
    opt = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 32):
            idx = order[start : start + 32]
            loss = nn.functional.cross_entropy(source(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = task_model(MODEL, input_shape, num_classes, seed, None)
    with torch.no_grad():
        for name, value in source.state_dict().items():
            if name.startswith(("conv1.", "conv2.")):
                model.state_dict()[name].copy_(value)
    return save_weights(path, model)
