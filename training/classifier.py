"""Model building: a zoo model as a classifier of raw pixels, compiled for the run, or rebuilt.

`build_classifier` wraps a model of `tf_revnet.models` (or of `MODEL_BUILDERS`) so that it takes
raw float32 pixels in [0, 255]: `Input -> Normalization (adapted on the training images) ->
backbone -> float32 probabilities`. `build_and_compile` makes the run's model under its strategy
(metrics, the recipe's optimizer: SGD, or AdamW for the vit recipes, with its schedule; optimizer
variables built before the first step); `load_run` rebuilds a finished or interrupted run's model
from its `config.json` and `model.weights.h5`, and `load_keras_file` loads a `.keras` file (both
used by `training.export` and `training.evaluate`).
"""

from __future__ import annotations

import inspect
import json
import pathlib
import re

import keras

from training import recipes
from training.errors import RunDirError, StageError

__all__ = ["MODEL_BUILDERS", "model_names", "is_known_model", "canonical_model_name",
           "build_classifier", "adapted_normalizer", "build_and_compile", "load_run",
           "load_keras_file", "CONFIG_FILE", "WEIGHTS_FILE"]

# Extra model builders by name (notebooks, tests): name -> builder(input_shape=, classes=,
# classifier_activation=, use_custom_gradient=, kernel_regularizer=) -> keras.Model.
MODEL_BUILDERS = {}
NORMALIZATION_ADAPT_EXAMPLES = 10_000
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"


def _zoo():
    import tf_revnet.models

    return tf_revnet.models


def model_names():
    """The zoo's model names and those of `MODEL_BUILDERS`."""
    return list(_zoo().list_models()) + sorted(MODEL_BUILDERS)


def _builder(name):
    if name in MODEL_BUILDERS:
        return MODEL_BUILDERS[name]
    return _zoo().get(name)


def is_known_model(name):
    """Whether `name` is a model of the zoo (any spelling it accepts) or of `MODEL_BUILDERS`."""
    try:
        _builder(name)
    except ValueError:
        return False
    return True


def has_coupling(name):
    """Whether the builder of model `name` takes a `coupling` argument (the RevNets do; a builder
    of `MODEL_BUILDERS` with `**kwargs` is taken at its word)."""
    parameters = inspect.signature(_builder(name)).parameters.values()
    return any(p.name == "coupling" or p.kind is p.VAR_KEYWORD for p in parameters)


def canonical_model_name(name):
    """The zoo's own name of model `name` (`"RevNet-38"` and `"revnet_38"` give `"RevNet38"`);
    `name` itself when it is no zoo model's name (or one of `MODEL_BUILDERS`)."""
    if name in MODEL_BUILDERS:
        return name
    try:
        return _zoo().get(name).__name__
    except ValueError:
        return name


def build_classifier(model_name, image_shape, num_classes, normalizer, use_custom_gradient=True,
                     weight_decay=0.0, coupling="additive"):
    """Wraps a zoo model so that it takes raw pixels: `Input -> normalizer -> backbone`.

    Args:
        model_name: str. Any name `tf_revnet.models.get` accepts (or a key of `MODEL_BUILDERS`).
        image_shape: tuple `(H, W, C)`.
        num_classes: int.
        normalizer: an adapted `keras.layers.Normalization` (kept in float32).
        use_custom_gradient: bool. Reversible backprop (True) or plain autodiff.
        weight_decay: float. L2 penalty on every convolution and the classifier kernel, through
            the builder's `kernel_regularizer` (0: none).
        coupling: str. The reversible blocks' coupling, passed to builders that take one
            (`has_coupling`); `"additive"`, the builders' default, is passed to none.

    Returns:
        A functional `keras.Model`: float32 `(batch, H, W, C)` pixels in [0, 255] ->
        float32 `(batch, num_classes)` softmax probabilities.
    """
    regularizer = recipes.kernel_l2_regularizer(weight_decay) if weight_decay > 0 else None
    options = {"coupling": coupling} if coupling != "additive" else {}
    backbone = _builder(model_name)(
        input_shape=tuple(image_shape),
        classes=num_classes,
        classifier_activation="softmax",
        use_custom_gradient=use_custom_gradient,
        kernel_regularizer=regularizer,
        **options,
    )
    pixels = keras.Input(shape=tuple(image_shape), dtype="float32", name="pixels")
    outputs = backbone(normalizer(pixels))
    if outputs.dtype != "float32":
        outputs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(outputs)
    name = re.sub(r"\W", "_", model_name.lower())
    return keras.Model(pixels, outputs, name=f"{name}_classifier")


def _coupling_option(coupling):
    """`{"coupling": coupling}`, or nothing for the default additive coupling."""
    return {} if coupling == "additive" else {"coupling": coupling}


