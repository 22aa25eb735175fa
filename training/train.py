"""Train a RevNet (or a baseline) with `model.fit`, evaluate it, and export it for TF Serving.

Run from the repository root (`training` is not an installed package):

    # The paper's CIFAR-10 recipe on RevNet-38 (TFDS downloads CIFAR-10 on first use):
    python -m training.train --model revnet38 --dataset cifar10

    # Offline, from an image folder DIR/train/<class>/*, DIR/test/<class>/*:
    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python -m training.train --data-dir /tmp/cifar10 --recipe quick

    # ImageNet (RevNet-104) from a folder of JPEGs DIR/train/<class>/*.JPEG, DIR/test/<class>/*:
    python -m training.train --recipe imagenet --model revnet104 --data-dir /data/imagenet \\
        --distribution mirrored

    # Two workers: the same command on each host, with its own TF_CONFIG task index (0 is the
    # chief, which writes the run dir; the run dir is shared, e.g. on a network file system):
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", '\\
    '"index": 0}}' python -m training.train --data-dir /data/cifar10 --distribution multi_worker \\
        --model-dir /shared/runs/a

    # Save every 500 steps; a killed run resumes exactly when started again with its run dir:
    python -m training.train --data-dir /tmp/cifar10 --save-every-steps 500 --model-dir runs/a
    python -m training.train --data-dir /tmp/cifar10 --save-every-steps 500 --model-dir runs/a

Each run writes to its own run directory (`--model-dir`, default a new `runs/<model>/<time>/`):
`config.json` (the resolved options), `backup/` (the resume state, removed when the run is
complete), `model.weights.h5` (weights after the last epoch, replaced atomically),
`training_log.csv`, TensorBoard logs in `logs/`, `curves.png` and `summary.json`. Starting the same
command with the same `--model-dir` resumes exactly (same final weights as an uninterrupted run on
CPU); a different command (model, data, recipe values, precision, seed) is refused.

At the end it saves `model.keras` beside the weights (reload it with `keras.saving.load_model` after
`import tf_revnet` to fine-tune) and exports a new version of the TF Serving model base path
`--export-dir` (default `saved_models/<model>`; `--no-export` skips it) with `training.export`:
`<export-dir>/<n>/`, `n` reserved atomically, signatures for uint8 images and encoded JPEG/PNG files
returning class names, the run's configuration and test accuracy in `assets.extra/export.json`.
The model takes raw float32 pixels in [0, 255]: per-channel normalization (mean and variance
adapted on the training images) is its first layer.

`main(argv)` returns the process exit code (0, or 2 after a one-line error on bad input);
`run(argv)` does the work and returns a `TrainResult` (model, history, test metrics, export path)
for tests and notebooks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import resource
import sys
import time

if __name__ == "__main__":  # the command line: no TensorFlow start-up noise (see training.startup)
    from training.startup import import_tensorflow_quietly

    import_tensorflow_quietly()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import checkpoint as checkpoint_lib  # noqa: E402
from training import data as data_lib  # noqa: E402
from training import distribute as distribute_lib  # noqa: E402
from training import export as export_lib  # noqa: E402
from training import image_safety, plots, recipes, serving_layout  # noqa: E402

__all__ = ["main", "run", "build_parser", "resolve_config", "build_classifier", "RunConfig",
           "TrainResult", "ConfigError", "RunMetrics", "AtomicWeightsCheckpoint",
           "MODEL_BUILDERS"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIXED_PRECISION_POLICIES = ("none", "mixed_bfloat16", "mixed_float16")
NORMALIZATION_ADAPT_EXAMPLES = 10_000
# Extra model builders by name (notebooks, tests): name -> builder(input_shape=, classes=,
# classifier_activation=, use_custom_gradient=, kernel_regularizer=) -> keras.Model.
MODEL_BUILDERS = {}


class ConfigError(ValueError):
    """Bad command-line options; the message is one line naming the option."""


# The recipe fields that command-line flags override (--epochs, --batch-size, ...).
RECIPE_FLAGS = ("epochs", "batch_size", "learning_rate", "momentum", "weight_decay", "image_size",
                "steps_per_epoch", "train_examples", "test_examples", "augment")
# Fields of `RunConfig` that change what is trained: a backup may only be resumed when they are equal.
# `deterministic` is one of them: op determinism selects other CPU kernels (measured: BatchNorm
# scales 3e-4 apart after 12 steps of the tiny test model), so it must not change on resume.
TRAINING_FIELDS = ("model", "dataset", "data_dir", "validation_split", "recipe", "mixed_precision",
                   "use_custom_gradient", "seed", "deterministic")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of a run (recipe with overrides, paths, options).

    Attributes:
        model: str. Model name as given (any name `tf_revnet.models.get` accepts).
        dataset: str or None. TFDS name (None with `data_dir`).
        data_dir: str or None. Absolute image-folder root.
        tfds_data_dir: str or None.
        validation_split: float or None.
        recipe: `recipes.Recipe` with the command-line overrides.
        model_dir: str. Absolute run directory.
        export_dir: str. Absolute TF Serving model base path; the export is its next version
            `<export_dir>/<n>/`.
        export: bool. Export at the end of the run (False: `--no-export`).
        mixed_precision: str. `"none"`, `"mixed_bfloat16"` or `"mixed_float16"`.
        use_custom_gradient: bool.
        seed: int.
        deterministic: bool. TensorFlow op determinism.
        distribution: str. One of `distribute.STRATEGIES`.
        worker_timeout: float. Seconds a multi-worker process waits for the other workers.
        save_every_steps: int or None.
        strict_data: bool.
        max_image_pixels: int. Image files whose header announces more pixels (all frames of a
            GIF together) are skipped (or stop the run with `strict_data`) before decoding, and
            the export's `serving_bytes` refuses them.
        monitor_numerics: int. Steps between numerics measurements (0: off).
        max_gradient_angle: float. Degrees; the monitor warns above it.
        max_reconstruction_error: float. Relative; the monitor warns above it.
        verbose: int. Keras `fit` verbosity.
        command: str. The command line.
    """

    model: str
    dataset: str | None
    data_dir: str | None
    tfds_data_dir: str | None
    validation_split: float | None
    recipe: recipes.Recipe
    model_dir: str
    export_dir: str
    export: bool = True
    mixed_precision: str = "none"
    use_custom_gradient: bool = True
    seed: int = 0
    deterministic: bool = False
    distribution: str = "none"
    worker_timeout: float = distribute_lib.DEFAULT_WORKER_TIMEOUT
    save_every_steps: int | None = None
    strict_data: bool = False
    max_image_pixels: int = image_safety.DEFAULT_MAX_IMAGE_PIXELS
    monitor_numerics: int = 0
    max_gradient_angle: float = 1.0
    max_reconstruction_error: float = 1e-2
    verbose: int = 1
    command: str = ""

    def to_dict(self):
        """JSON-serializable dict (the recipe as a nested dict)."""
        config = dataclasses.asdict(self)
        config["recipe"] = self.recipe.to_dict()
        return config

    def training_fingerprint(self):
        """The values that change training (model, data, recipe, precision, seed, determinism)."""
        config = self.to_dict()
        fingerprint = {key: config[key] for key in TRAINING_FIELDS}
        fingerprint["model"] = canonical_model_name(self.model)  # RevNet-38 = revnet38
        fingerprint["recipe"] = {k: v for k, v in fingerprint["recipe"].items()
                                 if k not in ("name", "description")}
        return fingerprint


