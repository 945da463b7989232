"""The shared helpers in tasks/core: text (one formatter, one table, one PNG writer), retry (one transient
classifier) and runtime (device/precision errors name the key)."""
from __future__ import annotations

import pytest

from tasks.core import retry, runtime, text


def test_fmt_cells():
    assert [text.fmt(v) for v in (None, True, 0.5, 3, [1, 2])] == ["-", "true", "0.5000", "3", "[2 points]"]
    assert text.fmt(0.000123, ".3g") == "0.000123"


def test_table_aligns_columns_and_leaves_the_last_ragged():
    lines = text.table([("a", "bb", "what to do"), ("ccc", "1", "x")], indent="", align="<>")
    assert lines == ["a    bb  what to do", "ccc   1  x"]


def test_save_png_is_atomic_and_reproducible(tmp_path):
    plt = text.pyplot()
    out = []
    for name in ("a.png", "b.png"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        text.save_png(tmp_path / name, fig)
        out.append((tmp_path / name).read_bytes())
    assert out[0][:8] == b"\x89PNG\r\n\x1a\n" and out[0] == out[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary left behind


@pytest.mark.parametrize("msg", ["Connection refused", "API request failed with error code 503", "SlowDown",
                                 "database is locked", "Read timed out", "status 429"])
def test_transient_messages(msg):
    assert retry.transient_text(msg)


@pytest.mark.parametrize("msg", ["KeyError: 'model'", "RESOURCE_DOES_NOT_EXIST: model 'x' not found",
                                 "keel train: error: train.lr must be > 0"])
def test_errors_that_are_not_transient(msg):
    assert not retry.transient_text(msg)


def test_transient_exception_follows_the_cause_chain():
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert retry.transient_exception(outer)
    assert not retry.transient_exception(ValueError("bad value"))


def test_runtime_errors_name_the_key():
    import torch

    with pytest.raises(runtime.RuntimeConfigError, match="evaluate.precision=fp16 needs a CUDA device"):
        runtime.precision("fp16", torch.device("cpu"), "evaluate.precision")
    if not torch.cuda.is_available():
        with pytest.raises(runtime.RuntimeConfigError, match="train.device=cuda but no CUDA device"):
            runtime.device("cuda", "train.device")
    assert runtime.precision("auto", torch.device("cpu")) == "fp32"


class _Boom:  # a pickled object whose unpickling would run code
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_checkpoint_load_is_always_safe(tmp_path):
    import torch

    from tasks.core import checkpoint

    good = tmp_path / "good.pt"
    checkpoint.save(good, {"model": {"w": torch.ones(2)}, "step": 3})
    assert checkpoint.load(good)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["good.pt"]  # no temporary left behind
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "x": _Boom()}, bad)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"bad.pt: refused to load this checkpoint: .*"
                       r"Unsupported global: GLOBAL print was not an allowed global by default\)\. keel never"):
        checkpoint.load(bad)


def test_transient_cause_reads_types_not_messages():
    assert not retry.transient_cause(RuntimeError("gave up after: Connection refused"))
    try:
        raise RuntimeError("wrapped") from TimeoutError()
    except RuntimeError as e:
        assert retry.transient_cause(e)


def test_checkpoint_bytes_do_not_depend_on_the_temporary_name(tmp_path):
    """Two saves of one blob are the same bytes (dvc.lock's md5 of a retrained model is then reproducible):
    torch must not record the random temporary file name in the archive."""
    import torch

    from tasks.core import checkpoint

    blob = {"model": {"w": torch.arange(6.0)}, "step": 3}
    checkpoint.save(tmp_path / "a" / "best.pt", blob)
    checkpoint.save(tmp_path / "b" / "best.pt", blob)
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
