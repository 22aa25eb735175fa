"""Tests of tf_revnet/layers/reversible_block.py (Eq. 1-2), coupling.py and invertibility.py."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_case import check_layer, relative_error
from tf_revnet.layers import (
    BasicResidualFunction,
    BottleneckResidualFunction,
    ReversibleBlock,
    is_invertible,
)


def conv_function(filters, dtype="float64"):
    """A small shape-preserving residual function: BN-ReLU-Conv3x3."""
    return keras.Sequential(
        [
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.ReLU(dtype=dtype),
            keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype),
        ]
    )


def make_block(kind, half, coupling="additive", dtype="float64"):
    size = half if coupling == "additive" else 2 * half
    if kind == "basic":
        f, g = (BasicResidualFunction(size, dtype=dtype) for _ in range(2))
    elif kind == "bottleneck":
        f, g = (BottleneckResidualFunction(size, dtype=dtype) for _ in range(2))
    else:
        f, g = conv_function(size, dtype), conv_function(size, dtype)
    return ReversibleBlock(f, g, coupling=coupling, dtype=dtype)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("training", [True, False])
def test_inverse_recovers_inputs_float64(kind, coupling, training):
    block = make_block(kind, 8, coupling)
    x = tf.constant(np.random.default_rng(1).standard_normal((3, 6, 6, 16)))
    y = block(x, training=training)
    assert relative_error(y, x) > 1e-3  # the block does something
    x_rebuilt = block.inverse(y, training=training)
    assert relative_error(x_rebuilt, x) <= 1e-12


def test_forward_matches_equation_1():
    """y1 = x1 + F(x2), y2 = x2 + G(y1), computed independently with the same F and G."""
    block = make_block("conv", 4)
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 8))
    y = keras.ops.convert_to_numpy(block(x, training=False))
    x1, x2 = x[..., :4], x[..., 4:]
    y1 = x1 + keras.ops.convert_to_numpy(block.f(x2, training=False))
    y2 = x2 + keras.ops.convert_to_numpy(block.g(y1, training=False))
    np.testing.assert_allclose(y, np.concatenate([y1, y2], axis=-1), rtol=1e-13, atol=1e-13)


def test_affine_coupling_matches_real_nvp_formula():
    """y1 = x1 * exp(s) + t with s = 2 tanh(r / 2), where (r, t) = F(x2)."""
    block = make_block("conv", 4, coupling="affine")
    x = np.random.default_rng(3).standard_normal((2, 5, 5, 8))
    y = keras.ops.convert_to_numpy(block(x, training=False))
    x1, x2 = x[..., :4], x[..., 4:]
    h = keras.ops.convert_to_numpy(block.f(x2, training=False))
    s = 2.0 * np.tanh(h[..., :4] / 2.0)  # soft-clamped log-scale
    y1 = x1 * np.exp(s) + h[..., 4:]
    np.testing.assert_allclose(y[..., :4], y1, rtol=1e-12, atol=1e-12)


def test_inverse_has_no_side_effects():
    block = make_block("basic", 4)
    x = tf.constant(np.random.default_rng(4).standard_normal((4, 4, 4, 8)))
    y = block(x, training=True)
    before = [v.numpy().copy() for v in block.non_trainable_variables]
    block.inverse(y, training=True)
    after = [v.numpy() for v in block.non_trainable_variables]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_sequence_axis_for_n_t_c_inputs():
    """A reversible Transformer-style block on (N, T, C): attention as F, an MLP as G (Reformer)."""

    class SelfAttention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attention = keras.layers.MultiHeadAttention(2, 4, dtype=self.dtype_policy)

        def build(self, input_shape):
            self.attention.build(input_shape, input_shape)

        def call(self, x):
            return self.attention(x, x)

    mlp = keras.Sequential(
        [keras.layers.Dense(16, activation="relu", dtype="float64"),
         keras.layers.Dense(8, dtype="float64")]
    )
    block = ReversibleBlock(SelfAttention(dtype="float64"), mlp, axis=-1, dtype="float64")
    x = tf.constant(np.random.default_rng(5).standard_normal((2, 7, 16)))
    y = block(x)
    assert y.shape == (2, 7, 16)
    assert relative_error(block.inverse(y), x) <= 1e-12


def test_split_on_another_axis():
    f = keras.layers.Dense(5, dtype="float64")
    g = keras.layers.Dense(5, dtype="float64")
    # Split the time axis (size 6) of (N, T, C) with C = 5.
    block = ReversibleBlock(f, g, axis=1, dtype="float64")
    x = tf.constant(np.random.default_rng(6).standard_normal((2, 6, 5)))
    y = block(x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y[:, :3]),
        keras.ops.convert_to_numpy(x[:, :3] + f(x[:, 3:])),
        rtol=1e-12,
    )
    assert relative_error(block.inverse(y), x) <= 1e-12


def test_is_invertible():
    assert is_invertible(make_block("basic", 4), (None, 4, 4, 8), atol=1e-10)

    class NotInvertible(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

        def inverse(self, y, training=None):
            return y  # wrong on purpose

    assert not is_invertible(NotInvertible(), (None, 3), atol=1e-3)
    with pytest.raises(ValueError, match="`layer` must have an `inverse"):
        is_invertible(keras.layers.Dense(2), (None, 3))


def test_layer_contract(tmp_path):
    block = make_block("basic", 4, dtype="float32")
    # Two BasicResidualFunctions, each 2 convolutions (kernel + bias?) and 2 BatchNorms (gamma, beta).
    model = check_layer(block, (None, 6, 6, 8), tmp_path=tmp_path)
    assert len(block.trainable_weights) == len(block.f.trainable_weights) * 2
    assert model.count_params() > 0


def test_mixed_precision_keeps_residual_stream_float32():
    f = BasicResidualFunction(4, dtype="mixed_bfloat16")
    g = BasicResidualFunction(4, dtype="mixed_bfloat16")
    block = ReversibleBlock(f, g, dtype="mixed_bfloat16")
    x = keras.random.normal((2, 4, 4, 8))
    y = block(x, training=True)
    assert y.dtype == tf.float32
    assert keras.backend.standardize_dtype(f(x[..., :4]).dtype) == "bfloat16"
    symbolic = block(keras.Input((4, 4, 8)))
    assert symbolic.dtype == "float32"


# --- bad input ----------------------------------------------------------------------------------


def test_odd_channels_raise():
    block = make_block("basic", 4)
    with pytest.raises(ValueError, match=r"must be known and even.*input_shape=\(None, 4, 4, 7\)"):
        block.build((None, 4, 4, 7))


def test_strided_residual_function_raises():
    f = BasicResidualFunction(4, strides=2)
    block = ReversibleBlock(f, BasicResidualFunction(4))
    with pytest.raises(ValueError, match=r"Residual function F .*cannot change the shape"):
        block.build((None, 8, 8, 8))


@pytest.mark.parametrize("kwargs", [{"strides": 2}, {"filters": 32}, {"strides": (2, 2)}])
def test_stride_or_filters_of_the_block_raise_naming_stage_transition(kwargs):
    [(name, value)] = kwargs.items()
    with pytest.raises(ValueError, match=rf"`{name}` is not an argument of ReversibleBlock.*"
                                         rf"Received: {re.escape(f'{name}={value!r}')}.*StageTransition"):
        ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4), **kwargs)


def test_channel_changing_residual_function_raises():
    block = ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(6))
    with pytest.raises(ValueError, match=r"Residual function G"):
        block.build((None, 8, 8, 8))


@pytest.mark.parametrize("arg", ["f", "g"])
def test_non_layer_residual_function_raises(arg):
    kwargs = {"f": BasicResidualFunction(4), "g": BasicResidualFunction(4)}
    kwargs[arg] = lambda x: x
    with pytest.raises(ValueError, match=f"`{arg}` must be a keras.layers.Layer"):
        ReversibleBlock(**kwargs)


def test_unknown_coupling_raises():
    with pytest.raises(ValueError, match="`coupling` must be one of"):
        ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4), coupling="multiplicative")


def test_rank_too_small_raises():
    block = ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2))
    with pytest.raises(ValueError, match="rank >= 2"):
        block.build((4,))


def test_rank_mismatch_on_call_raises():
    block = make_block("basic", 4, dtype="float32")
    block(keras.random.normal((2, 4, 4, 8)))
    with pytest.raises(ValueError, match="expected ndim=4, found ndim=3"):
        block(keras.random.normal((2, 4, 8)))


def test_integer_inputs_raise():
    block = make_block("basic", 4, dtype="float32")
    block.build((None, 4, 4, 8))
    with pytest.raises(ValueError, match="floating point inputs. Received: dtype=int32"):
        block(tf.zeros((2, 4, 4, 8), tf.int32))


def test_integer_dtype_policy_raises():
    with pytest.raises(ValueError, match="floating point dtype policy"):
        ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2), dtype="int32")


def test_affine_inverse_exact_with_large_residual_outputs():
    """Regression: an unclamped exp(s) with |s| ~ 100 erased x1 (relative error > 10 in float64)."""
    big = keras.initializers.Constant(10.0)
    f = keras.layers.Conv2D(8, 1, kernel_initializer=big, dtype="float64")
    g = keras.layers.Conv2D(8, 1, kernel_initializer=big, dtype="float64")
    block = ReversibleBlock(f, g, coupling="affine", dtype="float64")
    x = tf.constant(np.random.default_rng(7).standard_normal((2, 3, 3, 8)))
    y = block(x)
    assert np.max(np.abs(keras.ops.convert_to_numpy(f(x[..., 4:])))) > 20  # raw scales far beyond 2
    # Unclamped this was NaN. The shifts t reach ~100x |x|, so rounding of t bounds the error (~1e-11).
    assert relative_error(block.inverse(y), x) <= 1e-9
