"""Fixtures of the training tests built from the real CIFAR-10 images (see tests/conftest.py).

`trained` is the one real training run of the suite (tiny RevNet, 12 steps): test_train.py checks
the run, test_export.py, test_predict.py and test_evaluate.py use its run directory and export.
"""

import contextlib
import io

import pytest
import tensorflow as tf

import tf_revnet.models
from training import classifier, train


@pytest.fixture
def mixed_size_jpegs(cifar10_small_dir, tmp_path):
    """Real CIFAR-10 photos re-encoded as JPEGs of several sizes and aspect ratios."""
    root = tmp_path / "imagenet_like"
    sizes = [(40, 56), (64, 48), (33, 33), (80, 100)]
    for split, per_class in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            files = sorted((cifar10_small_dir / split / label).glob("*.jpg"))[:per_class]
            for i, f in enumerate(files):
                image = tf.io.decode_jpeg(tf.io.read_file(str(f)))
                image = tf.cast(tf.image.resize(image, sizes[i % len(sizes)]), tf.uint8)
                (root / split / label / f"{i}.JPEG").write_bytes(tf.io.encode_jpeg(image).numpy())
    return root


# ---- one real training run of a tiny RevNet, shared by the train, export, predict and evaluate tests

EPOCHS = 3
STEPS = 4
BATCH = 16


def tiny_revnet(**kwargs):
    """`RevNet(units=[1, 1], widths=[8, 8, 16])`: stem, one reversible block, one transition."""
    return tf_revnet.models.RevNet(units=[1, 1], widths=[8, 8, 16], name="tiny", **kwargs)


@pytest.fixture(autouse=True)
def _tiny_model(monkeypatch):
    """`--model tiny_revnet` (and run directories of it) work in every training test."""
    monkeypatch.setitem(classifier.MODEL_BUILDERS, "tiny_revnet", tiny_revnet)


def run_captured(argv, callbacks=()):
    """Runs `train.run(argv)` and returns (result or exception, captured stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            result = train.run(argv, callbacks=callbacks)
        except Exception as e:  # returned to the caller, which asserts on it
            result = e
    return result, out.getvalue()


def small_run_args(data_dir, model_dir, export_dir, epochs=EPOCHS, steps=STEPS, extra=()):
    """The command line of the shared run: 3 epochs x 4 steps of batch 16 on 128 real training
    images, validated on 32 test images."""
    return [
        "--model", "tiny_revnet",
        "--data-dir", str(data_dir),
        "--train-examples", "128",
        "--epochs", str(epochs),
        "--batch-size", str(BATCH),
        "--steps-per-epoch", str(steps),
        "--test-examples", "32",
        "--learning-rate", "0.05",
        "--model-dir", str(model_dir),
        "--export-dir", str(export_dir),
        "--verbose", "2",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(cifar10_small_dir, tmp_path_factory):
    """One real CLI run of the tiny RevNet on the CIFAR-10 subset, once per session:
    `(TrainResult, stdout, model_dir, export_dir)`, `export_dir` being version 1 of the base path.
    """
    root = tmp_path_factory.mktemp("train_run")
    model_dir, base_path = root / "model_dir", root / "export" / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(classifier.MODEL_BUILDERS, "tiny_revnet", tiny_revnet)
        result, stdout = run_captured(small_run_args(cifar10_small_dir, model_dir, base_path))
    if isinstance(result, Exception):
        raise result
    return result, stdout, model_dir, base_path / "1"
