"""The data audit written by ingest: counts, distributions, duplicates, and a labelled contact sheet.

reports/audit/audit.json (machine-readable), audit.md (for a person), class_counts.png, resolution.png,
brightness.png and contact_sheet.png (100 seeded random items with their labels: the label sanity check).
"""
from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core import dedup, io
from tasks.core.config import IngestConfig, Paths
from tasks.core.text import pyplot, save_png

TILE = 72  # contact-sheet tile size in pixels


def write_audit(cfg: IngestConfig, paths: Paths, result) -> dict:
    meta = io.read_raw_meta(paths.raw_items)
    out = Path(paths.audit_dir)
    labels = np.asarray(meta.column("label").to_pylist(), dtype=object)
    classes, counts = np.unique(labels.astype(str), return_counts=True)
    w = meta.column("width").to_numpy()
    h = meta.column("height").to_numpy()
    bright = meta.column("brightness").to_numpy()
    contrast = meta.column("contrast").to_numpy()
    dup = dedup.duplicate_structure(np.asarray(meta.column("pixel_sha").to_pylist(), dtype=object),
                                    meta.column("phash").to_numpy(), cfg.near_dup_max_distance)
    exact_groups = _group_sizes(len(meta), dup["exact_edges"])
    near_groups = _group_sizes(len(meta), dup["near_edges"])
    ids = meta.column("id").to_pylist()
    uris = meta.column("source_uri").to_pylist()
    sample_pairs = [{"a": uris[a], "b": uris[b], "label_a": labels[a], "label_b": labels[b]}
                    for a, b in dup["near_edges"][:20]]
    per_class = {}
    for c in classes:
        m = labels == c
        per_class[str(c)] = {
            "count": int(m.sum()),
            "width": _stats(w[m]), "height": _stats(h[m]),
            "brightness": _stats(bright[m]), "contrast": _stats(contrast[m]),
        }
    modes = pc.value_counts(meta.column("mode")).to_pylist()
    report = {
        "source": cfg.source,
        "found": result.found, "ingested": result.ingested, "rejected": result.rejected,
        "reject_reasons": result.reject_counts,
        "classes": [str(c) for c in classes],
        "class_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else None,
        "modes": {m["values"]: m["counts"] for m in modes},
        "per_class": per_class,
        "duplicates": {
            "byte_identical_rejected": result.reject_counts.get("duplicate_bytes", 0),
            "conflicting_labels_rejected": result.reject_counts.get("conflicting_labels", 0),
            "pixel_identical_groups": int((exact_groups > 1).sum()),
            "pixel_identical_items": int(exact_groups[exact_groups > 1].sum()),
            "near_duplicate_groups": int((near_groups > 1).sum()),
            "near_duplicate_items": int(near_groups[near_groups > 1].sum()),
            "near_dup_max_distance": cfg.near_dup_max_distance,
            "sample_pairs": sample_pairs,
        },
        "label_conflicts_among_near_duplicates": int(sum(labels[a] != labels[b] for a, b in dup["near_edges"])),
    }
    with io.atomic_dir(out) as tmp:  # the folder as a whole: a kill mid-audit leaves no half audit at its name
        _plot_counts(tmp / "class_counts.png", classes, counts)
        _plot_resolution(tmp / "resolution.png", labels, classes, w, h)
        _plot_box(tmp / "brightness.png", labels, classes, bright, "mean brightness (0..255)")
        sheet = _contact_sheet(tmp / "contact_sheet.png", paths.raw_items, ids, labels, cfg.contact_sheet_items,
                               cfg.seed)
        report["contact_sheet"] = {"file": "contact_sheet.png", "seed": cfg.seed, "ids": sheet}
        io.write_json(tmp / "audit.json", report)
        io.write_text(tmp / "audit.md", _markdown(report))
    return report


def _group_sizes(n: int, edges: np.ndarray) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.int64)
    comp = dedup.components(n, edges)
    return np.bincount(comp)


def _stats(a: np.ndarray) -> dict:
    if a.size == 0:
        return {}
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return {"min": float(q[0]), "p5": float(q[1]), "median": float(q[2]), "p95": float(q[3]), "max": float(q[4]),
            "mean": float(a.mean())}


def _plot_counts(path: Path, classes, counts) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes) + 2), 3))
    ax.bar([str(c) for c in classes], counts, color="#4477aa")
    ax.set_ylabel("items")
    ax.set_title(f"items per class (imbalance {counts.max() / counts.min():.2f}x)" if len(counts) else "no items")
    ax.tick_params(axis="x", rotation=45)
    save_png(path, fig, dpi=100, bbox_inches="tight")


