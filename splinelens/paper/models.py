"""The paper's models (Sec. 6), by name. Input channels, size and class count follow the data.

Each model has batchnorm before every ReLU and biases on by default (both switchable), and its
classifier layer at ``model.classifier``.

>>> model = build_model("small-cnn", in_channels=1, image_size=28, num_classes=10)
>>> model.classifier
Linear(in_features=1152, out_features=10, bias=True)
>>> sorted(MODELS)
['large-cnn', 'mlp', 'resnet', 'small-cnn']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "Classifier",
    "ModelSpec",
    "build_model",
    "large_cnn",
    "mlp",
    "resnet",
    "small_cnn",
]


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs to know about the data, and the switches every model has."""

    in_channels: int
    image_size: int
    num_classes: int
    batchnorm: bool = True
    bias: bool = True


def _conv(s: ModelSpec, cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
    """conv -> (batchnorm) -> ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, bias=s.bias)]
    if s.batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    return [*layers, nn.ReLU()]


class Classifier(nn.Module):
    """A feature extractor followed by the linear ``classifier`` (its rows: eq. (13)'s W_c)."""

    def __init__(self, features: nn.Module, width: int, s: ModelSpec) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(width, s.num_classes, bias=s.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def small_cnn(s: ModelSpec) -> nn.Module:
    """conv3x3 32 -> pool -> conv3x3 64 -> pool -> conv1x1 128 -> pool -> linear."""
    f = nn.Sequential(
        *_conv(s, s.in_channels, 32, 3, 1),
        nn.MaxPool2d(2),
        *_conv(s, 32, 64, 3, 1),
        nn.MaxPool2d(2),
        *_conv(s, 64, 128, 1, 0),
        nn.MaxPool2d(2),
    )
    side = s.image_size // 2 // 2 // 2
    return Classifier(f, 128 * side * side, s)


def large_cnn(s: ModelSpec) -> nn.Module:
    """The paper's large CNN: 96 (same, full, full), pool, 192 (valid, full, valid), pool,
    192 (valid), 1x1 192, global average pool, linear. 'full' pads 2, 'valid' pads 0."""
    f = nn.Sequential(
        *_conv(s, s.in_channels, 96, 3, 1),
        *_conv(s, 96, 96, 3, 2),
        *_conv(s, 96, 96, 3, 2),
        nn.MaxPool2d(2),
        *_conv(s, 96, 192, 3, 0),
        *_conv(s, 192, 192, 3, 2),
        *_conv(s, 192, 192, 3, 0),
        nn.MaxPool2d(2),
        *_conv(s, 192, 192, 3, 0),
        *_conv(s, 192, 192, 1, 0),
        nn.AdaptiveAvgPool2d(1),
    )
    return Classifier(f, 192, s)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip connection (a 1x1 projection when the shape changes)."""

    def __init__(self, s: ModelSpec, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if s.batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=s.bias)
        self.bn1, self.relu1 = norm(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=s.bias)
        self.bn2, self.relu2 = norm(cout), nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=s.bias), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(s: ModelSpec, depth: int = 4, width: int = 4) -> nn.Module:
    """Wide ResNet: stem conv 16, three stages of ``depth`` blocks with 16w, 32w, 64w channels
    (the paper's ResNet4-4: depth 4, width 4), global average pool, linear."""
    layers: list[nn.Module] = _conv(s, s.in_channels, 16, 3, 1)
    cin = 16
    for stage, cout in enumerate((16 * width, 32 * width, 64 * width)):
        for b in range(depth):
            layers.append(BasicBlock(s, cin, cout, 2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(nn.Sequential(*layers), cin, s)


def mlp(s: ModelSpec, hidden: tuple[int, ...] = (512, 512)) -> nn.Module:
    """Flatten -> (linear -> (batchnorm) -> ReLU) per hidden width -> linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = s.in_channels * s.image_size * s.image_size
    for h in hidden:
        layers.append(nn.Linear(cin, h, bias=s.bias))
        if s.batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        cin = h
    return Classifier(nn.Sequential(*layers), cin, s)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": small_cnn,
    "large-cnn": large_cnn,
    "resnet": resnet,
    "mlp": mlp,
}


def build_model(
    name: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    batchnorm: bool = True,
    bias: bool = True,
    **options: object,
) -> nn.Module:
    """A registered model for data of the given shape (options: resnet depth/width, mlp
    hidden)."""
    if name not in MODELS:
        raise KeyError(f"unknown architecture {name!r}; choose one of {sorted(MODELS)}")
    spec = ModelSpec(in_channels, image_size, num_classes, batchnorm, bias)
    return MODELS[name](spec, **options)
