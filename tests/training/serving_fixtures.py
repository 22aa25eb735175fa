"""Shared, session-scoped fixtures of the serving tests: one tiny RevNet classifier trained for a
step on real CIFAR-10 images and exported once (SavedModel + TFLite), reused by
`test_export.py` and `test_predict.py` (import the fixtures from here).
"""

import dataclasses
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from training import export

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_TEST_IMAGES = 16


def build_tiny_classifier(normalizer=None):
    """The tiny RevNet wrapped as `training.train.build_classifier` wraps zoo models:
    float32 raw pixels -> Normalization -> RevNet(units=[2, 2], widths=[8, 8, 16]) (one ReversibleSequence
    of one reversible block per stage: with units=[1, 1] there would be no reversible block) -> softmax.
    """
    if normalizer is None:
        normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
    backbone = tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], classes=len(CLASSES),
                                       input_shape=(32, 32, 3), name="tiny_revnet")
    pixels = keras.Input(shape=(32, 32, 3), dtype="float32", name="pixels")
    return keras.Model(pixels, backbone(normalizer(pixels)), name="tiny_classifier")


@dataclasses.dataclass
class Exported:
    model: keras.Model
    base_path: pathlib.Path
    result: export.ExportResult
    files: list  # real CIFAR-10 test JPEGs
    images: np.ndarray  # their decoded uint8 pixels (N, 32, 32, 3)
    labels: np.ndarray  # their true classes
    expected: np.ndarray  # the Keras model's probabilities on them
    run_dir: pathlib.Path  # a fake training run dir: config.json, model.weights.h5, model.keras


def _read_files(root, split, per_class):
    """The first `per_class` files of each class, classes interleaved (0, 1, ..., 9, 0, 1, ...)."""
    found = [sorted((root / split / name).glob("*.jpg"))[:per_class] for name in CLASSES]
    pairs = [(f[i], label) for i in range(per_class) for label, f in enumerate(found) if i < len(f)]
    return [f for f, _ in pairs], np.array([label for _, label in pairs])


def _decode(files):
    return np.stack([tf.io.decode_jpeg(f.read_bytes(), channels=3).numpy() for f in files])


_CACHE = {}


@pytest.fixture(scope="session")
def exported(cifar10_small_dir, tmp_path_factory):
    """Trains the tiny RevNet for 2 steps on 40 real images, exports it with TFLite, once.

    Each test module that imports this fixture gets its own fixture definition, so the result is
    cached here to build it once per session.
    """
    if "exported" not in _CACHE:
        _CACHE["exported"] = _build_exported(cifar10_small_dir, tmp_path_factory)
    return _CACHE["exported"]


def _build_exported(cifar10_small_dir, tmp_path_factory):
    root = pathlib.Path(cifar10_small_dir)
    train_files, train_labels = _read_files(root, "train", 4)
    train_images = _decode(train_files).astype("float32")
    normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
    normalizer.adapt(train_images)
    model = build_tiny_classifier(normalizer)
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss="sparse_categorical_crossentropy")
    model.fit(train_images, train_labels, batch_size=20, epochs=1, verbose=0)  # 2 steps

    files, labels = _read_files(root, "test", 2)
    files, labels = files[:NUM_TEST_IMAGES], labels[:NUM_TEST_IMAGES]
    images = _decode(files)
    expected = model.predict(images.astype("float32"), verbose=0)

    tmp = tmp_path_factory.mktemp("serving")
    run_dir = tmp / "run"
    run_dir.mkdir()
    config = {"model": "tiny", "image_shape": [32, 32, 3], "class_names": list(CLASSES),
              "use_custom_gradient": True, "test_accuracy": 0.125}
    (run_dir / "config.json").write_text(json.dumps(config))
    model.save_weights(run_dir / "model.weights.h5")
    model.save(run_dir / "model.keras")

    base_path = tmp / "saved_models" / "tiny"
    result = export.export_saved_model(model, base_path, CLASSES, run_info=config, tflite=True)
    return Exported(model=model, base_path=base_path, result=result, files=files, images=images,
                    labels=labels, expected=expected, run_dir=run_dir)
