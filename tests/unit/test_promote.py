"""keel promote's registry tags go through the register stage's retrying Registry: set on a real MLflow store, and a
server that does not answer is a PromoteError that says the version is registered and how to finish."""
from __future__ import annotations

import pytest

from tasks.core.config import Params, RegisterConfig
from tasks.discipline import promote
from tests.support.mlflow_server import free_port


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")


def test_tags_land_on_the_registered_version(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("digits")
    (tmp_path / "model").mkdir()
    v1 = client.create_model_version("digits", str(tmp_path / "model"))
    v2 = client.create_model_version("digits", str(tmp_path / "model"))
    tags = {"keel.experiment": "lr-2 (abc1234567)", "keel.candidates_compared": "3"}
    promote._tag({"tracking_uri": uri, "model_name": "digits", "version": int(v2.version)}, tags, Params())
    assert client.get_model_version("digits", v2.version).tags == tags
    assert client.get_model_version("digits", v1.version).tags == {}  # only the promoted version


def test_an_unreachable_server_names_what_is_done_and_how_to_finish(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    report = {"tracking_uri": uri, "model_name": "digits", "version": 3}
    with pytest.raises(promote.PromoteError) as err:
        promote._tag(report, {"keel.experiment": "lr-2"},
                     Params(register=RegisterConfig(retries=1, retry_backoff_s=0.05)))
    msg = str(err.value)
    assert msg.startswith("digits v3 is evaluated (one test read) and registered, but its promotion tags are not "
                          "set: MLflow tracking server http://127.0.0.1:")
    assert "tagging digits v3 keel.experiment failed 2 time(s) (register.retries=1" in msg
    assert msg.endswith("Run the same `keel promote` again once the server answers: every stage is cached, so "
                        "the test split is not read again.")
