"""Tests of tf_revnet/layers/reversible_sequence.py: Algorithm 1 against plain autodiff.

The reference is always ordinary autodiff (`use_custom_gradient=False`) on the same weights and state.
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_case import (
    assert_all_close_relative,
    check_layer,
    copy_state,
    loss_and_gradients,
    relative_error,
)
from tf_revnet.layers import (
    BasicResidualFunction,
    BottleneckResidualFunction,
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
    StageTransition,
    Stem,
)

RTOL = {"float32": 1e-5, "float64": 1e-10}


def residual_function(kind, filters, dtype):
    if kind == "basic":
        return BasicResidualFunction(filters, dtype=dtype)
    if kind == "bottleneck":
        return BottleneckResidualFunction(filters, dtype=dtype)
    if kind == "dropout":
        return keras.Sequential(
            [
                keras.layers.BatchNormalization(dtype=dtype),
                keras.layers.ReLU(dtype=dtype),
                keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype),
                keras.layers.Dropout(0.3, dtype=dtype),
            ]
        )
    if kind == "noise":
        return keras.Sequential(
            [
                keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype),
                keras.layers.GaussianNoise(0.5, dtype=dtype),
                keras.layers.Activation("tanh", dtype=dtype),
            ]
        )
    raise ValueError(kind)


def make_pair(n_blocks=4, half=4, kind="basic", coupling="additive", dtype="float64",
              input_shape=(3, 6, 6, 8)):
    """(reversible, plain) sequences with identical weights, BatchNorm statistics and seed states."""

    def make(use_custom_gradient):
        size = half if coupling == "additive" else 2 * half
        blocks = [
            ReversibleBlock(
                residual_function(kind, size, dtype),
                residual_function(kind, size, dtype),
                coupling=coupling,
                dtype=dtype,
            )
            for _ in range(n_blocks)
        ]
        return ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient, dtype=dtype)

    reversible, plain = make(True), make(False)
    reversible.build(input_shape)
    plain.build(input_shape)
    copy_state(reversible, plain)
    return reversible, plain


def random_input(shape=(3, 6, 6, 8), dtype="float64", seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# --- gradients equal plain autodiff -----------------------------------------------------------


@pytest.mark.parametrize(
    "mode, dtype",
    [
        ("eager", "float32"), ("eager", "float64"), ("function", "float32"),
        ("function", "float64"), ("xla", "float64"),
        pytest.param("xla", "float32", marks=pytest.mark.slow),  # XLA compiles for a minute
    ],
)
def test_gradients_equal_plain_autodiff(mode, dtype):
    reversible, plain = make_pair(dtype=dtype)
    x = random_input(dtype=dtype)
    loss_r, grads_r = loss_and_gradients(reversible, x, mode=mode)
    loss_p, grads_p = loss_and_gradients(plain, x, mode=mode)
    assert len(grads_r) == 1 + len(reversible.trainable_variables) == 1 + 4 * 2 * 6
    assert relative_error(loss_r, loss_p) <= RTOL[dtype]
    assert_all_close_relative(grads_r, grads_p, RTOL[dtype], what="gradient")


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_gradients_per_coupling_and_residual_function(kind, coupling):
    reversible, plain = make_pair(kind=kind, coupling=coupling)
    x = random_input()
    _, grads_r = loss_and_gradients(reversible, x)
    _, grads_p = loss_and_gradients(plain, x)
    assert_all_close_relative(grads_r, grads_p, RTOL["float64"], what="gradient")


def test_batchnorm_statistics_updated_once():
    reversible, plain = make_pair()
    x = random_input()
    before = [v.numpy().copy() for v in reversible.non_trainable_variables]
    loss_and_gradients(reversible, x)
    loss_and_gradients(plain, x)
    moving = [v for v in reversible.non_trainable_variables if "moving" in v.path]
    assert len(moving) == 4 * 2 * 2 * 2  # blocks x (F, G) x BatchNorms x (mean, variance)
    changed = 0
    for v_r, v_p, b in zip(reversible.non_trainable_variables, plain.non_trainable_variables,
                           before):
        np.testing.assert_allclose(v_r.numpy(), v_p.numpy(), rtol=1e-12, atol=1e-14)
        changed += not np.array_equal(v_r.numpy(), b)
    assert changed == len(moving)


@pytest.mark.parametrize(
    "kind,mode",
    [
        ("dropout", "eager"), ("dropout", "function"), ("noise", "function"),
        pytest.param("dropout", "xla", marks=pytest.mark.slow),  # XLA compiles for half a minute
    ],
)
def test_random_layers_replayed_in_recompute(kind, mode):
    """Dropout masks and GaussianNoise draws are the same in the recompute as in the forward pass."""
    reversible, plain = make_pair(kind=kind)
    x = random_input()
    _, grads_r = loss_and_gradients(reversible, x, mode=mode)
    _, grads_p = loss_and_gradients(plain, x, mode=mode)
    assert_all_close_relative(grads_r, grads_p, RTOL["float64"], what="gradient")
    # The seed generators advanced once per forward pass, as in the plain model.
    seeds = [v for v in reversible.non_trainable_variables if "seed" in v.path]
    assert len(seeds) == 8 and all(int(np.max(v.numpy())) > 0 for v in seeds)
    for v_r, v_p in zip(reversible.non_trainable_variables, plain.non_trainable_variables):
        if "seed" in v_r.path:
            np.testing.assert_array_equal(v_r.numpy(), v_p.numpy())
        else:  # BatchNorm statistics: XLA may fuse the loop's arithmetic differently (1 ulp)
            np.testing.assert_allclose(v_r.numpy(), v_p.numpy(), rtol=1e-12)


def test_dropout_changes_masks_between_steps():
    """The replay is not a frozen mask: two steps draw different masks (so the test above can fail)."""
    reversible, _ = make_pair(kind="dropout")
    x = random_input()
    loss_1, _ = loss_and_gradients(reversible, x)
    loss_2, _ = loss_and_gradients(reversible, x)
    assert relative_error(loss_1, loss_2) > 1e-6


# --- the custom gradient is really used -------------------------------------------------------


class CountingTanhConv(keras.layers.Layer):
    """F = tanh(conv(x)); counts calls and keeps weak references to its tanh outputs."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", dtype=self.dtype_policy)
        self.calls = 0
        self.outputs = []

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x):
        self.calls += 1
        out = tf.tanh(self.conv(x))
        self.outputs.append(weakref.ref(out))
        return out


