"""The default job end to end, cold, on this machine: what `dvc repro` costs a user on a fresh clone.

    .venv/bin/python bench/default_job.py --wait-idle 120              # the default job, as committed
    .venv/bin/python bench/default_job.py --smoke --out /tmp/x.json    # CI: train.epochs=1, about a minute
    .venv/bin/python bench/default_job.py --set train.epochs=2 --keep  # another recipe; keep the work folder

On a fresh copy of the repository (its tracked and not-ignored files committed in a new git repo, made by
``bench/flow_overhead.py``'s ``copy_repo``: no data/, models/, metrics/ or reports/, an empty DVC cache, the
committed dvc.lock) it runs the default pipeline (the built-in digits, params.yaml as committed at HEAD)
with a real MLflow tracking server as ``MLFLOW_TRACKING_URI`` (``mlflow server`` on 127.0.0.1 and a free port,
SQLite and local artifacts, started by ``tests/support/mlflow_server.py``'s ``mlflow_server`` before the first stage,
untimed, and stopped by its PID afterwards), so the train stage logs to it and register registers there.

Each stage of dvc.yaml runs in DAG order (``dvc dag --dot``, ties in dvc.yaml's order) as its own
``dvc repro --single-item <stage>``, then one no-op ``dvc repro`` (every stage up to date) for DVC's fixed cost.
Stage by stage rather than one ``dvc repro`` whose output is parsed: DVC prints no per-stage times, and CPU
seconds per stage need a process boundary (``RUSAGE_CHILDREN`` deltas around each command).  The price is one
DVC start-up per stage instead of one for the whole run; the no-op repro (one start-up plus every stage's
hash check) bounds it.  A user typing ``dvc repro`` pays about ``total_s`` minus 6 DVC start-ups.

Per stage: ``wall_s``; ``cpu_s`` (the dvc process and everything under it, reaped: user + system);
``cpu_cores`` = cpu / wall; ``server_cpu_s`` (the MLflow server's own CPU meanwhile, in neither of the others);
``other_cores`` and ``steal_cores`` (cores that *other* processes on the machine used meanwhile: /proc/stat busy
time minus ours and the server's, as in data_stages.py / flow_overhead.py; a figure taken while this is well
above 0 is contaminated: rerun).  Totals over the stages, and the same for the no-op.

What the stages wrote: the train stage's own figures from ``metrics/train.json`` (median over its logged
windows of images/s and of the data-wait fraction), the same combined by time over ``reports/train/steps.csv``
(windows contiguous from the first step, epoch-end validation and checkpoints included), and images trained per
second of the whole train stage (process start, imports, MLflow, data load, validation: what a user waits);
best val accuracy; test accuracy and macro-F1 (``metrics/test.json``); the register report's status, gate and
whether it made ``@champion``.  The JSON also has the date, the commit and the working tree's uncommitted
files when the copy was made (it takes them, except an edited params.yaml: HEAD's is used, and
``params_yaml_uncommitted_changes_dropped`` says so; ``git.copy_tree`` is the git tree hash of what ran), the
machine (CPU model, cores, memory), versions, torch's thread setting (``OMP_NUM_THREADS`` as passed through),
params overrides and a failed stage's log tail.

``--smoke`` applies ``train.epochs=1 ingest.workers=1 shard.workers=1`` to the copy's params.yaml (as
``dvc exp run -S`` would, committed in the copy; flow_overhead.py's ``--smoke`` uses the same) and skips the
idle wait.  At one epoch the model is below register's gate (0.9), so register reports ``gate_failed`` and
makes no champion: expected, recorded, exit 0.  A stage that fails exits 1 after writing the JSON.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "default_job.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(REPO))
from data_stages import _system_cpu, machine_info, versions, wait_for_idle  # bench/ helpers (cheap imports)
from flow_overhead import (
    BIN,
    SMOKE_PARAMS,
    _children_cpu,
    _git_env,
    _proc_cpu,
    base_env,
    copy_repo,
    set_params,
)

from tests.support.mlflow_server import mlflow_server


def stage_order(work: Path, env: dict[str, str]) -> list[str]:
    """dvc.yaml's stages in DAG order, from ``dvc dag --dot`` (Kahn's algorithm, ties in the listed order)."""
    r = subprocess.run([str(BIN / "dvc"), "dag", "--dot"], cwd=work, env=env, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"bench: dvc dag failed:\n{r.stderr[-3000:]}")
    nodes = re.findall(r'^"([^"]+)";$', r.stdout, re.MULTILINE)
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', r.stdout, re.MULTILINE)
    preds = {n: {a for a, b in edges if b == n} for n in nodes}
    order: list[str] = []
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in order and preds[n] <= set(order)]
        if not ready:
            raise SystemExit(f"bench: dvc dag has a cycle? {r.stdout}")
        order.append(ready[0])
    return order


def committed_params(work: Path) -> bool:
    """The default job is params.yaml as committed: if the working tree's differs (someone's uncommitted edit,
    copied with the rest), put HEAD's in the copy and commit it there.  True when that happened."""
    head = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, check=True).stdout
    if (work / "params.yaml").read_bytes() == head:
        return False
    (work / "params.yaml").write_bytes(head)
    subprocess.run(["git", "commit", "-qam", "bench: params.yaml as committed"], cwd=work, env=_git_env(), check=True)
    return True


