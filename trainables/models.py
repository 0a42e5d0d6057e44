"""Classifiers, one registry. Inputs are images in [0, 1] with no normalisation layer.

The paper's recipe feeds raw [0, 1] pixels (docs/science.md section 3), so the eps-ball lives in the
same scale as the model input and no mean/std constant is needed anywhere.

The three reference architectures (resnet18, preact_resnet18, wrn34_10) copy their reference
code's module names and forward pass exactly, so a researcher's own checkpoint of that code
loads with a strict ``load_state_dict`` and gives the same logits (tests/test_models.py checks
this against RobustBench's copies of the same code). small_cnn and cnn_fc are energyat's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """A small CNN sized for 8x8 digits and 28x28 Fashion-MNIST.

    Three 3x3 conv blocks (32w, 64w, 128w channels with width multiplier w; `base` 16 halves
    them: `tiny_cnn`) with batch norm, max-pooling after the second and third only when the map
    is at least 8 pixels wide, global average pooling and a linear head.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 1, base: int = 32) -> None:
        super().__init__()
        c1, c2, c3 = base * width, 2 * base * width, 4 * base * width
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


class BasicBlock(nn.Module):
    """kuangliu/pytorch-cifar's ResNet BasicBlock (models/resnet.py), names and forward as there."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # an empty Sequential is the identity and, unlike nn.Identity, is what the reference has
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR layout: kuangliu/pytorch-cifar's models/resnet.py ``ResNet18()``.

    The same code is the WEAT paper's ResNet-18 and RobustBench's
    ``robustbench.model_zoo.architectures.resnet.ResNet18()`` (RobustBench/robustbench); keys are
    ``conv1, bn1, layer1..layer4, linear``. Only ``in_channels`` is new (1-channel datasets).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(self.in_planes, planes, stride), BasicBlock(planes, planes, 1)]
        self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # the reference's F.avg_pool2d(out, 4) is this global mean for 32x32 inputs (a 4x4 map);
        # the mean also serves the 8x8 and 28x28 datasets, where a fixed 4x4 window would not
        return self.linear(out.mean((2, 3)))


class PreActBlock(nn.Module):
    """Pre-activation basic block of Rice et al.'s robust_overfitting (locuslab/robust_overfitting,
    preactresnet.py), = RobustBench's ``PreActBlockV2``: the 1x1 shortcut sees relu(bn1(x)).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        # no attribute at all for the identity shortcut, as in the reference (which tests hasattr),
        # so the state-dict keys are the reference's
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 of Rice et al.'s robust_overfitting (locuslab/robust_overfitting,
    preactresnet.py), = RobustBench's ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)``.

    Keys are ``conv1, layer1..layer4, bn, linear``: no BN after the stem (each block starts with
    one), a final BN + ReLU before pooling. Only ``in_channels`` is new (1-channel datasets).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = [PreActBlock(self.in_planes, planes, stride), PreActBlock(planes, planes, 1)]
        self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # the reference's F.avg_pool2d(out, 4) is this global mean for 32x32 inputs (a 4x4 map);
        # the mean also serves the 8x8 and 28x28 datasets, where a fixed 4x4 window would not
        return self.linear(out.mean((2, 3)))


