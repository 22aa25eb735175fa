"""Tests of tf_revnet/layers/reversible_block_stack.py.

The independent reference is a sequence of separate `ReversibleBlock` layers (their own variables,
ordinary autodiff), given the stack's weights, BatchNorm statistics and seed states slice by slice.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.layers.test_reversible_sequence import RTOL, random_input, residual_function
from tests.test_case import (
    assert_all_close_relative,
    check_layer,
    loss_and_gradients,
    relative_error,
)
from tf_revnet.diagnostics import reconstruction_error
from tf_revnet.layers import (
    BasicResidualFunction,
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
    StageTransition,
)
from tf_revnet.layers.reversible_block_stack import StackedVariable


def make_block(kind="basic", half=4, dtype="float64", coupling="additive"):
    size = half if coupling == "additive" else 2 * half
    return ReversibleBlock(
        residual_function(kind, size, dtype), residual_function(kind, size, dtype),
        coupling=coupling, dtype=dtype,
    )


def separate_blocks(stack, input_shape, use_custom_gradient=False):
    """A sequence of `stack.depth` separate blocks holding the stack's values, slice by slice."""
    config = stack.block.get_config()
    blocks = [ReversibleBlock.from_config(config) for _ in range(stack.depth)]
    sequence = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient,
                                  fuse_identical_blocks=False, dtype=stack.dtype_policy)
    sequence.build(input_shape)
    for i, block in enumerate(blocks):
        for target, stacked in zip(block.trainable_variables + block.non_trainable_variables,
                                   stack.trainable_variables + stack.non_trainable_variables):
            target.assign(stacked.value[i])
    return sequence


def stacked_gradients(grads, depth, per_block):
    """[dx, dW_block1..., dW_block2..., ...] -> [dx, dW_stacked...] (the stack's variable order)."""
    return [grads[0]] + [
        tf.stack([grads[1 + i * per_block + p] for i in range(depth)]) for p in range(per_block)
    ]


def unstacked_state(stack):
    return [v.numpy()[i] for i in range(stack.depth) for v in stack.non_trainable_variables]


# --- equal to separate blocks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, mode, dtype",
    [
        ("basic", "eager", "float64"), ("basic", "function", "float64"),
        ("basic", "function", "float32"), ("basic", "xla", "float64"),
        ("bottleneck", "function", "float64"), ("dropout", "function", "float64"),
        ("noise", "eager", "float64"),
    ],
)
def test_reversible_stack_equals_separate_blocks(kind, mode, dtype):
    """Algorithm 1 over a stack: loss, gradients, BN statistics and seed states as separate blocks."""
    shape = (3, 6, 6, 8)
    stack = ReversibleBlockStack(make_block(kind, dtype=dtype), depth=4)
    sequence = ReversibleSequence([stack], dtype=dtype)
    sequence.build(shape)
    reference = separate_blocks(stack, shape)
    x = random_input(shape, dtype=dtype)
    loss, grads = loss_and_gradients(sequence, x, mode=mode)
    loss_ref, grads_ref = loss_and_gradients(reference, x, mode=mode)
    per_block = len(stack.block.trainable_variables)
    assert len(grads) == 1 + per_block
    assert relative_error(loss, loss_ref) <= RTOL[dtype]
    assert_all_close_relative(grads, stacked_gradients(grads_ref, 4, per_block), RTOL[dtype],
                              what="gradient")
    # Moving statistics updated once per block and seed states advanced as the separate blocks'.
    reference_state = [v.numpy() for b in reference.units for v in b.non_trainable_variables]
    for actual, expected in zip(unstacked_state(stack), reference_state):
        np.testing.assert_allclose(actual, expected, rtol=1e-6 if dtype == "float32" else 1e-12)


