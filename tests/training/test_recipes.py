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
    with pytest.raises(recipes.RecipeError, match="batch_size=0: must be >= 1") as error:
        recipes.get("cifar").replace(batch_size=0)
    assert (error.value.parameter, error.value.value) == ("batch_size", 0)  # the CLI names flags
    with pytest.raises(recipes.RecipeError, match=r"momentum=1.5: must be in \[0, 1\)"):
        recipes.get("cifar").replace(momentum=1.5)
    with pytest.raises(recipes.RecipeError, match="lr=0.1: unknown recipe field"):
        recipes.get("cifar").replace(lr=0.1)
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        recipes.get("nope")


def test_imagenet_recipe_is_the_papers():
    recipe = recipes.get("imagenet")
    assert (recipe.batch_size, recipe.learning_rate, recipe.momentum) == (256, 0.1, 0.9)
    assert (recipe.weight_decay, recipe.epochs, recipe.image_size) == (1e-4, 90, 224)
    assert recipe.preprocessing == "imagenet" and recipe.top5
    steps_per_epoch = 1_281_167 // 256
    schedule = recipes.learning_rate_schedule(recipe, 90 * steps_per_epoch)
    # lr 0.1, /10 after epochs 30, 60 and 80.
    for epoch, lr in ((0, 0.1), (29.9, 0.1), (30.1, 0.01), (59.9, 0.01), (60.1, 1e-3),
                      (79.9, 1e-3), (80.1, 1e-4), (89.9, 1e-4)):
        np.testing.assert_allclose(float(schedule(int(epoch * steps_per_epoch))), lr, rtol=1e-6)


def test_linear_scaling_rule():
    recipe = recipes.get("imagenet").scaled_to_batch(1024)
    assert recipe.batch_size == 1024 and recipe.learning_rate == pytest.approx(0.4)


def test_weight_decay_through_kernel_regularizer_skips_batch_norm():
    import tf_revnet.models

    regularizer = recipes.kernel_l2_regularizer(2e-4)
    model = tf_revnet.models.RevNet(units=[1, 1], widths=[8, 8, 16], input_shape=(8, 8, 3),
                                    classes=3, kernel_regularizer=regularizer)
    decayed = recipes.decayed_kernels(model)
    kernels = [v for v in model.trainable_weights if v.path.endswith("/kernel")]
    assert sorted(decayed) == sorted(v.path for v in kernels) and len(kernels) >= 5
    assert not any(s in p for p in decayed for s in ("gamma", "beta", "bias"))
    # The penalty is wd * sum(w**2) / 2 over the kernels: its gradient is wd * w.
    with tf.GradientTape() as tape:
        model(tf.zeros((1, 8, 8, 3)))
        penalty = tf.add_n(model.losses)
    expected = 2e-4 * sum(float(tf.reduce_sum(tf.square(k))) for k in kernels) / 2
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-5)
    grads = tape.gradient(penalty, [k.value for k in kernels])
    for grad, kernel in zip(grads, kernels):
        np.testing.assert_allclose(grad.numpy(), 2e-4 * kernel.numpy(), rtol=1e-5, atol=1e-12)


def test_vit_recipes_use_adamw_with_warm_up_and_cosine_decay():
    recipe = recipes.get("vit_cifar")
    assert (recipe.optimizer, recipe.schedule, recipe.batch_size) == ("adamw", "cosine", 128)
    optimizer = recipes.make_optimizer(recipe, total_steps=200)
    assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == 0.05
    schedule = recipes.cosine_schedule(recipe, total_steps=200)  # what the optimizer holds
    rates = [float(schedule(step)) for step in (0, 5, 10, 105, 200)]
    np.testing.assert_allclose(rates, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
    assert recipes.model_weight_decay(recipe) == 0.0  # no L2 penalty on top of AdamW's decay
    assert recipes.get("vit_imagenet").image_size == 224


def test_adamw_decays_kernels_but_not_biases_norms_or_positions():
    import tf_revnet

    model = tf_revnet.models.RevViT(patch_size=4, embed_dim=8, depth=2, num_heads=2,
                                    input_shape=(8, 8, 3), classes=3)
    optimizer = recipes.make_optimizer(recipes.get("vit_cifar"), total_steps=10)
    optimizer.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed and all("kernel" in path for path in decayed), decayed
    assert any("blocks1to2/f_attention_query_kernel" in path for path in decayed)
    assert not any("position_embedding" in p or "bias" in p or "gamma" in p for p in decayed)


def test_optimizer_fields_are_validated_as_structured_errors():
    for field, value, reason in (("optimizer", "adam", "must be 'sgd' or 'adamw'"),
                                 ("schedule", "linear", "must be 'step' or 'cosine'"),
                                 ("warmup", 1.0, r"must be in \[0, 1\)")):
        with pytest.raises(recipes.RecipeError, match=f"{field}={value}: {reason}") as error:
            recipes.get("vit_cifar").replace(**{field: value})
        assert (error.value.parameter, error.value.value) == (field, value)


def test_start_up_line_names_the_optimizer():
    from training import report

    assert report.optimizer_text(recipes.get("cifar")) == "SGD lr 0.1 momentum 0.9"
    assert report.optimizer_text(recipes.get("vit_cifar")) == (
        "AdamW lr 0.001, weight decay 0.05, 5% warm-up, cosine decay")


def test_default_recipe_follows_the_model():
    assert recipes.default_recipe("RevViTCifar") == "vit_cifar"
    assert recipes.default_recipe("RevViTBase") == "vit_imagenet"
    assert recipes.default_recipe("RevNet38") == "cifar"
