"""What the Prefect flow costs over plain `dvc repro`: the whole pipeline both ways, side by side, warm.

    .venv/bin/python bench/flow_overhead.py                       # forced + no-op, ephemeral API + a server
    .venv/bin/python bench/flow_overhead.py --repeat 3 --modes forced --apis server
    .venv/bin/python bench/flow_overhead.py --append-results      # also append the table to bench/RESULTS.md

On a fresh copy of the repository (tracked and not-ignored files, as a clone has them) and the built-in digits:
a first `dvc repro` builds everything and one no-op flow run per API creates Prefect's database (neither is
timed).  Then, per repeat, the arms run one after another, their order alternating between repeats:

- ``forced``: every stage re-run.  ``dvc repro --force`` against ``python -m flows.pipeline --force all
  --no-push``.  ``models/*.pt`` is deleted before each arm (``--force`` retrains anyway: models/ is
  not persisted and a finished training leaves no checkpoint to resume); the same seed gives the same weights, so
  evaluate returns
  the ledger's recorded result and register finds the version already registered, in both arms alike.
- ``noop``: nothing changed.  ``dvc repro`` against ``python -m flows.pipeline --no-push``.

and for the flow, two Prefect APIs: ``ephemeral`` (no PREFECT_API_URL: the flow process starts a temporary
local server, what `python -m flows.pipeline` does on a laptop) and ``server`` (a `prefect server` started
once by this bench, as with a deployment).

Per arm: wall seconds of the whole command and CPU seconds of it and its descendants (``RUSAGE_CHILDREN``;
for the ``server`` arm plus the server process's own CPU during the run).  Per stage of the flow:
``command_seconds`` (the `dvc repro --single-item` subprocess, timed inside the task) and ``task_seconds``
(the task call as the flow sees it); their difference is Prefect's per-task overhead.  The flow's total
overhead splits into: process start/stop (interpreter, imports, API start-up; = wall - the flow body),
the flow body beyond its tasks (override check, dvc.lock hash, `dvc metrics show`, artifacts), per-task
overhead, and one DVC start-up per stage instead of one for the whole pipeline (the stage commands' sum vs
`dvc repro`'s wall).  Other processes' CPU use during each arm is recorded (``other_cores``): figures taken
while it is well above 0 are contaminated by other work on the machine.

``--smoke`` (CI: does the script still run?) is the cheapest run: one repeat, ``noop`` only, the ephemeral API,
no idle wait, and ``train.epochs=1 ingest.workers=1 shard.workers=1`` in the copy's params.yaml (applied by
``set_params``, as ``dvc exp run -S`` would, and committed in the copy) so that the untimed first build is short.
Its figures are not the benchmark's; it writes ``bench/out/flow_overhead-smoke.json`` unless ``--out`` says.
At one epoch the model is below register's gate, so its flow runs end ``GateFailed`` (exit 3: every stage
succeeded, the result is printed, the register gate refused the model; see ``flows.pipeline``): expected, and
recorded per run as ``flow_state``.  A flow run is accepted as measured when it exits 0 (Completed) or 3
(GateFailed), in every mode; anything else stops the bench.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "out" / "flow_overhead.json"
SMOKE_OUT = REPO / "bench" / "out" / "flow_overhead-smoke.json"
SMOKE_PARAMS = ("train.epochs=1", "ingest.workers=1", "shard.workers=1")  # --smoke: a short first build
RESULTS = REPO / "bench" / "RESULTS.md"
EXIT_GATE_FAILED = 3  # flows.pipeline.EXIT_GATE_FAILED (not imported: Prefect stays out of this process)
CONTAMINATED_CORES = 0.3   # other processes' mean core use above which a run is not counted (if clean ones exist)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_stages import _system_cpu, machine_info, wait_for_idle  # bench/ helpers (a cheap import)


def copy_repo(dest: Path) -> Path:
    """The repository's tracked and not-ignored files, committed in a fresh git repo (what a clone has)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    subprocess.run("git init -q && git add -A && git commit -qm bench", shell=True, cwd=dest, env=_git_env(),
                   check=True)
    return dest


def _git_env() -> dict[str, str]:
    return dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
                GIT_COMMITTER_EMAIL="b@b")


