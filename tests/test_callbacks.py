"""Tests of `tf_revnet.callbacks.ReversibleNumericsMonitor` during `model.fit`."""

import csv
import glob
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tf_revnet import callbacks as revnet_callbacks
from tf_revnet import diagnostics


def _model(run_eagerly=False):
    model = tf_revnet.models.RevNet(units=[1, 2], widths=[8, 8, 8], input_shape=(8, 8, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy",
                  run_eagerly=run_eagerly)
    return model


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 3)).astype("float32"), rng.integers(0, 10, n)


def _fit(model, monitor, tmp_path, steps=4, epochs=2):
    x, y = _data(steps * 4, 0)
    csv_path = tmp_path / "log.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, shuffle=False,
                            callbacks=[monitor, keras.callbacks.CSVLogger(str(csv_path))])
    monitor_warnings = [w for w in caught if "ReversibleNumericsMonitor" in str(w.message)]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return history, rows, monitor_warnings


def test_monitor_writes_csv_and_history_without_changing_training(tmp_path):
    x_val, y_val = _data(4, 1)
    model = _model()
    reference = _model()
    reference.set_weights(model.get_weights())
    monitor = revnet_callbacks.ReversibleNumericsMonitor(x_val, y_val, every_n_steps=3,
                                                         log_dir=tmp_path / "tb")
    history, rows, caught = _fit(model, monitor, tmp_path)
    assert caught == []  # float32: far below the default thresholds
    # Measured at step 0 and after steps 3 and 6 of 8.
    assert [m["step"] for m in monitor.history] == [0, 3, 6]
    assert len(rows) == 2
    for key in revnet_callbacks.LOG_KEYS:
        assert key in rows[0], key
        assert key in history.history
    # Each epoch's row holds the latest measurement (steps 3 and 6).
    for row, measured in zip(rows, monitor.history[1:]):
        assert float(row[revnet_callbacks.GRADIENT_ANGLE]) == pytest.approx(
            measured[revnet_callbacks.GRADIENT_ANGLE], rel=1e-6)
    for measured in monitor.history:
        assert 0 < measured[revnet_callbacks.GRADIENT_ANGLE] < 0.01
        assert 0 < measured[revnet_callbacks.RECONSTRUCTION_RELATIVE_ERROR] < 1e-5
        assert measured[revnet_callbacks.NONFINITE] == 0
    # The values are those of the diagnostics on the final weights, and training is unchanged.
    assert isinstance(monitor.last_gradient_angle, diagnostics.GradientAngle)
    x, y = _data(16, 0)
    reference.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # TensorBoard scalars, one per measurement, step = global training step.
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(events) == 1
    steps = {}
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            steps.setdefault(value.tag, []).append(event.step)
    assert set(steps) == set(revnet_callbacks.LOG_KEYS)
    assert steps[revnet_callbacks.GRADIENT_ANGLE] == [0, 3, 6]


def test_monitor_warns_once_per_threshold_with_block_and_figures(tmp_path):
    # Two training steps, run eagerly (tracing would cost more than the steps; graph-mode fit
    # with the monitor is the test above).
    x_val, y_val = _data(4, 1)
    model = _model(run_eagerly=True)
    monitor = revnet_callbacks.ReversibleNumericsMonitor(
        x_val, y_val, every_n_steps=2, max_gradient_angle=0.0, max_reconstruction_error=0.0
    )
    _, _, caught = _fit(model, monitor, tmp_path, steps=2, epochs=1)
    assert [m["step"] for m in monitor.history] == [0, 2]  # both pass both thresholds ...
    assert len(caught) == 2  # ... but each warns once
    angle, rebuild = sorted((str(w.message) for w in caught), key=lambda m: "rebuilds" in m)
    first = monitor.history[0]
    assert "step 0" in angle and f"{first[revnet_callbacks.GRADIENT_ANGLE]:.3g} degrees" in angle
    assert "worst variable 'revnet_body/revnet_stage" in angle
    assert "step 0" in rebuild and "block 'revnet_stage" in rebuild
    assert f"{first[revnet_callbacks.RECONSTRUCTION_RELATIVE_ERROR]:.3g}" in rebuild


def test_monitor_warns_on_nonfinite_values():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((2,))
        blocks = [tf_revnet.ReversibleBlock(
            keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(1e3)),
            keras.layers.Dense(1, use_bias=False)) for _ in range(2)]
        h = tf_revnet.ReversibleSequence(blocks)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(h))
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer="sgd", loss="mse")
    monitor = revnet_callbacks.ReversibleNumericsMonitor(np.full((2, 2), 1e3, "float32"),
                                                         np.zeros((2, 1)), max_gradient_angle=None,
                                                         max_reconstruction_error=None)
    monitor.set_model(model)
    with pytest.warns(RuntimeWarning, match="inf or NaN at step 0 in block 'reversible_block"):
        figures = monitor.measure()
    assert figures[revnet_callbacks.NONFINITE] > 0
    assert math.isnan(figures[revnet_callbacks.GRADIENT_ANGLE])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": 2.5}, "every_n_steps"),
     ({"max_gradient_angle": -1}, "max_gradient_angle"),
     ({"max_reconstruction_error": "big"}, "max_reconstruction_error")],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        revnet_callbacks.ReversibleNumericsMonitor(np.zeros((1, 8, 8, 3)), np.zeros((1,)), **kwargs)


def test_train_cli_monitor_numerics_flag(tmp_path):
    from training import command_line, run_dir

    def resolve(*extra):
        argv = ["--model-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "export"),
                *extra]
        return command_line.resolve_config(command_line.build_parser().parse_args(argv), argv)

    config = resolve("--monitor-numerics", "50", "--max-gradient-angle", "0.5")
    assert (config.monitor_numerics, config.max_gradient_angle,
            config.max_reconstruction_error) == (50, 0.5, 1e-2)
    assert resolve().monitor_numerics == 0  # off by default
    # Monitoring does not change training: a run may be resumed with other monitor settings.
    assert "monitor_numerics" not in run_dir.TRAINING_FIELDS
    with pytest.raises(command_line.ConfigError) as error:
        resolve("--monitor-numerics", "-1")
    assert command_line.error_line(error.value) == "--monitor-numerics -1: must be >= 0 (0: off)"
