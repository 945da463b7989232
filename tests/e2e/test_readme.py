"""README's day-to-day experiment loop, run as written: the command block under the README comment
`<!-- tested: tests/e2e/test_readme.py ... -->` is parsed and each line runs, in order, in a cloned digits project
whose baseline commit was trained with `dvc repro train` (no test read yet), under a short recipe (2 epochs, one
worker, a lowered register gate) applied to params.yaml before the loop. A change to that block is what this test
runs.

What the test adds to the lines, and only this:
- a placeholder `<exp>` becomes an experiment name: the i-th `<exp>` of a line is the i-th best experiment of the
  baseline commit by best_val_accuracy (`dvc exp show --json`), so `keel promote <exp>` promotes the best one and
  `dvc plots diff <exp> <exp>` overlays the best two;
- after `dvc queue start` (which returns at once) it waits for the queue to drain, as a user watches
  `dvc queue status`, before the next line;
- `keel sweep` lines are skipped (they have their own tests)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.e2e.test_exp_compare import _exp_show, _ledger, _runs, wait_for_queue
from tests.e2e.test_pipeline import REPO, sh, trained_baseline

pytestmark = pytest.mark.slow

MARKER = "<!-- tested: tests/e2e/test_readme.py"
FAST = {"ingest": {"workers": 1}, "shard": {"workers": 1},
        "train": {"epochs": 2, "warmup_steps": 10},
        # a short recipe: the gate is lowered so that the one registration the loop ends with can happen
        "register": {"min_val_accuracy": 0.3, "min_test_accuracy": 0.3, "min_test_macro_f1": 0.3}}
ENV = {"OMP_NUM_THREADS": "1"}


def readme_loop(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The commands of the fenced block that follows the marker comment, comments stripped, one argv per line."""
    text = readme.read_text()
    assert text.count(MARKER) == 1, f"README.md must mark exactly one block with {MARKER!r}"
    m = re.search(r"```[^\n]*\n(.*?)\n```", text[text.index(MARKER):], re.DOTALL)
    assert m, "no fenced block after the marker"
    lines = [shlex.split(line, comments=True) for line in m.group(1).splitlines()]
    return [argv for argv in lines if argv]


def test_the_block_is_the_loop():
    cmds = [" ".join(a[:3]) for a in readme_loop()]
    assert any(c.startswith("dvc exp run") for c in cmds) and "dvc queue start" in cmds, cmds
    assert any(c.startswith("dvc exp show") for c in cmds) and any(c.startswith("keel promote") for c in cmds)


def test_readme_experiment_loop_as_written(tmp_path):
    root = trained_baseline(tmp_path / "keel", FAST, ENV)
    runs0 = len(_runs(root))

    outputs: dict[str, str] = {}
    promoted = None
    for argv in readme_loop():
        if argv[:2] == ["keel", "sweep"]:
            continue
        if "<exp>" in argv:
            _, exps = _exp_show(root)
            ranked = sorted((n for n, (s, _, m) in exps.items() if s == "success" and m),
                            key=lambda n: -exps[n][2]["best_val_accuracy"])
            names = iter(ranked)
            argv = [next(names) if a == "<exp>" else a for a in argv]
        if argv[:2] == ["keel", "promote"]:
            promoted = argv[2]
            assert _ledger(root) == []  # every experiment so far was compared on validation only
        r = sh(argv, root, check=False, env=ENV)
        assert r.returncode == 0, f"{shlex.join(argv)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs[" ".join(argv[:3])] = r.stdout + r.stderr
        if argv[:3] == ["dvc", "queue", "start"]:
            status = wait_for_queue(root)
            assert "Failed" not in status, status

    # the experiments the block ran: one per `dvc exp run` value, all finished with val metrics, all shown
    expected = 0
    for argv in readme_loop():
        if argv[:3] == ["dvc", "exp", "run"]:
            sets = [argv[i + 1] for i, a in enumerate(argv) if a in ("-S", "--set-param")]
            expected += max([len(s.split("=", 1)[1].split(",")) for s in sets], default=1)  # a grid: one per value
    _, exps = _exp_show(root)
    assert len(exps) == expected, exps
    assert all(s == "success" and m and 0 < m["best_val_accuracy"] <= 1 for s, _, m in exps.values()), exps
    assert len(_runs(root)) >= runs0 + expected  # each training logged to the project's store (promote may add none)
    shown = next(v for k, v in outputs.items() if k.startswith("dvc exp show"))
    assert "best_val_accuracy" in shown and all(n in shown for n in exps), shown
    if any(k.startswith("dvc plots diff") for k in outputs):
        assert (root / "dvc_plots/index.html").exists()

    # promote: the best on validation, one test read, one registered version tagged with the experiment
    assert promoted is not None
    assert promoted == max(exps, key=lambda n: exps[n][2]["best_val_accuracy"])
    assert [e["action"] for e in _ledger(root)] == ["read"]
    report = json.loads((root / "reports/register.json").read_text())
    assert report["status"] == "registered", report
    promo = json.loads((root / "reports/promote.json").read_text())
    assert promo["experiment"] == promoted and promo["candidates_compared"] == expected