def _self_cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


def timed(cmd: list[str], work: Path, env: dict[str, str], server_pid: int | None, log: Path) -> dict:
    """Run ``cmd``; wall, its CPU (reaped children), the server's CPU and other processes' cores meanwhile."""
    cpu0, srv0, self0, (sys0, steal0) = _children_cpu(), _proc_cpu(server_pid), _self_cpu(), _system_cpu()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    sys1, steal1 = _system_cpu()
    cpu, srv = _children_cpu() - cpu0, _proc_cpu(server_pid) - srv0
    other = (sys1 - sys0 - cpu - srv - (_self_cpu() - self0)) / wall
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cpu_cores": round(cpu / wall, 2),
            "server_cpu_s": round(srv, 3), "other_cores": round(max(other, 0.0), 2),
            "steal_cores": round((steal1 - steal0) / wall, 2), "returncode": r.returncode,
            "stages_ran": r.stdout.count("Running stage '"), "_stdout": r.stdout, "_stderr": r.stderr}


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def train_figures(work: Path, stage_wall: float | None) -> dict | None:
    """The train stage's throughput and data wait, as it wrote them (metrics/train.json, reports/train/steps.csv)."""
    m = _read_json(work / "metrics" / "train.json")
    if m is None:
        return None
    out = {k: m.get(k) for k in ("images_per_s", "data_wait_fraction", "best_val_accuracy", "best_epoch",
                                 "epochs_run", "steps", "effective_batch", "scaled_lr", "halted")}
    steps_csv = work / "reports" / "train" / "steps.csv"
    try:
        rows = list(csv.DictReader(steps_csv.open()))
    except OSError:
        rows = []
    eb = m.get("effective_batch")
    if rows and eb:
        # every step is a full effective batch (n // batch steps per epoch), so a window's images are its steps x eb
        prev, imgs, secs, wait_s = 0, 0, 0.0, 0.0
        for row in rows:
            step, ips, wait = int(row["step"]), float(row["images_per_s"]), float(row["data_wait_fraction"])
            n = (step - prev) * eb
            t = n / ips if ips > 0 else 0.0
            imgs, secs, wait_s, prev = imgs + n, secs + t, wait_s + wait * t, step
        out.update(logged_windows=len(rows), images_trained=imgs, loop_s=round(secs, 3),
                   images_per_s_logged_windows=round(imgs / secs, 1) if secs else None,
                   data_wait_fraction_logged_windows=round(wait_s / secs, 4) if secs else None)
        if stage_wall:
            out.update(images_per_s_stage_wall=round(imgs / stage_wall, 1),
                       loop_share_of_stage=round(secs / stage_wall, 3))
    return out


def register_figures(work: Path) -> dict | None:
    rep = _read_json(work / "reports" / "register.json")
    if rep is None:
        return None
    gate = rep.get("gate") or {}
    aliases = rep.get("aliases") or []
    return {"status": rep.get("status"), "version": rep.get("version"), "aliases": aliases,
            "champion": "champion" in aliases, "gate_passed": gate.get("passed"),
            "failed_checks": [{k: c.get(k) for k in ("name", "value", "threshold")}
                              for c in gate.get("checks", []) if not c.get("passed")]}


