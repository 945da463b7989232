"""The leakage report: ``paths.leakage_report`` (JSON) and ``paths.leakage_picture`` (the flagged pairs, side by side).

``pairs`` lists every link between items the source put in different splits (those are the leaks a split must
resolve), byte-identical copies ingest folded into one item included, then up to ``MAX_WITHIN`` links inside one
source split, the least certain first.  Each pair names both files (source URI), their source split and final
split, labels, which check linked them and its score: ``ncc``/``detail`` for near duplicates (normalised
cross-correlation of the aligned thumbnails, shape and band-pass detail), ``transform`` (the alignment that
matched, e.g. "flip, shift (1, 0) px"), 1.0 for identical pixels or bytes.
"""
from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import io
from tasks.split.links import Links

MAX_WITHIN = 200
PICTURE_PAIRS = 32
TILE = 96


def _side(meta_rows: dict, splits: dict, i: int) -> dict:
    r = meta_rows
    return {"id": r["id"][i], "uri": r["source_uri"][i], "source_split": r["source_split"][i],
            "split": splits.get(r["id"][i]), "label": r["label"][i]}


def pairs(meta: pa.Table, manifest: pa.Table, links: Links, rejects: pa.Table | None) -> list[dict]:
    cols = {c: meta.column(c).to_pylist() for c in ("id", "source_uri", "source_split", "label")}
    splits = dict(zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist()))
    src = cols["source_split"]
    out: list[dict] = []
    within: list[dict] = []
    kinds = [("group", links.group, None), ("exact_pixels", links.exact_pixels, None), ("near", links.near, True)]
    for kind, edges, scored in kinds:
        for k, (a, b) in enumerate(np.asarray(edges).reshape(-1, 2).tolist()):
            p = {"check": kind, "score": 1.0 if kind == "exact_pixels" else None, "transform": None,
                 "a": _side(cols, splits, a), "b": _side(cols, splits, b)}
            if scored:
                ncc, det = float(links.near_ncc[k]), float(links.near_detail[k])
                p.update(score=None if np.isnan(ncc) else round(ncc, 4), detail=None if np.isnan(det) else round(det, 4),
                         transform=links.near_transform[k])
            p["cross_source_split"] = bool(src[a] and src[b] and src[a] != src[b])
            (out if p["cross_source_split"] else within).append(p)
    if rejects is not None and len(rejects) and "duplicate_of" in rejects.schema.names:
        index = {i: k for k, i in enumerate(cols["id"])}
        for r in rejects.to_pylist():
            kept = index.get(r.get("duplicate_of"))
            if kept is None:
                continue
            cross = bool(r.get("source_split") and src[kept] and r["source_split"] != src[kept])
            p = {"check": "exact_bytes", "score": 1.0, "transform": "byte-identical file (one item since ingest)",
                 "a": _side(cols, splits, kept),
                 "b": {"id": r["duplicate_of"], "uri": r["source_uri"], "source_split": r.get("source_split"),
                       "split": "rejected at ingest (duplicate_bytes)", "label": r["label"]},
                 "cross_source_split": cross}
            (out if cross else within).append(p)
    within.sort(key=lambda p: (p["score"] if p["score"] is not None else 2.0))
    return out + within[:MAX_WITHIN]


def picture(path: str | Path, raw_dir: str, chosen: list[dict], title: str) -> None:
    """Pairs side by side (left: a, right: b), captioned with the check, score, transform and file names."""
    from PIL import Image, ImageDraw, ImageFont

    from tasks.core.imaging import normalise

    wanted = {p["a"]["id"] for p in chosen} | {p["b"]["id"] for p in chosen}
    images: dict[str, Image.Image] = {}
    for part in (io.raw_parts(raw_dir) if wanted else []):
        t = pq.read_table(part, columns=["id", "image"], filters=[("id", "in", sorted(wanted))])
        for i, data in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            img = Image.open(_io.BytesIO(data))
            img.load()
            tile = Image.fromarray(normalise(img)).convert("RGB")
            resample = Image.Resampling.NEAREST if max(tile.size) < TILE else Image.Resampling.LANCZOS
            tile.thumbnail((TILE, TILE), resample) if max(tile.size) >= TILE else None
            if max(tile.size) < TILE:
                f = max(1, TILE // max(tile.size))
                tile = tile.resize((tile.width * f, tile.height * f), resample)
            images[i] = tile
    font = ImageFont.load_default()
    cell_w, cell_h, cols = 2 * TILE + 250, TILE + 8, 2
    rows = max(1, (len(chosen) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell_w, 28 + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title, fill="black", font=font)
    for k, p in enumerate(chosen):
        x, y = (k % cols) * cell_w, 28 + (k // cols) * cell_h
        for j, side in enumerate(("a", "b")):
            tile = images.get(p[side]["id"])
            if tile is not None:
                sheet.paste(tile, (x + j * (TILE + 2), y))
        score = "" if p["score"] is None else f" {p['score']:.3f}"
        detail = f" / {p['detail']:.3f}" if p.get("detail") is not None else ""
        lines = [f"{p['check']}{score}{detail}", (p.get("transform") or "")[:40],
                 f"a {p['a']['source_split'] or '-'} -> {p['a']['split']}: {_short(p['a']['uri'])}",
                 f"b {p['b']['source_split'] or '-'} -> {_short(str(p['b']['split']))}: {_short(p['b']['uri'])}",
                 f"labels {p['a']['label']} / {p['b']['label']}"]
        for li, text in enumerate(lines):
            draw.text((x + 2 * TILE + 8, y + li * 14), text, fill="black", font=font)
    if not chosen:
        draw.text((6, 40), "no duplicate links found", fill="black", font=font)
    buf = _io.BytesIO()
    sheet.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def _short(s: str, n: int = 34) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]
