"""Everything ``Trainer.fit`` needs, built in the order the RNG sees it (seed, data, model init, optimiser, EMA,
Mixup): changing this order changes the weights (tests/contracts/test_golden.py)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from tasks.core import io, lineage, runtime
from tasks.core.secrets import redact
from tasks.model import build as tmodel
from tasks.model import views
from tasks.train import data as tdata
from tasks.train.callbacks import default_callbacks, last_checkpoint
from tasks.train.distributed import Dist, fully_shard
from tasks.train.errors import TrainError
from tasks.train.feed import TrainFeed, data_mode
from tasks.train.logger import JsonlLogger, MultiLogger, NullLogger, OpenTracker
from tasks.train.optim import build_optimizer, build_scheduler, param_groups
from tasks.train.plan import BatchPlan
from tasks.train.step import TrainStep
from tasks.train.trainer import Trainer


def resume_key(cfg, data: dict, world: int) -> str:
    blob = json.dumps({"cfg": cfg.model_dump(mode="json"), "data": data, "world": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _data(cfg, paths, index, dist: Dist):
    if cfg.crop_pad is not None and cfg.augment == "flip_crop" and cfg.crop_pad >= index.resolution:
        raise TrainError(f"train.crop_pad={cfg.crop_pad} must be smaller than the images' {index.resolution} px "
                         "(reflect padding); lower it or leave it null")
    need = (index.rows("train") + index.rows("val")) * index.resolution**2 * index.channels
    mode = data_mode(cfg, need, dist.device)
    feed = TrainFeed(cfg, paths.shards_dir, mode, dist.device, dist.world, dist.rank)
    val_data = tdata.DeviceSplit(paths.shards_dir, "val", dist.device)
    return feed, val_data, views.Normalize(index.mean, index.std).to(dist.device)


def _model(cfg, paths, index, norm, dist: Dist):
    model, init_report = tmodel.build_model(cfg, len(index.classes), index.channels, index.resolution)
    model.to(dist.device)
    if cfg.stem_init == "whiten":  # from the first train images, the same on every rank (and on a resume)
        first = tdata.first_images(paths.shards_dir, "train", tmodel.WHITEN_IMAGES, dist.device)
        init_report.update(tmodel.whiten_stem(cfg, model, norm(first)))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if dist.world > 1 and dist.device.type == "cuda":
        # BatchNorm statistics over the global batch, as one process would compute them (NCCL only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.fsdp:  # before the optimiser: fully_shard swaps the parameters for sharded DTensors
        fully_shard(model)
    return model, init_report


def _mixup(cfg, n_classes: int):
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None, None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if cfg.batch_size % 2:
        raise TrainError(f"train.batch_size={cfg.batch_size} must be even for Mixup/CutMix (timm pairs samples)")
    # label smoothing moves into the soft targets; timm's Mixup draws from NumPy's RNG (seeded, checkpointed)
    return (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                  num_classes=n_classes), SoftTargetCrossEntropy())


def _loggers(paths, logger, master: bool):
    if not master:
        return NullLogger(), None
    plots = Path(paths.train_plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    files = JsonlLogger(plots / "events.jsonl")
    return (MultiLogger(files, logger) if logger is not None else files), files


def build(cfg, paths, logger, dist: Dist, precision: str, tracker: OpenTracker | None = None) -> Trainer:
    """``tracker`` (rank 0): opens the tracking run once last.pt has said whether this resumes one, so a resumed
    training continues its own run; it is called last, when nothing here can fail any more."""
    runtime.seed_everything(cfg.seed, cfg.deterministic)
    index = io.ShardIndex.load(paths.shards_dir)
    feed, val_data, norm = _data(cfg, paths, index, dist)
    if cfg.probe_batch:
        from tasks.train.probe import probe_batch

        cfg = probe_batch(cfg, index, dist.device, dist.world, dist.master)
    plan = BatchPlan.make(cfg, dist.world, feed.batches_per_epoch, feed.n)
    model, init_report = _model(cfg, paths, index, norm, dist)
    transfer = cfg.pretrained != "none"
    backbone_lr = plan.scaled_lr * cfg.backbone_lr_factor if transfer else plan.scaled_lr
    groups = param_groups(model, plan.scaled_lr, backbone_lr, cfg.weight_decay, cfg.norm_bias_lr_factor)
    opt = build_optimizer(cfg, groups, plan.scaled_lr)
    sched = build_scheduler(cfg, opt, groups, plan.total_steps)
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    mixup_fn, soft_target_loss = _mixup(cfg, len(index.classes))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def autocast():
        return torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    data_versions = lineage.data_versions(paths.shards_dir, paths.split_manifest)
    # what a served model must repeat (tasks.core.imaging.preprocess + Normalize); packaged with best.pt
    preprocessing = {"classes": index.classes, "mean": index.mean, "std": index.std, "resolution": index.resolution,
                     "channels": index.channels, "resize": index.resize, "background": list(index.background),
                     "decode": index.decode}
    run_info = {"config": cfg.model_dump(mode="json"), "data_mode": feed.mode, "world_size": dist.world,
                "accumulation": plan.accumulation, "effective_batch": plan.effective, "scaled_lr": plan.scaled_lr,
                "backbone_lr": backbone_lr, "precision": precision, "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps, "classes": index.classes, "init": init_report,
                "environment_hash": lineage.environment_hash(), **lineage.git_state(), **data_versions}
    if dist.master and init_report.get("stem", "").startswith("timm default"):
        print(f"train: note: train.small_input_stem does not apply to {cfg.model} (no single-conv ResNet stem); "
              f"timm's stem downsamples the {index.resolution} px inputs early", file=sys.stderr)
    announce = (f"train: {cfg.model} on {dist.device} x{dist.world}, {precision}, effective batch {plan.effective} "
                f"({cfg.batch_size} x {dist.world} devices x {plan.accumulation} accumulation), lr {cfg.lr} at batch "
                f"{cfg.reference_batch} -> {plan.scaled_lr:.3g}, {plan.total_steps} steps")
    step = TrainStep(model, opt, scaler, autocast, dist, plan.accumulation, cfg.grad_clip,
                     cfg.label_smoothing, soft_target_loss, ema)
    key = resume_key(cfg, data_versions, dist.world)
    if dist.master:  # what a killed checkpoint write left (a SIGKILL skips atomic_path's clean-up)
        for name in io.remove_stale_temps(paths.checkpoints_dir):
            print(f"train: removed {paths.checkpoints_dir}/{name}, left by an interrupted write", file=sys.stderr)
    resume = last_checkpoint.matching(Path(paths.checkpoints_dir) / "last.pt", key, dist)
    if resume is None and dist.master:  # an abandoned training's best.pt must never be published as this one's
        (Path(paths.checkpoints_dir) / "best.pt").unlink(missing_ok=True)
    if tracker is not None and dist.master:
        logger = tracker(last_checkpoint.tracking_run_id(resume), run_info)
    log, files = _loggers(paths, logger, dist.master)
    return Trainer(cfg=cfg, paths=paths, plan=plan, dist=dist, model=model, opt=opt, sched=sched, scaler=scaler,
                   ema=ema, autocast=autocast, norm=norm, feed=feed, val_data=val_data, mixup_fn=mixup_fn,
                   step=step, logger=log, files=files, tracker=logger, callbacks=default_callbacks(cfg),
                   resume_key=key, resume=resume, preprocessing=preprocessing, run_info=run_info, announce=announce,
                   tracking={"tracking_run_id": getattr(logger, "run_id", None),
                             # never the password: run_info goes into best.pt/last.pt, params and events
                             "tracking_uri": redact(getattr(logger, "tracking_uri", None))})
