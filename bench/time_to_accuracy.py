"""Time to accuracy on CIFAR-10 jpeg: keel's CIFAR-10 recipe through keel's own stages, and a peer run.

**keel arm.** The recipe (``bench/recipes/cifar10.yaml``, a complete params file) goes through the stages' public
``run()`` functions, exactly what ``dvc repro`` would run:

1. ingest -> split -> validate -> shard on the unpacked ``cifar10-jpeg.tar.gz`` (timed per stage, reported as
   data preparation: a one-off cost, paid again only when the data changes);
2. train (``tasks.train.loop.run``): the timed figure.  The train wall clock includes building the model, moving
   the shards to the device and, with ``train.compile``, compiling.  A clock logger stamps each epoch's
   validation accuracy, so the curve of validation accuracy against seconds is in the JSON;
3. evaluate (``tasks.evaluate.run``): the **one** read of the test split, of the best-validation checkpoint.

The test accuracy is measured once, at the end, on the dataset's own ``test/`` folder; validation (drawn from
``train/`` by the split stage) is what selects the checkpoint.  ``--target`` (default 0.907: airbench94's test
accuracy on this jpeg set, per the issue) is reported against both: whether the test accuracy reached it, and
the seconds until validation accuracy first reached it.

**peer arm** (``--peer``, on by default): what a plain PyTorch script does with the same files.  A ``Dataset``
over the same train / val / test JPEG files as keel's split manifest (joined to ``source_uri`` through the raw
items), PIL decode and the same augmentation (reflect-pad crop + flip) in the DataLoader's worker processes, the
same timm model built the same way, the same optimiser, learning-rate rule, timm scheduler, label smoothing,
precision and ``channels_last``.  It keeps the last epoch (no checkpoint selection) and reads the test files
once.  timm's own ``train.py`` is not in the pip package, so this stands in for it.

Both arms report train seconds, images per second, seconds per epoch, best validation accuracy and test
accuracy; ``keel / peer`` train time is the ratio.  ``--set SECTION.KEY=VALUE`` overrides the recipe (YAML
values), e.g. ``--set train.epochs=2 --set train.compile=false``.  On a CPU the recipe's ``compile`` is turned off
unless ``--set train.compile=true`` is given (compiling costs more than it saves there).

    python bench/time_to_accuracy.py --workdir /tmp/keel-tta                       # the full recipe
    python bench/time_to_accuracy.py --workdir /tmp/keel-tta --set train.epochs=2  # a shorter CPU run
    python bench/time_to_accuracy.py --smoke --out /tmp/x.json                     # CI: tiny synthetic set

Imports: torch, timm, numpy, pyarrow, Pillow, and keel's stages (pydantic, PyYAML, Great Expectations for
validate).  Tracking is off (``KEEL_TRACKING=off``): nothing is sent to MLflow.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/time_to_accuracy.py` from anywhere, without installing keel
    sys.path.insert(0, str(REPO))

os.environ.setdefault("KEEL_TRACKING", "off")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import torch
import yaml

from tasks.train.logger import NullLogger

DEFAULT_TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
DEFAULT_RECIPE = REPO / "bench" / "recipes" / "cifar10.yaml"
SMOKE_SETS = ["train.model=keel_cifar_net_s", "train.epochs=2", "train.batch_size=32", "train.reference_batch=32",
              "train.warmup_steps=2", "train.compile=false", "train.log_every_steps=2", "validate.max_imbalance_ratio=3",
              "validate.max_label_distribution_distance=1.0", "evaluate.batch_size=64"]
SMOKE_PER_CLASS = (40, 8)  # train/ and test/ images per class


# ---------------------------------------------------------------- data
def unpack(tarball: Path, dest: Path) -> tuple[Path, float]:
    root = dest / "cifar10"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root, 0.0
    if not tarball.exists():
        raise SystemExit(f"time_to_accuracy: {tarball} not found (pass --tarball, or --smoke for a synthetic set)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".unpack-"))
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    os.replace(tmp / "cifar10", root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root, time.perf_counter() - t0


def synth_dataset(dest: Path, classes: int = 10, seed: int = 0) -> Path:
    """A learnable toy CIFAR: each class is a colour with noise, 32x32 JPEGs in train/<class>/ and test/<class>/."""
    from PIL import Image

    root = dest / "synth-cifar"
    if (root / "test").is_dir():
        return root
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (classes, 3))
    for split, per_class in zip(("train", "test"), SMOKE_PER_CLASS):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(colours[c] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    return root


def load_recipe(recipe: Path, sets: list[str], source: Path, work: Path, device: str) -> tuple[dict, object]:
    """The recipe with overrides, written to ``work/params.yaml`` and validated by keel's own loader."""
    from tasks.core.config import load_params

    raw = yaml.safe_load(recipe.read_text())
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"time_to_accuracy: --set {s!r}: expected SECTION.KEY=VALUE")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    raw["ingest"]["source"] = str(source)
    raw["paths"] = {k: str(work / v) for k, v in raw["paths"].items()}
    if device != "auto":
        raw["train"]["device"] = device
        raw.setdefault("evaluate", {})["device"] = device
    cuda = torch.cuda.is_available() and device != "cpu"
    if not cuda and not any(s.startswith("train.compile=") for s in sets):
        raw["train"]["compile"] = False
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw, load_params(path)


