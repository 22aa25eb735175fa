"""Shared test helpers (our own: Keras' `keras.src.testing` is private).

`run_layer_test` runs the checks every public layer must pass (in the shape of Keras'
`keras.src.testing.TestCase.run_layer_test`); the gradient helpers compare a reversible computation
with ordinary autodiff on the same weights.
"""

import json

import keras
import numpy as np
import tensorflow as tf


def relative_error(actual, expected):
    """max(|actual - expected|) / max(|expected|, tiny) as a Python float."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(actual - expected))) / scale


def assert_all_close_relative(actuals, expecteds, rtol, what="tensor", atol=0.0):
    """Asserts `relative_error <= rtol` pairwise, naming the first failing index.

    A pair also passes if `max|actual - expected| <= atol`: for values that are zero analytically (e.g.
    the gradient of an attention key bias, to which softmax is invariant) only an absolute bound means
    anything.
    """
    assert len(actuals) == len(expecteds), (len(actuals), len(expecteds))
    for index, (a, e) in enumerate(zip(actuals, expecteds)):
        a = keras.ops.convert_to_numpy(a)
        e = keras.ops.convert_to_numpy(e)
        assert a.shape == e.shape, f"{what} {index}: shape {a.shape} != {e.shape}"
        if atol and float(np.max(np.abs(a.astype(np.float64) - e))) <= atol:
            continue
        error = relative_error(a, e)
        assert error <= rtol, f"{what} {index}: relative error {error:.3e} > {rtol:.1e}"


def copy_state(source, target):
    """Copies every variable (weights, BatchNorm statistics, seed states) from `source` to `target`."""
    source_vars, target_vars = source.variables, target.variables
    assert len(source_vars) == len(target_vars)
    for s, t in zip(source_vars, target_vars):
        assert tuple(s.shape) == tuple(t.shape), (s.path, t.path)
        t.assign(s)


def loss_and_gradients(layer, x, training=True, mode="eager"):
    """`(loss, [dL/dx] + [dL/dv for v in layer.trainable_variables])` for a fixed nonlinear loss.

    `mode` is "eager", "function" (`tf.function`) or "xla" (`tf.function(jit_compile=True)`).
    """

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            # A loss whose gradient differs per element (not just ones), in float64 if needed.
            weights = tf.cast(tf.reshape(tf.range(tf.size(y)), tf.shape(y)) % 7 - 3, y.dtype)
            loss = tf.reduce_sum(weights * y + 0.05 * y * y)
        return loss, tape.gradient(loss, [x] + layer.trainable_variables)

    if mode == "function":
        step = tf.function(step)
    elif mode == "xla":
        step = tf.function(step, jit_compile=True)
    elif mode != "eager":
        raise ValueError(mode)
    return step(tf.convert_to_tensor(x))


def run_layer_test(make_layer, input_shape, expected_output_shape=None, num_trainable_weights=None,
                   num_seed_generators=0, tmp_path=None, fit=True, mixed_precision=True):
    """The checks every public layer passes; returns the float32 model of `check_layer`.

    Args:
        make_layer: callable `make_layer(dtype=None)` returning a new, unbuilt layer (`dtype`: a
            dtype policy name, or None for the default).
        input_shape: input shape with `None` batch, e.g. `(None, 6, 6, 8)`.
        num_seed_generators: the number of `keras.random.SeedGenerator` states the layer holds; each
            must advance in a training call (so that the reversible recompute has states to replay).
        mixed_precision: also build the layer under `mixed_float16` and `mixed_bfloat16` and check
            that its variables stay float32 and its training-mode output is finite.

    The other arguments are those of `check_layer`.
    """
    layer = make_layer()
    model = check_layer(layer, input_shape, expected_output_shape, num_trainable_weights, tmp_path,
                        fit)
    x = np.random.default_rng(1).standard_normal((2,) + tuple(input_shape[1:])).astype("float32")
    seeds = [v for v in layer.variables if v.path.endswith("seed_generator_state")]
    assert len(seeds) == num_seed_generators, [v.path for v in seeds]
    if seeds:
        before = [v.numpy().copy() for v in seeds]
        layer(x.astype(layer.dtype_policy.variable_dtype), training=True)
        assert all((v.numpy() != b).any() for v, b in zip(seeds, before)), "a seed did not advance"
    for policy in ("mixed_float16", "mixed_bfloat16") if mixed_precision else ():
        mixed = make_layer(dtype=policy)
        y = keras.ops.convert_to_numpy(keras.ops.cast(mixed(x, training=True), "float32"))
        assert np.all(np.isfinite(y)), policy
        floats = [v for v in mixed.weights if "float" in str(v.dtype)]
        assert floats and all(str(v.dtype) == "float32" for v in floats), policy
    return model


def check_layer(layer, input_shape, expected_output_shape=None, num_trainable_weights=None,
                tmp_path=None, fit=True):
    """Runs the standard checks on a built-or-unbuilt layer instance (part of `run_layer_test`).

    - symbolic call on `keras.Input` gives the expected shape;
    - eager call works; number of trainable weights after `build`;
    - `get_config` is JSON and `from_config` rebuilds a layer with equal outputs (same weights);
    - `.keras` save/load round trip gives equal outputs (if `tmp_path`);
    - one `fit` step runs with a finite loss (if `fit`).
    """
    batch_shape = (2,) + tuple(input_shape[1:])
    x = np.random.default_rng(0).standard_normal(batch_shape).astype(
        keras.backend.standardize_dtype(layer.dtype_policy.variable_dtype)
    )
    inputs = keras.Input(batch_shape=(None,) + tuple(input_shape[1:]))
    symbolic = layer(inputs)
    expected_output_shape = expected_output_shape or tuple(input_shape)
    assert tuple(symbolic.shape[1:]) == tuple(expected_output_shape[1:])
    if num_trainable_weights is not None:
        assert len(layer.trainable_weights) == num_trainable_weights
    model = keras.Model(inputs, symbolic)
    y = keras.ops.convert_to_numpy(model(x))
    assert y.shape == batch_shape[:1] + tuple(expected_output_shape[1:])

    config = layer.get_config()
    json.dumps(config)  # raises if not serializable
    clone = layer.__class__.from_config(config)
    clone_model = keras.Model(inputs := keras.Input(batch_shape=inputs.shape), clone(inputs))
    clone_model.set_weights(model.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone_model(x)), y, rtol=1e-6, atol=1e-6)

    if tmp_path is not None:
        path = str(tmp_path / "layer.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(reloaded(x)), y, rtol=1e-6, atol=1e-6
        )

    if fit:
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        history = model.fit(x, np.zeros_like(y), epochs=1, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    return model