def test_plain_autodiff_through_the_stack_equals_separate_blocks():
    """The stack as an ordinary layer (the loop differentiated by autodiff), in float32 and `fit`."""
    shape = (2, 6, 6, 8)
    stack = ReversibleBlockStack(make_block(dtype="float32", coupling="affine"), depth=3)
    stack.build(shape)
    reference = separate_blocks(stack, shape)
    x = random_input(shape, dtype="float32")
    _, grads = loss_and_gradients(stack, x, mode="function")
    _, grads_ref = loss_and_gradients(reference, x, mode="function")
    per_block = len(stack.block.trainable_variables)
    assert_all_close_relative(grads, stacked_gradients(grads_ref, 3, per_block), RTOL["float32"],
                              what="gradient")


def test_whole_model_gradients_equal_per_block_layers():
    """A RevNet with stacks against the same RevNet with one layer per block and plain autodiff."""
    import tf_revnet.models

    def build(stack_blocks, use_custom_gradient):
        return tf_revnet.models.RevNet(
            units=[3, 3], widths=[8, 8, 16], input_shape=(8, 8, 3), classes=4,
            stack_blocks=stack_blocks, use_custom_gradient=use_custom_gradient,
        )

    stacked, per_block = build(True, True), build(False, False)
    assert stacked.count_params() == per_block.count_params()
    assert len(stacked.trainable_variables) < len(per_block.trainable_variables)
    # Pair every variable of `stacked` with the variables of `per_block` it stands for.
    pairs = []
    units = iter(per_block.get_layer("revnet_body").units)
    for unit in stacked.get_layer("revnet_body").units:
        if isinstance(unit, ReversibleBlockStack):
            blocks = [next(units) for _ in range(unit.depth)]
            for p, v in enumerate(unit.trainable_variables + unit.non_trainable_variables):
                pairs.append((v, [(b.trainable_variables + b.non_trainable_variables)[p]
                                  for b in blocks]))
        else:
            pairs += [(v, [r]) for v, r in zip(unit.variables, next(units).variables)]
    for layer, reference in zip(stacked.layers[2:], per_block.layers[2:]):  # the head
        pairs += [(v, [r]) for v, r in zip(layer.variables, reference.variables)]
    assert len(pairs) == len(stacked.variables)
    for v, references in pairs:
        v.assign(np.stack([r.numpy() for r in references]) if len(references) > 1 or
                 len(v.shape) > len(references[0].shape) else references[0].numpy())

    x = random_input((2, 8, 8, 3), dtype="float32")

    def gradients(model):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * tf.constant([1.0, -2.0, 3.0, 0.5]))
        return loss, dict(zip([id(v) for v in model.trainable_variables],
                              tape.gradient(loss, model.trainable_variables)))

    loss, grads = gradients(stacked)
    loss_ref, grads_ref = gradients(per_block)
    assert relative_error(loss, loss_ref) <= RTOL["float32"]
    for v, references in pairs:
        if v.trainable:
            expected = [grads_ref[id(r)] for r in references]
            expected = tf.stack(expected) if len(v.shape) > len(references[0].shape) else expected[0]
            assert relative_error(grads[id(v)], expected) <= RTOL["float32"], v.path


# --- structure ---------------------------------------------------------------------------------------


def test_variables_are_stacked_once_per_weight():
    stack = ReversibleBlockStack(make_block(dtype="float32"), depth=5, name="stage")
    stack.build((None, 6, 6, 8))
    block = stack.block
    assert len(stack.variables) == len(block.variables)
    for v, t in zip(stack.trainable_variables + stack.non_trainable_variables,
                    block.trainable_variables + block.non_trainable_variables):
        assert tuple(v.shape) == (5,) + tuple(t.shape)
        assert v.trainable == t.trainable
    assert len({v.path for v in stack.variables}) == len(stack.variables)
    assert stack.count_params() == 5 * block.count_params()
    # Each block initialised independently, as separate layers would be.
    kernel = next(v for v in stack.trainable_variables if "kernel" in v.path).numpy()
    assert not np.allclose(kernel[0], kernel[1])
    assert all(w.path.startswith("stage/") for w in stack.variables)


