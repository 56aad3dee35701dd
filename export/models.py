"""The models fedfleet trains on phones.

Every model maps a float32 batch ``x: [B, *input_shape]`` to logits ``[B, num_classes]``: the MLP
takes any shape (flattened), the CNN and MobileNet images ``[C, H, W]`` of any size. A user's model
(``MODULE:ATTR``, see export.task_model) goes through the same ``build_model``.
``trainable_names`` lists the parameters a phone trains and uploads, in a fixed order
that the ExecuTorch and ONNX artifacts share; for transfer learning it is the head only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_NAMES = ("mlp", "cnn", "mobilenet")


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear. For 8x8 digits: 64-32-10."""

    def __init__(self, in_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """Two conv(3x3)+ReLU+maxpool(2) blocks and a linear classifier; ``side``: H and W (or H alone when
    ``width_px`` gives W)."""

    def __init__(self, in_channels: int, side: int, num_classes: int, width: int, width_px: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (side // 4) * ((side if width_px is None else width_px) // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # [B, w, H/2, W/2]
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # [B, 2w, H/4, W/4]
        return self.fc(x.flatten(1))


class TransferMobileNet(nn.Module):
    """A frozen torchvision MobileNetV3-small backbone and a trainable linear head.

    Grey inputs are repeated to 3 channels. The backbone runs in eval mode (frozen batch
    norm statistics) so that only ``head.*`` changes on the phone.
    """

    def __init__(self, num_classes: int, backbone_weights: Path | None = None) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_small

        backbone = mobilenet_v3_small(weights=None)
        if backbone_weights is not None:
            state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state, strict=False)
        self.features = backbone.features
        self.head = nn.Linear(576, num_classes)
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()

    def train(self, mode: bool = True) -> TransferMobileNet:
        super().train(mode)
        self.features.eval()  # the backbone never leaves eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # grey [B, 1, H, W] repeated to 3 channels (a view; RGB unchanged), without a branch on the shape:
        # torch.fx traces the model, so the batched trainer runs the backbone once per phone (frozen_prefix)
        feats = self.features(x.expand(-1, 3, -1, -1)).mean(dim=(2, 3))  # [B, 576]
        return self.head(feats)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # mlp | cnn | mobilenet | MODULE:ATTR
    input_shape: tuple[int, ...]  # one example: (C, H, W) images, (T, F) sequences, (F,) features
    num_classes: int


def build_model(
    spec: ModelSpec, seed: int = 0, backbone_weights: Path | None = None
) -> nn.Module:
    """Build a model with parameters drawn from an explicit seeded generator (a user's model:
    export.task_model.build_user_model, which seeds a forked torch generator)."""
    from fedfleet.export.refs import check_model_name
    from fedfleet.export.task_model import build_user_model

    check_model_name(spec.name)
    if spec.name not in MODEL_NAMES:
        return build_user_model(spec.name, spec.input_shape, spec.num_classes, seed)
    shape = tuple(spec.input_shape)
    if spec.name != "mlp" and (len(shape) != 3 or min(shape[1:]) < 4):
        raise ValueError(f"--model {spec.name} takes images [C, H, W] of at least 4x4 pixels, got inputs "
                         f"{list(shape)}; use mlp or a model of your own (MODULE:ATTR)")
    features, spatial = math.prod(shape), math.prod(shape[1:]) if len(shape) == 3 else math.prod(shape)
    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: MLP(features, spec.num_classes, hidden=32 if spatial <= 64 else 128),
        "cnn": lambda: CNN(shape[0], shape[1], spec.num_classes, width=16, width_px=shape[-1]),
        "mobilenet": lambda: TransferMobileNet(spec.num_classes, backbone_weights),
    }
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layers' default init (overwritten below) leaves the caller's RNG be
        model = builders[spec.name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d) and (
                backbone_weights is None or module.weight.requires_grad
            ):
                _init_layer(module, gen)
    return model


def _init_layer(layer: nn.Linear | nn.Conv2d, gen: torch.Generator) -> None:
    """torch.nn's default init (uniform in +-1/sqrt(fan_in)), drawn from a seeded generator."""
    bound = 1.0 / (layer.weight[0].numel() ** 0.5)
    layer.weight.uniform_(-bound, bound, generator=gen)
    if layer.bias is not None:
        layer.bias.uniform_(-bound, bound, generator=gen)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
