"""Every model in the registry: right output shape for each input geometry, inputs in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from trainables.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_maps_cifar_shaped_input_to_logits(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=10, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_handles_each_dataset_geometry(channels: int, size: int) -> None:
    model = build_model("small_cnn", in_channels=channels, num_classes=7, image_size=size, width=2).eval()
    with torch.no_grad():
        assert model(torch.rand(3, channels, size, size)).shape == (3, 7)


def test_parameter_counts_match_the_literature() -> None:
    # ResNet-18 (CIFAR layout) has about 11.2M parameters, WRN-34-10 about 46.2M
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 11.1e6 < count(build_model("resnet18", in_channels=3, num_classes=10, image_size=32)) < 11.3e6
    assert 11.1e6 < count(build_model("preact_resnet18", in_channels=3, num_classes=10, image_size=32)) < 11.3e6
    assert 46.0e6 < count(build_model("wrn34_10", in_channels=3, num_classes=10, image_size=32)) < 46.4e6