@dataclasses.dataclass
class TrainResult:
    """What `run` returns.

    Attributes:
        model: the trained `keras.Model` (raw float32 pixels in, class probabilities out).
        history: dict of per-epoch metric lists of this process' `fit` calls (a resumed run
            starts at the restored epoch).
        test_accuracy: float. Top-1 accuracy on the test split after training.
        test_loss: float. Loss on the same examples (including the weight-decay penalty).
        export_dir: `pathlib.Path` of the exported version `<export-dir>/<n>/`, or None with
            `--no-export`.
        config: dict. The resolved configuration and data facts (also in `config.json`).
        summary: dict. What the end-of-run summary shows (also in `summary.json`).
    """

    model: keras.Model
    history: dict
    test_accuracy: float
    test_loss: float
    export_dir: pathlib.Path | None
    config: dict
    summary: dict


class AtomicWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights at the end of every epoch, atomically.

    Keras' `ModelCheckpoint` writes in place, so a run killed during the write leaves a truncated
    file. This callback writes to a temporary file in the same directory and `os.replace`s it.

    Args:
        filepath: str or path-like ending in `.weights.h5`.

    Raises:
        ValueError: if `filepath` does not end in `.weights.h5`.
    """

    def __init__(self, filepath):
        super().__init__()
        self.filepath = str(filepath)
        if not self.filepath.endswith(".weights.h5"):
            raise ValueError(
                f"`filepath` must end in `.weights.h5`. Received: filepath={self.filepath}"
            )

    def on_epoch_end(self, epoch, logs=None):
        directory, name = os.path.split(self.filepath)
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
        self.model.save_weights(tmp, overwrite=True)
        os.replace(tmp, self.filepath)


class RunMetrics(keras.callbacks.Callback):
    """Adds `learning_rate` and `images_per_second` to each epoch's logs.

    Placed before `CSVLogger` and `TensorBoard` in the callback list, so both record them (Keras
    passes one logs dict through the callbacks in order).

    Args:
        batch_size: int. Global batch size.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size
        self.images = 0
        self.seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._last_batch_time = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._steps:
            return
        seconds = self._last_batch_time - self._start  # training steps only, not validation
        self.images += self._steps * self.batch_size
        self.seconds += seconds
        logs["images_per_second"] = self._steps * self.batch_size / max(seconds, 1e-9)
        # The optimizer's current value of the schedule (the rate of the next step).
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _model_names():
    import tf_revnet.models

    return list(tf_revnet.models.list_models()) + sorted(MODEL_BUILDERS)


def canonical_model_name(name):
    """The zoo's own name of model `name` (`"RevNet-38"` and `"revnet_38"` give `"RevNet38"`);
    `name` itself when it is no zoo model's name (or one of `MODEL_BUILDERS`)."""
    import tf_revnet.models

    if name in MODEL_BUILDERS:
        return name
    try:
        return tf_revnet.models.get(name).__name__
    except ValueError:
        return name


def _builder(name):
    if name in MODEL_BUILDERS:
        return MODEL_BUILDERS[name]
    import tf_revnet.models

    return tf_revnet.models.get(name)