def test_graph_and_variables_do_not_grow_with_depth():
    """The traced training step of a stack has the same node count at depth 2 and 12."""

    def count(depth):
        stack = ReversibleBlockStack(make_block(dtype="float32"), depth=depth)
        sequence = ReversibleSequence([stack])
        sequence.build((2, 6, 6, 8))

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                y = sequence(x, training=True)
            return tape.gradient(tf.reduce_sum(y * y), sequence.trainable_variables)

        graph = step.get_concrete_function(tf.TensorSpec((2, 6, 6, 8))).graph
        nodes = len(graph.as_graph_def().node) + sum(
            len(f.node_def) for f in graph.as_graph_def().library.function)
        return nodes, len(sequence.variables)

    assert count(2) == count(12)


def test_inverse_rebuilds_the_input():
    stack = ReversibleBlockStack(make_block(), depth=3)
    x = random_input()
    y = stack(x, training=False)
    np.testing.assert_allclose(stack.inverse(y, training=False).numpy(), x.numpy(), atol=1e-12)
    sequence = ReversibleSequence([stack])
    np.testing.assert_allclose(sequence.inverse(y, training=False).numpy(), x.numpy(), atol=1e-12)


def test_layer_contract(tmp_path):
    stack = ReversibleBlockStack(
        ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4)), depth=3
    )
    check_layer(stack, (None, 6, 6, 8), num_trainable_weights=12, tmp_path=tmp_path)


def test_model_save_load_keeps_stacks(tmp_path):
    inputs = keras.Input((6, 6, 8))
    stack = ReversibleBlockStack(make_block(dtype="float32"), depth=3, name="stack")
    body = ReversibleSequence([StageTransition(8, strides=1), stack], name="body")
    model = keras.Model(inputs, body(inputs))
    x = random_input(dtype="float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    unit = reloaded.get_layer("body").units[1]
    assert isinstance(unit, ReversibleBlockStack) and unit.depth == 3
    np.testing.assert_allclose(reloaded(x, training=False), model(x, training=False), atol=1e-6)


def test_reconstruction_error_reports_each_block_of_a_stack():
    stack = ReversibleBlockStack(make_block(), depth=3, name="stack")
    report = reconstruction_error(ReversibleSequence([stack]), random_input())
    names = [b.name for b in report.blocks]
    assert names == ["stack[0]", "stack[1]", "stack[2]"]
    assert max(b.relative_error for b in report.blocks) < 1e-12


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [BasicResidualFunction(4), "basic", None])
def test_block_must_be_a_reversible_block(block):
    with pytest.raises(ValueError, match="`block` must be a tf_revnet.layers.ReversibleBlock"):
        ReversibleBlockStack(block, depth=2)


@pytest.mark.parametrize("depth", [0, -1, 2.5, True, "3", np.float32(3), np.int64(0)])
def test_depth_must_be_a_positive_int(depth):
    with pytest.raises(ValueError, match="`depth` must be a positive integer"):
        ReversibleBlockStack(make_block(), depth=depth)


@pytest.mark.parametrize("depth", [np.int64(3), np.int32(3), 3])
def test_depth_of_any_integer_type_is_stored_as_int(depth):
    stack = ReversibleBlockStack(make_block(), depth=depth)
    assert type(stack.depth) is int and stack.depth == 3
    assert json.loads(json.dumps(stack.get_config()))["depth"] == 3


def test_odd_channels_raise_on_build():
    stack = ReversibleBlockStack(make_block(), depth=2)
    with pytest.raises(ValueError, match="even"):
        stack.build((None, 6, 6, 7))


# --- higher order, forward mode, replay check ----------------------------------------------------------


