"""The bad-input corpus: every awkward kind of input a user brings to `keel ingest`, run as a user runs it.

Each kind is a ``Case``: a name, the ingest run it belongs to, its named outcome and message fragments.

- ``ingested``: accepted (perhaps normalised: CMYK/palette/alpha -> RGB, 16-bit -> 8-bit, EXIF upright);
  the fragments must appear in the item's description (format, stored mode, upright size, channels, label);
- ``rejected:<reason>``: a row of the rejects table with that reason code (tasks.ingest.REASONS);
  the fragments must appear in its detail;
- ``refused``: the stage fails with ``keel ingest: error: ...`` on stderr, exit status 1, and leaves no
  raw table; the fragments must appear in that message.

Ingest is the real command (``python -m tasks.cli ingest --params params.yaml`` in a scratch project), so
"no traceback" is checked on real stderr, and the account the stage prints (``ingest: found N = ingested I
+ rejected R``) is checked against what the builders made: every file (or manifest row, or object) is found
and lands in exactly one table (no silent drop).  Files under a hidden folder are not items by rule (they
are never listed); the builders name them and the test checks that they are in neither table.  File-level
kinds share one run per source type (a folder, a CSV manifest); source-level kinds (empty, stray folder,
one class, S3 errors...) get one run each.  Every case is recorded (``record("bad_input", ...)``) for
docs/reliability.md.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.conftest import encode, pattern
from tests.stage.test_ingest_guarantees import _tree
from tests.stage.test_ingest_s3 import _dead_endpoint
from tests.support.s3server import s3_with_bucket

BUCKET = "keel-bad-inputs"
ACCOUNT = re.compile(r"^ingest: found (\d+) = ingested (\d+) \+ rejected (\d+)", re.MULTILINE)


# ---------------------------------------------------------------- what a case makes and what a run gives
@dataclass
class Made:
    """What one case put into its run's source.  ``subjects``: the uris whose outcome is the case's
    outcome (a uri repeats when a manifest names the same path twice); ``others``: further uris it created
    (counted in the account); ``skipped``: files that are not items by rule (under a hidden folder), in
    neither table; ``rows``: for a manifest run, the case's rows (path, label, split), whose uris become its
    subjects."""

    subjects: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    name: str
    run: str
    expected: str
    fragments: tuple[str, ...]
    make: Callable[..., Made] | None = (
        None  # file-level kinds of a shared run; None: the run itself is the case
    )


@dataclass
class Spec:
    """One ingest run: its source, the ingest settings beside it, the environment, what the builders made."""

    source: str
    ingest: dict = field(default_factory=dict)
    env: dict | None = None
    made: dict[str, Made] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    stop: Callable[[], None] | None = None


@dataclass
class Ran:
    spec: Spec
    rc: int
    stdout: str
    stderr: str
    seconds: float
    account: tuple[int, int, int] | None
    raw: dict[str, list[dict]]
    rejects: dict[str, list[dict]]
    raw_exists: bool

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr or "Traceback" in self.stdout

    @property
    def error(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("keel ingest: error:")]
        return lines[0] if lines else (self.stderr.strip().splitlines() or ["(no stderr)"])[-1]


# ---------------------------------------------------------------- image makers
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit grey pixels, with a few bytes of data: the shape
    of a decompression bomb (a tiny file that would inflate to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _cmyk_jpeg(seed: int) -> bytes:
    return _save(Image.fromarray(pattern(seed)).convert("CMYK"), "JPEG")


def _sixteen_bit_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _save(Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)), "PNG")


def _palette_png(seed: int) -> bytes:
    return _save(
        Image.fromarray(pattern(seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"
    )


def _rgba_png(seed: int) -> bytes:
    return encode(np.dstack([pattern(seed), np.full((16, 16), 128, np.uint8)]))


def _la_png(seed: int) -> bytes:
    return _save(
        Image.fromarray(np.dstack([pattern(seed, channels=1), np.full((16, 16), 60, np.uint8)]), "LA"), "PNG"
    )


def _animated_gif(seed: int) -> bytes:
    frames = [Image.fromarray(pattern(seed + k)).convert("P") for k in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated_jpeg(seed: int) -> bytes:
    """16 wide x 8 high as stored, with EXIF Orientation 6 (rotate 90 degrees): 8 x 16 upright, as a phone
    stores a photo taken upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(pattern(seed)[:8]), "JPEG", quality=90, exif=exif.tobytes())


def _garbage_exif_jpeg(seed: int) -> bytes:
    """A JPEG whose APP1 Exif block is noise (a broken camera or editor)."""
    jpg = encode(pattern(seed), "JPEG", quality=90)
    app1 = b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 10
    return jpg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpg[2:]


def _orientation_jpeg(seed: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(pattern(seed)), "JPEG", quality=90, exif=exif.tobytes())


def _multipage(seed: int, fmt: str) -> bytes:
    frames = [Image.fromarray(pattern(seed + k)) for k in range(2)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:])


def _huge_png() -> bytes:
    """A valid 6000 x 4000 (24 Mpx) greyscale PNG: big, under ingest.max_pixels, must be ingested."""
    img = Image.new("L", (6000, 4000), 40)
    img.paste(Image.fromarray(pattern(77, 64, 1)).resize((3000, 2000)), (1000, 1000))
    return _save(img, "PNG")


def _float_tiff(seed: int) -> bytes:
    return _save(Image.fromarray(np.random.default_rng(seed).random((16, 16), dtype=np.float32)), "TIFF")


