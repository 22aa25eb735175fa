"""Tests of tf_revnet/models: the paper's architectures, the builders' interface, training."""

import doctest
import importlib
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_revnet.models
from tests.test_case import assert_all_close_relative
from tf_revnet.layers import (
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
    StageTransition,
    Stem,
)
from tf_revnet.models import ARCHITECTURES, VIT_ARCHITECTURES, RevNet, get, list_models
from tf_revnet.models.architectures import markdown_table

CIFAR_MODELS = [name for name, arch in ARCHITECTURES.items() if arch.stem == "cifar"]
IMAGENET_MODELS = [name for name, arch in ARCHITECTURES.items() if arch.stem == "imagenet"]
MODELS_GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "models.md"


@pytest.fixture(scope="module")
def cifar_models():
    """Each CIFAR model, built once with unknown spatial sizes (parameter counts do not change)."""
    return {name: get(name)(input_shape=(None, None, 3)) for name in CIFAR_MODELS}


@pytest.fixture(scope="module")
def imagenet_models():
    """Each ImageNet model, built once (symbolically) at the paper's 224x224."""
    return {name: get(name)() for name in IMAGENET_MODELS}


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype("float32")


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def check_counts(name, model):
    arch = ARCHITECTURES[name]
    assert model.count_params() == arch.params
    assert trainable_count(model) == arch.trainable_params
    if arch.paper_params is not None:
        # Paper's Table 1, in millions, rounded to two decimals.
        assert abs(model.count_params() / 1e6 - arch.paper_params) <= 0.02 * arch.paper_params
        assert abs(trainable_count(model) / 1e6 - arch.paper_params) <= 0.02 * arch.paper_params


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_parameter_counts(name, cifar_models):
    check_counts(name, cifar_models[name])


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_parameter_counts(name, imagenet_models):
    check_counts(name, imagenet_models[name])


def test_paper_parameter_counts_are_the_issue_numbers():
    expected = {
        "RevNet38": 0.46,
        "RevNet110": 1.73,
        "RevNet164": 1.75,
        "RevNet104": 45.2,
        "ResNet32": 0.46,
        "ResNet110": 1.73,
        "ResNet164": 1.70,
        "ResNet101": 44.5,
    }
    assert {n: a.paper_params for n, a in ARCHITECTURES.items() if a.paper_params} == expected


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_output_shapes(name, cifar_models):
    model = cifar_models[name]
    for shape in [(2, 32, 32, 3), (3, 40, 24, 3)]:  # CIFAR size and a non-square input
        probabilities = keras.ops.convert_to_numpy(model(images(shape), training=False))
        assert probabilities.shape == (shape[0], 10)
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "name, features", [("RevNet104", 4 * 832), ("ResNet101", 4 * 512), ("RevNet56", 4 * 832)]
)
def test_imagenet_output_shapes(name, features, imagenet_models):
    model = imagenet_models[name]
    assert tuple(model.input_shape) == (None, 224, 224, 3)
    assert tuple(model.output_shape) == (None, 1000)
    # 224 / 2 (stem) / 2 (max pool) / 2 / 2 / 2 (stages 2-4) = 7.
    assert tuple(model.get_layer(f"{name.lower()}_post_relu").output.shape) == (
        None,
        7,
        7,
        features,
    )


def test_imagenet_model_runs_on_a_non_square_image():
    model = tf_revnet.models.RevNet56(input_shape=(None, None, 3), include_top=False, pooling="avg")
    assert tuple(model(images((1, 64, 96, 3))).shape) == (1, 4 * 832)
    features = tf_revnet.models.RevNet56(input_shape=(64, 96, 3), include_top=False)
    assert tuple(features.output_shape) == (None, 2, 3, 4 * 832)


@pytest.mark.parametrize(
    "pooling, shape", [(None, (None, 8, 8, 112)), ("avg", (None, 112)), ("max", (None, 112))]
)
def test_include_top_false(pooling, shape):
    model = tf_revnet.models.RevNet38(include_top=False, pooling=pooling)
    assert tuple(model.output_shape) == shape
    assert not any(layer.name.endswith("predictions") for layer in model.layers)


def test_classes_and_logits():
    model = tf_revnet.models.ResNet32(classes=100, classifier_activation=None)
    logits = keras.ops.convert_to_numpy(model(images((2, 32, 32, 3))))
    assert logits.shape == (2, 100)
    assert not np.allclose(logits.sum(axis=-1), 1.0)