def git_state() -> dict:
    """HEAD and the uncommitted files of the working tree, taken right before the copy (which includes them)."""
    from tasks.core.lineage import git

    dirty = (git("status", "--porcelain", root=REPO) or "").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD", root=REPO) or "unknown",
            "commit_full": git("rev-parse", "HEAD", root=REPO), "dirty": bool(dirty), "uncommitted_in_copy": dirty}


VERSIONS = ("torch", "timm", "dvc", "mlflow", "great_expectations", "pyarrow", "numpy")


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict) -> str:
    lines = ["| stage | wall s | CPU s | CPU cores | MLflow server CPU s | other cores |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | {s['cpu_cores']:.2f} | "
                     f"{s['server_cpu_s']:.2f} | {s['other_cores']:.2f} |")
    t = report["total"]
    lines.append(f"| **total** | **{t['wall_s']:.2f}** | **{t['cpu_s']:.2f}** | {t['cpu_cores']:.2f} | "
                 f"{t['server_cpu_s']:.2f} | {t['other_cores']:.2f} |")
    if report.get("noop"):
        n = report["noop"]
        lines.append(f"| no-op `dvc repro` | {n['wall_s']:.2f} | {n['cpu_s']:.2f} | {n['cpu_cores']:.2f} | "
                     f"{n['server_cpu_s']:.2f} | {n['other_cores']:.2f} |")
    tr, te, rg = report.get("train"), report.get("test"), report.get("register")
    if tr:
        lines += ["", (f"train: {_fmt(tr.get('images_per_s'), '.0f')} img/s (median window; "
                       f"{_fmt(tr.get('images_per_s_logged_windows'), '.0f')} over all logged windows, "
                       f"{_fmt(tr.get('images_per_s_stage_wall'), '.0f')} over the stage's wall), data wait "
                       f"{_fmt(tr.get('data_wait_fraction'), '.1%')} (median; "
                       f"{_fmt(tr.get('data_wait_fraction_logged_windows'), '.1%')} by time), "
                       f"{tr.get('epochs_run')} epochs, {tr.get('steps')} steps; best val accuracy "
                       f"{_fmt(tr.get('best_val_accuracy'), '.4f')} (epoch {tr.get('best_epoch')})")]
    if te:
        lines.append(f"test: accuracy {_fmt(te.get('test_accuracy'), '.4f')}, macro-F1 "
                     f"{_fmt(te.get('test_macro_f1'), '.4f')}")
    if rg:
        failed = ", ".join(f"{c['name']} {_fmt(c['value'], '.4f')} < {_fmt(c['threshold'], '.2f')}"
                           for c in rg["failed_checks"])
        lines.append(f"register: {rg['status']}" + (f" version {rg['version']}" if rg.get("version") else "")
                     + f"; @champion: {'yes' if rg['champion'] else 'no'}" + (f" (gate failed: {failed})" if failed
                                                                                else ""))
    m, g = report["machine"], report["git"]
    lines.append(f"machine: {m['nproc']} cores {m['cpu_model']}, {m['mem_total_gib']} GiB; OMP_NUM_THREADS="
                 f"{report['omp_num_threads'] or 'unset'}; git {g['commit']}{' (+uncommitted)' if g['dirty'] else ''}; "
                 f"other processes {report['other_cores_whole_run']:.2f} cores over the run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="default: %(default)s")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (copy, outputs, MLflow store, logs)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI: {' '.join(SMOKE_PARAMS)} in the copy and no idle wait; not a measurement")
    ap.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override in the copy (as `dvc exp run -S`); repeatable")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before copying the repository, wait up to this many s for a quiet machine (0: do not "
                         "wait)")
    args = ap.parse_args(argv)
    overrides = [*(SMOKE_PARAMS if args.smoke else ()), *args.overrides]
    wait_s = 0.0 if args.smoke else args.wait_idle

    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="keel-default-job-")) if own else args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("keel", "mlflow", "logs", "prefect-home"):  # a reused --workdir: start cold all the same
        shutil.rmtree(root / sub, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir()
    failed = False
    try:
        # wait first, then copy: the code measured is the tree as it is when the machine is quiet
        idle = wait_for_idle(wait_s) if wait_s > 0 else None
        git, load_avg = git_state(), [round(x, 2) for x in os.getloadavg()]
        work = copy_repo(root / "keel")
        params_reverted = committed_params(work)
        env = base_env(work, root / "prefect-home")
        env.pop("KEEL_TRACKING", None)  # the default job tracks to MLflow
        applied = set_params(work, env, overrides)
        copy_tree = subprocess.run(["git", "rev-parse", "HEAD^{tree}"], cwd=work, capture_output=True, text=True,
                                   check=False).stdout.strip()
        order = stage_order(work, env)
        probe = subprocess.run([sys.executable, "-c", "import tasks; print(tasks.__file__)"], cwd=work, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not Path(probe).resolve().is_relative_to(work.resolve()):
            raise SystemExit(f"bench: the stages would import tasks from {probe}, not from the copy {work}")
        t0 = time.perf_counter()
        with mlflow_server(root / "mlflow") as srv:
            server_start = time.perf_counter() - t0
            print(f"bench: mlflow server {srv.uri} (pid {srv.pid}) up in {server_start:.1f} s; work in {root}",
                  flush=True)
            env["MLFLOW_TRACKING_URI"] = srv.uri
            stages: dict[str, dict] = {}
            run0, (busy0, _) = time.perf_counter(), _system_cpu()
            cpu_run0, srv_run0, self_run0 = _children_cpu(), _proc_cpu(srv.pid), _self_cpu()
            for name in order:
                r = timed([str(BIN / "dvc"), "repro", "--single-item", name], work, env, srv.pid,
                          logs / f"{name}.log")
                out, err = r.pop("_stdout"), r.pop("_stderr")
                r["ran"] = r.pop("stages_ran") == 1
                stages[name] = r
                print(f"bench: {name:9} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  other cores "
                      f"{r['other_cores']:.2f}" + ("" if r["returncode"] == 0 else f"  FAILED ({r['returncode']})"),
                      flush=True)
                if r["returncode"] != 0:
                    r["stdout_tail"], r["stderr_tail"] = out[-3000:], err[-6000:]
                    failed = True
                    break
                if not r["ran"]:
                    print(f"bench: warning: {name} did not run (DVC found it up to date?)", flush=True)
            noop = None
            if not failed:
                noop = timed([str(BIN / "dvc"), "repro"], work, env, srv.pid, logs / "noop.log")
                for k in ("_stdout", "_stderr"):
                    del noop[k]
                print(f"bench: no-op     wall {noop['wall_s']:7.2f} s  cpu {noop['cpu_s']:7.2f} s  "
                      f"({noop['stages_ran']} stages ran)", flush=True)
            run_wall = time.perf_counter() - run0
            run_other = (_system_cpu()[0] - busy0 - (_children_cpu() - cpu_run0) - (_proc_cpu(srv.pid) - srv_run0)
                         - (_self_cpu() - self_run0)) / run_wall
        wall = sum(s["wall_s"] for s in stages.values())
        cpu = sum(s["cpu_s"] for s in stages.values())
        total = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cpu_cores": round(cpu / wall, 2) if wall else 0.0,
                 "server_cpu_s": round(sum(s["server_cpu_s"] for s in stages.values()), 3),
                 "other_cores": round(sum(s["other_cores"] * s["wall_s"] for s in stages.values()) / wall, 2)
                 if wall else 0.0}
        test = _read_json(work / "metrics" / "test.json")
        report = {
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git": git | {"copy_tree": copy_tree},
            "machine": machine_info(), "versions": versions(VERSIONS), "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "load_average_at_start": load_avg, "smoke": args.smoke,
            "params_overrides": applied, "params_yaml_uncommitted_changes_dropped": params_reverted, "idle": idle, "status": "failed" if failed else "ok",
            "stage_order": order, "mlflow_server_start_s": round(server_start, 2),
            "stages": stages, "total": total, "noop": noop,
            "other_cores_whole_run": round(max(run_other, 0.0), 2),
            "train": train_figures(work, stages.get("train", {}).get("wall_s")),
            "test": {k: test.get(k) for k in ("test_accuracy", "test_macro_f1", "test_loss", "test_ece")}
            if test else None,
            "register": register_figures(work),
            "work_dir": str(root) if (args.keep or not own) else None,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print("\n" + table(report) + f"\n\nbench: wrote {args.out}" + (f"; kept {root}" if args.keep else ""))
        return 1 if failed else 0
    finally:
        if own and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