def _ppm(seed: int) -> bytes:
    return _save(Image.fromarray(pattern(seed)), "PPM")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _files(root: Path, files: dict[str, bytes | int], **kw) -> Made:
    _tree(root, files)
    return Made(subjects=list(files), **kw)


# ---------------------------------------------------------------- run "folder": file-level kinds, one folder
def _symlink_out_file(root: Path) -> Made:
    outside = root.parent / "outside.png"
    outside.write_bytes(encode(pattern(130)))
    (root / "cat").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / "cat" / "escape.png")
    return Made(subjects=["cat/escape.png"])


def _symlink_out_folder(root: Path) -> Made:
    outside = _tree(root.parent / "outside_dir", {"x.png": 131, "y.png": 132})
    (root / "dog").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / "dog" / "linked", target_is_directory=True)
    return Made(subjects=["dog/linked"])


def _dangling_symlink(root: Path) -> Made:
    (root / "cat").mkdir(parents=True, exist_ok=True)
    os.symlink(root / "cat" / "deleted-long-ago.png", root / "cat" / "dangling.png")
    return Made(subjects=["cat/dangling.png"])


def _twins(files: dict[str, bytes]) -> Callable[[Path], Made]:
    return lambda root: _files(root, files)


_SAME = encode(pattern(140))
_SAME2 = encode(pattern(141))

FOLDER_BASE = {
    "cat/base0.png": 1,
    "cat/base1.jpg": encode(pattern(2), "JPEG", quality=90),
    "dog/base2.png": 3,
    "dog/base3.jpg": encode(pattern(4), "JPEG", quality=90),
}

