"""The feature-space audit's pure pieces on tiny arrays (nearest neighbours with the item itself excluded, the
threshold quantile, the de-duplicated accuracy, the record), its tap on every kind of network keel builds (the
plain view under test-time views), the picture, and a bad ``evaluate.feature_dup_quantile``."""
from __future__ import annotations

import io as _bytes_io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.core.config import ConfigError, EvaluateConfig, TrainConfig, load_params
from tasks.evaluate import feature_audit as fa


def test_l2_normalise_keeps_a_zero_row_zero():
    out = fa.l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_nearest_excludes_the_item_itself_but_not_its_exact_duplicate():
    base = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 2.0]])  # rows 2 and 3: the same direction
    d, j = fa.nearest(base, base, exclude_self=True)
    assert j.tolist() == [1, 0, 3, 2]
    assert d[2] == pytest.approx(0, abs=1e-6) and d[3] == pytest.approx(0, abs=1e-6)
    cos01 = 0.9 / np.hypot(0.9, 0.1)
    assert d[0] == pytest.approx(1 - cos01, abs=1e-6) and d[1] == pytest.approx(1 - cos01, abs=1e-6)
    # without exclusion every row finds itself; a query finds its nearest base row, distances in [0, 2]
    assert fa.nearest(base[:3], base[:3])[1].tolist() == [0, 1, 2]
    dq, jq = fa.nearest(base, np.array([[0.8, 0.6], [0.1, 0.9], [-1.0, 0.0]]))
    assert jq[0] == 1 and jq[1] in (2, 3)  # rows 2 and 3 tie: the same direction
    assert dq[0] == pytest.approx(1 - (0.8 * 0.9 + 0.6 * 0.1) / np.hypot(0.9, 0.1), abs=1e-6)
    assert dq[1] == pytest.approx(1 - 0.9 / np.hypot(0.1, 0.9), abs=1e-6)
    assert dq[2] == pytest.approx(1.0, abs=1e-6) and 0 <= dq.min() and dq.max() <= 2  # orthogonal to rows 2, 3
    with pytest.raises(ValueError, match="at least 2 base row"):
        fa.nearest(base[:1], base[:1], exclude_self=True)


def test_threshold_is_the_quantile_of_the_train_vs_train_distances():
    d = np.array([0.4, 0.0, 0.3, 0.1, 0.2])
    assert fa.calibrate(d, 0.25) == pytest.approx(0.1)  # linear interpolation: position 0.25 x 4 = 1
    assert fa.calibrate(d, 0.1) == pytest.approx(0.04)
    for q in (0, 0.5, 1.2):
        with pytest.raises(ValueError, match=r"quantile must be > 0 and < 0.5"):
            fa.calibrate(d, q)
    with pytest.raises(ValueError, match="no train-vs-train distances"):
        fa.calibrate(np.zeros(0), 0.01)


def test_flags_include_the_threshold_and_float_noise_and_dedup_accuracy_drops_exactly_them():
    thr = 0.1
    dist = np.array([0.1 + 5e-7, 0.1 + 1e-3, 0.0, 0.5])
    assert fa.flagged_mask(dist, thr).tolist() == [True, False, True, False]
    assert fa.flagged_mask(np.array([6e-8]), 0.0).tolist() == [True]  # an exact copy against a threshold of 0
    correct = np.array([True, False, True, True])
    assert fa.dedup_accuracy(correct, np.array([True, False, True, False])) == pytest.approx(0.5)
    assert fa.dedup_accuracy(correct, np.ones(4, bool)) is None


def summary(**over):
    kw = {"quantile": 0.25, "threshold": 0.1, "train_nn_distance": np.array([0.05, 0.1, 0.2, 0.3, 0.4]),
          "train_ids": ["t0", "t1", "t2"], "train_labels": np.array([0, 1, 1]), "test_ids": ["a", "b", "c", "d"],
          "labels": np.array([0, 1, 1, 0]), "preds": np.array([0, 0, 1, 0]),
          "test_nn_distance": np.array([0.09, 0.01, 0.5, 0.1]), "test_nn_row": np.array([0, 2, 1, 1]),
          "classes": ["zero", "one"], "space": {"layer": "fc", "feature_dim": 2}}
    return fa.summarise(**{**kw, **over})


def test_the_record_lists_flagged_items_by_distance_with_both_accuracies():
    s = summary()
    assert [r["id"] for r in s["flagged"]] == ["b", "a", "d"]  # sorted by distance; d sits on the threshold
    b = s["flagged"][0]
    assert b == {"id": "b", "label": "one", "pred": "zero", "train_id": "t2", "train_label": "one", "distance": 0.01,
                 "correct": False, "same_label": True}
    assert s["flagged"][2]["train_label"] == "one" and not s["flagged"][2]["same_label"]
    assert (s["flagged_count"], s["flagged_fraction"], s["dedup_rows"]) == (3, 0.75, 1)
    assert s["accuracy"] == 0.75 and s["accuracy_dedup"] == 1.0  # only "c" is left, and it is right
    assert s["flagged_label_conflicts"] == 1 and s["expected_by_chance"] == 1.0 and s["layer"] == "fc"
    assert s["train_nn_distance"]["min"] == 0.05 and s["threshold"] == 0.1 and s["quantile"] == 0.25
    h = fa.headline(s)
    assert h == {"feature_audit": "on", "test_accuracy_dedup": 1.0, "feature_dup_count": 3,
                 "feature_dup_fraction": 0.75, "feature_dup_threshold": 0.1}
    line = fa.summary_line(s)
    assert "3 of 4 test items (75.0%) within cosine distance 0.1" in line and "1.0000 on the 1 others" in line
    assert "1 flagged pair(s) disagree on the label" in line


