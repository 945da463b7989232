"""Golden training runs: the ``model_sha256`` of best.pt and last.pt for CPU digits runs of the recipes that
the train stage must keep bit-for-bit through any restructuring.

Everything goes through the CLI contract (``python -m tasks.cli <stage> --params FILE``, torchrun for the
two-process run), so the same script measures any layout of ``tasks/``. Record once before a refactor:

    python -m tests.contracts.golden --record        # writes this CPU's entry of tests/contracts/golden.json

``tests/contracts/test_golden.py`` reruns them and compares.  Bit-for-bit weights are a property of the CPU too
(torch picks kernels by instruction set: the same code gave other weights on an AMD EPYC / AVX2 machine than on the
Intel Xeon the first record was made on), so golden.json holds one record per CPU model (``cpu_key``); on a CPU
without a record the test skips and says how to make one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden.json")

# train sections on top of params.yaml's (the default recipe); epochs kept short so the suite stays fast
RUNS: dict[str, dict] = {
    "default": {},
    "accumulation_mixup": {"epochs": 2, "batch_size": 16, "effective_batch": 64, "mixup": 0.2, "cutmix": 1.0,
                           "label_smoothing": 0.1},
    "stream": {"epochs": 1, "data": "stream", "loader_workers": 2, "max_steps": 20},
    "transfer_two_phase": {"epochs": 2, "pretrained": "checkpoint", "init_checkpoint": "golden_default/best.pt",
                           "freeze_backbone_epochs": 1, "unfreeze_top_blocks": 1, "backbone_lr_factor": 0.1},
    "airbench": {"model": "keel_cifar_net_s", "optimizer": "sgd", "lr": 0.4, "momentum": 0.85, "epochs": 2,
                 "batch_size": 32, "warmup_steps": 5, "grad_clip": None, "label_smoothing": 0.2,
                 "stem_init": "whiten", "norm_bias_lr_factor": 64.0, "crop_pad": 2, "tta": "flip_translate"},
    "gloo_two_process": {"epochs": 1, "devices": 2, "batch_size": 16, "max_steps": 30},
}


def _env() -> dict:
    return {**os.environ, "KEEL_TRACKING": "off", "PYTHONPATH": str(REPO), "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _params(work: Path, name: str, train: dict, shards: str) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["paths"].update(shards_dir=shards, models_dir=f"golden_{name}", train_metrics=f"metrics_{name}.json",
                         train_plots_dir=f"plots_{name}", checkpoints_dir=f"checkpoints_{name}")
    base["train"].update(train)
    f = work / f"params_{name}.yaml"
    f.write_text(yaml.safe_dump(base))
    return f


def _keel(work: Path, params: Path, stage: str, nproc: int = 0) -> None:
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tasks.cli", stage, "--params", str(params)]
    else:
        cmd = [sys.executable, "-m", "tasks.cli", stage, "--params", str(params)]
    r = subprocess.run(cmd, check=False, cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _sha(path: Path) -> str:
    import torch

    try:
        from tasks.core.lineage import model_sha256
    except ImportError:  # the layout before the restructuring
        from tasks.lineage import model_sha256
    # our own files from this run (last.pt holds NumPy RNG state, which the safe loader refuses today)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return model_sha256(blob["model"], blob["run_info"]["config"]["model"])


def run_all(work: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Data stages once (default shards, and 200-row shards for streaming), then each golden run."""
    data = _params(work, "data", {}, "data/shards")
    for stage in ("ingest", "split", "validate", "shard"):
        _keel(work, data, stage)
    small = yaml.safe_load(data.read_text())
    small["paths"]["shards_dir"] = "data/shards_small"
    small["shard"].update(shard_rows=200, row_group_rows=100)
    (work / "params_small.yaml").write_text(yaml.safe_dump(small))
    _keel(work, work / "params_small.yaml", "shard")
    out = {}
    for name in names or list(RUNS):
        train = RUNS[name]
        if name == "transfer_two_phase" and not (work / "golden_default/best.pt").exists():
            _keel(work, _params(work, "default", RUNS["default"], "data/shards"), "train")
        shards = "data/shards_small" if name == "stream" else "data/shards"
        _keel(work, _params(work, name, train, shards), "train", nproc=train.get("devices", 1) if
              train.get("devices", 1) > 1 else 0)
        out[name] = {ck: _sha(work / f"golden_{name}" / f"{ck}.pt") for ck in ("best", "last")}
    return out


def cpu_key() -> str:
    """The CPU model name, as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def records() -> dict[str, dict]:
    return json.loads(GOLDEN.read_text())["by_cpu"]


def record_key() -> str:
    """Where this machine's record goes: the CPU model and the kernel set torch dispatches to (one EPYC model
    name covers AVX2 and AVX-512 machines, whose kernels give different bits)."""
    import torch

    return f"{cpu_key()} [{torch.backends.cpu.get_cpu_capability()}]"


def record_for_this_machine() -> dict | None:
    """The record made on this CPU model with this kernel set; an older record keyed by model name alone counts
    only if its capability matches (or was not recorded)."""
    import torch

    recs, cap = records(), torch.backends.cpu.get_cpu_capability()
    if record_key() in recs:
        return recs[record_key()]
    rec = recs.get(cpu_key())
    if rec is not None and (rec["cpu_capability"] == cap or rec["cpu_capability"].startswith("unknown")):
        return rec
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help=f"write {GOLDEN.relative_to(REPO)}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        got = run_all(Path(d))
    print(json.dumps(got, indent=2))
    if args.record:
        import torch

        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"by_cpu": {}}
        data["by_cpu"][record_key()] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                     "torch": torch.__version__, "runs": got}
        GOLDEN.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
