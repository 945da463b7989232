"""The checks that need the model and the train split (train split only, never val or test): items 3, 4 and 5
of the checklist, and the whole of the train-stage ``run``.

* ``initial_loss``: a freshly built model in eval mode scores a mean cross-entropy near ln(num_classes) on a few
  train batches; far above that means a bad classifier init/scale, input scale or label mapping.
* ``overfit_tiny_subset``: the model can drive its training loss on ``subset`` train items to ~0 (no augmentation,
  no weight decay, constant LR); if it cannot memorise 256 images, the loss, labels or optimiser are broken.
* ``input_pipeline_vs_step``: fetching+augmenting a batch (``iterate_epoch``) is faster than the model's
  forward+backward+step on a batch already in memory, so the accelerator is not left waiting on data.
* ``pretrained_weights``: with ``train.pretrained`` != none, the loaded weights differ from a fresh init and change
  the initial loss/accuracy.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.core.config import Paths, TrainConfig
from tasks.discipline.preflight.context import Ctx, prepare
from tasks.discipline.preflight.report import CheckItem, PreflightReport, publish
from tasks.train import data as tdata

INITIAL_LOSS_BATCHES = 4
INITIAL_LOSS_REL_TOL = 0.25
OVERFIT_LOSS_TARGET = 0.05
OVERFIT_ACC_TARGET = 0.99
OVERFIT_LR = {"adamw": 1e-3, "sgd": 0.05}
TIMING_BATCHES = 10
TIMING_STEPS = 5
TIMING_WARMUP = 2


def run(cfg: TrainConfig, paths: Paths, *, subset: int = 256, overfit_steps: int = 150,
        min_busy: float = 0.7, busy_goal: float = 0.95) -> PreflightReport:
    """The train-stage model checks alone (initial loss, overfit, input pipeline); writes
    ``<parent of paths.train_plots_dir>/preflight_train.json``."""
    report, ctx = prepare(cfg, paths, min_busy, busy_goal)
    report.items.append(initial_loss(ctx))
    report.items.append(overfit_tiny_subset(ctx, subset, overfit_steps))
    report.items.append(input_pipeline_vs_step(ctx))
    publish(report, Path(paths.train_plots_dir).parent / "preflight_train.json")
    return report


# ---------------------------------------------------------------- 4. initial loss
@torch.no_grad()
def initial_loss(ctx: Ctx) -> CheckItem:
    name = "initial_loss"
    if ctx.train.n == 0:
        return CheckItem(name, "skip", {"train_items": 0}, "the train split is empty; re-run `keel shard`")
    expected = math.log(ctx.num_classes)
    idx = ctx.first_items(min(ctx.train.n, INITIAL_LOSS_BATCHES * ctx.cfg.batch_size))
    y_all = ctx.train.y[idx]
    bad_labels = int(((y_all < 0) | (y_all >= ctx.num_classes)).sum())
    if bad_labels:
        return CheckItem(name, "fail", {"labels_out_of_range": bad_labels, "num_classes": ctx.num_classes},
                         f"{bad_labels} train labels fall outside 0..{ctx.num_classes - 1}: the label mapping does "
                         "not match the shard index's classes; re-run `keel shard`")
    model = ctx.fresh_model()
    model.eval()
    total, n, logit_sq, batches = 0.0, 0, 0.0, 0
    for s in range(0, len(idx), ctx.cfg.batch_size):
        x, y = ctx.prep(ctx.train.x[idx[s:s + ctx.cfg.batch_size]].float()), y_all[s:s + ctx.cfg.batch_size]
        with ctx.autocast():
            logits = model(x)
        logits = logits.float()
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        logit_sq += float((logits - logits.mean(1, keepdim=True)).pow(2).mean(1).sum())
        n += len(y)
        batches += 1
    loss = total / n
    rel = (loss - expected) / expected
    ev = {"mean_loss": round(loss, 4), "expected_ln_num_classes": round(expected, 4),
          "relative_deviation": round(rel, 4), "tolerance": INITIAL_LOSS_REL_TOL,
          "logit_std": round(math.sqrt(logit_sq / n), 4), "items": n, "batches": batches}
    if not math.isfinite(loss):
        return CheckItem(name, "fail", ev, "the initial loss is not finite: check the input normalisation "
                         "(shard index mean/std), the model's init and train.precision")
    if rel > INITIAL_LOSS_REL_TOL:
        return CheckItem(name, "fail", ev,
                         f"initial loss {loss:.3g} is {rel:+.0%} above ln({ctx.num_classes}) = {expected:.3g}: the "
                         f"fresh model is confidently wrong (logit std {ev['logit_std']:.3g}, want ~<1). Check the "
                         "classifier head init/scale (a fresh head should give near-uniform predictions), the "
                         "input scale (images normalised with the shard index's mean/std) and the label mapping")
    if rel < -INITIAL_LOSS_REL_TOL:
        return CheckItem(name, "fail", ev,
                         f"initial loss {loss:.3g} is {rel:+.0%} below ln({ctx.num_classes}) = {expected:.3g} before "
                         "any training: the labels are predictable without learning. Check for a label leaking into "
                         "the inputs, a degenerate class distribution, or a checkpoint loaded into the head")
    return CheckItem(name, "pass", ev, "none")


# ---------------------------------------------------------------- 4. overfit a tiny subset
def overfit_tiny_subset(ctx: Ctx, subset: int, max_steps: int) -> CheckItem:
    name = "overfit_tiny_subset"
    n = min(subset, ctx.train.n)
    if n == 0 or max_steps < 1:
        return CheckItem(name, "skip", {"subset": n, "overfit_steps": max_steps},
                         "nothing to overfit (empty train split or overfit_steps < 1)")
    idx = ctx.first_items(n)
    x_sub, y_sub = ctx.prep(ctx.train.x[idx].float()), ctx.train.y[idx]
    batch = min(ctx.cfg.batch_size, n)
    per_pass = math.ceil(n / batch)
    lr = OVERFIT_LR[ctx.cfg.optimizer]
    model = ctx.fresh_model()
    model.train()
    opt = ctx.optimizer(model, lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(ctx.cfg.seed + 1)
    steps, first_loss, trajectory = 0, None, []
    pass_loss, pass_correct, pass_n = 0.0, 0, 0
    reached = False
    while steps < max_steps and not reached:
        order = torch.randperm(n, generator=g).to(x_sub.device)
        pass_loss, pass_correct, pass_n = 0.0, 0, 0
        for s in range(0, n, batch):
            if steps >= max_steps:
                break
            b = order[s:s + batch]
            with ctx.autocast():
                logits = model(x_sub[b])
            loss = F.cross_entropy(logits.float(), y_sub[b])  # no label smoothing: the target is ~0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            pass_loss += value * len(b)
            pass_correct += int((logits.detach().argmax(1) == y_sub[b]).sum())
            pass_n += len(b)
        mean, acc = pass_loss / pass_n, pass_correct / pass_n
        trajectory.append({"step": steps, "loss": round(mean, 4), "accuracy": round(acc, 4)})
        # judged on a whole pass over the subset (a partial pass only when the step budget ends mid-pass)
        reached = pass_n == n and (mean < OVERFIT_LOSS_TARGET or acc >= OVERFIT_ACC_TARGET)
    final = trajectory[-1]
    ev = {"loss_start": round(first_loss, 4), "loss_end": final["loss"], "accuracy_end": final["accuracy"],
          "steps": steps, "max_steps": max_steps, "subset": n, "batch": batch, "steps_per_pass": per_pass,
          "optimizer": ctx.cfg.optimizer, "lr": lr, "weight_decay": 0.0, "augment": "none",
          "loss_target": OVERFIT_LOSS_TARGET, "accuracy_target": OVERFIT_ACC_TARGET,
          "trajectory": trajectory if len(trajectory) <= 20 else trajectory[:10] + trajectory[-10:]}
    if reached:
        return CheckItem(name, "pass", ev, "none")
    if max_steps < per_pass * 3:
        hint = (f"overfit_steps={max_steps} is too few to judge (one pass over the subset is {per_pass} steps); "
                "raise overfit_steps, then")
    else:
        hint = "if the loss stayed near ln(num_classes),"
    return CheckItem(name, "fail", ev,
                     f"the model did not memorise {n} train items in {steps} steps (loss {first_loss:.3g} -> "
                     f"{final['loss']:.3g}, accuracy {final['accuracy']:.2f}); {hint} check that labels match their "
                     "images, the loss uses raw logits, gradients reach every layer (nothing frozen by mistake) and "
                     f"the LR ({lr:g}) is sane; a model too small for the data plateaus higher (try a larger model)")


# ---------------------------------------------------------------- 3. input pipeline vs step
def input_pipeline_vs_step(ctx: Ctx) -> CheckItem:
    name = "input_pipeline_vs_step"
    cfg = ctx.cfg
    if ctx.train.n < cfg.batch_size:
        return CheckItem(name, "skip", {"train_items": ctx.train.n, "batch_size": cfg.batch_size},
                         f"train.batch_size={cfg.batch_size} is larger than the train split ({ctx.train.n} items); "
                         "lower it")
    # the pipeline alone: fetch + augment + normalise, exactly as the training loop does per batch
    ctx.sync()
    t0 = time.perf_counter()
    fetched = 0
    for i, x, _y in tdata.iterate_epoch(ctx.train, cfg.batch_size, 1, 0, cfg.seed, 0, cfg.augment,
                                         crop_pad=cfg.crop_pad):
        if i >= TIMING_BATCHES:
            break
        ctx.prep(x)
        fetched += 1
    ctx.sync()
    pipeline_s = (time.perf_counter() - t0) / fetched

    # the step alone: forward + backward + optimiser step on a batch already in memory
    idx = ctx.first_items(cfg.batch_size)
    x, y = ctx.prep(ctx.train.x[idx].float()), ctx.train.y[idx]
    model = ctx.fresh_model()
    model.train()
    opt = ctx.optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    times = []
    for k in range(TIMING_WARMUP + TIMING_STEPS):
        ctx.sync()
        t = time.perf_counter()
        with ctx.autocast():
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ctx.sync()
        if k >= TIMING_WARMUP:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]  # median
    ratio = pipeline_s / step_s
    busy = step_s / (step_s + pipeline_s)  # the device's share of a step when input and compute do not overlap
    ev = {"device_busy_fraction": round(busy, 4), "min_busy_fraction": ctx.min_busy, "goal_busy_fraction": ctx.busy_goal,
          "meets_goal": busy >= ctx.busy_goal,
          "pipeline_ms_per_batch": round(pipeline_s * 1e3, 3), "step_ms_per_batch": round(step_s * 1e3, 3),
          "ratio_pipeline_over_step": round(ratio, 4), "batch_size": cfg.batch_size, "augment": cfg.augment,
          "pipeline_batches_timed": fetched, "steps_timed": len(times),
          "pipeline_images_per_s": round(cfg.batch_size / pipeline_s, 1),
          "step_images_per_s": round(cfg.batch_size / step_s, 1), "compile": False}
    if busy > ctx.min_busy:
        return CheckItem(name, "pass", ev, "none" if busy >= ctx.busy_goal else
                         f"passes, but below keel's {ctx.busy_goal:.0%} goal ({busy:.0%} busy): overlap input and "
                         "compute or make the input cheaper before a long run")
    return CheckItem(name, "fail", ev,
                     f"the device is busy only {busy:.0%} of a step (need > {ctx.min_busy:.0%}; goal "
                     f"{ctx.busy_goal:.0%}): fetching+augmenting a batch takes {ratio:.2f}x as long as the training "
                     "step, so the device waits on data: keep the shards on the device (train.device), use a cheaper train.augment, a "
                     "larger train.batch_size, or move augmentation work off the per-batch path")


# ---------------------------------------------------------------- 5. pretrained weights
@torch.no_grad()
def pretrained_weights(ctx: Ctx) -> CheckItem:
    name = "pretrained_weights"
    cfg = ctx.cfg
    if cfg.pretrained == "none":
        return CheckItem(name, "skip", {"pretrained": "none"}, "none (training from scratch)")
    try:
        loaded = ctx.fresh_model()
    except Exception as exc:  # noqa: BLE001 - a hub without network, a missing file: the message is the evidence
        return CheckItem(name, "fail", {"pretrained": cfg.pretrained, "error": f"{type(exc).__name__}: {exc}"},
                         "the pretrained weights could not be loaded: check train.init_checkpoint (a local file) or "
                         "the timm hub cache (no network at run time)")
    fresh = ctx.fresh_model(cfg.model_copy(update={"pretrained": "none", "init_checkpoint": None}))
    a, b = loaded.state_dict(), fresh.state_dict()
    tensors = [k for k in a if k in b and a[k].is_floating_point()]
    changed = sum(1 for k in tensors if not torch.equal(a[k], b[k]))
    idx = ctx.first_items(min(ctx.train.n, INITIAL_LOSS_BATCHES * cfg.batch_size))
    scores = {}
    for label, model in (("pretrained", loaded), ("fresh", fresh)):
        model.eval()
        loss, correct = 0.0, 0
        for s in range(0, len(idx), cfg.batch_size):
            x, y = ctx.prep(ctx.train.x[idx[s:s + cfg.batch_size]].float()), ctx.train.y[idx[s:s + cfg.batch_size]]
            with ctx.autocast():
                logits = model(x).float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        scores[label] = (loss / max(len(idx), 1), correct / max(len(idx), 1))
    ev = {"pretrained": cfg.pretrained, "init_checkpoint": cfg.init_checkpoint, "tensors_compared": len(tensors),
          "tensors_changed_vs_fresh_init": changed,
          "initial_loss_pretrained": round(scores["pretrained"][0], 4), "initial_loss_fresh": round(scores["fresh"][0], 4),
          "initial_accuracy_pretrained": round(scores["pretrained"][1], 4),
          "initial_accuracy_fresh": round(scores["fresh"][1], 4)}
    moved = abs(scores["pretrained"][0] - scores["fresh"][0]) > 1e-4 or scores["pretrained"][1] != scores["fresh"][1]
    if changed == 0 or not moved:
        return CheckItem(name, "fail", ev, f"train.pretrained={cfg.pretrained} but the model is identical to a fresh "
                         "init (no tensor or no initial loss/accuracy changed): the weights were not loaded; check "
                         "that the checkpoint's tensor names and shapes match train.model")
    return CheckItem(name, "pass", ev, "none")

