"""Every way TensorFlow differentiates a `ReversibleSequence`, against plain autodiff on the same weights.

Control flow (`tf.cond`, `keras.ops.cond`, `tf.switch_case`, `tf.while_loop`), higher-order gradients
(Hessian-vector products, second derivatives with respect to the input, forward-mode JVPs), every source
of randomness, cloning with shared layers, and the size of the traced graph.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_case import assert_all_close_relative
from tf_revnet.layers import (
    BasicResidualFunction,
    ReversibleBlock,
    ReversibleSequence,
    StageTransition,
)
from tf_revnet.layers.utils import global_seed_state

RTOL = 1e-10  # float64


def dense_pair(n_blocks=2, units=2, shared=False):
    """A reversible and a plain sequence of `Dense(tanh)` blocks on (N, 2 * units), same weights."""

    def make(use_custom_gradient):
        blocks = []
        for _ in range(n_blocks):
            f = keras.layers.Dense(units, activation="tanh", dtype="float64")
            g = f if shared else keras.layers.Dense(units, activation="tanh", dtype="float64")
            blocks.append(ReversibleBlock(f, g, dtype="float64"))
        seq = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient, dtype="float64")
        seq.build((None, 2 * units))
        return seq

    reversible, plain = make(True), make(False)
    plain.set_weights(reversible.get_weights())
    return reversible, plain


def x64(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape))


# --- control flow -------------------------------------------------------------------------------


def _branch_gradients(seq, x, kind):
    other = ReversibleSequence  # noqa: F841 - documents that only `seq` is reversible

    @tf.function
    def step(flag):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if kind == "cond":
                y = tf.cond(flag, lambda: seq(x, training=True), lambda: 2.0 * x)
            elif kind == "keras_cond":
                y = keras.ops.cond(flag, lambda: seq(x, training=True), lambda: 2.0 * x)
            elif kind == "switch_case":
                index = tf.cast(flag, tf.int32)
                y = tf.switch_case(index, [lambda: 2.0 * x, lambda: seq(x, training=True)])
            else:  # while_loop: the sequence applied twice
                _, y = tf.while_loop(
                    lambda i, h: i < 2, lambda i, h: (i + 1, seq(h, training=True)), (0, x)
                )
            loss = tf.reduce_sum(tf.sin(y))
        return tape.gradient(loss, [x] + seq.trainable_variables)

    return step(tf.constant(True))


@pytest.mark.parametrize("kind", ["cond", "keras_cond", "switch_case", "while_loop"])
def test_control_flow_in_tf_function(kind):
    reversible, plain = dense_pair()
    x = x64((3, 4))
    assert_all_close_relative(
        _branch_gradients(reversible, x, kind), _branch_gradients(plain, x, kind), RTOL, kind
    )


class StochasticDepth(keras.layers.Layer):
    """Runs the sequence or the identity, chosen by a traced `keras.ops.cond` (stochastic depth)."""

    def __init__(self, sequence, **kwargs):
        super().__init__(**kwargs)
        self.sequence = sequence

    def call(self, x, training=None):
        if not training:
            return self.sequence(x, training=training)
        keep = keras.ops.mean(x) > -1e9  # always true, but only known when the graph runs
        return keras.ops.cond(keep, lambda: self.sequence(x, training=True), lambda: x)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_cond_inside_model_fit(jit_compile):
    losses, weights = [], []
    for use_custom_gradient in (True, False):
        keras.utils.set_random_seed(3)
        blocks = [
            ReversibleBlock(BasicResidualFunction(), BasicResidualFunction()) for _ in range(2)
        ]
        seq = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient)
        inputs = keras.Input((6, 6, 4))
        h = StochasticDepth(seq)(inputs)
        outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit_compile)
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((8, 6, 6, 4), "float32"), rng.standard_normal((8, 3), "float32")
        history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        losses.append(history.history["loss"])
        weights.append(model.get_weights())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert_all_close_relative(weights[0], weights[1], 1e-5, "weight after fit")


# --- higher order --------------------------------------------------------------------------------


def _hvp(seq, x, mode):
    v = [tf.ones_like(w) for w in seq.trainable_variables]

    def fn():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(tf.sin(seq(x, training=True)))
            grads = inner.gradient(loss, seq.trainable_variables)
            gv = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(grads, v)])
        return outer.gradient(gv, seq.trainable_variables)

    if mode != "eager":
        fn = tf.function(fn, jit_compile=mode == "xla")
    return fn()


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_hessian_vector_product_wrt_weights(mode):
    reversible, plain = dense_pair(n_blocks=1)
    x = x64((3, 4))
    assert_all_close_relative(_hvp(reversible, x, mode), _hvp(plain, x, mode), RTOL, "HVP")


def _second_derivative_wrt_input(seq, x):
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(seq(x, training=True) ** 3)
        g = inner.gradient(y, x)
        z = tf.reduce_sum(g**2)
    return outer.gradient(z, x)


def test_second_derivative_wrt_input():
    reversible, plain = dense_pair(n_blocks=2)
    x = x64((3, 4), seed=1)
    got = _second_derivative_wrt_input(reversible, x)
    assert got is not None
    assert_all_close_relative([got], [_second_derivative_wrt_input(plain, x)], RTOL)


def test_forward_mode_jvp():
    reversible, plain = dense_pair(n_blocks=2)
    x = x64((3, 4), seed=2)
    tangent = x64((3, 4), seed=3)
    jvps = []
    for seq in (reversible, plain):
        with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
            y = seq(x, training=True)
        jvps.append(acc.jvp(y))
    assert jvps[0] is not None
    assert_all_close_relative([jvps[0]], [jvps[1]], RTOL)


def test_first_order_still_uses_the_memory_saving_pass():
    """One tape: the custom gradient (no recorded forward) is used; plain autodiff is not."""
    reversible, _ = dense_pair(n_blocks=1)
    x = x64((3, 4))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(reversible(x, training=True))
        return tape.gradient(loss, x)

    graph = step.get_concrete_function(x).graph
    assert any("reversible_forward" in op.type or "IdentityN" == op.type for op in graph.get_operations())


# --- randomness ----------------------------------------------------------------------------------


class GlobalNoise(keras.layers.Layer):
    """Multiplies by noise from Keras' global generator (`seed=None`)."""

    def call(self, x, training=None):
        return x * keras.random.uniform(keras.ops.shape(x), 0.5, 1.5, dtype=x.dtype)