def dense_stack_pair(depth=3):
    def block():
        return ReversibleBlock(keras.layers.Dense(2, activation="tanh", dtype="float64"),
                               keras.layers.Dense(2, activation="tanh", dtype="float64"),
                               dtype="float64")

    stack = ReversibleBlockStack(block(), depth=depth)
    reversible = ReversibleSequence([stack], dtype="float64")
    reversible.build((3, 4))
    return reversible, separate_blocks(stack, (3, 4))


def test_hessian_vector_product_through_a_stack():
    reversible, reference = dense_stack_pair()
    x = random_input((3, 4))

    def hvp(seq):
        v = [tf.ones_like(w) for w in seq.trainable_variables]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(tf.sin(seq(x, training=True)))
            grads = inner.gradient(loss, seq.trainable_variables)
            gv = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(grads, v)])
        return [x] + outer.gradient(gv, seq.trainable_variables)

    per_block = len(reversible.units[0].block.trainable_variables)
    assert_all_close_relative(hvp(reversible), stacked_gradients(hvp(reference), 3, per_block),
                              RTOL["float64"], "HVP")


def test_forward_mode_jvp_through_a_stack():
    reversible, reference = dense_stack_pair()
    x, tangent = random_input((3, 4), seed=1), random_input((3, 4), seed=2)
    jvps = []
    for seq in (reversible, reference):
        with tf.autodiff.ForwardAccumulator(x, tangent) as acc:
            y = seq(x, training=True)
        jvps.append(acc.jvp(y))
    assert jvps[0] is not None
    assert_all_close_relative([jvps[0]], [jvps[1]], RTOL["float64"])


class TFUniformNoise(keras.layers.Layer):
    def call(self, x, training=None):
        return x * tf.random.uniform(tf.shape(x), dtype=x.dtype)


def test_unreplayable_randomness_in_a_stack_raises_naming_it():
    block = ReversibleBlock(TFUniformNoise(dtype="float64"), keras.layers.Dense(2, dtype="float64"),
                            dtype="float64")
    seq = ReversibleSequence(
        [ReversibleBlock(keras.layers.Dense(2, dtype="float64"), keras.layers.Dense(2, dtype="float64"),
                         dtype="float64"),
         ReversibleBlockStack(block, depth=2, name="noisy_stack")],
        dtype="float64",
    )
    with pytest.raises(ValueError, match=r"units\[1\].*noisy_stack.*keras.random"):
        seq(random_input((3, 4)), training=True)


class Scale:
    """A plain Python object: Keras cannot capture it in a layer's automatic config."""

    value = 2.0


