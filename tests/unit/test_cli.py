"""keel's error contract: a UserError prints `keel <stage>: error: ...` and exits 1; anything else is a bug and
keeps its traceback. Every stage has exactly one runner."""
from __future__ import annotations

import pytest

from tasks import cli
from tasks.core.errors import ConfigError, DataError, UserError


def test_every_stage_has_one_runner_and_help():
    assert cli.RUNNERS.keys() == cli.STAGES.keys()
    assert all(r.module.startswith("tasks.") for r in cli.RUNNERS.values())


@pytest.mark.parametrize("exc", [UserError("bad thing at row 3"), DataError("bad thing at row 3"),
                                 ConfigError("bad thing at row 3")])
def test_a_user_error_is_one_line_without_traceback(monkeypatch, capsys, exc):
    def boom(m, p, a):
        raise exc

    monkeypatch.setitem(cli.RUNNERS, "split", cli.Runner("tasks.split", boom))
    assert cli.main(["split"]) == 1
    err = capsys.readouterr().err
    assert err == "keel split: error: bad thing at row 3\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(m, p, a):
        raise KeyError("not a user's fault")

    monkeypatch.setitem(cli.RUNNERS, "split", cli.Runner("tasks.split", bug))
    with pytest.raises(KeyError, match="not a user's fault"):
        cli.main(["split"])


def test_a_bad_params_file_names_it(tmp_path, capsys):
    f = tmp_path / "params.yaml"
    f.write_text("nonsense: 1\n")
    assert cli.main(["split", "--params", str(f)]) == 1
    assert f"keel split: error: {f}: unknown top-level key(s) ['nonsense']" in capsys.readouterr().err


def test_every_stage_error_type_is_a_user_error():
    from tasks.core.io import DataError as IoDataError
    from tasks.ingest.sources import SourceError
    from tasks.model.build import ModelConfigError
    from tasks.split import FrozenSplitError, LeakageError

    for t in (IoDataError, SourceError, ModelConfigError, LeakageError, FrozenSplitError):
        assert issubclass(t, UserError), t
