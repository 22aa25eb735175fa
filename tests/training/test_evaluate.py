"""Tests of training/evaluate.py on real CIFAR-10 images: the shared run's directory and its
exported version (uint8 `images` -> `probabilities`, tests/training/conftest.py), `.keras` files,
top-5 with more than 10 classes, confusion matrix, one-line errors."""

import contextlib
import io
import shutil

import keras
import numpy as np
import pytest

import tf_revnet.models
from training import data as data_lib
from training import evaluate as evaluate_lib


def _classifier(classes, images):
    """A tiny RevNet on raw pixels, as the training script builds it (normalization first)."""
    keras.utils.set_random_seed(3)
    normalizer = keras.layers.Normalization(axis=-1, name="normalization")
    normalizer.adapt(images.astype("float32"))
    pixels = keras.Input((32, 32, 3), name="pixels")
    backbone = tf_revnet.models.RevNet(units=[1, 1], widths=[8, 8, 16], input_shape=(32, 32, 3),
                                       classes=classes)
    return keras.Model(pixels, backbone(normalizer(pixels)))


def _reference(model, split, k):
    """Top-1, top-5 and confusion matrix computed directly from model.predict."""
    probabilities = model.predict(split.images.astype("float32"), verbose=0)
    predicted = probabilities.argmax(-1)
    confusion = np.zeros((k, k), int)
    for t, p in zip(split.labels, predicted):
        confusion[t, p] += 1
    top5 = np.mean([t in np.argsort(-p)[:5] for t, p in zip(split.labels, probabilities)])
    return float(np.mean(predicted == split.labels)), float(top5), confusion


@pytest.fixture(scope="module")
def cifar_test(cifar10_small_dir):
    return data_lib.load_image_folder(cifar10_small_dir, train_examples=1).test_split


def test_evaluate_a_run_directory(trained, capsys):
    """Without options: the run's own data (its config.json), its test subset (`--test-examples
    32` of the run, same seed) and weights, hence the run's final test accuracy; `--test-examples`
    overrides the subset (`all`: the whole test split)."""
    result, _, model_dir, _ = trained
    assert evaluate_lib.main([str(model_dir), "--verbose", "0"]) == 0
    out = capsys.readouterr().out
    assert f"Top-1 accuracy: {result.test_accuracy:.4f} (32 images)" in out
    assert (model_dir / "confusion_matrix.png").is_file()
    assert evaluate_lib.main([str(model_dir), "--verbose", "0", "--test-examples", "all"]) == 0
    assert "(200 images)" in capsys.readouterr().out


def test_evaluate_the_exported_saved_model(trained, cifar10_small_dir, cifar_test, tmp_path,
                                           monkeypatch):
    """`training.evaluate` on the run's exported version (serving_default: uint8 `images` ->
    `probabilities`) against top-1 and the confusion matrix computed from the Keras model's
    predictions; without data options it evaluates on the run's own data (from the version's
    assets.extra/export.json), giving the run's final test accuracy."""
    result, _, _, export_dir = trained
    evaluation = evaluate_lib.evaluate(export_dir, data_dir=cifar10_small_dir,
                                       output_dir=tmp_path, verbose=0)
    split = cifar_test
    predicted = result.model.predict(split.images.astype("float32"), verbose=0).argmax(-1)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (split.labels, predicted), 1)
    assert evaluation.num_examples == 200 and evaluation.top5 is None
    assert evaluation.top1 == pytest.approx(np.mean(predicted == split.labels))
    np.testing.assert_array_equal(evaluation.confusion, confusion)
    assert evaluation.per_class["cat"] == pytest.approx(confusion[3, 3] / 20)
    assert evaluation.confusion_png == tmp_path / "confusion_matrix.png"
    assert evaluation.confusion_png.read_bytes().startswith(b"\x89PNG")

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the default place of the PNG (never the version)
    own = evaluate_lib.evaluate(export_dir, verbose=0)  # the run's data and test subset (32)
    assert own.num_examples == 32 and own.top1 == pytest.approx(result.test_accuracy)
    assert own.confusion_png == tmp_path / "cwd" / "confusion_matrix.png"
    assert not (export_dir / "confusion_matrix.png").exists()


def test_keras_file_with_more_than_ten_classes_reports_top5(cifar10_small_dir, tmp_path,
                                                            monkeypatch):
    # 12 classes of real photos: the 10 CIFAR classes plus two copies under other names.
    root = tmp_path / "twelve"
    for split in ("train", "test"):
        shutil.copytree(cifar10_small_dir / split, root / split)
        for extra, source in (("zebra", "horse"), ("yacht", "ship")):
            shutil.copytree(cifar10_small_dir / split / source, root / split / extra)
    split = data_lib.load_image_folder(root, train_examples=1, test_examples=60).test_split
    model = _classifier(12, split.images)
    model.save(tmp_path / "m.keras")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = evaluate_lib.main([str(tmp_path / "m.keras"), "--data-dir", str(root),
                                  "--test-examples", "60", "--verbose", "0"])
    assert code == 0
    top1, top5, _ = _reference(model, split, 12)
    text = out.getvalue()
    assert f"Top-1 accuracy: {top1:.4f} (60 images)" in text
    assert f"Top-5 accuracy: {top5:.4f}" in text
    assert "  zebra" in text and "  airplane" in text
    assert (tmp_path / "confusion_matrix.png").is_file()


def test_bad_path_gives_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert evaluate_lib.main([str(tmp_path / "empty"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run directory" in err
