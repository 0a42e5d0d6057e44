"""Classifiers, one registry. Inputs are images in [0, 1] with no normalisation layer.

The paper's recipe feeds raw [0, 1] pixels (PAPER.md section 3), so the eps-ball lives in the
same scale as the model input and no mean/std constant is needed anywhere.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """A small CNN sized for 8x8 digits and 28x28 Fashion-MNIST.

    Three 3x3 conv blocks (32w, 64w, 128w channels with width multiplier w) with batch norm,
    max-pooling after the second and third only when the map is at least 8 pixels wide,
    global average pooling and a linear head.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = 32 * width, 64 * width, 128 * width
        layers: list[nn.Module] = []
        size = image_size
        for cin, cout, pool in ((in_channels, c1, False), (c1, c2, True), (c2, c3, True)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool and size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class CNNFC(nn.Module):
    """Conv 64-64-128 (times width) with max-pooling, then a 512-unit hidden layer.

    The one CPU-scale model in which SAT was seen to robust-overfit (Fashion-MNIST at 14x14,
    1,000 images; issue 3): the wide fully connected layer lets training robust accuracy
    approach 1 while test robustness falls.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = 64 * width, 64 * width, 128 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, 512 * width), nn.ReLU(), nn.Linear(512 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 in the CIFAR layout (3x3 stem, no max-pool), plain or pre-activation blocks."""

    def __init__(self, in_channels: int, num_classes: int, preact: bool) -> None:
        super().__init__()
        self.preact = preact
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(64)
        block = PreActBlock if preact else BasicBlock
        stages: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [block(cin, cout, stride), block(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_bn(out))
        out = self.stages(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        return self.head(out.mean((2, 3)))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k as used by TRADES (WRN-34-10): pre-activation wide blocks."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 34, k: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(out.mean((2, 3)))


ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "small_cnn": lambda *, in_channels, num_classes, image_size, width: SmallCNN(
        in_channels, num_classes, image_size, width
    ),
    "cnn_fc": lambda *, in_channels, num_classes, image_size, width: CNNFC(
        in_channels, num_classes, image_size, width
    ),
    "preact_resnet18": lambda *, in_channels, num_classes, image_size, width: ResNet18(
        in_channels, num_classes, preact=True
    ),
    "resnet18": lambda *, in_channels, num_classes, image_size, width: ResNet18(
        in_channels, num_classes, preact=False
    ),
    "wrn34_10": lambda *, in_channels, num_classes, image_size, width: WideResNet(
        in_channels, num_classes, depth=34, k=10
    ),
}


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, width: int = 1
) -> nn.Module:
    """A fresh model from the registry (`width` scales small_cnn and cnn_fc)."""
    return MODELS[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width
    )
