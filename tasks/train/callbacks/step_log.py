"""The per-step rows (steps.csv, the tracking metrics): loss, LR, grad norm and the window's throughput, every
``log_every_steps`` and at the last step.

The rows are part of last.pt (``state["step_rows"]``): a resume starts from the rows up to and including its step
(any after it were logged, then lost with the kill) and appends its own, so steps.csv then has the steps and
values of an uninterrupted run (its timing columns are this process's), even where DVC removed reports/train
before the rerun. steps.csv itself is written (atomically, rank 0) at the end of the run and, before each last.pt,
by LastCheckpoint (``write``), so a killed run leaves the rows up to its last checkpoint for a person to read. A
last.pt from before the rows were kept: the rows come from that steps.csv, if it is there and readable; else the
file starts at the resume, and the console says so.

fp16: a step the GradScaler skipped has an inf/NaN grad norm by design (the overflow it absorbed), so a skipped
log step carries no ``grad_norm``; ``skipped_steps`` counts the window's skipped steps instead (fp16 runs only)."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from tasks.core import io
from tasks.train.callbacks import Callback

COLUMNS = ("step", "train_loss", "lr", "grad_norm", "images_per_s", "data_wait_fraction")  # + skipped_steps (fp16)
INTS = ("step", "skipped_steps")


def csv_text(rows: list[dict]) -> str:
    """steps.csv as tasks.train.outputs writes it at the end of the run."""
    cols = [*COLUMNS, *(["skipped_steps"] if any("skipped_steps" in r for r in rows) else [])]
    return "\n".join([",".join(cols), *(",".join(f"{r.get(c, '')}" for c in cols) for r in rows)]) + "\n"


def read_rows(path: Path, upto: int) -> list[dict]:
    """The rows of ``path`` up to and including step ``upto``, typed as logged (floats round-trip exactly); an
    empty cell is a value that was not logged (a skipped step's grad norm). Raises OSError/ValueError/csv.Error."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames or "train_loss" not in reader.fieldnames:
            raise ValueError(f"no step/train_loss header (header: {reader.fieldnames})")
        rows = []
        for raw in reader:
            if None in raw or any(v is None for v in raw.values()):
                raise ValueError(f"line {reader.line_num} does not match the header")
            row = {k: (int(v) if k in INTS else float(v)) for k, v in raw.items() if v != ""}
            if "step" not in row:
                raise ValueError(f"line {reader.line_num} has no step")
            if row["step"] <= upto:
                rows.append(row)
    return rows


class StepLog(Callback):
    name = "step_log"
    checkpoint_key = "state"

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.rows: list[dict] = []
        self.skipped = 0  # skipped steps in the current log window
        self._restored: list[dict] | None = None  # last.pt's rows (None: a last.pt without them)

    def state_dict(self) -> dict:
        return {"step_rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, d: dict) -> None:
        rows = d.get("step_rows")
        self._restored = None if rows is None else [dict(r) for r in rows]

    def on_fit_start(self, t) -> None:
        resumed = t.state.resumed_from  # set by LastCheckpoint, which fires first
        if not resumed or not t.dist.master:
            return
        if self._restored is not None:
            self.rows = [r for r in self._restored if r["step"] <= resumed]
            return
        path = Path(t.paths.train_plots_dir) / "steps.csv"
        try:
            self.rows = read_rows(path, resumed)
        except FileNotFoundError:
            print(f"train: no {path} from the interrupted run; steps.csv starts at the resume (step {resumed})",
                  file=sys.stderr)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
            print(f"train: {path} is unreadable ({type(exc).__name__}: {exc}); steps.csv starts at the resume "
                  f"(step {resumed})", file=sys.stderr)

    def write(self, t) -> None:
        """steps.csv as it stands (rank 0; LastCheckpoint calls it before writing last.pt)."""
        io.write_text(Path(t.paths.train_plots_dir) / "steps.csv", csv_text(self.rows))

    def on_step_values(self, t, v) -> None:
        self.skipped += bool(v.skipped)
        if not t.plan.is_log_step(v.step, self.log_every):
            return
        w = t.window
        now = time.perf_counter()
        rec = {"train_loss": v.loss, "lr": v.lr, **({} if v.skipped else {"grad_norm": v.grad_norm}),
               **({"skipped_steps": self.skipped} if v.skipped is not None else {}),
               "images_per_s": w.imgs / max(now - w.t, 1e-9),
               "data_wait_fraction": w.wait / max(w.wait + w.busy, 1e-9)}
        t.logger.log_metrics(rec, v.step)
        self.rows.append({"step": v.step, **rec})
        self.skipped = 0
        w.reset(now)