def counting_sequence(use_custom_gradient, n_blocks=4, fuse_identical_blocks=False):
    fs = [CountingTanhConv(4, dtype="float64") for _ in range(2 * n_blocks)]
    blocks = [ReversibleBlock(fs[2 * i], fs[2 * i + 1], dtype="float64") for i in range(n_blocks)]
    seq = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient, dtype="float64",
                             fuse_identical_blocks=fuse_identical_blocks)
    seq.build((2, 5, 5, 8))
    seq._get_plan()  # the one-time check for unreplayable random ops traces F and G
    for f in fs:  # building traced each F once for its shape check
        f.calls, f.outputs = 0, []
    return seq, fs


@pytest.mark.parametrize("use_custom_gradient, fuse", [(True, False), (True, True), (False, False)])
def test_backward_rebuilds_instead_of_storing(use_custom_gradient, fuse):
    """Eager: the tape holds no F/G activation, and the backward pass calls F and G again."""
    seq, fs = counting_sequence(use_custom_gradient, fuse_identical_blocks=fuse)
    x = random_input((2, 5, 5, 8))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = seq(x, training=True)
        loss = tf.reduce_sum(y * y)
    gc.collect()
    alive = sum(ref() is not None for f in fs for ref in f.outputs)
    if fuse:  # one loop body: block 0's F and G run with each block's weights in turn
        assert sum(f.calls for f in fs) == 8
        tape.gradient(loss, seq.trainable_variables)
        assert alive == 0 and sum(f.calls for f in fs) == 16
        return
    assert [f.calls for f in fs] == [1] * 8
    tape.gradient(loss, seq.trainable_variables)
    if use_custom_gradient:
        assert alive == 0  # nothing kept for the backward pass
        assert [f.calls for f in fs] == [2] * 8  # each F and G recomputed once (Algorithm 1)
    else:
        assert alive == 8  # plain autodiff keeps every tanh output
        assert [f.calls for f in fs] == [1] * 8


