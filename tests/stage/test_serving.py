"""tasks.serving: the pyfunc built from the real digits checkpoint, saved and loaded through MLflow, against the
network applied to the very shard pixels of the same test items."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.core import io
from tests.conftest import encode

MAX_BYTES = 20_000
MAX_PIXELS = 100_000


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")


@pytest.fixture(scope="module")
def checkpoint(digits_trained):
    import torch

    paths, _ = digits_trained
    return torch.load(Path(paths.models_dir) / "best.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def test_items(digits_trained):
    """(ids, shard pixels, labels, original encoded bytes) of the test split."""
    paths, _ = digits_trained
    x, y, ids = io.ShardReader(paths.shards_dir, "test", reader_of="tasks.evaluate").read_all()
    wanted = set(ids)
    raw = {}
    for batch in io.iter_raw_batches(paths.raw_items, columns=["id", "image"]):
        for i, b in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
            if i in wanted:
                raw[i] = b
    return ids, x, y, [raw[i] for i in ids]


@pytest.fixture(scope="module")
def loaded(checkpoint, test_items, tmp_path_factory):
    """The pyfunc saved with mlflow.pyfunc.save_model into a temp folder and loaded back."""
    import mlflow.pyfunc

    from tasks import serving

    dest = tmp_path_factory.mktemp("pyfunc") / "model"
    serving.save(checkpoint, dest, max_image_bytes=MAX_BYTES, max_pixels=MAX_PIXELS,
                 example_images=test_items[3][:2])
    return dest, mlflow.pyfunc.load_model(str(dest))


def reference_probs(checkpoint: dict, pixels: np.ndarray) -> np.ndarray:
    """The trained network on shard pixels, built independently of tasks.serving."""
    import torch

    from tasks.core.config import TrainConfig
    from tasks.model.build import build_model
    from tasks.model.views import Normalize

    idx = checkpoint["index"]
    model, _ = build_model(TrainConfig(model=checkpoint["model_name"]), len(idx["classes"]), idx["channels"],
                           idx["resolution"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        x = Normalize(idx["mean"], idx["std"])(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        return torch.softmax(model(x), dim=1).numpy()


def test_raw_png_bytes_match_the_model_on_shard_pixels(loaded, checkpoint, test_items):
    _, model = loaded
    ids, x, y, blobs = test_items
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": blobs}))
    ref = reference_probs(checkpoint, x)
    classes = checkpoint["index"]["classes"]
    assert list(out.columns) == ["label", "label_index", "probability", "probabilities"]
    assert len(out) == len(ids) > 100
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), ref, atol=1e-5)
    assert out["label_index"].tolist() == ref.argmax(1).tolist()
    assert out["label"].tolist() == [classes[i] for i in ref.argmax(1)]
    np.testing.assert_allclose(out["probability"].to_numpy(), ref.max(1), atol=1e-5)
    assert (out["label_index"].to_numpy() == y).mean() > 0.85  # a trained model, not a constant


def test_base64_strings_and_uint8_arrays_give_the_same_answer(loaded, checkpoint, test_items):
    import pandas as pd

    _, model = loaded
    _, x, _, blobs = test_items
    b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in blobs[:5]]}))
    arrays = model.predict(pd.DataFrame({"image": pd.Series(list(x[:5]), dtype=object)}))
    gray = model.predict(pd.DataFrame({"image": pd.Series([a[..., 0] for a in x[:5]], dtype=object)}))
    ref = reference_probs(checkpoint, x[:5])
    for out in (b64, arrays, gray):
        np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), ref, atol=1e-5)


def test_model_metadata_signature_and_packaging(loaded):
    from mlflow.types import DataType

    dest, model = loaded
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"] and sig.inputs.input_types()[0] == DataType.binary
    assert sig.outputs.input_names() == ["label", "label_index", "probability", "probabilities"]
    reqs = (dest / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("timm==") for r in reqs)
    assert (dest / "code" / "tasks" / "core" / "imaging.py").is_file()
    assert not list((dest / "code").rglob("__pycache__"))
    spec = json.loads(next((dest / "artifacts").rglob("preprocessing.json")).read_text())
    assert spec["max_image_bytes"] == MAX_BYTES and spec["max_pixels"] == MAX_PIXELS and len(spec["classes"]) == 10
    example = json.loads((dest / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]


def test_model_is_logged_as_code_with_no_pickle(loaded, test_items, monkeypatch):
    """models-from-code: the model folder holds no pickle at all, and MLflow loads it with pickles forbidden."""
    import mlflow.pyfunc
    import pandas as pd
    import yaml

    dest, model = loaded
    assert not [p for p in dest.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    flavor = yaml.safe_load((dest / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["model_code_path"].endswith("model_code.py")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    strict = mlflow.pyfunc.load_model(str(dest))
    cells = pd.DataFrame({"image": pd.Series(test_items[3][:3], dtype=object)})
    assert strict.predict(cells)["label"].tolist() == model.predict(cells)["label"].tolist()


def _bad(model, cells):
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame({"image": pd.Series(cells, dtype=object)}))
    assert err.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert err.value.get_http_status_code() == 400
    return err.value.message


def test_bad_inputs_are_refused_with_row_and_reason(loaded, test_items):
    _, model = loaded
    good = test_items[3][0]
    assert "row 1: not_an_image" in _bad(model, [good, b"this is not an image at all"])
    assert "row 1: too_many_bytes" in _bad(model, [good, b"\0" * (MAX_BYTES + 1)])
    big = encode(np.zeros((400, 400), np.uint8))  # 160,000 px > MAX_PIXELS, a few hundred bytes
    assert len(big) < MAX_BYTES
    assert "row 0: too_many_pixels" in _bad(model, [big])
    assert "row 0: corrupt_image" in _bad(model, [good[: len(good) // 2]])
    assert "row 1: bad_array" in _bad(model, [good, np.zeros((8, 8, 2), np.uint8)])
    msg = _bad(model, [np.zeros((8, 8), np.float32)])
    assert "row 0: bad_array" in msg and "float32" in msg
    assert "row 0: bad_base64" in _bad(model, ["%%% not base64 %%%"])
    assert "row 2: missing" in _bad(model, [good, good, None])


def test_scoring_server_json_path(loaded, test_items):
    """The scoring server's own request handling (in process): base64 in dataframe_split, and a 400 with the
    reason for a payload that is not an image."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    _, model = loaded
    schema = model.metadata.get_input_schema()
    blobs = test_items[3][:3]
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in blobs]}})
    resp = scoring_server.invocations(body, "application/json", model, schema)
    assert resp.status == 200
    preds = json.loads(resp.response)["predictions"]
    assert len(preds) == 3 and {"label", "label_index", "probability", "probabilities"} <= set(preds[0])
    bad = json.dumps({"dataframe_split": {"columns": ["image"],
                                          "data": [[base64.b64encode(b"not an image").decode()]]}})
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(bad, "application/json", model, schema)
    assert err.value.get_http_status_code() == 400 and "row 0: not_an_image" in err.value.message


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, tasks.serving; heavy = [m for m in ('mlflow', 'torch', 'pandas') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def _predict(model, cells):
    import pandas as pd

    return np.stack(model.predict(pd.DataFrame({"image": pd.Series(cells, dtype=object)}))["probabilities"])


def _with_orientation(pixels: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, fmt, exif=exif.tobytes())


def test_exif_oriented_image_is_served_upright(loaded, test_items):
    """A phone-style file (stored pixels turned, an Orientation tag saying how to turn them back) is answered
    like the upright image it shows, as ingest and shard read it."""
    import io as _io

    from PIL import Image

    _, model = loaded
    upright = [np.asarray(Image.open(_io.BytesIO(b))) for b in test_items[3][:4]]
    rot6 = [_with_orientation(np.ascontiguousarray(np.rot90(u, 1)), 6) for u in upright]
    rot8 = [_with_orientation(np.ascontiguousarray(np.rot90(u, -1)), 8) for u in upright]
    ref = _predict(model, test_items[3][:4])
    np.testing.assert_allclose(_predict(model, rot6), ref, atol=1e-6)
    np.testing.assert_allclose(_predict(model, rot8), ref, atol=1e-6)
    untagged = [encode(np.ascontiguousarray(np.rot90(u, 1))) for u in upright]  # the same pixels, no tag: sideways
    assert not np.allclose(_predict(model, untagged), ref, atol=1e-3)


def test_formats_the_model_was_not_trained_with_are_refused(loaded, test_items):
    import io as _io

    from PIL import Image

    dest, model = loaded
    spec = json.loads(next((dest / "artifacts").rglob("preprocessing.json")).read_text())
    assert spec["allowed_formats"] == ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]  # ingest's default
    px = np.asarray(Image.open(_io.BytesIO(test_items[3][0])))
    for fmt in ("PPM", "ICO", "PCX"):
        msg = _bad(model, [test_items[3][0], encode(px, fmt)])
        assert (f"row 1: format_not_allowed: {fmt} not in allowed_formats (JPEG, PNG, BMP, GIF, WEBP, TIFF): "
                "the formats this model was trained with") in msg
    for fmt in ("JPEG", "BMP", "TIFF"):  # the allowed ones still pass
        assert _predict(model, [encode(px, fmt)]).shape == (1, 10)


