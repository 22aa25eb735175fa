"""Tests of tf_revnet/layers/unit.py: the unit protocol, against plain autodiff on the same weights."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tests.test_case import assert_all_close_relative, loss_and_gradients, relative_error
from tf_revnet.layers import unit as unit_lib


def x64(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), tf.float64)


def block(half=4, dropout=False):
    def function():
        layers = [keras.layers.Dense(half, activation="tanh", dtype="float64")]
        if dropout:
            layers.append(keras.layers.Dropout(0.3, dtype="float64"))
        return keras.Sequential(layers)

    return tf_revnet.ReversibleBlock(function(), function(), dtype="float64")


def docs_custom_unit():
    """`ChannelScale` and `ChannelScaleUnit` as docs/architectures.md defines them (its code, executed)."""
    guide = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "architectures.md").read_text()
    code = next(block for block in guide.split("```python")[1:] if "class ChannelScale" in block)
    namespace = {"tf": tf, "tf_revnet": tf_revnet, "keras": keras}
    exec(code.split("```")[0], namespace)  # noqa: S102 - the project's own docs
    return namespace["ChannelScale"], namespace["ChannelScaleUnit"]


def test_as_unit_picks_each_kind():
    stack = tf_revnet.ReversibleBlockStack(block(), depth=3)
    layers = [keras.layers.Dense(8, dtype="float64"), block(), stack]
    x = keras.Input((5, 8), dtype="float64")
    for layer in layers:
        x = layer(x)
    kinds = [type(unit_lib.as_unit(layer)) for layer in layers]
    assert kinds == [unit_lib.StoredInputUnit, unit_lib.BlockUnit, unit_lib.LoopUnit]
    loop = unit_lib.as_unit(stack)
    assert loop.depth == 3 and loop.stacked
    assert [tuple(v.shape)[0] for v in loop.trainable] == [3] * len(stack.block.trainable_variables)


def test_stored_input_unit_backward_equals_autodiff():
    layer = keras.layers.Dense(6, activation="tanh", dtype="float64")
    x = x64((3, 5))
    layer.build(x.shape)
    unit = unit_lib.as_unit(layer)
    values = unit_lib.read_values(unit)
    y, record, after = unit.forward(values, x)
    dy = x64((3, 6), seed=1)
    x_back, dx, dweights = unit.backward(values, record, y, dy)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
    expected = tape.gradient(out, [x] + layer.trainable_variables, output_gradients=dy)
    assert x_back is not None and relative_error(x_back, x) == 0.0
    assert_all_close_relative([dx] + list(dweights), expected, 1e-12)
    assert after.state == ()


@pytest.mark.parametrize("dropout", [False, True])
def test_loop_over_blocks_equals_block_units(dropout):
    blocks = [block(dropout=dropout) for _ in range(3)]
    x = x64((2, 5, 8))
    for b in blocks:
        b.build(x.shape)
    units = [unit_lib.as_unit(b) for b in blocks]
    loop = unit_lib.LoopUnit.for_blocks(units)
    halves = blocks[0].split(x)
    values = loop.pack(unit_lib.read_values(loop))
    y, record, after = loop.forward(values, halves)
    # Block by block, with the state and seed threaded as the loop does.
    h, rng, states = halves, values.rng, []
    for u in units:
        h, _, block_after = u.forward(unit_lib.read_values(u).replace(rng=rng), h)
        rng = block_after.rng
        states.extend(block_after.state)
    assert_all_close_relative(y, h, 1e-14)
    assert_all_close_relative(loop.unpack_state(after.state), states, 1e-14)
    # The loop's backward rebuilds its input and gives the blocks' gradients, stacked.
    dy = (x64((2, 5, 4), seed=2), x64((2, 5, 4), seed=3))
    x_back, dx, dweights = loop.backward(values, record, y, dy)
    assert_all_close_relative(x_back, halves, 1e-10)
    grads, g = [], dy
    block_y = y
    for u, block_record in zip(reversed(units), reversed(_block_records(units, halves, values))):
        block_y, g, block_grads = u.backward(unit_lib.read_values(u), block_record, block_y, g)
        grads.insert(0, block_grads)
    assert_all_close_relative(dx, g, 1e-10)
    stacked = [tf.stack([grads[i][p] for i in range(3)]) for p in range(len(grads[0]))]
    assert_all_close_relative(dweights, stacked, 1e-10)


def _block_records(units, halves, values):
    """Each block's record, the state and seed threaded from block to block."""
    h, rng, records = halves, values.rng, []
    for u in units:
        h, record, after = u.forward(unit_lib.read_values(u).replace(rng=rng), h)
        records.append(record)
        rng = after.rng
    return records


def test_loop_pack_and_unpack_are_inverse():
    blocks = [block() for _ in range(4)]
    for b in blocks:
        b.build((None, 8))
    loop = unit_lib.LoopUnit.for_blocks([unit_lib.as_unit(b) for b in blocks])
    values = unit_lib.read_values(loop)
    packed = loop.pack(values)
    assert len(packed.weights) == len(blocks[0].trainable_variables)
    assert tuple(packed.weights[0].shape)[0] == 4
    np.testing.assert_array_equal(packed.weights[1][2], blocks[2].trainable_variables[1].numpy())


def test_docs_custom_unit_in_a_sequence_equals_plain_autodiff():
    ChannelScale, ChannelScaleUnit = docs_custom_unit()

    def sequence(use_custom_gradient):
        keras.utils.set_random_seed(3)
        units = [block(), ChannelScale(dtype="float64"), block()]
        return tf_revnet.ReversibleSequence(units, use_custom_gradient=use_custom_gradient,
                                            dtype="float64")

    reversible, plain = sequence(True), sequence(False)
    x = x64((2, 5, 8))
    reversible(x)
    plain(x)
    scale = reversible.units[1].log_scale
    scale.assign(np.random.default_rng(1).standard_normal(scale.shape))
    for target, source in zip(plain.variables, reversible.variables):
        target.assign(source)
    assert type(reversible._get_plan().units[1]) is ChannelScaleUnit
    for mode in ("eager", "function"):
        loss_r, grads_r = loss_and_gradients(reversible, x, mode=mode)
        loss_p, grads_p = loss_and_gradients(plain, x, mode=mode)
        assert relative_error(loss_r, loss_p) <= 1e-12
        assert_all_close_relative(grads_r, grads_p, 1e-10, what="gradient")
    np.testing.assert_allclose(reversible.inverse(reversible(x, training=True), training=True), x,
                               atol=1e-12)


def test_unit_without_backward_says_what_to_implement():
    layer = keras.layers.Dense(2)
    layer.build((None, 2))

    class Incomplete(unit_lib.Unit):
        pass

    with pytest.raises(NotImplementedError, match="must implement backward"):
        Incomplete(layer).backward(None, None, None, None)
    with pytest.raises(ValueError, match="not invertible"):
        Incomplete(layer).inverse(None, None)


def test_structure_signature_tells_structures_apart():
    a, b, c = block(), block(), block(half=4, dropout=True)
    for layer in (a, b, c):
        layer.build((None, 8))
    signature = [unit_lib.as_unit(layer).signature for layer in (a, b, c)]
    assert signature[0] == signature[1] != signature[2]