def test_inference_mode_runs_plain_blocks():
    seq, fs = counting_sequence(True)
    x = random_input((2, 5, 5, 8))
    for training in (False, None):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(seq(x, training=training))
        tape.gradient(loss, x)
    assert [f.calls for f in fs] == [2] * 8  # two forward passes, no recompute


@pytest.mark.parametrize("fuse", [False, True])
def test_graph_contains_the_recompute(fuse):
    """In a tf.function, the gradient graph holds F's ops twice (forward + recompute): per block
    unfused, once for all blocks when they run as one while loop."""
    seq, _ = counting_sequence(True, n_blocks=2, fuse_identical_blocks=fuse)
    x = random_input((2, 5, 5, 8))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(seq(x, training=True) ** 2)
        return tape.gradient(loss, x)

    graph_def = step.get_concrete_function(x).graph.as_graph_def()
    ops = [n.op for n in graph_def.node] + [
        n.op for f in graph_def.library.function for n in f.node_def
    ]
    # Unfused: 4 residual functions, each in forward and recompute; fused: F and G of one block body.
    assert ops.count("Tanh") == (2 * 2 if fuse else 2 * 4)


# --- call conventions -------------------------------------------------------------------------


def test_training_flags():
    reversible, plain = make_pair()
    x = random_input()
    for training in (True, False, None):
        _, g_r = loss_and_gradients(reversible, x, training=training)
        _, g_p = loss_and_gradients(plain, x, training=training)
        assert_all_close_relative(g_r, g_p, RTOL["float64"], what=f"training={training}")


def test_keyword_call():
    reversible, plain = make_pair()
    x = random_input()
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(reversible(inputs=x, training=True) ** 2)
    g_r = tape.gradient(loss, [x] + reversible.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(plain(inputs=x, training=True) ** 2)
    g_p = tape.gradient(loss, [x] + plain.trainable_variables)
    assert_all_close_relative(g_r, g_p, RTOL["float64"])


def functional_pair(build_body, dtype="float64", input_shape=(6, 6, 3)):
    """Two functional models (custom / plain gradient) with the same weights."""

    def make(use_custom_gradient):
        inputs = keras.Input(input_shape, dtype=dtype)
        outputs = build_body(inputs, use_custom_gradient)
        return keras.Model(inputs, outputs)

    a, b = make(True), make(False)
    copy_state(a, b)
    return a, b


def sequence(use_custom_gradient, n_blocks=2, half=4, dtype="float64"):
    blocks = [
        ReversibleBlock(BasicResidualFunction(half, dtype=dtype),
                        BasicResidualFunction(half, dtype=dtype), dtype=dtype)
        for _ in range(n_blocks)
    ]
    return ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient, dtype=dtype)


def conv(filters, dtype="float64"):
    return keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype)