# ---------------------------------------------------------------- keel arm
class EpochClock(NullLogger):
    """A train-loop logger that stamps every validation result with the seconds since training started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.curve: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "val_accuracy" in metrics:
            self.curve.append({"seconds": round(time.perf_counter() - self.t0, 3), "step": step,
                               "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"],
                               **({"val_accuracy_single_view": metrics["val_accuracy_single_view"]}
                                  if "val_accuracy_single_view" in metrics else {})})


def keel_arm(params, target: float) -> dict:
    from tasks import evaluate, ingest, shard, split, validate
    from tasks.train import loop

    paths, prep = params.paths, {}
    for name, fn in (("ingest", lambda: ingest.run(params.ingest, paths)),
                     ("split", lambda: split.run(params.split, paths)),
                     ("validate", lambda: validate.run(params.validate_, paths)),
                     ("shard", lambda: shard.run(params.shard, paths))):
        t = time.perf_counter()
        res = fn()
        prep[name] = round(time.perf_counter() - t, 3)
        if name == "validate" and not res.success:
            raise RuntimeError(f"validate failed: {paths.validate_dir}/summary.json")
    clock = EpochClock()
    t = time.perf_counter()
    result = loop.run(params.train, paths, logger=clock)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate.run(params.evaluate, paths)
    eval_s = time.perf_counter() - t
    run_info = torch.load(Path(paths.models_dir) / "best.pt", map_location="cpu", weights_only=True)["run_info"]
    n_train = _rows(paths.shards_dir, "train")
    steps_per_epoch = max(1, result.steps // max(1, result.epochs_run))
    epoch_s = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + clock.curve, clock.curve)]
    hit = next((c["seconds"] for c in clock.curve if c["val_accuracy"] >= target), None)
    return {"data_prep_s": prep, "data_prep_total_s": round(sum(prep.values()), 3),
            "train_s": round(train_s, 3), "evaluate_s": round(eval_s, 3),
            "epochs": result.epochs_run, "steps": result.steps, "steps_per_epoch": steps_per_epoch,
            "train_images": n_train, "images_per_s": round(n_train * result.epochs_run / train_s, 1),
            "first_epoch_s": round(epoch_s[0], 3) if epoch_s else None,
            "later_epoch_mean_s": round(float(np.mean(epoch_s[1:])), 3) if len(epoch_s) > 1 else None,
            "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "val_curve": clock.curve, "seconds_to_target_val": hit,
            "test_accuracy": ev.accuracy, "test_macro_f1": ev.macro_f1, "test_reads": ev.looks,
            "test_decision": ev.decision, "precision": run_info["precision"], "data_mode": run_info["data_mode"],
            "tta": run_info["config"].get("tta", "none")}


def _rows(shards_dir: str, split: str) -> int:
    from tasks.core import io

    return io.ShardIndex.load(shards_dir).rows(split)


# ---------------------------------------------------------------- peer arm
def split_files(paths, source: Path) -> dict[str, list[tuple[str, int]]]:
    """(file, class index) per split: keel's split manifest joined to the raw items' source paths."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from tasks.core import io

    classes = io.ShardIndex.load(paths.shards_dir).classes
    uri = dict(zip(*ds.dataset(paths.raw_items).to_table(columns=["id", "source_uri"]).to_pydict().values()))
    m = pq.read_table(paths.split_manifest, columns=["id", "label", "split"]).to_pydict()
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for i, label, sp in zip(m["id"], m["label"], m["split"]):
        if sp in out:
            out[sp].append((str(source / uri[i]), classes.index(label)))
    return out