def _plot_resolution(path: Path, labels, classes, w, h) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    rng = np.random.default_rng(0)
    for c in classes:
        m = np.nonzero(labels == c)[0]
        if len(m) > 2000:
            m = rng.choice(m, 2000, replace=False)
        jitter = rng.normal(0, 0.15, size=(2, len(m)))
        ax.scatter(w[m] + jitter[0], h[m] + jitter[1], s=4, alpha=0.4, label=str(c))
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("resolution per class")
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=2)
    save_png(path, fig, dpi=100, bbox_inches="tight")


def _plot_box(path: Path, labels, classes, values, ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes) + 2), 3))
    ax.boxplot([values[labels == c] for c in classes], showfliers=False)
    ax.set_xticks(range(1, len(classes) + 1), [str(c) for c in classes], rotation=45)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per class")
    save_png(path, fig, dpi=100, bbox_inches="tight")


def _contact_sheet(path: Path, raw_dir: str, ids: list[str], labels, n: int, seed: int) -> list[str]:
    """A grid of ``n`` seeded random items, each captioned with its label and short id (PIL, no subplots)."""
    from PIL import Image, ImageDraw, ImageFont

    from tasks.core.imaging import normalise

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False).tolist())
    wanted = {ids[i]: labels[i] for i in pick}
    tiles: dict[str, Image.Image] = {}
    for part in io.raw_parts(raw_dir):
        t = pq.read_table(part, columns=["id", "image"], filters=[("id", "in", list(wanted))])
        for i, data in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            img = Image.open(_io.BytesIO(data))
            img.load()
            px = normalise(img)
            tile = Image.fromarray(px).convert("RGB")
            # small images are enlarged with nearest neighbour so pixels stay visible; large ones shrink
            scale = TILE / max(tile.size)
            tiles[i] = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                                   Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
    chosen = [i for i in (ids[j] for j in pick) if i in tiles]
    cols = 10
    rows = max(1, -(-len(chosen) // cols))
    cap, pad, head = 26, 6, 24
    sheet = Image.new("RGB", (cols * (TILE + pad) + pad, head + rows * (TILE + cap + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    draw.text((pad, 4), f"label sanity check: {len(chosen)} random items (seed {seed})", fill="black",
              font=ImageFont.load_default(size=14))
    for k, i in enumerate(chosen):
        x = pad + (k % cols) * (TILE + pad)
        y = head + (k // cols) * (TILE + cap + pad)
        t = tiles[i]
        sheet.paste(t, (x + (TILE - t.width) // 2, y + (TILE - t.height) // 2))
        draw.text((x, y + TILE + 1), str(wanted[i])[:16], fill="black", font=font)
        draw.text((x, y + TILE + 13), i[:10], fill="#777777", font=font)
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return chosen


def _markdown(r: dict) -> str:
    lines = [f"# Data audit: {r['source']}", "",
             f"found {r['found']} = ingested {r['ingested']} + rejected {r['rejected']}", ""]
    if r["reject_reasons"]:
        lines += ["| reject reason | items |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["reject_reasons"].items()]
        lines.append("")
    lines += [f"Imbalance ratio (largest/smallest class): **{r['imbalance_ratio']:.2f}**", "",
              "| class | items | width median | height median | brightness median | contrast median |",
              "|---|---|---|---|---|---|"]
    for c, s in r["per_class"].items():
        lines.append(f"| {c} | {s['count']} | {s['width']['median']:.0f} | {s['height']['median']:.0f} | "
                     f"{s['brightness']['median']:.1f} | {s['contrast']['median']:.1f} |")
    d = r["duplicates"]
    lines += ["", "## Duplicates", "",
              f"- byte-identical copies rejected: {d['byte_identical_rejected']}",
              f"- byte-identical copies with conflicting labels (none ingested): {d['conflicting_labels_rejected']}",
              f"- pixel-identical groups: {d['pixel_identical_groups']} ({d['pixel_identical_items']} items)",
              (f"- near-duplicate groups (pHash distance <= {d['near_dup_max_distance']}): "
              f"{d['near_duplicate_groups']} ({d['near_duplicate_items']} items)"),
              f"- near-duplicate pairs whose labels disagree: {r['label_conflicts_among_near_duplicates']}",
              "", "The split stage keeps every such group inside one split.", "",
              "![class counts](class_counts.png)", "![resolution](resolution.png)", "![brightness](brightness.png)",
              "", "## Label sanity check", "", "![contact sheet](contact_sheet.png)", ""]
    return "\n".join(lines)
