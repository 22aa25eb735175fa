"""Every public layer of tf_revnet.layers passes `run_layer_test` (config and `.keras` round trips,
mixed precision, seed generators, one `fit` step); the first test fails when a public layer is added
without an entry here."""

import inspect

import keras
import pytest

import tf_revnet.layers as layers
from tests.test_case import run_layer_test


def _basic(dtype=None):
    return layers.BasicResidualFunction(dtype=dtype)


def _dropout_function(dtype=None):
    return keras.Sequential([keras.layers.Dense(4, dtype=dtype), keras.layers.Dropout(0.2, dtype=dtype)])


def _block(dtype=None):
    return layers.ReversibleBlock(_basic(dtype), _basic(dtype), dtype=dtype)


# name: (make_layer(dtype), input_shape, expected_output_shape, number of seed generators)
CASES = {
    "AttentionResidualFunction": (
        lambda dtype=None: layers.AttentionResidualFunction(
            2, attention_dropout=0.1, dropout=0.1, drop_path=0.1, dtype=dtype),
        (None, 5, 8), None, 3),
    "MLPResidualFunction": (
        lambda dtype=None: layers.MLPResidualFunction(2.0, dropout=0.1, drop_path=0.1, dtype=dtype),
        (None, 5, 8), None, 3),
    "PatchEmbedding": (lambda dtype=None: layers.PatchEmbedding(4, 8, dropout=0.1, dtype=dtype),
                       (None, 8, 8, 3), (None, 4, 8), 1),
    "BasicResidualFunction": (_basic, (None, 6, 6, 8), None, 0),
    "BottleneckResidualFunction": (
        lambda dtype=None: layers.BottleneckResidualFunction(16, dtype=dtype), (None, 4, 4, 16),
        None, 0),
    "ResidualBlock": (lambda dtype=None: layers.ResidualBlock(16, strides=2, dtype=dtype),
                      (None, 6, 6, 8), (None, 3, 3, 16), 0),
    "MomentumBlock": (lambda dtype=None: layers.MomentumBlock(_dropout_function(dtype), gamma=0.8,
                                                              dtype=dtype), (None, 5, 8), None, 1),
    "ReversibleBlock": (_block, (None, 6, 6, 8), None, 0),
    "ReversibleBlockStack": (
        lambda dtype=None: layers.ReversibleBlockStack(
            layers.ReversibleBlock(_dropout_function(dtype), _dropout_function(dtype), dtype=dtype),
            depth=3), (None, 5, 8), None, 2),
    "ReversibleSequence": (
        lambda dtype=None: layers.ReversibleSequence(
            [layers.Stem(8, dtype=dtype), _block(dtype), _block(dtype),
             layers.StageTransition(16, strides=2, dtype=dtype)], dtype=dtype),
        (None, 8, 8, 3), (None, 4, 4, 16), 0),
    "Shortcut": (lambda dtype=None: layers.Shortcut(8, strides=2, kind="projection", dtype=dtype),
                 (None, 6, 6, 4), (None, 3, 3, 8), 0),
    "StageTransition": (lambda dtype=None: layers.StageTransition(16, strides=2, dtype=dtype),
                        (None, 6, 6, 8), (None, 3, 3, 16), 0),
    "Stem": (lambda dtype=None: layers.Stem(8, dtype=dtype), (None, 8, 8, 3), (None, 8, 8, 8), 0),
}
#: Base classes, not layers one uses on their own.
BASES = {"TwoStreamLayer"}


def test_every_public_layer_has_a_contract_case():
    public = {name for name in layers.__all__
              if inspect.isclass(getattr(layers, name))
              and issubclass(getattr(layers, name), keras.layers.Layer)}
    assert public - BASES == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_contract(name, tmp_path):
    make_layer, input_shape, output_shape, seeds = CASES[name]
    run_layer_test(make_layer, input_shape, output_shape, num_seed_generators=seeds,
                   tmp_path=tmp_path)
