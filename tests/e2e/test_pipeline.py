"""The pipeline slice as a user runs it: `dvc repro` in a fresh copy of the repo, a no-op repro, a params change."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("ingest", "split", "validate", "shard", "train", "evaluate", "register")


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def sh(cmd, cwd, check=True, env: dict | None = None):
    r = subprocess.run(cmd, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                       shell=isinstance(cmd, str), check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return clone_repo(tmp_path_factory.mktemp("clone") / "keel")


def clone_repo(dest: Path) -> Path:
    """A copy of the repo's tracked (and not-ignored new) files, as a fresh clone would have them."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    sh("git init -q && git add -A && git commit -qm init", dest)
    return dest


def trained_baseline(dest: Path, overrides: dict[str, dict], env: dict[str, str] | None = None) -> Path:
    """A fresh clone with ``overrides`` (section -> values) in params.yaml, ``dvc repro train`` run (no test read)
    and committed as the baseline: where an experiment loop starts."""
    root = clone_repo(dest)
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["dvc", "repro", "train"], root, env=env)
    sh("git add -A && git commit -qm baseline", root)
    return root


def ran(out: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out}


@pytest.mark.slow
def test_dvc_repro_fresh_then_noop_then_params_change(clone):
    r = sh(["dvc", "repro"], clone)
    assert ran(r.stdout) == set(STAGES), r.stdout + r.stderr
    assert "found 1797 = ingested 1797 + rejected 0" in r.stdout
    index = json.loads((clone / "data/shards/index.json").read_text())
    assert index["resolution"] == 32 and sum(f["rows"] for f in index["splits"]["train"]) > 1000
    for f in ("reports/audit/audit.json", "reports/audit/contact_sheet.png", "reports/leakage.json",
              "reports/validate/summary.json", "data/split/manifest.parquet.sha256", "dvc.lock",
              "models/best.pt", "models/last.pt", "reports/train/curves.png", "mlruns/mlflow.db"):
        assert (clone / f).exists(), f
    train = json.loads((clone / "metrics/train.json").read_text())
    assert train["best_val_accuracy"] > 0.9, train  # the digits default: about 0.98 after 8 epochs
    manifest_sha = (clone / "data/split/manifest.parquet.sha256").read_text()
    test = json.loads((clone / "metrics/test.json").read_text())
    assert test["test_accuracy"] > 0.9 and test["test_looks"] == 1 and not test["test_reused"], test
    # `make run` ends with a registered, aliased model in the embedded registry inside the project
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(f"sqlite:///{clone / 'mlruns/mlflow.db'}")
    champion = registry.get_model_version_by_alias("keel-classifier", "champion")
    assert champion.tags["keel.model_sha256"] == test["model_sha256"]
    assert Path(champion.source).exists() or (clone / "mlruns/artifacts").is_dir()
    assert "models:/keel-classifier@champion" in r.stdout + r.stderr

    r = sh(["dvc", "repro"], clone)
    assert ran(r.stdout) == set(), r.stdout
    assert r.stdout.count("didn't change, skipping") == len(STAGES), r.stdout

    # a validate rerun that passes on the same data (a report-only param): new Data Docs, the same verdict, so
    # shard and everything after it stay as they are
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["sample_ids"] = params["validate"].get("sample_ids", 5) + 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh(["dvc", "repro"], clone)
    assert ran(r.stdout) == {"validate"}, r.stdout

    params["shard"]["resolution"] = 16
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh(["dvc", "repro"], clone, check=False)
    assert ran(r.stdout) == {"shard", "train", "evaluate"}, r.stdout  # and not ingest, split or validate
    assert json.loads((clone / "data/shards/index.json").read_text())["resolution"] == 16
    assert (clone / "data/split/manifest.parquet.sha256").read_text() == manifest_sha
    # a second model on the same frozen test split is a second look: refused (evaluate.second_look: strict)
    assert r.returncode != 0 and "keel evaluate: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "second look" in r.stderr, r.stderr
    ledger = [json.loads(line) for line in (clone / "data/test_ledger/ledger.jsonl").read_text().splitlines()]
    assert [e["action"] for e in ledger] == ["read", "refused"]
    assert registry.get_model_version_by_alias("keel-classifier", "champion").version == champion.version

    params["evaluate"]["second_look"] = "warn"  # knowingly: the result is marked as a reused test set
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh(["dvc", "repro"], clone)
    assert ran(r.stdout) == {"evaluate", "register"}, r.stdout
    test2 = json.loads((clone / "metrics/test.json").read_text())
    assert test2["test_reused"] and test2["test_looks"] == 2
    report = json.loads((clone / "reports/register.json").read_text())
    assert report["status"] in ("registered", "gate_failed"), report
    if report["status"] == "registered":
        v = registry.get_model_version("keel-classifier", report["version"])
        assert "reused" in v.tags["keel.test_ledger"] and "2 looks" in v.tags["keel.test_ledger"]


