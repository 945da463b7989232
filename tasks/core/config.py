"""Typed configuration: one pydantic model per stage section of params.yaml.

Each stage receives only its own section plus the shared ``paths`` (every output path is declared once,
in ``params.yaml:paths``, and templated into ``dvc.yaml``).  Unknown keys are errors, and every error names
the file and the dotted key, so a typo in params.yaml never silently falls back to a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    raw_items: str = "data/raw/items"
    rejects: str = "data/raw/rejects.parquet"
    audit_dir: str = "reports/audit"
    split_manifest: str = "data/split/manifest.parquet"
    leakage_report: str = "reports/leakage.json"
    leakage_picture: str = "reports/leakage.png"
    validate_dir: str = "reports/validate"
    shards_dir: str = "data/shards"
    models_dir: str = "models"
    # not a DVC output: the training in flight (last.pt, best.pt so far), resumed by a rerun after a crash or a
    # preemption; the finished training's checkpoints are published to models_dir, and this folder is emptied
    checkpoints_dir: str = "data/checkpoints"
    train_metrics: str = "metrics/train.json"
    train_plots_dir: str = "reports/train"
    evaluate_dir: str = "reports/evaluate"
    test_metrics: str = "metrics/test.json"
    # not a DVC output: the ledger outlives every stage run (DVC deletes a stage's outputs before it runs)
    test_ledger: str = "data/test_ledger"
    register_report: str = "reports/register.json"


def _address_needs_dask(cfg, section: str):
    """``scheduler_address`` is read only by ``executor: dask``: with ``local`` it would be ignored, so say so."""
    if cfg.scheduler_address and cfg.executor != "dask":
        raise ValueError(f"scheduler_address={cfg.scheduler_address!r} is read only with executor: dask, and "
                         f"{section}.executor is {cfg.executor!r}: set {section}.executor: dask to run on that "
                         "scheduler, or remove the address to run locally")
    return cfg


class IngestConfig(_Section):
    source: str = Field("builtin:digits", description="builtin:digits | a folder | a .csv/.parquet manifest | s3://bucket/prefix")
    root: str | None = Field(None, description="data root that manifest paths resolve against (default: the manifest's folder)")
    classes: list[str] | None = Field(None, description="declared class set; labels outside it are rejected")
    s3_endpoint: str | None = None
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard (PIL's default)")
    min_side: int = Field(1, ge=1)
    alpha: Literal["composite", "reject"] = "composite"
    allowed_formats: list[str] = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]
    workers: int = Field(2, ge=1, description="local processes (executor dask: LocalCluster workers)")
    executor: Literal["local", "dask"] = Field("local", description="local: a process pool here; dask: Dask workers")
    scheduler_address: str | None = Field(None, description="executor dask: scheduler, e.g. tcp://host:8786; "
                                          "null = $DASK_SCHEDULER_ADDRESS, else a LocalCluster of `workers`")
    retries: int = Field(2, ge=0, description="executor dask: resubmissions of a chunk that raised on a worker")
    part_rows: int = Field(20_000, ge=1, description="rows per raw-items parquet part")
    near_dup_max_distance: int = Field(4, ge=0, le=15)
    contact_sheet_items: int = Field(100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _address_with_dask(self) -> IngestConfig:
        return _address_needs_dask(self, "ingest")


class NearDupConfig(_Section):
    """tasks.core.neardup: candidates by a blurred 8x8 descriptor, then aligned cross-correlation (see there)."""
    min_side: int = Field(16, ge=1, description="smaller images are too small for the aligned check")
    phash_max_distance: int = Field(4, ge=0, le=15, description="their check: pHash Hamming distance <= this")
    neighbours: int = Field(5, ge=1, le=64, description="nearest items looked up per item, as it is and mirrored")
    min_candidate_similarity: float = Field(0.75, ge=-1, le=1, description="descriptor cosine floor for a candidate")
    max_shift: int = Field(3, ge=1, le=6, description="largest translation (pixels of the 32x32 thumbnail) tried")
    min_coarse: float = Field(0.85, ge=-1, le=1, description="16x16 pre-check floor")
    min_ncc: float = Field(0.96, ge=-1, le=1, description="aligned cross-correlation floor (shape and light)")
    min_detail: float = Field(0.9, ge=-1, le=1, description="aligned band-pass cross-correlation floor (detail)")


class SplitConfig(_Section):
    seed: int = 0
    fractions: dict[Literal["train", "val", "test"], float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    val_fraction_of_train: float = Field(0.1, gt=0, lt=1, description="used when the source provides the test split")
    honour_source_split: bool = True
    near_duplicates: NearDupConfig = NearDupConfig()
    cross_split_duplicates: Literal["drop_from_train", "move_to_test", "fail"] = "drop_from_train"
    freeze: bool = Field(True, description="keep every id already in the manifest in its split")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        missing = {"train", "val", "test"} - set(self.fractions)
        if missing:
            raise ValueError(f"fractions must give train, val and test; missing {sorted(missing)}")
        if any(v <= 0 for v in self.fractions.values()):
            raise ValueError("every split fraction must be > 0")
        total = sum(self.fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1.0, got {total:g}")
        return self


class ValidateConfig(_Section):
    classes: list[str] | None = Field(None, description="declared class set; null = the labels of the train split")
    min_width: int = Field(8, ge=1)
    min_height: int = Field(8, ge=1)
    max_width: int = Field(4096, ge=1)
    max_height: int = Field(4096, ge=1)
    max_imbalance_ratio: float = Field(1.5, ge=1.0, description="largest/smallest class count; imbalance must be deliberate")
    max_label_distribution_distance: float = Field(
        0.1, ge=0, le=1, description="total-variation distance of val/test label shares from train's")
    sample_ids: int = Field(5, ge=1, description="offending ids shown per failed expectation")


    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateConfig:
        for dim in ("width", "height"):
            lo, hi = getattr(self, f"min_{dim}"), getattr(self, f"max_{dim}")
            if lo > hi:
                raise ValueError(f"min_{dim}={lo} is greater than max_{dim}={hi}")
        return self


class ShardConfig(_Section):
    # not "size": DVC drops keys named size/nfiles from its run-cache key, so a change would be missed
    resolution: int = Field(32, ge=4, description="training resolution (square, pixels)")
    channels: Literal[1, 3] = 3
    resize: Literal["squash", "center_crop"] = "center_crop"
    decode: Literal["scaled", "full"] = Field(
        "scaled", description="scaled: a JPEG at least twice the resolution decodes at 1/2, 1/4 or 1/8 scale "
        "(libjpeg's DCT scaling, Image.draft) before the resize; full: every pixel is decoded first. Recorded in "
        "the shard index and the served model, which decodes the same way")
    row_group_rows: int = Field(1024, ge=1)
    shard_rows: int = Field(16_384, ge=1)
    workers: int = Field(2, ge=1, description="local processes (executor dask: LocalCluster workers)")
    executor: Literal["local", "dask"] = Field("local", description="local: a process pool here; dask: Dask workers")
    scheduler_address: str | None = Field(None, description="executor dask: scheduler, e.g. tcp://host:8786; "
                                          "null = $DASK_SCHEDULER_ADDRESS, else a LocalCluster of `workers`")
    retries: int = Field(2, ge=0, description="executor dask: resubmissions of a batch that raised on a worker")
    alpha_background: tuple[int, int, int] = (255, 255, 255)

    @model_validator(mode="after")
    def _address_with_dask(self) -> ShardConfig:
        return _address_needs_dask(self, "shard")


class TrainConfig(_Section):
    model: str = Field("resnet10t", description="timm model name")
    pretrained: Literal["none", "timm", "checkpoint"] = "none"
    init_checkpoint: str | None = Field(None, description="local checkpoint when pretrained=checkpoint")
    drop_rate: float = Field(0.0, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    small_input_stem: bool = Field(True, description="3x3 stride-1 stem without max-pool for inputs <= 64 px")
    # transfer learning: phase 1 trains the new head with the backbone frozen, phase 2 unfreezes the top blocks
    freeze_backbone_epochs: int = Field(0, ge=0)
    unfreeze_top_blocks: int = Field(0, ge=0, description="0 = all blocks train in phase 2")
    backbone_lr_factor: float = Field(0.1, gt=0, le=1, description="backbone LR = head LR x this (10-100x lower)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(4e-3, gt=0, description="base LR at the reference batch; scaled linearly to the effective batch")
    reference_batch: int = Field(256, ge=1)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(64, ge=1, description="per-device batch")
    effective_batch: int | None = Field(None, description="target global batch; reached with gradient accumulation")
    epochs: int = Field(8, ge=1)
    warmup_steps: int = Field(40, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    lr_floor: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of the scaled base LR")
    grad_clip: float | None = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off)")
    augment: Literal["none", "flip_crop"] = Field("flip_crop", description="on-device random crop (reflect pad) + flip")
    crop_pad: int | None = Field(None, ge=1, description="flip_crop's reflect padding in px: the crop shifts by up to "
                                 "this much (null = an eighth of shard.resolution, at least 1)")
    stem_init: Literal["default", "whiten"] = Field(
        "default", description="whiten: the stem's filters are set to the whitening transform of the first 5,000 "
        "train images' patches and frozen (models with a whitening stem: keel_cifar_net, keel_cifar_net_s)")
    tta: Literal["none", "flip", "flip_translate"] = Field(
        "none", description="test-time augmentation, part of the model: validation (selection), evaluate and the "
        "served model average the logits of these views (flip: 2 forward passes; flip_translate: 6)")
    norm_bias_lr_factor: float = Field(1.0, gt=0, description="LR multiplier for the shifts (biases) of norm "
                                       "layers; airbench uses 64 with BatchNorm's scale fixed. timm's schedulers "
                                       "share one absolute warmup start and floor across groups, so this group "
                                       "ends at the same floor as the others")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="timm ModelEmaV3 decay; validation uses the EMA")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    devices: int = Field(1, ge=1, description="processes per node (torchrun --nproc_per_node)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp replicates the model; fsdp (FSDP2 fully_shard) shards parameters, "
        "gradients and optimiser state across ranks, for models that do not fit one device")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    shuffle_seed: int | None = Field(None, description="data order and augmentation draws; null = seed (set it to "
                                     "vary the shuffle alone, e.g. keel stability)")
    deterministic: bool = True
    early_stopping_patience: int | None = Field(None, ge=1, description="null = run the schedule, keep the best")
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    log_every_steps: int = Field(10, ge=1, description="steps per log line; also how often the step scalars are read "
                                 "back from the device and a SIGTERM is acted on (keep windows well under the "
                                 "grace period of your scheduler)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (smoke runs)")
    data: Literal["auto", "device", "stream"] = Field(
        "auto", description="device: whole split on the device; stream: shards read each epoch by workers")
    loader_workers: int = Field(2, ge=0, description="worker processes of the streaming loader")
    probe_batch: bool = Field(False, description="GPU: replace batch_size by the largest that fits (optimiser "
                              "state not counted: leave headroom)")
    preflight: bool = Field(False, description="run `keel preflight` checks before training; stop if one fails")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.pretrained == "checkpoint" and not self.init_checkpoint:
            raise ValueError("pretrained=checkpoint needs init_checkpoint (a local file)")
        if self.stem_init == "whiten" and self.pretrained != "none":
            raise ValueError(f"stem_init=whiten would overwrite the pretrained={self.pretrained} stem; use one of them")
        if self.strategy == "fsdp":
            clash = [k for k, bad in (("ema_decay", self.ema_decay is not None),
                                      ("freeze_backbone_epochs", self.freeze_backbone_epochs > 0),
                                      ("precision=fp16", self.precision == "fp16")) if bad]
            if clash:
                raise ValueError(f"strategy=fsdp does not support {', '.join(clash)} yet (use strategy=ddp, or bf16 "
                                 "precision instead of fp16)")
        if self.effective_batch is not None and self.effective_batch % (self.batch_size * self.devices):
            raise ValueError(f"effective_batch={self.effective_batch} is not a multiple of batch_size x devices "
                             f"= {self.batch_size * self.devices}; gradient accumulation needs a whole number of steps")
        return self


class EvaluateConfig(_Section):
    second_look: Literal["strict", "warn"] = Field(
        "strict", description="a different model on a test split that was already looked at: strict refuses, "
        "warn proceeds and marks the result 'test set reused, N looks'")
    batch_size: int = Field(512, ge=1)
    calibration_bins: int = Field(15, ge=2, le=100)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    feature_audit: bool = Field(
        True, description="after training, look for test items that are near-duplicates of train items in the "
        "trained model's own penultimate features; report accuracy on all test items and on the others")
    feature_dup_quantile: float = Field(
        0.01, description="the audit's threshold: this quantile of each train item's cosine distance to its nearest "
        "other train item (0 < q < 0.5); about this share of clean test items is flagged by chance")

    @field_validator("feature_dup_quantile")
    @classmethod
    def _quantile_in_range(cls, q: float) -> float:
        if not 0 < q < 0.5:
            raise ValueError(f"must be > 0 and < 0.5 (a low quantile of the train-vs-train nearest-neighbour "
                             f"distances, e.g. 0.01), got {q:g}")
        return q


class RegisterConfig(_Section):
    model_name: str = Field("keel-classifier", min_length=1, description="MLflow registered model name")
    experiment: str = Field("keel", min_length=1)
    min_val_accuracy: float = Field(0.9, ge=0, le=1)
    min_test_accuracy: float = Field(0.9, ge=0, le=1)
    min_test_macro_f1: float = Field(0.9, ge=0, le=1)
    champion_metric: Literal["test_accuracy", "test_macro_f1"] = "test_accuracy"
    min_improvement: float = Field(0.0, ge=0, le=1, description="candidate must beat @champion by at least this "
                                   "(on the same frozen test split; 0 = must be at least as good)")
    allow_reused_test: bool = Field(True, description="false: a result marked 'test set reused' never passes the gate")
    max_image_bytes: int = Field(10_000_000, ge=1, description="serving: larger encoded images are refused")
    max_pixels: int = Field(89_478_485, gt=0, description="serving: decompression-bomb guard")
    retries: int = Field(3, ge=0, description="attempts after the first for registry calls that fail on IO")
    retry_backoff_s: float = Field(1.0, ge=0)


class PreflightConfig(_Section):
    allow_dirty: bool = Field(False, description="pass the reproducibility item with uncommitted changes (listed)")
    subset: int = Field(256, ge=1, description="train items the model must memorise (overfit check)")
    overfit_steps: int = Field(150, ge=1, description="step budget of the overfit check")
    min_busy_fraction: float = Field(0.7, gt=0, le=1, description="device busy share (step / (step + input)) "
                                     "that passes the input-pipeline item")
    busy_goal: float = Field(0.95, gt=0, le=1, description="keel's goal for the device busy share (reported)")
    dry_step: bool = Field(True, description="run one real optimiser step through the training loop and read "
                           "loss, metric, grad norm and LR back from a tracking store")


class ReproduceConfig(_Section):
    val_tolerance: float = Field(0.005, ge=0, le=1, description="|retrained - registered| best val accuracy allowed")
    keep_worktree: bool = Field(False, description="keep the temporary git worktree of the retrain (debugging)")
    timeout_s: int = Field(7200, ge=1, description="limit for the retrain")


class StabilityConfig(_Section):
    reseeds: int = Field(3, ge=2, description="training runs with seeds train.seed + 0..N-1")
    epochs: int | None = Field(None, ge=1, description="epochs per run (cost control); null = train.epochs")
    max_reseed_std: float = Field(0.01, ge=0, description="fragile when the val metric's std over reseeds exceeds "
                                  "this and the spread val-set noise alone exceeds 5% of the time")
    max_variant_drop: float = Field(0.02, ge=0, description="fragile when a perturbation (other shuffle, batch x2 with "
                                    "the LR scaled by the rule, LR x1.1) loses more than this vs the reseed mean")
    max_val_dip: float = Field(0.02, ge=0, description="near-monotonic: a fall of val accuracy between consecutive "
                               "epochs counts when above this and 3 sqrt(2p(1-p)/n_val), what the val set resolves")
    model: str | None = Field(None, description="registered version to tag (models:/<name>@<alias> or /<version>); "
                              "null = models:/<register.model_name>@champion when it exists")


class SweepSpace(_Section):
    """One searched parameter: a range (``low``/``high``, ``log`` for scale parameters such as an LR; integers when
    the parameter is an integer) or a list of ``choices``."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str | int | float | bool] | None = None


