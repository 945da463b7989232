"""keel reproduce MODEL: retrain a registered model from its lineage and check that the same model comes out.

MODEL is ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or the training run id of a registered version.

1. read the version's lineage tags (``keel.git_sha``, ``keel.git_dirty``, ``keel.model_sha256``,
   ``keel.training_run_id``, ``keel.manifest_sha256``, ``keel.shard_index_sha256``, ``keel.val_accuracy``) and the
   training run's resolved config (its ``params.json`` artifact, ``config.*``);
2. ``git worktree add`` the recorded commit in a temporary folder (the user's working tree is never touched), point
   the worktree's DVC cache (and a relative local remote) at the project's through ``.dvc/config.local``, and
   ``dvc checkout`` (then ``dvc pull``) the split and shard outputs of the commit's ``dvc.lock`` (or the project's
   when the commit has none); the shard index and manifest must hash to the recorded data version;
3. retrain there with the recorded config and seed (``python -m tasks.cli train --params <resolved>``, tracking
   off: the report goes to the original training run instead);
4. compare: ``model_sha256`` bitwise (and the largest weight difference against the registered weights), best val
   accuracy within ``reproduce.val_tolerance``; the test metrics come from the evaluate ledger's recorded result
   for an identical model (no new test read; a different model is not scored, that would be a second look);
5. write ``reports/reproduce.json`` + ``reproduce.md``, log both to the training run (artifact path
   ``reproduce/``), tag the version ``keel.reproduced`` (yes/no) and ``keel.reproduce_deltas``.

Only this module's functions import MLflow (inside functions).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from tasks.core import checkpoint, io, lineage, text, tracking
from tasks.core.config import Paths, ReproduceConfig, TrainConfig, load_params
from tasks.core.errors import ConfigError, DataError
from tasks.core.project import at_home, dvc

TAG = "keel."
REQUIRED_TAGS = ("git_sha", "model_sha256", "training_run_id", "manifest_sha256", "shard_index_sha256")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ReproduceError(DataError):
    """The model cannot be reproduced as asked (bad reference, missing lineage, data or code); says why."""


# ---------------------------------------------------------------- entry point
def run(cfg: ReproduceConfig, paths: Paths, model: str, *, root: str | Path = ".", tracking_uri: str | None = None,
        before_train: Callable[[Path], None] | None = None) -> dict:
    """Reproduce ``model``; returns the report (also written and logged). ``before_train(worktree)`` may alter the
    checkout before the retrain (tests use it to inject a drift source)."""
    root = Path(root).resolve()
    uri = tracking_uri or tracking.tracking_uri(root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    mv = resolve_version(client, model)
    tags = dict(mv.tags)
    absent = [f"{TAG}{k}" for k in REQUIRED_TAGS if not tags.get(f"{TAG}{k}") or tags[f"{TAG}{k}"] in ("none",
                                                                                                         "absent")]
    if absent:
        raise ReproduceError(f"{model} (version {mv.version}) lacks the lineage tag(s) {', '.join(absent)}: it was "
                             "not registered by `keel register` with full lineage, so it cannot be retrained")
    sha = tags[f"{TAG}git_sha"]
    if tags.get(f"{TAG}git_dirty") == "True":
        raise ReproduceError(f"{model} was trained from a dirty working tree at {sha[:12]} (keel.git_dirty=True): "
                             "the code that trained it was never committed, so it cannot be checked out; retrain "
                             "from a clean commit (keel preflight checks this) and register that")
    if lineage.git("cat-file", "-e", f"{sha}^{{commit}}", root=root) is None:
        raise ReproduceError(f"commit {sha} (keel.git_sha of {model}) is not in the repository at {root}: fetch it "
                             "(git fetch --all) or run from the repository that trained the model")
    run_id = tags[f"{TAG}training_run_id"]
    train_cfg = _training_config(client, run_id)

    work = Path(tempfile.mkdtemp(prefix="keel-reproduce-"))
    wt = work / "worktree"
    try:
        r = subprocess.run(["git", "worktree", "add", "--detach", str(wt), sha], cwd=root, capture_output=True,
                           text=True, check=False)
        if r.returncode:
            raise ReproduceError(f"git worktree add {sha[:12]} failed: {r.stderr.strip()}")
        wt_params_raw, wt_paths = _worktree_params(wt, paths)
        _checkout_data(root, wt, wt_paths, tags)
        params_file = work / "params.yaml"
        resolved = {**wt_params_raw, "train": {**train_cfg.model_dump(mode="json"), "preflight": False}}
        params_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        if before_train is not None:
            before_train(wt)
        log = _retrain(wt, params_file, train_cfg, cfg.timeout_s)
        report = _compare(cfg, client, uri, mv, tags, wt, wt_paths, root, paths, work)
        report["retrain_log_tail"] = log[-2000:]
        report["worktree"] = str(wt) if cfg.keep_worktree else None
    finally:
        if not cfg.keep_worktree:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=root, capture_output=True,
                           check=False)
            shutil.rmtree(work, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, check=False)
    _publish(client, mv, report, root, paths)
    return report


# ---------------------------------------------------------------- inputs
def resolve_version(client, model: str):
    """The registered version MODEL names (models:/<name>/<version>, models:/<name>@<alias> or a run id)."""
    from mlflow.exceptions import MlflowException

    m = _URI.match(model.strip())
    try:
        if m and m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        if m and m["version"]:
            return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        what = f"alias @{m['alias']}" if m["alias"] else f"version {m['version']}"
        raise ReproduceError(f"no registered model {m['name']!r} with {what} in the registry at "
                             f"{tracking.sqlite_path(client.tracking_uri) or client.tracking_uri}: "
                             f"{exc.message.splitlines()[0]}") from None
    if _RUN_ID.match(model.strip()):
        hits = client.search_model_versions(f"run_id = '{model.strip()}'")
        if not hits:
            raise ReproduceError(f"run {model} has no registered model version (the lineage tags live on the "
                                 "version): register it first, or pass models:/<name>/<version>")
        return min(hits, key=lambda v: int(v.version))
    raise ReproduceError(f"MODEL must be models:/<name>/<version>, models:/<name>@<alias> or a run id; got {model!r}")


def _training_config(client, run_id: str) -> TrainConfig:
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory(prefix="keel-reproduce-params-") as d:
            blob = json.loads(Path(client.download_artifacts(run_id, tracking.PARAMS_ARTIFACT, d)).read_text())
    except (MlflowException, OSError, ValueError) as exc:
        raise ReproduceError(f"the training run {run_id} has no readable {tracking.PARAMS_ARTIFACT} (the resolved "
                             f"config): {getattr(exc, 'message', exc)}") from None
    config = {k[len("config."):]: v for k, v in blob.items() if k.startswith("config.")}
    if not config:
        raise ReproduceError(f"the training run {run_id} did not log its config (config.* params)")
    try:
        return TrainConfig(**config)
    except ValueError as exc:
        raise ReproduceError(f"the training run {run_id}'s config is not valid here: {exc}") from None


def _worktree_params(wt: Path, paths: Paths) -> tuple[dict, Paths]:
    try:
        raw = yaml.safe_load((wt / "params.yaml").read_text()) or {}
        params = load_params(wt / "params.yaml")
        return raw, params.paths
    except (OSError, ConfigError, yaml.YAMLError):
        return {"paths": paths.model_dump()}, paths


def _checkout_data(root: Path, wt: Path, wt_paths: Paths, tags: dict) -> None:
    cache = dvc(["cache", "dir"], root).stdout.strip() or str(root / ".dvc" / "cache")
    dvc(["cache", "dir", "--local", str(Path(cache).resolve())], wt)
    for line in dvc(["remote", "list"], root).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1] and not Path(parts[1]).is_absolute():
            dvc(["remote", "modify", "--local", parts[0], "url", str((root / ".dvc" / parts[1]).resolve())], wt)
    # dvc.lock is rewritten by `dvc repro` and often not committed with the code it ran: try the commit's, then
    # the project's current one; the recorded data hashes decide which (if any) restores the model's data.
    commit_lock = (wt / "dvc.lock").read_bytes() if (wt / "dvc.lock").is_file() else None
    sources = [(n, b) for n, b in (("the commit's dvc.lock", commit_lock),
                                   ("the project's dvc.lock", (root / "dvc.lock").read_bytes()
                                    if (root / "dvc.lock").is_file() else None)) if b is not None]
    if not sources:
        raise ReproduceError(f"data version not found: commit {tags[f'{TAG}git_sha'][:12]} has no dvc.lock and "
                             "neither has the project; the shards the model trained on cannot be restored")
    want = {"shard index": (Path(wt / wt_paths.shards_dir) / "index.json", tags[f"{TAG}shard_index_sha256"]),
            "split manifest": (Path(wt / wt_paths.split_manifest), tags[f"{TAG}manifest_sha256"])}
    tried = []
    for source, lock in sources:
        (wt / "dvc.lock").write_bytes(lock)
        targets = ["split", "shard"]
        r = dvc(["checkout", "--force", *targets], wt)
        if r.returncode:
            r = dvc(["pull", *targets], wt)
        bad = []
        for what, (path, sha) in want.items():
            have = io.sha256_file(path) if path.is_file() else None
            if have != sha:
                bad.append(f"the {what} is {(have or 'missing')[:12]}… (recorded {sha[:12]}…)")
        if not bad:
            return
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "checkout output empty"
        tried.append(f"{source}: {'; '.join(bad)} ({last})")
    raise ReproduceError(
        f"data version not in the DVC cache/remote: no dvc.lock restores the data the model at "
        f"{tags[f'{TAG}git_sha'][:12]} trained on — " + " | ".join(tried) + "; push the data (dvc push) from where "
        "it was trained, or restore the DVC cache")


def _retrain(wt: Path, params_file: Path, cfg: TrainConfig, timeout_s: int) -> str:
    for stale in ("models", "metrics"):  # never resume: a retrain starts from the seed
        shutil.rmtree(wt / stale, ignore_errors=True)
    if cfg.devices > 1:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={cfg.devices}",
               "-m", "tasks.cli", "train", "--params", str(params_file)]
    else:
        cmd = [sys.executable, "-m", "tasks.cli", "train", "--params", str(params_file)]
    env = {**os.environ, "KEEL_TRACKING": "off", "PYTHONPATH": str(wt),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        r = subprocess.run(cmd, cwd=wt, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ReproduceError(f"the retrain ran past reproduce.timeout_s={timeout_s}") from None
    out = r.stdout + r.stderr
    if r.returncode:
        raise ReproduceError(f"the retrain at the recorded commit failed (exit {r.returncode}):\n{out[-3000:]}")
    return out


# ---------------------------------------------------------------- comparison
def _compare(cfg: ReproduceConfig, client, uri: str, mv, tags: dict, wt: Path, wt_paths: Paths, root: Path,
             paths: Paths, work: Path) -> dict:

    best = wt / wt_paths.models_dir / "best.pt"
    blob = checkpoint.load(best, what="retrained best checkpoint")
    new_sha = lineage.model_sha256(blob["model"], blob["model_name"])
    old_sha = tags[f"{TAG}model_sha256"]
    identical = new_sha == old_sha
    weights = {"registered_model_sha256": old_sha, "retrained_model_sha256": new_sha, "bitwise_identical": identical}
    weights.update(_weight_delta(uri, mv, blob["model"], work))
    old_val = _float(tags.get(f"{TAG}val_accuracy"))
    new_val = float(blob["val_accuracy"])
    val_delta = None if old_val is None else new_val - old_val
    val = {"registered_val_accuracy": old_val, "retrained_val_accuracy": new_val, "delta": val_delta,
           "tolerance": cfg.val_tolerance,
           "within_tolerance": val_delta is not None and abs(val_delta) <= cfg.val_tolerance + 1e-12}
    test = _recorded_test(root, paths, old_sha, tags[f"{TAG}manifest_sha256"]) if identical else {
        "status": "not scored: the retrained model differs, and scoring it on the test split would be a second "
                  "look (evaluate.second_look); compare on validation only"}
    reproduced = identical and val["within_tolerance"]
    return {"time": datetime.now(UTC).isoformat(timespec="seconds"), "model": f"models:/{mv.name}/{mv.version}",
            "name": mv.name, "version": str(mv.version), "training_run_id": tags[f"{TAG}training_run_id"],
            "git_sha": tags[f"{TAG}git_sha"], "manifest_sha256": tags[f"{TAG}manifest_sha256"],
            "shard_index_sha256": tags[f"{TAG}shard_index_sha256"], "device": blob["run_info"].get("config", {}).get(
                "device"), "deterministic": blob["run_info"].get("config", {}).get("deterministic"),
            "reproduced": "yes" if reproduced else "no", "weights": weights, "val": val, "test": test,
            "retrained_run_info": {k: blob["run_info"].get(k) for k in ("git_sha", "git_dirty", "environment_hash",
                                                                        "shard_index_sha256",
                                                                        "split_manifest_sha256")},
            "registered_environment_hash": tags.get(f"{TAG}environment_hash")}


def _weight_delta(uri: str, mv, state: dict, work: Path) -> dict:
    """Largest absolute difference per tensor against the registered weights (the pyfunc's weights.pt)."""

    try:
        import mlflow.artifacts
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                             dst_path=str(work / "registered")))
        found = next(local.rglob("weights.pt"))
        old = checkpoint.load(found, what="registered weights")
    except Exception as exc:  # noqa: BLE001 - the delta is extra evidence; the sha comparison is the verdict
        return {"max_abs_weight_delta": None, "weight_delta_error": f"{type(exc).__name__}: {exc}"}
    diffs = {k: float((state[k].float() - old[k].float()).abs().max()) for k in state
             if k in old and state[k].shape == old[k].shape and state[k].is_floating_point() and state[k].numel()}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"max_abs_weight_delta": diffs[worst] if worst else None, "worst_tensor": worst,
            "tensors_differing": sum(1 for v in diffs.values() if v > 0), "tensors_compared": len(diffs)}