@pytest.mark.slow
def test_cli_errors_are_readable(clone, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest:\n  sorce: builtin:digits\n")
    r = sh(["keel", "ingest", "--params", str(bad)], clone, check=False)
    assert r.returncode == 1
    assert "ingest.sorce: unknown key" in r.stderr and "Traceback" not in r.stderr
    ok = yaml.safe_load((clone / "params.yaml").read_text())
    ok["split"]["seed"] = 99
    p2 = tmp_path / "p2.yaml"
    p2.write_text(yaml.safe_dump(ok))
    r = sh(["keel", "split", "--params", str(p2)], clone, check=False)
    assert r.returncode == 1 and "split is frozen" in r.stderr and "Traceback" not in r.stderr
    # a failing expectation stops the stage with a list: split, expectation, sample ids
    strict = yaml.safe_load((clone / "params.yaml").read_text())
    strict["validate"].update(min_width=1, max_width=4)  # digits are 8 px wide
    p3 = tmp_path / "p3.yaml"
    p3.write_text(yaml.safe_dump(strict))
    r = sh(["keel", "validate", "--params", str(p3)], clone, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "validation failed" in r.stderr
    assert "train: expect_column_values_to_be_between(width)" in r.stderr and "e.g. ids" in r.stderr
    r = sh(["keel", "--help"], clone)
    assert all(s in r.stdout for s in STAGES)


@pytest.mark.slow
@pytest.mark.reliability
def test_two_dvc_repro_at_once_leave_the_ledger_valid(clone, record):
    """Two `dvc repro` of evaluate started together in one project: DVC's lock lets one run and refuses the
    other by name; the test-access ledger keeps whole, unique lines and gains no read (same model: recorded)."""
    led = clone / "data/test_ledger/ledger.jsonl"
    if not led.exists():  # run on its own (`make reliability`): the pipeline up to a first evaluation
        sh(["dvc", "repro", "evaluate"], clone)
    before = led.read_text().splitlines()
    cmd = ["dvc", "repro", "--force", "--single-item", "evaluate"]
    procs = [subprocess.Popen(cmd, cwd=clone, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    done = [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
    after = led.read_text().splitlines()
    entries = [json.loads(line) for line in after]
    new = [e["action"] for e in entries[len(before):]]
    codes = sorted(rc for rc, _, _ in done)
    locked = [err for rc, _, err in done if rc != 0]
    ok = (after[:len(before)] == before and len(after) == len(set(after)) and "read" not in new
          and (codes == [0, 0] or (codes[0] == 0 and locked and "lock" in locked[0].lower()))
          and not any("Traceback" in err for _, _, err in done))
    record("concurrency", case="two `dvc repro` of evaluate at once", ok=ok,
           outcome=f"exit codes {codes}, new ledger entries {new}")
    assert ok, (codes, new, [err[-1500:] for _, _, err in done])