class SweepPruning(_Section):
    enabled: bool = True
    startup_trials: int = Field(2, ge=0, description="trials that finish before any is pruned (MedianPruner)")
    warmup_epochs: int = Field(1, ge=0, description="epochs a trial trains before it can be pruned")


class SweepConfig(_Section):
    """``keel sweep`` (flows/sweep.py): an Optuna search on validation; only the best trial is promoted (one test
    read). Checked by tasks.discipline.sweep before any trial runs."""
    study: str = Field("keel-sweep", min_length=1, description="Optuna study name: rerunning resumes it")
    storage: str | None = Field(None, description="Optuna storage URL; null = $KEEL_SWEEP_STORAGE or "
                                "sqlite:///<project>/data/sweeps/optuna.db (the cluster: the team's Postgres)")
    space: dict[str, SweepSpace] = Field(
        default_factory=lambda: {"train.lr": SweepSpace(low=0.001, high=0.01, log=True),
                                 "train.weight_decay": SweepSpace(low=0.01, high=0.2, log=True)},
        description="dotted params key -> its range")
    fixed: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="set in every trial, not searched (e.g. fewer epochs)")
    objective: str = Field("best_val_accuracy", description="a validation metric of paths.train_metrics")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="null: minimize *loss, else maximize")
    n_trials: int = Field(8, description="trials in the study (a resumed sweep counts the finished ones)")
    concurrency: int = Field(2, description="trials at once (local: processes; cluster: GPU jobs)")
    budget_minutes: float | None = Field(120, description="no new trial starts after this; null = no limit")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    pruning: SweepPruning = SweepPruning()


class Params(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    paths: Paths = Paths()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    # "validate" is a BaseModel method name, so the field is stored as validate_ and read from "validate:".
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")  # same reason as validate_
    preflight: PreflightConfig = PreflightConfig()
    reproduce: ReproduceConfig = ReproduceConfig()
    stability: StabilityConfig = StabilityConfig()
    sweep: SweepConfig = SweepConfig()


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (not a setting of this section; check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    # Sections of later stages (train, evaluate, ...) are validated by their own models when they exist.
    known = {f.alias or name for name, f in Params.model_fields.items()}
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        hint = ("; the flow's settings (schedule, retries, nodes) are its arguments, not params: "
                "`python -m flows.pipeline --help`" if "flow" in unknown else "")
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; known sections are {sorted(known)}{hint}")
    try:
        return Params.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None

