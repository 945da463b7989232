"""Leakage benchmark: plant known transformed copies of train images into the test split, count what is found.

A seeded subset of the shared CIFAR-10 JPEG set is laid out as a source-provided split (``<src>/train/<class>/``,
``<src>/test/<class>/``, the layout ``tasks.ingest.sources`` honours).  For every (kind, strength) in ``PLANTS``,
``--per-kind`` distinct train images (never reused across plants) get a transformed copy written into
``test/<same class>/``.  Every file in the folder is renamed to a shuffled number, so a name says nothing about
whether it was planted; the ground truth (planted test file -> original train file, kind, strength) is written
to ``<workdir>/leakage-truth.json``, outside the source folder.

Then, over the same folder, in one run:

- **keel**: ``tasks.ingest.run`` and ``tasks.split.run`` through their public API, default ``SplitConfig``
  (``cross_split_duplicates: drop_from_train``), then the pairs of the leakage report (``report["pairs"]``);
- **phash**: imagededup's ``PHash`` at its defaults (``encode_images`` over the tree, ``find_duplicates`` with its
  default ``max_distance_threshold``, 10 bits).

Each method keeps only train<->test pairs.  Recall per (kind, strength) and per kind = planted pairs found /
planted; a planted pair is found when a flagged pair links the planted test file to *its* original.  Precision
(strict) = planted pairs found / all flagged cross-split pairs.  Flagged pairs of two real CIFAR images
(unplanted) may be genuine duplicates (CIFAR-10 has some: Barz & Denzler 2020), so they are drawn side by side in
``leakage_unplanted_<method>.png`` for a person to judge, and the JSON leaves a field for that count.

    python bench/leakage.py --workdir /tmp/keel-leak                       # 10,000 train + 2,000 test, 20 per plant
    python bench/leakage.py --methods phash --train 1000 --test 200 --per-kind 5

Everything at module level is cheap on purpose: ingest's spawn-based pool re-imports this file in its workers.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/leakage.py` from anywhere, without installing keel
    sys.path.insert(0, str(REPO))

from bench.data_stages import (  # bench/ helpers (stdlib imports only at their module level)
    CIFAR_TARBALL,
    _paths,
    git_info,
    machine_info,
    measure,
    unpack_cifar,
    versions,
)

METHODS = ("keel", "phash")
SIZE = 32
DEFAULT_QUALITY = 95
GREY = 128


def log(msg: str) -> None:
    print(f"leakage: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- transforms (uint8 HxWx3 in, uint8 HxWx3 out)
def translate(arr: np.ndarray, dx: int, dy: int = 0) -> np.ndarray:
    """Shift the content by dx px right (negative: left) and dy px down; the uncovered border repeats the edge.

    ``out[y, x] = arr[clip(y - dy), clip(x - dx)]``: the same as ``np.roll`` except that the columns (rows) that
    roll would wrap around are copies of the nearest edge column (row) instead (edge replication).
    """
    h, w = arr.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return arr[ys][:, xs]


def hflip(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[:, ::-1])


def crop_resize(arr: np.ndarray, k: int, where: str = "sides") -> np.ndarray:
    """Crop k px and resize back to the original size with bicubic.

    ``sides``: k px off every side (a centred (H-2k) x (W-2k) crop, i.e. a zoom by H/(H-2k)); ``corner``: k px
    off the right and the bottom only (the top-left (H-k) x (W-k) corner).
    """
    from PIL import Image

    h, w = arr.shape[:2]
    if where == "sides":
        box = (k, k, w - k, h - k)
    elif where == "corner":
        box = (0, 0, w - k, h - k)
    else:
        raise ValueError(f"crop where={where!r}: expected 'sides' or 'corner'")
    img = Image.fromarray(arr).crop(box).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img)


def brightness(arr: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Brightness: every channel value times ``factor`` (1.1 = +10%), clipped to 0..255."""
    from PIL import Image, ImageEnhance

    return np.asarray(ImageEnhance.Brightness(Image.fromarray(arr)).enhance(factor))


