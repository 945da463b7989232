"""keel's small networks: built by name through timm like any timm model, with timm's model interface."""
from __future__ import annotations

import pytest
import timm
import torch

from tasks.core.config import TrainConfig
from tasks.model.build import ModelConfigError, backbone_groups, build_model, head_parameters, set_phase


@pytest.mark.parametrize("name, widths", [("keel_cifar_net", (64, 256, 256)), ("keel_cifar_net_s", (32, 64, 64))])
def test_builds_by_name_with_a_fresh_head(name: str, widths: tuple[int, int, int]) -> None:
    model, report = build_model(TrainConfig(model=name), num_classes=7, in_chans=3, resolution=32)
    assert report["stem"].startswith("2x2 stride 1")
    assert [g.conv2.out_channels for g in model.stages] == list(widths)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    assert model.get_classifier().out_features == 7 and model.get_classifier().bias is None
    # BatchNorm scales are fixed at 1; only the shifts train
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)


def test_grayscale_and_other_sizes() -> None:
    model, _ = build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=1, resolution=16)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)  # global pooling: any size from 16 px up


def test_too_small_images_are_refused_with_the_reason() -> None:
    with pytest.raises(ModelConfigError, match="keel_cifar_net_s needs images of at least 16 px .*shard.resolution is 8"):
        build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=1, resolution=8)


def test_conv_layers_start_near_identity() -> None:
    model, _ = build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=3, resolution=32)
    w = model.stages[1].conv2.weight  # 64 -> 64: the first 64 filters are a Dirac delta
    eye = torch.zeros_like(w)
    torch.nn.init.dirac_(eye)
    assert torch.equal(w, eye)


def test_transfer_groups_and_phases() -> None:
    model, _ = build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=3, resolution=32)
    assert len(backbone_groups(model)) == 4  # stem + three conv groups
    set_phase(model, 1, 0)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head_parameters(model)}


def test_no_published_weights() -> None:
    with pytest.raises(ValueError, match="keel_cifar_net\\* have no published weights: use train.pretrained: none"):
        build_model(TrainConfig(model="keel_cifar_net", pretrained="timm"), num_classes=10, in_chans=3, resolution=32)


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(ModelConfigError, match="unknown timm model 'keel_cifar_nett'.*keel_cifar_net"):
        build_model(TrainConfig(model="keel_cifar_nett"), num_classes=10, in_chans=3, resolution=32)


def _correlated_images(n: int, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, 20, 20, generator=g)
    if channels > 1:
        x[:, 1] = 0.8 * x[:, 0] + 0.2 * x[:, 1]  # correlated channels
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # and correlated neighbours


@pytest.mark.parametrize("channels", [3, 1])
def test_whitened_stem_decorrelates_patches_and_is_frozen(channels: int) -> None:
    model, _ = build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=channels, resolution=32)
    x = _correlated_images(300, channels)
    report = model.whiten_stem(x)
    dims = channels * 4
    assert model.stem[0].out_channels == 2 * dims and report["whiten_patches"] == 300 * 19 * 19
    w = model.stem[0].weight
    assert torch.equal(w[dims:], -w[:dims]) and not w.requires_grad and model.stem[0].bias.requires_grad
    f = torch.nn.functional.conv2d(x, w[:dims]).permute(0, 2, 3, 1).reshape(-1, dims)
    cov = f.T @ f / len(f)
    off = cov - torch.diag(cov.diag())
    assert off.abs().max() < 1e-3  # decorrelated
    top = cov.diag()[: dims // 2]  # the strong directions come out at unit variance (eps only damps the weak ones)
    assert torch.allclose(top, torch.ones_like(top), atol=0.05)


def test_whitened_stem_refuses_data_it_cannot_use() -> None:
    model, _ = build_model(TrainConfig(model="keel_cifar_net_s"), num_classes=10, in_chans=3, resolution=32)
    with pytest.raises(ValueError, match=r"whiten_stem: images must be N x 3 x H x W, got \(4, 1, 32, 32\)"):
        model.whiten_stem(torch.randn(4, 1, 32, 32))
    odd = timm.create_model("keel_cifar_net_s", num_classes=10, stem_width=32)
    with pytest.raises(ValueError, match=r"the stem has 32 filters; whitening 2x2 patches of 3 channels needs "
                                         r"2 x 12 = 24 \(stem_width\)"):
        odd.whiten_stem(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"3 patches cannot estimate a 12x12 covariance"):
        model.whiten_stem(torch.randn(3, 3, 2, 2))
