"""Build ``.gpu/``: what ``bench/gpu.sh`` needs on the lent GPU machine, to carry there with the working tree.

The GPU machine (Python 3.12; torch, timm, torchvision, pyarrow, numpy, pandas, scipy, matplotlib, PyYAML, jinja2,
requests, attrs already there; no package registry) lacks pydantic and Great Expectations and their own needs.
This downloads those as cp312 manylinux wheels, at the versions in requirements.lock, with ``--no-deps`` (one
version of each: two would stop the install there), and copies the CIFAR-10 jpeg tarball beside them. The device
tool carries at most 64 MiB with the working tree; the kit is about 35 MiB.

    .venv/bin/python bench/gpu_kit.py               # writes .gpu/ (ignored by git)
    then, with the device tool:  run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=590)
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# not on the GPU machine's image (device/KINDS.md, 2026-11-17): pydantic, Great Expectations, and what they need
NEEDED = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "great_expectations", "altair",
          "marshmallow", "mistune", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
          "ruamel.yaml", "tzlocal", "cryptography", "cffi", "pycparser"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LIMIT_MIB = 60  # the device tool's 64 MiB carry, less the working tree's own share


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = f"{m.group(1)}=={m.group(2)}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / ".gpu"))
    ap.add_argument("--tarball", default=str(REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz"))
    a = ap.parse_args(argv)
    out, lock = Path(a.out), pins(REPO / "requirements.lock")
    missing = [n for n in NEEDED if re.sub(r"[-_.]+", "-", n).lower() not in lock]
    if missing:
        print(f"gpu_kit: requirements.lock pins no version of {missing}; add them or edit NEEDED", file=sys.stderr)
        return 2
    if not Path(a.tarball).is_file():
        print(f"gpu_kit: no CIFAR-10 tarball at {a.tarball}; pass --tarball", file=sys.stderr)
        return 2
    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[f for p in PLATFORMS for f in ("--platform", p)], "-d", str(wheels),
           *[lock[re.sub(r"[-_.]+", "-", n).lower()] for n in NEEDED]]
    subprocess.run(cmd, check=True)
    shutil.copy2(a.tarball, out / "cifar10-jpeg.tar.gz")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"gpu_kit: {len(list(wheels.glob('*.whl')))} wheels + the CIFAR-10 tarball in {out}: {size:.1f} MiB")
    if size > LIMIT_MIB:
        print(f"gpu_kit: over {LIMIT_MIB} MiB: the device tool would refuse to carry it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
