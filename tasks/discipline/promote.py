"""keel promote EXP: the one test read at the end of an experiment loop.

Experiments stop at training (``dvc exp run train -S key=value``, ``--queue``/``--temp`` alike; evaluate and
register refuse to run inside one, ``tasks.core.project.experiment_refusal``) and are compared on validation with
``dvc exp show``. Promoting the chosen one:

1. lists the experiments of the current commit (``dvc exp show --json``) that finished with validation metrics:
   the candidates that were compared on validation; EXP must be one of them;
2. ``dvc exp apply EXP``: its params, dvc.lock and outputs (from the DVC cache) into the workspace;
3. ``dvc repro``: everything up to training is up to date, so evaluate reads the test split once (the ledger
   records it) and register gates and registers the model as any pipeline run does;
4. tags the registered version ``keel.experiment`` (name and git rev), ``keel.candidates_compared`` (how many
   candidates were compared on validation before this one was chosen) and ``keel.selection`` (the val metric of
   the choice and of the best candidate), so a reader of the registry knows how much selection happened on val;
5. writes ``reports/promote.json``.

A trial of a sweep whose trials ran as jobs (``keel sweep --trials-on DEPLOYMENT``, flows/sweep_trial.py) is not a
DVC experiment: there is nothing to ``dvc exp apply``. Step 2 then applies the trial's recorded overrides (from the
sweep report) to params.yaml with DVC's own ``-S`` edit, validated by keel's schema before params.yaml is replaced,
and step 3's ``dvc repro`` restores the trial's training from the DVC run-cache it was saved to (same code, data
and params), so the model evaluated is the one compared on validation.

A failed gate fails the command (exit 1) after the report is written; nothing is tagged."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tasks.core import io
from tasks.core.config import Params
from tasks.core.errors import DataError
from tasks.core.project import dvc, experiments_of_head, project_home

METRIC = "best_val_accuracy"   # tasks.core.project.EXP_METRIC


class PromoteError(DataError):
    """A promotion that cannot go ahead (no such experiment, a failed apply or pipeline run, a failed gate)."""


def _sweep_trial(report_path: Path, experiment: str) -> dict:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        raise PromoteError(f"{report_path}: not a readable sweep report ({exc})") from None
    trial = next((t for t in report.get("trials") or [] if t.get("experiment") == experiment), None)
    if trial is None or trial.get("state") != "COMPLETE":
        raise PromoteError(f"{report_path}: {experiment} is not a complete trial of sweep {report.get('study')!r}")
    compared = int(report["compared_on_validation"])
    return {"study": report["study"], "trial": trial["number"], "compared": compared,
            "trials_on": trial.get("trials_on") or report.get("trials_on") or "local", "sets": trial.get("sets"),
            "value": trial["value"], "objective": report["objective"],
            "selection": f"sweep {report['study']}: trial {trial['number']} of {compared} compared on validation, "
                         f"{report['objective']} {trial['value']:.4f} ({report['direction']})"}


def _tag(report: dict, tags: dict[str, str], params: Params) -> None:
    """Tag the registered version through the register stage's ``Registry`` (``params.register_``'s retries on
    connection errors, MLflow's own HTTP retries bounded); a server that stays unreachable is a PromoteError that
    says what is done already."""
    from tasks.core import tracking
    from tasks.register.records import RegisterError
    from tasks.register.registry import Registry, http_limits

    uri = report.get("tracking_uri") or tracking.tracking_uri(project_home())
    name, version = report["model_name"], str(report["version"])
    with http_limits():
        registry = Registry(uri, params.register_)
        try:
            for k, v in tags.items():
                registry.call(f"tagging {name} v{version} {k}", registry.client.set_model_version_tag,
                              name, version, k, v)
        except RegisterError as exc:
            raise PromoteError(f"{name} v{version} is evaluated (one test read) and registered, but its promotion "
                               f"tags are not set: {exc} Run the same `keel promote` again once the server answers: "
                               "every stage is cached, so the test split is not read again.") from None


def _apply_sets(root: Path, sets: list[str], name: str) -> None:
    """The trial's overrides into params.yaml as ``dvc exp run -S`` writes them; the result validated by keel's
    schema on a copy first, so a refused value leaves params.yaml as it was."""
    import shutil
    import tempfile

    from dvc.utils.hydra import apply_overrides

    from tasks.core.config import load_params

    target = root / "params.yaml"
    with tempfile.TemporaryDirectory(prefix="keel-promote-") as tmp:
        trial = Path(tmp) / "params.yaml"
        shutil.copyfile(target, trial)
        try:
            apply_overrides(str(trial), list(sets))
            load_params(trial)
        except Exception as exc:  # noqa: BLE001 - keel's ConfigError, dvc's InvalidArgumentError (Hydra)
            raise PromoteError(f"{target}: the overrides of {name} ({' '.join(sets)}) do not apply: "
                               f"{exc.__cause__ or exc}") from None
        io.write_bytes(target, trial.read_bytes())


def _choose(root: Path, paths, experiment: str, sweep: dict | None) -> tuple[dict, dict, list[dict], int]:
    """(chosen, best, candidates, compared): the experiment to promote among those compared on validation, after
    its params and outputs are in the workspace (``dvc exp apply``, or a job trial's overrides)."""
    if sweep and sweep["trials_on"] != "local":
        if not sweep.get("sets"):
            raise PromoteError(f"sweep report: trial {sweep['trial']} ({experiment}) has no recorded overrides")
        chosen = {"name": experiment, "rev": None, METRIC: None, sweep["objective"]: sweep["value"]}
        _apply_sets(root, sweep["sets"], experiment)
        print(f"promote: {experiment}, sweep trial {sweep['trial']} run as a job on {sweep['trials_on']}: its "
              f"overrides applied to params.yaml ({' '.join(sweep['sets'])})", file=sys.stderr)
        return chosen, chosen, [chosen], sweep["compared"]
    cands = experiments_of_head(root, paths.train_metrics)
    if not cands:
        raise PromoteError(f"{root}: no experiment of the current commit has validation metrics "
                           f"({paths.train_metrics}); run some first: `dvc exp run train -S train.lr=0.002`")
    chosen = next((c for c in cands if experiment in (c["name"], c["rev"]) or c["rev"].startswith(experiment)),
                  None)
    if chosen is None:
        raise PromoteError(f"experiment {experiment!r} is not among the {len(cands)} candidates of the current "
                           f"commit: {', '.join(c['name'] for c in cands)} (`dvc exp show` lists them)")
    best = max(cands, key=lambda c: c[METRIC])
    compared = sweep["compared"] if sweep else len(cands)
    print(f"promote: {chosen['name']} ({METRIC} {chosen[METRIC]:.4f}) of {compared} candidates compared on "
          f"validation; best {best['name']} ({best[METRIC]:.4f})", file=sys.stderr)
    if best[METRIC] > chosen[METRIC]:
        print(f"promote: note: {chosen['name']} is not the best candidate on validation", file=sys.stderr)
    r = dvc(["exp", "apply", chosen["name"]], root)
    if r.returncode != 0:
        raise PromoteError(f"`dvc exp apply {chosen['name']}` failed: {r.stderr.strip()[-600:]}")
    return chosen, best, cands, compared


def run(params: Params, experiment: str, sweep_report: str | None = None) -> dict:
    """Promote ``experiment``. With ``sweep_report`` (``keel sweep``'s reports/sweep.json, whose trial it is) the
    candidates counted are the sweep's trials compared on validation, and the version is also tagged ``keel.sweep``
    and ``keel.trial``."""
    sweep = _sweep_trial(Path(sweep_report), experiment) if sweep_report else None
    root = project_home()
    paths = params.paths
    chosen, best, cands, compared = _choose(root, paths, experiment, sweep)
    r = dvc(["repro"], root, capture=False)  # the user sees the stages run
    if r.returncode != 0:
        raise PromoteError(f"`dvc repro` after applying {chosen['name']} failed (exit {r.returncode}); see above")
    report = json.loads((root / paths.register_report).read_text())
    result = {"experiment": chosen["name"], "rev": chosen["rev"], "candidates_compared": compared,
              METRIC: chosen[METRIC], "best_candidate": best["name"], "best_" + METRIC: best[METRIC],
              "candidates": cands, "register": {k: report.get(k) for k in ("status", "model_name", "version")}}
    if sweep:
        result["sweep"] = sweep
    io.write_json(root / Path(paths.register_report).parent / "promote.json", result)
    if report.get("status") not in ("registered", "already_registered"):
        raise PromoteError(f"{chosen['name']} was evaluated on test but not registered: register says "
                           f"{report.get('status')!r} (see {paths.register_report})")
    if chosen["rev"]:
        tags = {"keel.experiment": f"{chosen['name']} ({chosen['rev'][:10]})",
                "keel.selection": f"{METRIC} {chosen[METRIC]:.4f}; best of the {len(cands)} candidates "
                                  f"{best[METRIC]:.4f} ({best['name']})"}
    else:
        tags = {"keel.experiment": f"{chosen['name']} (sweep trial run as a job on {sweep['trials_on']})"}
    tags["keel.candidates_compared"] = str(compared)
    if sweep:
        tags.update({"keel.sweep": sweep["study"], "keel.trial": str(sweep["trial"]),
                     "keel.selection": sweep["selection"]})
    _tag(report, tags, params)
    print(f"promote: {report['model_name']} v{report['version']} is {chosen['name']}, chosen from {compared} "
          "candidates on validation; one test read", file=sys.stderr)
    return result
