"""Typed configuration: one pydantic model per stage section of params.yaml.

Each stage receives only its own section plus the shared ``paths`` (every output path is declared once,
in ``params.yaml:paths``, and templated into ``dvc.yaml``).  Unknown keys are errors, and every error names
the file and the dotted key, so a typo in params.yaml never silently falls back to a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(Exception):
    """A params file that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    raw_items: str = "data/raw/items"
    rejects: str = "data/raw/rejects.parquet"
    audit_dir: str = "reports/audit"
    split_manifest: str = "data/split/manifest.parquet"
    leakage_report: str = "reports/leakage.json"
    validate_dir: str = "reports/validate"
    shards_dir: str = "data/shards"


class IngestConfig(_Section):
    source: str = Field("builtin:digits", description="builtin:digits | a folder | a .csv/.parquet manifest | s3://bucket/prefix")
    root: str | None = Field(None, description="data root that manifest paths resolve against (default: the manifest's folder)")
    classes: list[str] | None = Field(None, description="declared class set; labels outside it are rejected")
    s3_endpoint: str | None = None
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard (PIL's default)")
    min_side: int = Field(1, ge=1)
    alpha: Literal["composite", "reject"] = "composite"
    allowed_formats: list[str] = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]
    workers: int = Field(2, ge=1)
    part_rows: int = Field(20_000, ge=1, description="rows per raw-items parquet part")
    near_dup_max_distance: int = Field(4, ge=0, le=15)
    contact_sheet_items: int = Field(100, ge=1)
    seed: int = 0


class SplitConfig(_Section):
    seed: int = 0
    fractions: dict[Literal["train", "val", "test"], float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    val_fraction_of_train: float = Field(0.1, gt=0, lt=1, description="used when the source provides the test split")
    honour_source_split: bool = True
    near_dup_max_distance: int = Field(4, ge=0, le=15, description="pHash Hamming distance <= this is a near duplicate")
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
    min_width: int = Field(1, ge=1)
    min_height: int = Field(1, ge=1)
    max_width: int = Field(10_000, ge=1)
    max_height: int = Field(10_000, ge=1)
    max_imbalance_ratio: float = Field(3.0, ge=1.0, description="largest/smallest class count; imbalance must be deliberate")
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
    row_group_rows: int = Field(1024, ge=1)
    shard_rows: int = Field(16_384, ge=1)
    workers: int = Field(2, ge=1)
    alpha_background: tuple[int, int, int] = (255, 255, 255)


class Params(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    paths: Paths = Paths()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    # "validate" is a BaseModel method name, so the field is stored as validate_ and read from "validate:".
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    shard: ShardConfig = ShardConfig()


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
    extra = {k: v for k, v in raw.items() if k not in known}
    unknown = sorted(k for k in extra if k not in FUTURE_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; known sections are {sorted(known | FUTURE_SECTIONS)}")
    try:
        return Params.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None


# Sections owned by stages that land in later issues; tolerated here, validated by their stage.
FUTURE_SECTIONS = {"train", "evaluate", "register", "preflight", "stability", "reproduce", "flow"}