@pytest.mark.parametrize(
    "body",
    ["same_tensor_both_halves", "layers_around", "shared_sequence_twice", "two_sequences"],
)
def test_model_gradients_equal_plain(body):
    def build(inputs, ucg):
        if body == "same_tensor_both_halves":
            h = conv(4)(inputs)
            h = keras.layers.Concatenate(dtype="float64")([h, h])
            return sequence(ucg)(h)
        if body == "layers_around":
            h = keras.layers.Activation("tanh", dtype="float64")(conv(8)(inputs))
            h = sequence(ucg)(h)
            return keras.layers.Dense(3, dtype="float64")(
                keras.layers.GlobalAveragePooling2D(dtype="float64")(keras.ops.tanh(h))
            )
        if body == "shared_sequence_twice":
            shared = sequence(ucg)
            return shared(keras.layers.Activation("tanh", dtype="float64")(shared(conv(8)(inputs))))
        h = sequence(ucg)(conv(8)(inputs))
        return sequence(ucg, half=6)(conv(12)(h))

    a, b = functional_pair(build)
    x = random_input((2, 6, 6, 3))
    _, g_a = loss_and_gradients(a, x)
    _, g_b = loss_and_gradients(b, x)
    assert_all_close_relative(g_a, g_b, RTOL["float64"], what="gradient")


def test_subclassed_model():
    class Net(keras.Model):
        def __init__(self, ucg):
            super().__init__(dtype="float64")
            self.stem = conv(8)
            self.body = sequence(ucg)
            self.head = keras.layers.Dense(2, dtype="float64")

        def call(self, x, training=None):
            h = self.body(self.stem(x), training=training)
            return self.head(tf.reduce_mean(h, axis=[1, 2]))

    a, b = Net(True), Net(False)
    x = random_input((2, 6, 6, 3))
    a(x), b(x)
    copy_state(a, b)
    for mode in ("eager", "function"):
        _, g_a = loss_and_gradients(a, x, mode=mode)
        _, g_b = loss_and_gradients(b, x, mode=mode)
        assert_all_close_relative(g_a, g_b, RTOL["float64"], what=mode)


# --- model.fit, predict, evaluate --------------------------------------------------------------


def classifier(ucg, dtype="float64"):
    inputs = keras.Input((6, 6, 3), dtype=dtype)
    h = sequence(ucg, dtype=dtype)(conv(8, dtype)(inputs))
    h = keras.layers.GlobalAveragePooling2D(dtype=dtype)(h)
    return keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(h))


# fit with jit_compile=True is also covered, faster, by test_differentiation::test_cond_inside_model_fit.
@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fit_step_equals_plain(jit_compile):
    a, b = classifier(True), classifier(False)
    copy_state(a, b)
    x = np.random.default_rng(0).standard_normal((8, 6, 6, 3))
    y = np.arange(8) % 3
    start = [w.copy() for w in a.get_weights()]
    for model in (a, b):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    delta_a = [w - s for w, s in zip(a.get_weights(), start)]
    delta_b = [w - s for w, s in zip(b.get_weights(), start)]
    trainable = len(a.trainable_weights)
    assert sum(np.abs(d).max() > 0 for d in delta_a) >= trainable
    assert_all_close_relative(delta_a, delta_b, 1e-9, what="update")
    np.testing.assert_allclose(a.predict(x, verbose=0), b.predict(x, verbose=0), rtol=1e-10)
    assert a.evaluate(x, y, verbose=0) == pytest.approx(b.evaluate(x, y, verbose=0), rel=1e-10)


def test_mirrored_strategy_two_logical_cpus():
    """MirroredStrategy over two logical CPUs: the fit step equals the plain model's (own process)."""
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tests.layers.test_reversible_sequence import classifier
        from tests.test_case import copy_state, relative_error
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        x = np.random.default_rng(0).standard_normal((8, 6, 6, 3))
        y = np.arange(8) % 3
        with strategy.scope():
            a, b = classifier(True), classifier(False)
            copy_state(a, b)
            for m in (a, b):
                m.compile(keras.optimizers.SGD(0.1),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = [w.copy() for w in a.get_weights()]
        for m in (a, b):
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        errors = [relative_error(wa - s, wb - s)
                  for wa, wb, s in zip(a.get_weights(), b.get_weights(), start)]
        print("REPLICAS", strategy.num_replicas_in_sync, "MAXERR", max(errors))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("REPLICAS")][-1]
    _, replicas, _, max_error = line.split()
    assert int(replicas) == 2
    assert float(max_error) <= 1e-9


