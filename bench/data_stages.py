"""Benchmark of keel's data stages: ingest -> split -> validate -> shard, against a bare decode baseline.

Runs each stage through its public ``run(cfg, paths)`` on one dataset and records, per stage: wall seconds,
items/s, microseconds per item, CPU seconds (this process and its worker processes), and peak resident memory.
A baseline does the irreducible work of the same images (read bytes, PIL decode, RGB, resize to 32x32, write
uint8 rows to parquet) on the same number of processes; each stage's time is printed as a multiple of it.

    python bench/data_stages.py --dataset digits
    python bench/data_stages.py --dataset cifar10 --workdir /tmp/keel-bench
    python bench/data_stages.py --dataset synthetic --n 600000 --workdir /tmp/keel-bench
    python bench/data_stages.py --smoke --out /tmp/x.json --workdir /tmp/x      # CI: tiny, seconds

Peak memory is measured by sampling with psutil every 50 ms in a thread: ``peak_rss_tree_mb`` is the largest
sum of RSS over this process and all its descendants (the spawn-based worker pools) seen during the stage,
``peak_rss_self_mb`` the largest RSS of this process alone.  RSS counts shared library pages once per process,
so the tree figure slightly overstates the true footprint.  The stages run one after another in this process,
so a stage's ``rss_start_mb`` is what earlier stages left behind.  ``resource.getrusage`` high-water marks
(self, and the largest reaped child) are recorded too, as a cross-check; they only ever grow.

Not timed: generating or unpacking the dataset (reported separately as ``prepare_s``), and importing the stage
modules.  Timed, because a user pays them: worker-pool start-up, the lazy imports inside a stage (matplotlib
for the audit, Great Expectations in validate), and every report a stage writes.

Everything at module level is cheap on purpose: the stages' spawn-based pools re-import this file in every
worker process.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/data_stages.py` from anywhere, without installing keel
    sys.path.insert(0, str(REPO))

CIFAR_TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
STAGES = ("ingest", "split", "validate", "shard")
SMOKE_N = 200
SYNTH_CLASSES = 10
SYNTH_VERSION = 2          # bump when the generator changes, so cached folders are regenerated
SYNTH_GRID = 8             # 8x8 blocks of 4x4 px: 4x4 blocks made ~13% of 60k images pHash near duplicates
BASELINE_CHUNK = 256


# ---------------------------------------------------------------- memory and CPU measurement
class _Sampler:
    """Peak RSS of this process and of its whole process tree, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._psutil = psutil
        self.proc = psutil.Process()
        self.interval = interval_s
        self.peak_self = self.peak_tree = self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        own = self.proc.memory_info().rss
        tree = own
        for child in self.proc.children(recursive=True):
            try:
                tree += child.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                pass
        self.peak_self = max(self.peak_self, own)
        self.peak_tree = max(self.peak_tree, tree)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self.start = self.peak_self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu_seconds() -> tuple[float, float]:
    """User+system CPU seconds of this process and of its reaped children (pools are reaped on shutdown)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
    return busy, getattr(t, "steal", 0.0)


def wait_for_idle(limit_s: float, quiet_cores: float = 0.15, window_s: float = 5.0) -> dict:
    """Wait (up to limit_s) until other processes use less than ``quiet_cores`` cores over a window."""
    t0 = time.perf_counter()
    while True:
        b0 = _system_cpu()[0]
        time.sleep(window_s)
        other = (_system_cpu()[0] - b0) / window_s
        waited = time.perf_counter() - t0
        if other < quiet_cores or waited >= limit_s:
            state = "idle" if other < quiet_cores else "still busy"
            print(f"bench: machine {state} after {waited:.0f} s (other processes used {other:.2f} cores)",
                  flush=True)
            return {"waited_s": round(waited, 1), "other_cores_before_start": round(other, 2),
                    "idle": other < quiet_cores}


def _maxrss_mb() -> tuple[float, float]:
    # Linux reports ru_maxrss in KiB.
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def measure(fn, items_of, profile_to: Path | None = None) -> tuple[dict, object]:
    """Run ``fn()``; return its wall time, CPU, peak memory and (via ``items_of(result)``) throughput."""
    prof = None
    if profile_to is not None:
        import cProfile

        prof = cProfile.Profile()
    cpu0, sys0 = _cpu_seconds(), _system_cpu()
    status, error, result = "ok", None, None
    with _Sampler() as mem:
        t0 = time.perf_counter()
        try:
            if prof is not None:
                prof.enable()
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recorded with its traceback; the bench goes on
            status, error = _classify(exc), f"{type(exc).__name__}: {exc}"
            if status == "gate_failed":
                result = getattr(exc, "result", None)  # ValidationFailed carries the full result
                print(f"bench: {exc}", file=sys.stderr)
            else:
                traceback.print_exc()
        finally:
            if prof is not None:
                prof.disable()
        wall = time.perf_counter() - t0
    cpu1, sys1 = _cpu_seconds(), _system_cpu()
    maxrss_self, maxrss_children = _maxrss_mb()
    items = items_of(result) if result is not None else None
    out = {
        "status": status,
        "wall_s": round(wall, 4),
        "items": items,
        "items_per_s": round(items / wall, 1) if items else None,
        "us_per_item": round(wall / items * 1e6, 2) if items else None,
        "cpu_self_s": round(cpu1[0] - cpu0[0], 3),
        "cpu_workers_s": round(cpu1[1] - cpu0[1], 3),
        "rss_start_mb": round(mem.start / 2**20, 1),
        "peak_rss_self_mb": round(mem.peak_self / 2**20, 1),
        "peak_rss_tree_mb": round(mem.peak_tree / 2**20, 1),
        "getrusage_maxrss_self_mb": round(maxrss_self, 1),
        "getrusage_maxrss_largest_child_mb": round(maxrss_children, 1),
    }
    ours = out["cpu_self_s"] + out["cpu_workers_s"]
    # CPU per item is steadier than wall time on a shared machine: other processes delay us, not add to it
    out["cpu_us_per_item"] = round(ours / items * 1e6, 2) if items else None
    out["cpu_utilisation"] = round(ours / wall / _nproc(), 3) if wall else None
    # CPU that other processes used meanwhile (a shared box): the figures are only as clean as this
    out["other_processes_cores"] = round(max(sys1[0] - sys0[0] - ours, 0.0) / wall, 2) if wall else None
    out["steal_cores"] = round((sys1[1] - sys0[1]) / wall, 2) if wall else None
    if error:
        out["gate_message" if status == "gate_failed" else "error"] = error
    if prof is not None:
        out["profile"] = _profile_summary(prof, profile_to)
    return out, result


def _classify(exc: Exception) -> str:
    # A data gate that says no is a result of the stage, not a crash of the benchmark.
    return "gate_failed" if type(exc).__name__ == "ValidationFailed" else "error"


def _profile_summary(prof, dest: Path, top: int = 25) -> dict:
    import io as _io
    import pstats

    dest.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(dest)
    buf = _io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return {"pstats_file": str(dest), "top_cumulative": buf.getvalue().splitlines()}


# ---------------------------------------------------------------- datasets
def _synth_chunk(args: tuple[Path, int, int, int]) -> int:
    """Write items [start, stop) of the synthetic set: 32x32 JPEGs of random 8x8 colour blocks, one per seed.

    An 8x8 grid gives the 8x8 low-frequency DCT band that pHash reads 64 independent degrees of freedom, so
    the images are distinct to the near-duplicate search too (a 4x4 grid has only 16, and about 1 in 8 images
    of 60k had a pHash neighbour within 4 bits), like a real set with few near duplicates.
    """
    import numpy as np
    from PIL import Image

    root, start, stop, seed = args
    made = set()
    for i in range(start, stop):
        label = f"class{i % SYNTH_CLASSES:02d}"
        d = root / "train" / label
        if label not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(label)
        rng = np.random.default_rng((seed, i))
        blocks = rng.integers(0, 256, size=(SYNTH_GRID, SYNTH_GRID, 3), dtype=np.uint8)
        img = np.kron(blocks, np.ones((32 // SYNTH_GRID, 32 // SYNTH_GRID, 1), np.uint8))
        Image.fromarray(img).save(d / f"{i:07d}.jpg", format="JPEG", quality=90)
    return stop - start


def make_synthetic(root: Path, n: int, workers: int, seed: int = 0) -> float:
    """Generate (or reuse) ``root`` with n distinct JPEGs under train/<class>/; returns seconds spent."""
    marker = root.with_name(root.name + ".complete.json")  # beside, not inside: ingest would list it
    want = {"n": n, "seed": seed, "version": SYNTH_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        print(f"bench: reusing synthetic set {root} ({n} images)")
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    step = 5000
    jobs = [(root, s, min(s + step, n), seed) for s in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            done = sum(pool.map(_synth_chunk, jobs))
    else:
        done = sum(map(_synth_chunk, jobs))
    assert done == n
    marker.write_text(json.dumps(want))
    took = time.perf_counter() - t0
    print(f"bench: generated {n} synthetic JPEGs in {took:.1f} s ({n / took:,.0f}/s)")
    return took


def unpack_cifar(dest: Path) -> tuple[Path, float]:
    if not CIFAR_TARBALL.exists():
        sys.exit(f"bench: {CIFAR_TARBALL} not found; --dataset cifar10 needs the CIFAR-10 JPEG tarball "
                 "(see ../shared/datasets/README.md). Use --dataset synthetic or digits instead.")
    root = dest / "cifar10"
    marker = dest / ".complete"
    if marker.exists() and root.is_dir():
        print(f"bench: reusing unpacked CIFAR-10 at {root}")
        return root, 0.0
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(CIFAR_TARBALL), "-C", str(dest)], check=True)
    marker.write_text("ok\n")
    took = time.perf_counter() - t0
    print(f"bench: unpacked {CIFAR_TARBALL.name} in {took:.1f} s")
    return root, took


UPSCALE_VERSION = 1  # bump when the upscaled set's recipe changes, so cached folders are regenerated


def _upscale_chunk(args: tuple[list[tuple[str, str]], int]) -> int:
    """Write each (source, dest) JPEG upscaled to px x px (bicubic), JPEG quality 90, 4:2:0."""
    from PIL import Image

    pairs, px = args
    for src, dst in pairs:
        with Image.open(src) as img:
            big = img.convert("RGB").resize((px, px), Image.Resampling.BICUBIC)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        big.save(dst, format="JPEG", quality=90)
    return len(pairs)


def make_upscaled(src_root: Path, dest: Path, px: int, workers: int) -> tuple[Path, float]:
    """A copy of the CIFAR-10 folder with every image upscaled to px x px (cached under ``dest``): large JPEGs
    whose decode, not Python overhead, dominates; the same labels, splits and near duplicates as the source."""
    root = dest / src_root.name
    marker = dest.with_name(dest.name + ".complete.json")
    want = {"px": px, "version": UPSCALE_VERSION, "source": str(src_root)}
    if marker.exists() and json.loads(marker.read_text()) == want and root.is_dir():
        print(f"bench: reusing upscaled set {root} ({px} px)")
        return root, 0.0
    shutil.rmtree(dest, ignore_errors=True)
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    pairs = [(src, str(root / os.path.relpath(src, src_root))) for src, _ in list_folder(src_root)]
    jobs = [(pairs[i:i + 1000], px) for i in range(0, len(pairs), 1000)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            done = sum(pool.map(_upscale_chunk, jobs))
    else:
        done = sum(map(_upscale_chunk, jobs))
    assert done == len(pairs)
    marker.write_text(json.dumps(want))
    took = time.perf_counter() - t0
    print(f"bench: wrote {done} JPEGs upscaled to {px} px in {took:.1f} s")
    return root, took


def limit_folder(src_root: Path, dest: Path, limit: int) -> tuple[Path, float]:
    """A copy (hard links where possible) of the first ``limit`` files of every folder under src_root (cached)."""
    root = dest / src_root.name
    marker = dest.with_name(dest.name + ".complete.json")
    want = {"limit": limit, "source": str(src_root)}
    if marker.exists() and json.loads(marker.read_text()) == want and root.is_dir():
        return root, 0.0
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    for dirpath, _dirs, files in os.walk(src_root):
        for name in sorted(f for f in files if not f.startswith("."))[:limit]:
            out = root / os.path.relpath(dirpath, src_root) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(os.path.join(dirpath, name), out)
            except OSError:
                shutil.copyfile(os.path.join(dirpath, name), out)
    marker.write_text(json.dumps(want))
    return root, time.perf_counter() - t0


def list_folder(root: Path) -> list[tuple[str, str]]:
    """(path, label) of every file under root, label = its parent folder's name (the ingest folder layout)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append((os.path.join(dirpath, name), os.path.basename(dirpath)))
    return out