class NoConfigScale(keras.layers.Layer):
    """A residual function whose constructor argument cannot be serialized (no get_config)."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return self.scale.value * x


def test_residual_function_that_cannot_be_copied_is_named():
    block = ReversibleBlock(keras.layers.Dense(2), NoConfigScale(Scale(), name="my_g"))
    stack = ReversibleBlockStack(block, depth=2)
    with pytest.raises(ValueError, match=r"residual function G \(layer 'my_g'.*get_config"):
        stack.build((3, 4))


# --- freezing and regularizers (as for per-block layers) -------------------------------------------


def test_frozen_stack_runs_like_frozen_separate_blocks():
    """`trainable = False` freezes the blocks: BatchNorm uses moving statistics, no weight moves."""
    shape = (3, 6, 6, 8)
    stack = ReversibleBlockStack(make_block(), depth=3)
    sequence = ReversibleSequence([stack], dtype="float64")
    sequence.build(shape)
    reference = separate_blocks(stack, shape)
    stack.trainable = False
    for block in reference.units:
        block.trainable = False
    assert stack.trainable_variables == []
    x = random_input(shape)
    for layer in (stack, sequence):
        for training in (True, False):
            np.testing.assert_allclose(layer(x, training=training), reference(x, training=training),
                                       rtol=1e-10, atol=1e-12)
    loss, grads = loss_and_gradients(sequence, x, mode="function")
    loss_ref, grads_ref = loss_and_gradients(reference, x, mode="function")
    assert len(grads) == 1 and relative_error(grads[0], grads_ref[0]) <= RTOL["float64"]
    stack.trainable = True
    stack(x, training=True)
    assert len(stack.trainable_variables) == len(stack.block.trainable_variables) == 12


def test_model_with_frozen_body_fits_its_head():
    import tf_revnet.models

    model = tf_revnet.models.RevNet(units=[2, 3], widths=[8, 8, 16], input_shape=(8, 8, 3), classes=3)
    model.get_layer("revnet_body").trainable = False
    before = [v.numpy().copy() for v in model.get_layer("revnet_body").variables]
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    model.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    for b, v in zip(before, model.get_layer("revnet_body").variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_kernel_regularizer_kept_per_slice():
    import tf_revnet.models

    losses = []
    for stack_blocks in (True, False):
        keras.utils.set_random_seed(0)
        model = tf_revnet.models.RevNet(
            units=[1, 3], widths=[8, 8, 8], input_shape=(8, 8, 3), classes=3,
            kernel_regularizer=keras.regularizers.L2(1e-2), stack_blocks=stack_blocks,
        )
        # The penalty of a stacked kernel is the sum of its slices' penalties.
        losses.append(sum(
            float(keras.regularizers.L2(1e-2)(v)) for v in model.trainable_variables
            if "kernel" in v.path
        ))
        assert float(tf.add_n(model.losses)) == pytest.approx(losses[-1], rel=1e-5)
    assert len(losses) == 2


@pytest.mark.parametrize("stack_blocks", [True, False], ids=["stacked", "per-block"])
def test_freeze_and_unfreeze_between_fits_matches_plain_autodiff(stack_blocks):
    """Fine-tuning order: fit, freeze a unit, fit, unfreeze it, fit (the plan follows the flags).

    Reference: the same model and steps with plain autodiff (`use_custom_gradient=False`).
    """
    import tf_revnet.models

    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.arange(4) % 3
    runs = {}
    for custom in (True, False):
        keras.utils.set_random_seed(0)
        model = tf_revnet.models.RevNet(units=(3, 3), widths=(8, 8, 16), input_shape=(8, 8, 3),
                                        classes=3, stack_blocks=stack_blocks,
                                        use_custom_gradient=custom)
        body = model.get_layer("revnet_body")
        unit = [u for u in body.units if isinstance(u, (ReversibleBlockStack, ReversibleBlock))][1]
        history = []
        for step in ("fit", "freeze", "fit", "unfreeze", "fit"):
            if step == "fit":
                before = [v.numpy().copy() for v in unit.variables]
                model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                              run_eagerly=True)  # the plan is mode-independent; eager is quick
                loss = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"][0]
                moved = any(not np.array_equal(a, v.numpy()) for a, v in zip(before, unit.variables))
                history.append((loss, moved, unit.trainable))
            else:
                unit.trainable = step == "unfreeze"
        runs[custom] = (history, [v.numpy() for v in model.weights])
    (history, weights), (history_ref, weights_ref) = runs[True], runs[False]
    assert [(moved, trainable) for _, moved, trainable in history] == [
        (True, True), (False, False), (True, True)]
    assert [m for _, m, _ in history_ref] == [True, False, True]
    np.testing.assert_allclose([h[0] for h in history], [h[0] for h in history_ref], rtol=1e-5)
    for got, want in zip(weights, weights_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_trainable_flags_follow_the_template_and_reading_changes_nothing():
    """A stacked variable's flag IS its template variable's: it changes when the template's does,
    with no property read in between, and reading `variables`/`weights` changes no flag."""
    stack = ReversibleBlockStack(make_block(dtype="float32"), depth=3)
    stack.build((None, 4, 4, 8))
    f_stacked = [stack.stacked_variable(v) for v in stack.block.f.trainable_variables]
    g_stacked = [stack.stacked_variable(v) for v in stack.block.g.trainable_variables]
    assert f_stacked and all(isinstance(v, StackedVariable) and v.trainable for v in f_stacked)
    stack.block.f.trainable = False
    assert [v.trainable for v in f_stacked] == [False] * len(f_stacked)  # nothing read yet
    assert all(v.trainable for v in g_stacked)
    flags = [v.trainable for v in stack.stacked_variables]
    _ = stack.variables, stack.weights, stack.trainable_variables, stack.non_trainable_weights
    assert [v.trainable for v in stack.stacked_variables] == flags
    assert {id(v) for v in stack.trainable_variables} == {id(v) for v in g_stacked}
    # The whole stack: Keras' semantics of a parent's flag (it sets its sub-layers').
    stack.trainable = False
    assert not stack.block.trainable and stack.trainable_variables == []
    stack.trainable = True
    assert stack.block.trainable and stack.block.f.trainable
    assert len(stack.trainable_variables) == len(f_stacked) + len(g_stacked)
    # Setting a stacked variable's flag sets its template variable's.
    f_stacked[0].trainable = False
    assert not f_stacked[0].template.trainable
    # A stack made frozen (e.g. from a config) freezes its template.
    frozen = ReversibleBlockStack.from_config(
        {**stack.get_config(), "trainable": False, "name": "frozen_stack"})
    frozen.build((None, 4, 4, 8))
    assert not frozen.block.trainable and frozen.trainable_variables == []
    assert len(frozen.non_trainable_weights) == len(frozen.weights) > 0


def test_unfrozen_stack_trains_with_an_optimizer_built_before_any_call():
    """Unfreeze after `compile` built the optimizer of a frozen model, recompile, and the first
    step trains the stacked weights (the optimizer sees them without a call in between)."""
    import tf_revnet.models

    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.arange(4) % 3
    model = tf_revnet.models.RevNet(units=(3, 3), widths=(8, 8, 16), input_shape=(8, 8, 3),
                                    classes=3)
    stack = [u for u in model.get_layer("revnet_body").units
             if isinstance(u, ReversibleBlockStack)][0]
    stack.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    assert not {id(v) for v in stack.stacked_variables} & {
        id(v) for v in model.trainable_variables}
    stack.trainable = True
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)  # as `fit` does, before its first call
    trained = [v for v in stack.stacked_variables if v.trainable]
    before = [v.numpy().copy() for v in trained]
    model.fit(x, y, batch_size=4, verbose=0)
    assert trained and all(not np.array_equal(b, v.numpy()) for b, v in zip(before, trained))


@pytest.mark.parametrize("frozen", ["f"])  # G: the same code path
def test_freezing_a_residual_function_of_the_template_freezes_its_stacked_weights(frozen):
    """`stack.block.f.trainable = False` after training: F's slices stay, G's train, as per block."""
    import tf_revnet.models

    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.arange(4) % 3
    results = {}
    for custom in (True, False):
        keras.utils.set_random_seed(0)
        model = tf_revnet.models.RevNet(units=(3, 3), widths=(8, 8, 16), input_shape=(8, 8, 3),
                                        classes=3, use_custom_gradient=custom)
        stack = [u for u in model.get_layer("revnet_body").units
                 if isinstance(u, ReversibleBlockStack)][0]
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", run_eagerly=True)
        model.fit(x, y, batch_size=4, verbose=0)
        getattr(stack.block, frozen).trainable = False
        layer = getattr(stack.block, frozen)
        frozen_paths = {stack._stacked[id(v)].path for v in layer.variables}
        assert len(stack.trainable_variables) == 6  # the other function's conv/BN weights
        assert not frozen_paths & {v.path for v in stack.trainable_variables}
        assert not frozen_paths & {v.path for v in model.trainable_variables}  # before any call
        before = {v.path: v.numpy().copy() for v in stack.variables}
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", run_eagerly=True)
        model.fit(x, y, batch_size=4, verbose=0)
        for v in stack.variables:
            moved = not np.array_equal(before[v.path], v.numpy())
            assert moved == (v.path not in frozen_paths), v.path
        results[custom] = [v.numpy() for v in model.weights]
    for got, want in zip(results[True], results[False]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_stacked_revnet_exports_a_saved_model(tmp_path):
    """`model.export` / `tf.saved_model.save` of a RevNet whose stages are stacks, then serving."""
    import tf_revnet.models

    keras.utils.set_random_seed(0)
    model = tf_revnet.models.RevNet(units=(3, 3), widths=(8, 8, 16), input_shape=(8, 8, 3), classes=3)
    assert any(isinstance(u, ReversibleBlockStack) for u in model.get_layer("revnet_body").units)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    model.export(str(tmp_path / "export"))
    loaded = tf.saved_model.load(str(tmp_path / "export"))  # kept: it owns the variables
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served, model(x, training=False), rtol=1e-5, atol=1e-6)
    tf.saved_model.save(model, str(tmp_path / "saved"))  # the object graph itself must be savable


# --- everything a Keras weight carries survives stacking (against the same blocks unstacked) -------


@keras.saving.register_keras_serializable(package="tests")
class GramPenalty(keras.regularizers.Regularizer):
    """`factor * sum((W^T W - I)^2)` for a matrix `W`: a regularizer that needs its weight's own rank."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, w):
        if len(w.shape) != 2:
            raise ValueError(f"GramPenalty needs a matrix. Received: shape={tuple(w.shape)}")
        gram = tf.matmul(w, w, transpose_a=True) - tf.eye(w.shape[1], dtype=w.dtype)
        return self.factor * tf.reduce_sum(gram * gram)

    def get_config(self):
        return {"factor": self.factor}


