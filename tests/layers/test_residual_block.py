"""Tests of tf_revnet/layers/residual_block.py."""

import keras
import numpy as np
import pytest

from tests.test_case import check_layer
from tf_revnet.layers import BasicResidualFunction, ResidualBlock, ReversibleBlock, StageTransition


def zero_last_convolutions(block):
    """Zeroes the last convolution of F (and G): the block then returns its shortcut."""
    for function in [block.f] + ([block.g] if isinstance(block, StageTransition) else []):
        function.convs[-1].kernel.assign(np.zeros(function.convs[-1].kernel.shape))


def avg_pool2(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def basic_params(c_in, c_out, preactivate=True):
    """Two 3x3 convolutions without bias, BatchNorm with gamma, beta and moving statistics."""
    return (4 * c_in if preactivate else 0) + 9 * c_in * c_out + 4 * c_out + 9 * c_out * c_out


@pytest.mark.parametrize(
    "cls, kwargs, input_shape, output_shape, params",
    [
        (ResidualBlock, {"filters": 8}, (None, 6, 6, 8), (None, 6, 6, 8), basic_params(8, 8)),
        (
            ResidualBlock, {"filters": 16, "strides": 2}, (None, 6, 6, 8), (None, 3, 3, 16),
            basic_params(8, 16),
        ),
        (
            StageTransition,
            {"filters": 16, "strides": 2},
            (None, 6, 6, 8),
            (None, 3, 3, 16),
            basic_params(4, 8) + basic_params(8, 8),
        ),
        (
            ResidualBlock,
            {"filters": 16, "residual_function": "bottleneck", "preactivate": False},
            (None, 4, 4, 8),
            (None, 4, 4, 16),
            # 1x1 (8->4), BN(4), 3x3 (4->4), BN(4), 1x1 (4->16), projection 1x1 (8->16).
            8 * 4 + 16 + 9 * 4 * 4 + 16 + 4 * 16 + 8 * 16,
        ),
        (
            StageTransition,
            {"filters": 32, "residual_function": "bottleneck", "strides": 2},
            (None, 4, 4, 8),
            (None, 2, 2, 32),
            # F: BN(4), 1x1 (4->4), BN(4), 3x3, BN(4), 1x1 (4->16); G on 16: BN(16), 1x1 (16->4),
            # BN(4), 3x3, BN(4), 1x1 (4->16); projections 1x1 (4->16) on x1 and on x2.
            (16 + 16 + 16 + 144 + 16 + 64) + (64 + 64 + 16 + 144 + 16 + 64) + 2 * 64,
        ),
    ],
)
def test_layer_contract_and_parameter_count(
    cls, kwargs, input_shape, output_shape, params, tmp_path
):
    block = cls(**kwargs)
    check_layer(block, input_shape, output_shape, tmp_path=tmp_path)
    assert block.count_params() == params
    assert block.compute_output_shape(input_shape) == output_shape


def test_pad_shortcut_values():
    """Basic transition: shortcut = 2x2 average pooling, channels zero-padded on both sides."""
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 4))
    block = ResidualBlock(8, strides=2, dtype="float64")
    block.build(x.shape)
    zero_last_convolutions(block)
    y = keras.ops.convert_to_numpy(block(x, training=True))
    expected = np.pad(avg_pool2(x), [(0, 0), (0, 0), (0, 0), (2, 2)])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_projection_shortcut_values():
    """Bottleneck transition: shortcut = strided 1x1 convolution (no bias)."""
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4))
    block = ResidualBlock(8, "bottleneck", strides=2, dtype="float64")
    block.build(x.shape)
    zero_last_convolutions(block)
    y = keras.ops.convert_to_numpy(block(x, training=True))
    kernel = keras.ops.convert_to_numpy(block.shortcut_layer.conv.kernel)[0, 0]
    np.testing.assert_allclose(y, x[:, ::2, ::2, :] @ kernel, rtol=1e-12, atol=1e-12)


def test_split_shortcut_values():
    """Two-stream transition: each half has its own shortcut; y = concat(P(x1), P(x2)) + ..."""
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 8))
    block = StageTransition(16, strides=2, dtype="float64")
    block.build(x.shape)
    zero_last_convolutions(block)
    y = keras.ops.convert_to_numpy(block(x, training=True))
    pooled = avg_pool2(x)
    pad = [(0, 0), (0, 0), (0, 0), (2, 2)]
    expected = np.concatenate([np.pad(pooled[..., :4], pad), np.pad(pooled[..., 4:], pad)], -1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_split_without_change_equals_reversible_block():
    """With stride 1 and equal channels the two-stream unit computes a reversible block (Eq. 1)."""
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 8))
    block = StageTransition(8, dtype="float64")
    block.build(x.shape)
    reversible = ReversibleBlock(
        BasicResidualFunction(dtype="float64"),
        BasicResidualFunction(dtype="float64"),
        dtype="float64",
    )
    reversible.build(x.shape)
    reversible.set_weights(block.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(block(x, training=True)),
        keras.ops.convert_to_numpy(reversible(x, training=True)),
        rtol=1e-12,
        atol=1e-12,
    )


def test_identity_shortcut_has_no_layer():
    block = ResidualBlock(8)
    block.build((None, 4, 4, 8))
    assert block.shortcut_layer is None
    assert block.count_params() == basic_params(8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filters": 0}, "`filters` must be a positive integer.*filters=0"),
        ({"filters": 8, "residual_function": "wide"}, "`residual_function`.*'wide'"),
        ({"filters": 8, "shortcut": "conv"}, "`shortcut`.*'conv'"),
        ({"filters": 8, "strides": -1}, "strides=-1"),
        ({"filters": 8, "batch_norm_momentum": -0.1}, "batch_norm_momentum=-0.1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualBlock(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filters": 9}, "`filters` must be even.*filters=9"),
        ({"filters": 8, "preactivate": 1}, "`preactivate` must be a bool"),
        ({"filters": 8, "residual_function": "wide"}, "`residual_function`.*'wide'"),
    ],
)
def test_stage_transition_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageTransition(**kwargs)


def test_stage_transition_odd_input_channels_raise():
    with pytest.raises(ValueError, match="input channels of a StageTransition must be known and even"):
        StageTransition(8).build((None, 4, 4, 5))


def test_pad_shortcut_cannot_drop_channels():
    with pytest.raises(ValueError, match="cannot reduce the channels"):
        ResidualBlock(4, shortcut="pad").build((None, 4, 4, 8))
    block = ResidualBlock(4, shortcut="projection")
    assert tuple(block(np.zeros((1, 4, 4, 8), "float32")).shape) == (1, 4, 4, 4)
