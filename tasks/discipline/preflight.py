"""keel preflight: the checklist before a long run (``checklist``), and its train-stage model checks (``run``).

``checklist(params)`` walks ten items, each pass/fail/skip with evidence and what to do, prints the table and writes
``<parent of paths.train_plots_dir>/preflight.json`` atomically (``train.preflight: true`` runs it before training
and stops the stage when an item fails):

 1. data_audit: the ingest audit has the class and condition distributions and the labelled contact sheet;
 2. splits_frozen: the split manifest exists, its ``.sha256`` matches it, the leakage report passed;
 3. input_pipeline_vs_step: device busy share step / (step + input) > ``preflight.min_busy_fraction`` (goal 95%);
 4. initial_loss + overfit_tiny_subset: the architecture can learn (below);
 5. pretrained_weights: with ``train.pretrained`` != none, the loaded weights differ from a fresh init and change
    the initial loss/accuracy;
 6. batch_lr_schedule: LR scaled to the effective batch, warmup when that batch exceeds the reference, LR floor > 0;
 7. logging_dry_step: one real optimiser step through ``tasks.train.loop.run`` into a temporary MLflow store;
    loss, metric, grad norm and LR are read back;
 8. checkpoint_selection: a monitor and early stopping (or "run the schedule, keep the best") and the dry step
    wrote best.pt / last.pt;
 9. reproducibility: seeded, deterministic, lineage logged (config, git SHA, environment hash, data versions) and a
    clean working tree (or ``preflight.allow_dirty``);
10. distributed: backend, world size, accumulation consistent with the effective batch (skip with one device).

The model checks of ``run`` (train split only, never val or test):

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

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.core import io, lineage
from tasks.core.config import Paths, TrainConfig
from tasks.model import build as tmodel
from tasks.model import views
from tasks.train import data as tdata
from tasks.train import loop

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
def run(cfg: TrainConfig, paths: Paths, *, subset: int = 256, overfit_steps: int = 150,
        min_busy: float = 0.7, busy_goal: float = 0.95) -> PreflightReport:
    """The train-stage model checks alone (initial loss, overfit, input pipeline); writes preflight_train.json."""
    report, ctx = _prepare(cfg, paths, min_busy, busy_goal)
    report.items.append(_initial_loss(ctx))
    report.items.append(_overfit(ctx, subset, overfit_steps))
    report.items.append(_pipeline_vs_step(ctx))

    out = Path(paths.train_plots_dir).parent / "preflight_train.json"
    io.write_json(out, report.to_json())
    print(format_table(report))
    print(f"preflight: {'PASSED' if report.passed else 'FAILED'}; report {out}")
    return report


def _prepare(cfg: TrainConfig, paths: Paths, min_busy: float, busy_goal: float) -> tuple[PreflightReport, _Ctx]:
    device = loop._device(cfg, 0)
    precision = loop._precision(cfg, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    loop.seed_everything(cfg.seed, cfg.deterministic)
    index = io.ShardIndex.load(paths.shards_dir)
    train = tdata.DeviceSplit(paths.shards_dir, "train", device)  # ShardReader: verified, test split refused
    norm = views.Normalize(index.mean, index.std).to(device)
    num_classes = len(index.classes)
    report = PreflightReport("train", cfg.model, str(device), precision, train.n, num_classes, cfg.seed)

    def fresh_model(c: TrainConfig = cfg) -> torch.nn.Module:
        loop.seed_everything(c.seed, c.deterministic)  # each check starts from the same initialisation
        model, _ = tmodel.build_model(c, num_classes, index.channels, index.resolution)
        model.to(device)
        if c.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    return report, _Ctx(cfg, device, train, norm, autocast, fresh_model, num_classes, min_busy, busy_goal)


@dataclass
class _Ctx:
    cfg: TrainConfig
    device: torch.device
    train: tdata.DeviceSplit
    norm: torch.nn.Module
    autocast: object
    fresh_model: object
    num_classes: int
    min_busy: float = 0.7
    busy_goal: float = 0.95

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
    for i, x, _y in tdata.iterate_epoch(ctx.train, cfg.batch_size, 1, 0, cfg.seed, 0, cfg.augment,
                                         crop_pad=cfg.crop_pad):
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


# ---------------------------------------------------------------- the table
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return f"[{len(v)} points]"
    return str(v)


def format_table(report: PreflightReport) -> str:
    """A readable table: item, status, evidence, what to do."""
    head = (f"preflight ({report.stage}): {report.model} on {report.device} ({report.precision}), {report.train_items} train "
            f"items, {report.num_classes} classes, seed {report.seed}")
    rows = [("item", "status", "evidence", "what to do")]
    for it in report.items:
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in it.evidence.items() if k != "trajectory")
        num = ITEM_NUMBERS.get(it.name) if report.stage == "checklist" else None
        rows.append((f"{num}. {it.name}" if num else it.name, it.status.upper(), ev, it.what_to_do))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [head]
    for i, (a, b, c, d) in enumerate(rows):
        lines.append(f"  {a:<{w0}}  {b:<{w1}}  {c}")
        lines.append(f"  {'':<{w0}}  {'':<{w1}}  -> {d}" if i else f"  {'':<{w0}}  {'':<{w1}}  {d}")
    return "\n".join(lines)


# ================================================================ the checklist (keel preflight)
ITEM_NUMBERS = {"data_audit": 1, "splits_frozen": 2, "input_pipeline_vs_step": 3, "initial_loss": 4,
                "overfit_tiny_subset": 4, "pretrained_weights": 5, "batch_lr_schedule": 6, "logging_dry_step": 7,
                "checkpoint_selection": 8, "reproducibility": 9, "distributed": 10}
DRY_STEP_METRICS = ("train_loss", "lr", "grad_norm")


class PreflightFailed(io.DataError):
    """At least one checklist item failed; the message names them and the report."""


def report_path(paths: Paths) -> Path:
    return Path(paths.train_plots_dir).parent / "preflight.json"


def checklist(params, *, root: str | Path = ".") -> PreflightReport:
    """Walk the ten items of the module docstring for ``params`` (a ``tasks.core.config.Params``); ``root`` is the git
    working tree whose state item 9 checks. Writes ``report_path(params.paths)`` and prints the table."""
    from tasks.core.config import Params

    assert isinstance(params, Params)
    cfg, paths, pf = params.train, params.paths, params.preflight
    items: list[CheckItem] = [_audit_item(paths), _splits_item(paths)]
    ctx = None
    try:
        report, ctx = _prepare(cfg, paths, pf.min_busy_fraction, pf.busy_goal)
    except (io.DataError, OSError, FileNotFoundError) as exc:
        report = PreflightReport("checklist", cfg.model, cfg.device, cfg.precision, 0, 0, cfg.seed)
        why = f"no usable train shards ({exc}); run `keel shard` (dvc repro shard)"
        for n in ("input_pipeline_vs_step", "initial_loss", "overfit_tiny_subset", "pretrained_weights"):
            items.append(CheckItem(n, "fail", {"shards_dir": paths.shards_dir}, why))
    report.stage = "checklist"
    if ctx is not None:
        items += [_pipeline_vs_step(ctx), _initial_loss(ctx), _overfit(ctx, pf.subset, pf.overfit_steps),
                  _pretrained_item(ctx)]
    items.append(_schedule_item(cfg))
    dry = _dry_step(params) if (pf.dry_step and ctx is not None) else None
    items.append(_logging_item(dry, pf.dry_step, ctx is not None))
    items.append(_selection_item(cfg, dry))
    items.append(_reproducibility_item(cfg, pf.allow_dirty, root, dry))
    items.append(_distributed_item(cfg))
    items.sort(key=lambda i: ITEM_NUMBERS.get(i.name, 99))
    report.items = items
    out = report_path(paths)
    io.write_json(out, report.to_json())
    print(format_table(report))
    print(f"preflight: {'PASSED' if report.passed else 'FAILED'}; report {out}")
    return report


def require(params, *, root: str | Path = ".") -> PreflightReport:
    """``checklist`` that raises ``PreflightFailed`` (a user error) when an item failed."""
    report = checklist(params, root=root)
    if not report.passed:
        failed = [f"{ITEM_NUMBERS.get(i.name, '?')}. {i.name}" for i in report.items if i.status == "fail"]
        raise PreflightFailed(f"preflight failed: {', '.join(failed)} (see the table above and "
                              f"{report_path(params.paths)})")
    return report


# ---------------------------------------------------------------- 1. data audit
def _audit_item(paths: Paths) -> CheckItem:
    name = "data_audit"
    audit_dir = Path(paths.audit_dir)
    path = audit_dir / "audit.json"
    if not path.is_file():
        return CheckItem(name, "fail", {"audit": str(path), "exists": False},
                         f"{path} is missing: run `keel ingest` (dvc repro ingest), then read reports/audit/audit.md")
    try:
        audit = json.loads(path.read_text())
    except ValueError as exc:
        return CheckItem(name, "fail", {"audit": str(path)}, f"{path} is not valid JSON ({exc}); re-run `keel ingest`")
    per_class = audit.get("per_class") or {}
    conditions = sorted({k for v in per_class.values() if isinstance(v, dict) for k in v if k != "count"})
    sheet = audit_dir / str((audit.get("contact_sheet") or {}).get("file", "contact_sheet.png"))
    plots = {p: (audit_dir / p).is_file() for p in ("class_counts.png", "resolution.png", "brightness.png")}
    ev = {"audit": str(path), "classes": len(audit.get("class_counts") or {}),
          "imbalance_ratio": audit.get("imbalance_ratio"), "condition_features": conditions,
          "label_sample_sheet": str(sheet), "label_sample_sheet_exists": sheet.is_file(), "plots": plots,
          "found": audit.get("found"), "rejected": audit.get("rejected")}
    missing = []
    if not audit.get("class_counts"):
        missing.append("class distribution (class_counts)")
    if not conditions:
        missing.append("condition distribution (per-class width/height/brightness)")
    if not sheet.is_file():
        missing.append(f"label sample sheet ({sheet})")
    missing += [f"plot {p}" for p, ok in plots.items() if not ok]
    if missing:
        return CheckItem(name, "fail", ev, f"the audit lacks {', '.join(missing)}: re-run `keel ingest` and look "
                         "at the contact sheet and distributions before training")
    return CheckItem(name, "pass", ev, "none (look at reports/audit/audit.md and the contact sheet yourself)")


# ---------------------------------------------------------------- 2. splits frozen
def _splits_item(paths: Paths) -> CheckItem:
    name = "splits_frozen"
    manifest = Path(paths.split_manifest)
    sha_file = Path(f"{manifest}.sha256")
    leak = Path(paths.leakage_report)
    ev: dict = {"manifest": str(manifest), "manifest_exists": manifest.is_file(), "sha256_file": str(sha_file),
                "leakage_report": str(leak)}
    if not manifest.is_file():
        return CheckItem(name, "fail", ev, f"the split manifest {manifest} is missing: run `keel split` "
                         "(dvc repro split) before anything looks at the data")
    actual = io.sha256_file(manifest)
    ev["manifest_sha256"] = actual
    recorded = sha_file.read_text().split()[0] if sha_file.is_file() and sha_file.read_text().strip() else None
    ev["recorded_sha256"] = recorded
    if recorded is None:
        return CheckItem(name, "fail", ev, f"{sha_file} is missing: the manifest's hash was never recorded; re-run "
                         "`keel split` (it writes both)")
    if recorded != actual:
        return CheckItem(name, "fail", ev, f"{manifest} does not match its recorded hash {recorded[:12]}… (now "
                         f"{actual[:12]}…): the frozen split was changed outside `keel split`; restore it "
                         "(dvc checkout) or re-split deliberately with `keel split --refreeze`")
    try:
        report = json.loads(leak.read_text())
    except (OSError, ValueError):
        return CheckItem(name, "fail", ev, f"{leak} is missing or unreadable: re-run `keel split`")
    ev.update(leakage_passed=report.get("passed"), leakage_problems=len(report.get("problems") or []),
              counts=report.get("counts"))
    if report.get("passed") is not True:
        return CheckItem(name, "fail", ev, f"the leakage check failed ({report.get('problems')}); fix the "
                         "duplicates/groups, then `keel split`")
    return CheckItem(name, "pass", ev, "none")


# ---------------------------------------------------------------- 5. pretrained weights
@torch.no_grad()
def _pretrained_item(ctx: _Ctx) -> CheckItem:
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
    idx = _first_items(ctx, min(ctx.train.n, INITIAL_LOSS_BATCHES * cfg.batch_size))
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


# ---------------------------------------------------------------- 6. batch, LR, warmup, schedule
def _schedule_item(cfg: TrainConfig) -> CheckItem:
    name = "batch_lr_schedule"
    effective = cfg.effective_batch or cfg.batch_size * cfg.devices
    scaled = cfg.lr * effective / cfg.reference_batch
    ev = {"batch_size": cfg.batch_size, "devices": cfg.devices, "effective_batch": effective,
          "accumulation": effective // (cfg.batch_size * cfg.devices), "base_lr": cfg.lr,
          "reference_batch": cfg.reference_batch, "scaling_rule": "linear", "scaled_lr": scaled,
          "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule, "lr_floor": cfg.lr_floor,
          "floor_lr": scaled * cfg.lr_floor}
    problems = []
    if effective > cfg.reference_batch and cfg.warmup_steps == 0:
        problems.append(f"effective batch {effective} > reference_batch {cfg.reference_batch} (scaled LR "
                        f"{scaled:.4g}) with train.warmup_steps: 0 — a large batch at the scaled LR from step 0 "
                        "diverges; set warmup_steps (a few hundred steps, or ~5% of training)")
    if cfg.lr_floor <= 0:
        problems.append("train.lr_floor is 0: the schedule decays to LR 0 and the last epochs learn nothing; set a "
                        "floor (e.g. 0.01-0.1 of the scaled LR)")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none")


# ---------------------------------------------------------------- 7/8. a real dry step
@contextlib.contextmanager
def _single_process_env():
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _RecordingLogger:
    """Records every call (used when MLflow is not installed)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.run_id = None

    def __getattr__(self, name):
        def call(*a, **kw):
            self.calls.append((name, a, kw))
        return call