# --- mixed precision --------------------------------------------------------------------------


def test_mixed_bfloat16_gradient_error_close_to_plain_bfloat16():
    """Reversible bf16 gradients are as close to float32 plain autodiff as plain bf16 ones."""
    assert ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2),
                           dtype="mixed_bfloat16").coupling.grid_bits == 12

    def make(policy, ucg):
        return ReversibleSequence(
            [
                ReversibleBlock(BasicResidualFunction(4, dtype=policy),
                                BasicResidualFunction(4, dtype=policy), dtype=policy)
                for _ in range(4)
            ],
            use_custom_gradient=ucg,
            dtype=policy,
        )

    reference, rev_bf16, plain_bf16 = make("float32", False), make("mixed_bfloat16", True), make(
        "mixed_bfloat16", False)
    x = random_input(dtype="float32")
    for m in (reference, rev_bf16, plain_bf16):
        m.build(x.shape)
    copy_state(reference, rev_bf16)
    copy_state(reference, plain_bf16)
    _, g_ref = loss_and_gradients(reference, x)
    _, g_rev = loss_and_gradients(rev_bf16, x)
    _, g_plain = loss_and_gradients(plain_bf16, x)
    assert all(g.dtype == tf.float32 for g in g_rev)
    err_rev = max(relative_error(a, b) for a, b in zip(g_rev, g_ref))
    err_plain = max(relative_error(a, b) for a, b in zip(g_plain, g_ref))
    assert err_plain > 1e-4  # bf16 really computed F and G
    # The fixed-point stream (AdditiveCoupling(grid_bits=12) under mixed policies) rebuilds the inputs
    # bit for bit, so the reversible gradients are as accurate as plain bf16 backprop's (issue #11).
    assert err_rev <= 1.2 * err_plain
    assert_all_close_relative(g_rev, g_plain, 1e-6, what="reversible vs plain bf16")


def test_mixed_float16_fit_with_loss_scaling():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = classifier(True, dtype=None)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x = np.random.default_rng(0).standard_normal((16, 6, 6, 3)).astype("float32")
        y = np.arange(16) % 3
        history = model.fit(x, y, batch_size=8, epochs=8, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0]
    assert np.isfinite(float(model.optimizer.dynamic_scale))


# --- serialization and errors -----------------------------------------------------------------


def test_layer_contract(tmp_path):
    seq = sequence(True, dtype="float32")
    check_layer(seq, (None, 6, 6, 8), num_trainable_weights=2 * 2 * 6, tmp_path=tmp_path)
    config = seq.get_config()
    assert config["use_custom_gradient"] is True
    assert [b["class_name"] for b in config["units"]] == ["ReversibleBlock"] * 2


def test_inverse():
    reversible, _ = make_pair(n_blocks=6)
    x = random_input()
    y = reversible(x, training=True)
    assert relative_error(reversible.inverse(y, training=True), x) <= 1e-12


def test_empty_blocks_raise():
    with pytest.raises(ValueError, match="`units` must be a non-empty list"):
        ReversibleSequence([])


def test_non_layer_unit_named_by_index():
    blocks = [ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4)), "conv"]
    with pytest.raises(ValueError, match=r"`units\[1\]` must be a Keras layer.*'conv'"):
        ReversibleSequence(blocks)


def test_inverse_of_a_non_invertible_unit_raises():
    units = [ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4)), conv(8)]
    seq = ReversibleSequence(units)
    seq.build((None, 6, 6, 8))
    with pytest.raises(ValueError, match=r"`units\[1\]`.*is not invertible"):
        seq.inverse(tf.zeros((1, 6, 6, 8)))