FOLDER_CASES = [
    Case(
        "zero-byte file",
        "folder",
        "rejected:empty_file",
        ("zero bytes",),
        lambda r: _files(r, {"cat/empty.jpg": b""}),
    ),
    Case(
        "truncated JPEG",
        "folder",
        "rejected:corrupt_image",
        ("Truncated",),
        lambda r: _files(r, {"cat/truncated.jpg": _truncated(encode(pattern(101, 64), "JPEG", quality=90))}),
    ),
    Case(
        "truncated PNG",
        "folder",
        "rejected:corrupt_image",
        ("truncated",),
        lambda r: _files(r, {"dog/truncated.png": _truncated(encode(pattern(102, 64)))}),
    ),
    Case(
        "non-image (text named .jpg)",
        "folder",
        "rejected:not_an_image",
        ("no image decoder recognises",),
        lambda r: _files(r, {"cat/notes.jpg": b"this is a text file, not a JPEG\n"}),
    ),
    Case(
        "wrong extension (PNG bytes named .jpg)",
        "folder",
        "ingested",
        ("PNG RGB 16x16",),
        lambda r: _files(r, {"dog/really-a-png.jpg": 103}),
    ),
    Case(
        "no file extension (JPEG bytes)",
        "folder",
        "ingested",
        ("JPEG RGB 16x16",),
        lambda r: _files(r, {"dog/IMG_0001": encode(pattern(104), "JPEG", quality=90)}),
    ),
    Case(
        "CMYK JPEG",
        "folder",
        "ingested",
        ("JPEG CMYK 16x16, 3 channels",),
        lambda r: _files(r, {"cat/cmyk.jpg": _cmyk_jpeg(105)}),
    ),
    Case(
        "16-bit greyscale PNG",
        "folder",
        "ingested",
        ("PNG I;16 16x16, 1 channel",),
        lambda r: _files(r, {"dog/sixteen.png": _sixteen_bit_png(106)}),
    ),
    Case(
        "palette PNG",
        "folder",
        "ingested",
        ("PNG P 16x16, 3 channels",),
        lambda r: _files(r, {"cat/palette.png": _palette_png(107)}),
    ),
    Case(
        "RGBA (alpha) PNG",
        "folder",
        "ingested",
        ("PNG RGBA 16x16, 3 channels",),
        lambda r: _files(r, {"dog/rgba.png": _rgba_png(108)}),
    ),
    Case(
        "grey + alpha (LA) PNG",
        "folder",
        "ingested",
        ("PNG LA 16x16, 1 channel",),
        lambda r: _files(r, {"cat/la.png": _la_png(109)}),
    ),
    Case(
        "animated GIF (first frame)",
        "folder",
        "ingested",
        ("GIF P 16x16, 3 channels",),
        lambda r: _files(r, {"dog/animated.gif": _animated_gif(110)}),
    ),
    Case(
        "multi-page TIFF (first page)",
        "folder",
        "ingested",
        ("TIFF RGB 16x16, 3 channels",),
        lambda r: _files(r, {"cat/multipage.tiff": _multipage(123, "TIFF")}),
    ),
    Case(
        "animated WEBP (first frame)",
        "folder",
        "ingested",
        ("WEBP RGB 16x16, 3 channels",),
        lambda r: _files(r, {"dog/animated.webp": _multipage(125, "WEBP")}),
    ),
    Case(
        "GIF with a transparent colour",
        "folder",
        "ingested",
        ("GIF P 16x16, 3 channels",),
        lambda r: _files(
            r,
            {"cat/transparent.gif": _save(Image.fromarray(pattern(127)).convert("P"), "GIF", transparency=0)},
        ),
    ),
    Case(
        "1-bit black-and-white PNG",
        "folder",
        "ingested",
        ("PNG 1 16x16, 1 channel",),
        lambda r: _files(
            r, {"dog/one-bit.png": _save(Image.fromarray(pattern(128, channels=1) > 128), "PNG")}
        ),
    ),
    Case(
        "1 x 76800 strip",
        "folder",
        "ingested",
        ("PNG L 76800x1, 1 channel",),
        lambda r: _files(r, {"cat/strip.png": encode(np.tile(np.arange(256, dtype=np.uint8), 300)[None, :])}),
    ),
    Case(
        "unreadable EXIF block",
        "folder",
        "ingested",
        ("JPEG RGB 16x16, 3 channels",),
        lambda r: _files(r, {"dog/garbage-exif.jpg": _garbage_exif_jpeg(129)}),
    ),
    Case(
        "EXIF Orientation out of range (42)",
        "folder",
        "ingested",
        ("JPEG RGB 16x16, 3 channels",),
        lambda r: _files(r, {"cat/orientation-42.jpg": _orientation_jpeg(133, 42)}),
    ),
    Case(
        "EXIF-rotated photo (stored 16x8, Orientation 6)",
        "folder",
        "ingested",
        ("JPEG RGB 8x16",),
        lambda r: _files(r, {"cat/rotated.jpg": _exif_rotated_jpeg(113)}),
    ),
    Case(
        "huge but valid (6000x4000, 24 Mpx)",
        "folder",
        "ingested",
        ("PNG L 6000x4000, 1 channel",),
        lambda r: _files(r, {"dog/huge.png": _huge_png()}),
    ),
    Case(
        "decompression bomb (header: 30000x30000)",
        "folder",
        "rejected:decompression_bomb",
        ("900000000 pixels",),
        lambda r: _files(r, {"cat/bomb.png": _png_header(30000, 30000)}),
    ),
    Case(
        "decompression bomb over ingest.max_pixels (10000x10000)",
        "folder",
        "rejected:decompression_bomb",
        ("10000x10000 = 100000000 pixels > ingest.max_pixels=89478485",),
        lambda r: _files(r, {"dog/bomb100m.png": _png_header(10000, 10000)}),
    ),
    Case(
        "32-bit float TIFF",
        "folder",
        "rejected:unsupported_mode",
        ("mode F has no keel normalisation rule",),
        lambda r: _files(r, {"cat/float.tiff": _float_tiff(114)}),
    ),
    Case(
        "format not allowed (PPM)",
        "folder",
        "rejected:format_not_allowed",
        ("PPM not in ingest.allowed_formats",),
        lambda r: _files(r, {"dog/scan.ppm": _ppm(115)}),
    ),
    Case(
        "1x1 image",
        "folder",
        "ingested",
        ("PNG RGB 1x1",),
        lambda r: _files(r, {"cat/one-pixel.png": encode(np.full((1, 1, 3), 200, np.uint8))}),
    ),
    Case(
        "unicode and spaces in a file name",
        "folder",
        "ingested",
        ("label 'cat'",),
        lambda r: _files(r, {"cat/ünïcødé 猫 photo (1).png": 116}),
    ),
    Case(
        "unicode class folder",
        "folder",
        "ingested",
        ("label '猫 ネコ'",),
        lambda r: _files(r, {"猫 ネコ/neko.png": 117}),
    ),
    Case(
        "class folder with a stray space ('dog ')",
        "folder",
        "ingested",
        ("label 'dog'",),
        lambda r: _files(r, {"dog /spaced.png": 118}),
    ),
    Case(
        "nested folders inside a class folder",
        "folder",
        "ingested",
        ("label 'dog'",),
        lambda r: _files(r, {"dog/2019/summer/deep.png": 119}),
    ),
    Case(
        "file outside any class folder",
        "folder",
        "rejected:missing_label",
        ("not inside a class folder",),
        lambda r: _files(r, {"loose.png": 120}),
    ),
    Case(
        "hidden file (.DS_Store)",
        "folder",
        "rejected:hidden_file",
        ("hidden file (name starts with '.')",),
        lambda r: _files(r, {"cat/.DS_Store": b"\x00\x00\x00\x01Bud1"}),
    ),
    Case(
        "hidden folder inside a class folder (.ipynb_checkpoints)",
        "folder",
        "ingested",
        ("label 'cat'",),
        lambda r: _files(
            _tree(r, {"cat/.ipynb_checkpoints/notebook-shot-checkpoint.png": 122}),
            {"cat/notebook-shot.png": 121},
            skipped=["cat/.ipynb_checkpoints/notebook-shot-checkpoint.png"],
        ),
    ),
    Case(
        "symlink escaping the root (file)",
        "folder",
        "rejected:path_escapes_root",
        ("outside",),
        _symlink_out_file,
    ),
    Case(
        "symlink escaping the root (folder)",
        "folder",
        "rejected:path_escapes_root",
        ("symlinked folder resolves to",),
        _symlink_out_folder,
    ),
    Case("dangling symlink", "folder", "rejected:read_error", ("FileNotFoundError",), _dangling_symlink),
    Case(
        "byte-identical copies with different labels",
        "folder",
        "rejected:conflicting_labels",
        ("carry different labels", "cat/twin.png (label 'cat')", "dog/twin.png (label 'dog')"),
        _twins({"cat/twin.png": _SAME, "dog/twin.png": _SAME}),
    ),
    Case(
        "byte-identical copies, same label",
        "folder",
        "ingested + rejected:duplicate_bytes",
        ("same bytes as id",),
        _twins({"cat/dup-a.png": _SAME2, "cat/dup-b.png": _SAME2}),
    ),
]


# ---------------------------------------------------------------- run "manifest": row-level kinds, one CSV
def _img(root: Path, rel: str, seed: int) -> str:
    _tree(root, {rel: seed})
    return rel


def _secret(root: Path) -> Path:
    s = root.parent / "secret.png"
    if not s.exists():
        s.write_bytes(encode(pattern(150)))
    return s