def test_input_tensor():
    inputs = keras.Input((16, 16, 3))
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    model = tf_revnet.models.RevNet38(input_tensor=scaled)
    assert model.inputs[0] is inputs
    assert tuple(model.output_shape) == (None, 10)


def test_layer_names():
    model = tf_revnet.models.RevNet38(name="net")
    body = model.get_layer("net_body")
    assert isinstance(body, ReversibleSequence)
    assert [u.name for u in body.units] == ["net_stem"] + [
        name for s in (1, 2, 3) for name in (f"net_stage{s}_block1", f"net_stage{s}_blocks2to3")
    ]
    assert body.units[1].f.name == "net_stage1_block1_f"
    assert body.units[2].block.f.name == "net_stage1_block_f"
    unstacked = tf_revnet.models.RevNet38(name="net", stack_blocks=False).get_layer("net_body")
    assert [u.name for u in unstacked.units] == ["net_stem"] + [
        f"net_stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)
    ]
    assert unstacked.units[2].f.name == "net_stage1_block2_f"
    assert [la.name for la in model.layers[-4:]] == [
        "net_post_bn", "net_post_relu", "net_avg_pool", "net_predictions"
    ]
    resnet = tf_revnet.models.ResNet32(name="base")
    assert [layer.name for layer in resnet.layers if "_stage3_" in layer.name] == [
        f"base_stage3_block{b}" for b in range(1, 6)
    ]


@pytest.mark.parametrize(
    "name, kinds",
    [
        # Stage 1 of the basic CIFAR RevNets changes nothing (32 -> 32 channels, stride 1): a
        # reversible block; every other stage starts with a transition.
        ("RevNet38", [Stem, ReversibleBlock, StageTransition, StageTransition]),
        ("RevNet164", [Stem, StageTransition, StageTransition, StageTransition]),
    ],
)
def test_whole_body_is_one_sequence_with_transitions(name, kinds):
    model = get(name)(input_shape=(None, None, 3))
    sequences = [la for la in model.layers if isinstance(la, ReversibleSequence)]
    assert len(sequences) == 1
    body = sequences[0]
    arch = ARCHITECTURES[name]
    # One entry per residual unit: a stack of n blocks counts n times.
    expanded = [
        kind for u in body.units
        for kind in ([ReversibleBlock] * u.depth if isinstance(u, ReversibleBlockStack) else [type(u)])
    ]
    assert len(expanded) == 1 + sum(arch.units)
    firsts = [expanded[0]] + [expanded[1 + sum(arch.units[:s])] for s in range(3)]
    assert firsts == kinds
    assert expanded.count(ReversibleBlock) == sum(arch.units) - kinds.count(StageTransition)


def test_use_custom_gradient_switch():
    for flag in (True, False):
        model = tf_revnet.models.RevNet38(use_custom_gradient=flag)
        sequences = [la for la in model.layers if isinstance(la, ReversibleSequence)]
        assert len(sequences) == 1
        assert all(s.use_custom_gradient is flag for s in sequences)


