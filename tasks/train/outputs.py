"""The train stage's files: steps/epochs CSV (DVC plots), metrics/train.json (DVC metrics), curves.png."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tasks.core import io, text
from tasks.core.config import Paths


def write(paths: Paths, state: dict, run_info: dict, step_log: list[dict], halted: str | None) -> None:
    plots = Path(paths.train_plots_dir)
    skips = any("skipped_steps" in r for r in step_log)  # fp16: steps the loss scaler skipped (no grad norm)
    io.write_text(plots / "steps.csv", _csv(step_log, ["step", "train_loss", "lr", "grad_norm", "images_per_s",
                                                        "data_wait_fraction"] + (["skipped_steps"] if skips else [])))
    single = any("val_accuracy_single_view" in r for r in state["history"])  # train.tta: the views' gain
    io.write_text(plots / "epochs.csv", _csv(state["history"], ["epoch", "step", "train_loss", "val_loss",
                                                                  "val_accuracy"]
                                             + (["val_accuracy_single_view"] if single else [])))
    waits = [r["data_wait_fraction"] for r in step_log]
    speeds = [r["images_per_s"] for r in step_log]
    io.write_json(paths.train_metrics, {
        "best_val_accuracy": state["best_val_accuracy"], "best_val_loss": state["best_val_loss"],
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "steps": state["step"],
        "stopped_early": state["stopped_early"], "halted": halted,
        "scaled_lr": run_info["scaled_lr"], "effective_batch": run_info["effective_batch"],
        "data_wait_fraction": float(np.median(waits)) if waits else None,
        "images_per_s": float(np.median(speeds)) if speeds else None,
    })
    _plot(plots / "curves.png", step_log, state["history"])


def _csv(rows: list[dict], cols: list[str]) -> str:
    lines = [",".join(cols)]
    lines += [",".join(f"{r.get(c, '')}" for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def _plot(path: Path, steps: list[dict], epochs: list[dict]) -> None:
    try:
        plt = text.pyplot()
    except ImportError:  # e.g. a GPU node with torch + timm + pyarrow only: the CSVs carry the same curves
        print("train: matplotlib not installed; skipping curves.png (steps.csv/epochs.csv are written)",
              file=sys.stderr)
        return
    fig, ax = plt.subplots(2, 2, figsize=(10, 6))
    s = [r["step"] for r in steps]
    ax[0, 0].plot(s, [r["train_loss"] for r in steps], label="train (step)")
    ax[0, 0].plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="val (epoch)")
    ax[0, 0].set_title("loss")
    ax[0, 0].legend()
    single = any("val_accuracy_single_view" in r for r in epochs)  # train.tta on: both curves
    ax[0, 1].plot([r["step"] for r in epochs], [r["val_accuracy"] for r in epochs], "o-",
                  label="test-time views" if single else None)
    if single:
        ax[0, 1].plot([r["step"] for r in epochs], [r.get("val_accuracy_single_view") for r in epochs], "s--",
                      label="single view")
        ax[0, 1].legend()
    ax[0, 1].set_title("val accuracy")
    ax[1, 0].plot(s, [r["lr"] for r in steps])
    ax[1, 0].set_title("learning rate")
    ax[1, 1].plot(s, [r.get("grad_norm", np.nan) for r in steps])  # a skipped fp16 step has none
    ax[1, 1].set_title("grad norm (before clipping)")
    for a in ax.ravel():
        a.set_xlabel("step")
    fig.tight_layout()
    text.save_png(path, fig, dpi=90)