class IntSeedNoise(keras.layers.Layer):
    """Noise from a fixed integer seed (stateless: the same every call)."""

    def call(self, x, training=None):
        return x * keras.random.normal(keras.ops.shape(x), seed=7, dtype=x.dtype)


class GeneratorOwningNoise(keras.layers.Layer):
    """Noise from a `SeedGenerator` the layer owns (as Dropout)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(11)

    def call(self, x, training=None):
        return x + keras.random.normal(keras.ops.shape(x), seed=self.seed_generator, dtype=x.dtype)


def _noisy_pair(noise_cls):
    def make(use_custom_gradient):
        blocks = [
            ReversibleBlock(
                keras.Sequential([keras.layers.Dense(3, activation="tanh", dtype="float64"),
                                  noise_cls(dtype="float64")]),
                keras.layers.Dense(3, activation="tanh", dtype="float64"),
                dtype="float64",
            )
            for _ in range(3)
        ]
        seq = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient, dtype="float64")
        seq.build((None, 6))
        return seq

    reversible, plain = make(True), make(False)
    for target, source in zip(plain.variables, reversible.variables):
        target.assign(source)
    return reversible, plain


@pytest.mark.parametrize("noise_cls", [GlobalNoise, IntSeedNoise, GeneratorOwningNoise])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_replayed_randomness(noise_cls, mode):
    reversible, plain = _noisy_pair(noise_cls)
    x = x64((4, 6))
    rng_state = global_seed_state()
    start = rng_state.numpy()
    results = []
    for seq in (reversible, plain):
        rng_state.assign(start)

        def fn():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.sin(seq(x, training=True)))
            return [loss] + tape.gradient(loss, [x] + seq.trainable_variables)

        results.append((tf.function(fn) if mode == "function" else fn)())
        results[-1].append(tf.identity(rng_state.value))
    # Same loss (same noise drawn), same gradients, and the generators advanced alike.
    assert_all_close_relative(results[0][:-1], results[1][:-1], RTOL, "loss and gradients")
    np.testing.assert_array_equal(results[0][-1], results[1][-1])
    assert not np.array_equal(results[0][-1], start) or noise_cls is not GlobalNoise


class TFUniformNoise(keras.layers.Layer):
    def call(self, x, training=None):
        return x * tf.random.uniform(tf.shape(x), dtype=x.dtype)


class TFDropout(keras.layers.Layer):
    def call(self, x, training=None):
        return tf.nn.dropout(x, rate=0.5) if training else x


class TFGeneratorNoise(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = tf.random.Generator.from_seed(1)

    def call(self, x, training=None):
        return x + self.generator.normal(tf.shape(x), dtype=x.dtype)


@pytest.mark.parametrize("noise_cls", [TFUniformNoise, TFDropout, TFGeneratorNoise])
def test_unreplayable_randomness_raises_naming_the_unit(noise_cls):
    blocks = [
        ReversibleBlock(keras.layers.Dense(2), keras.layers.Dense(2), dtype="float64"),
        ReversibleBlock(noise_cls(name="noisy_f", dtype="float64"), keras.layers.Dense(2),
                        dtype="float64", name="noisy_block"),
    ]
    seq = ReversibleSequence(blocks, dtype="float64")
    x = x64((3, 4))
    with pytest.raises(ValueError, match=r"units\[1\].*noisy_block.*keras.random"):
        seq(x, training=True)
    # Inference and plain autodiff still run.
    seq(x, training=False)
    ReversibleSequence(blocks, use_custom_gradient=False, dtype="float64")(x, training=True)


# --- cloning and configs -------------------------------------------------------------------------


def _shared_model():
    inputs = keras.Input((8,))
    shared = keras.layers.Dense(4, activation="tanh")
    tied = keras.layers.Dense(4, activation="tanh")
    blocks = [ReversibleBlock(shared, shared, name="shared_fg")]
    blocks += [ReversibleBlock(tied, keras.layers.Dense(4), name=f"tied{i}") for i in range(2)]
    blocks.append(blocks[1])  # the same block applied twice
    h = ReversibleSequence(blocks)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def test_clone_model_keeps_shared_layers():
    model = _shared_model()
    clone = keras.models.clone_model(model)
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(0).standard_normal((5, 8)).astype("float32")
    np.testing.assert_allclose(clone(x, training=False), model(x, training=False), rtol=1e-6)
    seq = [la for la in clone.layers if isinstance(la, ReversibleSequence)][0]
    assert seq.units[0].f is seq.units[0].g
    assert seq.units[1].f is seq.units[2].f
    assert seq.units[3] is seq.units[1]


def test_block_from_config_keeps_shared_f_and_g():
    f = keras.layers.Dense(3)
    block = ReversibleBlock(f, f)
    block.build((None, 6))
    clone = ReversibleBlock.from_config(block.get_config())
    clone.build((None, 6))
    assert clone.f is clone.g
    assert clone.count_params() == block.count_params() == 12


def test_keras_file_keeps_shared_layers(tmp_path):
    model = _shared_model()
    path = str(tmp_path / "shared.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.count_params() == model.count_params()


# --- the two smaller faults ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(None, None, None, 16), (None, 8, None, 16)])
def test_strided_f_with_unknown_spatial_size_raises_on_build(shape):
    block = ReversibleBlock(
        keras.layers.Conv2D(8, 3, strides=2, padding="same", name="strided"),
        keras.layers.Conv2D(8, 3, padding="same"),
        name="bad_block",
    )
    with pytest.raises(ValueError, match=r"units\[0\].*bad_block.*`f`.*strided.*stride"):
        ReversibleSequence([block]).build(shape)
    with pytest.raises(ValueError, match="Residual function F .*strided"):
        ReversibleBlock(
            keras.layers.Conv2D(8, 3, strides=2, padding="same", name="strided"),
            keras.layers.Conv2D(8, 3, padding="same"),
        )(keras.Input(shape[1:]))


class NoBuild(keras.layers.Layer):
    """A custom residual function that defines no build() but owns a sublayer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_building_custom_residual_functions_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = ReversibleSequence([ReversibleBlock(NoBuild(), NoBuild())])
        seq.build((None, 6))
    assert len(seq.trainable_variables) == 4


