"""Tests of tf_revnet/layers/residual_functions.py."""

import doctest
import importlib

import keras
import numpy as np
import pytest

from tests.test_case import check_layer
from tf_revnet.layers import BasicResidualFunction, BottleneckResidualFunction


def bn_params(channels):
    """gamma, beta, moving mean, moving variance."""
    return 4 * channels


@pytest.mark.parametrize(
    "kwargs, input_shape, output_shape, params",
    [
        # F/G of a reversible block: shape kept; BN(8)-conv3x3(8->8), BN(8)-conv3x3(8->8).
        ({}, (None, 6, 6, 8), (None, 6, 6, 8), 2 * (bn_params(8) + 9 * 8 * 8)),
        # Transition branch: stride 2, 8 -> 16 channels, odd spatial size rounds up.
        (
            {"filters": 16, "strides": 2},
            (None, 7, 6, 8),
            (None, 4, 3, 16),
            bn_params(8) + 9 * 8 * 16 + bn_params(16) + 9 * 16 * 16,
        ),
        # First unit after the stem: no BN-ReLU before the first convolution.
        ({"preactivate": False}, (None, 5, 5, 4), (None, 5, 5, 4), 9 * 16 + bn_params(4) + 9 * 16),
    ],
)
def test_basic(kwargs, input_shape, output_shape, params, tmp_path):
    layer = BasicResidualFunction(**kwargs)
    check_layer(layer, input_shape, output_shape, tmp_path=tmp_path)
    assert layer.count_params() == params
    assert layer.compute_output_shape(input_shape) == output_shape
    names = [w.path.split("/", 1)[1] for w in layer.trainable_weights]
    expected_bn1 = ["bn1/gamma", "bn1/beta"] if kwargs.get("preactivate", True) else []
    assert names == expected_bn1 + ["conv1/kernel", "bn2/gamma", "bn2/beta", "conv2/kernel"]


@pytest.mark.parametrize(
    "kwargs, input_shape, output_shape, params",
    [
        # Inner width 16 // 4 = 4: BN(16)-1x1(16->4), BN(4)-3x3(4->4), BN(4)-1x1(4->16).
        (
            {},
            (None, 6, 6, 16),
            (None, 6, 6, 16),
            bn_params(16) + 16 * 4 + bn_params(4) + 9 * 4 * 4 + bn_params(4) + 4 * 16,
        ),
        # Transition: 8 -> 32 channels with stride 2, inner width 8.
        (
            {"filters": 32, "strides": 2, "preactivate": False},
            (None, 8, 8, 8),
            (None, 4, 4, 32),
            8 * 8 + bn_params(8) + 9 * 8 * 8 + bn_params(8) + 8 * 32,
        ),
    ],
)
def test_bottleneck(kwargs, input_shape, output_shape, params, tmp_path):
    layer = BottleneckResidualFunction(**kwargs)
    check_layer(layer, input_shape, output_shape, tmp_path=tmp_path)
    assert layer.count_params() == params
    kernels = [w for w in layer.trainable_weights if w.path.endswith("kernel")]
    assert [tuple(k.shape[:2]) for k in kernels] == [(1, 1), (3, 3), (1, 1)]


def test_values_match_manual_composition():
    """Training-mode output equals conv2(relu(bn(conv1(relu(bn(x)))))) computed by hand."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 4, 2))
    layer = BasicResidualFunction(filters=2, dtype="float64", batch_norm_epsilon=1e-3)
    layer.build(x.shape)
    for w in layer.trainable_weights:
        w.assign(rng.standard_normal(w.shape))
    y = keras.ops.convert_to_numpy(layer(x, training=True))

    def bn(h, gamma, beta):
        mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
        return gamma * (h - mean) / np.sqrt(var + 1e-3) + beta

    def conv3x3(h, kernel):
        padded = np.pad(h, [(0, 0), (1, 1), (1, 1), (0, 0)])
        out = np.zeros(h.shape[:3] + (kernel.shape[-1],))
        for i in range(3):
            for j in range(3):
                out += padded[:, i : i + h.shape[1], j : j + h.shape[2], :] @ kernel[i, j]
        return out

    w = {v.path.split("/", 1)[1]: keras.ops.convert_to_numpy(v) for v in layer.weights}
    h = conv3x3(np.maximum(bn(x, w["bn1/gamma"], w["bn1/beta"]), 0), w["conv1/kernel"])
    h = conv3x3(np.maximum(bn(h, w["bn2/gamma"], w["bn2/beta"]), 0), w["conv2/kernel"])
    np.testing.assert_allclose(y, h, rtol=1e-10, atol=1e-10)


def test_unknown_spatial_size():
    layer = BasicResidualFunction(filters=8, strides=2)
    assert layer.compute_output_shape((None, None, 9, 4)) == (None, None, 5, 8)
    y = layer(np.zeros((1, 9, 5, 4), "float32"))
    assert tuple(y.shape) == (1, 5, 3, 8)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (BasicResidualFunction, {"filters": 0}, "`filters` must be a positive integer.*filters=0"),
        (BasicResidualFunction, {"filters": 2.5}, "filters=2.5"),
        (BasicResidualFunction, {"strides": 0}, "`strides`.*strides=0"),
        (BasicResidualFunction, {"preactivate": "no"}, "`preactivate`.*preactivate='no'"),
        (BasicResidualFunction, {"batch_norm_momentum": 1.5}, "batch_norm_momentum=1.5"),
        (BasicResidualFunction, {"batch_norm_epsilon": 0.0}, "batch_norm_epsilon=0.0"),
        (BottleneckResidualFunction, {"filters": 6}, "divisible by 4.*filters=6"),
    ],
)
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bottleneck_needs_channels_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        BottleneckResidualFunction().build((None, 4, 4, 6))


def test_unknown_channels_raise():
    with pytest.raises(ValueError, match="channel dimension.*must be known"):
        BasicResidualFunction().build((None, 4, 4, None))


@pytest.mark.parametrize("module", [
    "tf_revnet.layers.residual_functions", "tf_revnet.layers.residual_block",
    "tf_revnet.layers.reversible_block", "tf_revnet.layers.reversible_block_stack",
    "tf_revnet.layers.reversible_sequence", "tf_revnet.layers.stage_transition",
    "tf_revnet.memory", "tf_revnet.diagnostics",
])
def test_docstring_examples(module):
    import tf_revnet

    module = importlib.import_module(module)
    results = doctest.testmod(module, extraglobs={"keras": keras, "tf_revnet": tf_revnet,
                                                  **vars(module)})
    assert results.attempted > 0
    assert results.failed == 0