def test_get_config_json_round_trip():
    model = tf_revnet.models.RevNet164(input_shape=(16, 16, 3))
    config = json.loads(json.dumps(model.get_config()))
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    x = images((2, 16, 16, 3))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(clone(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )
    assert clone.count_params() == model.count_params()


def randomize_state(model, seed=0):
    """Random weights and BatchNorm statistics (variances positive), so a round trip is tested."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        values = rng.uniform(0.5, 1.5, v.shape) if "variance" in v.path else rng.normal(0, 0.1, v.shape)
        v.assign(values.astype(v.dtype))


@pytest.mark.parametrize("name", ["RevNet38", "ResNet164"])
def test_keras_save_load_round_trip(name, tmp_path):
    model = get(name)(input_shape=(None, None, 3))
    randomize_state(model)
    x = images((2, 16, 16, 3))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.count_params() == model.count_params()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )


# RevNet-38 trains as `fit` does by default (compiled `tf.function`); tracing the deep ones takes a
# minute each on 2 CPU cores, so they take their step eagerly (same layers and gradient), as does
# ResNet-32 (compiled: 9 s). The 110-layer models repeat the 164-layer ones' kinds: opt-in.
@pytest.mark.parametrize(
    "name, run_eagerly",
    [pytest.param(name, name != "RevNet38",
                  marks=[pytest.mark.slow] if ARCHITECTURES[name].depth == 110 else [])
     for name in CIFAR_MODELS],
)
def test_one_fit_step(name, run_eagerly):
    model = get(name)(input_shape=(16, 16, 3))
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        run_eagerly=run_eagerly,
    )
    history = model.fit(images((4, 16, 16, 3)), np.array([0, 1, 2, 3]), batch_size=4, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss)
    assert 0.5 * np.log(10) < loss < 3 * np.log(10)  # about ln(10) for a fresh 10-class model
    after = model.trainable_weights
    assert all(not np.array_equal(b, a.numpy()) for b, a in zip(before, after))


@pytest.fixture
def float64():
    # Keras caches the global dtype policy on first use, so `set_floatx` alone would not reach new
    # layers once any layer exists: set both, and restore both.
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous_floatx)
    keras.config.set_dtype_policy(previous_policy)


def test_revnet38_gradients_equal_plain_autodiff(float64):
    """Algorithm 1 through all of RevNet-38 equals plain backprop on the same weights (float64)."""
    reversible = tf_revnet.models.RevNet38(input_shape=(8, 8, 3), use_custom_gradient=True)
    plain = tf_revnet.models.RevNet38(input_shape=(8, 8, 3), use_custom_gradient=False)
    plain.set_weights(reversible.get_weights())
    x = tf.constant(np.random.default_rng(0).standard_normal((3, 8, 8, 3)))
    labels = tf.constant([1, 4, 7])

    def loss_and_gradients(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            probabilities = model(x, training=True)
            picked = tf.gather(probabilities, labels, batch_dims=1)
            loss = -tf.reduce_mean(tf.math.log(picked))
        return loss, tape.gradient(loss, [x] + model.trainable_variables)

    loss, grads = loss_and_gradients(reversible)
    plain_loss, plain_grads = loss_and_gradients(plain)
    assert loss.dtype == tf.float64
    assert abs(float(loss) - float(plain_loss)) <= 1e-12 * abs(float(plain_loss))
    assert len(grads) == len(plain_grads) == 1 + len(reversible.trainable_variables)
    names = ["input"] + [v.path for v in reversible.trainable_variables]
    for name, g, p in zip(names, grads, plain_grads):
        g, p = g.numpy(), p.numpy()
        error = np.max(np.abs(g - p)) / max(np.max(np.abs(p)), 1e-300)
        assert error <= 1e-10, f"{name}: relative error {error:.2e}"
    # The BatchNorm statistics were updated once by each model, so they agree too.
    for a, b in zip(reversible.non_trainable_weights, plain.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_list_models_and_get():
    names = list_models()
    assert names == [
        "revnet38", "revnet110", "revnet164", "revnet56", "revnet104",
        "resnet32", "resnet110", "resnet164", "resnet101",
        "revvitsmall", "revvitbase", "revvitcifar",
    ]  # fmt: skip
    for name in names:
        assert get(name) is getattr(tf_revnet.models, ARCHITECTURES_BY_LOWER[name])
    assert get("revvit_cifar") is get("RevViT-Cifar") is tf_revnet.models.RevViTCifar
    assert get("RevNet38") is get("revnet-38") is get("REVNET_38") is tf_revnet.models.RevNet38


ARCHITECTURES_BY_LOWER = {name.lower(): name for name in (*ARCHITECTURES, *VIT_ARCHITECTURES)}


@pytest.mark.parametrize("bad", ["revnet39", "", None, 38])
def test_get_unknown_name_lists_valid_ones(bad):
    with pytest.raises(ValueError, match="Valid names: revnet38, revnet110.*resnet101") as info:
        get(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": "imagenet"}, "`weights` must be None.*weights='imagenet'"),
        ({"pooling": "sum", "include_top": False}, "`pooling`.*pooling='sum'"),
        ({"classes": 0}, "`classes`.*classes=0"),
        ({"input_shape": (32, 32)}, "`input_shape`.*input_shape=\\(32, 32\\)"),
        ({"input_shape": (32, 32, None)}, "`input_shape`"),
        ({"include_top": "yes"}, "`include_top`.*include_top='yes'"),
        ({"use_custom_gradient": None}, "`use_custom_gradient`.*use_custom_gradient=None"),
    ],
)
def test_builder_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_revnet.models.RevNet38(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"units": [2, 2], "widths": [16, 32]}, "`widths` must list.*widths=\\(16, 32\\)"),
        ({"units": [2, 0], "widths": [16, 16, 32]}, "`units`.*units=\\[2, 0\\]"),
        ({"units": [2], "widths": [16, 15]}, "must be even.*widths=\\(16, 15\\)"),
        ({"units": [2], "widths": [16, 16], "strides": [1, 2]}, "`strides`.*one value per stage"),
        ({"units": [2], "widths": [16, 16], "residual_function": "x"}, "`residual_function`"),
        ({"units": [2], "widths": [16, 16], "stem": "mnist"}, "`stem`.*stem='mnist'"),
    ],
)
def test_generic_revnet_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RevNet(**kwargs)


def test_generic_revnet_custom_depth_and_width():
    model = RevNet(units=[1, 3], widths=[8, 8, 24], residual_function="bottleneck", name="tiny")
    assert tuple(model(images((2, 32, 32, 3))).shape) == (2, 10)
    assert tuple(model.get_layer("tiny_post_relu").output.shape) == (None, 16, 16, 96)
    # Stage 1 has a single unit (a transition: 8 -> 32 channels); stage 2 a transition and 2 blocks.
    body = model.get_layer("tiny_body")
    assert [type(u).__name__ for u in body.units] == [
        "Stem", "StageTransition", "StageTransition", "ReversibleBlockStack"
    ]
    assert body.units[-1].depth == 2
    unstacked = RevNet(units=[1, 3], widths=[8, 8, 24], residual_function="bottleneck",
                       name="tiny", stack_blocks=False).get_layer("tiny_body")
    assert [type(u).__name__ for u in unstacked.units] == [
        "Stem", "StageTransition", "StageTransition", "ReversibleBlock", "ReversibleBlock"
    ]
    # Identical consecutive blocks still run as one loop.
    assert [getattr(u, "depth", 1) for u in unstacked._get_plan().units] == [1, 1, 1, 2]


def test_docstrings_state_counts_and_paper_comparison():
    for name, arch in ARCHITECTURES.items():
        doc = getattr(tf_revnet.models, name).__doc__
        assert f"{arch.params:,}" in doc and "Args:" in doc and "References:" in doc
        if arch.paper_params is not None:
            assert f"Table 1 gives {arch.paper_params}M" in doc


def test_docs_models_table_is_generated_from_the_code():
    if not MODELS_GUIDE.exists():
        pytest.skip("docs/models.md not found")
    assert markdown_table() in MODELS_GUIDE.read_text()


@pytest.fixture
def mixed_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy(previous)


def test_mixed_bfloat16_fit_step(mixed_bfloat16):
    """Under mixed precision the classifier computes in float32 and a training step is finite."""
    model = tf_revnet.models.RevNet38(input_shape=(16, 16, 3))
    body = model.get_layer("revnet38_body")
    assert body.units[0].conv.compute_dtype == "bfloat16"
    assert body.units[2].coupling.grid_bits == 12  # the fixed-point residual stream
    assert model.get_layer("revnet38_predictions").compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True)
    history = model.fit(images((4, 16, 16, 3)), np.arange(4), verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "module", ["tf_revnet.models.revnet", "tf_revnet.models.resnet", "tf_revnet.models.registry"]
)
def test_docstring_examples(module):
    module = importlib.import_module(module)
    globs = {"keras": keras, "tf_revnet": tf_revnet, **vars(module)}
    results = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0


def test_include_preprocessing_takes_raw_pixels():
    raw = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    with_pre = get("RevNet38")(input_shape=(16, 16, 3), include_preprocessing=True)
    without = get("RevNet38")(input_shape=(16, 16, 3))
    without.set_weights(with_pre.get_weights())
    mean, std = np.array([125.3, 123.0, 113.9]), np.array([63.0, 62.1, 66.7])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(with_pre(raw)),
        keras.ops.convert_to_numpy(without(((raw - mean) / std).astype("float32"))),
        rtol=1e-4, atol=1e-6,
    )
    assert with_pre.layers[1].name == "revnet38_preprocessing"
    custom = get("ResNet32")(include_preprocessing=True, preprocessing_mean=[0, 0, 0],
                             preprocessing_std=[255, 255, 255])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(custom.layers[1](np.full((1, 1, 1, 3), 255.0, "float32"))), 1.0
    )
    with pytest.raises(ValueError, match="preprocessing_std"):
        get("RevNet38")(include_preprocessing=True, preprocessing_std=[1, 0, 1])
    with pytest.raises(ValueError, match="need `include_preprocessing=True`"):
        get("RevNet38")(preprocessing_mean=[0, 0, 0])


def test_decode_predictions():
    preds = np.array([[0.05, 0.6, 0.35] + [0.0] * 7, [0.1] * 10])
    decoded = tf_revnet.models.decode_predictions(preds, top=2)
    assert decoded[0] == [(1, "automobile", 0.6), (2, "bird", 0.35)]
    assert [c for c, _, _ in decoded[1]] == [0, 1]  # ties: label order
    with pytest.raises(ValueError, match="class names"):
        tf_revnet.models.decode_predictions(preds, ["a", "b"])


# --- multi-scale features (pyramid_outputs) --------------------------------------------------------


@pytest.mark.parametrize(
    "builder, kwargs, expected",
    [
        (tf_revnet.models.RevNet, {"units": [1, 2, 1], "widths": [8, 8, 16, 32]},
         {"P0": (16, 16, 8), "P1": (8, 8, 16), "P2": (4, 4, 32)}),
        (tf_revnet.models.ResNet, {"units": [1, 2, 1], "widths": [8, 8, 16, 32]},
         {"P0": (16, 16, 8), "P1": (8, 8, 16), "P2": (4, 4, 32)}),
        (tf_revnet.models.RevNet, {"units": [1, 1, 1, 1], "widths": [8, 8, 16, 32, 64],
                                   "strides": [1, 2, 2, 2], "stem": "imagenet",
                                   "residual_function": "bottleneck"},
         {"P2": (4, 4, 32), "P3": (2, 2, 64), "P4": (1, 1, 128), "P5": (1, 1, 256)}),
    ],
    ids=["revnet-cifar", "resnet-cifar", "revnet-imagenet"],
)
def test_pyramid_outputs_are_the_stage_outputs_by_level(builder, kwargs, expected):
    size = 16 if kwargs.get("stem", "cifar") == "cifar" else 16
    for include_top in (True, False):
        model = builder(include_top=include_top, input_shape=(size, size, 3), **kwargs)
        assert {k: tuple(v.shape[1:]) for k, v in model.pyramid_outputs.items()} == expected
    features = keras.Model(model.input, model.pyramid_outputs)
    outputs = features(np.zeros((2, size, size, 3), "float32"))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        k: (2,) + s for k, s in expected.items()}


def test_feature_model_gradients_on_every_level_equal_plain_autodiff():
    def features(use_custom_gradient):
        keras.utils.set_random_seed(0)
        model = tf_revnet.models.RevNet(units=[1, 2, 2], widths=[8, 8, 16, 32], include_top=False,
                                        input_shape=(16, 16, 3),
                                        use_custom_gradient=use_custom_gradient)
        return keras.Model(model.input, model.pyramid_outputs)

    reversible, plain = features(True), features(False)
    plain.set_weights(reversible.get_weights())
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), tf.float32)
    grads = []
    for model in (reversible, plain):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = tf.add_n([tf.reduce_sum(tf.sin(outputs[k])) * w
                             for k, w in (("P0", 1.0), ("P1", 2.0), ("P2", 3.0))])
        grads.append(tape.gradient(loss, model.trainable_variables))
    assert_all_close_relative(grads[0], grads[1], 1e-5, what="gradient")


def test_feature_model_exports_every_level(tmp_path):
    model = tf_revnet.models.RevNet(units=[1, 1, 1], widths=[8, 8, 16, 32], include_top=False,
                                    input_shape=(16, 16, 3))
    features = keras.Model(model.input, model.pyramid_outputs)
    features.export(str(tmp_path / "features"), format="tf_saved_model", verbose=False)
    signature = tf.saved_model.load(str(tmp_path / "features")).signatures["serving_default"]
    assert sorted(signature.structured_outputs) == ["P0", "P1", "P2"]
    outputs = signature(tf.zeros((3, 16, 16, 3)))
    assert tuple(outputs["P2"].shape) == (3, 4, 4, 32)


def test_docs_feature_pyramid_example_trains():
    blocks = [part.split("```")[0] for part in MODELS_GUIDE.read_text().split("```python")[1:]]
    code = next(block for block in blocks if "pyramid_outputs" in block)
    namespace = {}
    exec(code, namespace)  # noqa: S102 - the project's own docs
    loss = namespace["history"].history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    assert namespace["segmenter"].output.shape[1:] == (32, 32, 5)
