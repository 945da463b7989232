"""Inside a DVC experiment evaluate and register refuse before reading anything; the project's ledger and
tracking store are DVC_ROOT's, not the experiment's temporary copy's (tasks.core.project)."""
from __future__ import annotations

import pytest

from tasks import evaluate, register
from tasks.core.config import EvaluateConfig, Paths, RegisterConfig
from tasks.core.project import at_home, project_home
from tasks.evaluate.errors import EvaluateError
from tasks.register.records import RegisterError


@pytest.mark.parametrize(("stage", "call", "error"), [
    ("evaluate", lambda p: evaluate.run(EvaluateConfig(), p), EvaluateError),
    ("register", lambda p: register.run(RegisterConfig(), p), RegisterError),
])
def test_stage_refuses_inside_an_experiment_before_reading_anything(monkeypatch, tmp_path, stage, call, error):
    monkeypatch.setenv("DVC_EXP_NAME", "lr-0")
    paths = Paths(models_dir=str(tmp_path / "absent"), test_ledger=str(tmp_path / "ledger"),
                  shards_dir=str(tmp_path / "absent"))
    with pytest.raises(error) as e:
        call(paths)
    msg = str(e.value)
    assert msg.startswith(f"{stage} does not run inside a DVC experiment ('lr-0')")
    assert "dvc exp run train -S" in msg and "keel promote lr-0" in msg
    assert not (tmp_path / "ledger").exists()  # nothing was decided or recorded


def test_the_project_is_dvc_root_not_the_working_copy(monkeypatch, tmp_path):
    copy = tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert project_home() == copy.resolve()  # `keel <stage>` by hand: the working directory
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # what DVC sets for an experiment's stages
    assert at_home("data/test_ledger") == (tmp_path / "repo/data/test_ledger").resolve()
    assert at_home("/abs/ledger") == type(copy)("/abs/ledger")
