"""The train stage on the digits shards, on the CPU: determinism, resume after SIGKILL, DDP equivalence, bad input."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.core import io
from tasks.core.config import ConfigError, TrainConfig, load_params
from tasks.core.runtime import RuntimeConfigError
from tasks.model.build import ModelConfigError
from tasks.train import loop

REPO = Path(__file__).resolve().parents[2]
FAST = {"model": "resnet10t", "epochs": 2, "batch_size": 32, "warmup_steps": 5, "lr": 0.004, "log_every_steps": 1}


def train_paths(p, root: Path):
    return p.model_copy(update={"models_dir": str(root / "models"), "train_metrics": str(root / "metrics.json"),
                                "train_plots_dir": str(root / "reports"), "checkpoints_dir": str(root / "checkpoints")})


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(digits_pipeline, tmp_path_factory):
    """One uninterrupted 3-epoch run that other tests compare against."""
    p, *_ = digits_pipeline
    root = tmp_path_factory.mktemp("ref")
    cfg = TrainConfig(**{**FAST, "epochs": 3})
    result = loop.run(cfg, train_paths(p, root))
    return cfg, root, result


def test_trains_and_writes_its_outputs(reference):
    _cfg, root, result = reference
    assert result.best_val_accuracy > 0.5  # 3 short epochs on digits; far above chance (0.1)
    m = json.loads((root / "metrics.json").read_text())
    assert m["best_val_accuracy"] == result.best_val_accuracy and m["steps"] == result.steps
    assert m["scaled_lr"] == pytest.approx(0.004 * 32 / 256)  # linear scaling rule to the effective batch
    rows = list(csv.DictReader((root / "reports" / "steps.csv").open()))
    assert {"train_loss", "lr", "grad_norm", "images_per_s", "data_wait_fraction"} <= rows[0].keys()
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < max(lrs)  # warmup
    assert lrs[-1] == pytest.approx(0.1 * 0.004 * 32 / 256, rel=0.05)  # cosine to the 10% floor
    epochs = list(csv.DictReader((root / "reports" / "epochs.csv").open()))
    assert len(epochs) == 3
    best = torch.load(root / "models" / "best.pt", map_location="cpu", weights_only=True)
    assert best["val_accuracy"] == max(float(e["val_accuracy"]) for e in epochs)
    assert best["index"]["classes"] == [str(i) for i in range(10)]
    assert (root / "reports" / "curves.png").stat().st_size > 10_000
    params = json.loads((root / "reports" / "events.jsonl").read_text().splitlines()[0])["params"]
    for key in ("git_sha", "environment_hash", "shard_index_sha256", "split_manifest_sha256", "scaled_lr"):
        assert params[key] is not None, key


def test_host_syncs_are_per_log_window_not_per_step(digits_pipeline, tmp_path, monkeypatch):
    """Reading a device scalar on the host (item, float, int, bool, tolist) waits for the GPU. keel's code reads
    the step scalars back once per log_every_steps window (and at epoch end), never several times per step.
    (Counted where keel's own code is the caller: torch's optimisers read their CPU step counters, no sync.)"""
    p, *_ = digits_pipeline
    calls = {"n": 0}
    tasks_dir = str(REPO / "tasks")
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            calls["n"] += sys._getframe(1).f_code.co_filename.startswith(tasks_dir)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = TrainConfig(**{**FAST, "epochs": 2, "log_every_steps": 10})
    result = loop.run(cfg, train_paths(p, tmp_path))
    monkeypatch.undo()
    windows = result.steps // 10 + result.epochs_run  # log windows plus one read-back at each epoch end
    assert result.steps >= 60
    # two reads per read-back (the window's values, the stop flag), validation once per epoch, and a few at set-up
    assert calls["n"] <= 2 * windows + 2 * result.epochs_run + 6, (calls["n"], result.steps)


def test_same_seed_gives_bitwise_identical_weights(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    loop.run(cfg, train_paths(p, tmp_path / "a"))
    loop.run(cfg, train_paths(p, tmp_path / "b"))
    loop.run(TrainConfig(**{**FAST, "epochs": 1, "seed": 1}), train_paths(p, tmp_path / "c"))
    a, b, c = (weights(tmp_path / x / "models" / "last.pt") for x in "abc")
    assert same(a, b)
    assert not same(a, c)  # the seed matters: the test can fail


def test_a_finished_training_is_published_and_the_next_run_trains_anew(digits_pipeline, tmp_path):
    """`dvc repro -f train` (issue 16): a finished training leaves nothing to resume, so the next run of the same
    config trains from step 0 (full steps.csv) to the same bits; only an interrupted run resumes."""
    p, *_ = digits_pipeline
    cfg = TrainConfig(**{**FAST, "epochs": 1, "max_steps": 6})
    paths = train_paths(p, tmp_path)
    first = loop.run(cfg, paths)
    ckpts, models = tmp_path / "checkpoints", tmp_path / "models"
    assert sorted(f.name for f in models.iterdir()) == ["best.pt", "last.pt"]
    assert not list(ckpts.glob("*.pt")), list(ckpts.iterdir())  # the in-flight copies are gone
    w1, rows1 = weights(models / "last.pt"), _step_rows(tmp_path)
    assert first.resumed_from_step == 0 and [r[0] for r in rows1] == [str(i) for i in range(1, 7)]
    (ckpts / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what a SIGKILL mid-write leaves
    second = loop.run(cfg, paths)
    assert second.resumed_from_step == 0 and second.steps == 6  # trained anew, not "resumed at step 6"
    assert _step_rows(tmp_path) == rows1 and same(weights(models / "last.pt"), w1)
    assert not (ckpts / ".last.pt.k1ll3d.tmp").exists()


def _params_file(p, root: Path, train: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"].update({k: str(v) for k, v in train_paths(p, root).model_dump().items()})
    params["train"] = {**params["train"], **train}
    f = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    f.write_text(yaml.safe_dump(params))
    return f


def _env():
    return {**os.environ, "KEEL_TRACKING": "off", "PYTHONPATH": str(REPO)}


def test_resume_after_sigkill_matches_an_uninterrupted_run(reference, digits_pipeline, tmp_path):
    _cfg, ref_root, _ = reference
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, {**FAST, "epochs": 3})
    cmd = [sys.executable, "-m", "tasks.cli", "train", "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = tmp_path / "models" / "last.pt"
    first = tmp_path / "checkpoints" / "last.pt"  # the training in flight checkpoints here
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "resuming at step" in r.stderr
    assert same(weights(last), weights(ref_root / "models" / "last.pt"))
    assert same(weights(tmp_path / "models" / "best.pt"), weights(ref_root / "models" / "best.pt"))
    assert _step_rows(tmp_path) == _step_rows(ref_root)  # steps.csv has the steps before the resume too


def _step_rows(root: Path) -> list[tuple[str, ...]]:
    """steps.csv without its timing columns (images_per_s, data_wait_fraction: this process's wall clock)."""
    return [(r["step"], r["train_loss"], r["lr"], r["grad_norm"])
            for r in csv.DictReader((root / "reports" / "steps.csv").open())]


def _epoch_losses(root: Path) -> list[tuple[str, str]]:
    return [(r["epoch"], r["train_loss"]) for r in csv.DictReader((root / "reports" / "epochs.csv").open())]


def _torchrun(params: Path, nproc: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "tasks.cli", "train", "--params", str(params)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, check=False, timeout=600)


def _one_vs_two_processes(one: Path, two: Path, root: Path) -> dict[str, list[float]]:
    """Train ``one`` on 1 process and ``two`` on 2; the per-step train loss of each."""
    for f, n in ((one, 1), (two, 2)):
        r = _torchrun(f, n)
        assert r.returncode == 0, r.stdout + r.stderr
    return {k: [float(row["train_loss"]) for row in csv.DictReader((root / k / "reports/steps.csv").open())]
            for k in ("one", "two")}


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(digits_pipeline, tmp_path):
    # convnext_atto uses LayerNorm: no batch statistics, so 2 x 16 and 1 x 32 are the same computation
    # (BatchNorm models get SyncBatchNorm on CUDA; gloo on CPU has no SyncBatchNorm)
    p, *_ = digits_pipeline
    common = {**FAST, "model": "convnext_atto", "epochs": 1, "max_steps": 12, "log_every_steps": 1,
              "deterministic": True}
    one = _params_file(p, tmp_path / "one", {**common, "batch_size": 32, "devices": 1})
    two = _params_file(p, tmp_path / "two", {**common, "batch_size": 16, "devices": 2})
    trace = _one_vs_two_processes(one, two, tmp_path)
    assert len(trace["one"]) == len(trace["two"]) == 12
    assert trace["one"] == pytest.approx(trace["two"], rel=1e-4, abs=1e-5)
    assert trace["one"][0] != pytest.approx(trace["one"][-1], rel=1e-3)  # the loss moved: the test can fail
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["effective_batch"] == 32


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_writes_plain_checkpoints(digits_pipeline, tmp_path):
    """FSDP2 (fully_shard over gloo) shards parameters and optimiser state, yet trains the same trajectory as one
    process with the same global batch, and its checkpoints are ordinary full state dicts that resume."""
    p, *_ = digits_pipeline
    # augment none: flip/crop parameters are drawn per global batch, and accumulation splits the batch in two
    common = {**FAST, "model": "convnext_atto", "epochs": 1, "max_steps": 8, "log_every_steps": 1, "augment": "none"}
    one = _params_file(p, tmp_path / "one", {**common, "batch_size": 32, "devices": 1})
    two = _params_file(p, tmp_path / "two", {**common, "batch_size": 8, "devices": 2, "strategy": "fsdp",
                                              "effective_batch": 32})  # + accumulation x2 (no-sync micro-steps)
    trace = _one_vs_two_processes(one, two, tmp_path)
    assert len(trace["two"]) == 8 and trace["two"] == pytest.approx(trace["one"], rel=1e-4, abs=1e-5)
    best = torch.load(tmp_path / "two/models/best.pt", map_location="cpu", weights_only=True)
    assert all(type(t) is torch.Tensor for t in best["model"].values())  # gathered, not DTensor shards
    ref = weights(tmp_path / "one/models/best.pt")  # the 1-process weights, up to float summation order
    assert best["model"].keys() == ref.keys()
    assert all(torch.allclose(best["model"][k], ref[k], rtol=1e-3, atol=1e-5) for k in ref)
    # the full state goes back into shards: a kill after the last checkpoint, before models/ was published
    (tmp_path / "two/checkpoints").mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "two/models/last.pt", tmp_path / "two/checkpoints/last.pt")
    r = _torchrun(two, 2)
    assert r.returncode == 0 and "resuming at step 8" in r.stderr, r.stderr  # full state loaded back into shards
    with pytest.raises(ConfigError, match=r"strategy=fsdp does not support ema_decay"):
        f = tmp_path / "bad.yaml"
        f.write_text("train:\n  strategy: fsdp\n  ema_decay: 0.999\n")
        load_params(f)


