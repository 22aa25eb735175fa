"""Tests of `tf_revnet.transfer_weights`: weights between stacked and per-block reversible blocks.

Every check is exact: float64 models with random weights and random BatchNorm moving statistics, whose
inference-mode predictions must differ by 0.0 after the transfer. The variables are also compared by
name, independently of the module's order-based walk: a stack named `f"{p}_blocks{a}to{b}"` holds
blocks `f"{p}_block{a}"` ... `f"{p}_block{b}"`, whose variables are keyed by their path inside the
block.
"""

import re
import warnings

import keras
import numpy as np
import pytest

import tf_revnet
from tf_revnet.layers import (
    BasicResidualFunction,
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
)
from tf_revnet.models import RevNet


@pytest.fixture(autouse=True)
def float64():
    # Keras caches the global dtype policy on first use, so `set_floatx` alone would not reach it.
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous_floatx)
    keras.config.set_dtype_policy(previous_policy)


def _revnet(stack_blocks, units=(2, 3), widths=(8, 8, 16), name="revnet"):
    return RevNet(units=units, widths=widths, input_shape=(16, 16, 3), classes=10,
                  stack_blocks=stack_blocks, name=name)


def _randomize(model, seed=7):
    """Random values for every variable: weights, positive BatchNorm variances, seed states."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if "int" in v.dtype:
            v.assign(rng.integers(1, 1000, size=v.shape).astype(v.dtype))
        elif "variance" in v.path:
            v.assign(rng.uniform(0.5, 1.5, size=v.shape))
        else:
            v.assign(rng.normal(0.0, 0.3, size=v.shape))
    return model


def _images(shape=(16, 16, 3), seed=0):
    return np.random.default_rng(seed).normal(size=(2,) + shape)


def _leaves(layer):
    """The blocks and other layers of a model, stacks expanded to `(stack, i)` per block."""
    if isinstance(layer, keras.Model):
        return [leaf for sub in layer.layers for leaf in _leaves(sub)]
    if isinstance(layer, ReversibleSequence):
        return [leaf for unit in layer.units for leaf in _leaves(unit)]
    if isinstance(layer, ReversibleBlockStack):
        return [(layer, i) for i in range(layer.depth)]
    return [(layer, None)]


def _named_values(model):
    """`{key: array}` of every weight, keyed by block name and path inside the block (see above)."""
    values = {}
    for layer, i in _leaves(model):
        if i is None and not isinstance(layer, ReversibleBlock):
            values.update({v.path: v.numpy() for v in layer.weights})
            continue
        if i is None:
            block_name, pairs = layer.name, [(v, v.numpy()) for v in layer.weights]
        else:
            prefix, first = re.fullmatch(r"(.*)_blocks(\d+)to\d+", layer.name).groups()
            block_name = f"{prefix}_block{int(first) + i}"
            pairs = [(v, layer.stacked_variable(v).numpy()[i]) for v in layer.block.weights]
        template = layer.name if i is None else layer.block.name
        for v, value in pairs:
            inside = v.path.split(f"/{template}/", 1)[1]
            values[f"{block_name}:{inside.replace(template, '')}"] = value
    return values


def _assert_same(source, target, x):
    """0.0 prediction difference in inference mode, and every weight (BN statistics too) equal."""
    expected = keras.ops.convert_to_numpy(source(x, training=False))
    got = keras.ops.convert_to_numpy(target(x, training=False))
    assert np.max(np.abs(got - expected)) == 0.0
    source_values, target_values = _named_values(source), _named_values(target)
    assert sorted(source_values) == sorted(target_values)
    assert any("moving_variance" in key for key in source_values)
    for key, value in source_values.items():
        np.testing.assert_array_equal(target_values[key], value, err_msg=key)


# --------------------------------------------------------------------------------------------------
# RevNets: stack_blocks=True -> False and back, through every kind of source.


@pytest.mark.parametrize("source_stacked", [True, False], ids=["stacked_to_blocks", "blocks_to_stacked"])
@pytest.mark.parametrize("via", ["model", "weights_h5", "keras_file", "get_weights"])
def test_revnet_weights_move_between_layouts(source_stacked, via, tmp_path):
    source = _randomize(_revnet(source_stacked))
    target = _revnet(not source_stacked)
    if via == "model":
        given = source
    elif via == "weights_h5":
        given = str(tmp_path / "source.weights.h5")
        source.save_weights(given)
    elif via == "keras_file":
        given = tmp_path / "source.keras"  # a pathlib.Path
        source.save(given)
    else:
        given = source.get_weights()
    assert tf_revnet.transfer_weights(given, target) is target
    _assert_same(source, target, _images())


def test_without_the_converter_keras_cannot_load_the_other_layout(tmp_path):
    """What `transfer_weights` is for: Keras' own loaders refuse the other layout."""
    source, target = _revnet(True), _revnet(False)
    path = str(tmp_path / "stacked.weights.h5")
    source.save_weights(path)
    with pytest.raises(ValueError, match="could not be loaded"):
        target.load_weights(path)
    with pytest.raises(ValueError):
        target.set_weights(source.get_weights())


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "blocks"])
@pytest.mark.parametrize("via", ["model", "weights_h5", "get_weights"])
def test_same_layout_is_a_plain_copy(stacked, via, tmp_path):
    source, target = _randomize(_revnet(stacked)), _revnet(stacked)
    given = {"model": source, "get_weights": source.get_weights()}.get(via)
    if via == "weights_h5":
        given = str(tmp_path / "same.weights.h5")
        source.save_weights(given)
    tf_revnet.transfer_weights(given, target)
    _assert_same(source, target, _images())