def build_parser():
    """The command-line interface; recipe fields default to `None` (= take the recipe's value)."""
    recipe_help = "; ".join(
        f"{name}: {recipes.get(name).description}" for name in recipes.list_recipes()
    ).replace("%", "%%")
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a RevNet with model.fit, evaluate it, export a SavedModel for "
        "TF Serving.",
        epilog="Example: python -m training.train --data-dir /tmp/cifar10 --recipe quick",
    )
    parser.add_argument("--model", default="revnet38",
                        help="model name as tf_revnet.models.get takes it (revnet38, RevNet-38, "
                             "revnet_38, resnet32, ...). Default: revnet38")
    parser.add_argument("--dataset", default="cifar10",
                        help="TFDS dataset name (ignored with --data-dir). Default: cifar10")
    parser.add_argument("--data-dir", default=None,
                        help="image-folder root DIR with DIR/train/<class>/* and "
                             "DIR/test/<class>/*, used instead of TFDS")
    parser.add_argument("--validation-split", type=float, default=None,
                        help="with --data-dir and no DIR/test: hold out this fraction of train "
                             "as the test split")
    parser.add_argument("--strict-data", action="store_true",
                        help="stop at the first image file that does not decode (default: skip "
                             "and report such files)")
    parser.add_argument("--max-image-pixels", type=int,
                        default=image_safety.DEFAULT_MAX_IMAGE_PIXELS, metavar="PIXELS",
                        help="image files whose header announces more pixels (all frames of a GIF "
                             "together) are skipped before decoding (--strict-data: stop), and "
                             "the export's serving_bytes signature refuses them. "
                             "Default: %(default)d")
    parser.add_argument("--tfds-data-dir", default=None,
                        help="where TFDS stores datasets. Default: TFDS' default")
    parser.add_argument("--recipe", default=None, choices=recipes.list_recipes(),
                        help=f"named preset ({recipe_help}). Default: the model's (vit_cifar for "
                        "revvit_cifar, vit_imagenet for revvitsmall/revvitbase, cifar for the "
                        "others)")
    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int, help="global batch size (all devices)")
    group.add_argument("--learning-rate", type=float, help="initial learning rate")
    group.add_argument("--scale-learning-rate", action="store_true",
                       help="linear scaling rule: lr = recipe lr * batch size / recipe batch size")
    group.add_argument("--momentum", type=float)
    group.add_argument("--weight-decay", type=float,
                       help="L2 coefficient on convolution and dense kernels")
    group.add_argument("--image-size", type=int, help="side of the square images the model sees")
    group.add_argument("--steps-per-epoch", type=int,
                       help="cap on the training steps of each epoch")
    group.add_argument("--train-examples", type=int,
                       help="use only this many training examples")
    group.add_argument("--test-examples", type=int,
                       help="use only this many test examples (validation and final evaluation)")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="training augmentation (CIFAR: pad-4 crop + flip; ImageNet: "
                            "random-resized crop + flip)")
    parser.add_argument("--model-dir", default=None,
                        help="run directory (checkpoints, logs, config.json); give an existing "
                             "one to resume it. Default: a new runs/<model>/<date-time>")
    parser.add_argument("--save-every-steps", type=int, default=None,
                        help="also save the resume state every N steps (default: every epoch)")
    parser.add_argument("--export-dir", default=None,
                        help="model base path that TF Serving watches: the export becomes its next "
                             "version <export-dir>/<n>/. Default: saved_models/<model>")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="skip the export (export later with python -m training.export)")
    parser.add_argument("--mixed-precision", default="none", choices=MIXED_PRECISION_POLICIES,
                        help="Keras dtype policy. Default: none (float32)")
    parser.add_argument("--distribution", default="none", choices=distribute_lib.STRATEGIES,
                        help="tf.distribute strategy: mirrored (GPUs of this machine), "
                             "multi_worker (TF_CONFIG), tpu. Default: none")
    parser.add_argument("--worker-timeout", type=float,
                        default=distribute_lib.DEFAULT_WORKER_TIMEOUT, metavar="SECONDS",
                        help="multi_worker: how long a worker waits for the others of TF_CONFIG "
                             "to start. Default: %(default)g")
    parser.add_argument("--no-custom-gradient", dest="use_custom_gradient", action="store_false",
                        help="plain autodiff instead of reversible backprop (for comparison)")
    parser.add_argument("--monitor-numerics", type=int, default=0, metavar="N",
                        help="every N steps, log the reversible gradient angle and reconstruction "
                        "error on a held-out test batch (tf_revnet.callbacks."
                        "ReversibleNumericsMonitor). Default: 0 (off)")
    parser.add_argument("--max-gradient-angle", type=float, default=1.0, metavar="DEG",
                        help="with --monitor-numerics: warn above this angle. Default: 1.0")
    parser.add_argument("--max-reconstruction-error", type=float, default=1e-2, metavar="REL",
                        help="with --monitor-numerics: warn above this relative error. "
                        "Default: 0.01")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialization, data order and augmentation. Default: 0")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow op determinism (tf.config.experimental."
                             "enable_op_determinism): bitwise-repeatable runs, slower on GPU")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="Keras fit verbosity (1 = progress bar). Default: 1")
    return parser


def _flag(name):
    return "--" + name.replace("_", "-")


