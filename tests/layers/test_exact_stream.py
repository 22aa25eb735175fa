"""The opt-in exact float32 stream (`coupling="fixed_point"`): bit-identical rebuilds, range checks."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tests.test_case import assert_all_close_relative, copy_state, loss_and_gradients
from tf_revnet import diagnostics
from tf_revnet.callbacks import StreamRangeMonitor
from tf_revnet.layers import AdditiveCoupling


def block(dtype="float32"):
    return tf_revnet.ReversibleBlock(tf_revnet.BasicResidualFunction(dtype=dtype),
                                     tf_revnet.BasicResidualFunction(dtype=dtype),
                                     coupling="fixed_point", dtype=dtype)


def pair(n=4, stacked=False, fuse=True, dtype="float32"):
    def sequence(use_custom_gradient):
        units = ([tf_revnet.ReversibleBlockStack(block(dtype), depth=n)] if stacked
                 else [block(dtype) for _ in range(n)])
        return tf_revnet.ReversibleSequence(units, use_custom_gradient=use_custom_gradient,
                                            fuse_identical_blocks=fuse, dtype=dtype)

    reversible, plain = sequence(True), sequence(False)
    reversible.build((2, 6, 6, 8))
    plain.build((2, 6, 6, 8))
    copy_state(reversible, plain)
    return reversible, plain


def x32(scale=1.0, seed=0):
    return tf.constant(scale * np.random.default_rng(seed).standard_normal((2, 6, 6, 8)),
                       "float32")


def test_fixed_point_grid_is_chosen_from_the_dtype():
    c32 = AdditiveCoupling.fixed_point("float32")
    assert (c32.grid_bits, c32.check_range, c32.exact_range("float32")) == (14, True, 1024.0)
    c64 = AdditiveCoupling.fixed_point("float64")
    assert (c64.grid_bits, c64.exact_range("float64")) == (33, 2.0**20)
    assert AdditiveCoupling.fixed_point("float32", max_abs=256).grid_bits == 16
    assert AdditiveCoupling.fixed_point("float32", max_abs=200).grid_bits == 16
    assert AdditiveCoupling().exact_range("float32") == math.inf
    assert block().coupling == c32 and block("float64").coupling == c64
    assert block("mixed_bfloat16").coupling == c32  # the stream is float32
    for bad in ({"dtype": "bfloat16"}, {"max_abs": 0}, {"max_abs": 2.0**30}):
        with pytest.raises(ValueError):
            AdditiveCoupling.fixed_point(**bad)
    with pytest.raises(ValueError, match="`check_range`"):
        AdditiveCoupling(check_range=True)
    # Configs written before `check_range` existed still load.
    assert AdditiveCoupling.from_config({"grid_bits": 12}) == AdditiveCoupling(12)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_rebuilt_inputs_are_bit_identical_and_gradients_equal_plain(mode, stacked):
    reversible, plain = pair(stacked=stacked)
    x = x32()
    _, grads_r = loss_and_gradients(reversible, x, mode=mode)
    _, grads_p = loss_and_gradients(plain, x, mode=mode)
    assert_all_close_relative(grads_r, grads_p, 1e-5, what="gradient")
    report = diagnostics.reconstruction_error(reversible, x)
    assert report.max_abs_error == 0.0 and report.out_of_range == ()
    assert all(b.exact_range == 1024.0 and 0 < b.max_abs_stream < 1024 for b in report.blocks)
    assert set(diagnostics.stream_out_of_range(reversible).values()) == {0.0}


def test_float_stream_is_not_bit_identical_and_has_no_range():
    sequence = tf_revnet.ReversibleSequence(
        [tf_revnet.ReversibleBlock(tf_revnet.BasicResidualFunction(),
                                   tf_revnet.BasicResidualFunction()) for _ in range(4)])
    report = diagnostics.reconstruction_error(sequence, x32())
    assert report.max_abs_error > 0.0 and report.out_of_range == ()
    assert all(b.exact_range == math.inf for b in report.blocks)
    assert diagnostics.stream_out_of_range(sequence) == {}


@pytest.mark.parametrize("stacked", [False, True])
def test_values_beyond_the_range_are_counted_and_reported_per_block(stacked):
    reversible, _ = pair(n=3, stacked=stacked)
    x = x32(scale=3000.0)  # |stream| > 1024
    tf.function(lambda x: loss_and_gradients(reversible, x))(x)
    counts = diagnostics.stream_out_of_range(reversible)
    assert len(counts) == 3 and set(counts.values()) == {1.0}, counts
    if stacked:
        assert list(counts) == [f"{reversible.units[0].name}[{i}]" for i in range(3)]
    report = diagnostics.reconstruction_error(reversible, x)
    assert len(report.out_of_range) == 3 and report.max_abs_stream > 1024
    # Inference does not count (nothing is rebuilt), nor do the diagnostics themselves.
    reversible(x, training=False)
    assert set(diagnostics.stream_out_of_range(reversible).values()) == {1.0}


def test_nan_counts_as_out_of_range():
    reversible, _ = pair(n=2)
    x = x32().numpy()
    x[0, 0, 0, 0] = np.nan
    reversible(x, training=True)
    assert set(diagnostics.stream_out_of_range(reversible).values()) == {1.0}


def test_fit_with_the_monitor_warns_naming_the_block():
    inputs = keras.Input((6, 6, 8))
    sequence = tf_revnet.ReversibleSequence([block(), block()])
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(sequence(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = np.asarray(x32()), np.zeros((2, 1), "float32")
    monitor = StreamRangeMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    assert not [w for w in caught if "StreamRangeMonitor" in str(w.message)]
    assert history.history["revnet_stream_out_of_range"] == [0.0]
    with pytest.warns(RuntimeWarning, match=f"block '{sequence.units[1].name}' left the exact"):
        model.fit(x * 3000, y, epochs=1, verbose=0, callbacks=[monitor])
    assert set(monitor.counts.values()) == {1.0}
    with pytest.raises(ValueError, match="every_n_steps"):
        StreamRangeMonitor(every_n_steps=0)


def test_fixed_point_model_round_trips(tmp_path):
    model = tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], input_shape=(16, 16, 3),
                                    coupling="fixed_point")
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(model(x), reloaded(x))
    counts = diagnostics.stream_out_of_range(reloaded)
    assert counts and set(counts.values()) == {0.0}