def _dry_step(params) -> dict:
    """One optimiser step + one validation through ``tasks.train.loop.run`` in a temp dir, logged to a temporary
    MLflow store (SQLite) and read back. Returns what was seen (or the error)."""
    cfg = params.train.model_copy(update={"devices": 1, "effective_batch": None, "max_steps": 1, "epochs": 1,
                                          "log_every_steps": 1, "compile": False, "probe_batch": False,
                                          "preflight": False, "strategy": "ddp"})
    out: dict = {"ran": False}
    with tempfile.TemporaryDirectory(prefix="keel-preflight-") as tmp:
        t = Path(tmp)
        paths = params.paths.model_copy(update={"models_dir": str(t / "models"), "train_metrics": str(t / "train.json"),
                                                "train_plots_dir": str(t / "reports" / "train")})
        try:
            from tasks.core import tracking

            logger = tracking.MlflowLogger(experiment="keel-preflight", run_name="dry-step",
                                           tracking_uri=f"sqlite:///{t / 'mlflow.db'}", flush_interval_s=0.0)
            out["tracker"] = "mlflow (temporary SQLite store)"
        except ImportError:
            logger = _RecordingLogger()
            out["tracker"] = "recording logger (mlflow not installed)"
        t0 = time.perf_counter()
        try:
            with _single_process_env():
                loop.run(cfg, paths, logger=logger)
        except Exception as exc:  # noqa: BLE001 - the evidence: what broke in the real code path
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out
        out.update(ran=True, seconds=round(time.perf_counter() - t0, 2))
        best, last = Path(paths.models_dir) / "best.pt", Path(paths.models_dir) / "last.pt"
        out["best_pt"], out["last_pt"] = best.is_file(), last.is_file()
        if best.is_file():
            blob = torch.load(best, map_location="cpu", weights_only=False)
            out["best_keys"] = sorted(k for k in blob if k != "model")
            out["run_info"] = {k: blob["run_info"].get(k) for k in ("git_sha", "git_dirty", "environment_hash",
                                                                      "shard_index_sha256", "split_manifest_sha256")}
            out["run_info"]["config_seed"] = blob["run_info"].get("config", {}).get("seed")
        if isinstance(logger, _RecordingLogger):
            seen: dict = {}
            params_logged: set = set()
            for name, a, _kw in logger.calls:
                if name == "log_metrics":
                    for k, v in a[0].items():
                        seen.setdefault(k, []).append(float(v))
                if name == "log_params":
                    params_logged |= set(a[0])
        else:
            client = logger.client
            seen = {k: [m.value for m in client.get_metric_history(logger.run_id, k)]
                    for k in (*DRY_STEP_METRICS, "val_accuracy", "val_loss")}
            params_logged = set(client.get_run(logger.run_id).data.params)
            out["run_id"] = logger.run_id
        out["metrics_read_back"] = {k: v for k, v in seen.items() if k in (*DRY_STEP_METRICS, "val_accuracy",
                                                                            "val_loss") and v}
        out["params_logged"] = sorted(k for k in params_logged if k in (
            "git_sha", "git_dirty", "environment_hash", "shard_index_sha256", "split_manifest_sha256", "config.seed",
            "config.deterministic", "config.model", "config.lr", "scaled_lr", "effective_batch"))
    return out