class JpegFiles(torch.utils.data.Dataset):
    """PIL decode, optional reflect-pad crop + flip, uint8 CHW: the per-sample CPU pipeline of a plain script."""

    def __init__(self, items: list[tuple[str, int]], augment: bool, pad: int):
        self.items, self.augment, self.pad = items, augment, pad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if self.augment:
            p = self.pad
            xp = np.pad(x, ((p, p), (p, p), (0, 0)), mode="reflect")
            dy, dx = np.random.randint(0, 2 * p + 1, 2)
            x = xp[dy:dy + x.shape[0], dx:dx + x.shape[1]]
            if np.random.rand() < 0.5:
                x = x[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), label


def _seed_worker(worker_id: int) -> None:
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


def peer_arm(params, files: dict, workers: int, target: float) -> dict:
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler

    from tasks.core import io
    from tasks.model.build import WHITEN_IMAGES, build_model
    from tasks.model.views import tta_logits

    cfg = params.train
    torch.manual_seed(cfg.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    index = io.ShardIndex.load(params.paths.shards_dir)
    pad = cfg.crop_pad or max(1, index.resolution // 8)
    mean = torch.tensor(index.mean, device=dev).view(1, -1, 1, 1) * 255
    std = torch.tensor(index.std, device=dev).view(1, -1, 1, 1) * 255
    t_start = time.perf_counter()
    model, _ = build_model(cfg, len(index.classes), index.channels, index.resolution)
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.stem_init == "whiten":  # the recipe's model: its stem from the first train images, as keel's train does
        first = torch.stack([JpegFiles(files["train"], False, pad)[i][0] for i in range(min(WHITEN_IMAGES,
                                                                                            len(files["train"])))])
        model.whiten_stem((first.to(dev).float() - mean) / std)
    norm_bias = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                 and m.bias is not None and cfg.norm_bias_lr_factor != 1.0}
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and id(p) not in norm_bias]
    lr = cfg.lr * cfg.batch_size / cfg.reference_batch
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if norm_bias:
        groups.append({"params": [p for p in model.parameters() if id(p) in norm_bias], "weight_decay": 0.0,
                       "lr": lr * cfg.norm_bias_lr_factor})
    opt = (torch.optim.AdamW(groups, lr=lr) if cfg.optimizer == "adamw"
           else torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True))
    loader_kw = {"num_workers": workers, "pin_memory": dev.type == "cuda", "persistent_workers": workers > 0,
                 "worker_init_fn": _seed_worker}
    if workers:
        loader_kw["prefetch_factor"] = 4
    train = torch.utils.data.DataLoader(JpegFiles(files["train"], True, pad), batch_size=cfg.batch_size,
                                        shuffle=True, drop_last=True, **loader_kw)
    total = cfg.epochs * len(train)
    floor = cfg.lr_floor * lr
    sched_cls, extra = (CosineLRScheduler, {}) if cfg.schedule == "cosine" else (PolyLRScheduler, {"power": 1.0})
    sched = sched_cls(opt, t_initial=total, lr_min=floor, warmup_t=cfg.warmup_steps, warmup_lr_init=floor * 0.1,
                      t_in_epochs=False, **extra)
    amp = torch.bfloat16 if dev.type == "cuda" and cfg.precision in ("auto", "bf16") else None
    net = torch.compile(model) if cfg.compile else model
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def prep(x):
        x = (x.to(dev, non_blocking=True).float() - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    def accuracy(items) -> float:
        loader = torch.utils.data.DataLoader(JpegFiles(items, False, pad), batch_size=1024, num_workers=workers,
                                             pin_memory=dev.type == "cuda")
        model.eval()
        right = n = 0
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            for x, y in loader:
                right += int((tta_logits(net, prep(x), cfg.tta)[0].argmax(1).cpu() == y).sum())
                n += len(y)
        return right / max(n, 1)

    curve, step = [], 0
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        for x, y in train:
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(net(prep(x)).float(), y.to(dev, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
        curve.append({"seconds": round(time.perf_counter() - t_train, 3), "step": step,
                      "val_accuracy": accuracy(files["val"])})
    train_s = time.perf_counter() - t_start
    epoch_s = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + curve, curve)]
    test_acc = accuracy(files["test"])  # once, the last epoch's model
    return {"train_s": round(train_s, 3), "epochs": cfg.epochs, "steps": step, "loader_workers": workers,
            "images_per_s": round(len(train) * cfg.batch_size * cfg.epochs / train_s, 1),
            "first_epoch_s": round(epoch_s[0], 3) if epoch_s else None,
            "later_epoch_mean_s": round(float(np.mean(epoch_s[1:])), 3) if len(epoch_s) > 1 else None,
            "best_val_accuracy": max((c["val_accuracy"] for c in curve), default=None),
            "last_val_accuracy": curve[-1]["val_accuracy"] if curve else None, "val_curve": curve,
            "seconds_to_target_val": next((c["seconds"] for c in curve if c["val_accuracy"] >= target), None),
            "test_accuracy": test_acc, "precision": "bf16" if amp is not None else "fp32"}


# ---------------------------------------------------------------- report
def table(res: dict) -> str:
    rows = [("arm", "train s", "img/s", "epoch 1 s", "later epoch s", "best val", "test acc", "s to val target")]
    for arm in ("keel", "peer"):
        r = res.get(arm)
        if not isinstance(r, dict) or "train_s" not in r:
            continue
        rows.append((arm, f"{r['train_s']:.1f}", f"{r['images_per_s']:.0f}", _f(r.get("first_epoch_s")),
                     _f(r.get("later_epoch_mean_s")), _f(r.get("best_val_accuracy"), 4), _f(r.get("test_accuracy"), 4),
                     _f(r.get("seconds_to_target_val"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "keel_over_peer_train_time" in res:
        lines.append(f"keel / peer train time: {res['keel_over_peer_train_time']:.3f}")
    return "\n".join(lines)


def _f(v, nd: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    ap.add_argument("--workdir", type=Path, help="cache for the unpacked set and the runs (default: a temp dir)")
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--target", type=float, default=0.907, help="accuracy to reach (airbench94 on this set)")
    ap.add_argument("--no-peer", dest="peer", action="store_false")
    ap.add_argument("--peer-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic set, small model, 2 epochs (CI)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args(argv)

    base = args.workdir or Path(tempfile.mkdtemp(prefix="keel-tta-"))
    base.mkdir(parents=True, exist_ok=True)
    res: dict = {"bench": "time_to_accuracy", "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                 "smoke": args.smoke, "target": args.target}
    try:
        from bench.train_throughput import git_info, machine_info

        res["machine"] = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        res["code"] = git_info()
        if args.smoke:
            source, res["unpack_s"] = synth_dataset(base), 0.0
            sets = SMOKE_SETS + args.sets
        else:
            source, res["unpack_s"] = unpack(args.tarball, base)
            sets = args.sets
        work = base / ("run-smoke" if args.smoke else "run")
        shutil.rmtree(work, ignore_errors=True)  # a fresh split, shards, ledger and model every time
        work.mkdir(parents=True)
        raw, params = load_recipe(args.recipe, sets, source, work, args.device)
        res["recipe"] = str(args.recipe.relative_to(REPO) if args.recipe.is_relative_to(REPO) else args.recipe)
        res["overrides"], res["train_config"] = sets, raw["train"]
        res["keel"] = keel_arm(params, args.target)
        if args.peer:
            res["peer"] = peer_arm(params, split_files(params.paths, source), args.peer_workers, args.target)
            res["keel_over_peer_train_time"] = round(res["keel"]["train_s"] / res["peer"]["train_s"], 4)
        rc = 0
    except Exception as exc:  # noqa: BLE001  (the JSON still records how far it got)
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        print(res["traceback"], file=sys.stderr)
        rc = 1
    out = args.out or REPO / "bench" / "out" / f"time_to_accuracy{'-smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, out)
    print(table(res))
    print(f"wrote {out}")
    if not args.keep and not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
