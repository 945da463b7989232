"""keel sweep's study in the team's Postgres, as on the cluster: a real PostgreSQL server on 127.0.0.1
(tests/support/pgserver.py), ``KEEL_SWEEP_STORAGE`` without a password and the password from ``PGPASSWORD`` (the
cluster's Secret keel-postgres). The sweep's driver opens the study there; a trial's own process (the pruning
callback's path) writes to it with its own environment; a resume on another commit is refused; a wrong password
or a password inside the URL is a clear error naming the storage with the password masked."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.errors import FlowError
from flows.sweep import _open_study
from tasks.core import sweep as rules
from tasks.core.config import Params
from tests.support.pgserver import postgres

REPO = Path(__file__).resolve().parents[2]
SECRET = "pg-test-9f3c1e7a"
LOG = logging.getLogger("test_sweep_storage")


def test_a_study_in_postgres_with_the_password_from_the_environment(tmp_path, monkeypatch):
    import optuna

    with postgres(password=SECRET) as pg:
        url = pg.url("optuna")
        assert SECRET not in url
        monkeypatch.setenv("KEEL_SWEEP_STORAGE", url)
        monkeypatch.setenv("PGPASSWORD", SECRET)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["sweep"]["storage"] = None
        plan = rules.plan(Params.model_validate(raw), raw, tmp_path)
        assert plan.storage == url

        study = _open_study(plan, "abc1234567", False, LOG)
        assert study.user_attrs["commit"] == "abc1234567" and study.user_attrs["objective"] == plan.objective
        trial = study.ask()
        # a trial's process reaches the same study with its own configuration (here: the same PGPASSWORD)
        code = ("import optuna, sys; s = optuna.storages.get_storage(sys.argv[1]); "
                "s.set_trial_user_attr(int(sys.argv[2]), 'pruned_at_epoch', 1)")
        subprocess.run([sys.executable, "-c", code, url, str(trial._trial_id)], check=True,
                       env={**os.environ, "PGPASSWORD": SECRET})
        study.tell(trial, 0.5)
        [t] = optuna.load_study(study_name=plan.study, storage=url).trials
        assert t.value == 0.5 and t.user_attrs["pruned_at_epoch"] == 1

        # resumed by the next driver: the same study; on another commit: refused
        assert _open_study(plan, "abc1234567", False, LOG).trials[0].value == 0.5
        with pytest.raises(FlowError, match=r"was run on commit abc1234567, this is def4567890"):
            _open_study(plan, "def4567890", False, LOG)

        # a wrong password: the storage named, the server's reason, where the password comes from
        monkeypatch.setenv("PGPASSWORD", "wrong-password-1")
        with pytest.raises(FlowError) as e:
            _open_study(plan, "abc1234567", False, LOG)
        msg = str(e.value)
        assert msg.startswith(f"sweep study storage {url}: ") and 'password authentication failed for user "keel"' \
            in msg and "PGPASSWORD" in msg, msg
        assert "wrong-password-1" not in msg
        # a password written into the URL is masked in the message
        monkeypatch.delenv("PGPASSWORD")
        inline = dataclasses.replace(plan, storage=url.replace("keel@", "keel:hunter2-inline@"))
        with pytest.raises(FlowError) as e:
            _open_study(inline, "abc1234567", False, LOG)
        msg = str(e.value)
        assert "hunter2-inline" not in msg and f"keel:***@127.0.0.1:{pg.port}/optuna" in msg, msg