def test_recorded_formats_and_the_fallback_for_older_models(checkpoint, loaded, test_items, tmp_path):
    """A model packaged with its training formats serves exactly those; one packaged before formats were
    recorded (no allowed_formats in its spec) falls back to ingest's default list."""
    import io as _io
    import shutil

    import mlflow.pyfunc
    from PIL import Image

    from tasks import serving

    px = np.asarray(Image.open(_io.BytesIO(test_items[3][0])))
    dest = serving.save(checkpoint, tmp_path / "png_ppm", max_image_bytes=MAX_BYTES, max_pixels=MAX_PIXELS,
                        example_images=test_items[3][:1], allowed_formats=["PNG", "PPM"])
    only = mlflow.pyfunc.load_model(str(dest))
    assert _predict(only, [encode(px, "PPM"), test_items[3][0]]).shape == (2, 10)
    assert "row 0: format_not_allowed: JPEG not in allowed_formats (PNG, PPM)" in _bad(only, [encode(px, "JPEG")])

    old = tmp_path / "old"
    shutil.copytree(loaded[0], old)
    spec_file = next((old / "artifacts").rglob("preprocessing.json"))
    spec = json.loads(spec_file.read_text())
    del spec["allowed_formats"]
    spec_file.write_text(json.dumps(spec))
    legacy = mlflow.pyfunc.load_model(str(old))
    assert _predict(legacy, [encode(px, "JPEG")]).shape == (1, 10)
    assert "row 0: format_not_allowed: PPM not in allowed_formats (JPEG, PNG, BMP, GIF, WEBP, TIFF)" in \
        _bad(legacy, [encode(px, "PPM")])


