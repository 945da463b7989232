"""Fault trials (issue 15): kill -9 at seeded random moments of every data stage and of training, SIGTERM mid-epoch,
then `dvc repro`: nothing that DVC or the next stage accepts as complete is left behind, and the rerun is identical.

Real processes, real dvc, no mocks. A module fixture makes a fresh copy of the repo with fast params, runs
`dvc repro -s <stage>` once per stage from ingest to train as the reference, times each stage (from dvc's
"Running stage" line to its exit) and fingerprints every out. A trial then:

1. copies the reference project without DVC's run cache (so nothing can restore an out of the stage), deletes the
   stage's outs (persisted ones too: the stage does all its work again), keeps dvc.lock as it is (the stage's entry
   names the reference outs, so `dvc repro` must notice anything else);
2. starts `dvc repro --no-run-cache -s <stage>` in its own process group, waits for "Running stage", sleeps a seeded random share of
   the stage's measured duration (SIGTERM: until a seeded number of logged training steps) and signals the group;
3. checks what is left: each out is absent or identical to the reference (train: checkpoints at their final names
   (data/checkpoints/, where the training in flight checkpoints) load with the safe loader and metrics/train.json is not written; its per-step logs are incremental by design);
4. `dvc repro --no-run-cache train`, the pipeline from its first stage to training, as a user would rerun it after a
   crash: DVC must rerun the killed stage whenever an out is not the reference's, and may rerun a later stage only
   where a dep of it changed; afterwards every stage's dvc.lock entry (deps and outs md5) equals the reference's and
   every out of every stage has the reference's fingerprint (train: weights, optimiser and RNG state bitwise, and
   model_sha256 of best.pt/last.pt). The stages after the killed one keep the reference's outs in the trial's copy,
   so a rerun that is not identical shows twice: the later stage reruns and its outs or lock entry differ.

"Identical" has to leave out what differs between two *uninterrupted* runs too (measured, not a kill effect):
wall-clock fields (``*_s``, ``seconds``, ``images_per_s``, ``data_wait_fraction``) in JSON and CSV outs, the Great
Expectations results/Data Docs under reports/validate (run timestamps; summary.json/.md are compared), the training
event log (a resumed run logs its resume), and the raw bytes of checkpoints: torch.save writes the random temporary
file name of tasks/core/checkpoint.save into the zip archive, so models/ never has a reproducible md5 in dvc.lock;
their content is compared instead. Every other out is compared by its dvc.lock md5.

The pipeline ends at train: evaluate spends the test set's one look (its ledger and its kill are
tests/stage/test_evaluate.py and tests/reliability's two-at-once cases) and register needs a tracking server; the
trials turn tracking off so that no MLflow run id lands in an out.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_pipeline import _env, clone_repo, sh

pytestmark = pytest.mark.slow

STAGES = ("ingest", "split", "validate", "shard", "train")
TRIALS = {"ingest": 7, "split": 6, "validate": 5, "shard": 6, "train": 6}  # SIGKILL trials, 30 in all
# `make reliability` (KEEL_RELIABILITY_DIR set, or KEEL_KILL_TRIALS=all) runs all 30 and renders docs/reliability.md
# from them; a plain `make test` runs the first two seeds of every stage (10 trials: the same seeds, a third of
# the CI time), so CI still kills every stage at two moments.
FULL = bool(os.environ.get("KEEL_RELIABILITY_DIR")) or os.environ.get("KEEL_KILL_TRIALS") == "all"
RUN_TRIALS = TRIALS if FULL else {stage: min(2, n) for stage, n in TRIALS.items()}
SIGTERM_STEPS = ((301, (3, 18)), (302, (26, 40)))  # seed, logged-step window: mid epoch 0 and mid epoch 1 (22 steps each)
FAST = {
    "ingest": {"workers": 1},
    "shard": {"resolution": 8, "workers": 1},
    "train": {"epochs": 2, "batch_size": 64, "warmup_steps": 5, "log_every_steps": 1},
}
ENV = {"OMP_NUM_THREADS": "1", "KEEL_TRACKING": "off"}  # tracking off: no MLflow run ids in the outs
TIMING = re.compile(r"(_s|seconds|images_per_s|data_wait_fraction)$")
STAMP = re.compile(r"\d{8}T\d{6}\.\d+Z")
CKPT = "data/checkpoints/last.pt"  # the training in flight (not a DVC output): what a rerun resumes
NOT_BY_MD5 = {"reports/leakage.json", "reports/validate", "metrics/train.json", "models", "reports/train"}


# ---------------------------------------------------------------- fingerprints
# lineage, not content: how many ids a split found already frozen (a split killed after it persisted its manifest
# but before DVC wrote dvc.lock is rerun and, by design, keeps that frozen assignment: identical manifest md5)
RUN_HISTORY = {"frozen_ids_kept"}


def _json_norm(o):
    if isinstance(o, dict):
        return {k: _json_norm(v) for k, v in o.items() if not TIMING.search(k) and k not in RUN_HISTORY}
    if isinstance(o, list):
        return [_json_norm(v) for v in o]
    return o


def _pt_fp(f: Path) -> str:
    import torch

    h = hashlib.sha256()

    def walk(o, key=""):
        if isinstance(o, dict):
            for k in sorted(o, key=str):
                if not TIMING.search(str(k)):  # wall-clock fields (last.pt's step rows carry images_per_s)
                    walk(o[k], f"{key}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{key}[{i}]")
        elif key == "/run_info/resumed_from_step":
            return  # lineage: says that (and where) this run resumed; compared by the trial, not here
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{key}={o!r}".encode())

    try:
        walk(torch.load(f, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure to load: a half-written checkpoint at its final name
        return f"unloadable: {type(exc).__name__}: {str(exc)[:80]}"
    return h.hexdigest()


def _file_fp(f: Path, rel: str) -> str:
    if f.suffix == ".pt":
        return _pt_fp(f)
    if f.name == "events.jsonl" or (rel.startswith("reports/validate/") and f.name not in ("summary.json",
                                                                                             "summary.md")):
        return "present"  # the run's own log / GX results and Data Docs with run timestamps
    data = f.read_bytes()
    try:
        if f.suffix == ".json":
            data = json.dumps(_json_norm(json.loads(data)), sort_keys=True).encode()
        elif f.suffix == ".csv":
            rows = list(csv.reader(io.StringIO(data.decode())))
            keep = [i for i, c in enumerate(rows[0]) if not TIMING.search(c)] if rows else []
            data = "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows).encode()
    except (ValueError, UnicodeDecodeError) as exc:
        return f"unparseable: {type(exc).__name__}"
    return hashlib.sha256(data).hexdigest()


def fingerprint(root: Path, out: str) -> dict[str, str] | None:
    """{relative file: content fingerprint} of an out (a file or a directory); None when it is absent."""
    path = root / out
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    fp = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        fp[STAMP.sub("<t>", rel)] = _file_fp(f, rel)
    return fp


def _diff(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return "absent" if a is None else "unexpected"
    keys = sorted(set(a) | set(b))
    bad = [k for k in keys if a.get(k) != b.get(k)]
    return ", ".join(f"{k} ({'missing' if k not in a else 'extra' if k not in b else a[k][:24]})"
                     for k in bad[:3]) + (f" +{len(bad) - 3}" if len(bad) > 3 else "")


# ---------------------------------------------------------------- processes
def _start(cwd: Path, args: list[str], log: Path) -> subprocess.Popen:
    f = log.open("w")
    try:
        return subprocess.Popen(args, cwd=cwd, env={**_env(), **ENV}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: dvc, torchrun and the workers
    finally:
        f.close()


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(0.01)
    return False


def _stage_pids(proj: Path) -> list[int]:
    """Every process working in the trial's project: dvc, the stage's shell, torchrun and its workers (torchrun
    starts each worker in a new session, so signalling dvc's process group alone would miss the one that trains)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if cwd == str(proj) or cwd.startswith(f"{proj}/"):
                pids.append(int(d.name))
    return pids


def _signal_all(proc: subprocess.Popen, proj: Path, sig: signal.Signals) -> None:
    pids = _stage_pids(proj)  # one snapshot, then the signal to all of them at once (as a pod's kill -9 would)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _all_gone(proj: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _stage_pids(proj):
            return True
        time.sleep(0.02)
    return False


def _running(log: Path, stage: str):
    return lambda: log.exists() and f"Running stage '{stage}'" in log.read_text(errors="replace")


def _outs(lock: dict, stage: str) -> list[str]:
    return [o["path"] for o in lock["stages"][stage].get("outs", [])]


def _lock_entry(root: Path, stage: str) -> dict:
    entry = yaml.safe_load((root / "dvc.lock").read_text())["stages"].get(stage) or {}
    return {"deps": {d["path"]: d["md5"] for d in entry.get("deps", [])},
            "outs": {o["path"]: o["md5"] for o in entry.get("outs", [])}}


# ---------------------------------------------------------------- the reference
@dataclass
class Reference:
    root: Path
    lock: dict
    duration: dict[str, float]
    fps: dict[str, dict | None]
    entries: dict[str, dict] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)