def test_revnet_nested_in_another_model(tmp_path):
    """A RevNet used as a layer of an outer functional model, both directions, model and file."""

    def outer(stacked):
        inner = _revnet(stacked)
        inputs = keras.Input((16, 16, 3))
        return keras.Model(inputs, keras.layers.Dense(3, name="extra")(inner(inputs)), name="outer")

    stacked, blocks = _randomize(outer(True)), outer(False)
    tf_revnet.transfer_weights(stacked, blocks)
    _assert_same(stacked, blocks, _images())
    path = str(tmp_path / "nested_blocks.weights.h5")
    _randomize(blocks, seed=11).save_weights(path)
    back = outer(True)
    tf_revnet.transfer_weights(path, back)
    _assert_same(blocks, back, _images())


# --------------------------------------------------------------------------------------------------
# A hand-built functional model: a ReversibleSequence of one stack against a list of blocks.


def _residual(name):
    """F or G on 2 of 4 channels: a Sequential with BatchNorm and a seeded Dropout."""
    return keras.Sequential(
        [keras.layers.Conv2D(2, 3, padding="same", name="conv"),
         keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, name="dropout")],
        name=name,
    )


def _hand_built(stacked, depth=3):
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 1, name="projection")(inputs)
    if stacked:
        units = [ReversibleBlockStack(
            ReversibleBlock(_residual("stage_block_f"), _residual("stage_block_g"), name="stage_block"),
            depth=depth, name=f"stage_blocks1to{depth}",
        )]
    else:
        units = [ReversibleBlock(_residual(f"stage_block{b}_f"), _residual(f"stage_block{b}_g"),
                                 name=f"stage_block{b}") for b in range(1, depth + 1)]
    h = ReversibleSequence(units, name="body")(h)
    outputs = keras.layers.Dense(5, name="classifier")(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs, name="hand_built")


def _dropout_seeds(model):
    """Per block, its two Dropout seed states (from the stack's stacked state, or the block's)."""
    seeds = []
    for layer, i in _leaves(model):
        if isinstance(layer, ReversibleBlockStack):
            seeds.append([layer.stacked_variable(v).numpy()[i] for v in layer.block.variables
                          if "seed" in v.path])
        elif isinstance(layer, ReversibleBlock):
            seeds.append([v.numpy() for v in layer.variables if "seed" in v.path])
    return seeds


