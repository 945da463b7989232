"""last.pt: everything a resume needs (weights, optimiser, scaler, EMA, the callbacks' state, every RNG), written
at each epoch's end and at an agreed stop; read back at the start when its ``resume_key`` (config, data versions,
world size) matches. A killed run (SIGKILL included) resumes from it to the same bits as an uninterrupted one.
steps.csv is written just before it (StepLog.write), so a resume finds the step rows up to its step."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from tasks.core import checkpoint
from tasks.train.callbacks import Callback


def rng_state() -> dict:
    """Every RNG as tensors and plain values, so last.pt loads with torch's safe loader (no pickled objects)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    py, npy = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.cpu() for c in s["cuda"]])


def matching(path: Path, resume_key: str, dist) -> dict | None:
    """last.pt when this run resumes it (the same ``resume_key``: config, data versions, world size), else None.
    Read at set-up, before the tracking run is opened, because the run to log to is the one last.pt names."""
    if not path.exists():
        return None
    ck = checkpoint.load(path, dist.device, what="resume checkpoint (last.pt)")
    if ck.get("resume_key") != resume_key:
        if dist.master:
            print(f"train: {path} is from a different config or data version; starting fresh", file=sys.stderr)
        return None
    return ck


def tracking_run_id(ck: dict | None) -> str | None:
    """The tracking run the checkpointed training logged to (a plain string in ``run_info``), if any."""
    run_id = ((ck or {}).get("run_info") or {}).get("tracking_run_id")
    return run_id if isinstance(run_id, str) and run_id else None


class LastCheckpoint(Callback):
    name = "last_checkpoint"

    def on_fit_start(self, t) -> None:
        if t.resume is not None:  # the matching last.pt, read at set-up
            self.restore(t, t.resume)
            t.resume = None  # its tensors are in the model and optimiser now

    def restore(self, t, ck: dict) -> None:
        t.dist.load_states(t.model, t.opt, ck["model"], ck["optimizer"])
        t.scaler.load_state_dict(ck["scaler"])
        if t.ema is not None and ck.get("ema") is not None:
            t.ema.load_state_dict(ck["ema"])
        t.load_sections(ck)
        set_rng_state(ck["rng"])
        t.state.resumed_from = t.state.step

    def save(self, t) -> None:
        model_sd, opt_sd = t.dist.full_states(t.model, t.opt)  # every rank: FSDP gathers collectively
        if not t.dist.master:
            return
        step_log = next((cb for cb in t.callbacks if cb.name == "step_log"), None)
        if step_log is not None:  # first: a kill between the two leaves rows past last.pt, which a resume drops
            step_log.write(t)
        sections = t.sections()
        t.save(t.last_path, {"model": model_sd, "optimizer": opt_sd, "scaler": t.scaler.state_dict(),
                             "ema": t.ema.state_dict() if t.ema is not None else None,
                             "signals": sections["signals"], "state": sections["state"], "rng": rng_state(),
                             "resume_key": t.resume_key, "index": t.preprocessing, "run_info": t.run_info})

    def on_stop(self, t, reason: str) -> None:
        self.save(t)

    def on_epoch_end(self, t, epoch: int) -> None:
        self.save(t)
