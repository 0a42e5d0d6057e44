"""Every model in the registry: right output shape for each input geometry, inputs in [0, 1];
the reference architectures key for key and logit for logit against RobustBench's code."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from trainables.models import MODELS, WideResNet, build_model


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


def test_tiny_cnn_is_small_cnn_at_half_the_channels() -> None:
    tiny = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=14)
    small = build_model("small_cnn", in_channels=1, num_classes=10, image_size=14)
    assert [m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 64]
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128]
    assert tiny.head.in_features == 64


def test_parameter_counts_match_the_literature() -> None:
    # ResNet-18 (CIFAR layout) has about 11.2M parameters, WRN-34-10 about 46.2M
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 11.1e6 < count(build_model("resnet18", in_channels=3, num_classes=10, image_size=32)) < 11.3e6
    assert 11.1e6 < count(build_model("preact_resnet18", in_channels=3, num_classes=10, image_size=32)) < 11.3e6
    assert 46.0e6 < count(build_model("wrn34_10", in_channels=3, num_classes=10, image_size=32)) < 46.4e6


# ---------------------------------------------------------------------------------------------
# The reference architectures against RobustBench's copies of their reference code: the same
# state-dict keys both ways (strict loading) and the same logits, so a researcher's checkpoint
# of kuangliu's ResNet-18, Rice et al.'s PreAct ResNet-18 or TRADES' WRN-34-10 runs unchanged.

REFERENCE_NAMES = ["resnet18", "preact_resnet18", "wrn34_10"]


@pytest.fixture(scope="module")
def rb_arch() -> dict[str, Callable[..., nn.Module]]:
    """name -> a builder of RobustBench's architecture that the energyat model follows."""
    from trainables.zoo import import_robustbench  # the test extra installs it: no skip

    import_robustbench()  # before the architectures: robustbench 1.1.1 needs its import alias
    from robustbench.model_zoo.architectures import resnet, wide_resnet

    return {
        "resnet18": resnet.ResNet18,
        "preact_resnet18": lambda: resnet.PreActResNet(resnet.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True),
        "wrn34_10": lambda **kw: wide_resnet.WideResNet(depth=34, widen_factor=10, **kw),
        "wrn10_1": lambda **kw: wide_resnet.WideResNet(depth=10, widen_factor=1, **kw),
    }