def test_serving_leaves_pillows_process_wide_limit_alone(loaded, test_items):
    """The host process's Image.MAX_IMAGE_PIXELS is its own: serving checks max_pixels locally."""
    from PIL import Image

    _, model = loaded
    before = Image.MAX_IMAGE_PIXELS
    _predict(model, test_items[3][:2])
    assert Image.MAX_IMAGE_PIXELS == before
    big = encode(np.zeros((400, 400), np.uint8))
    assert "row 0: too_many_pixels: 400x400 = 160000 pixels > max_pixels=100000" in _bad(model, [big])
    assert Image.MAX_IMAGE_PIXELS == before


def _photo(side_w: int, side_h: int, seed: int = 0) -> bytes:
    """A smooth, photo-like RGB JPEG (gradients and blobs: what DCT scaling is made for)."""
    import io as _io

    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side_h, 0:side_w] / max(side_w, side_h)
    chans = [np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9)) for _ in range(3)]
    px = ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_served_model_decodes_the_way_its_shards_did(checkpoint):
    """A model trained on ``shard.decode: scaled`` shards decodes a large JPEG at the same reduced DCT scale the
    shard stage did, so it sees the very pixels training saw; a model whose index has no decode (trained before
    it was recorded) decodes every pixel, as its shards did.  An unknown decode in a spec is refused by name."""
    from tasks import shard
    from tasks.serving.model import ImageClassifier

    res = checkpoint["index"]["resolution"]
    photos = [_photo(16 * res, 12 * res, seed) for seed in range(3)]  # 1/4 scale keeps >= 2x the resolution
    for mode in ("scaled", "full"):
        blob = {**checkpoint, "index": {**checkpoint["index"], "decode": mode}}
        if mode == "full":
            del blob["index"]["decode"]  # an older index: full is what it meant
        served = ImageClassifier.from_checkpoint(blob, max_image_bytes=10_000_000, device="cpu")
        assert served.decode == mode
        shard._init({"resolution": res, "channels": int(checkpoint["index"]["channels"]),
                     "resize": checkpoint["index"].get("resize", "center_crop"),
                     "background": [255, 255, 255], "decode": mode})
        from_shard = shard._decode(photos)
        got = np.stack([served.pixels(p, i) for i, p in enumerate(photos)])
        assert np.array_equal(got, from_shard), mode
        if mode == "scaled":
            scaled_px = got
    assert not np.array_equal(scaled_px, got)  # the two decodes differ, so the test above can tell them apart

    bad = {**checkpoint, "index": {**checkpoint["index"], "decode": "fast"}}
    with pytest.raises(ValueError, match=r"serving spec: unknown decode 'fast' \(one of 'scaled', 'full'; "
                                         r"shard.decode of the shards this model was trained on\)"):
        ImageClassifier.from_checkpoint(bad, device="cpu")
