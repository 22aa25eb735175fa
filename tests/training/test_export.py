"""Tests of training/export.py: TF Serving version directories and atomic export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import export


def test_next_version_dir(tmp_path):
    root = tmp_path / "revnet38"
    assert export.next_version_dir(root) == root / "1"
    for name in ("1", "3", "tmp", ".tmp-4-123"):
        (root / name).mkdir(parents=True)
    assert export.next_version_dir(root) == root / "4"


def test_check_export_dir(tmp_path):
    export.check_export_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    export.check_export_dir(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "saved_model.pb").write_bytes(b"x")
    with pytest.raises(ValueError, match="--export-dir .*already exists"):
        export.check_export_dir(tmp_path / "full")


def test_export_saved_model_writes_a_servable_version(tmp_path):
    inputs = keras.Input((4,), name="pixels")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    path = export.export_saved_model(model, tmp_path / "m" / "1")
    assert path == tmp_path / "m" / "1"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]  # no temporary left
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(serve(pixels=tf.constant(x))["output_0"].numpy(),
                               model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        export.export_saved_model(model, path)