def dense_block(**kernel):
    """A block on `(N, T, 8)` with F and G `Dense(4)` layers whose kernels carry `kernel` arguments."""
    def function():
        return keras.layers.Dense(4, activation="tanh", dtype="float64", **kernel)

    return ReversibleBlock(function(), function(), dtype="float64")


def fit_pair(block, depth=3, steps=3):
    """A stack of `block` and the same blocks unstacked (its values), each fitted `steps` SGD steps."""
    stack = ReversibleBlockStack(block, depth=depth)
    inputs = keras.Input((5, 8), dtype="float64")
    stacked = keras.Model(inputs, ReversibleSequence([stack], dtype="float64")(inputs))
    separate = separate_blocks(stack, (None, 5, 8), use_custom_gradient=True)
    per_block = keras.Model(inputs, separate(inputs))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4 * steps, 5, 8)), rng.standard_normal((4 * steps, 5, 8))
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")  # Keras adds a float64 penalty to the loss in floatx only
    try:
        for model in (stacked, per_block):
            model.compile(keras.optimizers.SGD(0.5), "mse")
            model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_floatx(floatx)
    return stack, separate


@pytest.mark.parametrize(
    "constraint",
    [keras.constraints.NonNeg(), keras.constraints.MaxNorm(0.5), keras.constraints.UnitNorm(),
     keras.constraints.MinMaxNorm(0.2, 0.6)],
    ids=["NonNeg", "MaxNorm", "UnitNorm", "MinMaxNorm"],
)
def test_constraints_act_per_block_as_on_separate_blocks(constraint):
    stack, separate = fit_pair(dense_block(kernel_constraint=constraint))
    kernels = [v for v in stack.trainable_variables if "kernel" in v.path]
    assert kernels and all(v.constraint is not None for v in kernels)
    for i, block in enumerate(separate.units):
        for stacked, reference in zip(stack.trainable_variables, block.trainable_variables):
            np.testing.assert_allclose(stacked.numpy()[i], reference.numpy(), rtol=1e-12, atol=1e-12)
        for kernel in (v for v in block.trainable_variables if "kernel" in v.path):
            np.testing.assert_allclose(kernel.numpy(), constraint(kernel).numpy(), rtol=1e-6, atol=1e-12)
    if isinstance(constraint, keras.constraints.MaxNorm):
        norms = np.sqrt(np.sum(kernels[0].numpy() ** 2, axis=1))  # per block, per column
        assert norms.max() <= 0.5 + 1e-12


