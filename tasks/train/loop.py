"""keel train: reads top to bottom — distributed set-up, data, model, optimiser and schedule, loop, checkpoints.

Runs under torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment; gloo on CPU, NCCL on GPU) or as a
plain process. Only rank 0 logs and writes; every write is atomic. Reads the train and val shards only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.core import io, lineage
from tasks.core.config import Paths, TrainConfig
from tasks.core.errors import UserError
from tasks.model import build as tmodel
from tasks.model import views
from tasks.train import data as tdata
from tasks.train import outputs
from tasks.train.logger import JsonlLogger, MetricLogger, MultiLogger, NullLogger
from tasks.train.signals import SignalMonitor

_NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


class TrainError(UserError):
    """A training problem a user can act on (bad params for this data, no CUDA, a halted run)."""


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_val_loss: float
    best_epoch: int
    steps: int
    epochs_run: int
    stopped_early: bool
    resumed_from_step: int


# ---------------------------------------------------------------- set-up helpers
def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("train.device=cuda but no CUDA device is available; set train.device: cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise TrainError(f"train.devices={cfg.devices} but this node has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:  # cuDNN autotunes its kernels for the shapes it sees: faster, and reruns differ in the last bits
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        if device.type == "cpu" and cfg.precision == "fp16":
            raise TrainError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _param_groups(model: torch.nn.Module, lr: float, backbone_lr: float, weight_decay: float,
                  norm_bias_lr_factor: float = 1.0) -> list[dict]:
    head = {id(p) for p in tmodel.head_parameters(model)}
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, _NORM_LAYERS) and m.bias is not None} \
        if norm_bias_lr_factor != 1.0 else set()
    groups: dict[tuple[bool, bool, bool], list] = {}
    for p in model.parameters():
        # no weight decay on biases and norm scales (1-D tensors): the usual practice, as timm's param_groups
        groups.setdefault((id(p) in head, p.ndim > 1, id(p) in norm_biases), []).append(p)
    out = []
    for (is_head, decay, norm_bias), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        base = lr if is_head else backbone_lr
        out.append({"params": ps, "lr": base * (norm_bias_lr_factor if norm_bias else 1.0),
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"
                            f"{'_norm_bias' if norm_bias else ''}"})
    return out


def _resume_key(cfg: TrainConfig, data: dict, world: int) -> str:
    blob = json.dumps({"cfg": cfg.model_dump(mode="json"), "data": data, "world": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fully_shard(model: torch.nn.Module) -> None:
    """FSDP2: one sharding unit per block (each child of a top-level Sequential/ModuleList, e.g. resnet layers'
    blocks, ViT blocks, ConvNeXt stages), then the root for what is left (stem, head)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        many = isinstance(child, torch.nn.Sequential | torch.nn.ModuleList) and len(child) > 1
        for unit in (child.children() if many else [child]):
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit)
    fully_shard(model)


def _full_states(model: torch.nn.Module, opt, fsdp: bool) -> tuple[dict, dict | None]:
    """Plain (unsharded) model and optimiser state dicts, the checkpoint format for every strategy. Under FSDP
    this is a collective: every rank calls it; rank 0 receives the full tensors (on the CPU), others empty dicts."""
    if not fsdp:
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, opt, options=opts) if opt is not None else None)


def _load_states(model: torch.nn.Module, opt, model_sd: dict, opt_sd: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)  # every rank read the full file; each keeps its shard
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, opt, opt_sd, options=opts)


def _save(path: Path, blob: dict) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(blob, tmp)


@torch.no_grad()
def evaluate(model: torch.nn.Module, norm: torch.nn.Module, split: tdata.DeviceSplit, autocast, batch: int = 1024,
             channels_last: bool = False, tta: str = "none") -> tuple[float, float, float]:
    """(loss, accuracy, single-view accuracy) on ``split``; with ``tta`` the first two are the views' average."""
    model.eval()
    sums = torch.zeros(3, device=split.y.device)  # loss, correct, single-view correct: read back once
    for s in range(0, split.n, batch):
        x = norm(split.x[s:s + batch])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, plain = views.tta_logits(model, x, tta)
        y = split.y[s:s + batch]
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += (plain.argmax(1) == y).sum()
    model.train()
    total_loss, correct, plain_correct = sums.tolist()
    n = max(split.n, 1)
    return total_loss / n, int(correct) / n, int(plain_correct) / n