def _symlinked_row(root: Path) -> Made:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    os.symlink(_secret(root), root / "imgs" / "link.png")
    return Made(rows=[("imgs/link.png", "cat", "")])


MANIFEST_CLASSES = ["cat", "dog", "001", "1", "0", "true"]
MANIFEST_BASE = [
    ("imgs/base0.png", "cat", ""),
    ("imgs/base1.png", "dog", ""),
    ("imgs/base2.png", "cat", ""),
    ("imgs/base3.png", "dog", ""),
]

MANIFEST_CASES = [
    Case(
        "manifest path traversal (../)",
        "manifest",
        "rejected:path_escapes_root",
        ("path resolves to", "outside data root"),
        lambda r: (_secret(r), Made(rows=[("../secret.png", "cat", "")]))[1],
    ),
    Case(
        "manifest absolute path",
        "manifest",
        "rejected:path_escapes_root",
        ("absolute path",),
        lambda r: Made(rows=[(str(_secret(r)), "cat", "")]),
    ),
    Case(
        "manifest symlink escaping the root",
        "manifest",
        "rejected:path_escapes_root",
        ("symlink resolves to",),
        _symlinked_row,
    ),
    Case(
        "manifest path to a missing file",
        "manifest",
        "rejected:missing_file",
        ("does not exist",),
        lambda r: Made(rows=[("imgs/never-copied.png", "dog", "")]),
    ),
    Case(
        "manifest path naming a folder",
        "manifest",
        "rejected:missing_file",
        ("m.csv row", "imgs/a-folder is a folder, not an image file"),
        lambda r: ((r / "imgs" / "a-folder").mkdir(parents=True), Made(rows=[("imgs/a-folder", "dog", "")]))[
            1
        ],
    ),
    Case(
        "manifest empty path cell",
        "manifest",
        "rejected:missing_path",
        ("the path cell is empty",),
        lambda r: Made(rows=[("", "dog", "")]),
    ),
    Case(
        "manifest empty label cell (missing label)",
        "manifest",
        "rejected:missing_label",
        ("the label cell is empty",),
        lambda r: Made(rows=[(_img(r, "imgs/nolabel.png", 151), "", "")]),
    ),
    Case(
        "manifest unknown split name (validation)",
        "manifest",
        "rejected:unknown_split",
        ("split 'validation' is not one of",),
        lambda r: Made(rows=[(_img(r, "imgs/validation.png", 152), "cat", "validation")]),
    ),
    Case(
        "manifest split in capitals (Test)",
        "manifest",
        "ingested",
        ("split 'test'",),
        lambda r: Made(rows=[(_img(r, "imgs/capital-split.png", 153), "cat", "Test")]),
    ),
    Case(
        "manifest labels 001/1/0/true kept as text",
        "manifest",
        "ingested",
        ("label '001'", "label '1'", "label '0'", "label 'true'"),
        lambda r: Made(
            rows=[
                (_img(r, f"imgs/text{k}.png", 154 + k), lab, "")
                for k, lab in enumerate(["001", "1", "0", "true"])
            ]
        ),
    ),
    Case(
        "manifest label not in ingest.classes",
        "manifest",
        "rejected:unknown_label",
        ("label 'bird' not in ingest.classes",),
        lambda r: Made(rows=[(_img(r, "imgs/bird.png", 160), "bird", "")]),
    ),
    Case(
        "manifest label with stray spaces (' cat ')",
        "manifest",
        "ingested",
        ("label 'cat'",),
        lambda r: Made(rows=[(_img(r, "imgs/spaced-label.png", 161), " cat ", "")]),
    ),
    Case(
        "manifest path with unicode and spaces",
        "manifest",
        "ingested",
        ("label 'dog'",),
        lambda r: Made(rows=[(_img(r, "imgs/été 犬 1.png", 162), "dog", "")]),
    ),
    Case(
        "manifest same path twice, conflicting labels",
        "manifest",
        "rejected:conflicting_labels",
        ("carry different labels",),
        lambda r: Made(rows=[(_img(r, "imgs/twice.png", 163), "cat", ""), ("imgs/twice.png", "dog", "")]),
    ),
    Case(
        "manifest same path twice, same label (duplicate)",
        "manifest",
        "ingested + rejected:duplicate_bytes",
        ("same bytes as id",),
        lambda r: Made(rows=[(_img(r, "imgs/again.png", 164), "dog", ""), ("imgs/again.png", "dog", "")]),
    ),
]


# ---------------------------------------------------------------- source-level runs (one run, one kind)
def _folder(files: dict[str, bytes | int], **ingest) -> Callable:
    def build(d: Path, s3) -> Spec:
        root = d / "src"
        root.mkdir()
        _tree(root, files)
        return Spec(str(root), ingest)

    return build


def _csv(
    text: str | bytes, files: dict[str, bytes | int] | None = None, subjects: list[str] | None = None
) -> Callable:
    def build(d: Path, s3) -> Spec:
        _tree(d / "root", files or {})
        (d / "root").mkdir(exist_ok=True)
        (d / "root" / "m.csv").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return Spec(str(d / "root" / "m.csv"), made={"": Made(list(subjects))} if subjects else {})

    return build


def _parquet(labels: pa.Array) -> Callable:
    def build(d: Path, s3) -> Spec:
        _tree(d / "root", {"imgs/a.png": 170, "imgs/b.png": 171})
        pq.write_table(
            pa.table({"path": ["imgs/a.png", "imgs/b.png"], "label": labels}), d / "root" / "m.parquet"
        )
        return Spec(str(d / "root" / "m.parquet"), made={"": Made(subjects=["imgs/a.png", "imgs/b.png"])})

    return build