def _model_sha(path: Path) -> str:
    import torch

    from tasks.core.lineage import model_sha256

    blob = torch.load(path, map_location="cpu", weights_only=True)
    return model_sha256(blob["model"], blob["run_info"]["config"]["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    base = tmp_path_factory.mktemp("kill")
    ref = clone_repo(base / "ref")
    (ref / "dvc.lock").unlink(missing_ok=True)  # a fresh project: nothing ran yet
    params = yaml.safe_load((ref / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (ref / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git add -A && git commit -qm 'fast params for the kill trials'", ref)
    duration = {}
    for stage in STAGES:
        log = base / f"ref-{stage}.log"
        proc = _start(ref, ["dvc", "repro", "-s", stage], log)
        assert _wait_for(_running(log, stage), proc), log.read_text()
        t0 = time.monotonic()
        proc.wait(timeout=600)
        duration[stage] = time.monotonic() - t0
        assert proc.returncode == 0, log.read_text()
    lock = yaml.safe_load((ref / "dvc.lock").read_text())
    fps = {out: fingerprint(ref, out) for stage in STAGES for out in _outs(lock, stage)}
    assert all(fps.values()), fps
    return Reference(ref, lock, duration, fps, {s: _lock_entry(ref, s) for s in STAGES},
                     {n: _model_sha(ref / "models" / n) for n in ("best.pt", "last.pt")})


def _trial_copy(ref: Reference, stage: str, dest: Path) -> Path:
    """The reference project without the killed stage's outs, their objects in the DVC cache and DVC's run cache (so
    nothing can restore an out of the killed stage); the other stages' outs and cache objects stay (hard links)."""
    skip = {ref.root / o for o in _outs(ref.lock, stage)} | {ref.root / ".dvc/cache/runs", ref.root / ".dvc/tmp"}

    def ignore(d, names):
        return [n for n in names if Path(d) / n in skip]

    def copy(src, dst):
        return os.link(src, dst) if "/.dvc/cache/" in src else shutil.copy2(src, dst)

    shutil.copytree(ref.root, dest, symlinks=True, ignore=ignore, copy_function=copy)
    for o in ref.lock["stages"][stage].get("outs", []):  # else `dvc repro` checks the out out of the object cache
        md5 = o["md5"]
        (dest / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- one trial
def _trial(ref: Reference, stage: str, seed: int, sig: signal.Signals, work: Path) -> dict:
    rng = random.Random(seed)
    proj = _trial_copy(ref, stage, work / "proj")
    outs = _outs(ref.lock, stage)
    log = work / "killed.log"
    proc = _start(proj, ["dvc", "repro", "--no-run-cache", "-s", stage], log)
    assert _wait_for(_running(log, stage), proc), log.read_text()
    t0 = time.monotonic()
    if sig == signal.SIGKILL:
        time.sleep(rng.uniform(0.02, 0.9) * ref.duration[stage])
    else:  # SIGTERM mid-epoch: after a seeded number of logged training steps
        steps = rng.randint(*dict(SIGTERM_STEPS)[seed])
        events = proj / "reports/train/events.jsonl"
        _wait_for(lambda: events.exists() and events.read_text().count('"kind": "metrics"') >= steps, proc, 300)
    delay = time.monotonic() - t0
    signalled = proc.poll() is None
    if signalled:
        if sig == signal.SIGKILL:
            _signal_all(proc, proj, sig)
        else:  # SIGTERM to the group: torchrun forwards it to its worker
            os.killpg(proc.pid, sig)
    proc.wait(timeout=300)
    if not _all_gone(proj, 5 if sig == signal.SIGKILL else 120):
        left = _stage_pids(proj)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{stage}: processes {left} outlived {sig.name}")
    killed_log = log.read_text(errors="replace")

    # (1) what is left at the final names
    after = {o: fingerprint(proj, o) for o in outs}
    differs = [o for o in outs if after[o] != ref.fps[o]]
    finished_looking = []
    for o in differs:
        if after[o] is None:
            continue
        if stage == "train" and o in ("models", "reports/train"):
            # persisted checkpoints and incremental logs are meant to outlive a crash; they must be loadable
            bad = [k for k, v in after[o].items() if v.startswith("unloadable")]
            if bad:
                finished_looking.append(f"{o}: {bad}")
            continue
        finished_looking.append(f"{o}: {_diff(after[o], ref.fps[o])}")
    if stage == "train":  # the in-flight checkpoints a rerun resumes: never half-written at their final names
        bad = [p.name for p in (proj / CKPT).parent.glob("*.pt") if _pt_fp(p).startswith("unloadable")]
        if bad:
            finished_looking.append(f"{(proj / CKPT).parent.relative_to(proj)}: {bad}")
    temps = sorted(p.relative_to(proj).as_posix() for p in proj.rglob(".*.tmp"))
    ckpt_state = None
    if sig == signal.SIGTERM and (proj / CKPT).exists():
        import torch

        st = torch.load(proj / CKPT, map_location="cpu", weights_only=True)["state"]
        ckpt_state = (st["epoch"], st["next_batch"])

    # (2) the rerun: the pipeline, not the stage
    rr = sh(["dvc", "repro", "--no-run-cache", STAGES[-1]], proj, check=False, env=ENV)
    (work / "rerun.log").write_text(rr.stdout + rr.stderr)
    ran = [s for s in STAGES if f"Running stage '{s}'" in rr.stdout]
    reran = stage in ran
    if differs and not reran:
        finished_looking.append(f"dvc accepted {differs} as complete")
    problems = []
    if rr.returncode != 0:
        problems.append(f"rerun exited {rr.returncode}: {(rr.stdout + rr.stderr)[-400:]}")
    if set(ran) & set(STAGES[:STAGES.index(stage)]):
        problems.append(f"stages before the killed one reran: {ran}")
    for s in STAGES:
        entry, want = _lock_entry(proj, s), ref.entries[s]
        bad_deps = [k for k in want["deps"] if k not in NOT_BY_MD5 and entry["deps"].get(k) != want["deps"][k]]
        if bad_deps or set(entry["deps"]) != set(want["deps"]):
            problems.append(f"{s}: lock deps differ: {bad_deps or sorted(set(entry['deps']) ^ set(want['deps']))}")
        for o in _outs(ref.lock, s):
            if o not in NOT_BY_MD5 and entry["outs"].get(o) != want["outs"][o]:
                problems.append(f"{s}: lock md5 of {o} differs")
            fp = fingerprint(proj, o)
            if fp != ref.fps[o]:
                problems.append(f"{o} differs: {_diff(fp, ref.fps[o])}")
    resumed = "resuming at step" in rr.stdout + rr.stderr
    if rr.returncode == 0:  # every trial: the weights after the pipeline's rerun are the reference's
        weights = {n: _model_sha(proj / "models" / n) for n in ("best.pt", "last.pt")}
        if weights != ref.weights:
            problems.append(f"weights differ: {[n for n in weights if weights[n] != ref.weights[n]]}")
    if sig == signal.SIGTERM:
        if "[sigterm]" not in killed_log or f"checkpoint {CKPT}" not in killed_log:
            problems.append(f"no SIGTERM checkpoint line in the run's output: {killed_log[-300:]}")
        if not ckpt_state or ckpt_state[1] == 0:
            problems.append(f"no mid-epoch last.pt after SIGTERM (epoch, next_batch) = {ckpt_state}")
        if not resumed:
            problems.append("the rerun did not resume from last.pt")

    detail = "; ".join(filter(None, [
        "signalled" if signalled else "stage had exited before the signal",
        f"left: {', '.join(o for o in outs if after[o] is not None) or 'nothing'}",
        f"temp names: {len(temps)}" if temps else "",
        f"last.pt (epoch, next_batch) {ckpt_state}" if ckpt_state else "",
        "rerun resumed from last.pt" if resumed else "",
        f"dvc repro ran {', '.join(ran)}" if ran else "dvc repro ran nothing (outs complete)",
        *finished_looking, *problems]))
    return {"delay_s": round(delay, 2), "signalled": signalled, "left_finished_looking": bool(finished_looking),
            "identical": not problems, "detail": detail}


ALL_KILLS = [(stage, 100 * (i + 1) + n) for i, stage in enumerate(STAGES) for n in range(TRIALS[stage])]
KILLS = [(stage, seed) for stage, seed in ALL_KILLS if seed % 100 < RUN_TRIALS[stage]]


@pytest.mark.parametrize(("stage", "seed"), KILLS, ids=[f"{s}-{n}" for s, n in KILLS])
def test_sigkill_then_repro_leaves_nothing_finished_looking_and_reruns_identically(reference, record, tmp_path,
                                                                                 stage, seed):
    row = _trial(reference, stage, seed, signal.SIGKILL, tmp_path)
    record("kill", stage=stage, seed=seed, signal="SIGKILL", **row)
    assert not row["left_finished_looking"] and row["identical"], row["detail"]


@pytest.mark.parametrize("seed", [s for s, _ in SIGTERM_STEPS])
def test_sigterm_mid_epoch_checkpoints_and_the_rerun_resumes_identically(reference, record, tmp_path, seed):
    row = _trial(reference, "train", seed, signal.SIGTERM, tmp_path)
    record("sigterm", stage="train", seed=seed, signal="SIGTERM", **row)
    assert not row["left_finished_looking"] and row["identical"], row["detail"]


def test_at_least_thirty_kill_trials_over_every_data_stage_and_training():
    assert len(ALL_KILLS) >= 30 and {s for s, _ in ALL_KILLS} == set(STAGES)
    assert {s for s, _ in KILLS} == set(STAGES) and set(KILLS) <= set(ALL_KILLS)
    assert FULL == (KILLS == ALL_KILLS)