def test_shape_changing_block_named_by_index():
    blocks = [
        ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4)),
        ReversibleBlock(BasicResidualFunction(4, strides=2), BasicResidualFunction(4)),
    ]
    with pytest.raises(ValueError, match=r"In `units\[1\]`.*Residual function F.*stride"):
        ReversibleSequence(blocks).build((None, 8, 8, 8))


def test_mixed_axes_raise():
    blocks = [
        ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2)),
        ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2), axis=1),
    ]
    with pytest.raises(ValueError, match="same axis"):
        ReversibleSequence(blocks)


def test_odd_channels_raise_with_index():
    with pytest.raises(ValueError, match=r"In `units\[0\]`.*even"):
        sequence(True).build((None, 6, 6, 9))


def test_integer_input_raises():
    seq = sequence(True, dtype="float32")
    seq.build((None, 6, 6, 8))
    with pytest.raises(ValueError, match="Received: dtype=int32"):
        seq(tf.zeros((1, 6, 6, 8), tf.int32), training=True)


def test_shared_residual_function_for_f_and_g():
    """F and G the same layer object (shared weights, shared dropout generator)."""

    def make(ucg):
        blocks = []
        for _ in range(3):
            shared = residual_function("dropout", 4, "float64")
            blocks.append(ReversibleBlock(shared, shared, dtype="float64"))
        return ReversibleSequence(blocks, use_custom_gradient=ucg, dtype="float64")

    a, b = make(True), make(False)
    a.build((3, 6, 6, 8))
    b.build((3, 6, 6, 8))
    copy_state(a, b)
    assert len(a.trainable_variables) == 3 * 4
    x = random_input()
    _, g_a = loss_and_gradients(a, x)
    _, g_b = loss_and_gradients(b, x)
    assert_all_close_relative(g_a, g_b, RTOL["float64"], what="gradient")


def test_reversible_transformer_sequence_gradients():
    """(N, T, C) blocks with self-attention as F and an MLP as G (Reformer-style), split on the last axis."""

    class SelfAttention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)
            self.attention = keras.layers.MultiHeadAttention(2, 4, dtype=self.dtype_policy)

        def build(self, input_shape):
            self.norm.build(input_shape)
            self.attention.build(input_shape, input_shape)

        def call(self, x):
            h = self.norm(x)
            return self.attention(h, h)

    def mlp():
        return keras.Sequential([
            keras.layers.LayerNormalization(dtype="float64"),
            keras.layers.Dense(16, activation="gelu", dtype="float64"),
            keras.layers.Dense(8, dtype="float64"),
        ])

    def make(ucg):
        blocks = [ReversibleBlock(SelfAttention(dtype="float64"), mlp(), dtype="float64") for _ in range(3)]
        return ReversibleSequence(blocks, use_custom_gradient=ucg, dtype="float64")

    a, b = make(True), make(False)
    a.build((2, 5, 16))
    b.build((2, 5, 16))
    copy_state(a, b)
    x = random_input((2, 5, 16))
    _, g_a = loss_and_gradients(a, x)
    _, g_b = loss_and_gradients(b, x)
    assert len(g_a) == 1 + len(a.trainable_variables) > 1 + 3 * 8
    # Key-bias gradients are zero analytically (~1e-17 here): bounded absolutely, the rest relatively.
    tiny = [v.path for v, g in zip(b.trainable_variables, g_b[1:]) if np.max(np.abs(g.numpy())) < 1e-12]
    assert len(tiny) == 3 and all("key" in path for path in tiny), tiny
    assert_all_close_relative(g_a, g_b, RTOL["float64"], what="gradient", atol=1e-14)


# --- non-invertible units: stem, stage transitions, any Keras layer -------------------------------