def set_params(work: Path, env: dict[str, str], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key=value`` overrides to the copy's params.yaml exactly as the flow's ``--set`` does (DVC's
    ``dvc exp run -S`` grammar, comments kept, unknown keys and invalid values refused), with the copy's own
    ``flows.pipeline.apply_overrides`` in a subprocess (Prefect is imported there, not here), and commit the
    result in the copy so that its tree stays clean.  Returns {key: value as written}."""
    if not overrides:
        return {}
    code = ("import json, sys; from pathlib import Path; from flows.pipeline import apply_overrides; "
            "print(json.dumps(apply_overrides(Path('.'), sys.argv[1:])))")
    r = subprocess.run([sys.executable, "-c", code, *overrides], cwd=work, env=env, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"bench: params overrides {' '.join(overrides)} refused:\n{r.stderr[-3000:]}")
    subprocess.run(["git", "commit", "-qam", f"bench: {' '.join(overrides)}"], cwd=work, env=_git_env(), check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def base_env(work: Path, prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "KEEL_DVC"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(work), DO_NOT_TRACK="1",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
               PREFECT_HOME=str(prefect_home))
    return env


def _children_cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def _proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system
                                       for c in psutil.Process(pid).children(recursive=True))
    return 0.0


def timed(cmd: list[str], work: Path, env: dict[str, str], server_pid: int | None = None,
          ok: tuple[int, ...] = (0,)) -> dict:
    cpu0, srv0, sys0 = _children_cpu(), _proc_cpu(server_pid), _system_cpu()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0 + _proc_cpu(server_pid) - srv0
    other = (_system_cpu()[0] - sys0 - cpu) / wall
    if r.returncode not in ok:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "other_cores": round(max(other, 0.0), 2),
            "stdout": r.stdout, "stderr": r.stderr, "returncode": r.returncode}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(env: dict[str, str], log: Path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), opener.open(f"{api}/health", timeout=1) as r:
                if r.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: prefect server did not start; see {log}")
            time.sleep(0.3)
        yield api, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def run_dvc(work: Path, env: dict[str, str], mode: str) -> dict:
    if mode == "forced":
        for p in (work / "models").glob("*.pt"):
            p.unlink()
    r = timed([str(BIN / "dvc"), "repro", *(["--force"] if mode == "forced" else [])], work, env)
    ran = r["stdout"].count("Running stage '")
    expect = 7 if mode == "forced" else 0
    if ran != expect:
        raise SystemExit(f"bench: dvc repro ({mode}) ran {ran} stages, expected {expect}:\n{r['stdout'][-3000:]}")
    return {k: r[k] for k in ("wall_s", "cpu_s", "other_cores")} | {"stages_ran": ran}


def run_flow(work: Path, env: dict[str, str], mode: str, server_pid: int | None = None) -> dict:
    if mode == "forced":
        for p in (work / "models").glob("*.pt"):
            p.unlink()
    cmd = [sys.executable, "-m", "flows.pipeline", "--json", "--no-push", *(["--force", "all"] if mode == "forced"
                                                                           else [])]
    # exit 3: every stage succeeded and the register gate refused the model (the --smoke recipe); still a run
    r = timed(cmd, work, env, server_pid, ok=(0, EXIT_GATE_FAILED))
    result = json.loads(r["stdout"][r["stdout"].find("{"):])
    stages = result["stages"]
    ran = sum(s["status"] == "ran" for s in stages)
    expect = len(stages) if mode == "forced" else 0
    if ran != expect:
        raise SystemExit(f"bench: flow ({mode}) ran {ran} stages, expected {expect}: {stages}")
    task_sum = sum(s["task_seconds"] for s in stages)
    cmd_sum = sum(s["command_seconds"] for s in stages)
    return {k: r[k] for k in ("wall_s", "cpu_s", "other_cores")} | {
        "flow_state": "GateFailed" if r["returncode"] == EXIT_GATE_FAILED else "Completed",
        "stages_ran": ran, "flow_body_s": result["seconds"], "tasks_s": round(task_sum, 3),
        "stage_commands_s": round(cmd_sum, 3),
        "per_stage": {s["stage"]: {"command_s": s["command_seconds"], "task_s": s["task_seconds"],
                                   "task_overhead_ms": round(1000 * (s["task_seconds"] - s["command_seconds"]), 1)}
                      for s in stages}}


def _med(xs):
    return round(statistics.median(xs), 3) if xs else None


def clean_runs(runs: list[dict], max_other: float = CONTAMINATED_CORES) -> tuple[list[dict], list[tuple]]:
    """Keep the (repeat, mode) groups in which no arm ran beside other work (other_cores <= max_other); if no
    group of a mode is clean, keep all of that mode's.  Returns (kept runs, dropped (repeat, mode) groups)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["repeat"], r["mode"]), []).append(r)
    clean = {g for g, rs in groups.items() if all(r["other_cores"] <= max_other for r in rs)}
    kept, dropped = [], []
    for g, rs in groups.items():
        mode_has_clean = any(c[1] == g[1] for c in clean)
        if g in clean or not mode_has_clean:
            kept += rs
        else:
            dropped.append(g)
    return kept, dropped


def summarise(runs: list[dict]) -> dict:
    """Medians per (mode, arm) over the clean groups, and the overhead of each flow arm over dvc repro."""
    runs, dropped = clean_runs(runs)
    out: dict = {"dropped_contaminated": [f"repeat {i} {m}" for i, m in dropped]}
    for mode in sorted({r["mode"] for r in runs}):
        dv = [r for r in runs if r["mode"] == mode and r["arm"] == "dvc"]
        d = {"dvc": {"wall_s": _med([r["wall_s"] for r in dv]), "cpu_s": _med([r["cpu_s"] for r in dv]),
                     "n": len(dv)}}
        for arm in sorted({r["arm"] for r in runs if r["arm"] != "dvc"}):
            fl = [r for r in runs if r["mode"] == mode and r["arm"] == arm]
            wall, cpu = _med([r["wall_s"] for r in fl]), _med([r["cpu_s"] for r in fl])
            body, tasks, cmds = (_med([r[k] for r in fl]) for k in ("flow_body_s", "tasks_s", "stage_commands_s"))
            stages = list(fl[0]["per_stage"]) if fl else []
            d[arm] = {
                "wall_s": wall, "cpu_s": cpu, "n": len(fl),
                "overhead_wall_s": round(wall - d["dvc"]["wall_s"], 3),
                "overhead_wall_pct": round(100 * (wall - d["dvc"]["wall_s"]) / d["dvc"]["wall_s"], 1),
                "overhead_cpu_s": round(cpu - d["dvc"]["cpu_s"], 3),
                "overhead_cpu_pct": round(100 * (cpu - d["dvc"]["cpu_s"]) / d["dvc"]["cpu_s"], 1),
                "split": {"process_start_stop_s": round(wall - body, 3), "flow_body_outside_tasks_s": round(body - tasks, 3),
                          "prefect_per_task_s": round(tasks - cmds, 3),
                          "stage_commands_minus_dvc_repro_s": round(cmds - d["dvc"]["wall_s"], 3)},
                "per_stage": {s: {"command_s": _med([r["per_stage"][s]["command_s"] for r in fl]),
                                  "task_overhead_ms": _med([r["per_stage"][s]["task_overhead_ms"] for r in fl])}
                              for s in stages}}
        out[mode] = d
    return out


def table(summary: dict) -> str:
    lines = [("| mode | arm | wall s | CPU s | overhead wall | overhead CPU | process start/stop s | flow body "
              "outside tasks s | Prefect per-task s (sum) | stage cmds - dvc repro s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    modes = {m: d for m, d in summary.items() if m != "dropped_contaminated"}
    for mode, d in modes.items():
        lines.append(f"| {mode} | dvc repro | {d['dvc']['wall_s']} | {d['dvc']['cpu_s']} | - | - | - | - | - | - |")
        for arm, a in d.items():
            if arm == "dvc":
                continue
            s = a["split"]
            lines.append(f"| {mode} | flow ({arm} API) | {a['wall_s']} | {a['cpu_s']} | {a['overhead_wall_s']:+.2f} s "
                         f"({a['overhead_wall_pct']:+.1f}%) | {a['overhead_cpu_s']:+.2f} s ({a['overhead_cpu_pct']:+.1f}%) | "
                         f"{s['process_start_stop_s']} | {s['flow_body_outside_tasks_s']} | {s['prefect_per_task_s']} | "
                         f"{s['stage_commands_minus_dvc_repro_s']} |")
    for mode, d in modes.items():
        for arm, a in d.items():
            if arm == "dvc" or mode != "forced":
                continue
            lines += ["", f"Per stage ({mode}, {arm} API): command s / Prefect task overhead ms: " + ", ".join(
                f"{st} {v['command_s']} / {v['task_overhead_ms']}" for st, v in a["per_stage"].items())]
    if summary.get("dropped_contaminated"):
        dropped = ", ".join(summary["dropped_contaminated"])
        lines += ["", f"Not counted (other processes used > {CONTAMINATED_CORES} cores meanwhile): {dropped}"]
    return "\n".join(lines)


def append_results(report: dict, modes: str, apis: str) -> None:
    m = report["machine"]
    with RESULTS.open("a") as fh:
        fh.write(f"\n\n## Flow overhead: Prefect flow vs `dvc repro` ({report['date'][:10]}, {m['nproc']}-core CPU "
                 f"{m['cpu_model']}, git {report['git']})\n\n"
                 f"`.venv/bin/python bench/flow_overhead.py --repeat {report['repeat']} --modes {modes} --apis {apis}` "
                 f"(medians; built-in digits, default params)\n\n{table(report['summary'])}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--modes", default="forced,noop", help="comma list of forced, noop")
    ap.add_argument("--apis", default="ephemeral,server", help="comma list of ephemeral, server")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--out", type=Path, help=f"default {OUT.relative_to(REPO)} ({SMOKE_OUT.relative_to(REPO)} "
                                              "with --smoke)")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before the first run and before each (repeat, mode) group, wait up to this many s for a "
                         "quiet machine")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--summarise", type=Path, metavar="JSON", help="only re-print (and append) a saved report")
    ap.add_argument("--smoke", action="store_true",
                    help="CI: the cheapest run (--repeat 1 --modes noop --apis ephemeral --wait-idle 0, and "
                         f"{' '.join(SMOKE_PARAMS)} in the copy); not a measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        if args.append_results:
            ap.error("--smoke figures are not a measurement: not appended to RESULTS.md")
        args.repeat, args.modes, args.apis, args.wait_idle = 1, "noop", "ephemeral", 0.0
    if args.out is None:
        args.out = SMOKE_OUT if args.smoke else OUT
    modes, apis = args.modes.split(","), args.apis.split(",")
    if args.summarise:
        report = json.loads(args.summarise.read_text())
        report["summary"] = summarise(report["runs"])
        print(table(report["summary"]))
        if args.append_results:
            append_results(report, args.modes, args.apis)
        return 0

    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="keel-flow-bench-")) if own else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        work = copy_repo(root / "keel")
        env = base_env(work, root / "prefect-home")
        overrides = set_params(work, env, SMOKE_PARAMS) if args.smoke else {}
        idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        print("bench: first dvc repro (builds everything; not timed)", flush=True)
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=env, check=True, capture_output=True)
        print(f"bench: first run {time.perf_counter() - t0:.0f} s", flush=True)
        runs: list[dict] = []
        with contextlib.ExitStack() as stack:
            api_env = {}
            for api in apis:
                if api == "server":
                    url, pid = stack.enter_context(prefect_server(env, root / "prefect-server.log"))
                    api_env[api] = (dict(env, PREFECT_API_URL=url), pid)
                else:
                    api_env[api] = (env, None)
                run_flow(work, api_env[api][0], "noop", api_env[api][1])  # warm: database, imports, page cache
            for i in range(args.repeat):
                for mode in modes:
                    if args.wait_idle > 0:
                        wait_for_idle(args.wait_idle)
                    arms = ["dvc", *apis]
                    for arm in arms if i % 2 == 0 else arms[::-1]:
                        if arm == "dvc":
                            r = run_dvc(work, env, mode)
                        else:
                            r = run_flow(work, api_env[arm][0], mode, api_env[arm][1])
                        runs.append({"repeat": i, "mode": mode, "arm": arm} | r)
                        print(f"bench: repeat {i} {mode:6} {arm:9} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s"
                              f"  other cores {r['other_cores']:.2f}", flush=True)
        summary = summarise(runs)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=False).stdout.strip() or "unknown"
        report = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "git": head,
                  "machine": machine_info(), "idle": idle, "repeat": args.repeat, "smoke": args.smoke,
                  "params_overrides": overrides, "runs": runs, "summary": summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        text = table(summary)
        print("\n" + text + f"\n\nbench: wrote {args.out}")
        if args.append_results:
            append_results(report, args.modes, args.apis)
        return 0
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