def _ipynb_beside_splits(d: Path, s3) -> Spec:
    files = {"train/a/1.png": 180, "train/b/2.png": 181, "test/a/3.png": 182, "test/b/4.png": 183}
    _tree(d / "src", {**files, ".ipynb_checkpoints/a/5-checkpoint.png": 184})
    return Spec(
        str(d / "src"),
        made={"": Made(subjects=list(files), skipped=[".ipynb_checkpoints/a/5-checkpoint.png"])},
    )


def _missing_source(d: Path, s3) -> Spec:
    return Spec(str(d / "no-such-folder"))


def _text_source(d: Path, s3) -> Spec:
    (d / "labels.txt").write_text("cat\ndog\n")
    return Spec(str(d / "labels.txt"))


SOURCE_CASES = [
    Case("empty folder", "empty_folder", "refused", ("no files found in",), None),
    Case(
        "folder of only hidden files and folders",
        "only_hidden",
        "refused",
        ("no files found in", "hidden files and folders (names starting with '.') are skipped"),
        None,
    ),
    Case(
        "manifest with a header and no rows",
        "empty_manifest",
        "refused",
        ("no files found in", "the manifest has no rows"),
        None,
    ),
    Case(
        "stray folder beside train/ and test/ (validation/)",
        "stray_validation",
        "refused",
        ("beside them validation/", "rename it (e.g. validation/ -> val/)"),
        None,
    ),
    Case(
        "hidden folder beside train/ and test/ (.ipynb_checkpoints)",
        "ipynb_beside_splits",
        "ingested",
        ("split 'train'", "split 'test'"),
        None,
    ),
    Case(
        "class folders Cat and cat",
        "case_collision",
        "refused",
        ("differ only in case or spacing", "'Cat' (folder Cat/), 'cat' (folder cat/)"),
        None,
    ),
    Case(
        "manifest labels 'big cat' and 'Big  Cat'",
        "spacing_collision",
        "refused",
        ("differ only in case or spacing", "'Big  Cat' (m.csv row 3), 'big cat' (m.csv row 2)"),
        None,
    ),
    Case("one-class dataset", "one_class", "refused", ("only one class", "have label 'cat'"), None),
    Case(
        "nothing ingestible (every file bad)",
        "nothing_ingestible",
        "refused",
        ("none of the 2 items", "see the reasons in"),
        None,
    ),
    Case("source path that does not exist", "missing_source", "refused", ("does not exist",), None),
    Case(
        "source file that is not a manifest (.txt)",
        "text_source",
        "refused",
        ("is a file but not a .csv or .parquet manifest",),
        None,
    ),
    Case(
        "manifest without path/label columns",
        "manifest_columns",
        "refused",
        ("manifest needs columns (path or uri, label", "found ['class', 'file']"),
        None,
    ),
    Case(
        "CSV manifest with a UTF-8 byte-order mark (Excel)",
        "bom_csv",
        "ingested",
        ("label 'cat'", "label 'dog'"),
        None,
    ),
    Case(
        "CSV manifest not in UTF-8 (Latin-1)",
        "latin1_csv",
        "refused",
        ("cannot read manifest", "invalid UTF8"),
        None,
    ),
    Case("malformed CSV manifest (ragged rows)", "malformed_csv", "refused", ("cannot read manifest",), None),
    Case(
        "parquet manifest with float labels",
        "parquet_float_labels",
        "refused",
        ("column 'label' has type double", "write the column as strings"),
        None,
    ),
    Case(
        "parquet manifest with integer labels",
        "parquet_int_labels",
        "ingested",
        ("label '1'", "label '2'"),
        None,
    ),
    Case("unknown builtin source", "unknown_builtin", "refused", ("unknown builtin 'builtin:mnist'",), None),
]

RUNS: dict[str, Callable] = {
    "empty_folder": _folder({}),
    "only_hidden": _folder({".DS_Store": b"\x00\x01", ".ipynb_checkpoints/a/1.png": 190}),
    "empty_manifest": _csv("path,label\n"),
    "stray_validation": _folder(
        {
            "train/a/1.png": 191,
            "train/b/2.png": 192,
            "test/a/3.png": 193,
            "test/b/4.png": 194,
            "validation/a/5.png": 195,
        }
    ),
    "ipynb_beside_splits": _ipynb_beside_splits,
    "case_collision": _folder({"Cat/1.png": 200, "cat/2.png": 201, "dog/3.png": 202}),
    "spacing_collision": _csv(
        "path,label\nimgs/0.png,big cat\nimgs/1.png,Big  Cat\nimgs/2.png,dog\n",
        {"imgs/0.png": 203, "imgs/1.png": 204, "imgs/2.png": 205},
    ),
    "one_class": _folder({"cat/1.png": 206, "cat/2.png": 207, "cat/empty.png": b""}),
    "nothing_ingestible": _folder({"a/x.jpg": b"", "b/y.png": b"not a png"}),
    "missing_source": _missing_source,
    "text_source": _text_source,
    "manifest_columns": _csv("file,class\nimgs/a.png,x\n", {"imgs/a.png": 208}),
    "malformed_csv": _csv(
        "path,label\nimgs/a.png,cat\nimgs/b.png,dog,extra,cells\n", {"imgs/a.png": 209, "imgs/b.png": 210}
    ),
    "bom_csv": _csv(
        "\ufeffpath,label\nimgs/a.png,cat\nimgs/b.png,dog\n",
        {"imgs/a.png": 211, "imgs/b.png": 212},
        subjects=["imgs/a.png", "imgs/b.png"],
    ),
    "latin1_csv": _csv(
        "path,label\nimgs/a.png,caf\xe9\nimgs/b.png,dog\n".encode("latin-1"),
        {"imgs/a.png": 213, "imgs/b.png": 214},
    ),
    "parquet_float_labels": _parquet(pa.array([1.0, 2.0])),
    "parquet_int_labels": _parquet(pa.array([1, 2])),
    "unknown_builtin": lambda d, s3: Spec("builtin:mnist"),
}