def test_never_opens_the_test_split(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    shards = tmp_path / "shards"
    shutil.copytree(p.shards_dir, shards)
    for f in io.ShardIndex.load(shards).splits["test"]:
        (shards / f.file).write_bytes(b"not parquet")  # any read of the test split would fail
    q = train_paths(p, tmp_path).model_copy(update={"shards_dir": str(shards)})
    assert loop.run(TrainConfig(**{**FAST, "epochs": 1, "max_steps": 3}), q).steps == 3


def test_bad_params_fail_before_any_work(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    q = train_paths(p, tmp_path)
    with pytest.raises(ModelConfigError, match=r"train.model: unknown timm model 'resnet1000'"):
        loop.run(TrainConfig(**{**FAST, "model": "resnet1000"}), q)
    with pytest.raises(loop.TrainError, match=r"train.batch_size=4096 .* larger than the train split \(\d+ items\)"):
        loop.run(TrainConfig(**{**FAST, "batch_size": 4096}), q)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeConfigError, match="train.device=cuda but no CUDA device"):
            loop.run(TrainConfig(**{**FAST, "device": "cuda"}), q)
    with pytest.raises(loop.TrainError, match=r"train.devices=2 but the launcher started 1 process"):
        loop.run(TrainConfig(**{**FAST, "devices": 2}), q)
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batch_size: 24\n  effective_batch: 100\n")
    with pytest.raises(ConfigError, match=r"train: .*effective_batch=100 is not a multiple of batch_size x devices = 24"):
        load_params(f)
    assert not (tmp_path / "models").exists()


def test_gradient_accumulation_reaches_the_effective_batch(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    loop.run(TrainConfig(**{**FAST, "epochs": 1, "batch_size": 16, "effective_batch": 64}), train_paths(p, tmp_path))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["effective_batch"] == 64 and m["scaled_lr"] == pytest.approx(0.004 * 64 / 256)
    assert m["steps"] == len(io.ShardReader(p.shards_dir, "train")) // 64


def test_non_finite_loss_halts_with_a_clear_message(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    cfg = TrainConfig(**{**FAST, "lr": 1e12, "grad_clip": None, "warmup_steps": 0, "optimizer": "sgd"})
    with pytest.raises(loop.TrainError, match=r"non-finite loss .* at step \d+, epoch \d+; the last good checkpoint"):
        loop.run(cfg, train_paths(p, tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["halted"].startswith("non-finite loss")


def test_mixup_cutmix_run_and_stay_deterministic(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    cfg = TrainConfig(**{**FAST, "epochs": 1, "max_steps": 8, "mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1})
    loop.run(cfg, train_paths(p, tmp_path / "a"))
    loop.run(cfg, train_paths(p, tmp_path / "b"))
    assert same(weights(tmp_path / "a/models/last.pt"), weights(tmp_path / "b/models/last.pt"))
    with pytest.raises(loop.TrainError, match="must be even for Mixup"):
        loop.run(TrainConfig(**{**FAST, "batch_size": 31, "mixup": 0.2}), train_paths(p, tmp_path / "c"))


def test_sigterm_checkpoints_mid_epoch_and_resume_matches(reference, digits_pipeline, tmp_path):
    _cfg, ref_root, _ = reference
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, {**FAST, "epochs": 3})
    cmd = [sys.executable, "-m", "tasks.cli", "train", "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "reports" / "events.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait for a few logged steps, then SIGTERM
        if events.exists() and events.read_text().count('"kind": "metrics"') >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not (tmp_path / "models" / "last.pt").exists()  # models/ holds finished trainings only
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["state"]["next_batch"] > 0 and ck["state"]["epoch"] == 0  # a mid-epoch checkpoint
    # the interrupted epoch's running train-loss sums, so its mean after the resume is the uninterrupted one's
    assert ck["state"]["epoch_micro_batches"] == ck["state"]["next_batch"] and ck["state"]["epoch_loss_sum"] > 0
    stopped = ck["state"]["step"]
    assert _step_rows(tmp_path) == [r for r in _step_rows(ref_root) if int(r[0]) <= stopped]  # written with last.pt
    steps_csv = tmp_path / "reports" / "steps.csv"
    with steps_csv.open("a") as f:  # a row logged after last.pt and lost with the stop: the resume drops it
        f.write(f"{stopped + 1},9.0,0.1,1.0,1.0,0.0\n")
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "resuming at step" in r.stderr, r.stderr
    assert same(weights(tmp_path / "models" / "last.pt"), weights(ref_root / "models" / "last.pt"))
    assert _step_rows(tmp_path) == _step_rows(ref_root)
    assert _epoch_losses(tmp_path) == _epoch_losses(ref_root)  # epoch 0's mean covers the batches before the stop
    signals = {k: torch.load(root / "models" / "last.pt", map_location="cpu", weights_only=True)["signals"]
               for k, root in (("resumed", tmp_path), ("ref", ref_root))}
    assert signals["resumed"] == signals["ref"]  # the monitor's epoch history holds the same train losses


def test_a_resume_without_a_readable_steps_csv_starts_it_fresh_and_says_so(tmp_path, capsys):
    from types import SimpleNamespace

    from tasks.train.callbacks.step_log import StepLog
    from tasks.train.state import TrainState

    t = SimpleNamespace(state=TrainState(step=4, resumed_from=4), dist=SimpleNamespace(master=True),
                        paths=SimpleNamespace(train_plots_dir=str(tmp_path)))
    cb = StepLog(log_every=1)
    cb.on_fit_start(t)
    assert cb.rows == [] and "no " in capsys.readouterr().err
    (tmp_path / "steps.csv").write_text("step,train_loss,lr\n1,2.0\n")  # a truncated file
    cb.on_fit_start(t)
    assert cb.rows == [] and "unreadable" in capsys.readouterr().err
    (tmp_path / "steps.csv").write_text("step,train_loss,lr,grad_norm\n3,2.5,0.1,\n4,2.0,0.1,1.5\n5,1.0,0.1,1.0\n")
    cb.on_fit_start(t)
    assert cb.rows == [{"step": 3, "train_loss": 2.5, "lr": 0.1}, {"step": 4, "train_loss": 2.0, "lr": 0.1,
                                                                   "grad_norm": 1.5}]


def test_a_last_pt_state_without_the_epoch_sums_still_loads():
    from tasks.train.state import TrainState

    s = TrainState()
    s.load_state_dict({"step": 7, "epoch": 0, "next_batch": 7, "history": []})  # written before they were saved
    assert (s.step, s.epoch_loss_sum, s.epoch_micro_batches) == (7, 0.0, 0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_rendezvous_on_loopback(digits_pipeline, tmp_path):
    """Two torchrun launches (--nnodes=2, c10d rendezvous on 127.0.0.1) train as one job of world size 2."""
    p, *_ = digits_pipeline
    common = {**FAST, "model": "convnext_atto", "epochs": 1, "max_steps": 6, "log_every_steps": 1}
    one = _params_file(p, tmp_path / "one", {**common, "batch_size": 32, "devices": 1})
    two = _params_file(p, tmp_path / "two", {**common, "batch_size": 16, "devices": 1})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "-m", "tasks.cli", "train", "--params", str(one)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=keel-test",
              "-m", "tasks.cli", "train", "--params", str(two)]
    nodes = [subprocess.Popen(launch, cwd=REPO, env={**_env(), "GLOO_SOCKET_IFNAME": "lo"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [n.communicate(timeout=600)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outs)
    trace = {k: [float(row["train_loss"]) for row in csv.DictReader((tmp_path / k / "reports/steps.csv").open())]
             for k in ("one", "two")}
    assert trace["two"] == pytest.approx(trace["one"], rel=1e-4, abs=1e-5)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["effective_batch"] == 32


def _five_class_source_checkpoint(p, path: Path) -> dict:
    """A locally produced 'pretrained' checkpoint: resnet10t trained briefly on digits 0-4 only (5 classes)."""
    from tasks.model.build import build_model
    from tasks.model.views import Normalize
    from tasks.train.data import DeviceSplit

    torch.manual_seed(0)
    model, _ = build_model(TrainConfig(model="resnet10t"), 5, 3, 32)
    split = DeviceSplit(p.shards_dir, "train", torch.device("cpu"))
    index = io.ShardIndex.load(p.shards_dir)
    keep = split.y < 5
    x, y = Normalize(index.mean, index.std)(split.x[keep][:256]), split.y[keep][:256]
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": model.state_dict()}, path)
    return {k: v.clone() for k, v in model.named_parameters()}


def test_transfer_from_a_local_checkpoint_in_two_phases(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    src = _five_class_source_checkpoint(p, tmp_path / "source.pt")
    base = {**FAST, "pretrained": "checkpoint", "init_checkpoint": str(tmp_path / "source.pt"),
            "freeze_backbone_epochs": 1, "unfreeze_top_blocks": 1, "backbone_lr_factor": 0.1, "max_steps": None}
    # phase 1 only: the backbone is frozen, the new 10-class head trains
    loop.run(TrainConfig(**{**base, "epochs": 1}), train_paths(p, tmp_path / "p1"))
    after = weights(tmp_path / "p1/models/last.pt")
    params = json.loads((tmp_path / "p1/reports/events.jsonl").read_text().splitlines()[0])["params"]
    assert params["init"]["loaded_tensors"] > 50
    assert "fc.weight" in params["init"]["skipped_tensors"]  # 5-class head not loaded into the 10-class model
    assert params["backbone_lr"] == pytest.approx(0.1 * params["scaled_lr"])
    backbone = [k for k in src if not k.startswith("fc.")]
    assert all(torch.equal(after[k], src[k]) for k in backbone)
    assert after["fc.weight"].shape == (10, 512)
    # both phases: phase 2 unfreezes only the top block group, at the lower backbone LR
    loop.run(TrainConfig(**{**base, "epochs": 2}), train_paths(p, tmp_path / "p2"))
    both = weights(tmp_path / "p2/models/last.pt")
    events = (tmp_path / "p2/reports/events.jsonl").read_text()
    assert '"name": "phase_2"' in events
    assert torch.equal(both["conv1.0.weight"], src["conv1.0.weight"])  # the stem stays frozen
    assert not torch.equal(both["layer4.0.conv2.weight"], src["layer4.0.conv2.weight"])  # the top block trained


def test_corrupt_train_shard_fails_with_its_path(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    shards = tmp_path / "shards"
    shutil.copytree(p.shards_dir, shards)
    f = shards / io.ShardIndex.load(shards).splits["train"][0].file
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    q = train_paths(p, tmp_path).model_copy(update={"shards_dir": str(shards)})
    with pytest.raises(io.DataError, match=r"train/shard-00000.parquet: checksum mismatch \(index [0-9a-f]{12}…"):
        loop.run(TrainConfig(**FAST), q)


def test_bf16_channels_last_and_ema_paths_run_on_cpu(digits_pipeline, tmp_path):
    # the GPU recipe's code paths (autocast bf16, channels_last, EMA, grad checkpointing), exercised on the CPU
    p, *_ = digits_pipeline
    cfg = TrainConfig(**{**FAST, "epochs": 1, "max_steps": 4, "precision": "bf16", "channels_last": True,
                         "ema_decay": 0.9, "grad_checkpointing": True})
    r = loop.run(cfg, train_paths(p, tmp_path))
    assert r.steps == 4
    params = json.loads((tmp_path / "reports/events.jsonl").read_text().splitlines()[0])["params"]
    assert params["precision"] == "bf16"
    with pytest.raises(RuntimeConfigError, match="fp16 needs a CUDA device"):
        loop.run(TrainConfig(**{**FAST, "precision": "fp16", "device": "cpu"}), train_paths(p, tmp_path / "x"))


@pytest.fixture(scope="module")
def many_shards(digits_pipeline, tmp_path_factory):
    """The digits splits cut into 200-row shards (8 train shards), for the streaming loader."""
    from tasks import shard
    from tasks.core.config import ShardConfig

    p, *_ = digits_pipeline
    q = p.model_copy(update={"shards_dir": str(tmp_path_factory.mktemp("many") / "shards")})
    shard.run(ShardConfig(shard_rows=200, row_group_rows=100, workers=1), q)
    return q


def test_stream_epoch_covers_the_split_without_repeats(many_shards):
    from tasks.train.data import StreamSplit

    s = StreamSplit(many_shards.shards_dir, "train", torch.device("cpu"), workers=2)
    assert len(s.files) >= 7

    def epoch_labels(seed, epoch):
        return [b[1] for b in s.epoch(64, seed, epoch)]

    batches = epoch_labels(0, 0)
    assert len(batches) >= s.batches_per_epoch(64)
    seen = torch.cat([torch.cat([x.flatten(1) for x, _ in s.epoch(64, 0, 0)])])
    assert len(torch.unique(seen, dim=0)) == len(seen)  # no image twice in an epoch
    assert len(seen) >= s.n - 2 * 64  # at most one partial batch dropped per worker
    again = epoch_labels(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # deterministic for (seed, epoch, workers)
    other = epoch_labels(0, 1)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))  # reshuffled every epoch


def test_stream_mode_trains_deterministically(many_shards, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 1, "data": "stream", "loader_workers": 2, "max_steps": 20})
    ra = loop.run(cfg, train_paths(many_shards, tmp_path / "a"))
    loop.run(cfg, train_paths(many_shards, tmp_path / "b"))
    assert ra.steps == 20
    assert same(weights(tmp_path / "a/models/last.pt"), weights(tmp_path / "b/models/last.pt"))
    params = json.loads((tmp_path / "a/reports/events.jsonl").read_text().splitlines()[0])["params"]
    assert params["data_mode"] == "stream"


def test_probe_batch_on_cpu_keeps_the_configured_batch(digits_pipeline, tmp_path, capfd):
    p, *_ = digits_pipeline
    r = loop.run(TrainConfig(**{**FAST, "epochs": 1, "max_steps": 2, "probe_batch": True}), train_paths(p, tmp_path))
    assert r.steps == 2 and "probe_batch needs a CUDA device" in capfd.readouterr().err


# ---------------------------------------------------------------- the CIFAR recipe's ingredients (airbench's)
AIRBENCH = {**FAST, "model": "keel_cifar_net_s", "optimizer": "sgd", "lr": 0.4, "momentum": 0.85, "epochs": 2,
            "grad_clip": None, "label_smoothing": 0.2, "stem_init": "whiten", "norm_bias_lr_factor": 64.0,
            "crop_pad": 2, "tta": "flip_translate"}


def test_whitened_stem_bias_lr_and_test_time_views_agree_across_train_evaluate_and_serving(digits_pipeline, tmp_path):
    import pyarrow.parquet as pq
    import timm

    from tasks import evaluate
    from tasks.core.config import EvaluateConfig
    from tasks.model import views
    from tasks.model.build import WHITEN_IMAGES
    from tasks.serving import ImageClassifier
    from tasks.train import data as tdata

    p, *_ = digits_pipeline
    q = train_paths(p, tmp_path).model_copy(update={
        "test_ledger": str(tmp_path / "ledger"), "evaluate_dir": str(tmp_path / "evaluate"),
        "test_metrics": str(tmp_path / "test.json")})
    r = loop.run(TrainConfig(**AIRBENCH), q)
    assert r.best_val_accuracy > 0.5

    # the stem holds the whitening of the first train images' 2x2 patches, and it stayed frozen through training
    index = io.ShardIndex.load(p.shards_dir)
    ref = timm.create_model("keel_cifar_net_s", num_classes=len(index.classes))
    first = tdata.first_images(p.shards_dir, "train", WHITEN_IMAGES, torch.device("cpu"))
    assert len(first) == min(WHITEN_IMAGES, index.rows("train"))
    report = ref.whiten_stem(views.Normalize(index.mean, index.std)(first))
    best = torch.load(tmp_path / "models/best.pt", map_location="cpu", weights_only=True)
    assert torch.allclose(best["model"]["stem.0.weight"], ref.stem[0].weight, atol=1e-6)
    assert best["model"]["stem.0.bias"].abs().sum() > 0  # the stem's bias trains
    params = json.loads((tmp_path / "reports/events.jsonl").read_text().splitlines()[0])["params"]
    assert params["init"]["stem_init"] == "whiten" and params["init"]["whiten_images"] == report["whiten_images"]

    # BatchNorm shifts get 64x the learning rate of the other no-decay parameters
    groups = {g["name"]: g for g in torch.load(tmp_path / "models/last.pt", map_location="cpu",
                                               weights_only=True)["optimizer"]["param_groups"]}
    assert groups["backbone_no_decay_norm_bias"]["initial_lr"] == pytest.approx(
        64 * groups["backbone_no_decay"]["initial_lr"])
    n_norms = sum(1 for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert n_norms > 0 and len(groups["backbone_no_decay_norm_bias"]["params"]) == n_norms  # every BN shift, only they

    # validation selected on the test-time views and also reports the single view
    epochs = list(csv.DictReader((tmp_path / "reports/epochs.csv").open()))
    assert len(epochs) == 2 and all(0 <= float(e["val_accuracy_single_view"]) <= 1 for e in epochs)

    # evaluate scores with the same views as the served model: identical probabilities for the same pixels
    res = evaluate.run(EvaluateConfig(batch_size=64), q)
    assert json.loads((tmp_path / "test.json").read_text())["test_accuracy"] == pytest.approx(res.accuracy)
    pred = pq.read_table(tmp_path / "evaluate/predictions.parquet").to_pydict()
    x, _, ids = io.ShardReader(p.shards_dir, "test", reader_of=io.TEST_READER).read_all()
    assert ids == pred["id"]
    clf = ImageClassifier.from_checkpoint(best, device="cpu")
    assert clf.tta == "flip_translate"
    served = clf.probabilities(x[:64])
    assert np.allclose(served, np.array(pred["probs"][:64]), atol=1e-5)
    with torch.no_grad():  # and the views change the answer (so the agreement above is not one forward pass twice)
        single = torch.softmax(clf.model(clf.norm(torch.from_numpy(x[:64]).permute(0, 3, 1, 2))), 1).numpy()
    assert not np.allclose(served, single, atol=1e-4)


def test_recipe_ingredients_refuse_what_they_cannot_do(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    q = train_paths(p, tmp_path)
    with pytest.raises(ModelConfigError, match=r"train.stem_init: whiten needs a model with a whitening stem .*"
                                               r"resnet10t has none: set train.stem_init: default"):
        loop.run(TrainConfig(**{**FAST, "stem_init": "whiten"}), q)
    res = io.ShardIndex.load(p.shards_dir).resolution
    with pytest.raises(loop.TrainError, match=rf"train.crop_pad={res} must be smaller than the images' {res} px"):
        loop.run(TrainConfig(**{**FAST, "crop_pad": res}), q)
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stem_init: whiten\n  pretrained: timm\n")
    with pytest.raises(ConfigError, match=r"train: .*stem_init=whiten would overwrite the pretrained=timm stem"):
        load_params(f)
    f.write_text("train:\n  tta: mirror\n")
    with pytest.raises(ConfigError, match=r"train.tta.*'none', 'flip' or 'flip_translate'"):
        load_params(f)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("crop_pad", [1, 2])
def test_crop_pad_bounds_the_random_translation(digits_pipeline, crop_pad):
    import torch.nn.functional as F

    from tasks.train import data as tdata

    p, *_ = digits_pipeline
    split = tdata.DeviceSplit(p.shards_dir, "train", torch.device("cpu"))
    _, x, y = next(tdata.iterate_epoch(split, 64, 1, 0, seed=0, epoch=0, augment="flip_crop", crop_pad=crop_pad))
    idx = tdata.global_batches(split.n, 64, 0, 0)[0]
    src = F.pad(split.x[idx].float(), (crop_pad,) * 4, mode="reflect")
    h = split.x.shape[-1]
    seen = set()
    for k in range(len(idx)):  # every output is one shift within +/-crop_pad (maybe mirrored) of its source
        found = [(dy, dx) for dy in range(2 * crop_pad + 1) for dx in range(2 * crop_pad + 1)
                 for v in (src[k, :, dy:dy + h, dx:dx + h],) if torch.equal(x[k], v) or torch.equal(x[k], v.flip(-1))]
        assert found, f"image {k} is not a crop within {crop_pad} px"
        seen.update(found)
    assert max(max(abs(dy - crop_pad), abs(dx - crop_pad)) for dy, dx in seen) == crop_pad  # the full range is used
    assert torch.equal(y, split.y[idx])