def _ours(name: str, **kw: Any) -> nn.Module:
    return build_model(name, in_channels=3, num_classes=10, image_size=32, **kw)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """`model` in eval mode with non-trivial BN state: running stats from two train-mode passes
    (the counters move too), affine parameters away from torch's 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 32, 32, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def rb_randomised(rb_arch: dict[str, Callable[..., nn.Module]]) -> Callable[[str], nn.Module]:
    """name -> RobustBench's model with random weights and BN state, built once (WRN-34-10 is 46M)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(1)
            cache[name] = _randomise_bn(rb_arch[name](), seed=2)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def ours_randomised() -> Callable[[str], nn.Module]:
    """name -> energyat's model with random weights and BN state, built once."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(3)
            cache[name] = _randomise_bn(_ours(name), seed=4)
        return cache[name]

    return get


def _assert_same_logits(a: nn.Module, b: nn.Module) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la, lb = a.eval()(x), b.eval()(x)
    assert la.shape == (2, 10)
    assert not torch.allclose(la[0], la[1])  # the inputs matter: a degenerate net proves nothing
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_reference_state_dict_loads_strictly_and_gives_the_same_logits(
    name: str, rb_randomised: Callable[[str], nn.Module]
) -> None:
    reference = rb_randomised(name)
    ours = _ours(name)
    ours.load_state_dict(reference.state_dict(), strict=True)
    _assert_same_logits(ours, reference)


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_energyat_state_dict_loads_strictly_into_the_reference_class(
    name: str, ours_randomised: Callable[[str], nn.Module], rb_arch: dict[str, Callable[..., nn.Module]]
) -> None:
    ours = ours_randomised(name)
    reference = rb_arch[name]()
    reference.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_logits(ours, reference)


def test_trades_checkpoint_with_its_unused_sub_block1_loads_strictly(rb_arch: dict[str, Callable[..., nn.Module]]) -> None:
    # what TRADES' and RobustBench's Zhang2019Theoretically checkpoints hold
    torch.manual_seed(6)
    trades = _randomise_bn(rb_arch["wrn34_10"](sub_block1=True), seed=7)
    state = trades.state_dict()
    dead = [k for k in state if k.startswith("sub_block1.")]
    assert dead
    ours = _ours("wrn34_10")
    ours.load_state_dict(state, strict=True)
    assert not any(k.startswith("sub_block1.") for k in ours.state_dict())
    assert all(k in state for k in dead)  # the caller's dict is left as it was
    _assert_same_logits(ours, trades)


def test_sub_block1_keys_are_dropped_under_a_prefix_too(rb_arch: dict[str, Callable[..., nn.Module]]) -> None:
    # a WRN inside a wrapper (say a normalising one) sees its keys under a prefix; WRN-10-1 is cheap
    trades = nn.Sequential(rb_arch["wrn10_1"](sub_block1=True))
    ours = nn.Sequential(WideResNet(3, 10, depth=10, widen_factor=1))
    ours.load_state_dict(trades.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), trades.eval()(x), rtol=1e-5, atol=1e-5)


def test_strict_loading_still_rejects_other_unexpected_and_missing_keys(
    ours_randomised: Callable[[str], nn.Module],
) -> None:
    ours = ours_randomised("wrn34_10")
    state = ours.state_dict()
    with pytest.raises(RuntimeError, match=r"foo\.weight"):
        ours.load_state_dict({**state, "foo.weight": torch.zeros(1)}, strict=True)
    with pytest.raises(RuntimeError, match=r"fc\.bias"):
        ours.load_state_dict({k: v for k, v in state.items() if k != "fc.bias"}, strict=True)


@pytest.fixture(scope="module")
def wrn_reference_init() -> nn.Module:
    torch.manual_seed(8)
    return _ours("wrn34_10", init="reference")


def _torch_default_std(conv: nn.Conv2d) -> float:
    # torch's Conv2d default: kaiming_uniform_(a=sqrt(5)), i.e. U(-b, b) with b = 1 / sqrt(fan_in)
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return 1.0 / math.sqrt(3.0 * fan_in)


def _trades_std(conv: nn.Conv2d) -> float:
    return math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))


SAMPLED_CONVS = ["block1.layer.1.conv1", "block2.layer.0.conv2", "block3.layer.4.conv1", "block3.layer.0.convShortcut"]


def test_wrn_reference_init_is_trades(wrn_reference_init: nn.Module) -> None:
    model = wrn_reference_init
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    assert model.fc.weight.abs().max() <= 1 / math.sqrt(model.fc.in_features)  # Linear weight: torch's default
    for path in SAMPLED_CONVS:
        conv = model.get_submodule(path)
        assert float(conv.weight.detach().std()) == pytest.approx(_trades_std(conv), rel=0.03), path
        assert abs(float(conv.weight.detach().mean())) < 0.05 * _trades_std(conv), path


def test_wrn_reference_init_matches_trades_code_weight_for_weight(
    wrn_reference_init: nn.Module, rb_arch: dict[str, Callable[..., nn.Module]]
) -> None:
    # the same seed, the same modules in the same order, the same init: the very same weights
    torch.manual_seed(8)
    reference = rb_arch["wrn34_10"]()
    theirs = reference.state_dict()
    for key, value in wrn_reference_init.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_wrn_torch_init_is_torch_default() -> None:
    torch.manual_seed(8)
    model = _ours("wrn34_10", init="torch")
    for path in SAMPLED_CONVS:
        conv = model.get_submodule(path)
        std = float(conv.weight.detach().std())
        assert std == pytest.approx(_torch_default_std(conv), rel=0.03), path
        assert abs(std / _trades_std(conv) - 1) > 0.3, path  # clearly not TRADES' init
    assert model.fc.bias.abs().max() > 0  # torch's default Linear bias is not zero


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "small_cnn", "cnn_fc"])
def test_reference_init_is_torch_default_where_the_reference_code_keeps_it(name: str) -> None:
    torch.manual_seed(9)
    reference = _ours(name, init="reference").state_dict()
    torch.manual_seed(9)
    default = _ours(name, init="torch").state_dict()
    assert reference.keys() == default.keys()
    assert all(torch.equal(reference[k], default[k]) for k in reference)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_resnet_init_matches_the_reference_code_weight_for_weight(
    name: str, rb_arch: dict[str, Callable[..., nn.Module]]
) -> None:
    torch.manual_seed(10)
    ours = _ours(name).state_dict()
    torch.manual_seed(10)
    theirs = rb_arch[name]().state_dict()
    assert list(ours) == list(theirs)  # the same keys in the same order
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unknown_init_is_refused() -> None:
    with pytest.raises(ValueError, match="init"):
        _ours("resnet18", init="kaiming")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", REFERENCE_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28)])
def test_reference_architectures_take_other_geometries(name: str, channels: int, size: int) -> None:
    # global average pooling instead of the reference's fixed window: 8x8 digits and 28x28 Fashion-MNIST
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 7)