# --- graph size ----------------------------------------------------------------------------------

_VARIABLE_IO = {"ReadVariableOp", "AssignVariableOp", "VarHandleOp", "Placeholder", "Identity",
                "Const", "NoOp"}


def _graph_op_count(n_blocks, jit_compile=False):
    """Ops of a traced training step of a stage (transition + n blocks), variable I/O left out."""
    keras.utils.set_random_seed(0)
    units = [StageTransition(8, strides=2)] + [
        ReversibleBlock(keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                        keras.layers.Conv2D(4, 3, padding="same", activation="relu"))
        for _ in range(n_blocks)
    ]
    seq = ReversibleSequence(units)
    seq.build((None, 4, 4, 4))

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(seq(x, training=True) ** 2)
        return tape.gradient(loss, [x] + seq.trainable_variables)

    graph_def = step.get_concrete_function(tf.TensorSpec((2, 4, 4, 4))).graph.as_graph_def()
    nodes = [n.op for n in graph_def.node]
    nodes += [n.op for f in graph_def.library.function for n in f.node_def]
    return sum(op not in _VARIABLE_IO for op in nodes), len(seq.trainable_variables)


def test_traced_graph_does_not_grow_with_depth():
    small, _ = _graph_op_count(2)
    large, _ = _graph_op_count(6)
    # Only the per-variable stacking and unstacking may grow (a handful of ops per block), never
    # the block's forward, recompute or backward (hundreds of ops each).
    per_block = (large - small) / 4
    assert per_block < 20, (small, large)
    # The transition and one block body (forward, recompute, backward) are hundreds of ops.
    assert small > 300


def _whole_graph_nodes(n_blocks):
    """Every node of a traced gradient step through `n_blocks` separate identical blocks (I/O too)."""
    keras.utils.set_random_seed(0)
    blocks = [ReversibleBlock(BasicResidualFunction(), BasicResidualFunction())
              for _ in range(n_blocks)]
    inputs = keras.Input((8, 8, 64))
    model = keras.Model(inputs, ReversibleSequence(blocks)(inputs))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    graph_def = step.get_concrete_function(tf.TensorSpec((2, 8, 8, 64))).graph.as_graph_def()
    nodes = len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)
    return nodes, len(blocks[0].variables)


def test_graph_of_separate_identical_blocks_grows_only_by_their_variables():
    small, variables = _whole_graph_nodes(4)
    large, _ = _whole_graph_nodes(16)
    # Per added block: each variable's capture and read, each weight's returned gradient and each
    # statistic's assignment (3 nodes per variable at most); the blocks' computation is one loop body.
    per_block = (large - small) / 12
    assert per_block <= 3 * variables, (small, large, variables)