def test_an_audit_that_did_not_run_says_why():
    off = fa.disabled("evaluate.feature_audit is false")
    assert fa.headline(off) == {"feature_audit": "off: evaluate.feature_audit is false", "test_accuracy_dedup": None,
                                "feature_dup_count": None, "feature_dup_fraction": None, "feature_dup_threshold": None}
    assert fa.headline(None)["feature_audit"].startswith("off: not recorded: this model was scored before")
    assert fa.summary_line(off) == "feature-space audit off: evaluate.feature_audit is false"


def test_test_search_keeps_only_the_closest_flagged_images_as_copies():
    train = np.eye(3, dtype=np.float32)
    search = fa.TestSearch(fa.FeatureIndex(train), threshold=0.2, keep=2)
    images = np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1)
    feats = np.array([[1, 0, 0], [1, 0.3, 0], [0, 1, 0.05], [1, 1, 1]], np.float32)
    for k in range(4):  # one item per batch: the search spans batches
        search(images[k:k + 1], feats[k:k + 1], [f"q{k}"])
    images[:] = 0  # the batches were views of a shard: the kept images must be copies
    dist, row, kept = search.result()
    assert row.tolist()[:3] == [0, 0, 1] and dist[0] == pytest.approx(0, abs=1e-6)
    assert set(kept) == {"q0", "q2"} and kept["q2"].max() > 0  # q1 is at 0.042, q2 at 0.0012: q0 and q2 closest
    assert dist[1] == pytest.approx(1 - 1 / np.hypot(1, 0.3), abs=1e-6)


@pytest.mark.parametrize("name", ["resnet10t", "resnet18", "keel_cifar_net_s", "vit_tiny_patch16_224"])
def test_the_tap_is_the_input_of_the_final_classifier_on_the_plain_view(name):
    """Every kind of network keel builds (a timm ResNet with keel's small-input stem, keel's own net, a ViT):
    the tapped features are timm's pre-logits, and under test-time views only the plain view is tapped."""
    from tasks.model.build import build_model
    from tasks.model.views import tta_logits

    torch.manual_seed(0)
    res = 224 if name.startswith("vit") else 16
    model, _ = build_model(TrainConfig(model=name), num_classes=5, in_chans=3, resolution=res)
    model.eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        with fa.FeatureTap(model) as tap:
            tap.arm()
            logits, plain = tta_logits(model, x, "flip_translate")  # 6 forward calls; the first is the plain view
            got = tap.take()
    assert got.shape == (2, ref.shape[1]) and torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(logits, plain)  # the other views did run (and were not tapped)
    assert fa.check_tap(model, 3, res, "cpu")["feature_dim"] == ref.shape[1]
    # the hook is gone after the block
    assert not fa.classifier_of(model)[1]._forward_pre_hooks


def test_a_model_without_a_classifier_is_refused_readably():
    with pytest.raises(fa.EvaluateError, match=r"exposes none .* set evaluate.feature_audit: false"):
        fa.FeatureTap(torch.nn.Linear(2, 2))


def test_the_picture_is_a_png_and_the_same_record_gives_the_same_bytes():
    img = np.full((8, 8, 3), 200, np.uint8)
    s = summary()
    pairs = [{"id": r["id"], "train_id": r["train_id"], "test_png": fa.png_b64(img),
              "train_png": fa.png_b64(img[..., :1])} for r in s["flagged"]]
    one = fa.render_pairs(s, pairs)
    assert one == fa.render_pairs(s, pairs) and Image.open(_bytes_io.BytesIO(one)).format == "PNG"
    for record, shown in ((fa.disabled("evaluate.feature_audit is false"), []), (summary(threshold=0.0), [])):
        assert Image.open(_bytes_io.BytesIO(fa.render_pairs(record, shown))).size[0] > 0


@pytest.mark.parametrize("q", ["0.7", "0", "0.5", "-0.01"])
def test_a_bad_feature_dup_quantile_names_the_key_and_the_range(tmp_path, q):
    p = tmp_path / "params.yaml"
    p.write_text(f"evaluate:\n  feature_dup_quantile: {q}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: invalid parameters\n  evaluate.feature_dup_quantile: Value "
                                          r"error, must be > 0 and < 0.5 \(a low quantile of the train-vs-train "
                                          rf"nearest-neighbour distances, e.g. 0.01\), got {float(q):g}"):
        load_params(p)
    assert EvaluateConfig().feature_dup_quantile == 0.01 and EvaluateConfig().feature_audit is True
    assert load_params("params.yaml").evaluate == EvaluateConfig()  # the repo's params: the documented defaults
