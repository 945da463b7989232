"""Benchmark of keel's training stage: the real loop's throughput against the same model's compute ceiling.

For one model, resolution, batch and precision it measures

* **real**: ``tasks.train.loop.run(TrainConfig(..., max_steps=K, log_every_steps=L), paths)`` on a shard set,
  read back from the ``steps.csv`` the loop writes (``images_per_s`` and ``data_wait_fraction`` per window of L
  steps); the first window is warm-up and is dropped;
* **ceiling**: the same model (built the same way), precision, channels_last, batch and optimizer trained for K
  steps on one synthetic batch that is already on the device: forward, loss, backward, optimizer step. No data
  pipeline, no gradient clipping, no host syncs inside the timed steps, no logging. Warm-up steps are not timed.

and reports ``real / ceiling`` and the loop's data-wait fraction. The shard set is either ``--shards DIR`` (what
``keel shard`` wrote) or ``--synth-shards N RES``: N random uint8 images of RES x RES written in the tasks.core.io
layout (index.json + train/val parquet shards with checksums), so a large-resolution run needs no dataset.

    python bench/train_throughput.py --shards data/shards --model resnet18 --batch-size 64 --steps 30
    python bench/train_throughput.py --synth-shards 16384 224 --model resnet50 --batch-size 256 --steps 60 \\
        --log-every 10 --device cuda --precision bf16 --channels-last
    python bench/train_throughput.py --smoke --out /tmp/x.json            # CI: tiny, seconds

Imports: torch, timm, numpy, pyarrow and ``tasks.core.io``. The real loop also needs what ``tasks.train.loop`` imports
(``tasks.core.config``: pydantic and PyYAML; matplotlib only for curves.png, skipped without it). Where those are
missing the ceiling is still measured and the real run is recorded as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/train_throughput.py` from anywhere, without installing keel
    sys.path.insert(0, str(REPO))

os.environ.setdefault("KEEL_TRACKING", "off")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import torch
import torch.nn.functional as F

from tasks.core import io  # numpy + pyarrow only

SMOKE = {"model": "resnet10t", "synth": (256, 32), "batch_size": 16, "steps": 5, "log_every": 1}
SYNTH_CLASSES = 10


# ---------------------------------------------------------------- synthetic shards
def write_synthetic_shards(root: Path, n_train: int, resolution: int, channels: int = 3,
                           classes: int = SYNTH_CLASSES, seed: int = 0, shard_rows: int = 16_384,
                           row_group_rows: int = 1024) -> dict:
    """N random uint8 images (+ N/10 for val) in the layout tasks.core.io.ShardReader reads; returns a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    width = resolution * resolution * channels
    schema = pa.schema([("id", pa.string()), ("label", pa.int16()), ("image", pa.binary(width))])
    splits: dict[str, list[io.ShardFile]] = {}
    n_val = max(classes, n_train // 10)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        files = []
        for k, start in enumerate(range(0, n, shard_rows)):
            rows = min(shard_rows, n - start)
            name = f"{split}/shard-{k:05d}.parquet"
            with pq.ParquetWriter(root / name, schema, compression="zstd") as w:
                for g in range(0, rows, row_group_rows):
                    m = min(row_group_rows, rows - g)
                    images = rng.integers(0, 256, size=m * width, dtype=np.uint8)
                    labels = rng.integers(0, classes, size=m).astype(np.int16)
                    ids = [f"{split}-{start + g + i:09d}" for i in range(m)]
                    flat = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), m, [None, pa.py_buffer(images)])
                    w.write_table(pa.table([pa.array(ids, pa.string()), pa.array(labels, pa.int16()), flat],
                                           schema=schema), row_group_size=row_group_rows)
            path = root / name
            files.append(io.ShardFile(name, rows, path.stat().st_size, io.sha256_file(path)))
        splits[split] = files
    # uniform uint8 noise: mean 127.5/255, std ~73.9/255 on the 0..1 scale
    index = io.ShardIndex(classes=[f"class{i:02d}" for i in range(classes)], resolution=resolution,
                          channels=channels, mean=[0.5] * channels, std=[0.29] * channels,
                          manifest_sha256="synthetic", splits=splits)
    io.write_json(root / "index.json", index.to_json())
    return {"train": n_train, "val": n_val, "resolution": resolution, "channels": channels, "classes": classes,
            "bytes": sum(f.bytes for fs in splits.values() for f in fs),
            "write_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------- other processes on the machine
def _busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat (no psutil needed)."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal ...
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / tick, (f[7] if len(f) > 7 else 0) / tick


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Contention:
    """Cores used by *other* processes (machine busy time minus ours) and hypervisor steal over a block."""

    def __enter__(self) -> Self:
        self.t, (self.busy, self.steal), self.own = time.perf_counter(), _busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.perf_counter() - self.t, 1e-9)
        busy, steal = _busy_s()
        own = _own_cpu_s() - self.own
        self.record = {"own_cores": round(own / wall, 2),
                       "other_processes_cores": round(max(0.0, busy - self.busy - own) / wall, 2),
                       "steal_cores": round((steal - self.steal) / wall, 2)}


