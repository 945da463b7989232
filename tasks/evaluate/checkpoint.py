"""The checkpoint under evaluation: load ``best.pt``, check it was trained on the data it is about to be scored on,
rebuild its network with the weights loaded strictly. Every misfit is an ``EvaluateError`` that says what to run."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tasks.core import checkpoint, io
from tasks.evaluate.errors import EvaluateError

PREPROCESSING_FIELDS = ("classes", "resolution", "channels", "mean", "std", "resize", "background")


def load_checkpoint(path: Path) -> dict:


    if not path.exists():
        raise EvaluateError(f"{path}: no best checkpoint; run `keel train` first (or `dvc repro train`)")
    try:
        blob = checkpoint.load(path, what="best checkpoint")
    except checkpoint.UnsafeCheckpointError as exc:
        raise EvaluateError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise EvaluateError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                            "re-run `keel train` (or `dvc checkout` to restore it)") from None
    need = ("model", "index", "run_info")
    if not isinstance(blob, dict) or any(k not in blob for k in need) or not isinstance(blob["model"], dict):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise EvaluateError(f"{path}: not a keel best checkpoint (needs {list(need)}, has {keys}); "
                            "re-run `keel train`")
    if not isinstance(blob["run_info"].get("config"), dict):
        raise EvaluateError(f"{path}: run_info has no training config; re-run `keel train`")
    return blob


def check_data(ckpt: dict, index: io.ShardIndex, ckpt_path: Path, shards_dir: str) -> None:
    """The checkpoint's preprocessing and split must be those of the shards it is about to be scored on."""
    pre = ckpt["index"]
    for name in PREPROCESSING_FIELDS:
        if name not in pre:
            if name in ("resize", "background"):
                continue  # older checkpoints did not record them
            raise EvaluateError(f"{ckpt_path}: preprocessing record lacks {name!r}; re-run `keel train`")
        ours, theirs = pre[name], getattr(index, name)
        if name in ("mean", "std"):
            same = len(ours) == len(theirs) and np.allclose(ours, theirs, rtol=0, atol=1e-6)
        else:
            same = list(ours) == list(theirs) if isinstance(theirs, list) else ours == theirs
        if not same:
            raise EvaluateError(
                f"{ckpt_path} was trained with {name}={ours!r} but the shards at {shards_dir} have "
                f"{name}={theirs!r}; the model does not match this data: re-run `keel train` on these shards "
                "(or restore the matching shards with `dvc checkout`)")
    trained_on = ckpt["run_info"].get("split_manifest_sha256")
    if trained_on is None:
        print(f"evaluate: warning: {ckpt_path} does not record its split manifest; cannot check it was trained "
              "on this split", file=sys.stderr)
    elif trained_on != index.manifest_sha256:
        raise EvaluateError(
            f"{ckpt_path} was trained on split manifest {trained_on[:12]}… but the shards at {shards_dir} come "
            f"from manifest {index.manifest_sha256[:12]}…: the model was trained on a different split, so this "
            "test set may overlap its training data; re-run `keel train` on the current shards")


def build(ckpt: dict, ckpt_path: Path):
    """The network of the checkpoint with its weights loaded strictly; readable errors for a misfit."""
    from pydantic import ValidationError

    from tasks.core.config import TrainConfig
    from tasks.model.build import ModelConfigError, build_model

    config = dict(ckpt["run_info"]["config"])
    name = ckpt.get("model_name") or config.get("model")
    if config.get("model") != name:
        raise EvaluateError(f"{ckpt_path}: inconsistent checkpoint: model_name={name!r} but its training config "
                            f"says model={config.get('model')!r}; re-run `keel train`")
    known = {k: v for k, v in config.items() if k in TrainConfig.model_fields}
    # weights come from the checkpoint: never fetch hub weights or read an init checkpoint here
    known.update(pretrained="none", init_checkpoint=None)
    try:
        cfg = TrainConfig(**known)
        pre = ckpt["index"]
        model, _ = build_model(cfg, num_classes=len(pre["classes"]), in_chans=int(pre["channels"]),
                               resolution=int(pre["resolution"]))
    except (ValidationError, ModelConfigError) as exc:
        raise EvaluateError(f"{ckpt_path}: cannot rebuild model {name!r} from its training config: {exc}") from None
    state = ckpt["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first: {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:3]}")
        raise EvaluateError(f"{ckpt_path}: the weights do not fit model {name!r} ({', '.join(parts)}); the "
                            "checkpoint's weights are not the architecture its config names (wrong or corrupt "
                            "file): re-run `keel train`")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EvaluateError(f"{ckpt_path}: the weights do not load into model {name!r}: {str(exc)[:500]}") from None
    return model, name
