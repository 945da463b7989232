"""``--set key=value`` overrides of params.yaml, applied as ``dvc exp run -S`` applies them (DVC's Hydra override
grammar, comments kept) but validated on a copy first: only a result that ``tasks.core.config.load_params``
accepts replaces params.yaml.  No Prefect here (the CLI checks overrides before Prefect starts; bench imports it)."""
from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from flows.errors import FlowError
from flows.project import PARAMS_FILE


class OverrideError(FlowError):
    """A ``--set`` override that does not apply to params.yaml; the message names the key."""


def _schema_has(key: str) -> bool:
    from tasks.core.config import Params  # the checkout's own schema (use_checkout ran first)

    section, _, rest = key.partition(".")
    fields = {f.alias or name: f for name, f in Params.model_fields.items()}
    if section not in fields:
        return False
    if not rest:
        return True
    model = fields[section].annotation
    sub = rest.split(".")[0]
    return sub in getattr(model, "model_fields", {})


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return []
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        out += _flat_keys(v, key + ".")
    return out


def _lookup(d: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False, None
        d = d[part]
    return True, d


def _check_key(ov: str, current: dict) -> str:
    """The bare key of one override (without Hydra's ``+`` / ``~``); raises OverrideError naming it when it is
    malformed or not in params.yaml (with the closest existing key, or the ``+`` form for a schema default)."""
    key, eq, _ = ov.partition("=")
    key = key.strip()
    if not eq or not key:
        raise OverrideError(f"--set {ov!r}: expected KEY=VALUE, e.g. train.lr=0.002")
    bare = key.lstrip("+~")
    if key.startswith(("+", "~")):
        return bare  # Hydra's add / delete: the result is validated as a whole
    found, _ = _lookup(current, bare)
    if not found:
        if _schema_has(bare):
            raise OverrideError(f"--set {ov}: {bare} is not in {PARAMS_FILE} (it is a setting with its "
                                f"default value); add it with --set +{ov}")
        close = difflib.get_close_matches(bare, _flat_keys(current), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise OverrideError(f"--set {ov}: unknown parameter {bare} (no such key in {PARAMS_FILE}){hint}")
    return bare


def _apply_on_copy(trial: Path, overrides: list[str]) -> None:
    """DVC's own edit of ``trial``, then the schema's verdict on it; either failure is an OverrideError."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    from tasks.core.config import ConfigError, load_params

    try:
        dvc_apply_overrides(str(trial), overrides)
    except Exception as exc:  # noqa: BLE001 - dvc's InvalidArgumentError (Hydra parse/compose errors)
        cause = exc.__cause__ or exc
        raise OverrideError(f"--set {' '.join(overrides)}: {cause}") from None
    try:
        load_params(trial)
    except ConfigError as exc:
        msg = str(exc).replace(str(trial), f"{PARAMS_FILE} (with --set {' '.join(overrides)})")
        raise OverrideError(msg) from None


def apply_overrides(root: Path, overrides: list[str] | None, write: bool = True) -> dict[str, Any]:
    """Apply ``key=value`` overrides to params.yaml as ``dvc exp run -S`` does, validated before anything is
    written; returns {key: value as now in params.yaml}.  ``write=False`` only validates."""
    # "params.yaml:key=value" (dvc's form naming the file) is the same as "key=value"
    overrides = [o.strip().removeprefix(f"{PARAMS_FILE}:") for o in overrides or [] if o and o.strip()]
    if not overrides:
        return {}
    params_path = root / PARAMS_FILE
    current = yaml.safe_load(params_path.read_text()) or {}
    keys = [_check_key(ov, current) for ov in overrides]
    with tempfile.TemporaryDirectory(prefix="keel-params-") as tmp:
        trial = Path(tmp) / PARAMS_FILE
        shutil.copyfile(params_path, trial)
        _apply_on_copy(trial, overrides)
        new = yaml.safe_load(trial.read_text()) or {}
        if write and trial.read_bytes() != params_path.read_bytes():
            # staged beside params.yaml, then renamed: a reader never sees a half-written file
            staged = params_path.with_name(f".{PARAMS_FILE}.flow-tmp")
            shutil.copyfile(trial, staged)
            os.replace(staged, params_path)
    return {k: _lookup(new, k)[1] for k in keys}