def resolve_config(args):
    """Merges the recipe with the command-line overrides and fills in default paths.

    Args:
        args: `argparse.Namespace` from `build_parser()` (with `argv`, the list of arguments).

    Returns:
        `RunConfig`.

    Raises:
        ConfigError: for unknown models or out-of-range values.
    """
    names = _model_names()
    try:
        _builder(args.model)
    except ValueError:
        raise ConfigError(f"--model {args.model}: unknown model; choose from {', '.join(names)} "
                          "(case, '-' and '_' do not matter)") from None
    try:
        recipe = recipes.get(args.recipe or recipes.default_recipe(canonical_model_name(args.model)))
        if args.scale_learning_rate and args.batch_size is not None:
            recipe = recipe.scaled_to_batch(args.batch_size)
        recipe = recipe.replace(**{field: getattr(args, field) for field in RECIPE_FLAGS})
    except ValueError as e:
        # Name the command-line option rather than the recipe field: `batch_size` -> --batch-size.
        message = re.sub(r"`(\w+)`", lambda m: _flag(m.group(1)), str(e))
        raise ConfigError(message) from None
    if args.monitor_numerics < 0:
        raise ConfigError(f"--monitor-numerics must be >= 0. Received: {args.monitor_numerics}")
    if args.save_every_steps is not None and args.save_every_steps < 1:
        raise ConfigError(f"--save-every-steps must be >= 1. Received: {args.save_every_steps}")
    if args.distribution == "multi_worker" and not args.model_dir:
        raise ConfigError("--distribution multi_worker needs --model-dir: one run directory that "
                          "every worker sees (e.g. on a network file system), the same in each "
                          "worker's command")
    if args.max_image_pixels < 1:
        raise ConfigError(f"--max-image-pixels must be >= 1. Received: {args.max_image_pixels}")
    if args.worker_timeout <= 0:
        raise ConfigError(f"--worker-timeout must be > 0 seconds. Received: {args.worker_timeout}")
    if args.model_dir:
        model_dir = pathlib.Path(args.model_dir).expanduser().resolve()
    else:
        model_dir = _new_run_dir(REPO_ROOT / "runs" / args.model)
    export_dir = pathlib.Path(args.export_dir or REPO_ROOT / "saved_models" / args.model)
    try:
        serving_layout.check_base_path(export_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return RunConfig(
        model=args.model,
        dataset=None if args.data_dir else args.dataset,
        data_dir=str(pathlib.Path(args.data_dir).expanduser().resolve()) if args.data_dir
        else None,
        tfds_data_dir=args.tfds_data_dir,
        validation_split=args.validation_split,
        recipe=recipe,
        model_dir=str(model_dir),
        export_dir=str(export_dir.expanduser().resolve()),
        export=args.export,
        mixed_precision=args.mixed_precision,
        use_custom_gradient=args.use_custom_gradient,
        seed=args.seed,
        deterministic=args.deterministic,
        distribution=args.distribution,
        worker_timeout=args.worker_timeout,
        save_every_steps=args.save_every_steps,
        strict_data=args.strict_data,
        max_image_pixels=args.max_image_pixels,
        monitor_numerics=args.monitor_numerics,
        max_gradient_angle=args.max_gradient_angle,
        max_reconstruction_error=args.max_reconstruction_error,
        verbose=args.verbose,
        command=" ".join(["python -m training.train"] + list(args.argv)),
    )


def _new_run_dir(root):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def build_classifier(model_name, image_shape, num_classes, normalizer, use_custom_gradient=True,
                     weight_decay=0.0):
    """Wraps a zoo model so that it takes raw pixels: `Input -> normalizer -> backbone`.

    Args:
        model_name: str. Any name `tf_revnet.models.get` accepts (or a key of `MODEL_BUILDERS`).
        image_shape: tuple `(H, W, C)`.
        num_classes: int.
        normalizer: an adapted `keras.layers.Normalization` (kept in float32).
        use_custom_gradient: bool. Reversible backprop (True) or plain autodiff.
        weight_decay: float. L2 penalty on every convolution and the classifier kernel, through
            the builder's `kernel_regularizer` (0: none).

    Returns:
        A functional `keras.Model`: float32 `(batch, H, W, C)` pixels in [0, 255] ->
        float32 `(batch, num_classes)` softmax probabilities.
    """
    regularizer = recipes.kernel_l2_regularizer(weight_decay) if weight_decay > 0 else None
    backbone = _builder(model_name)(
        input_shape=tuple(image_shape),
        classes=num_classes,
        classifier_activation="softmax",
        use_custom_gradient=use_custom_gradient,
        kernel_regularizer=regularizer,
    )
    pixels = keras.Input(shape=tuple(image_shape), dtype="float32", name="pixels")
    outputs = backbone(normalizer(pixels))
    if outputs.dtype != "float32":
        outputs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(outputs)
    name = re.sub(r"\W", "_", model_name.lower())
    return keras.Model(pixels, outputs, name=f"{name}_classifier")


def _adapted_normalizer(datasets, recipe):
    """Per-channel mean/variance of (up to 10,000) training images, as a Normalization layer."""
    normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
    split = datasets.train_split
    n = min(len(split), NORMALIZATION_ADAPT_EXAMPLES if split.images is not None else 2_000)
    sample = data_lib.eval_dataset(split.subset(slice(0, n)), 256,
                                   augment=recipe.preprocessing, image_size=recipe.image_size)
    normalizer.adapt(sample.map(lambda x, y: x))
    return normalizer


def _write_json(path, obj):
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _prepare_run_dir(config):
    """Checks that `config.model_dir` is new, or an unfinished run of the same training config.

    Returns:
        bool. True if the directory holds a run to resume.

    Raises:
        ConfigError: the directory holds another run, a finished run, or other files.
    """
    model_dir = pathlib.Path(config.model_dir)
    previous = model_dir / "config.json"
    # Leaving --model-dir out gives a new directory, except under multi_worker (refused there).
    other = ("pick a new --model-dir" if config.distribution == "multi_worker"
             else "pick a new --model-dir or leave it out (a new runs/<model>/<time>)")
    # worker-<i>/, .lock: other workers' state, the run's lock (see _lock_run_dir).
    if not model_dir.exists() or (model_dir.is_dir() and not any(
            p for p in model_dir.iterdir()
            if not p.name.startswith("worker-") and p.name != ".lock")):
        return False
    if not previous.is_file():
        raise ConfigError(f"--model-dir {model_dir}: exists and is not a run directory (no "
                          f"config.json); {other}")
    old = json.loads(previous.read_text())
    if old.get("finished"):
        raise ConfigError(f"--model-dir {model_dir}: holds a finished run ({old.get('command')}); "
                          f"{other}")
    old_fingerprint = dict(old.get("fingerprint", {}))
    if "model" in old_fingerprint:  # runs of earlier versions kept the name as typed
        old_fingerprint["model"] = canonical_model_name(old_fingerprint["model"])
    new_fingerprint = config.training_fingerprint()
    changed = [k for k in new_fingerprint if old_fingerprint.get(k) != new_fingerprint[k]]
    if "recipe" in changed:
        changed.remove("recipe")
        old_recipe = old_fingerprint.get("recipe", {})
        # A field added since the old run was written has its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(recipes.Recipe)}
        changed += [k for k, v in new_fingerprint["recipe"].items()
                    if old_recipe.get(k, defaults.get(k)) != v]
    if changed:
        raise ConfigError(
            f"--model-dir {model_dir}: holds an unfinished run with different "
            f"{', '.join(changed)}; resume it with its own command ({old.get('command')}), or "
            "pick another --model-dir"
        )
    return True


def _strategy(config):
    def format_stop(message, signum):  # the wait for the other workers ends the process
        hint = "" if signum else f" (or raise --worker-timeout {config.worker_timeout:g})"
        return f"python -m training.train: error: --distribution multi_worker: {message}{hint}"

    try:
        return distribute_lib.make_strategy(config.distribution, config.worker_timeout,
                                            format_stop)
    except ValueError as e:
        raise ConfigError(f"--distribution {config.distribution}: {e}") from None


def _peak_memory_mb():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    gpus = tf.config.list_logical_devices("GPU")
    gpu = sum(tf.config.experimental.get_memory_info(d.name)["peak"] for d in gpus) / 2**20
    return peak, gpu


def _shared_options(config, run_dir):
    """The options every worker of a multi-worker run must share, keyed by flag name."""
    fingerprint = config.training_fingerprint()
    options = {"--model-dir": str(run_dir), "--save-every-steps": config.save_every_steps,
               "--monitor-numerics": config.monitor_numerics,
               "--max-image-pixels": config.max_image_pixels}
    for key, value in fingerprint.items():
        if key == "use_custom_gradient":
            options["--no-custom-gradient"] = value
        elif key == "recipe":  # the values --recipe sets, and those that flags override
            for field, field_value in value.items():
                flag = _flag(field) if field in RECIPE_FLAGS else "--recipe"
                options.setdefault(flag, []).append([field, field_value])
        else:
            options[_flag(key)] = value
    return options


# File descriptors of the run directories this process holds locked (released by `run`).
_HELD_LOCKS = []


def _lock_run_dir(model_dir):
    """Creates `model_dir` and locks it (`.lock`, holding the pid) for this process; removes the
    temporary files a killed run left (`.tmp-*`, also in `backup/`).

    Raises:
        ConfigError: another process holds the lock (its run would interleave with this one's
            files).
    """
    import fcntl

    model_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(model_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"--model-dir {model_dir}: in use by another training process (pid "
                          f"{pid}); wait for it to end, or pick another --model-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS.append(fd)
    # With the lock held no other process writes here: temporary files are a killed run's.
    for stale in [*model_dir.glob(".tmp-*"), *model_dir.glob("backup/.tmp-*")]:
        stale.unlink(missing_ok=True)


def _release_run_dir_locks():
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


def _start_up_checks(config, strategy, run_dir, chief):
    """This process' own checks: run directory, data, batch size. Returns (resuming, datasets)."""
    recipe = config.recipe
    try:
        resuming = _prepare_run_dir(config)
    except ConfigError as e:
        if chief:
            raise
        # Name the directory the user gave, and this worker's state folder inside it.
        raise ConfigError(str(e).replace(f"--model-dir {config.model_dir}:",
                                         f"--model-dir {run_dir}: this worker's state folder "
                                         f"{pathlib.Path(config.model_dir).name}/", 1)) from None
    _lock_run_dir(pathlib.Path(config.model_dir))
    replicas = strategy.num_replicas_in_sync
    if recipe.batch_size % replicas:
        raise ConfigError(
            f"--batch-size {recipe.batch_size}: the global batch is split into {replicas} equal "
            f"replica batches ({config.distribution}); use a multiple of {replicas}")
    datasets = data_lib.load(
        dataset=config.dataset,
        data_dir=config.data_dir,
        tfds_data_dir=config.tfds_data_dir,
        image_size=recipe.image_size,
        in_memory=recipe.preprocessing == "cifar",
        train_examples=recipe.train_examples,
        test_examples=recipe.test_examples,
        seed=config.seed,
        validation_split=config.validation_split,
        strict=config.strict_data,
        max_image_pixels=config.max_image_pixels,
    )
    for line in _left_out_lines(datasets):
        print(line, flush=True)
    if datasets.num_train < recipe.batch_size:
        raise ConfigError(
            f"--batch-size {recipe.batch_size}: larger than the {datasets.num_train} training "
            "examples; lower it or use more examples"
        )
    return resuming, datasets


def _left_out_lines(datasets):
    """The lines that report the image files left out of `datasets` (none if there are none)."""
    lines = []
    if datasets.skipped:
        shown = ", ".join(datasets.skipped[:data_lib.MAX_REPORTED_FILES])
        more = " ..." if len(datasets.skipped) > data_lib.MAX_REPORTED_FILES else ""
        lines.append(f"Skipped {len(datasets.skipped)} files that do not decode: {shown}{more} "
                     "(--strict-data stops instead)")
    if datasets.refused:
        shown = "; ".join(datasets.refused[:data_lib.MAX_REPORTED_FILES])
        more = " ..." if len(datasets.refused) > data_lib.MAX_REPORTED_FILES else ""
        lines.append(f"Refused {len(datasets.refused)} files before decoding: {shown}{more} "
                     "(--max-image-pixels raises the limit; --strict-data stops instead)")
    return lines


def _train(config, callbacks):
    run_dir = pathlib.Path(config.model_dir)  # the chief's, shared by all workers
    chief, worker_index = True, 0
    if config.distribution == "multi_worker":
        try:
            worker_index = distribute_lib.cluster_task().index
            chief = distribute_lib.is_chief()
        except ValueError as e:
            raise ConfigError(f"--distribution multi_worker: {e}") from None
    if not chief:
        # Workers other than the chief keep their own backup, logs and export in a sub-folder
        # (the Keras multi-worker convention): the chief's files are the run's. Every worker
        # runs the whole command, saves included, so that all run the same collective steps.
        worker = run_dir / f"worker-{worker_index}"
        config = dataclasses.replace(config, model_dir=str(worker),
                                     export_dir=str(worker / "export"))
    recipe = config.recipe
    model_dir = pathlib.Path(config.model_dir)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = _strategy(config)
    # A multi-worker run: every worker checks that the others run the same command, then does its
    # own start-up checks; all stop together (one line each) if one of them fails, instead of
    # the others waiting for it, or failing in a collective with a shape-mismatch traceback.
    try:
        distribute_lib.check_same_values(strategy, _shared_options(config, run_dir))
    except distribute_lib.WorkerMismatchError as e:
        raise ConfigError(f"--distribution multi_worker: {e}") from None
    try:
        resuming, datasets = _start_up_checks(config, strategy, run_dir, chief)
    except (ConfigError, data_lib.DataError):
        distribute_lib.check_all_ready(strategy, False)
        raise
    try:
        distribute_lib.check_all_ready(strategy, True)
        # Each host may hold its own copy of the data: the same path must hold the same data.
        distribute_lib.check_same_values(strategy, {
            "class names": datasets.class_names,
            "numbers of training images": datasets.num_train,
            "numbers of test images": datasets.num_test}, verb="loaded data with",
            fix="every worker's data (the --data-dir or --dataset of its host) must be the same")
    except distribute_lib.WorkerMismatchError as e:
        raise ConfigError(f"--distribution multi_worker: {e}") from None
    steps_per_epoch = data_lib.num_steps(datasets.num_train, recipe.batch_size)
    if recipe.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, recipe.steps_per_epoch)
    total_steps = steps_per_epoch * recipe.epochs
    image_shape = (recipe.image_size, recipe.image_size, 3)
    facts = {"data_source": datasets.source, "num_train": datasets.num_train,
             "num_test": datasets.num_test, "test_split": datasets.test_name,
             "image_shape": list(image_shape), "class_names": datasets.class_names,
             "skipped_files": len(datasets.skipped), "refused_files": len(datasets.refused),
             "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps, "num_replicas": strategy.num_replicas_in_sync}
    config_dict = {**config.to_dict(), **facts, "fingerprint": config.training_fingerprint()}
    model_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        _write_json(model_dir / "config.json", config_dict)

    test_ds = data_lib.eval_dataset(datasets.test_split, recipe.batch_size,
                                    augment=recipe.preprocessing, image_size=recipe.image_size)
    with strategy.scope():
        # Metric objects create their variables when constructed: inside the scope they are the
        # strategy's sync-on-read variables, summed over every replica of every worker when read.
        # (Created outside, each worker's copy counts only its own share of the batches, while
        # the loss, created by `compile`, is global.)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if recipe.top5 or datasets.num_classes > 10:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
        normalizer = _adapted_normalizer(datasets, recipe)
        model = build_classifier(config.model, image_shape, datasets.num_classes, normalizer,
                                 use_custom_gradient=config.use_custom_gradient,
                                 weight_decay=recipes.model_weight_decay(recipe))
        model.compile(
            optimizer=recipes.make_optimizer(recipe, total_steps),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=metrics,
            jit_compile="auto",
        )
        # The optimizer's variables now (as restoring a backup does), not inside the first traced
        # step: a step that creates variables is traced twice (measured: 2 traces of train_step
        # per fit call without this, 1 with it).
        model.optimizer.build(model.trainable_variables)
    decayed = recipes.decayed_kernels(model)
    decay_text = (f"{len(decayed)} kernels with weight decay {recipe.weight_decay}"
                  if recipe.optimizer == "sgd" else "decoupled weight decay in AdamW")
    print(
        f"Model {config.model}: {model.count_params():,} parameters ({decay_text}); "
        f"dtype policy {keras.config.dtype_policy().name}; "
        f"{strategy.num_replicas_in_sync} replica(s) ({config.distribution})\n"
        f"Data {datasets.source}: {datasets.num_train} train / {datasets.num_test} "
        f"{datasets.test_name} images, {datasets.num_classes} classes, model input "
        f"{image_shape}\n"
        f"Recipe {recipe.name}: {recipe.epochs} epochs x {steps_per_epoch} steps of batch "
        f"{recipe.batch_size} = {total_steps} steps; {_optimizer_text(recipe)}\n"
        f"Run dir {model_dir}",
        flush=True,
    )

    backup = checkpoint_lib.ExactBackup(model_dir / "backup",
                                        save_every_steps=config.save_every_steps)
    # Every worker of a multi-worker run resumes from the chief's backup when it sees the shared
    # run directory (a worker killed just before its own save would otherwise be one save
    # behind), and the workers check that they restored the same step.
    chief_backup = checkpoint_lib.ExactBackup(run_dir / "backup")
    source = chief_backup if not chief and chief_backup.exists() else backup
    try:
        step = source.restore(model)
        distribute_lib.check_same_step(strategy, step)
    except checkpoint_lib.CheckpointError as e:
        raise ConfigError(f"--model-dir {run_dir}: {e}") from None
    except distribute_lib.WorkerMismatchError as e:
        raise ConfigError(f"--distribution multi_worker: {e}") from None
    if step >= total_steps:
        print(f"Resuming after the last step ({step} of {total_steps}): training is done, "
              f"evaluating and saving (backup in {source.directory})", flush=True)
    elif step:
        print(f"Resuming at step {step} of {total_steps} (epoch {step // steps_per_epoch + 1}, "
              f"batch {step % steps_per_epoch}) from {source.directory}", flush=True)

    run_metrics = RunMetrics(recipe.batch_size)
    fit_callbacks = [
        # First: the BatchNorm statistics every callback after it saves or validates with.
        distribute_lib.AverageReplicaStatistics(strategy, config.save_every_steps),
        backup,
        AtomicWeightsCheckpoint(model_dir / "model.weights.h5"),
        run_metrics,
        keras.callbacks.CSVLogger(str(model_dir / "training_log.csv"), append=True),
        keras.callbacks.TensorBoard(str(model_dir / "logs"), write_graph=False),
        *callbacks,
    ]
    if config.monitor_numerics:  # before CSVLogger/TensorBoard, which read its logs
        import tf_revnet.callbacks

        if not tf_revnet.diagnostics.reversible_layers(model):
            raise ConfigError(f"--monitor-numerics: {config.model} has no reversible layers")
        x_val, y_val = next(iter(test_ds.unbatch().batch(16)))
        fit_callbacks.insert(4, tf_revnet.callbacks.ReversibleNumericsMonitor(
            x_val, y_val, every_n_steps=config.monitor_numerics,
            max_gradient_angle=config.max_gradient_angle,
            max_reconstruction_error=config.max_reconstruction_error,
            log_dir=str(model_dir / "logs" / "numerics")))
    # Keras runs whole epochs: a run resumed in the middle of epoch e first finishes e with a
    # fit call of the remaining steps, then runs the following epochs in a second one.
    segments = []
    if step % steps_per_epoch:
        epoch = step // steps_per_epoch
        segments.append((step, epoch, (epoch + 1) * steps_per_epoch))
        step = (epoch + 1) * steps_per_epoch
    if step < total_steps:
        segments.append((step, step // steps_per_epoch, total_steps))
    history = {}
    start = time.time()
    with distribute_lib.reporting_lost_workers(strategy):
        test = _fit_and_evaluate(model, config, datasets, test_ds, segments, steps_per_epoch,
                                 fit_callbacks, history)
    train_seconds = time.time() - start
    test_loss, test_accuracy = float(test["loss"]), float(test["accuracy"])
    best = _best_accuracy(model_dir / "training_log.csv", test_accuracy)
    peak_rss, peak_gpu = _peak_memory_mb()
    images_per_second = run_metrics.images / run_metrics.seconds if run_metrics.seconds else None
    final_config = {**config_dict, "finished": True, "test_accuracy": test_accuracy,
                    "test_loss": test_loss, "train_seconds": train_seconds}
    # model.keras beside the weights (fine-tuning, `python -m training.export --keras-file`).
    keras_file = model_dir / "model.keras"
    model.save(keras_file.with_name(".tmp-model.keras"))
    os.replace(keras_file.with_name(".tmp-model.keras"), keras_file)
    # Export before the run is marked finished: a failed export leaves a resumable run (rerun the
    # command: it evaluates and exports again) and no partial version (training.serving_layout).
    export_dir = export_version = None
    if config.export:
        exported = export_lib.export_saved_model(model, config.export_dir,
                                                 datasets.class_names, run_info=final_config,
                                                 max_image_pixels=config.max_image_pixels)
        export_dir, export_version = exported.path, exported.version
    summary = {
        "model": config.model, "data": datasets.source, "test_split": datasets.test_name,
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "best_test_accuracy": best, "top5_accuracy": test.get("top5_accuracy"),
        "train_seconds": train_seconds, "images_per_second": images_per_second,
        "peak_rss_mb": peak_rss, "peak_gpu_mb": peak_gpu or None,
        "export_dir": None if export_dir is None else str(export_dir),
        "export_version": export_version, "model_dir": str(model_dir),
        "keras_file": str(keras_file),
    }
    curves = plots.plot_training_curves(model_dir / "training_log.csv", model_dir / "curves.png",
                                        title=f"{config.model} on {datasets.source}")
    summary["curves"] = str(curves) if curves else None
    if chief:
        _print_summary(summary)
    else:  # the run's files, summary and export are the chief's
        print(f"Worker {worker_index} done: test accuracy {test_accuracy:.4f} (the same on every "
              f"worker); the run's files are the chief's, in {run_dir}", flush=True)
    _write_json(model_dir / "summary.json", summary)
    _write_json(model_dir / "config.json", final_config)
    backup.delete()
    return TrainResult(model=model, history=history, test_accuracy=test_accuracy,
                       test_loss=test_loss, export_dir=export_dir, config=final_config,
                       summary=summary)


def _optimizer_text(recipe):
    """`SGD lr 0.1 momentum 0.9` or `AdamW lr 0.001, weight decay 0.05, 5% warm-up, cosine`."""
    if recipe.optimizer == "adamw":
        text = f"AdamW lr {recipe.learning_rate:g}, weight decay {recipe.weight_decay:g}"
    else:
        text = f"SGD lr {recipe.learning_rate:g} momentum {recipe.momentum}"
    if recipe.schedule == "cosine":
        text += f", {100 * recipe.warmup:g}% warm-up, cosine decay"
    return text


def _fit_and_evaluate(model, config, datasets, test_ds, segments, steps_per_epoch, callbacks,
                      history):
    """Runs `model.fit` over `segments`, extends `history`; returns the final test metrics."""
    recipe = config.recipe
    progress = _RunProgbar(recipe.epochs)  # "Epoch e/total" also in a resumed run's fit calls
    for first, initial_epoch, end in segments:
        epochs = -(-end // steps_per_epoch)
        fit_history = model.fit(
            data_lib.train_dataset(datasets.train_split, recipe.batch_size, steps_per_epoch,
                                   seed=config.seed,
                                   augment=recipe.preprocessing if recipe.augment else "none",
                                   image_size=recipe.image_size, start_step=first, end_step=end),
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps_per_epoch=(end - first) // (epochs - initial_epoch),
            validation_data=test_ds,
            callbacks=[*callbacks, progress],
            shuffle=False,  # the order is train_dataset's (seeded, epoch-indexed)
            verbose=config.verbose,
        )
        for key, values in fit_history.history.items():
            history.setdefault(key, []).extend(values)

    # The last epoch's validation ran on the whole test split: it is the final evaluation.
    # Evaluate only when no epoch ended in this process (resumed after the last epoch).
    if "val_loss" in history:
        return {k[4:]: v[-1] for k, v in history.items() if k.startswith("val_")}
    print(f"Evaluating on the {datasets.num_test} {datasets.test_name} images", flush=True)
    return model.evaluate(test_ds, verbose=config.verbose, return_dict=True)


class _RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, numbering epochs out of the run's `total_epochs`.

    A run resumed in the middle of an epoch makes two `fit` calls (see `_train`); Keras would
    number the first one's epoch out of that call's `epochs` ("Epoch 2/2" of a 3-epoch run).
    """

    def __init__(self, total_epochs):
        super().__init__()
        self.total_epochs = total_epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


def _best_accuracy(csv_path, final):
    import csv

    try:
        with open(csv_path) as f:
            values = [float(r["val_accuracy"]) for r in csv.DictReader(f) if r.get("val_accuracy")]
    except OSError:
        values = []
    return max(values + [final])


def _print_summary(summary):
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    top5 = summary["top5_accuracy"]
    lines = [
        "",
        f"Summary: {summary['model']} on {summary['data']} ({summary['test_split']} split)",
        f"Test accuracy: {summary['test_accuracy']:.4f}",
        f"  best epoch {summary['best_test_accuracy']:.4f}"
        + (f"; top-5 {top5:.4f}" if top5 is not None else ""),
        f"Test loss: {summary['test_loss']:.4f}",
        f"Training time: {summary['train_seconds']:.0f} s in this process, "
        f"{fmt(summary['images_per_second'], '.1f')} images/s",
        f"Peak memory: {summary['peak_rss_mb']:.0f} MB resident"
        + (f", {summary['peak_gpu_mb']:.0f} MB GPU" if summary["peak_gpu_mb"] else ""),
        f"Run dir: {summary['model_dir']} (curves.png, training_log.csv, logs/)",
    ]
    if summary["export_version"] is None:
        lines.append(f"Export: skipped (--no-export); export later with python -m training.export "
                     f"--model-dir {summary['model_dir']}")
    else:
        lines += [f"Exported version {summary['export_version']} to {summary['export_dir']}",
                  export_lib.pin_hint(summary["model"], summary["export_version"])]
    print("\n".join(lines), flush=True)


def run(argv=None, callbacks=()):
    """Parses `argv`, trains, evaluates and exports.

    Calls `keras.backend.clear_session()` first (fresh layer names, so a backup restores into the
    same structure) and sets the global dtype policy for the duration of the run only.

    Args:
        argv: list of str or None (`sys.argv[1:]`).
        callbacks: extra `keras.callbacks.Callback`s appended to the run's own.

    Returns:
        `TrainResult`.

    Raises:
        ConfigError: bad options, or a run directory that cannot be used or resumed.
        training.data.DataError: the data cannot be loaded (bad `--data-dir`, unknown
            `--dataset`, offline without `--data-dir`, undecodable file with `--strict-data`).
        training.distribute.WorkerLostError: a worker of a multi-worker run stopped.
        SystemExit: from argparse for malformed options or `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    config = resolve_config(args)
    previous_policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    try:
        keras.config.set_dtype_policy(
            "float32" if config.mixed_precision == "none" else config.mixed_precision
        )
        return _train(config, list(callbacks))
    finally:
        _release_run_dir_locks()
        keras.config.set_dtype_policy(previous_policy)


def main(argv=None):
    """Command-line entry point. Returns 0 on success, 2 after a one-line error on bad input, 1
    after a one-line error when a worker of a multi-worker run is lost."""
    try:
        run(argv)
    except ConfigError as e:
        print(f"python -m training.train: error: {e}", file=sys.stderr)
        return 2
    except distribute_lib.WorkerLostError as e:
        print(f"python -m training.train: error: --distribution multi_worker: {e}; start every "
              "worker again with the same command: they resume from the last backup",
              file=sys.stderr)
        return 1
    except data_lib.DataError as e:
        # The data module names its own parameters (`data_dir=DIR`); say the flags instead.
        reason = e.reason.replace("with `strict=False`", "without --strict-data")
        reason = re.sub(r"`(\w+)=([^`]*)`", lambda m: f"`{_flag(m.group(1))} {m.group(2)}`",
                        reason)
        print(f"python -m training.train: error: {_flag(e.parameter)} {e.value}: {reason}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