@pytest.mark.parametrize(
    "regularizer",
    [keras.regularizers.L2(0.1), keras.regularizers.L1L2(0.01, 0.1), GramPenalty(0.5)],
    ids=["L2", "L1L2", "Gram"],
)
def test_regularizers_act_per_block_as_on_separate_blocks(regularizer):
    stack, separate = fit_pair(dense_block(kernel_regularizer=regularizer))
    assert len(stack.losses) == 2  # one per stacked kernel (F's and G's)
    np.testing.assert_allclose(float(tf.add_n(stack.losses)), float(tf.add_n(separate.losses)),
                               rtol=1e-12)
    for i, block in enumerate(separate.units):
        for stacked, reference in zip(stack.trainable_variables, block.trainable_variables):
            np.testing.assert_allclose(stacked.numpy()[i], reference.numpy(), rtol=1e-12, atol=1e-12)


def test_regularizer_that_fails_on_a_block_weight_names_the_stack():
    function = keras.layers.Conv2D(4, 3, padding="same",
                                   kernel_regularizer=keras.regularizers.OrthogonalRegularizer())
    stack = ReversibleBlockStack(ReversibleBlock(function, keras.layers.Identity()), depth=2,
                                 name="my_stack")
    with pytest.raises(ValueError, match=r"my_stack.*OrthogonalRegularizer.*\(3, 3, 4, 4\).*Fix"):
        stack.build((None, 6, 6, 8))