def whole_body_pair(dtype="float64"):
    """A RevNet-like body: stem, 2 blocks, a strided transition, 3 blocks (one while loop), a conv."""

    def make(use_custom_gradient):
        keras.utils.set_random_seed(1)
        units = [Stem(8, dtype=dtype)]
        units += [ReversibleBlock(BasicResidualFunction(dtype=dtype),
                                  BasicResidualFunction(dtype=dtype), dtype=dtype) for _ in range(2)]
        units += [StageTransition(16, strides=2, dtype=dtype)]
        units += [ReversibleBlock(BasicResidualFunction(dtype=dtype),
                                  BasicResidualFunction(dtype=dtype), dtype=dtype) for _ in range(3)]
        units += [conv(16, dtype)]
        seq = ReversibleSequence(units, use_custom_gradient=use_custom_gradient, dtype=dtype)
        seq.build((None, 8, 8, 3))
        return seq

    reversible, plain = make(True), make(False)
    copy_state(reversible, plain)
    return reversible, plain


@pytest.mark.parametrize(
    "mode, dtype",
    [
        ("eager", "float64"), ("function", "float64"), ("function", "float32"),
        # XLA compiles the whole body for a minute; XLA is covered by the block tests above.
        pytest.param("xla", "float64", marks=pytest.mark.slow),
    ],
)
def test_non_invertible_units_recomputed_from_their_inputs(mode, dtype):
    reversible, plain = whole_body_pair(dtype)
    units = reversible._get_plan().units
    assert [getattr(u, "depth", 1) for u in units] == [1, 2, 1, 3, 1]  # identical blocks fused
    x = random_input((3, 8, 8, 3), dtype=dtype)
    loss_r, grads_r = loss_and_gradients(reversible, x, mode=mode)
    loss_p, grads_p = loss_and_gradients(plain, x, mode=mode)
    assert relative_error(loss_r, loss_p) <= RTOL[dtype]
    assert_all_close_relative(grads_r, grads_p, RTOL[dtype], what="gradient")
    # BatchNorm statistics (stem, transition, blocks) updated once, as by plain autodiff.
    for v_r, v_p in zip(reversible.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(v_r.numpy(), v_p.numpy(), rtol=10 * RTOL[dtype])


def test_symbolic_integer_input_raises():
    seq = sequence(True, dtype="float32")
    with pytest.raises(ValueError, match="floating point inputs.*int32"):
        seq(keras.Input((6, 6, 8), dtype="int32"))


def test_shared_layers_serialize_as_one_same_as_path_and_load_legacy_configs():
    shared_f = residual_function("basic", 4, "float64")
    block = ReversibleBlock(shared_f, shared_f, dtype="float64")
    other = ReversibleBlock(residual_function("basic", 4, "float64"), shared_f, dtype="float64")
    seq = ReversibleSequence([block, other, block], dtype="float64")
    seq.build((2, 6, 6, 8))
    config = json.loads(json.dumps(seq.get_config()))
    units = config["units"]
    assert units[0]["config"]["g"] == {"same_as": ["f"]}  # within a block: the path from the block
    assert units[1]["config"]["g"] == {"same_as": [0, "f"]}  # within a sequence: from the units
    assert units[2] == {"same_as": [0]}
    rebuilt = ReversibleSequence.from_config(config)
    assert rebuilt.units[0].g is rebuilt.units[0].f is rebuilt.units[1].g
    assert rebuilt.units[2] is rebuilt.units[0]
    # A block config written by tf_revnet 0.2.0 (g as {"same_as": "f"}) still loads with F shared.
    legacy = dict(units[0]["config"], g={"same_as": "f"})
    loaded = ReversibleBlock.from_config(legacy)
    assert loaded.g is loaded.f


# --- taps: multi-scale outputs out of the memory-saving backward ------------------------------------


def tapped_pair(dtype, taps=(2, 3, 5)):
    """A sequence with `taps` (stem, 3 blocks, transition, stack) and its plain-autodiff twin."""

    def make(use_custom_gradient):
        keras.utils.set_random_seed(0)

        def block():
            return ReversibleBlock(residual_function("dropout", 4, dtype),
                                   residual_function("dropout", 4, dtype), dtype=dtype)

        units = [Stem(8, dtype=dtype), block(), block(), block(),
                 StageTransition(16, strides=2, dtype=dtype),
                 ReversibleBlockStack(ReversibleBlock(BasicResidualFunction(8, dtype=dtype),
                                                      BasicResidualFunction(8, dtype=dtype),
                                                      dtype=dtype), depth=2)]
        return ReversibleSequence(units, taps=list(taps), use_custom_gradient=use_custom_gradient,
                                  dtype=dtype)

    reversible, plain = make(True), make(False)
    x = random_input((2, 8, 8, 3), dtype=dtype)
    reversible(x)
    plain(x)
    copy_state(reversible, plain)
    return reversible, plain, x


def tap_loss_and_gradients(seq, x, levels, mode):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = seq(x, training=True)
            loss = tf.add_n([tf.reduce_sum(tf.sin(outputs[i]) * (i + 1)) for i in levels])
        grads = tape.gradient(loss, [x] + seq.trainable_variables)
        return loss, [tf.zeros_like(v) if g is None else g
                      for g, v in zip(grads, [x] + seq.trainable_variables)]

    return (tf.function(step) if mode == "function" else step)(x)


@pytest.mark.parametrize(
    "dtype, mode, levels",
    # One traced instance (tracing both sequences costs ~10 s here); the subsets run eagerly.
    [("float64", "eager", (0, 1, 2)), ("float64", "function", (0, 1, 2)),
     ("float32", "eager", (0, 1, 2)), ("float64", "eager", (0,)),
     ("float64", "eager", (1,)), ("float64", "eager", (0, 2)),
     pytest.param("float32", "function", (0, 1, 2), marks=pytest.mark.slow)],
    ids=["all-eager", "all-function", "all-float32", "level0", "level1", "levels0+2",
         "all-float32-function"],
)
def test_tapped_outputs_backpropagate_as_plain_autodiff(dtype, mode, levels):
    reversible, plain, x = tapped_pair(dtype)
    assert [getattr(u, "depth", 1) for u in reversible._get_plan().units] == [1, 2, 1, 1, 2]
    # Equal state (statistics, seed states) before: the same dropout masks, one statistics update.
    loss_r, grads_r = tap_loss_and_gradients(reversible, x, levels, mode)
    loss_p, grads_p = tap_loss_and_gradients(plain, x, levels, mode)
    assert relative_error(loss_r, loss_p) <= RTOL[dtype]
    assert_all_close_relative(grads_r, grads_p, RTOL[dtype], what="gradient", atol=1e-30)
    for v_r, v_p in zip(reversible.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(v_r.numpy(), v_p.numpy(), rtol=10 * RTOL[dtype])


def test_taps_shapes_config_and_errors():
    reversible, _, x = tapped_pair("float64")
    outputs = reversible(x, training=False)
    assert [tuple(o.shape) for o in outputs] == [(2, 8, 8, 8), (2, 8, 8, 8), (2, 4, 4, 16)]
    symbolic = reversible(keras.Input((8, 8, 3), dtype="float64"))
    assert [tuple(o.shape) for o in symbolic] == [(None, 8, 8, 8), (None, 8, 8, 8), (None, 4, 4, 16)]
    config = json.loads(json.dumps(reversible.get_config()))
    assert config["taps"] == [2, 3, 5]
    assert ReversibleSequence.from_config(config).taps == (2, 3, 5)
    for taps in ([], [6], [1, 1], ["0"], [True]):
        with pytest.raises(ValueError, match=r"`taps` must be .*\[0, 6\)"):
            ReversibleSequence([BasicResidualFunction(4) for _ in range(6)], taps=taps)