def warm_page_cache(items: list) -> float:
    """Read every file once (untimed), so ingest and the baseline both start from a warm page cache.

    On this kind of VM idle page cache is reclaimed within minutes (DAMON), and a cold 1 KB file costs ~110 us
    to read against ~10 us warm: without this, whichever of ingest and the baseline runs later pays the disk.
    """
    t0 = time.perf_counter()
    for src, _ in items:
        if not isinstance(src, bytes):
            with open(src, "rb") as f:
                f.read()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- baseline
def _baseline_chunk(job: tuple[list, int]) -> tuple[list[str], object]:
    """Decode (path-or-bytes, label) pairs to uint8 [k, size, size, 3]: the irreducible work per image."""
    import io as _io

    import numpy as np
    from PIL import Image

    chunk, size = job
    out = np.empty((len(chunk), size, size, 3), np.uint8)
    labels = []
    for k, (src, label) in enumerate(chunk):
        if isinstance(src, bytes):
            data = src
        else:
            with open(src, "rb") as f:
                data = f.read()
        img = Image.open(_io.BytesIO(data)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        out[k] = np.asarray(img)
        labels.append(label)
    return labels, out


def run_baseline(items_fn, dest: Path, workers: int, size: int) -> int:
    """List the items, decode them on ``workers`` spawn processes, write uint8 rows to one parquet file."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = items_fn()
    chunks = [(items[i:i + BASELINE_CHUNK], size) for i in range(0, len(items), BASELINE_CHUNK)]
    classes = sorted({lab for _, lab in items})
    index = {c: k for k, c in enumerate(classes)}
    schema = pa.schema([("label", pa.int16()), ("image", pa.binary(size * size * 3))])
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            results = pool.map(_baseline_chunk, chunks)
        else:
            pool, results = None, map(_baseline_chunk, chunks)
        try:
            for labels, images in results:
                buf = pa.py_buffer(np.ascontiguousarray(images))
                flat = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size * size * 3), len(labels),
                                                            [None, buf])
                lab = pa.array([index[x] for x in labels], pa.int16())
                writer.write_table(pa.table([lab, flat], schema=schema), row_group_size=1024)
                rows += len(labels)
        finally:
            if pool is not None:
                pool.shutdown()
    return rows


# ---------------------------------------------------------------- the stages
def _paths(run_dir: Path):
    from tasks.core.config import Paths

    return Paths(raw_items=str(run_dir / "raw" / "items"), rejects=str(run_dir / "raw" / "rejects.parquet"),
                 audit_dir=str(run_dir / "reports" / "audit"),
                 split_manifest=str(run_dir / "split" / "manifest.parquet"),
                 leakage_report=str(run_dir / "reports" / "leakage.json"),
                 leakage_picture=str(run_dir / "reports" / "leakage.png"),
                 validate_dir=str(run_dir / "reports" / "validate"), shards_dir=str(run_dir / "shards"))


def _validate_module():
    """tasks.validate if it exists and has a public run(); else (None, why)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("tasks.validate") is None:
        return None, "tasks/validate/ does not exist yet: validate skipped"
    try:
        mod = importlib.import_module("tasks.validate")
    except Exception as exc:  # noqa: BLE001 - a half-written module must not stop the other stages' figures
        return None, f"tasks.validate does not import ({type(exc).__name__}: {exc}): validate skipped"
    if not callable(getattr(mod, "run", None)):
        return None, "tasks.validate has no public run(): validate skipped"
    return mod, None


def run_stages(source: str, run_dir: Path, workers: int, stages: tuple[str, ...], profile_dir: Path | None,
               before_ingest=None) -> dict:
    from tasks import ingest, shard, split
    from tasks.core.config import IngestConfig, ShardConfig, SplitConfig, ValidateConfig

    paths = _paths(run_dir)
    # The bench measures cost, not data quality: the gates are opened wide so that a small or synthetic set
    # (e.g. 20 val items over 10 classes) still runs every expectation instead of being judged on its balance.
    cfgs = {
        "ingest": IngestConfig(source=source, workers=workers),
        "split": SplitConfig(),
        "validate": ValidateConfig(max_imbalance_ratio=1000.0, max_label_distribution_distance=1.0),
        "shard": ShardConfig(workers=workers),
    }
    validate, why_not = _validate_module()

    def items_ingest(r):
        return r.found

    def items_split(r):
        return sum(r.counts.values()) + r.excluded

    def items_validate(r):
        return sum(s.rows for s in r.splits.values()) if hasattr(r, "splits") else None

    def items_shard(r):
        return sum(r.rows.values())

    plan = {
        "ingest": (lambda: ingest.run(cfgs["ingest"], paths), items_ingest),
        "split": (lambda: split.run(cfgs["split"], paths), items_split),
        "validate": (lambda: validate.run(cfgs["validate"], paths), items_validate),
        "shard": (lambda: shard.run(cfgs["shard"], paths), items_shard),
    }
    out: dict = {}
    for name in STAGES:
        if name not in stages:
            out[name] = {"status": "not_run", "note": "not selected with --stages"}
            continue
        if name == "validate" and validate is None:
            print(f"bench: NOTE {why_not}")
            out[name] = {"status": "skipped", "note": why_not}
            continue
        if name == "split":
            # split freezes against an existing manifest; benchmark a fresh split, not a no-op re-run
            for p in (Path(paths.split_manifest), Path(paths.split_manifest + ".sha256")):
                p.unlink(missing_ok=True)
        warm_s = before_ingest() if name == "ingest" and before_ingest else None
        print(f"bench: --- {name} ---", flush=True)
        fn, items_of = plan[name]
        prof = profile_dir / f"{name}.pstats" if profile_dir else None
        rec, result = measure(fn, items_of, prof)
        if warm_s is not None:
            rec["warm_page_cache_s"] = round(warm_s, 2)
        rec["config"] = cfgs[name].model_dump(mode="json")
        rec["result"] = _result_summary(name, result)
        if rec["status"] == "gate_failed":
            rec["note"] = "the data gate failed (recorded; the time of the whole check is still measured)"
        out[name] = rec
        print(f"bench: {name}: {rec['status']} in {rec['wall_s']:.2f} s", flush=True)
    return out


def _result_summary(name: str, r) -> dict | None:
    if r is None:
        return None
    if name == "ingest":
        return {"found": r.found, "ingested": r.ingested, "rejected": r.rejected,
                "reject_counts": r.reject_counts}
    if name == "split":
        return {"counts": r.counts, "excluded": r.excluded, "units": r.units,
                "cross_split_items": r.cross_split_items}
    if name == "validate":
        return {"success": getattr(r, "success", None), "expectations": getattr(r, "expectations", None),
                "failures": len(getattr(r, "failures", []) or [])}
    if name == "shard":
        return {"rows": r.rows, "classes": len(r.classes)}
    return None


# ---------------------------------------------------------------- machine and lineage
def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"nproc": _nproc(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model, "mem_total_gib": mem_gib,
            "gpu": _has_gpu(), "platform": platform.platform(), "python": platform.python_version()}


def _has_gpu() -> bool:
    # No torch/CUDA import here (slow and irrelevant to these stages): the device nodes say enough.
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl"))


def git_info() -> dict:
    from tasks.core.lineage import code_version

    return code_version(REPO)


def versions(pkgs: tuple[str, ...] = ("numpy", "pillow", "pyarrow", "pandas", "scipy", "great_expectations",
                                     "psutil")) -> dict:
    """Installed versions of ``pkgs`` (None when one is missing); the other benches pass their own list."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in pkgs:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------- report
def print_table(report: dict) -> None:
    base = report["baseline"]
    rows = [("stage", "status", "items", "wall s", "items/s", "us/item", "x base", "peak tree MB",
             "peak self MB", "CPU util", "others")]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for name in (*STAGES, "baseline"):
        r = base if name == "baseline" else report["stages"][name]
        if r.get("status") in ("skipped", "not_run"):
            rows.append((name, r["status"], *["-"] * 9))
            continue
        rows.append((name, r["status"], fmt(r.get("items"), ","), fmt(r["wall_s"], ".2f"),
                     fmt(r.get("items_per_s"), ",.0f"), fmt(r.get("us_per_item"), ",.1f"),
                     fmt(r.get("ratio_to_baseline"), ".2f"), fmt(r["peak_rss_tree_mb"], ",.0f"),
                     fmt(r["peak_rss_self_mb"], ",.0f"), fmt(r.get("cpu_utilisation"), ".0%"),
                     fmt(r.get("other_processes_cores"), ".2f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    ds = report["dataset"]
    m, g = report["machine"], report["git"]
    n = "?" if report["n"] is None else f"{report['n']:,}"
    print(f"\nkeel data stages: {ds['name']} N={n} workers={report['workers']} "
          f"({m['nproc']} CPUs, {m['cpu_model']}), commit {g['commit']}"
          f"{' + uncommitted tasks/ changes' if g['tasks_dirty'] else ''}")
    for k, row in enumerate(rows):
        cells = (str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print("  ".join(cells))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("CPU util: CPU seconds of this process and its workers / wall / CPUs.  others: cores used by other "
          "processes on the machine meanwhile (should be ~0 for clean figures)")
    ratio = report["stages_total_ratio_to_baseline"]
    print(f"stages total {report['stages_total_s']:.2f} s" + (f" = {ratio:.2f}x baseline" if ratio else "")
          + f"; dataset {ds['prepare_kind']} {ds['prepare_s']:.1f} s (not counted)")
    for name, r in report["stages"].items():
        if r.get("note"):
            print(f"note: {name}: {r['note']}")
        if r.get("gate_message"):
            print(f"gate: {name}: " + r["gate_message"].splitlines()[0])
        if r.get("error"):
            print(f"ERROR: {name}: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "cifar10", "synthetic"), default="digits")
    p.add_argument("--n", type=int, default=60_000, help="synthetic: number of images (default %(default)s)")
    p.add_argument("--upscale", type=int, default=None, metavar="PX",
                   help="cifar10 only: use a copy of the set with every image upscaled to PX x PX (bicubic, JPEG "
                        "q90; written once under --workdir, cached): large JPEGs, e.g. 384")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="cifar10 only: the first N images per class folder (train and test), for quicker runs")
    p.add_argument("--smoke", action="store_true",
                   help=f"CI size: synthetic, n={SMOKE_N} (overrides --dataset/--n)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where datasets are generated/unpacked (cached between runs) and stage outputs are "
                        "written; default: a fresh temp dir, removed afterwards")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: bench/out/data_stages-<dataset>[-<n>].json)")
    p.add_argument("--workers", type=int, default=2, help="processes for ingest, shard and the baseline")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset to run (later stages reuse earlier outputs in --workdir; "
                        "ingest wipes them)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare decode + parquet write baseline")
    p.add_argument("--profile", action="store_true",
                   help="cProfile each stage in this process (not its workers); .pstats under the workdir "
                        "and the top functions in the JSON; it distorts wall times, so take figures from "
                        "other runs")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before starting, wait up to S seconds for other processes to leave the CPUs alone")
    p.add_argument("--no-warm", action="store_true",
                   help="do not read the files once (untimed) before ingest and before the baseline; then "
                        "both pay whatever the page cache has lost in between")
    p.add_argument("--keep", action="store_true", help="keep stage outputs and the baseline parquet")
    args = p.parse_args(argv)

    if args.smoke:
        args.dataset, args.n = "synthetic", SMOKE_N
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.dataset == "synthetic" and args.n < 20:
        p.error("--n must be at least 20 (every split needs items)")
    if args.dataset == "cifar10" and not CIFAR_TARBALL.exists():
        print(f"bench: {CIFAR_TARBALL} not found; --dataset cifar10 needs the CIFAR-10 JPEG tarball "
              "(see ../shared/datasets/README.md). Use --dataset synthetic or digits instead.",
              file=sys.stderr)
        return 2

    if (args.upscale or args.limit) and args.dataset != "cifar10":
        p.error("--upscale and --limit apply to --dataset cifar10 only")
    tag = args.dataset + (f"-{args.n}" if args.dataset == "synthetic" else "") \
        + (f"-up{args.upscale}" if args.upscale else "") + (f"-limit{args.limit}" if args.limit else "")
    out_path = args.out or REPO / "bench" / "out" / f"data_stages-{tag}.json"
    temp_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keel-bench-")) if temp_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / f"run-{tag}"

    try:
        # ------------------------------------------------ dataset (not timed as a stage)
        prepare_kind, prepare_s = "none", 0.0
        if args.dataset == "digits":
            from tasks.ingest import sources

            source = "builtin:digits"

            def items_fn():
                # the same encoded bytes ingest reads; a builtin has no files, so there is nothing to open
                return [(c.data, c.label) for c in sources.candidates(source)]
        elif args.dataset == "cifar10":
            root, prepare_s = unpack_cifar(workdir / "datasets" / "cifar10")
            prepare_kind = "unpack"
            if args.limit:
                root, took = limit_folder(root, workdir / "datasets" / f"cifar10-limit{args.limit}", args.limit)
                prepare_s += took
            if args.upscale:
                up = "cifar10" + (f"-limit{args.limit}" if args.limit else "") + f"-up{args.upscale}"
                root, took = make_upscaled(root, workdir / "datasets" / up, args.upscale, args.workers)
                prepare_kind, prepare_s = "unpack + upscale", prepare_s + took
            source = str(root)

            def items_fn():
                return list_folder(root)
        else:
            root = workdir / "datasets" / f"synthetic-{args.n}"
            prepare_s = make_synthetic(root, args.n, args.workers)
            prepare_kind, source = "generate", str(root)

            def items_fn():
                return list_folder(root)

        # Import the stage modules before timing anything (an import is not a stage's work).
        import tasks.ingest
        import tasks.shard
        import tasks.split  # noqa: F401

        if "ingest" in stages:
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        profile_dir = run_dir / "profile" if args.profile else None

        report = {
            "benchmark": "bench/data_stages.py",
            "schema": 1,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
            "git": git_info(),
            "machine": machine_info(),
            "versions": versions(),
            "dataset": {"name": args.dataset, "upscale_px": args.upscale, "limit_per_folder": args.limit,
                        "source": source, "prepare_kind": prepare_kind,
                        "prepare_s": round(prepare_s, 2)},
            "n": None,
            "workers": args.workers,
            "smoke": args.smoke,
            "rss_method": "psutil, sampled every 50 ms in a thread: RSS of this process (self) and the sum "
                          "over this process and all descendants (tree, includes the spawn worker pools); "
                          "plus "
                          "resource.getrusage ru_maxrss high-water marks (self; largest reaped child)",
            "profiled": args.profile,
        }

        if args.wait_idle > 0:
            report["machine_before_start"] = wait_for_idle(args.wait_idle)
        report["loadavg_at_start"] = list(os.getloadavg())

        # ------------------------------------------------ stages
        listing: list = []

        def warm() -> float | None:
            if args.no_warm:
                return None
            listing[:] = items_fn()
            took = warm_page_cache(listing)
            print(f"bench: page cache warmed in {took:.1f} s (untimed)", flush=True)
            return took

        report["page_cache"] = "cold/as found (--no-warm)" if args.no_warm else \
            "warm: every file read once, untimed, right before ingest and right before the baseline"
        report["stages"] = run_stages(source, run_dir, args.workers, stages, profile_dir, before_ingest=warm)
        ing = report["stages"]["ingest"].get("result") or {}
        report["n"] = ing.get("found")

        # ------------------------------------------------ baseline
        if args.no_baseline:
            report["baseline"] = {"status": "skipped", "note": "--no-baseline"}
        else:
            from tasks.core.config import ShardConfig

            size = ShardConfig().resolution  # the shard stage's default training resolution
            print(f"bench: --- baseline (read bytes, PIL decode, RGB, resize {size}x{size}, uint8 rows -> "
                  "zstd parquet) ---", flush=True)
            dest = run_dir / "baseline" / "rows.parquet"
            warm_s = warm()
            rec, _ = measure(lambda: run_baseline(items_fn, dest, args.workers, size), lambda rows: rows)
            rec["what"] = (f"list the same items, read bytes, PIL decode, convert RGB, resize to "
                           f"{size}x{size} (bilinear), write label+uint8 image rows to one parquet file "
                           f"(zstd, row groups 1024) on {args.workers} spawn processes "
                           f"(ProcessPoolExecutor.map over {BASELINE_CHUNK}-item chunks; the parent writes), "
                           "pool start-up included")
            if warm_s is not None:
                rec["warm_page_cache_s"] = round(warm_s, 2)
            report["baseline"] = rec
            if report["n"] is None:
                report["n"] = rec.get("items")
        if report["n"] is None:  # ingest not run this time (--stages): the items the other stages handled
            report["n"] = max((r["items"] for r in report["stages"].values() if r.get("items")), default=None)
        base_s = report["baseline"].get("wall_s") if report["baseline"].get("status") == "ok" else None
        total = 0.0
        for r in report["stages"].values():
            if "wall_s" in r:
                total += r["wall_s"]
                r["ratio_to_baseline"] = round(r["wall_s"] / base_s, 2) if base_s else None
        report["stages_total_s"] = round(total, 3)
        report["stages_total_ratio_to_baseline"] = round(total / base_s, 2) if base_s else None

        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
        print(f"bench: wrote {out_path}")
        failed = [n for n, r in report["stages"].items() if r.get("status") == "error"]
        if report["baseline"].get("status") == "error":
            failed.append("baseline")
        if failed:
            print(f"bench: stage(s) raised an error: {', '.join(failed)} (see above and the JSON)",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if temp_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