def _logging_item(dry: dict | None, enabled: bool, have_data: bool) -> CheckItem:
    name = "logging_dry_step"
    if not enabled:
        return CheckItem(name, "skip", {"preflight.dry_step": False}, "set preflight.dry_step: true to prove that "
                         "loss, metric, grad norm and LR reach the tracker")
    if not have_data or dry is None:
        return CheckItem(name, "fail", {}, "no train shards to take a dry step on: run `keel shard`")
    if not dry.get("ran"):
        return CheckItem(name, "fail", {"error": dry.get("error")}, "one real training step failed (see error): fix "
                         "it before a long run")
    seen = dry["metrics_read_back"]
    need = [*DRY_STEP_METRICS, "val_accuracy" if "val_accuracy" in seen else "val_loss"]
    missing = [k for k in need if k not in seen]
    ev = {"tracker": dry["tracker"], "run_id": dry.get("run_id"), "seconds": dry.get("seconds"),
          "metrics_read_back": {k: round(v[-1], 6) for k, v in seen.items()}, "missing": missing}
    tracking_off = os.environ.get("KEEL_TRACKING", "mlflow") == "off"
    ev["keel_tracking"] = "off" if tracking_off else "mlflow"
    if missing:
        return CheckItem(name, "fail", ev, f"the dry step did not log {missing} to the tracker: check "
                         "train.log_every_steps and the loop's logger calls")
    if tracking_off:
        return CheckItem(name, "fail", ev, "KEEL_TRACKING=off: the run's metrics would reach only the local "
                         "events.jsonl; unset it (or point MLFLOW_TRACKING_URI at your server)")
    return CheckItem(name, "pass", ev, "none")