def _recorded_test(root: Path, paths: Paths, sha: str, manifest_sha: str) -> dict:
    from tasks.evaluate import Ledger, latest_read

    ledger = Ledger(at_home(paths.test_ledger, root))
    entry = latest_read(ledger.entries(), sha, manifest_sha)
    if entry is None:
        return {"status": f"no recorded test read of {sha[:12]}… in {ledger.path}; not read now (run `keel "
                          "evaluate` on the original checkpoint if you need it)"}
    return {"status": "recorded result (no new test read)", "read_time": entry.get("time"),
            "metrics": entry.get("metrics"), "test_reused": entry.get("test_reused"), "ledger": str(ledger.path)}


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- outputs
def format_table(report: dict) -> str:
    w, v = report["weights"], report["val"]
    within = "within" if v["within_tolerance"] else "OUTSIDE"
    rows = [("check", "registered", "retrained", "result"),
            ("weights (model_sha256)", w["registered_model_sha256"][:12], w["retrained_model_sha256"][:12],
             "identical" if w["bitwise_identical"] else
             f"DIFFERENT (max |dw| {w.get('max_abs_weight_delta')}, {w.get('tensors_differing')} tensors)"),
            ("val accuracy", text.fmt(v["registered_val_accuracy"]), text.fmt(v["retrained_val_accuracy"]),
             f"delta {text.fmt(v['delta'])} ({within} ±{v['tolerance']:g})"),
            ("test metrics", "", "", report["test"].get("status", "")
             + (f": {report['test']['metrics']}" if report["test"].get("metrics") else ""))]
    head = (f"reproduce {report['model']} (commit {report['git_sha'][:12]}, run {report['training_run_id']}): "
            f"reproduced: {report['reproduced']}")
    return "\n".join([head, *text.table(rows)])