# ---------------------------------------------------------------- the stage
def run(cfg: TrainConfig, paths: Paths, logger: MetricLogger | None = None) -> TrainResult:
    world, rank, local_rank = _dist_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # processes on this node (torchrun sets it)
    if local_world != cfg.devices:
        raise TrainError(f"train.devices={cfg.devices} but the launcher started {local_world} process(es) on this "
                         "node; launch with `torchrun --nproc_per_node=${train.devices}` (dvc.yaml does)")
    if cfg.effective_batch is not None and cfg.effective_batch % (cfg.batch_size * world):
        raise TrainError(f"train.effective_batch={cfg.effective_batch} is not a multiple of batch_size x world size "
                         f"= {cfg.batch_size} x {world}")
    device = _device(cfg, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    try:
        return _train(cfg, paths, logger, world, rank, device, master)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, paths, logger, world, rank, device, master) -> TrainResult:
    seed_everything(cfg.seed, cfg.deterministic)
    index = io.ShardIndex.load(paths.shards_dir)
    if cfg.crop_pad is not None and cfg.augment == "flip_crop" and cfg.crop_pad >= index.resolution:
        raise TrainError(f"train.crop_pad={cfg.crop_pad} must be smaller than the images' {index.resolution} px "
                         "(reflect padding); lower it or leave it null")
    need = (index.rows("train") + index.rows("val")) * index.resolution**2 * index.channels
    budget = (torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else 8 << 30)
    # device-resident data is the fast path when it fits (CIFAR-10 at 32 px is 150 MB); larger sets stream
    mode = cfg.data if cfg.data != "auto" else ("device" if need <= budget else "stream")
    if mode == "device" and need > budget:
        raise TrainError(f"train.data=device: train+val images need {need / 2**30:.1f} GiB as uint8, over the "
                         f"{budget / 2**30:.1f} GiB device budget; use train.data: stream (or auto)")
    if mode == "stream":
        train_data = tdata.StreamSplit(paths.shards_dir, "train", device, cfg.loader_workers)
    else:
        train_data = tdata.DeviceSplit(paths.shards_dir, "train", device)
    val_data = tdata.DeviceSplit(paths.shards_dir, "val", device)
    norm = views.Normalize(index.mean, index.std).to(device)

    if cfg.probe_batch:
        from tasks.train.probe import probe_batch

        cfg = probe_batch(cfg, index, device, world, master)
    accumulation = 1
    if cfg.effective_batch is not None:
        accumulation = cfg.effective_batch // (cfg.batch_size * world)
    effective = cfg.batch_size * world * accumulation
    if mode == "stream":
        steps_per_epoch = train_data.batches_per_epoch(cfg.batch_size * world) // accumulation
    else:
        steps_per_epoch = tdata.steps_per_epoch(train_data.n, cfg.batch_size, world, accumulation)
    if steps_per_epoch == 0:
        raise TrainError(f"train.batch_size={cfg.batch_size} x devices {world} x accumulation {accumulation} = "
                         f"{effective} is larger than the train split ({train_data.n} items)")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scaled_lr = cfg.lr * effective / cfg.reference_batch  # the linear scaling rule

    model, init_report = tmodel.build_model(cfg, len(index.classes), index.channels, index.resolution)
    model.to(device)
    if cfg.stem_init == "whiten":  # from the first train images, the same on every rank (and on a resume)
        init_report.update(tmodel.whiten_stem(cfg, model, norm(tdata.first_images(paths.shards_dir, "train",
                                                                               tmodel.WHITEN_IMAGES, device))))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if world > 1 and device.type == "cuda":
        # BatchNorm statistics over the global batch, as one process would compute them (NCCL only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fsdp = cfg.strategy == "fsdp" and world > 1
    if fsdp:  # before the optimiser: fully_shard swaps the parameters for sharded DTensors
        _fully_shard(model)
    transfer = cfg.pretrained != "none"
    backbone_lr = scaled_lr * cfg.backbone_lr_factor if transfer else scaled_lr
    groups = _param_groups(model, scaled_lr, backbone_lr, cfg.weight_decay, cfg.norm_bias_lr_factor)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=scaled_lr)
    else:
        opt = torch.optim.SGD(groups, lr=scaled_lr, momentum=cfg.momentum, nesterov=True)
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler
    from timm.utils import ModelEmaV3

    floor = cfg.lr_floor * min(g["lr"] for g in groups)
    sched_cls = CosineLRScheduler if cfg.schedule == "cosine" else PolyLRScheduler
    extra = {} if cfg.schedule == "cosine" else {"power": 1.0}
    sched = sched_cls(opt, t_initial=total_steps, lr_min=floor, warmup_t=cfg.warmup_steps,
                      warmup_lr_init=floor * 0.1, t_in_epochs=False, **extra)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        if cfg.batch_size % 2:
            raise TrainError(f"train.batch_size={cfg.batch_size} must be even for Mixup/CutMix (timm pairs samples)")
        # label smoothing moves into the soft targets; timm's Mixup draws from NumPy's RNG (seeded, checkpointed)
        from timm.loss import SoftTargetCrossEntropy

        soft_target_loss = SoftTargetCrossEntropy()
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=len(index.classes))
    precision = _precision(cfg, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    data_versions = lineage.data_versions(paths.shards_dir, paths.split_manifest)
    resume_key = _resume_key(cfg, data_versions, world)
    models_dir = Path(paths.models_dir)
    last_path, best_path = models_dir / "last.pt", models_dir / "best.pt"
    monitor = SignalMonitor()
    state = {"step": 0, "epoch": 0, "next_batch": 0, "best_metric": None, "best_epoch": -1, "best_val_loss": math.inf,
             "best_val_accuracy": 0.0, "bad_epochs": 0, "history": [], "stopped_early": False}
    resumed_from = 0
    if last_path.exists():
        ck = torch.load(last_path, map_location=device, weights_only=False)
        if ck.get("resume_key") == resume_key:
            _load_states(model, opt, ck["model"], ck["optimizer"], fsdp)
            scaler.load_state_dict(ck["scaler"])
            if ema is not None and ck.get("ema") is not None:
                ema.load_state_dict(ck["ema"])
            monitor.load_state_dict(ck["signals"])
            state.update(ck["state"])
            _set_rng_state(ck["rng"])
            resumed_from = state["step"]
        elif master:
            print(f"train: {last_path} is from a different config or data version; starting fresh", file=sys.stderr)

    from torch.nn.parallel import DistributedDataParallel as DDP

    phase = 1 if transfer and cfg.freeze_backbone_epochs > state["epoch"] else 2
    if transfer:
        tmodel.set_phase(model, phase, cfg.unfreeze_top_blocks)
    net = DDP(model, find_unused_parameters=transfer) if world > 1 and not fsdp else model
    if cfg.compile:
        net = torch.compile(net)

    files = None
    tracking = {"tracking_run_id": getattr(logger, "run_id", None), "tracking_uri": getattr(logger, "tracking_uri", None)}
    if master:
        plots = Path(paths.train_plots_dir)
        plots.mkdir(parents=True, exist_ok=True)
        files = JsonlLogger(plots / "events.jsonl")
        logger = MultiLogger(files, logger) if logger is not None else files
    else:
        logger = NullLogger()
    git = lineage.git_state()
    # what a served model must repeat (tasks.core.imaging.preprocess + Normalize); packaged with best.pt
    preprocessing = {"classes": index.classes, "mean": index.mean, "std": index.std, "resolution": index.resolution,
                     "channels": index.channels, "resize": index.resize, "background": list(index.background)}
    run_info = {"config": cfg.model_dump(mode="json"), "data_mode": mode, "world_size": world, "accumulation": accumulation,
                "effective_batch": effective, "scaled_lr": scaled_lr, "backbone_lr": backbone_lr,
                "precision": precision, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "classes": index.classes, "init": init_report, "environment_hash": lineage.environment_hash(),
                **git, **data_versions, "resumed_from_step": resumed_from,
                **tracking}
    logger.log_params(run_info)
    if master and init_report.get("stem", "").startswith("timm default"):
        print(f"train: note: train.small_input_stem does not apply to {cfg.model} (no single-conv ResNet stem); "
              f"timm's stem downsamples the {index.resolution} px inputs early", file=sys.stderr)
    if master:
        print(f"train: {cfg.model} on {device} x{world}, {precision}, effective batch {effective} "
              f"({cfg.batch_size} x {world} devices x {accumulation} accumulation), lr {cfg.lr} at batch "
              f"{cfg.reference_batch} -> {scaled_lr:.3g}, {total_steps} steps"
              + (f"; resuming at step {resumed_from}" if resumed_from else ""), file=sys.stderr)

    stop_requested = {"sig": None}

    def on_sigterm(signum, frame):  # checkpoint at the next read-back (log window or epoch end), then exit
        stop_requested["sig"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)  # every rank: the stop is agreed at a read-back

    def checkpoint(path: Path, extra_state: dict) -> None:  # called on every rank (FSDP gathers collectively)
        model_sd, opt_sd = _full_states(model, opt, fsdp)
        if not master:
            return
        _save(path, {"model": model_sd, "optimizer": opt_sd, "scaler": scaler.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "signals": monitor.state_dict(),
                     "state": {**state, **extra_state}, "rng": _rng_state(), "resume_key": resume_key,
                     "index": preprocessing,
                     "run_info": run_info})

    step_log: list[dict] = []
    # Per-step scalars (loss, grad norm) stay on the device and are read back together, once per
    # log_every_steps and at the end of each epoch: one host sync per window instead of several per step, so the
    # CPU keeps queueing work while the GPU runs (small models are launch-bound). The non-finite check, the
    # signal monitor and the SIGTERM agreement run on each read-back, over every step of the window, in order.
    win = {"t": time.perf_counter(), "imgs": 0, "wait": 0.0, "busy": 0.0}
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (step, loss, grad norm, lr), not read yet
    halted = None

    def read_back(epoch: int) -> bool:
        """Process the pending steps; returns True when the ranks agreed to stop (SIGTERM). Sets ``halted``."""
        nonlocal halted
        t_sync = time.perf_counter()
        values = torch.stack([torch.stack([loss.float(), gn.float()]) for _, loss, gn, _ in pending]).tolist()
        # the losses are already the global batch's (all-reduced): every rank sees the same values; one
        # collective agrees on "some rank got SIGTERM"
        stop = torch.tensor([1.0 if stop_requested["sig"] is not None else 0.0], device=device)
        if world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        agreed = stop.item() > 0
        win["busy"] += time.perf_counter() - t_sync  # waiting for the device to finish the window's steps
        for (step, _, _, lr), (loss_value, grad_norm) in zip(pending, values):
            if not math.isfinite(loss_value):
                halted = (f"non-finite loss ({loss_value}) at step {step}, epoch {epoch}; the last good "
                          f"checkpoint is {last_path} (lower train.lr, check the data, or use train.grad_clip)")
                logger.log_event("non_finite_loss", halted, step)
                break
            for sig in monitor.on_step(step, loss_value, grad_norm):
                logger.log_event(sig.name, sig.detail, sig.step)
            if step % cfg.log_every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                elapsed = now - win["t"]
                rec = {"train_loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                       "images_per_s": win["imgs"] / max(elapsed, 1e-9),
                       "data_wait_fraction": win["wait"] / max(win["wait"] + win["busy"], 1e-9)}
                logger.log_metrics(rec, step)
                step_log.append({"step": step, **rec})
                win.update(t=now, imgs=0, wait=0.0, busy=0.0)
        pending.clear()
        return agreed and halted is None

    try:
        for epoch in range(state["epoch"], cfg.epochs):
            if state["step"] >= total_steps:
                break
            if transfer and phase == 1 and epoch >= cfg.freeze_backbone_epochs:
                phase = 2
                tmodel.set_phase(model, 2, cfg.unfreeze_top_blocks)
                if world > 1:  # DDP hooks only the parameters that required grad when it was built: re-wrap
                    net = DDP(model, find_unused_parameters=True)
                    if cfg.compile:
                        net = torch.compile(net)
                logger.log_event("phase_2", f"backbone unfrozen ({cfg.unfreeze_top_blocks or 'all'} groups) at "
                                 f"LR x{cfg.backbone_lr_factor}", state["step"])
            net.train()
            epoch_loss, epoch_batches = torch.zeros((), device=device), 0
            usable = steps_per_epoch * accumulation
            t_fetch = time.perf_counter()
            iterate = tdata.iterate_stream if mode == "stream" else tdata.iterate_epoch
            data_seed = cfg.seed if cfg.shuffle_seed is None else cfg.shuffle_seed
            batches = iterate(train_data, cfg.batch_size, world, rank, data_seed, epoch, cfg.augment,
                              start_batch=state["next_batch"], crop_pad=cfg.crop_pad)
            step_loss = torch.zeros((), device=device)
            agreed_stop = False
            for i, x, y in batches:
                if i >= usable or state["step"] >= total_steps:
                    break
                x = norm(x)
                target = y
                if mixup_fn is not None:
                    x, target = mixup_fn(x, y)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                t_compute = time.perf_counter()
                win["wait"] += t_compute - t_fetch  # host time spent getting the batch (no device sync)
                final_micro = (i + 1) % accumulation == 0
                if fsdp:  # reduce-scatter gradients only on the last micro-batch of an accumulation
                    net.set_requires_gradient_sync(final_micro)
                sync_ctx = net.no_sync() if (world > 1 and not final_micro and hasattr(net, "no_sync")) else contextlib.nullcontext()
                with sync_ctx:
                    with autocast():
                        logits = net(x)
                        if mixup_fn is not None:  # soft targets: cross-entropy against the mixed distribution
                            loss = soft_target_loss(logits.float(), target)
                        else:
                            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    scaler.scale(loss / accumulation).backward()
                step_loss = loss.detach().float() + (step_loss if i % accumulation else 0.0)
                epoch_loss += loss.detach().float()
                epoch_batches += 1
                win["imgs"] += len(y) * world
                if not final_micro:
                    win["busy"] += time.perf_counter() - t_compute
                    t_fetch = time.perf_counter()
                    continue
                scaler.unscale_(opt)
                params = [p for p in model.parameters() if p.grad is not None]
                total_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                # FSDP: a DTensor; full_tensor() is the norm over every rank's shard
                grad_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
                loss_value = step_loss / accumulation  # the mean over the whole effective batch
                if world > 1:  # the logged loss is the global batch's mean, comparable to a 1-process run
                    dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
                    loss_value = loss_value / world
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model, step=state["step"])
                state["step"] += 1
                sched.step_update(num_updates=state["step"])
                state["next_batch"] = i + 1
                pending.append((state["step"], loss_value.detach(), grad_norm.detach(), opt.param_groups[-1]["lr"]))
                win["busy"] += time.perf_counter() - t_compute
                if state["step"] % cfg.log_every_steps == 0 or state["step"] == total_steps:
                    agreed_stop = read_back(epoch)
                    if halted:
                        break
                    if agreed_stop:
                        break
                t_fetch = time.perf_counter()
            if pending and not halted:  # the epoch's last steps, before validation reads the weights
                agreed_stop = read_back(epoch)
            if halted:
                break
            if agreed_stop:
                checkpoint(last_path, {})
                logger.log_event("sigterm", f"stopped at step {state['step']}; checkpoint {last_path}", state["step"])
                raise SystemExit(128 + signal.SIGTERM)
            # ---- end of epoch: validate (EMA weights when enabled), select, checkpoint
            eval_model = ema.module if ema is not None else model
            val_loss, val_acc, val_acc_plain = evaluate(eval_model, norm, val_data, autocast,
                                                        channels_last=cfg.channels_last, tta=cfg.tta)
            train_loss = float(epoch_loss) / max(epoch_batches, 1)
            metric = val_acc if cfg.monitor == "val_accuracy" else -val_loss
            improved = state["best_metric"] is None or metric > state["best_metric"]
            record = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc}
            if cfg.tta != "none":  # what the test-time views add, on validation
                record["val_accuracy_single_view"] = val_acc_plain
            state["history"].append({"epoch": epoch, "step": state["step"], **record})
            logger.log_metrics({"epoch_train_loss": train_loss, **{k: v for k, v in record.items() if k != "train_loss"}},
                               state["step"])
            for sig in monitor.on_epoch(epoch, state["step"], train_loss, val_loss, val_acc):
                logger.log_event(sig.name, sig.detail, sig.step)
            if master:
                print(f"train: epoch {epoch} step {state['step']}: train loss {train_loss:.4f}, val loss "
                      f"{val_loss:.4f}, val acc {val_acc:.4f}"
                      + (f" ({cfg.tta}; single view {val_acc_plain:.4f})" if cfg.tta != "none" else "")
                      + (" (best)" if improved else ""), file=sys.stderr)
            state["epoch"], state["next_batch"] = epoch + 1, 0
            if improved:
                state.update(best_metric=metric, best_epoch=epoch, best_val_loss=val_loss, best_val_accuracy=val_acc,
                             bad_epochs=0)
                best_sd, _ = _full_states(eval_model, None, fsdp)
                if master:
                    blob = {"model": best_sd, "epoch": epoch, "step": state["step"],
                            "val_loss": val_loss, "val_accuracy": val_acc, "model_name": cfg.model,
                            "index": preprocessing,
                            "run_info": run_info}
                    _save(best_path, blob)
            else:
                state["bad_epochs"] += 1
            stop = torch.tensor([1.0 if (cfg.early_stopping_patience and
                                         state["bad_epochs"] >= cfg.early_stopping_patience) else 0.0], device=device)
            if world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # one decision for all ranks
            if stop.item() > 0:
                state["stopped_early"] = True
                logger.log_event("early_stop", f"no improvement of {cfg.monitor} for {state['bad_epochs']} epochs; "
                                 f"best epoch {state['best_epoch']}", state["step"])
            checkpoint(last_path, {})
            if state["stopped_early"]:
                break
    finally:
        signal.signal(signal.SIGTERM, old_handler)

    if master:
        outputs.write(paths, state, run_info, step_log, halted)
        logger.close("FAILED" if halted else "FINISHED")
    if halted:
        raise TrainError(halted)
    return TrainResult(state["best_val_accuracy"], state["best_val_loss"], state["best_epoch"], state["step"],
                       state["epoch"], state["stopped_early"], resumed_from)
