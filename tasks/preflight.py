"""keel preflight (train stage): cheap checks that catch a broken set-up before a long training run.

Reads the train split only (never val or test). Three checks, each an item with a status, numbers and what to do:

1. ``initial_loss``: a freshly built model in eval mode scores a mean cross-entropy near ln(num_classes) on a few
   train batches; far above that means a bad classifier init/scale, input scale or label mapping.
2. ``overfit_tiny_subset``: the model can drive its training loss on ``subset`` train items to ~0 (no augmentation,
   no weight decay, constant LR); if it cannot memorise 256 images, the loss, labels or optimiser are broken.
3. ``input_pipeline_vs_step``: fetching+augmenting a batch (``iterate_epoch``) is faster than the model's
   forward+backward+step on a batch already in memory, so the accelerator is not left waiting on data.

The report is written atomically to ``<parent of paths.train_plots_dir>/preflight_train.json``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks import io
from tasks.config import Paths, TrainConfig
from tasks.train import data as tdata
from tasks.train import loop
from tasks.train import model as tmodel

INITIAL_LOSS_BATCHES = 4
INITIAL_LOSS_REL_TOL = 0.25
OVERFIT_LOSS_TARGET = 0.05
OVERFIT_ACC_TARGET = 0.99
OVERFIT_LR = {"adamw": 1e-3, "sgd": 0.05}
TIMING_BATCHES = 10
TIMING_STEPS = 5
TIMING_WARMUP = 2


@dataclass
class CheckItem:
    name: str
    status: str  # "pass" | "fail" | "skip"
    evidence: dict
    what_to_do: str


@dataclass
class PreflightReport:
    stage: str
    model: str
    device: str
    precision: str
    train_items: int
    num_classes: int
    seed: int
    items: list[CheckItem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(i.status != "fail" for i in self.items)

    def item(self, name: str) -> CheckItem:
        return next(i for i in self.items if i.name == name)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "items"}, "passed": self.passed,
                "items": [asdict(i) for i in self.items]}


# ---------------------------------------------------------------- the stage
def run(cfg: TrainConfig, paths: Paths, *, subset: int = 256, overfit_steps: int = 150) -> PreflightReport:
    device = loop._device(cfg, 0)
    precision = loop._precision(cfg, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    loop.seed_everything(cfg.seed, cfg.deterministic)
    index = io.ShardIndex.load(paths.shards_dir)
    train = tdata.DeviceSplit(paths.shards_dir, "train", device)  # ShardReader: verified, test split refused
    norm = tdata.Normalize(index.mean, index.std).to(device)
    num_classes = len(index.classes)
    report = PreflightReport("train", cfg.model, str(device), precision, train.n, num_classes, cfg.seed)

    def fresh_model() -> torch.nn.Module:
        loop.seed_everything(cfg.seed, cfg.deterministic)  # each check starts from the same initialisation
        model, _ = tmodel.build_model(cfg, num_classes, index.channels, index.resolution)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    ctx = _Ctx(cfg, device, train, norm, autocast, fresh_model, num_classes)
    report.items.append(_initial_loss(ctx))
    report.items.append(_overfit(ctx, subset, overfit_steps))
    report.items.append(_pipeline_vs_step(ctx))

    out = Path(paths.train_plots_dir).parent / "preflight_train.json"
    io.write_json(out, report.to_json())
    print(format_table(report))
    print(f"preflight: {'PASSED' if report.passed else 'FAILED'}; report {out}")
    return report


@dataclass
class _Ctx:
    cfg: TrainConfig
    device: torch.device
    train: tdata.DeviceSplit
    norm: torch.nn.Module
    autocast: object
    fresh_model: object
    num_classes: int

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer(self, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.cfg.momentum, nesterov=True,
                               weight_decay=weight_decay)


def _first_items(ctx: _Ctx, n: int) -> torch.Tensor:
    """Indices of ``n`` train items in a seeded order (the same for every check)."""
    perm = torch.randperm(ctx.train.n, generator=torch.Generator().manual_seed(ctx.cfg.seed))
    return perm[:n].to(ctx.train.x.device)


# ---------------------------------------------------------------- 1. initial loss
@torch.no_grad()
def _initial_loss(ctx: _Ctx) -> CheckItem:
    name = "initial_loss"
    if ctx.train.n == 0:
        return CheckItem(name, "skip", {"train_items": 0}, "the train split is empty; re-run `keel shard`")
    expected = math.log(ctx.num_classes)
    idx = _first_items(ctx, min(ctx.train.n, INITIAL_LOSS_BATCHES * ctx.cfg.batch_size))
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


# ---------------------------------------------------------------- 2. overfit a tiny subset
def _overfit(ctx: _Ctx, subset: int, max_steps: int) -> CheckItem:
    name = "overfit_tiny_subset"
    n = min(subset, ctx.train.n)
    if n == 0 or max_steps < 1:
        return CheckItem(name, "skip", {"subset": n, "overfit_steps": max_steps},
                         "nothing to overfit (empty train split or overfit_steps < 1)")
    idx = _first_items(ctx, n)
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
def _pipeline_vs_step(ctx: _Ctx) -> CheckItem:
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
    for i, x, _y in tdata.iterate_epoch(ctx.train, cfg.batch_size, 1, 0, cfg.seed, 0, cfg.augment):
        if i >= TIMING_BATCHES:
            break
        ctx.prep(x)
        fetched += 1
    ctx.sync()
    pipeline_s = (time.perf_counter() - t0) / fetched

    # the step alone: forward + backward + optimiser step on a batch already in memory
    idx = _first_items(ctx, cfg.batch_size)
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
    ev = {"pipeline_ms_per_batch": round(pipeline_s * 1e3, 3), "step_ms_per_batch": round(step_s * 1e3, 3),
          "ratio_pipeline_over_step": round(ratio, 4), "batch_size": cfg.batch_size, "augment": cfg.augment,
          "pipeline_batches_timed": fetched, "steps_timed": len(times),
          "pipeline_images_per_s": round(cfg.batch_size / pipeline_s, 1),
          "step_images_per_s": round(cfg.batch_size / step_s, 1), "compile": False}
    if ratio < 1.0:
        return CheckItem(name, "pass", ev, "none")
    return CheckItem(name, "fail", ev,
                     f"fetching+augmenting a batch takes {ratio:.2f}x as long as the training step, so the device "
                     "waits on data: keep the shards on the device (train.device), use a cheaper train.augment, a "
                     "larger train.batch_size, or move augmentation work off the per-batch path")


# ---------------------------------------------------------------- the table
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return f"[{len(v)} points]"
    return str(v)


def format_table(report: PreflightReport) -> str:
    """A readable table: item, status, evidence, what to do."""
    head = (f"preflight (train): {report.model} on {report.device} ({report.precision}), {report.train_items} train "
            f"items, {report.num_classes} classes, seed {report.seed}")
    rows = [("item", "status", "evidence", "what to do")]
    for it in report.items:
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in it.evidence.items() if k != "trajectory")
        rows.append((it.name, it.status.upper(), ev, it.what_to_do))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [head]
    for i, (a, b, c, d) in enumerate(rows):
        lines.append(f"  {a:<{w0}}  {b:<{w1}}  {c}")
        lines.append(f"  {'':<{w0}}  {'':<{w1}}  -> {d}" if i else f"  {'':<{w0}}  {'':<{w1}}  {d}")
    return "\n".join(lines)