def adapted_normalizer(datasets, recipe):
    """Per-channel mean/variance of (up to 10,000) training images, as a Normalization layer."""
    from training import data

    normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
    split = datasets.train_split
    n = min(len(split), NORMALIZATION_ADAPT_EXAMPLES if split.images is not None else 2_000)
    sample = data.eval_dataset(split.subset(slice(0, n)), 256, augment=recipe.preprocessing,
                               image_size=recipe.image_size)
    normalizer.adapt(sample.map(lambda x, y: x))
    return normalizer


def build_and_compile(config, datasets, strategy, total_steps):
    """The run's classifier, compiled under `strategy` with the recipe's optimizer and metrics.

    Args:
        config: `training.command_line.RunConfig`.
        datasets: `training.data.Datasets`.
        strategy: the run's `tf.distribute.Strategy`.
        total_steps: int. Steps of the whole run (the learning-rate schedule).

    Returns:
        The compiled `keras.Model`, its optimizer's variables built.
    """
    recipe = config.recipe
    with strategy.scope():
        # Metric objects create their variables when constructed: inside the scope they are the
        # strategy's sync-on-read variables, summed over every replica of every worker.
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if recipe.top5 or datasets.num_classes > 10:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
        model = build_classifier(config.model, (recipe.image_size, recipe.image_size, 3),
                                 datasets.num_classes, adapted_normalizer(datasets, recipe),
                                 use_custom_gradient=config.use_custom_gradient,
                                 weight_decay=recipes.model_weight_decay(recipe),
                                 **_coupling_option(config.coupling))
        model.compile(optimizer=recipes.make_optimizer(recipe, total_steps),
                      loss=keras.losses.SparseCategoricalCrossentropy(), metrics=metrics,
                      jit_compile="auto")
        # The optimizer's variables now (as restoring a backup does), not inside the first traced
        # step: a step that creates variables is traced twice.
        model.optimizer.build(model.trainable_variables)
    return model


def _one_line(error):
    return " ".join(str(error).split())[:300]


def _read_config(model_dir):
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError("model_dir", model_dir, f"no {CONFIG_FILE}; give the run directory of a "
                          "python -m training.train run")
    try:
        config = json.loads(path.read_text())
        missing = [k for k in ("model", "image_shape", "class_names") if k not in config]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise RunDirError("model_dir", model_dir, f"{CONFIG_FILE} is not valid JSON ({e})") \
            from None
    if missing:
        raise RunDirError("model_dir", model_dir, f"{CONFIG_FILE} lacks {', '.join(missing)}; the "
                          "run stopped before loading its data, so it has no weights to export")
    return config


def load_run(model_dir):
    """Rebuilds the classifier of a `python -m training.train` run from its weights.

    Works for finished and interrupted runs: `model.weights.h5` holds the weights after the last
    finished epoch. The model is rebuilt in float32 (whatever `--mixed-precision` the run used).

    Args:
        model_dir: str or path-like. The run's directory.

    Returns:
        `(model, config)`: the `keras.Model` (raw float32 pixels in, probabilities out) and the
        run's `config.json` as a dict.

    Raises:
        training.errors.RunDirError: missing or corrupt `config.json` or weights (one line,
            parameter `model_dir`).
    """
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise RunDirError("model_dir", model_dir, "not a directory; give the run directory of a "
                          "python -m training.train run")
    config = _read_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError("model_dir", model_dir, f"no {WEIGHTS_FILE}: the run has not finished "
                          "an epoch yet; train for at least one epoch first")
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
        model = build_classifier(config["model"], tuple(config["image_shape"]),
                                 len(config["class_names"]), normalizer,
                                 use_custom_gradient=config.get("use_custom_gradient", True),
                                 **_coupling_option(config.get("coupling", "additive")))
    finally:
        keras.config.set_dtype_policy(previous_policy)
    try:
        model.load_weights(str(weights))
    except Exception as e:  # h5py/Keras raise OSError, ValueError, KeyError... for bad files
        raise RunDirError("model_dir", model_dir, f"cannot read {WEIGHTS_FILE} (corrupt or from "
                          f"another model): {_one_line(e)}") from None
    return model, config


def load_keras_file(path):
    """Loads a `.keras` file saved by `python -m training.train` (or any classifier of raw pixels).

    Args:
        path: str or path-like ending in `.keras`.

    Returns:
        `(model, config)`: the `keras.Model` and the `config.json` beside the file (the run's), or
        `{}` if there is none.

    Raises:
        training.errors.StageError: missing or corrupt file (one line, parameter `keras_file`).
    """
    import tf_revnet  # noqa: F401  (registers the RevNet layers for deserialization)

    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise StageError("keras_file", path, "must end in .keras (a file saved by model.save)")
    if not path.is_file():
        raise StageError("keras_file", path, "no such file")
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, ...: all mean "not a valid .keras"
        raise StageError("keras_file", path, "cannot load it (corrupt or not a Keras model file): "
                         f"{_one_line(e)}") from None
    config_path = path.parent / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return model, config