# ---------------------------------------------------------------- S3 (a real SeaweedFS server)
class _FlakyProxy:
    """An HTTP relay in front of the S3 server that answers ``503 SlowDown`` to GETs of keys ending in
    ``/flaky.png`` (the first ``fail_first`` of them, or all when None): a throttling server, for real
    (``hits`` counts those GETs)."""

    def __init__(self, upstream: str, fail_first: int | None):
        up = urllib.parse.urlsplit(upstream)
        self.host, self.port, self.fail_first, self.hits = up.hostname, up.port, fail_first, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                if self.command == "GET" and key.endswith("/flaky.png"):
                    proxy.hits += 1
                    if proxy.fail_first is None or proxy.hits <= proxy.fail_first:
                        err = (
                            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                            b"<Message>Please reduce your request rate.</Message></Error>"
                        )
                        self.send_response_only(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(err)))
                        self.end_headers()
                        self.wfile.write(err)
                        return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=30)
                conn.request(
                    self.command,
                    self.path,
                    body=body,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "connection"},
                )
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response_only(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _aws_env(s3, d: Path, **override) -> dict:
    """The test server's credentials and nothing from the machine's AWS set-up (as test_ingest_s3.aws_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(d / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(d / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
    )
    for k, v in override.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _no_backoff(d: Path, env: dict) -> dict:
    """botocore's retries still happen, only the sleeps between them go (as test_ingest_s3.no_retry_sleep,
    but in the ingest process: a sitecustomize on its PYTHONPATH)."""
    site = d / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from botocore.retries import standard\n"
        "standard.ExponentialBackoff.delay_amount = lambda self, context: 0.0\n"
    )
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))}


def _put(s3, objects: dict[str, bytes | int]) -> None:
    client = s3.client()
    for key, body in objects.items():
        client.put_object(
            Bucket=BUCKET, Key=key, Body=encode(pattern(body)) if isinstance(body, int) else body
        )


def _s3_source(prefix: str, **env_override) -> Callable:
    def build(d: Path, s3) -> Spec:
        return Spec(
            f"s3://{BUCKET}/{prefix}", {"s3_endpoint": s3.endpoint}, env=_aws_env(s3, d, **env_override)
        )

    return build


def _s3_folder(d: Path, s3) -> Spec:
    p = "corpus"
    _put(
        s3,
        {
            f"{p}/cat/1.png": 300,
            f"{p}/cat/2.jpg": encode(pattern(301), "JPEG"),
            f"{p}/dog/3.png": 302,
            f"{p}/dog/4.jpg": encode(pattern(303), "JPEG"),
            f"{p}/cat/empty.jpg": b"",
            f"{p}/dog/.DS_Store": b"\x00\x01",
            f"{p}/.ipynb_checkpoints/cat/5.png": 304,
            f"{p}/cat/ünï cødé 1.png": 305,
        },
    )
    u = f"s3://{BUCKET}/{p}/"
    made = {
        "S3 zero-byte object": Made([u + "cat/empty.jpg"]),
        "S3 hidden prefix and hidden object": Made(
            [u + "dog/.DS_Store"], skipped=[u + ".ipynb_checkpoints/cat/5.png"]
        ),
        "S3 key with unicode and spaces": Made([u + "cat/ünï cødé 1.png"]),
        "": Made(others=[u + k for k in ("cat/1.png", "cat/2.jpg", "dog/3.png", "dog/4.jpg")]),
    }
    return Spec(u.rstrip("/"), {"s3_endpoint": s3.endpoint}, env=_aws_env(s3, d), made=made)


def _s3_manifest(d: Path, s3) -> Spec:
    _put(s3, {"man/cat/a.png": 310, "man/dog/b.png": 311})
    rows = [
        f"s3://{BUCKET}/man/cat/a.png,cat",
        f"s3://{BUCKET}/man/dog/b.png,dog",
        f"s3://{BUCKET}/man/cat/not-uploaded.png,cat",
    ]
    (d / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return Spec(
        str(d / "m.csv"),
        {"s3_endpoint": s3.endpoint},
        env=_aws_env(s3, d),
        made={
            "": Made(
                [f"s3://{BUCKET}/man/cat/not-uploaded.png"],
                others=[f"s3://{BUCKET}/man/cat/a.png", f"s3://{BUCKET}/man/dog/b.png"],
            )
        },
    )


def _s3_flaky(fail_first: int | None) -> Callable:
    def build(d: Path, s3) -> Spec:
        p = "throttled-always" if fail_first is None else f"throttled-{fail_first}"
        _put(s3, {f"{p}/cat/1.png": 320, f"{p}/dog/2.png": 321, f"{p}/dog/flaky.png": 322})
        proxy = _FlakyProxy(s3.endpoint, fail_first)
        env = _aws_env(s3, d)
        if fail_first is None:
            env = _no_backoff(d, env)  # 6 attempts of 503: botocore would sleep up to 31 s between them
        u = f"s3://{BUCKET}/{p}/"
        return Spec(
            u.rstrip("/"),
            {"s3_endpoint": proxy.endpoint},
            env=env,
            extra={"proxy": proxy},
            made={"": Made([u + "dog/flaky.png"], others=[u + "cat/1.png", u + "dog/2.png"])},
            stop=proxy.stop,
        )

    return build


def _s3_unreachable(d: Path, s3) -> Spec:
    return Spec(
        f"s3://{BUCKET}/corpus", {"s3_endpoint": _dead_endpoint()}, env=_no_backoff(d, _aws_env(s3, d))
    )


S3_CASES = [
    Case(
        "S3 wrong credentials",
        "s3_wrong_credentials",
        "refused",
        ("S3 refused the credentials", "AWS_SECRET_ACCESS_KEY"),
        None,
    ),
    Case("S3 no credentials", "s3_no_credentials", "refused", ("no S3 credentials",), None),
    Case(
        "S3 missing bucket",
        "s3_missing_bucket",
        "refused",
        ("s3://no-such-bucket-keel/corpus: bucket does not exist",),
        None,
    ),
    Case(
        "S3 empty prefix",
        "s3_empty_prefix",
        "refused",
        ("no files found in", "no objects under this prefix"),
        None,
    ),
    Case(
        "S3 endpoint nobody listens on", "s3_unreachable", "refused", ("cannot reach the S3 endpoint",), None
    ),
    Case("S3 zero-byte object", "s3_folder", "rejected:empty_file", ("zero bytes",), None),
    Case("S3 hidden prefix and hidden object", "s3_folder", "rejected:hidden_file", ("hidden object",), None),
    Case("S3 key with unicode and spaces", "s3_folder", "ingested", ("label 'cat'",), None),
    Case(
        "S3 manifest row naming a missing object",
        "s3_manifest",
        "rejected:missing_file",
        ("NoSuchKey",),
        None,
    ),
    Case(
        "transient S3 error (one 503 SlowDown, then served)",
        "s3_flaky_once",
        "ingested",
        ("label 'dog'", "2 GETs through the proxy"),
        None,
    ),
    Case(
        "transient S3 error that persists (503 SlowDown every time)",
        "s3_flaky_always",
        "refused",
        ("transient S3 error SlowDown (HTTP 503)", "after 6 attempts", "run the stage again"),
        None,
    ),
]

S3_RUNS: dict[str, Callable] = {
    "s3_wrong_credentials": _s3_source("corpus", AWS_SECRET_ACCESS_KEY="wrong-secret-key"),
    "s3_no_credentials": _s3_source("corpus", AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None),
    "s3_missing_bucket": lambda d, s3: Spec(
        "s3://no-such-bucket-keel/corpus", {"s3_endpoint": s3.endpoint}, env=_aws_env(s3, d)
    ),
    "s3_empty_prefix": _s3_source("nothing-here"),
    "s3_unreachable": _s3_unreachable,
    "s3_folder": _s3_folder,
    "s3_manifest": _s3_manifest,
    "s3_flaky_once": _s3_flaky(1),
    "s3_flaky_always": _s3_flaky(None),
}

CASES = FOLDER_CASES + MANIFEST_CASES + SOURCE_CASES + S3_CASES


# ---------------------------------------------------------------- the shared runs
def _build_folder(d: Path, s3) -> Spec:
    root = d / "src"
    _tree(root, FOLDER_BASE)
    made = {"": Made(others=list(FOLDER_BASE))}
    for case in FOLDER_CASES:
        made[case.name] = case.make(root)
    return Spec(str(root), {"workers": 2}, made=made)  # the default: a process pool, as a user runs it


def _build_manifest(d: Path, s3) -> Spec:
    root = d / "root"
    for k, (path, _, _) in enumerate(MANIFEST_BASE):
        _img(root, path, 10 + k)
    rows: list[tuple[str, str, str]] = []
    made: dict[str, Made] = {}
    for case in [None, *MANIFEST_CASES]:
        m = Made(rows=list(MANIFEST_BASE)) if case is None else case.make(root)
        first = len(rows) + 2  # the CSV's row numbers: the header is row 1
        m.subjects = [p or f"m.csv row {first + i}: (empty)" for i, (p, _, _) in enumerate(m.rows)]
        if case is None:
            m.others, m.subjects = m.subjects, []
        rows += m.rows
        made["" if case is None else case.name] = m
    with (root / "m.csv").open("w", newline="") as f:
        f.write("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    return Spec(str(root / "m.csv"), {"classes": MANIFEST_CLASSES}, made=made)


BUILDERS: dict[str, Callable] = {"folder": _build_folder, "manifest": _build_manifest, **RUNS, **S3_RUNS}


def _ingest(d: Path, spec: Spec) -> Ran:
    """`keel ingest --params params.yaml` in the scratch project ``d``, as a user runs it."""
    params = {
        "paths": {
            "raw_items": "out/raw/items",
            "rejects": "out/raw/rejects.parquet",
            "audit_dir": "out/audit",
        },
        "ingest": {"source": spec.source, "workers": 1, **spec.ingest},
    }
    (d / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    env = dict(spec.env if spec.env is not None else os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "ingest", "--params", "params.yaml"],
            cwd=d,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        if spec.stop is not None:
            spec.stop()
    seconds = time.monotonic() - t0
    m = ACCOUNT.search(p.stdout)
    raw: dict[str, list[dict]] = {}
    rejects: dict[str, list[dict]] = {}
    raw_dir, rej = d / "out" / "raw" / "items", d / "out" / "raw" / "rejects.parquet"
    if p.returncode == 0 and raw_dir.is_dir():
        from tasks.core.io import read_raw_meta

        for r in read_raw_meta(str(raw_dir)).to_pylist():
            raw.setdefault(r["source_uri"], []).append(r)
    if p.returncode == 0 and rej.exists():
        for r in pq.read_table(rej).to_pylist():
            rejects.setdefault(r["source_uri"], []).append(r)
    leftovers = raw_dir.exists() or (
        raw_dir.parent.exists() and any(raw_dir.parent.glob(f".{raw_dir.name}.*"))
    )
    return Ran(
        spec,
        p.returncode,
        p.stdout,
        p.stderr,
        seconds,
        tuple(int(x) for x in m.groups()) if m else None,
        raw,
        rejects,
        leftovers,
    )


@pytest.fixture(scope="module")
def s3():
    with s3_with_bucket(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def ingest_runs(tmp_path_factory):
    """run(name, s3=None): the ingest run ``name`` (built and run once per module, on first use)."""
    done: dict[str, Ran] = {}

    def run(name: str, s3=None) -> Ran:
        if name not in done:
            d = tmp_path_factory.mktemp(name)
            done[name] = _ingest(d, BUILDERS[name](d, s3))
        return done[name]

    run.done = done
    yield run
    # one line per run: what the corpus costs (pytest -s shows it; docs/reliability.md records the cases)
    total = sum(r.seconds for r in done.values())
    print(f"\nbad-input corpus: {len(done)} ingest runs, {total:.1f} s in `keel ingest`", file=sys.stderr)


# ---------------------------------------------------------------- the verdict on one case
def _describe(uri: str, row: dict) -> str:
    ch = row["channels"]
    split = f", split {row['source_split']!r}" if row["source_split"] else ""
    return (
        f"{uri}: ingested as {row['format']} {row['mode']} {row['width']}x{row['height']}, {ch} "
        f"channel{'s' if ch != 1 else ''}, label {row['label']!r}{split}"
    )


def _judge(case: Case, ran: Ran) -> tuple[str, str, int, list[str]]:
    """(outcome, message, silently dropped, problems with the run's account)."""
    problems: list[str] = []
    if ran.rc != 0:
        if ran.rc != 1 or "keel ingest: error: " not in ran.stderr:
            problems.append(f"exit status {ran.rc}, not 1 with `keel ingest: error: ...`")
        if ran.raw_exists:
            problems.append("a refused run left a raw items table (or a temporary one)")
        return "refused", ran.error, 0, problems
    made = ran.spec.made.get(case.name) or ran.spec.made.get("") or Made()
    outcomes, lines = [], []
    for uri in dict.fromkeys(made.subjects):
        got = [("ingested", _describe(uri, r)) for r in ran.raw.get(uri, [])]
        got += [
            (f"rejected:{r['reason']}", f"{uri}: {r['reason']}: {r['detail']}")
            for r in ran.rejects.get(uri, [])
        ]
        outcomes += [o for o, _ in got] or ["missing"]
        lines += [text for _, text in got] or [f"{uri}: in neither table"]
    message = "; ".join(lines)
    if case.name == "transient S3 error (one 503 SlowDown, then served)":
        message += f"; {ran.spec.extra['proxy'].hits} GETs through the proxy"
    wanted = Counter(made.subjects + made.others)
    dropped = sum(
        max(0, n - len(ran.raw.get(u, [])) - len(ran.rejects.get(u, []))) for u, n in wanted.items()
    )
    for u in made.skipped:
        if u in ran.raw or u in ran.rejects:
            problems.append(f"{u} is under a hidden folder, yet it is in a table")
    # the whole run's account: what every builder made = found = ingested + rejected = the rows of both tables
    made_total = sum(len(m.subjects) + len(m.others) for m in ran.spec.made.values())
    rows = sum(map(len, ran.raw.values())) + sum(map(len, ran.rejects.values()))
    if ran.account is None:
        problems.append(
            f"no `ingest: found N = ingested I + rejected R` line on stdout: {ran.stdout[-300:]!r}"
        )
    else:
        found, ing, rej = ran.account
        if not found == ing + rej == rows == made_total:
            problems.append(
                f"account: made {made_total}, found {found} = ingested {ing} + rejected {rej}, "
                f"{rows} rows in the two tables"
            )
    every = {u for m in ran.spec.made.values() for u in m.subjects + m.others}
    strays = sorted((set(ran.raw) | set(ran.rejects)) - every)
    if strays:
        problems.append(f"uris in the tables that no builder made: {strays[:5]}")
    return " + ".join(sorted(set(outcomes))), message, dropped, problems


def _params():
    for case in CASES:
        marks = [pytest.mark.slow] if case.run.startswith("s3_") else []
        yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, ingest_runs, record, request):
    s3 = request.getfixturevalue("s3") if case.run.startswith("s3_") else None
    ran = ingest_runs(case.run, s3)
    outcome, message, dropped, problems = _judge(case, ran)
    record(
        "bad_input",
        name=case.name,
        outcome=outcome,
        expected=case.expected,
        message=message[:150],
        traceback=ran.traceback,
        dropped=dropped,
    )
    assert not ran.traceback, f"traceback on stderr:\n{ran.stderr[-3000:]}"
    assert "none of the 0 items" not in ran.stderr, ran.error  # an empty source says 'no files found'
    assert outcome == case.expected, (
        f"{case.name}: {outcome} != {case.expected}: {message}\n{ran.stderr[-2000:]}"
    )
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"{case.name}: {missing} not in {message!r}"
    assert dropped == 0, f"{case.name}: {dropped} item(s) silently dropped: {message}"
    assert not problems, f"{case.name}: {problems}"


def test_corpus_has_at_least_30_kinds():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(names) >= 30, len(names)
    assert all(c.make is not None for c in FOLDER_CASES + MANIFEST_CASES)
    assert {c.run for c in CASES} <= set(BUILDERS)
