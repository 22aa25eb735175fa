"""Tests of `tf_revnet.diagnostics`: reconstruction error and gradient angle.

References are computed independently: by hand in NumPy for blocks whose F and G are 1x1 Dense layers
with fixed weights (one multiply per value, so NumPy and TensorFlow round identically), and with
separate tapes for the gradients.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tf_revnet import diagnostics
from tf_revnet.layers import (
    BasicResidualFunction,
    ReversibleBlock,
    ReversibleSequence,
)


def _dense(weight, dtype=None):
    """A 1 -> 1 Dense layer computing `weight * h` (no bias)."""
    return keras.layers.Dense(
        1, use_bias=False, kernel_initializer=keras.initializers.Constant(weight), dtype=dtype
    )


def _dense_sequence(weights, dtype="float32"):
    """A `ReversibleSequence` of blocks with F(h) = wf * h, G(h) = wg * h, on inputs `(N, 2)`."""
    blocks = [ReversibleBlock(_dense(wf, dtype), _dense(wg, dtype), dtype=dtype)
              for wf, wg in weights]
    sequence = ReversibleSequence(blocks, dtype=dtype)
    sequence.build((None, 2))
    return sequence


def _numpy_reference(weights, x, dtype):
    """Hand-computed per-block `(relative, max abs, local relative, local max abs)` errors.

    Forward: y1 = x1 + wf*x2, y2 = x2 + wg*y1 in `dtype`; rebuild x2 = y2 - wg*y1, x1 = y1 - wf*x2, from
    the rebuilt output of the block above (chained) and from the exact output (local).
    """
    weights = [(dtype(wf), dtype(wg)) for wf, wg in weights]
    x1, x2 = x[:, :1].astype(dtype), x[:, 1:].astype(dtype)
    inputs = []
    for wf, wg in weights:
        inputs.append((x1, x2))
        x1 = x1 + wf * x2
        x2 = x2 + wg * x1
    outputs = inputs[1:] + [(x1, x2)]

    def rebuild(y1, y2, wf, wg):
        r2 = y2 - wg * y1
        return y1 - wf * r2, r2

    def errors(rebuilt, reference):
        a = np.concatenate([t.astype(np.float64).ravel() for t in rebuilt])
        b = np.concatenate([t.astype(np.float64).ravel() for t in reference])
        return np.linalg.norm(a - b) / np.linalg.norm(b), np.max(np.abs(a - b))

    result = [None] * len(weights)
    y1, y2 = x1, x2
    for k in reversed(range(len(weights))):
        y1, y2 = rebuild(y1, y2, *weights[k])
        local = rebuild(*outputs[k], *weights[k])
        result[k] = errors((y1, y2), inputs[k]) + errors(local, inputs[k])
    return result


# Weights with large cancellations: F and G outputs are 100-1000x the halves they are added to.
WEIGHTS = [(1000.1, -0.37), (3.3, 700.7), (-123.45, 0.011)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reconstruction_error_matches_hand_computed_values(dtype):
    x = np.random.default_rng(0).standard_normal((16, 2)) * np.array([1e-3, 1.0])
    sequence = _dense_sequence(WEIGHTS, dtype)
    report = diagnostics.reconstruction_error(sequence, x.astype(dtype))
    # The kernels as stored (Constant rounds its value through float32 first).
    kernels = [(b.f.kernel.numpy().item(), b.g.kernel.numpy().item()) for b in sequence.blocks]
    expected = _numpy_reference(kernels, x, np.dtype(dtype).type)
    assert [b.name for b in report.blocks] == [b.name for b in sequence.blocks]
    assert [b.index for b in report.blocks] == [0, 1, 2]
    assert all(b.sequence == sequence.name for b in report.blocks)
    for block, (rel, max_abs, local_rel, local_max) in zip(report.blocks, expected):
        np.testing.assert_allclose(
            [block.relative_error, block.max_abs_error, block.local_relative_error,
             block.local_max_abs_error],
            [rel, max_abs, local_rel, local_max], rtol=1e-12, atol=0,
        )
        assert block.finite
    # Rounding does occur here: the figures are not trivially zero.
    assert report.max_relative_error > (1e-9 if dtype == "float32" else 1e-18)
    assert report.max_relative_error == max(b.relative_error for b in report.blocks)


def test_reconstruction_error_is_zero_for_exact_float64_arithmetic():
    # Dyadic weights and inputs on a 2^-10 grid: every sum and product is exact in float64.
    weights = [(0.5, -0.25), (2.0, 0.125)]
    x = np.random.default_rng(1).integers(-1024, 1024, (8, 2)) / 1024.0
    report = diagnostics.reconstruction_error(_dense_sequence(weights, "float64"), x)
    assert [b.relative_error for b in report.blocks] == [0.0, 0.0]
    assert [b.max_abs_error for b in report.blocks] == [0.0, 0.0]


def test_reconstruction_error_of_a_single_block():
    block = ReversibleBlock(_dense(1000.1), _dense(-0.37))
    x = (np.random.default_rng(2).standard_normal((16, 2)) * [1e-3, 1.0]).astype("float32")
    report = diagnostics.reconstruction_error(block, x)
    (rel, max_abs, local_rel, local_max), = _numpy_reference([(1000.1, -0.37)], x, np.float32)
    (result,) = report.blocks
    assert result.sequence is None and result.name == block.name
    np.testing.assert_allclose([result.relative_error, result.max_abs_error], [rel, max_abs],
                               rtol=1e-12)
    assert (result.local_relative_error, result.local_max_abs_error) == (
        result.relative_error, result.max_abs_error)


def _state(layer):
    return [np.array(v.numpy()) for v in layer.non_trainable_variables]


def _bn_dropout_model():
    """RevNet-like model whose F and G hold BatchNorm and Dropout (seed-generator state)."""
    def residual():
        return keras.Sequential([
            keras.layers.BatchNormalization(), keras.layers.Dropout(0.3), keras.layers.Dense(4),
        ])

    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = ReversibleSequence([ReversibleBlock(residual(), residual()) for _ in range(3)],
                           name="stack")(h)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


def test_diagnostics_have_no_side_effects_and_replay_dropout():
    model = _bn_dropout_model()
    x = np.random.default_rng(3).standard_normal((8, 6, 6, 3)).astype("float32") * 3 + 1
    y = np.arange(8) % 3
    before = _state(model)
    assert any(v.dtype == "float32" for v in before) and any(v.dtype != "float32" for v in before)
    report = diagnostics.reconstruction_error(model, x)
    angle = diagnostics.gradient_angle(model, x, y, "sparse_categorical_crossentropy")
    after = _state(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # BN statistics, seed states
    assert model.get_layer("stack").use_custom_gradient is True
    # Dropout draws the forward pass's masks when rebuilding: an unreplayed mask would give O(1) errors.
    assert len(report.blocks) == 3 and report.max_relative_error < 1e-5
    # Same masks in the reversible and the reference pass: same loss, tiny angle.
    assert angle.loss == pytest.approx(angle.reference_loss, rel=1e-6)
    assert angle.degrees < 0.01


def test_reconstruction_error_of_a_model_matches_each_sequence_on_its_input():
    model = tf_revnet.models.RevNet(units=[1, 2], widths=[8, 8, 16], input_shape=(12, 12, 3))
    x = np.random.default_rng(4).random((4, 12, 12, 3)).astype("float32")
    report = diagnostics.reconstruction_error(model, x)
    sequences = [layer for layer in model.layers if isinstance(layer, ReversibleSequence)]
    # Only reversible blocks are rebuilt (the stem and transitions are recomputed from their inputs).
    assert [b.name for b in report.blocks] == [
        u.name for s in sequences for u in s.units if isinstance(u, ReversibleBlock)
    ]
    # Independent route to each sequence's input: a functional feature extractor.
    extractor = keras.Model(model.inputs, [s.input for s in sequences])
    with keras.StatelessScope():
        features = extractor(x, training=True)
    if not isinstance(features, (list, tuple)):  # one sequence (the RevNet's body): one output
        features = [features]
    expected = []
    for sequence, feature in zip(sequences, features):
        expected.extend(diagnostics.reconstruction_error(sequence, feature).blocks)
    assert report.blocks == tuple(expected)
    assert 0 < report.max_relative_error < 1e-5 and report.finite
    # A model nested in another (as training.train wraps the backbone) is searched too.
    outer_inputs = keras.Input((12, 12, 3))
    outer = keras.Model(outer_inputs, model(keras.layers.Rescaling(1.0)(outer_inputs)))
    assert diagnostics.reconstruction_error(outer, x).blocks == report.blocks


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1.0, 0.0], [1.0, 1.0], 45.0),
        ([1.0, 0.0], [-1.0, 0.0], 180.0),
        ([3.0, 0.0, 0.0], [0.0, 0.0, 2.0], 90.0),
        ([1.0, 0.0], [1.0, 1e-10], math.degrees(1e-10)),  # acos(cos) would return 0 here
        ([1e-300, 0.0], [1e-300, 1e-310], math.degrees(1e-10)),  # no underflow of the norms
        ([1e300, 0.0], [1e300, 1e290], math.degrees(1e-10)),  # no overflow
        ([0.0, 0.0], [0.0, 0.0], 0.0),
    ],
)
def test_angle_degrees(a, b, expected):
    assert diagnostics.angle_degrees(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("a, b", [([0.0, 0.0], [1.0, 0.0]), ([np.nan, 1.0], [1.0, 1.0]),
                                  ([np.inf, 1.0], [1.0, 1.0])])
def test_angle_degrees_undefined_is_nan(a, b):
    assert math.isnan(diagnostics.angle_degrees(a, b))


def test_angle_degrees_rejects_different_sizes():
    with pytest.raises(ValueError, match="same number of elements"):
        diagnostics.angle_degrees([1.0, 2.0], [1.0])


def _tiny_revnet(**kwargs):
    return tf_revnet.models.RevNet(units=[1, 2], widths=[8, 8, 16], input_shape=(12, 12, 3),
                                   **kwargs)


def test_gradient_angle_against_independent_tapes():
    model = _tiny_revnet()
    x = np.random.default_rng(5).random((4, 12, 12, 3)).astype("float32")
    y = np.array([0, 3, 5, 9])
    result = diagnostics.gradient_angle(model, x, y, "sparse_categorical_crossentropy")
    # The reference: the same architecture built with use_custom_gradient=False, same weights.
    plain = _tiny_revnet(use_custom_gradient=False)
    plain.set_weights(model.get_weights())
    grads = {}
    for name, net in (("reversible", model), ("plain", plain)):
        with keras.StatelessScope(), tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, net(x, training=True)))
        grads[name] = [g.numpy().astype(np.float64) for g in
                       tape.gradient(loss, net.trainable_variables)]
    a = np.concatenate([g.ravel() for g in grads["reversible"]])
    b = np.concatenate([g.ravel() for g in grads["plain"]])
    unit = a / np.linalg.norm(a) - b / np.linalg.norm(b)
    expected = math.degrees(2 * math.asin(np.linalg.norm(unit) / 2))  # chord length -> angle
    assert result.degrees == pytest.approx(expected, rel=1e-6)
    assert 0 < result.degrees < 0.01  # float32, training mode: the target
    assert result.relative_error == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b),
                                                  rel=1e-6)
    assert result.relative_norm_difference == pytest.approx(
        np.linalg.norm(a) / np.linalg.norm(b) - 1, rel=1e-6, abs=1e-12)
    assert list(result.per_variable) == [v.path for v in model.trainable_variables]
    for (path, angle), ga, gb in zip(result.per_variable.items(), grads["reversible"],
                                     grads["plain"]):
        assert angle == pytest.approx(diagnostics.angle_degrees(ga, gb), rel=1e-6, abs=1e-12)
    assert result.per_variable[result.worst_variable] == max(result.per_variable.values())
    # Variables outside the reversible stages get the very same gradient in both passes.
    assert result.per_variable[model.get_layer("revnet_predictions").kernel.path] < 1e-3
    assert result.loss == pytest.approx(result.reference_loss, rel=1e-6) and result.finite


def test_gradient_angle_float64_is_exact():
    keras.config.set_dtype_policy("float64")
    try:
        model = _tiny_revnet()
    finally:
        keras.config.set_dtype_policy("float32")
    x = np.random.default_rng(6).random((4, 12, 12, 3))
    result = diagnostics.gradient_angle(model, x, np.array([1, 2, 3, 4]),
                                        keras.losses.SparseCategoricalCrossentropy())
    assert result.degrees < 1e-9 and abs(result.relative_error) < 1e-12


def test_gradient_angle_uses_the_compiled_loss_and_restores_the_switch():
    model = _tiny_revnet()
    x = np.random.default_rng(7).random((2, 12, 12, 3)).astype("float32")
    with pytest.raises(ValueError, match="not compiled"):
        diagnostics.gradient_angle(model, x, np.array([0, 1]))
    model.compile(loss="sparse_categorical_crossentropy")
    explicit = diagnostics.gradient_angle(model, x, np.array([0, 1]),
                                          "sparse_categorical_crossentropy")
    compiled = diagnostics.gradient_angle(model, x, np.array([0, 1]))
    assert compiled.degrees == explicit.degrees
    switches = [s.use_custom_gradient for s in diagnostics.reversible_layers(model)]
    assert switches == [True]  # the RevNet's one body sequence


def test_bad_inputs_raise_clear_errors():
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no tf_revnet ReversibleSequence"):
        diagnostics.reconstruction_error(dense, np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="no tf_revnet ReversibleSequence"):
        diagnostics.gradient_angle(dense, np.zeros((1, 4), "float32"), np.zeros((1, 2)), "mse")
    with pytest.raises(ValueError, match="layer_or_model"):
        diagnostics.reconstruction_error("model", np.zeros((1, 4)))
    with pytest.raises(ValueError, match="loss_scale"):
        diagnostics.gradient_angle(_tiny_revnet(), np.zeros((1, 12, 12, 3), "float32"),
                                   np.zeros((1,)), "mse", loss_scale=0)


def test_float16_overflow_is_reported_not_silent():
    # F multiplies by 1e3 in float16: activations of 1e3 give 1e6 > 65504, i.e. inf.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((2,))
        h = ReversibleSequence([ReversibleBlock(_dense(1e3), _dense(0.5)) for _ in range(2)])(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(h))
    finally:
        keras.config.set_dtype_policy("float32")
    x = np.full((4, 2), 1e3, dtype="float32")
    report = diagnostics.reconstruction_error(model, x)
    assert not report.finite and report.nonfinite > 0
    assert math.isnan(report.max_relative_error) and math.isnan(report.max_abs_error)
    assert not report.worst().finite
    angle = diagnostics.gradient_angle(model, x, np.zeros((4, 1)), "mse")
    assert not angle.finite and angle.nonfinite > 0 and math.isnan(angle.degrees)
    # Small activations in the same model stay finite (the errors are large: F amplifies by 1e3).
    small = diagnostics.reconstruction_error(model, x * 1e-5)
    assert small.finite and math.isfinite(small.max_relative_error)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_rebuilds_inputs_bit_for_bit(policy):
    keras.config.set_dtype_policy(policy)
    try:
        sequence = ReversibleSequence([
            ReversibleBlock(BasicResidualFunction(), BasicResidualFunction()) for _ in range(4)
        ])
        sequence.build((None, 8, 8, 16))
    finally:
        keras.config.set_dtype_policy("float32")
    x = np.random.default_rng(8).standard_normal((4, 8, 8, 16)).astype("float32")
    report = diagnostics.reconstruction_error(sequence, x)
    assert report.finite
    assert [b.max_abs_error for b in report.blocks] == [0.0] * 4
