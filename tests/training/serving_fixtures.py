"""Shared, session-scoped fixture of the serving tests: the tiny RevNet classifier of the shared
training run (`trained`, tests/training/conftest.py: 12 steps on real CIFAR-10 images) exported
once more with TFLite, reused by `test_export.py` and `test_predict.py` (import it from here).
"""

import dataclasses
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import export

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_TEST_IMAGES = 16


@dataclasses.dataclass
class Exported:
    model: keras.Model
    base_path: pathlib.Path
    result: export.ExportResult
    files: list  # real CIFAR-10 test JPEGs
    images: np.ndarray  # their decoded uint8 pixels (N, 32, 32, 3)
    labels: np.ndarray  # their true classes
    expected: np.ndarray  # the Keras model's probabilities on them
    run_dir: pathlib.Path  # the training run dir: config.json, model.weights.h5, model.keras


def _read_files(root, split, per_class):
    """The first `per_class` files of each class, classes interleaved (0, 1, ..., 9, 0, 1, ...)."""
    found = [sorted((root / split / name).glob("*.jpg"))[:per_class] for name in CLASSES]
    pairs = [(f[i], label) for i in range(per_class) for label, f in enumerate(found) if i < len(f)]
    return [f for f, _ in pairs], np.array([label for _, label in pairs])


def _decode(files):
    return np.stack([tf.io.decode_jpeg(f.read_bytes(), channels=3).numpy() for f in files])


_CACHE = {}


@pytest.fixture(scope="session")
def exported(trained, cifar10_small_dir, tmp_path_factory):
    """The shared training run's model (tests/training/conftest.py) exported once more, with
    TFLite, into a base path of its own; its run directory; 16 real test images.

    Each test module that imports this fixture gets its own fixture definition, so the result is
    cached here to build it once per session.
    """
    if "exported" not in _CACHE:
        _CACHE["exported"] = _build_exported(trained, cifar10_small_dir, tmp_path_factory)
    return _CACHE["exported"]


def _build_exported(trained, cifar10_small_dir, tmp_path_factory):
    result, _, run_dir, _ = trained
    model = result.model
    files, labels = _read_files(pathlib.Path(cifar10_small_dir), "test", 2)
    files, labels = files[:NUM_TEST_IMAGES], labels[:NUM_TEST_IMAGES]
    images = _decode(files)
    expected = model.predict(images.astype("float32"), verbose=0)
    base_path = tmp_path_factory.mktemp("serving") / "saved_models" / "tiny"
    exported = export.export_saved_model(model, base_path, CLASSES, run_info=result.config,
                                         tflite=True)
    return Exported(model=model, base_path=base_path, result=exported, files=files, images=images,
                    labels=labels, expected=expected, run_dir=run_dir)
