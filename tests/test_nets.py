"""keel's small networks: built by name through timm like any timm model, with timm's model interface."""
from __future__ import annotations

import pytest
import torch

from tasks.config import TrainConfig
from tasks.train.model import ModelConfigError, backbone_groups, build_model, head_parameters, set_phase


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