def report_paths(root: Path, paths: Paths) -> tuple[Path, Path]:
    out = at_home(paths.register_report, root).parent
    return out / "reproduce.json", out / "reproduce.md"


def _publish(client, mv, report: dict, root: Path, paths: Paths) -> None:
    js, md = report_paths(root, paths)
    io.write_json(js, report)
    table = format_table(report)
    with io.atomic_path(md) as tmp:
        Path(tmp).write_text(f"```\n{table}\n```\n")
    run_id = report["training_run_id"]
    client.log_artifact(run_id, str(js), "reproduce")
    client.log_artifact(run_id, str(md), "reproduce")
    deltas = {"weights_identical": report["weights"]["bitwise_identical"],
              "max_abs_weight_delta": report["weights"].get("max_abs_weight_delta"),
              "val_accuracy_delta": report["val"]["delta"], "retrained_model_sha256":
              report["weights"]["retrained_model_sha256"]}
    client.set_model_version_tag(mv.name, mv.version, f"{TAG}reproduced", report["reproduced"])
    client.set_model_version_tag(mv.name, mv.version, f"{TAG}reproduce_deltas", json.dumps(deltas))
    print(table)
    print(f"reproduce: report {js}; tagged {mv.name} version {mv.version} keel.reproduced={report['reproduced']}")