def test_initializers_draw_each_block_and_dtypes_follow_the_template():
    stack = ReversibleBlockStack(dense_block(bias_initializer="random_normal"), depth=3)
    stack.build((None, 5, 8))
    for template, stacked in zip(stack.block.variables, stack.variables):
        assert stack.stacked_variable(template) is stacked
        assert stacked.dtype == template.dtype and stacked._autocast == template._autocast
        values = stacked.numpy()
        if template.trainable:
            assert not np.allclose(values[0], values[1]), template.path


def test_lambda_residual_function_is_copied_per_block():
    def make_lambda_block():
        return ReversibleBlock(
            keras.layers.Lambda(lambda x: 0.5 * keras.ops.tanh(x), output_shape=lambda shape: shape,
                                dtype="float64"),
            keras.layers.Dense(4, dtype="float64"), dtype="float64")

    stack = ReversibleBlockStack(make_lambda_block(), depth=2)
    x = random_input((2, 5, 8))
    stack.build(x.shape)
    reference = ReversibleSequence([make_lambda_block() for _ in range(2)], dtype="float64",
                                   use_custom_gradient=False, fuse_identical_blocks=False)
    reference.build(x.shape)
    for i, block in enumerate(reference.units):
        for target, stacked in zip(block.trainable_variables, stack.trainable_variables):
            target.assign(stacked.value[i])
    np.testing.assert_allclose(stack(x), reference(x), rtol=1e-12)


def test_residual_function_refused_by_safe_mode_names_it_and_the_fix():
    function = keras.Sequential([keras.layers.Dense(4), keras.layers.Lambda(lambda x: 2.0 * x)],
                                name="my_f")
    stack = ReversibleBlockStack(ReversibleBlock(function, keras.layers.Dense(4)), depth=2)
    with pytest.raises(ValueError, match=r"residual function F \(layer 'my_f'.*safe mode.*Fix:.*"
                                         r"enable_unsafe_deserialization"):
        stack.build((None, 5, 8))