class WideBasicBlock(nn.Module):
    """TRADES' WideResNet BasicBlock (yaodongyu/TRADES, models/wideresnet.py), names and forward as there."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        # in-place ReLUs as in the reference: the values are the same, and they save one
        # activation map per ReLU in WRN-34-10's large training-time memory
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes  # the reference's name, kept for anyone comparing the code
        # the reference stores None (no key) when in == out, whatever the stride
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as the reference: when the widths differ the 1x1 shortcut sees relu1(bn1(x)), not x
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        shortcut = x if self.convShortcut is None else self.convShortcut(x)
        return shortcut + out


class NetworkBlock(nn.Module):
    """TRADES' NetworkBlock: ``.layer``, an nn.Sequential of `nb_layers` WideBasicBlocks."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(nb_layers))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _drop_sub_block1(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: forget TRADES' never-used ``sub_block1`` weights (see WideResNet)."""
    for key in [k for k in state_dict if k.startswith(prefix + "sub_block1.")]:
        del state_dict[key]  # load_state_dict hands hooks its own copy: the caller's dict is untouched


class WideResNet(nn.Module):
    """WRN-depth-k of TRADES (yaodongyu/TRADES, models/wideresnet.py), = RobustBench's
    ``robustbench.model_zoo.architectures.wide_resnet.WideResNet`` (RobustBench/robustbench).

    Keys are ``conv1, block1..block3 (.layer.N), bn1, fc``, forward as there (dropout rate 0, the
    reference's default and TRADES' setting). Only ``in_channels`` is new (1-channel datasets).

    TRADES' class also builds ``sub_block1``, a second copy of block1 that forward never calls,
    and its checkpoints (TRADES' own, RobustBench's Zhang2019Theoretically) carry its ~1.4M
    weights. It is not built here (no dead parameters in the optimiser or the parameter count);
    a load-state-dict pre-hook drops its keys, so those checkpoints still load strictly.

    The reference's own initialisation (TRADES' He-normal) is ``trades_init_``, applied by
    ``build_model(..., init="reference")``; constructing the class gives torch's default.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = 34, widen_factor: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        self.register_load_state_dict_pre_hook(_drop_sub_block1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        # the reference's F.avg_pool2d(out, 8) is this global mean for 32x32 inputs (an 8x8 map);
        # the mean also serves the 8x8 and 28x28 datasets, where a fixed 8x8 window would not
        return self.fc(out.mean((2, 3)))


def trades_init_(model: nn.Module) -> None:
    """TRADES' WideResNet initialisation, in place (the loop at the end of its ``__init__``).

    Conv2d weights ~ N(0, sqrt(2 / (k * k * out_channels))) (He, fan-out), BatchNorm2d weight 1
    and bias 0, Linear bias 0; Linear weights keep torch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "small_cnn": lambda *, in_channels, num_classes, image_size, width: SmallCNN(
        in_channels, num_classes, image_size, width
    ),
    # small_cnn at half the channels (16-32-64): a quarter of its arithmetic, so that the original
    # AutoAttack on 1,000 test images fits a CPU study of many trials (examples/paper_fashion_cpu.yaml)
    "tiny_cnn": lambda *, in_channels, num_classes, image_size, width: SmallCNN(
        in_channels, num_classes, image_size, width, base=16
    ),
    "cnn_fc": lambda *, in_channels, num_classes, image_size, width: CNNFC(
        in_channels, num_classes, image_size, width
    ),
    "preact_resnet18": lambda *, in_channels, num_classes, image_size, width: PreActResNet18(in_channels, num_classes),
    "resnet18": lambda *, in_channels, num_classes, image_size, width: ResNet18(in_channels, num_classes),
    "wrn34_10": lambda *, in_channels, num_classes, image_size, width: WideResNet(
        in_channels, num_classes, depth=34, widen_factor=10
    ),
}

# What each model's reference code does after torch's default initialisation; a model not
# listed here uses torch's default in its reference code too (kuangliu's and Rice et al.'s
# ResNets, and energyat's own small_cnn and cnn_fc), so "reference" and "torch" agree for it.
REFERENCE_INIT: dict[str, Callable[[nn.Module], None]] = {
    "wrn34_10": trades_init_,
}

Init = Literal["reference", "torch"]


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, width: int = 1, init: Init = "reference"
) -> nn.Module:
    """A fresh model from the registry (`width` scales small_cnn and cnn_fc).

    ``init="reference"`` initialises as the model's reference code does (TRADES' He-normal for
    wrn34_10, torch's default for the rest); ``init="torch"`` leaves torch's default everywhere.
    """
    if init not in ("reference", "torch"):
        raise ValueError(f"unknown init {init!r}: expected 'reference' or 'torch'")
    model = MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    if init == "reference" and name in REFERENCE_INIT:
        REFERENCE_INIT[name](model)
    return model