def wait_for_idle(limit_s: float, quiet_cores: float = 0.15, window_s: float = 5.0) -> dict:
    """Wait (up to limit_s) until other processes use under ``quiet_cores`` cores over a window."""
    t0 = time.perf_counter()
    while True:
        with Contention() as c:
            time.sleep(window_s)
        other = c.record["other_processes_cores"]
        waited = time.perf_counter() - t0
        if other < quiet_cores or waited >= limit_s:
            state = "idle" if other < quiet_cores else "still busy"
            print(f"bench: machine {state} after {waited:.0f} s (other processes used {other:.2f} cores)", flush=True)
            return {"state": state, "waited_s": round(waited, 1), "other_processes_cores": other}


# ---------------------------------------------------------------- the ceiling
def _resolve_device(want: str) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0) \
        if want == "cuda" else torch.device("cpu")


def _resolve_precision(want: str, device: torch.device) -> str:
    from tasks.core.runtime import precision  # torch only (no pydantic): importable on the GPU machine

    return precision(want, device)


def build_model(args, classes: int, channels: int, resolution: int) -> tuple[torch.nn.Module, str]:
    """keel's own builder when tasks.core.config imports; otherwise the same timm call and small-input stem."""
    try:
        from tasks.core.config import TrainConfig
        from tasks.model import build as tmodel
    except ImportError as exc:
        import timm

        model = timm.create_model(args.model, pretrained=False, num_classes=classes, in_chans=channels)
        if resolution <= 64 and isinstance(getattr(model, "conv1", None), torch.nn.Conv2d) \
                and hasattr(model, "maxpool"):
            model.conv1 = torch.nn.Conv2d(channels, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = torch.nn.Identity()
        return model, f"bench copy of tasks.model.build.build_model ({exc})"
    model, _ = tmodel.build_model(TrainConfig(model=args.model), classes, channels, resolution)
    return model, "tasks.model.build.build_model"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceiling(args, index: io.ShardIndex, device: torch.device, precision: str) -> dict:
    """K optimizer steps of the same model on one normalised batch already on the device."""
    torch.manual_seed(args.seed)
    # the same global switches tasks.core.runtime.seed_everything sets (it never turns cudnn.benchmark on)
    torch.use_deterministic_algorithms(args.deterministic)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    model, built_by = build_model(args, len(index.classes), index.channels, index.resolution)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    lr = 2e-3 * args.batch_size / 256
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.05)
    net = torch.compile(model) if args.compile else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    shape = (args.batch_size, index.channels, index.resolution, index.resolution)
    x = torch.randn(shape, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(index.classes), (args.batch_size,), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.ceiling_warmup):
        step()
    _sync(device)
    with Contention() as cont:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        _sync(device)
        wall = time.perf_counter() - t0
    final_loss = float(loss.detach())
    images = args.steps * args.batch_size
    return {"status": "ok", "steps": args.steps, "warmup_steps": args.ceiling_warmup, "images": images,
            "wall_s": round(wall, 4), "images_per_s": images / wall, "ms_per_step": 1000 * wall / args.steps,
            "model_built_by": built_by, "final_loss": final_loss, **cont.record,
            "what": "forward (autocast) + cross-entropy + backward + optimizer step + zero_grad on one "
                    "pre-made normalised batch on the device; no data pipeline, no grad clipping, no per-step "
                    "host sync; cudnn.benchmark off and determinism as the loop sets them"}


