"""Tests of training/recipes.py: the paper's preset, schedule and kernel-only weight decay."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import recipes


def test_paper_recipe():
    recipe = recipes.get("cifar")
    assert (recipe.learning_rate, recipe.momentum, recipe.weight_decay) == (0.1, 0.9, 2e-4)
    assert recipe.batch_size == 100
    # 80K steps of batch 100 on 50K images.
    assert recipe.epochs * 50_000 // recipe.batch_size == 80_000
    assert recipe.decay_boundaries == (0.5, 0.75) and recipe.decay_factor == 0.1


def test_schedule_decays_tenfold_at_half_and_three_quarters():
    schedule = recipes.learning_rate_schedule(recipes.get("cifar"), total_steps=80_000)
    lr = {step: float(schedule(step)) for step in (0, 39_999, 40_001, 59_999, 60_001, 79_999)}
    np.testing.assert_allclose(
        [lr[0], lr[39_999], lr[40_001], lr[59_999], lr[60_001], lr[79_999]],
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6,
    )


def test_optimizer_is_sgd_with_momentum():
    optimizer = recipes.make_optimizer(recipes.get("cifar"), total_steps=100)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == 0.9 and not optimizer.nesterov
    assert optimizer.weight_decay is None  # decay is an L2 penalty in the loss instead


def test_overrides_and_validation():
    recipe = recipes.get("cifar").replace(epochs=3, learning_rate=None, batch_size=8)
    assert (recipe.epochs, recipe.learning_rate, recipe.batch_size) == (3, 0.1, 8)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        recipes.get("cifar").replace(batch_size=0)
    with pytest.raises(ValueError, match="`momentum` must be in"):
        recipes.get("cifar").replace(momentum=1.5)
    with pytest.raises(ValueError, match="Unknown recipe fields"):
        recipes.get("cifar").replace(lr=0.1)
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        recipes.get("nope")


def _small_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    return keras.Model(inputs, outputs)


def test_weight_decay_only_on_kernels_with_gradient_wd_times_w():
    model = _small_model()
    decayed = recipes.apply_weight_decay(model, 2e-4)
    assert decayed == ["conv/kernel", "dense/kernel"]
    kernels = [model.get_layer("conv").kernel, model.get_layer("dense").kernel]
    with tf.GradientTape() as tape:
        penalty = tf.add_n(model.losses)
    expected = 2e-4 * sum(float(tf.reduce_sum(tf.square(k))) for k in kernels) / 2
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-5)
    grads = tape.gradient(penalty, [k.value for k in kernels])
    for grad, kernel in zip(grads, kernels):
        np.testing.assert_allclose(grad.numpy(), 2e-4 * kernel.numpy(), rtol=1e-5, atol=1e-12)
    assert recipes.apply_weight_decay(_small_model(), 0.0) == []