def _selection_item(cfg: TrainConfig, dry: dict | None) -> CheckItem:
    name = "checkpoint_selection"
    policy = (f"early stopping after {cfg.early_stopping_patience} epochs without improvement"
              if cfg.early_stopping_patience else "run the whole schedule and keep the best-val checkpoint")
    ev = {"monitor": cfg.monitor, "early_stopping_patience": cfg.early_stopping_patience, "policy": policy,
          "dry_step_best_pt": (dry or {}).get("best_pt"), "dry_step_last_pt": (dry or {}).get("last_pt"),
          "best_pt_keys": (dry or {}).get("best_keys")}
    if not cfg.monitor:
        return CheckItem(name, "fail", ev, "set train.monitor (val_accuracy or val_loss)")
    if dry is not None and dry.get("ran") and not (dry.get("best_pt") and dry.get("last_pt")):
        return CheckItem(name, "fail", ev, "the dry step did not write best.pt and last.pt: best-checkpoint "
                         "selection is not wired")
    return CheckItem(name, "pass", ev, "none")


# ---------------------------------------------------------------- 9. reproducibility
def _reproducibility_item(cfg: TrainConfig, allow_dirty: bool, root: str | Path, dry: dict | None) -> CheckItem:
    name = "reproducibility"
    git = lineage.git_state(root)
    changed = lineage.git("diff", "--name-only", "HEAD", root=root) or ""  # staged + unstaged, tracked files
    dirty_files = [line for line in changed.splitlines() if line.strip()]
    ev = {"seed": cfg.seed, "deterministic": cfg.deterministic, "git_sha": git["git_sha"],
          "dirty_files": dirty_files, "allow_dirty": allow_dirty,
          "environment_hash": lineage.environment_hash(root)[:16],
          "logged_with_the_run": (dry or {}).get("params_logged"),
          "checkpoint_run_info": (dry or {}).get("run_info")}
    problems = []
    if not cfg.deterministic:
        problems.append("train.deterministic is false: two runs with the same seed can differ; set it true")
    if git["git_sha"] == "unknown":
        problems.append(f"{Path(root).resolve()} is not a git repository (or git is missing): the code version "
                        "cannot be logged; run from a git checkout")
    if dirty_files and not allow_dirty:
        problems.append(f"the working tree has uncommitted changes to {', '.join(dirty_files)}: the run would log "
                        "a git SHA that is not the code that trained it; commit (or stash) them, or set "
                        "preflight.allow_dirty: true to accept a run that cannot be retrained exactly")
    run_info = (dry or {}).get("run_info") or {}
    absent = [k for k in ("git_sha", "environment_hash", "shard_index_sha256", "split_manifest_sha256")
              if dry is not None and dry.get("ran") and not run_info.get(k)]
    if absent:
        problems.append(f"the checkpoint's lineage lacks {absent}")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none" if not dirty_files else
                     f"allowed by preflight.allow_dirty with {len(dirty_files)} uncommitted file(s)")


