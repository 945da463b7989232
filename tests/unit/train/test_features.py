"""The recipe's regularisers and selection rules are really on: each test fails when its feature is switched off.
Tiny models and tensors, no data set."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tasks.core.config import TrainConfig
from tasks.model import build as tmodel
from tasks.train import feed, optim, setup, step, trainer
from tasks.train.state import TrainState
from tests.unit.train.fakes import FakeDist


def _micro(cfg, x, y):
    """What the step receives from the feed: (index, input, target, labels), through the trainer's wiring."""
    mixup_fn, _ = setup._mixup(cfg, num_classes := 10)
    assert num_classes == 10
    batches = iter([(0, x, y)])
    return next(feed.micro_batches(batches, torch.nn.Identity(), mixup_fn, False, step.Window(), 1,
                                   more=lambda i: True))


def test_mixup_cutmix_mix_the_targets():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    _, xm, target, _ = _micro(TrainConfig(mixup=0.8, cutmix=1.0), x.clone(), y)  # timm mixes in place
    assert target.shape == (8, 10)  # soft targets over the classes
    assert (target.max(1).values < 1).all()  # mixed: no row is one-hot
    assert torch.allclose(target.sum(1), torch.ones(8))
    assert not torch.equal(xm, x)
    _, x0, target0, _ = _micro(TrainConfig(mixup=0.0, cutmix=0.0), x, y)  # off: the labels pass through
    assert torch.equal(target0, y) and torch.equal(x0, x)


def test_mixup_trains_against_the_soft_targets():
    cfg = TrainConfig(mixup=0.8, cutmix=0.0, label_smoothing=0.0)
    _, soft = setup._mixup(cfg, 10)
    assert soft is not None
    ts = _step(label_smoothing=0.0, soft=soft)
    x, y = torch.rand(8, 4), torch.arange(8) % 10
    target = torch.nn.functional.one_hot(y, 10).float().flip(0)  # a soft target that is not y
    assert not torch.allclose(ts._forward_backward(ts.model, x, target, y, True),
                              _step(0.0)._forward_backward(ts.model, x, target, y, True))


def test_drop_path_is_active_in_train_mode_only():
    def outputs(rate: float, train: bool):
        torch.manual_seed(0)
        model, _ = tmodel.build_model(TrainConfig(model="resnet10t", drop_path_rate=rate), 10, 3, 16)
        for m in model.modules():  # timm zero-initialises each block's last norm: its residual branch starts at 0
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
        model.train(train)
        x = torch.rand(8, 3, 16, 16)
        with torch.no_grad():
            return model(x), model(x)

    a, b = outputs(0.5, train=True)
    assert not torch.allclose(a, b)  # stochastic depth drew different paths
    a, b = outputs(0.5, train=False)
    assert torch.allclose(a, b)
    a, b = outputs(0.0, train=True)  # off: train mode is deterministic (BatchNorm alone does not vary)
    assert torch.allclose(a, b)


def _step(label_smoothing: float, soft=None, ema=None, model=None):
    model = model or torch.nn.Linear(4, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return step.TrainStep(model, opt, scaler, lambda: torch.autocast("cpu", enabled=False), FakeDist(), 1, None,
                          label_smoothing, soft, ema)


def test_label_smoothing_changes_the_loss():
    torch.manual_seed(0)
    x, y = torch.rand(8, 4), torch.arange(8) % 10
    plain, smooth = _step(0.0), _step(0.1)
    smooth.model.load_state_dict(plain.model.state_dict())
    a = plain._forward_backward(plain.model, x, y, y, True)
    b = smooth._forward_backward(smooth.model, x, y, y, True)
    assert not torch.allclose(a, b)
    expect = torch.nn.functional.cross_entropy(smooth.model(x), y, label_smoothing=0.1)
    assert torch.allclose(b, expect)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 10)

    def get_classifier(self):
        return self.fc


def test_weight_decay_groups_and_the_norm_bias_lr_factor():
    model = _Tiny()
    groups = optim.param_groups(model, lr=1.0, backbone_lr=0.5, weight_decay=0.05, norm_bias_lr_factor=64.0)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == len(list(model.parameters()))  # every parameter, once
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["weight_decay"] == (0.05 if p.ndim > 1 else 0.0), name  # 1-D (biases, norm scales): no decay
    assert by_param[id(model.conv.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.bn.bias)]["name"] == "backbone_no_decay_norm_bias"
    assert by_param[id(model.bn.bias)]["lr"] == 0.5 * 64.0  # the norm shifts' LR factor
    assert by_param[id(model.bn.weight)]["lr"] == 0.5  # the norm scales keep the backbone LR
    assert by_param[id(model.fc.weight)]["lr"] == 1.0 and by_param[id(model.fc.weight)]["name"] == "head"
    plain = optim.param_groups(model, 1.0, 0.5, 0.05, norm_bias_lr_factor=1.0)
    assert not any(g["name"].endswith("norm_bias") for g in plain)


def test_validation_uses_the_ema_weights(monkeypatch):
    from timm.utils import ModelEmaV3

    model = torch.nn.Linear(4, 10)
    ema = ModelEmaV3(model, decay=0.9)
    seen = []
    monkeypatch.setattr(trainer, "evaluate", lambda m, *a, **kw: (seen.append(m), (1.0, 0.5, 0.5))[1])

    def fake(ema_):
        return SimpleNamespace(cfg=SimpleNamespace(channels_last=False, tta="none"), model=model, ema=ema_,
                               norm=None, val_data=None, autocast=None, state=TrainState(),
                               step=SimpleNamespace(loss_sum=torch.tensor(2.0), micro_batches=2),
                               logger=SimpleNamespace(log_metrics=lambda *a: None),
                               eval_model=trainer.Trainer.eval_model.fget(SimpleNamespace(ema=ema_, model=model)))

    trainer.Trainer._validate(fake(ema), 0)
    trainer.Trainer._validate(fake(None), 0)
    assert seen[0] is ema.module and seen[0] is not model
    assert seen[1] is model


def test_the_step_updates_the_ema():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 10)
    ema = ModelEmaV3(model, decay=0.5)
    ts = _step(0.0, ema=ema, model=model)
    before = ema.module.weight.clone()
    x, y = torch.rand(8, 4), torch.arange(8) % 10
    out = ts(model, iter([(0, x, y, y)]), step=100)
    assert out is not None and not torch.equal(ema.module.weight, before)
    assert not torch.equal(ema.module.weight, model.weight)  # an average, not a copy


@pytest.mark.parametrize(("acc", "calls"), [(1, 1), (3, 0), (3, 3)])
def test_accumulation_steps_once_per_effective_batch(acc, calls):
    ts = _step(0.0)
    ts.accumulation = acc
    x, y = torch.rand(8, 4), torch.arange(8) % 10
    out = ts(ts.model, iter([(i, x, y, y) for i in range(calls or 2)]), step=0)
    assert (out is None) == (calls < acc)
    assert ts.micro_batches == (calls or 2)