# ---------------------------------------------------------------- the real loop
def read_windows(steps_csv: Path, batch_size: int) -> list[dict]:
    rows = list(csv.DictReader(steps_csv.open()))
    out, prev = [], 0
    for r in rows:
        step = int(r["step"])
        ips, wait = float(r["images_per_s"]), float(r["data_wait_fraction"])
        images = (step - prev) * batch_size
        out.append({"step": step, "steps": step - prev, "images": images, "images_per_s": ips,
                    "data_wait_fraction": wait, "seconds": images / ips if ips > 0 else math.nan})
        prev = step
    return out


def summarise_windows(windows: list[dict]) -> dict:
    """Drop the first window (warm-up); aggregate the rest by time: total images / total seconds."""
    kept = windows[1:]
    if not kept:
        return {"status": "error", "error": f"only {len(windows)} logged window(s); need at least 2 "
                                            "(raise --steps or lower --log-every)"}
    secs = sum(w["seconds"] for w in kept)
    images = sum(w["images"] for w in kept)
    wait = sum(w["data_wait_fraction"] * w["seconds"] for w in kept) / secs
    ips = images / secs
    return {"status": "ok", "windows_used": len(kept), "steps_used": sum(w["steps"] for w in kept),
            "images_per_s": ips, "data_wait_fraction": wait,
            "images_per_s_median_window": float(np.median([w["images_per_s"] for w in kept])),
            "data_wait_fraction_median_window": float(np.median([w["data_wait_fraction"] for w in kept])),
            # what the loop would reach if the data wait were zero (the rest is compute + the loop's own overhead)
            "images_per_s_excluding_data_wait": ips / max(1.0 - wait, 1e-9)}