# ---------------------------------------------------------------- 10. distributed
def _distributed_item(cfg: TrainConfig) -> CheckItem:
    name = "distributed"
    if cfg.devices == 1:
        return CheckItem(name, "skip", {"devices": 1}, "none (one process)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    nodes = max(1, int(os.environ.get("WORLD_SIZE", cfg.devices)) // cfg.devices)
    world = cfg.devices * nodes
    effective = cfg.effective_batch or cfg.batch_size * world
    ev = {"devices": cfg.devices, "nodes": nodes, "world_size": world, "backend": "nccl" if cuda else "gloo",
          "strategy": cfg.strategy, "batch_size": cfg.batch_size, "effective_batch": effective,
          "cuda_devices_here": torch.cuda.device_count() if cuda else 0}
    problems = []
    if effective % (cfg.batch_size * world):
        problems.append(f"effective_batch {effective} is not a multiple of batch_size x world size = "
                        f"{cfg.batch_size} x {world}; gradient accumulation needs a whole number of steps")
    else:
        ev["accumulation"] = effective // (cfg.batch_size * world)
    if cuda and torch.cuda.device_count() and torch.cuda.device_count() < cfg.devices:
        problems.append(f"train.devices={cfg.devices} but this node has {torch.cuda.device_count()} CUDA devices")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none")
