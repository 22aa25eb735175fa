"""Tests of tf_revnet/layers/momentum.py: momentum blocks against plain autodiff on the same weights."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tests.test_case import (
    assert_all_close_relative,
    copy_state,
    loss_and_gradients,
    relative_error,
)
from tf_revnet.layers import momentum
from tf_revnet.layers import unit as unit_lib

RTOL = {"float64": 1e-10, "float32": 1e-5}


def random_input(shape=(2, 6, 6, 8), dtype="float64", seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype)


def blocks(n=3, gamma=0.9, dtype="float64", dropout=False, half=4):
    def function():
        if dropout:
            return keras.Sequential([keras.layers.Dense(half, activation="tanh", dtype=dtype),
                                     keras.layers.Dropout(0.3, dtype=dtype)])
        return tf_revnet.BasicResidualFunction(dtype=dtype)

    return [tf_revnet.MomentumBlock(function(), gamma=gamma, dtype=dtype) for _ in range(n)]


def make_pair(n=3, gamma=0.9, dtype="float64", fuse=True, dropout=False, shape=(2, 6, 6, 8)):
    """A reversible sequence of momentum blocks and the same blocks with plain autodiff."""
    reversible = tf_revnet.ReversibleSequence(blocks(n, gamma, dtype, dropout), dtype=dtype,
                                              fuse_identical_blocks=fuse)
    plain = tf_revnet.ReversibleSequence(blocks(n, gamma, dtype, dropout), dtype=dtype,
                                         use_custom_gradient=False)
    reversible.build(shape)
    plain.build(shape)
    copy_state(reversible, plain)
    return reversible, plain


@pytest.mark.parametrize("gamma", [0, -0.5, 1.5, math.nan, math.inf, True, "0.9", None])
def test_gamma_outside_the_unit_interval_raises_naming_it(gamma):
    with pytest.raises(ValueError, match=r"`gamma` must be a number in \(0, 1\].*gamma="):
        tf_revnet.MomentumBlock(tf_revnet.BasicResidualFunction(), gamma=gamma)


def test_f_must_be_a_layer_and_keep_the_shape():
    with pytest.raises(ValueError, match="`f` must be a keras.layers.Layer"):
        tf_revnet.MomentumBlock(lambda x: x)
    block = tf_revnet.MomentumBlock(tf_revnet.BasicResidualFunction(8, strides=2))
    with pytest.raises(ValueError, match="Residual function F .* same shape"):
        block.build((None, 6, 6, 8))


@pytest.mark.parametrize("gamma", [0.1, 0.9, 1.0])
def test_inverse_of_forward_is_the_input(gamma):
    (block,) = blocks(1, gamma)
    x = random_input()
    y = block(x, training=True)
    np.testing.assert_allclose(block.inverse(y, training=True).numpy(), x.numpy(), atol=1e-12)
    # Eq. 4 itself.
    position, velocity = block.split(x)
    h = block.f(position, training=True)
    y_position, y_velocity = block.split(y)
    np.testing.assert_allclose(y_velocity, gamma * velocity + (1 - gamma) * h, atol=1e-14)
    np.testing.assert_allclose(y_position, position + y_velocity, atol=1e-14)


def test_identical_blocks_loop_and_others_do_not():
    sequence, _ = make_pair(n=3)
    units = sequence._get_plan(check=False).units
    assert [type(u) for u in units] == [unit_lib.LoopUnit]
    assert isinstance(units[0].template, momentum.MomentumUnit) and units[0].depth == 3
    unfused, _ = make_pair(n=3, fuse=False)
    assert [type(u) for u in unfused._get_plan(check=False).units] == [momentum.MomentumUnit] * 3
    # Momentum blocks of another gamma are another structure.
    mixed = tf_revnet.ReversibleSequence(blocks(2, 0.9) + blocks(1, 0.5), dtype="float64")
    mixed.build((2, 6, 6, 8))
    assert [type(u) for u in mixed._get_plan(check=False).units] == [
        unit_lib.LoopUnit, momentum.MomentumUnit]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    "mode, dtype",
    [("eager", "float64"), ("eager", "float32"), ("function", "float64"),
     ("function", "float32")],
)
def test_gradients_equal_plain_autodiff(mode, dtype, fuse):
    reversible, plain = make_pair(dtype=dtype, fuse=fuse)
    x = random_input(dtype=dtype)
    loss_r, grads_r = loss_and_gradients(reversible, x, mode=mode)
    loss_p, grads_p = loss_and_gradients(plain, x, mode=mode)
    assert len(grads_r) == 1 + len(reversible.trainable_variables) == 1 + 3 * 6
    assert relative_error(loss_r, loss_p) <= RTOL[dtype]
    assert_all_close_relative(grads_r, grads_p, RTOL[dtype], what="gradient")


def test_gradients_with_a_stage_transition_and_dropout():
    """Momentum blocks between non-invertible units; Dropout masks replayed in the recompute."""
    def sequence(use_custom_gradient):
        units = [tf_revnet.Stem(8, dtype="float64"), *blocks(2, 0.8, dropout=True),
                 tf_revnet.StageTransition(16, strides=2, dtype="float64"),
                 *blocks(2, 0.8, dropout=True, half=8)]
        return tf_revnet.ReversibleSequence(units, use_custom_gradient=use_custom_gradient,
                                            dtype="float64")

    reversible, plain = sequence(True), sequence(False)
    reversible.build((2, 8, 8, 3))
    plain.build((2, 8, 8, 3))
    copy_state(reversible, plain)
    x = random_input((2, 8, 8, 3))
    _, grads_r = loss_and_gradients(reversible, x)
    _, grads_p = loss_and_gradients(plain, x)
    assert_all_close_relative(grads_r, grads_p, RTOL["float64"], what="gradient")


def test_batchnorm_statistics_updated_once():
    reversible, plain = make_pair()
    x = random_input()
    before = [v.numpy().copy() for v in reversible.non_trainable_variables]
    loss_and_gradients(reversible, x, mode="function")
    loss_and_gradients(plain, x, mode="function")
    moving = [v for v in reversible.non_trainable_variables if "moving" in v.path]
    assert len(moving) == 3 * 2 * 2  # blocks x BatchNorms x (mean, variance)
    changed = 0
    for v_r, v_p, b in zip(reversible.non_trainable_variables, plain.non_trainable_variables,
                           before):
        np.testing.assert_allclose(v_r.numpy(), v_p.numpy(), rtol=1e-12, atol=1e-14)
        changed += not np.array_equal(v_r.numpy(), b)
    assert changed == len(moving)


def test_sequence_inverse_and_diagnostics():
    sequence, _ = make_pair(n=4, gamma=0.7)
    x = random_input()
    y = sequence(x, training=True)
    np.testing.assert_allclose(sequence.inverse(y, training=True).numpy(), x.numpy(), atol=1e-11)
    report = tf_revnet.diagnostics.reconstruction_error(sequence, x)
    assert len(report.blocks) == 4 and report.max_relative_error < 1e-13


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_float32_rebuild_error_within_the_documented_bound(gamma):
    """float32 rebuild of 12 blocks against the float64 forward inputs: within `rebuild_error_bound`."""
    depth, shape = 12, (4, 8)

    def dense_blocks(dtype):
        keras.utils.set_random_seed(3)
        return [tf_revnet.MomentumBlock(keras.layers.Dense(4, activation="tanh", dtype=dtype),
                                        gamma=gamma, dtype=dtype) for _ in range(depth)]

    seq64 = tf_revnet.ReversibleSequence(dense_blocks("float64"), dtype="float64")
    seq32 = tf_revnet.ReversibleSequence(dense_blocks("float32"), dtype="float32")
    seq64.build(shape)
    seq32.build(shape)
    seq32.set_weights([w.astype("float32") for w in seq64.get_weights()])
    x = random_input(shape, "float32", seed=5)
    y32 = seq32(x, training=True)
    rebuilt = seq32.inverse(y32, training=True)
    y64 = seq64(tf.cast(x, "float64"), training=True)
    stream = float(tf.reduce_max(tf.abs(y64)))
    error = float(tf.reduce_max(tf.abs(tf.cast(rebuilt, "float64") - tf.cast(x, "float64"))))
    bound = momentum.rebuild_error_bound(gamma, depth, "float32")
    assert error / stream <= bound, (error / stream, bound)
    # float64 rebuilds are exact to float64 rounding.
    rebuilt64 = seq64.inverse(y64, training=True)
    assert float(tf.reduce_max(tf.abs(rebuilt64 - tf.cast(x, "float64")))) / stream <= (
        momentum.rebuild_error_bound(gamma, depth, "float64"))


def test_rebuild_error_bound_grows_like_gamma_to_the_minus_depth():
    assert momentum.rebuild_error_bound(1.0, 10) == pytest.approx(2 * 10 * 2**-24 * 11)
    ratio = momentum.rebuild_error_bound(0.5, 21) / momentum.rebuild_error_bound(0.5, 20)
    assert ratio == pytest.approx(2 * 21 / 20, rel=1e-3)
    assert momentum.rebuild_error_bound(0.9, 10, "float64") < 1e-13
    with pytest.raises(ValueError, match="`depth` must be a positive int"):
        momentum.rebuild_error_bound(0.9, 0)


def test_config_round_trip_keeps_gamma():
    (block,) = blocks(1, gamma=0.75)
    clone = tf_revnet.MomentumBlock.from_config(block.get_config())
    assert clone.gamma == 0.75 and isinstance(clone.f, tf_revnet.BasicResidualFunction)