def contrast(arr: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Contrast: away from (factor > 1) the image's mean grey level, 1.15 = +15%."""
    from PIL import Image, ImageEnhance

    return np.asarray(ImageEnhance.Contrast(Image.fromarray(arr)).enhance(factor))


def grey_tint(arr: np.ndarray, alpha: float) -> np.ndarray:
    """A translucent mid-grey overlay: ``(1 - alpha) * arr + alpha * 128``, rounded."""
    out = (1.0 - alpha) * arr.astype(np.float32) + alpha * GREY
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def desaturate(arr: np.ndarray, amount: float) -> np.ndarray:
    """Towards greyscale: PIL ImageEnhance.Color(1 - amount); amount 1 = fully grey (ITU-R 601 luma), kept RGB."""
    from PIL import Image, ImageEnhance

    return np.asarray(ImageEnhance.Color(Image.fromarray(arr)).enhance(1.0 - amount))


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_jpeg(arr: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """Pillow's JPEG encoder at ``quality`` (its default 4:2:0 chroma subsampling)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class Plant:
    """One (kind, strength): how a planted test copy is made from the bytes of a train image."""

    kind: str
    strength: str
    what: str
    steps: tuple = ()               # ((fn name, kwargs), ...) applied in order on the decoded RGB array
    quality: int = DEFAULT_QUALITY  # JPEG quality of the planted file
    byte_copy: bool = False         # copy the file's bytes, no decode

    def apply(self, data: bytes) -> bytes:
        if self.byte_copy:
            return bytes(data)
        arr = decode(data)
        for name, kwargs in self.steps:
            arr = TRANSFORMS[name](arr, **kwargs)
        return encode_jpeg(arr, self.quality)


TRANSFORMS = {"translate": translate, "hflip": hflip, "crop_resize": crop_resize, "brightness": brightness,
              "contrast": contrast, "grey_tint": grey_tint, "desaturate": desaturate}


def _plants() -> tuple[Plant, ...]:
    p: list[Plant] = [Plant("exact", "bytes", "byte-identical copy of the file", byte_copy=True)]
    # not q75: the CIFAR files are Pillow JPEGs at about q75, and re-encoding one at q75 gave the very same bytes
    # for 2 of 5 images tried (a second byte-exact plant, not a re-encode)
    for q in (90, 70, 50, 30):
        p.append(Plant("jpeg", f"q{q}", f"decode, re-encode as JPEG quality {q}", quality=q))
    for f in (1.10, 1.20, 1.30, 0.90):
        p.append(Plant("brightness", f"{f - 1:+.0%}", f"PIL Brightness x{f:g} (values times {f:g}, clipped)",
                       (("brightness", {"factor": f}),)))
    for f in (1.15, 1.30, 1.50, 0.85):
        p.append(Plant("contrast", f"{f - 1:+.0%}", f"PIL Contrast x{f:g} (about the image's mean grey)",
                       (("contrast", {"factor": f}),)))
    for a in (0.10, 0.20, 0.30):
        p.append(Plant("grey_tint", f"{a:.0%}", f"mid-grey (128) overlay at alpha {a:g}",
                       (("grey_tint", {"alpha": a}),)))
    for a in (0.5, 1.0):
        p.append(Plant("greyscale", f"{a:.0%}", f"desaturated by {a:.0%} (PIL Color {1 - a:g}), kept RGB",
                       (("desaturate", {"amount": a}),)))
    for k in (1, 2, 3):
        p.append(Plant("translate", f"{k}px", f"content shifted {k} px right, left border edge-replicated",
                       (("translate", {"dx": k}),)))
    for k in (2, 4):
        p.append(Plant("crop", f"{k}px", f"{k} px off every side ({SIZE - 2 * k}x{SIZE - 2 * k} centre), "
                       f"bicubic back to {SIZE}x{SIZE}", (("crop_resize", {"k": k, "where": "sides"}),)))
    for k in (2, 4):
        p.append(Plant("crop_corner", f"{k}px", f"{k} px off the right and bottom (top-left "
                       f"{SIZE - k}x{SIZE - k}), bicubic back to {SIZE}x{SIZE}",
                       (("crop_resize", {"k": k, "where": "corner"}),)))
    p.append(Plant("flip", "h", "horizontal flip", (("hflip", {}),)))
    for k in (1, 2):
        p.append(Plant("flip", f"h+{k}px", f"horizontal flip, then shifted {k} px right (edge-replicated)",
                       (("hflip", {}), ("translate", {"dx": k}))))
    for q in (75, 50):
        p.append(Plant("flip", f"h+q{q}", f"horizontal flip, saved as JPEG quality {q}", (("hflip", {}),),
                       quality=q))
    return tuple(p)


PLANTS = _plants()


# ---------------------------------------------------------------- the source folder
def cifar_files(root: Path, split: str) -> list[tuple[str, str]]:
    """(path relative to the CIFAR root, class) of every JPEG of one CIFAR split, sorted."""
    out = []
    for cls in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
        out += [(f"{split}/{cls}/{f.name}", cls) for f in sorted((root / split / cls).glob("*.jpg"))]
    return out


def build_source(cifar: Path, src: Path, n_train: int, n_test: int, per_kind: int, seed: int) -> dict:
    """Lay out the source folder and return the ground truth (also what each file is)."""
    rng = np.random.default_rng(seed)
    train_all, test_all = cifar_files(cifar, "train"), cifar_files(cifar, "test")
    if n_train > len(train_all) or n_test > len(test_all):
        raise SystemExit(f"leakage: --train {n_train} / --test {n_test}: CIFAR-10 has {len(train_all)} / "
                         f"{len(test_all)}")
    n_plants = per_kind * len(PLANTS)
    if n_plants > n_train:
        raise SystemExit(f"leakage: {len(PLANTS)} plants x --per-kind {per_kind} = {n_plants} originals, more "
                         f"than --train {n_train} (an original is never reused)")
    train = [train_all[i] for i in sorted(rng.choice(len(train_all), n_train, replace=False))]
    test = [test_all[i] for i in sorted(rng.choice(len(test_all), n_test, replace=False))]
    originals = rng.choice(n_train, n_plants, replace=False)

    shutil.rmtree(src, ignore_errors=True)
    # names: a seeded shuffle of numbers, shared by real and planted test files, so a name reveals nothing
    train_names = rng.permutation(n_train)
    entries: dict[str, dict] = {}   # absolute path -> what it is
    t0 = time.perf_counter()
    for (rel, cls), num in zip(train, train_names):
        dest = src / "train" / cls / f"{num:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cifar / rel, dest)
        entries[str(dest.resolve())] = {"split": "train", "label": cls, "cifar": rel, "planted": False}
    train_paths = list(entries)

    test_jobs = [("real", rel, cls, None) for rel, cls in test]
    for j, plant in enumerate(PLANTS):
        for i in originals[j * per_kind:(j + 1) * per_kind]:
            rel, cls = train[i]
            test_jobs.append(("planted", rel, cls, (plant, train_paths[i])))
    test_names = rng.permutation(len(test_jobs))
    planted = []
    for k, ((what, rel, cls, extra), num) in enumerate(zip(test_jobs, test_names)):
        dest = src / "test" / cls / f"{num:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if what == "real":
            shutil.copyfile(cifar / rel, dest)
            entries[str(dest.resolve())] = {"split": "test", "label": cls, "cifar": rel, "planted": False}
        else:
            plant, original = extra
            data = (cifar / rel).read_bytes()
            made = plant.apply(data)
            dest.write_bytes(made)
            key = str(dest.resolve())
            entries[key] = {"split": "test", "label": cls, "cifar": rel, "planted": True,
                            "kind": plant.kind, "strength": plant.strength, "original": original}
            planted.append({"test": key, "original": original, "kind": plant.kind, "strength": plant.strength,
                            "label": cls, "original_cifar": rel, "byte_identical": made == data})
        if (k + 1) % 2000 == 0:
            log(f"planting: {k + 1}/{len(test_jobs)} test files written")
    took = time.perf_counter() - t0
    same = sum(p["byte_identical"] for p in planted if p["kind"] != "exact")
    if same:
        log(f"NOTE: {same} planted file(s) of a transforming kind came out byte-identical to their original "
            "(see byte_identical in the JSON)")
    log(f"source folder {src}: {n_train} train, {n_test} real test + {len(planted)} planted "
        f"({len(PLANTS)} plants x {per_kind}) in {took:.1f} s")
    return {"source": str(src.resolve()), "planted": planted, "files": entries, "build_s": round(took, 2)}


# ---------------------------------------------------------------- flagged pairs from each method
@dataclass
class Flagged:
    test: str                   # absolute path of the test-side file
    train: str                  # absolute path of the train-side file
    checks: set[str]
    score: float | None


def _as_path(uri: str, root: Path) -> str:
    if uri.startswith("file://"):
        return str(Path(unquote(urlparse(uri).path)).resolve())
    p = Path(uri)
    return str((p if p.is_absolute() else root / p).resolve())


class ReportFormatError(RuntimeError):
    pass


def keel_pairs(report: dict, root: Path, report_path: str) -> list[Flagged]:
    """The train<->test pairs of keel's leakage report (the per-pair contract: report["pairs"])."""
    if not isinstance(report.get("pairs"), list):
        raise ReportFormatError(
            f"{report_path} has no 'pairs' list (top-level keys: {sorted(report)}). This benchmark reads the "
            "per-pair leakage report: pairs = [{check, score, a: {id, uri, source_split, split, label}, b: {...}}]. "
            "The split stage in this tree still writes the old format; nothing is guessed from it. Run with "
            "--methods phash for the imagededup side alone.")
    out: dict[tuple[str, str], Flagged] = {}
    for n, pair in enumerate(report["pairs"]):
        try:
            a, b, check = pair["a"], pair["b"], pair["check"]
            sides = {a["source_split"]: a, b["source_split"]: b}
        except (KeyError, TypeError) as exc:
            raise ReportFormatError(f"{report_path}: pairs[{n}] lacks {exc}: {pair!r}") from None
        if set(sides) != {"train", "test"}:
            continue
        t, r = _as_path(sides["test"]["uri"], root), _as_path(sides["train"]["uri"], root)
        f = out.setdefault((t, r), Flagged(t, r, set(), None))
        f.checks.add(check)
        score = pair.get("score")
        if score is not None and (f.score is None or score < f.score):
            f.score = float(score)
    return list(out.values())


def run_keel(src: Path, run_dir: Path, workers: int) -> tuple[dict, list[Flagged]]:
    from tasks import ingest, split
    from tasks.core.config import IngestConfig, SplitConfig

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    paths = _paths(run_dir)
    cfg_i, cfg_s = IngestConfig(source=str(src), workers=workers), SplitConfig()
    rec: dict = {"configs": {"ingest": cfg_i.model_dump(mode="json"), "split": cfg_s.model_dump(mode="json")}}
    for name, fn in (("ingest", lambda: ingest.run(cfg_i, paths)), ("split", lambda: split.run(cfg_s, paths))):
        log(f"keel: --- {name} ---")
        m, result = measure(fn, lambda r: None)
        m["result"] = {k: v for k, v in vars(result).items()} if result is not None else None
        rec[name] = m
        log(f"keel: {name}: {m['status']} in {m['wall_s']:.1f} s")
        if m["status"] != "ok":
            raise RuntimeError(f"keel {name} did not finish: {m.get('error') or m.get('gate_message')}")
    report = json.loads(Path(paths.leakage_report).read_text())
    pairs = keel_pairs(report, src, paths.leakage_report)
    rec["report_summary"] = {k: v for k, v in report.items() if not isinstance(v, list)}
    rec["report_pairs"] = len(report["pairs"])
    rec["checks_seen"] = sorted({p.get("check") for p in report["pairs"] if isinstance(p, dict)})
    rec["originals_out_of_train"] = _originals_out_of_train(paths)
    return rec, pairs


def _originals_out_of_train(paths) -> dict | None:
    """id -> split from the manifest joined to id -> source uri from raw items (None when that fails)."""
    try:
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        raw = ds.dataset(paths.raw_items, format="parquet").to_table(columns=["id", "source_uri"])
        man = pq.read_table(paths.split_manifest, columns=["id", "split"])
        split_of = dict(zip(man.column("id").to_pylist(), man.column("split").to_pylist()))
        return {u: split_of.get(i) for i, u in zip(raw.column("id").to_pylist(),
                                                    raw.column("source_uri").to_pylist())}
    except Exception as exc:  # noqa: BLE001 - a secondary figure; the pairs are the measurement
        log(f"keel: could not join manifest to raw items ({type(exc).__name__}: {exc}); skipped")
        return None


def hamming_hex(h1: str, h2: str) -> int:
    return (int(h1, 16) ^ int(h2, 16)).bit_count()


def run_phash(src: Path) -> tuple[dict, list[Flagged], dict[str, str]]:
    t0 = time.perf_counter()
    import imagededup
    from imagededup.methods import PHash

    import_s = time.perf_counter() - t0
    log(f"phash: imported imagededup {imagededup.__version__} in {import_s:.1f} s (torch comes with it; untimed)")
    hasher = PHash()
    state: dict = {}

    def work():
        t = time.perf_counter()
        log("phash: encode_images (recursive) ...")
        enc = hasher.encode_images(image_dir=str(src), recursive=True)
        state["encode_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        log(f"phash: {len(enc)} hashes; find_duplicates (default threshold) ...")
        state["dups"] = hasher.find_duplicates(encoding_map=enc, scores=True)
        state["find_s"] = round(time.perf_counter() - t, 3)
        return enc

    m, enc = measure(work, lambda e: len(e))
    if m["status"] != "ok":
        raise RuntimeError(f"imagededup PHash failed: {m.get('error')}")
    import inspect

    thresh = inspect.signature(PHash.find_duplicates).parameters["max_distance_threshold"].default
    rec = {**m, "import_s": round(import_s, 2), "encode_s": state["encode_s"], "find_duplicates_s": state["find_s"],
           "max_distance_threshold": thresh, "hashes": len(enc), "import_path": "imagededup.methods.PHash"}
    out: dict[tuple[str, str], Flagged] = {}
    for q, hits in state["dups"].items():
        for other, score in hits:
            sides = {Path(q).parts[0]: q, Path(other).parts[0]: other}
            if set(sides) != {"train", "test"}:
                continue
            t, r = _as_path(sides["test"], src), _as_path(sides["train"], src)
            out.setdefault((t, r), Flagged(t, r, {"phash"}, float(score)))
    rec["pairs_all"] = sum(len(v) for v in state["dups"].values()) // 2
    encodings = {_as_path(k, src): v for k, v in enc.items()}
    return rec, list(out.values()), encodings


# ---------------------------------------------------------------- metrics
def score_method(truth: dict, flagged: list[Flagged]) -> dict:
    files = truth["files"]
    found = {(f.test, f.train): f for f in flagged}
    per_plant: dict[tuple[str, str], dict] = {}
    per_kind: dict[str, dict] = {}
    hit_list = []
    for p in truth["planted"]:
        f = found.get((p["test"], p["original"]))
        hit_list.append(f is not None)
        for d in (per_plant.setdefault((p["kind"], p["strength"]), {"planted": 0, "found": 0}),
                  per_kind.setdefault(p["kind"], {"planted": 0, "found": 0})):
            d["planted"] += 1
            d["found"] += f is not None
    for d in (*per_plant.values(), *per_kind.values()):
        d["recall"] = round(d["found"] / d["planted"], 4) if d["planted"] else None
    true_pairs = sum(hit_list)
    originals = {p["test"]: p["original"] for p in truth["planted"]}
    other, unplanted = [], []
    for f in flagged:
        if f.test in originals:
            if originals[f.test] != f.train:
                other.append(f)
        elif not files.get(f.train, {}).get("planted"):
            unplanted.append(f)
    total = len(flagged)
    strict = true_pairs / total if total else None

    def pair_json(f: Flagged, n: int | None = None) -> dict:
        ft, fr = files.get(f.test, {}), files.get(f.train, {})
        d = {"test": f.test, "train": f.train, "checks": sorted(f.checks), "score": f.score,
             "test_cifar": ft.get("cifar"), "train_cifar": fr.get("cifar"),
             "test_label": ft.get("label"), "train_label": fr.get("label")}
        if n is not None:
            d["picture_index"] = n
        if f.test in originals:
            d["planted_kind"], d["planted_strength"] = ft.get("kind"), ft.get("strength")
        return d

    unplanted.sort(key=lambda f: (f.score is None, f.score if f.score is not None else 0, f.test))
    return {
        "per_plant": [{"kind": k, "strength": s, **v} for (k, s), v in per_plant.items()],
        "per_kind": per_kind,
        "planted": len(truth["planted"]),
        "planted_found": true_pairs,
        "recall": round(true_pairs / len(truth["planted"]), 4) if truth["planted"] else None,
        "flagged_cross_split_pairs": total,
        "flagged_planted_to_its_original": true_pairs,
        "flagged_planted_to_another_train_image": len(other),
        "flagged_unplanted": len(unplanted),
        "precision_strict": round(strict, 4) if strict is not None else None,
        "precision_strict_note": "planted pairs found / all flagged train<->test pairs: every unplanted pair and "
                                 "every planted file linked to a train image other than its original counts false",
        "precision_planted_only": (round(true_pairs / (true_pairs + len(other)), 4)
                                   if true_pairs + len(other) else None),
        "unplanted_judged_genuine": None,
        "unplanted_judged_note": "fill in by hand after looking at the picture: how many of the unplanted pairs "
                                 "are genuine duplicates; precision_judged = (planted_found + that) / "
                                 "flagged_cross_split_pairs",
        "precision_judged": None,
        "checks_of_found": _count_checks([found[(p["test"], p["original"])] for p, h
                                          in zip(truth["planted"], hit_list) if h]),
        "planted_found_flags": hit_list,  # aligned with truth["planted"]; popped into report["planted_pairs"]
        "unplanted_pairs": [pair_json(f, n) for n, f in enumerate(unplanted)],
        "planted_to_other_pairs": [pair_json(f) for f in other],
    }


def _count_checks(fs: list[Flagged]) -> dict:
    out: dict[str, int] = {}
    for f in fs:
        key = "+".join(sorted(f.checks))
        out[key] = out.get(key, 0) + 1
    return out


def phash_distances(truth: dict, enc: dict[str, str]) -> dict:
    """imagededup PHash Hamming distance of every planted pair, per (kind, strength): how far each plant moves it."""
    dist: dict[tuple[str, str], list[int]] = {}
    for p in truth["planted"]:
        a, b = enc.get(p["test"]), enc.get(p["original"])
        if a and b:
            dist.setdefault((p["kind"], p["strength"]), []).append(hamming_hex(a, b))
    return {f"{k}|{s}": {"min": min(v), "median": float(np.median(v)), "max": max(v)} for (k, s), v in dist.items()}


# ---------------------------------------------------------------- picture of the unplanted pairs
def draw_pairs(pairs: list[dict], dest: Path, title: str, max_pairs: int, scale: int = 4, cols: int = 4) -> dict:
    from PIL import Image, ImageDraw, ImageFont

    shown = pairs[:max_pairs]
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # an old Pillow without a scalable default font
        font = ImageFont.load_default()
    side = SIZE * scale
    tile_w, cap_h, pad = 2 * side + 12, 44, 10
    tile_h = side + cap_h
    cols = max(1, min(cols, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    head = 28
    more = f" (first {len(shown)} of {len(pairs)}, lowest score first)" if len(pairs) > len(shown) else ""
    text = f"{title}: {len(pairs)} unplanted train<->test pairs{more}; left test, right train"
    width = max(cols * (tile_w + pad) + pad, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font))
                + 2 * pad)
    sheet = Image.new("RGB", (width, head + rows * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), text, fill="black", font=font)
    for n, p in enumerate(shown):
        x0 = pad + (n % cols) * (tile_w + pad)
        y0 = head + pad + (n // cols) * (tile_h + pad)
        for k, path in enumerate((p["test"], p["train"])):
            img = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(img, (x0 + k * (side + 12), y0))
        score = "-" if p["score"] is None else f"{p['score']:g}"
        lines = [f"#{n} {'+'.join(p['checks'])} score {score}",
                 f"L {p['test_cifar']} ({Path(p['test']).name})",
                 f"R {p['train_cifar']} ({Path(p['train']).name})"]
        for i, line in enumerate(lines):
            draw.text((x0, y0 + side + 3 + i * 13), line, fill="black", font=font)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, dest)
    return {"path": str(dest), "pairs_shown": len(shown), "pairs_total": len(pairs)}


# ---------------------------------------------------------------- report
def print_table(report: dict) -> None:
    methods = [m for m in METHODS if m in report["methods"]]
    res = {m: report["methods"][m]["scores"] for m in methods}
    rows = [("kind", "strength", "planted", *[f"{m} found" for m in methods])]
    left = report["methods"].get("keel", {}).get("planted_pairs_across_splits_per_plant")
    if left is not None:
        rows[0] += ("keel left across",)
    if "phash" in methods:
        rows[0] += ("phash dist med (max)",)
    dists = report["methods"].get("phash", {}).get("planted_pair_distance", {})

    for pl in report["plants"]:
        k, s = pl["kind"], pl["strength"]

        def d_of(m, k=k, s=s):
            return next(r for r in res[m]["per_plant"] if r["kind"] == k and r["strength"] == s)

        row = (k, s, str(pl["planted"]), *[f"{d_of(m)['found']} ({d_of(m)['recall']:.0%})" for m in methods])
        if left is not None:
            row += (str(left.get(f"{k}|{s}", 0)),)
        if "phash" in methods:
            d = dists.get(f"{k}|{s}")
            row += (f"{d['median']:g} ({d['max']})" if d else "-",)
        rows.append(row)
    rows.append(("-",) * len(rows[0]))
    for k in dict.fromkeys(p["kind"] for p in report["plants"]):
        planted = next(iter(res.values()))["per_kind"][k]["planted"]
        row = (k, "all", str(planted), *[f"{res[m]['per_kind'][k]['found']} "
                                          f"({res[m]['per_kind'][k]['recall']:.0%})" for m in methods])
        if left is not None:
            row += (str(sum(v for key, v in left.items() if key.split("|")[0] == k)),)
        rows.append(row + (("",) if "phash" in methods else ()))
    total = report["planted"]
    row = ("TOTAL", "", str(total), *[f"{res[m]['planted_found']} ({res[m]['recall']:.0%})" for m in methods])
    if left is not None:
        row += (str(sum(left.values())),)
    rows.append(row + (("",) if "phash" in methods else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    d = report["dataset"]
    g = report["git"]
    print(f"\nleakage: CIFAR-10 subset {d['train']} train + {d['test']} real test + {total} planted "
          f"(seed {d['seed']}), commit {g['commit']}{' (dirty)' if g.get('dirty') else ''}")
    for n, r in enumerate(rows):
        if r[0] == "-":
            print("  ".join("-" * w for w in widths))
            continue
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if left is not None:
        print("keel left across: planted pairs whose test file stayed in test and whose original stayed in "
              "train/val after split (from the manifest, not the report)")
    print()
    for m in methods:
        s, rec = res[m], report["methods"][m]
        prec = "-" if s["precision_strict"] is None else f"{s['precision_strict']:.1%}"
        pp = "-" if s["precision_planted_only"] is None else f"{s['precision_planted_only']:.1%}"
        print(f"{m}: flagged train<->test pairs {s['flagged_cross_split_pairs']} = planted to its original "
              f"{s['flagged_planted_to_its_original']} + planted to another train image "
              f"{s['flagged_planted_to_another_train_image']} + unplanted (real CIFAR) {s['flagged_unplanted']}; "
              f"precision strict {prec}, among planted files {pp}")
        print(f"{m}: {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s CPU, peak RSS {rec['peak_rss_tree_mb']:,.0f} MB "
              f"(process tree; {rec['rss_start_mb']:,.0f} MB at start)  [{rec['what']}]")
        if rec.get("picture"):
            print(f"{m}: unplanted pairs drawn in {rec['picture']['path']} (judge them; "
                  "unplanted_judged_genuine in the JSON)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=10_000, help="train images drawn from CIFAR-10 (default %(default)s)")
    p.add_argument("--test", type=int, default=2_000, help="real test images drawn (default %(default)s)")
    p.add_argument("--per-kind", type=int, default=20,
                   help="planted copies per (kind, strength), each from its own train image (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="subset, originals and file names (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: keel, phash (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="keel ingest workers (default %(default)s); imagededup "
                   "runs at its defaults (all CPUs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="unpacked CIFAR (cached), the source folder, ground truth, keel's run dir; default: a temp "
                        "dir, removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the source folder and keel's run dir in --workdir")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default bench/out/leakage-<date>-<commit>.json); pictures go beside it")
    p.add_argument("--max-picture", type=int, default=200, help="most unplanted pairs drawn per method")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if min(args.train, args.test, args.per_kind) < 1:
        p.error("--train, --test and --per-kind must be >= 1")
    if not CIFAR_TARBALL.exists():
        print(f"leakage: {CIFAR_TARBALL} not found; this benchmark needs the CIFAR-10 JPEG tarball "
              "(see ../shared/datasets/README.md)", file=sys.stderr)
        return 2

    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keel-leakage-")) if temp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    src, run_dir = workdir / "leakage-src", workdir / "leakage-run"
    git = git_info()
    from tasks.core.lineage import code_version

    g2 = code_version(REPO, under="bench")
    git.update(bench_dirty=g2["bench_dirty"], bench_changes=g2["bench_changes"])
    git["dirty"] = bool(git.get("tasks_dirty") or git.get("bench_dirty"))
    date = _dt.datetime.now(_dt.UTC)
    out_path = args.out or REPO / "bench" / "out" / f"leakage-{date:%Y%m%d}-{git['commit'] or 'nocommit'}.json"
    try:
        cifar, unpack_s = unpack_cifar(workdir / "datasets" / "cifar10")
        truth = build_source(cifar, src, args.train, args.test, args.per_kind, args.seed)
        truth_path = workdir / "leakage-truth.json"
        truth_path.write_text(json.dumps({"source": truth["source"], "planted": truth["planted"]}, indent=1))
        log(f"ground truth: {truth_path}")

        report = {
            "benchmark": "bench/leakage.py", "schema": 1,
            "date": date.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
            "git": git, "machine": machine_info(),
            "versions": versions(("numpy", "pillow", "pyarrow", "imagededup", "PyWavelets", "torch", "scipy",
                                  "psutil")),
            "dataset": {"train": args.train, "test": args.test, "seed": args.seed, "per_kind": args.per_kind,
                        "cifar_unpack_s": round(unpack_s, 2), "source_build_s": truth["build_s"],
                        "source": truth["source"], "ground_truth": str(truth_path)},
            "plants": [{"kind": pl.kind, "strength": pl.strength, "what": pl.what,
                        "quality": None if pl.byte_copy else pl.quality, "planted": args.per_kind,
                        "byte_identical_to_original": sum(p["byte_identical"] for p in truth["planted"]
                                                          if (p["kind"], p["strength"]) == (pl.kind, pl.strength))}
                       for pl in PLANTS],
            "planted": len(truth["planted"]),
            "conventions": {
                "jpeg": f"every planted file but 'exact' is decoded to RGB, transformed, saved by Pillow as JPEG "
                        f"quality {DEFAULT_QUALITY} (unless the plant gives a quality), default 4:2:0 subsampling",
                "translate": "content shifted right by k px; the k uncovered columns repeat the edge column",
                "crop": "crop: k px off every side; crop_corner: k px off the right and bottom; both bicubic "
                        "back to 32x32",
                "found": "a planted pair is found when a flagged train<->test pair links the planted test file to "
                         "its own original train file",
                "names": "every file is renamed to a seeded shuffled number; truth lives outside the source folder",
            },
            "rss_method": "psutil every 50 ms in a thread (bench/data_stages.measure): this process and its "
                          "descendants (tree); the methods run one after the other in one process, keel first "
                          "(imagededup, and the torch it imports, are loaded only after keel has run)",
            "methods": {},
        }
        flagged: dict[str, list[Flagged]] = {}
        if "keel" in methods:
            try:
                rec, flagged["keel"] = run_keel(src, run_dir, args.workers)
            except ReportFormatError as exc:
                print(f"leakage: keel: cannot measure: {exc}", file=sys.stderr)
                return 3
            walls = [rec[s]["wall_s"] for s in ("ingest", "split")]
            rec.update(wall_s=round(sum(walls), 3),
                       cpu_s=round(sum(rec[s]["cpu_self_s"] + rec[s]["cpu_workers_s"] for s in ("ingest", "split")), 3),
                       peak_rss_tree_mb=max(rec[s]["peak_rss_tree_mb"] for s in ("ingest", "split")),
                       rss_start_mb=rec["ingest"]["rss_start_mb"],
                       what="ingest (decode, features, audit, raw items) + split (units, manifest, report), "
                            "default configs")
            report["methods"]["keel"] = rec
        if "phash" in methods:
            rec, flagged["phash"], enc = run_phash(src)
            rec["cpu_s"] = round(rec["cpu_self_s"] + rec["cpu_workers_s"], 3)
            rec["what"] = f"imagededup PHash defaults: encode_images + find_duplicates(max_distance_threshold=" \
                          f"{rec['max_distance_threshold']})"
            rec["planted_pair_distance"] = phash_distances(truth, enc)
            report["methods"]["phash"] = rec
        for m, fl in flagged.items():
            rec = report["methods"][m]
            if m == "keel" and rec.get("originals_out_of_train") is not None:
                where = rec.pop("originals_out_of_train")
                srcp = Path(truth["source"])
                split_of = {_as_path(u, srcp): s for u, s in where.items()}
                left = [split_of.get(p["original"]) in ("train", "val") and split_of.get(p["test"]) == "test"
                        for p in truth["planted"]]
                rec["planted_pairs_still_across_splits"] = sum(left)
                rec["planted_pairs_still_across_splits_note"] = (
                    "planted pairs whose test file is in test and whose original is in train or val after split "
                    "(an item rejected at ingest, e.g. the second of two byte-identical files, or excluded by "
                    "split is in neither): the leaks the split left in place")
                rec["planted_pairs_across_splits_per_plant"] = {}
                for pl, lk in zip(truth["planted"], left):
                    key = f"{pl['kind']}|{pl['strength']}"
                    rec["planted_pairs_across_splits_per_plant"][key] = \
                        rec["planted_pairs_across_splits_per_plant"].get(key, 0) + lk
            else:
                rec.pop("originals_out_of_train", None)
            rec["scores"] = score_method(truth, fl)
            unpl = rec["scores"]["unplanted_pairs"]
            if unpl:
                rec["picture"] = draw_pairs(unpl, out_path.parent / f"leakage_unplanted_{m}.png",
                                            f"{m} ({rec['what']})", args.max_picture)
            else:
                rec["picture"] = None
        pairs = [dict(pl) for pl in truth["planted"]]
        for m in flagged:
            for pl, hit in zip(pairs, report["methods"][m]["scores"].pop("planted_found_flags")):
                pl.setdefault("found", {})[m] = hit
        if "phash" in flagged:
            for pl in pairs:
                a, b = enc.get(pl["test"]), enc.get(pl["original"])
                pl["phash_distance"] = hamming_hex(a, b) if a and b else None
        report["planted_pairs"] = pairs
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out_path)
        print_table(report)
        print(f"leakage: wrote {out_path}")
        return 0
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