def measure_real(args, shards_dir: Path, index: io.ShardIndex, work: Path, profile_to: Path | None) -> dict:
    try:
        from tasks.core.config import Paths, TrainConfig
        from tasks.train import loop
    except ImportError as exc:
        return {"status": "skipped", "note": f"tasks.train.loop does not import here ({exc}); it needs pydantic "
                                             "and PyYAML (tasks.core.config) besides torch, timm and pyarrow"}
    n_train = index.rows("train")
    per_epoch = n_train // args.batch_size
    if per_epoch == 0:
        return {"status": "error", "error": f"batch {args.batch_size} is larger than the train split ({n_train})"}
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, max_steps=args.steps,
                      epochs=math.ceil(args.steps / per_epoch) + 1, log_every_steps=args.log_every,
                      device=args.device, precision=args.precision, channels_last=args.channels_last,
                      compile=args.compile, optimizer=args.optimizer, augment=args.augment,
                      deterministic=args.deterministic, seed=args.seed)
    work.mkdir(parents=True, exist_ok=True)
    paths = Paths(shards_dir=str(shards_dir), split_manifest=str(work / "no-manifest.parquet"),
                  models_dir=str(work / "models"), checkpoints_dir=str(work / "checkpoints"),
                  train_metrics=str(work / "metrics" / "train.json"),
                  train_plots_dir=str(work / "reports"))
    prof = None
    if profile_to is not None:
        import cProfile

        prof = cProfile.Profile()
    t0 = time.perf_counter()
    with Contention() as cont:
        try:
            if prof is not None:
                prof.enable()
            loop.run(cfg, paths)  # without matplotlib it skips curves.png and still writes steps.csv
        finally:
            if prof is not None:
                prof.disable()
    wall = time.perf_counter() - t0
    windows = read_windows(work / "reports" / "steps.csv", args.batch_size)
    rec = {**summarise_windows(windows), "windows": windows, "run_wall_s": round(wall, 3),
           "contention_whole_run": cont.record,
           "steps_per_epoch": per_epoch, "epoch_ends_inside_windows": max(0, (args.steps - 1) // per_epoch),
           "train_config": cfg.model_dump(mode="json")}
    if prof is not None:
        rec["profile"] = _profile_summary(prof, profile_to)
    return rec


def _profile_summary(prof, dest: Path, top: int = 25) -> dict:
    import pstats

    dest.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(dest))
    st = pstats.Stats(str(dest))
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]
    return {"pstats": str(dest), "top_cumulative": [
        {"function": f"{Path(f).name}:{line}({name})", "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)}
        for (f, line, name), (_cc, nc, tt, ct, _callers) in rows]}


# ---------------------------------------------------------------- lineage
def machine_info(device: torch.device) -> dict:
    cpu_model = mem_gib = None
    try:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), None)
        mem_gib = next((round(int(ln.split()[1]) / 2**20, 1) for ln in Path("/proc/meminfo").read_text().splitlines()
                        if ln.startswith("MemTotal:")), None)
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        gpu = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": cpu_model, "mem_total_gib": mem_gib, "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def git_info() -> dict:
    from tasks.core.lineage import code_version

    return code_version(REPO)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("timm", "numpy", "pyarrow", "pydantic", "PyYAML", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shards", type=Path, help="a shard dir written by `keel shard` (index.json + train/val)")
    src.add_argument("--synth-shards", nargs=2, type=int, metavar=("N", "RES"),
                     help="write N random uint8 RESxRES train images (+ N/10 val) as shards into the work dir")
    src.add_argument("--smoke", action="store_true",
                     help="CI: resnet10t, 256 synthetic 32px images, batch 16, 5 steps, a window per step")
    ap.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    ap.add_argument("--resolution", type=int, help="expected resolution: checked against the shards; names --out")
    ap.add_argument("--batch-size", type=int, default=128, help="per-device batch (default 128, TrainConfig's)")
    ap.add_argument("--steps", type=int, default=30, help="K: optimizer steps for each measurement (default 30)")
    ap.add_argument("--log-every", type=int, default=5, help="the loop's log_every_steps = window (default 5)")
    ap.add_argument("--ceiling-warmup", type=int, help="untimed ceiling steps first (default: --log-every)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile in both measurements")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--augment", choices=("none", "flip_crop"), default="flip_crop",
                    help="the loop's on-device augmentation (default flip_crop, TrainConfig's)")
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                    help="TrainConfig.deterministic=False (default True, as TrainConfig); applied to both")
    ap.add_argument("--repeat", type=int, default=1, help="alternate ceiling and real this many times; medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="first wait up to S s for other processes to leave the CPUs alone (shared machines)")
    ap.add_argument("--workdir", type=Path, help="where synthetic shards and the loop's outputs go (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--profile", action="store_true", help="cProfile the (last) real run; top functions in JSON")
    ap.add_argument("--out", type=Path, help="default bench/out/train_throughput-<model>-<res>.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.synth_shards = SMOKE["model"], list(SMOKE["synth"])
        args.batch_size, args.steps, args.log_every = SMOKE["batch_size"], SMOKE["steps"], SMOKE["log_every"]
    if args.shards is None and args.synth_shards is None:
        ap.error("give --shards DIR, --synth-shards N RES or --smoke")
    if args.ceiling_warmup is None:
        args.ceiling_warmup = args.log_every
    if min(args.steps, args.log_every, args.batch_size, args.repeat) < 1 or args.ceiling_warmup < 0:
        ap.error("--steps, --log-every, --batch-size and --repeat must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keel-train-bench-")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report: dict = {"bench": "train_throughput", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "git": git_info(), "versions": versions(), "argv": sys.argv[1:]}
        if args.synth_shards:
            n, res = args.synth_shards
            shards_dir = workdir / f"synth-shards-{n}-{res}"
            shutil.rmtree(shards_dir, ignore_errors=True)
            print(f"bench: writing {n} synthetic {res}x{res} images as shards in {shards_dir}", flush=True)
            report["synthetic_shards"] = write_synthetic_shards(shards_dir, n, res, seed=args.seed)
        else:
            shards_dir = args.shards.resolve()
        index = io.ShardIndex.load(shards_dir)
        if args.resolution is not None and args.resolution != index.resolution:
            print(f"bench: --resolution {args.resolution} but {shards_dir} holds {index.resolution}px images",
                  file=sys.stderr)
            return 2
        device = _resolve_device(args.device)
        precision = _resolve_precision(args.precision, device)
        out = args.out or REPO / "bench" / "out" / f"train_throughput-{args.model}-{index.resolution}.json"
        report.update({
            "machine": machine_info(device), "device": str(device),
            "settings": {"model": args.model, "resolution": index.resolution, "channels": index.channels,
                         "batch_size": args.batch_size, "steps": args.steps, "log_every_steps": args.log_every,
                         "ceiling_warmup_steps": args.ceiling_warmup, "precision": precision,
                         "channels_last": args.channels_last, "compile": args.compile, "optimizer": args.optimizer,
                         "augment": args.augment, "deterministic": args.deterministic, "repeat": args.repeat,
                         "seed": args.seed, "smoke": args.smoke},
            "shards": {"dir": str(shards_dir), "train": index.rows("train"), "val": index.rows("val")},
        })
        if args.wait_idle > 0:
            report["machine_before_start"] = wait_for_idle(args.wait_idle)
        report["loadavg_at_start"] = list(os.getloadavg())
        ceilings, reals = [], []
        for r in range(args.repeat):
            tag = f" (repeat {r + 1}/{args.repeat})" if args.repeat > 1 else ""
            print(f"bench: --- ceiling{tag}: {args.model} x{args.steps} steps on one batch on {device} ---", flush=True)
            try:
                ceilings.append(measure_ceiling(args, index, device, precision))
            except Exception as exc:  # noqa: BLE001 - recorded; the run exits 1 after writing the JSON
                ceilings.append({"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()})
            if device.type == "cuda":  # the ceiling's model and optimizer state are garbage now
                torch.cuda.empty_cache()
            print(f"bench: --- real{tag}: tasks.train.loop.run, max_steps={args.steps} ---", flush=True)
            prof = workdir / "real.pstats" if args.profile and r == args.repeat - 1 else None
            try:
                reals.append(measure_real(args, shards_dir, index, workdir / f"run-{r}", prof))
            except Exception as exc:  # noqa: BLE001 - recorded; the run exits 1 after writing the JSON
                reals.append({"status": "error", "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()})
        report["ceiling_runs"], report["real_runs"] = ceilings, reals
        summarise(report)
        c, rl = report["ceiling"], report["real"]
        if reals and reals[-1].get("profile"):
            # the .pstats file lives in the work dir, which may be removed: copy it beside the JSON
            src = Path(reals[-1]["profile"]["pstats"])
            dst = out.with_suffix(".pstats")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            reals[-1]["profile"]["pstats"] = str(dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_summary(report)
        print(f"bench: wrote {out}")
        bad = [n for n, rec in (("ceiling", c), ("real", rl)) if rec.get("status") == "error"]
        if bad:
            print(f"bench: {', '.join(bad)} failed (see the JSON)", file=sys.stderr)
            for runs in (ceilings, reals):
                for rec in runs:
                    if rec.get("traceback"):
                        print(rec["traceback"], file=sys.stderr)
            return 1
        return 0
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


CONTAMINATED_CORES = 0.25  # other processes using more than this during a measurement: the figure is not kept


def _others(rec: dict) -> float | None:
    o = rec.get("contention_whole_run", rec).get("other_processes_cores")
    return None if o is None or math.isnan(o) else o


def summarise(report: dict) -> None:
    """Medians over the repeats and the ratio of each (ceiling, real) pair, run side by side.

    A run during which other processes used more than CONTAMINATED_CORES is left out when a clean pair exists
    (on 2 cores a second busy process slows torch's 2 threads by up to 4x); ``contaminated`` says which."""
    ceilings, reals = report["ceiling_runs"], report["real_runs"]
    pairs = [(c, r) for c, r in zip(ceilings, reals, strict=True)
             if c.get("status") == "ok" and r.get("status") == "ok"]
    clean = [(c, r) for c, r in pairs
             if all((_others(x) or 0.0) <= CONTAMINATED_CORES for x in (c, r))]
    use = clean or pairs
    report["pairs_used"] = len(use)
    report["contaminated_pairs_dropped"] = len(pairs) - len(use)
    report["ceiling"] = _median_of([c for c, _ in use] or ceilings, ("images_per_s", "ms_per_step"))
    report["real"] = _median_of([r for _, r in use] or reals,
                                ("images_per_s", "data_wait_fraction", "images_per_s_median_window",
                                 "images_per_s_excluding_data_wait"))
    report["ratio_per_pair"] = [r["images_per_s"] / c["images_per_s"] for c, r in use]
    report["ratio"] = float(np.median(report["ratio_per_pair"])) if use else None
    report["ratio_median_window"] = float(np.median([r["images_per_s_median_window"] / c["images_per_s"]
                                                     for c, r in use])) if use else None
    report["ratio_excluding_data_wait"] = float(np.median([r["images_per_s_excluding_data_wait"] /
                                                           c["images_per_s"] for c, r in use])) if use else None
    report["data_wait_fraction"] = report["real"].get("data_wait_fraction")


def _median_of(runs: list[dict], keys: tuple[str, ...]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return {k: v for k, v in runs[-1].items() if k != "traceback"} if runs else {"status": "error"}
    rec = {"status": "ok", "runs": len(ok)}
    for k in keys:
        rec[k] = float(np.median([r[k] for r in ok]))
    rec["images_per_s_runs"] = [round(r["images_per_s"], 2) for r in ok]
    others = [o for o in map(_others, ok) if o is not None]
    # a figure taken while this is well above 0 is contaminated (a shared machine): rerun with --wait-idle
    rec["other_processes_cores_max"] = max(others) if others else None
    return rec


def print_summary(report: dict) -> None:
    s, c, r = report["settings"], report["ceiling"], report["real"]
    print(f"bench: {s['model']}@{s['resolution']} batch {s['batch_size']} {s['precision']}"
          f"{' channels_last' if s['channels_last'] else ''}{' compiled' if s['compile'] else ''} on "
          f"{report['device']}, {s['steps']} steps")
    print(f"  ceiling  {c['images_per_s']:10.1f} img/s, others {c['other_processes_cores_max']} cores"
          if c.get("status") == "ok"
          else f"  ceiling  {c.get('status')}: {c.get('error') or c.get('note')}")
    if r.get("status") == "ok":
        print(f"  real     {r['images_per_s']:10.1f} img/s (median window {r['images_per_s_median_window']:.1f}), "
              f"data wait {100 * r['data_wait_fraction']:.1f}%, others {r['other_processes_cores_max']} cores")
    else:
        print(f"  real     {r.get('status')}: {r.get('error') or r.get('note')}")
    if report["contaminated_pairs_dropped"]:
        print(f"  ({report['contaminated_pairs_dropped']} pair(s) dropped: other processes used the CPUs meanwhile)")
    if report["ratio"] is not None:
        print(f"  real / ceiling = {report['ratio']:.3f} (median window {report['ratio_median_window']:.3f}; "
              f"without the data wait {report['ratio_excluding_data_wait']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
