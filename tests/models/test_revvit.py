"""Tests of tf_revnet/models/revvit.py: RevViT's sizes, structure, exact gradients and training."""

import doctest
import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet
from tests.test_case import assert_all_close_relative, copy_state
from tf_revnet.layers import (
    AttentionResidualFunction,
    MLPResidualFunction,
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
)
from tf_revnet.models import VIT_ARCHITECTURES, RevViT

TINY = dict(patch_size=4, embed_dim=8, depth=3, num_heads=2, mlp_ratio=2.0,
            input_shape=(8, 8, 3), classes=3)
REGULARIZED = dict(dropout_rate=0.1, attention_dropout_rate=0.1, drop_path_rate=0.3)
RTOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture
def policy(request):
    """Sets floatx and the dtype policy to `request.param` (both: Keras caches the policy)."""
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(request.param)
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_floatx(previous_floatx)
    keras.config.set_dtype_policy(previous_policy)


def images(shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("name", ["RevViTSmall", "RevViTBase"])
def test_paper_parameter_counts(name):
    arch = VIT_ARCHITECTURES[name]
    model = getattr(tf_revnet.models, name)()
    assert model.count_params() == arch.params
    assert abs(model.count_params() / 1e6 - arch.paper_params) <= 0.02 * arch.paper_params
    assert tuple(model.input_shape) == (None, 224, 224, 3) and tuple(model.output_shape) == (None, 1000)
    body = model.get_layer(f"{name.lower()}_body")
    (stack,) = body.units
    assert isinstance(stack, ReversibleBlockStack) and stack.depth == arch.depth == 12
    # Two streams of the full embedding width: the blocks see (N, 196, 2C).
    assert tuple(body.output.shape) == (None, 196, 2 * arch.embed_dim)
    # The traced graph and the variables do not grow with depth: one variable per weight.
    assert len(model.trainable_variables) == 23


def test_published_counts_are_the_issue_numbers():
    assert {n: a.paper_params for n, a in VIT_ARCHITECTURES.items() if a.paper_params} == {
        "RevViTSmall": 22.4, "RevViTBase": 87.3}


def test_cifar_model_and_registry_names():
    model = tf_revnet.models.get("revvit_cifar")()
    assert model.count_params() == VIT_ARCHITECTURES["RevViTCifar"].params
    assert tuple(model.output_shape) == (None, 10)
    assert tf_revnet.models.get("RevViT-Small") is tf_revnet.models.RevViTSmall
    assert {"revvitsmall", "revvitbase", "revvitcifar"} <= set(tf_revnet.models.list_models())
    stack = model.get_layer("revvitcifar_body").units[0]
    assert isinstance(stack.block.f, AttentionResidualFunction)
    assert isinstance(stack.block.g, MLPResidualFunction)
    assert stack.block.axis == -1


def test_depth_costs_no_variables():
    shallow = RevViT(**{**TINY, "depth": 2})
    deep = RevViT(**{**TINY, "depth": 48})
    assert len(deep.trainable_variables) == len(shallow.trainable_variables)
    per_block = (deep.count_params() - shallow.count_params()) / 46
    # F: q, k, v, output projections and biases; G: two Dense; two LayerNorms.
    assert per_block == (4 * 8 * 8 + 4 * 8) + (2 * 8 * 16 + 16 + 8) + 2 * (2 * 8)


def loss_and_gradients(model, x, labels):
    with tf.GradientTape() as tape:
        tape.watch(x)
        probabilities = model(x, training=True)
        picked = tf.gather(probabilities, labels, batch_dims=1)
        loss = -tf.reduce_mean(tf.math.log(picked))
    return loss, tape.gradient(loss, [x] + model.trainable_variables)


def reversible_and_plain(**kwargs):
    reversible = RevViT(**TINY, **kwargs)
    plain = RevViT(**TINY, use_custom_gradient=False, **kwargs)
    copy_state(reversible, plain)  # weights and seed-generator states (`get_weights` has no seeds)
    return reversible, plain


@pytest.mark.parametrize("policy", ["float64", "float32"], indirect=True)
@pytest.mark.parametrize("regularized", [False, True], ids=["plain", "dropout_droppath"])
def test_gradients_equal_plain_autodiff(policy, regularized):
    """Algorithm 1 through RevViT equals autodiff on the same weights; with dropout and stochastic
    depth the recompute replays the forward pass's draws (else the gradients would differ)."""
    reversible, plain = reversible_and_plain(**(REGULARIZED if regularized else {}))
    x = tf.constant(images((4, 8, 8, 3), dtype=policy))
    labels = tf.constant([0, 1, 2, 1])
    loss, grads = loss_and_gradients(reversible, x, labels)
    plain_loss, plain_grads = loss_and_gradients(plain, x, labels)
    assert loss.dtype == policy
    assert abs(float(loss) - float(plain_loss)) <= RTOL[policy] * abs(float(plain_loss))
    assert len(grads) == 1 + len(reversible.trainable_variables)
    # Attention key biases have zero gradient analytically (softmax is shift-invariant).
    assert_all_close_relative(grads, plain_grads, RTOL[policy], what="gradient",
                              atol=1e-14 if policy == "float64" else 1e-9)
    # The seed states advanced once per model, alike: each step draws new masks.
    for a, b in zip(reversible.variables, plain.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy", ["float64"], indirect=True)
@pytest.mark.parametrize("stack_blocks", [True, False])
def test_dropout_is_drawn_in_the_blocks_and_replayed(policy, stack_blocks):
    """Every seed generator of the blocks advances at each step (new masks), and the gradients stay
    exact at every step, stacked or one layer per block (linear stochastic depth)."""
    reversible, plain = reversible_and_plain(**REGULARIZED, stack_blocks=stack_blocks)
    body = reversible.get_layer("revvit_body")
    seeds = [v for v in body.variables if "seed_generator" in v.path]
    # F: attention, output and drop-path generators; G: hidden, output, drop path (block 1 of
    # the unstacked model has drop path 0: no generator).
    assert len(seeds) == (6 if stack_blocks else 6 * 3 - 2)
    x, labels = tf.constant(images((4, 8, 8, 3), dtype=policy)), tf.constant([0, 1, 2, 1])
    losses = []
    for _ in range(2):
        before = [v.numpy().copy() for v in seeds]
        loss, grads = loss_and_gradients(reversible, x, labels)
        _, plain_grads = loss_and_gradients(plain, x, labels)
        assert_all_close_relative(grads, plain_grads, RTOL[policy], what="gradient", atol=1e-14)
        assert all((v.numpy() != b).any() for v, b in zip(seeds, before))
        losses.append(float(loss))
    assert losses[0] != losses[1]


def test_inference_is_deterministic_and_training_is_not():
    model = RevViT(**TINY, **REGULARIZED)
    x = images((4, 8, 8, 3))
    a, b = (keras.ops.convert_to_numpy(model(x, training=False)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(model.predict(x, verbose=0)))
    c, d = (keras.ops.convert_to_numpy(model(x, training=True)) for _ in range(2))
    assert not np.allclose(c, d)


@pytest.mark.parametrize("policy", ["float64"], indirect=True)
def test_causal_attention_mask_gradients(policy):
    """A fixed attention mask (`use_causal_mask`) holds inside the reversible sequence."""

    def make(use_custom_gradient):
        blocks = [ReversibleBlock(AttentionResidualFunction(2, use_causal_mask=True),
                                  MLPResidualFunction(2.0)) for _ in range(2)]
        return ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient)

    reversible, plain = make(True), make(False)
    reversible.build((2, 5, 16))
    plain.build((2, 5, 16))
    copy_state(reversible, plain)
    x = tf.constant(images((2, 5, 16), dtype="float64"))
    y = keras.ops.convert_to_numpy(reversible(x, training=True))
    changed = x.numpy().copy()
    changed[:, -1] += 1.0  # the last token cannot change the earlier ones
    y_changed = keras.ops.convert_to_numpy(reversible(changed, training=True))
    np.testing.assert_allclose(y_changed[:, :-1], y[:, :-1], rtol=1e-12, atol=1e-12)
    assert not np.allclose(y_changed[:, -1], y[:, -1])
    for layer in (reversible, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        layer.grads = tape.gradient(loss, [x] + layer.trainable_variables)
    assert_all_close_relative(reversible.grads, plain.grads, 1e-10, what="gradient", atol=1e-14)


def test_attention_mask_of_a_direct_call_is_honoured():
    f = AttentionResidualFunction(2)
    x = images((2, 4, 8))
    mask = np.ones((2, 4, 4), bool)
    mask[:, :, 3] = False  # no query attends to token 3
    changed = x.copy()
    changed[:, 3] += 5.0
    a = keras.ops.convert_to_numpy(f(x, attention_mask=mask))
    b = keras.ops.convert_to_numpy(f(changed, attention_mask=mask))
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(keras.ops.convert_to_numpy(f(changed))[:, :3], a[:, :3])


def test_keras_round_trip(tmp_path):
    model = RevViT(**TINY, **REGULARIZED)
    x = images((2, 8, 8, 3))
    path = tmp_path / "revvit.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.count_params() == model.count_params()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-7)
    assert reloaded.get_layer("revvit_body").use_custom_gradient


def test_fit_step_learns():
    model = RevViT(**TINY, **REGULARIZED)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    x, y = images((8, 8, 8, 3)), np.arange(8) % 3
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(not np.array_equal(b, a.numpy()) for b, a in zip(before, model.trainable_weights))


def test_unstacked_blocks_have_linear_stochastic_depth():
    model = RevViT(**TINY, drop_path_rate=0.2, stack_blocks=False)
    assert model.count_params() == RevViT(**TINY).count_params()
    units = model.get_layer("revvit_body").units
    assert [type(u) for u in units] == [ReversibleBlock] * 3
    assert [u.f.drop_path for u in units] == pytest.approx([0.0, 0.1, 0.2])


def test_include_top_false_and_pooling():
    tokens = RevViT(**TINY, include_top=False)
    assert tuple(tokens.output_shape) == (None, 4, 16)
    assert tuple(RevViT(**TINY, include_top=False, pooling="avg").output_shape) == (None, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embed_dim": 10, "num_heads": 4}, "divisible by `num_heads`.*embed_dim=10"),
        ({"input_shape": (10, 10, 3)}, "divisible by `patch_size`=4"),
        ({"weights": "imagenet"}, "`weights` must be None"),
        ({"depth": 0}, "`depth` must be a positive integer"),
        ({"drop_path_rate": 1.0}, "`drop_path` must be a float in \\[0, 1\\)"),
        ({"use_custom_gradient": 1}, "`use_custom_gradient` must be a bool"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RevViT(**{**TINY, **kwargs})


@pytest.mark.parametrize("module", ["tf_revnet.layers.transformer_functions",
                                    "tf_revnet.layers.patch_embedding"])
def test_docstring_examples(module):
    module = importlib.import_module(module)
    results = doctest.testmod(module, extraglobs={"keras": keras, **vars(module)})
    assert results.attempted > 0 and results.failed == 0


def test_revvit_docstring_example():
    from tf_revnet.models import revvit

    runner = doctest.DocTestRunner()
    finder = doctest.DocTestFinder()
    (test,) = finder.find(revvit.RevViT, "RevViT", globs={"keras": keras, "RevViT": RevViT})
    runner.run(test)
    assert test.examples and runner.failures == 0


def test_builder_docstrings_state_counts():
    for name, arch in VIT_ARCHITECTURES.items():
        doc = getattr(tf_revnet.models, name).__doc__
        assert f"{arch.params:,}" in doc and "Args:" in doc and "References:" in doc
        if arch.paper_params is not None:
            assert f"is {arch.paper_params}M" in doc
