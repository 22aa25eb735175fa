"""tf_revnet's zoo on the JAX backend: gradients equal plain autodiff; what needs TensorFlow says so."""

import os
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest

import tf_revnet
from tests.jax.test_reversible_layers import F32, _relative, _x
from tf_revnet.layers import ReversibleSequence


def _sequences(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, ReversibleSequence)]


def _tiny_revnet(**kwargs):
    keras.utils.set_random_seed(11)
    return tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], input_shape=(8, 8, 3),
                                   classes=3, name="tiny", **kwargs)


def test_revnet_gradients_under_jit_equal_plain_autodiff():
    model = _tiny_revnet()
    x, y = _x((4, 8, 8, 3), "float32"), keras.utils.to_categorical(np.arange(4) % 3, 3)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        p, after = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.losses.categorical_crossentropy(y, p).mean(), after

    results = []
    for custom in (True, False):
        for sequence in _sequences(model):
            sequence.use_custom_gradient = custom
        (value, after), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
        results.append((value, grads, after))
    (value, grads, after), (plain_value, plain_grads, plain_after) = results
    assert _relative(value, plain_value) <= F32
    errors = [_relative(g, p) for g, p in zip(grads, plain_grads, strict=True)]
    assert max(errors) <= F32, max(errors)
    for a, p in zip(after, plain_after, strict=True):  # BatchNorm statistics, updated once
        np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=F32, atol=1e-6)


_LOAD_UNDER_TENSORFLOW = """
import sys
import keras
import numpy as np
import tf_revnet  # registers the layers
model = keras.saving.load_model(sys.argv[1])
x, expected = np.load(sys.argv[2]), np.load(sys.argv[3])
print(keras.backend.backend(), float(np.max(np.abs(model.predict(x, verbose=0) - expected))))
"""


def test_revnet_fit_then_keras_file_loads_under_jax_and_tensorflow(tmp_path):
    """A `.keras` file of a model trained on JAX predicts the same on JAX and on TensorFlow (1e-5)."""
    model = _tiny_revnet()
    model.compile("sgd", "categorical_crossentropy")
    x, y = _x((4, 8, 8, 3), "float32"), keras.utils.to_categorical(np.arange(4) % 3, 3)
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    path = tmp_path / "tiny.keras"
    model.save(path)
    expected = model.predict(x, verbose=0)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    pytest.importorskip("tensorflow")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_TENSORFLOW, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "expected.npy")],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    backend, difference = result.stdout.split()[-2:]
    assert backend == "tensorflow" and float(difference) <= 1e-5, result.stdout


_TRAIN_AND_SAVE_UNDER_TENSORFLOW = """
import sys
import keras
import numpy as np
import tf_revnet
keras.utils.set_random_seed(11)
model = tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], input_shape=(8, 8, 3), classes=3,
                                name="tiny")
model.compile("sgd", "categorical_crossentropy")
x = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype("float32")
model.fit(x, keras.utils.to_categorical(np.arange(4) % 3, 3), batch_size=2, verbose=0)
model.save(sys.argv[1])
np.save(sys.argv[2], x)
np.save(sys.argv[3], model.predict(x, verbose=0))
print(keras.backend.backend())
"""


def test_keras_file_trained_under_tensorflow_loads_under_jax_and_back(tmp_path):
    """The other direction: a `.keras` file trained and saved on TensorFlow predicts the same on
    JAX (1e-5), trains on, and the file JAX saves loads on TensorFlow again with JAX's predictions."""
    pytest.importorskip("tensorflow")
    path, x_path, expected_path = tmp_path / "tf.keras", tmp_path / "x.npy", tmp_path / "tf.npy"
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN_AND_SAVE_UNDER_TENSORFLOW, str(path), str(x_path),
         str(expected_path)],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "tensorflow", (
        result.stderr[-3000:])
    x, expected = np.load(x_path), np.load(expected_path)
    model = keras.saving.load_model(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    model.fit(x, keras.utils.to_categorical(np.arange(4) % 3, 3), batch_size=2, verbose=0)
    again, jax_expected = tmp_path / "jax.keras", tmp_path / "jax.npy"
    model.save(again)
    np.save(jax_expected, model.predict(x, verbose=0))
    assert not np.allclose(np.load(jax_expected), expected, atol=1e-4)  # it did train on
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_TENSORFLOW, str(again), str(x_path), str(jax_expected)],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    backend, difference = result.stdout.split()[-2:]
    assert backend == "tensorflow" and float(difference) <= 1e-5, result.stdout


def test_tensorflow_only_tools_raise_one_line():
    model = _tiny_revnet()
    with pytest.raises(NotImplementedError, match="tf_revnet.memory.estimate needs "
                                                  "KERAS_BACKEND=tensorflow"):
        tf_revnet.memory.estimate(model, batch_size=2)
    with pytest.raises(NotImplementedError, match="tf_revnet.diagnostics needs"):
        tf_revnet.diagnostics.reconstruction_error(model, _x((2, 8, 8, 3), "float32"))


def test_mixed_bfloat16_with_the_fixed_point_stream_equals_plain_autodiff():
    """F and G in bfloat16, the float32 stream on the fixed-point grid: the rebuild is exact."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _tiny_revnet(coupling="fixed_point")
    finally:
        keras.config.set_dtype_policy("float32")
    x, y = _x((4, 8, 8, 3), "float32"), keras.utils.to_categorical(np.arange(4) % 3, 3)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        p, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.losses.categorical_crossentropy(y, p).mean()

    grads = []
    for custom in (True, False):
        for sequence in _sequences(model):
            sequence.use_custom_gradient = custom
        grads.append(jax.jit(jax.grad(loss))(trainable))
    for g, p in zip(*grads, strict=True):
        assert _relative(g, p) <= F32