@pytest.mark.parametrize("source_stacked", [True, False], ids=["stacked_to_blocks", "blocks_to_stacked"])
def test_hand_built_sequence_of_a_stack_and_of_blocks(source_stacked, tmp_path):
    x = _images((8, 8, 3))
    source = _randomize(_hand_built(source_stacked))
    target = _hand_built(not source_stacked)
    tf_revnet.transfer_weights(source, target)
    _assert_same(source, target, x)
    # The seed-generator states (in `variables`, not `weights`) came along: same Dropout masks.
    np.testing.assert_array_equal(_dropout_seeds(target), _dropout_seeds(source))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(target(x, training=True)),
                                  keras.ops.convert_to_numpy(source(x, training=True)))
    # Through a file and a list (which hold `weights`, so the blocks' own seed states stay).
    for given in ("file", "list"):
        target = _hand_built(not source_stacked)
        if given == "file":
            given = str(tmp_path / f"{given}.weights.h5")
            source.save_weights(given)
        else:
            given = source.get_weights()
        tf_revnet.transfer_weights(given, target)
        _assert_same(source, target, x)


# --------------------------------------------------------------------------------------------------
# What cannot be mapped: one line naming `stack_blocks` and the first layer that differs.


def _source(model, via, tmp_path):
    if via == "model":
        return model
    if via == "get_weights":
        return model.get_weights()
    path = str(tmp_path / "other.weights.h5")
    model.save_weights(path)
    return path


@pytest.mark.parametrize("via", ["model", "weights_h5", "get_weights"])
@pytest.mark.parametrize(
    "other, expected",
    [
        (dict(units=(2, 4)), r"'revnet_stage2_blocks2to4' \(3 blocks\)|\(3, 8\)"),
        (dict(widths=(8, 8, 32)), r"'revnet_stage2_block1' \(StageTransition\)|\(32,\)"),
    ],
    ids=["other_depth", "other_widths"],
)
def test_a_mismatch_is_one_line_naming_stack_blocks(other, expected, via, tmp_path):
    source = _revnet(True, **other)
    target = _revnet(False)
    before = [w.copy() for w in target.get_weights()]
    with pytest.raises(ValueError, match="`stack_blocks`") as info:
        tf_revnet.transfer_weights(_source(source, via, tmp_path), target)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(expected, message), message
    for old, new in zip(before, target.get_weights()):  # nothing was written
        np.testing.assert_array_equal(new, old)


def test_a_mismatch_names_the_stack_and_the_blocks():
    with pytest.raises(ValueError) as info:
        tf_revnet.transfer_weights(_revnet(True, units=(2, 4)), _revnet(False))
    assert str(info.value).startswith(
        "transfer_weights cannot map the weights of 'revnet_stage2_blocks2to4' (3 blocks) of model "
        "'revnet' onto 'revnet_stage2_block2' to 'revnet_stage2_block3' (2 blocks) of model 'revnet'"
    )


def test_bad_arguments_name_the_argument(tmp_path):
    target = _revnet(True)
    with pytest.raises(ValueError, match="`source` must be"):
        tf_revnet.transfer_weights(42, target)
    with pytest.raises(ValueError, match="`source` must be a path ending in"):
        tf_revnet.transfer_weights(str(tmp_path / "weights.ckpt"), target)
    with pytest.raises(ValueError, match="`source` must be an existing `.weights.h5` file"):
        tf_revnet.transfer_weights(str(tmp_path / "missing.weights.h5"), target)
    with pytest.raises(ValueError, match="`target` must be a keras.Model"):
        tf_revnet.transfer_weights(target, BasicResidualFunction())


def test_zoo_revnet38_through_a_weights_file_of_a_compiled_model(tmp_path):
    """RevNet-38 of the zoo, both ways through `.weights.h5` files that also hold optimizer state."""
    build = tf_revnet.models.get("revnet38")
    stacked, blocks = _randomize(build(stack_blocks=True)), build(stack_blocks=False)
    assert len(stacked.get_weights()) != len(blocks.get_weights())
    for model in (stacked, blocks):
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
    x = _images((32, 32, 3))
    path = str(tmp_path / "revnet38_stacked.weights.h5")
    stacked.save_weights(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tf_revnet.transfer_weights(path, blocks)
    assert not [w for w in caught if "optimizer" in str(w.message)]  # the other layout's state
    _assert_same(stacked, blocks, x)
    path = str(tmp_path / "revnet38_blocks.weights.h5")
    _randomize(blocks, seed=3).save_weights(path)
    back = build(stack_blocks=True)
    tf_revnet.transfer_weights(path, back)
    _assert_same(blocks, back, x)
