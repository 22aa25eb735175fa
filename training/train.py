"""Train a RevNet (or a baseline) with `model.fit`, evaluate it, and export it for TF Serving.

Run from the repository root (`training` is not an installed package):

    # The paper's CIFAR-10 recipe on RevNet-38 (TFDS downloads CIFAR-10 on first use):
    python -m training.train --model revnet38 --dataset cifar10

    # Offline, from an image folder DIR/train/<class>/*, DIR/test/<class>/*:
    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python -m training.train --data-dir /tmp/cifar10 --recipe quick

    # A short CPU run in bfloat16 with overrides of the paper's recipe:
    python -m training.train --data-dir /tmp/cifar10 --epochs 10 --batch-size 128 \\
        --mixed-precision mixed_bfloat16 --model-dir runs/revnet38-bf16

    # A killed run resumes from its last finished epoch: rerun the same command (same --model-dir).

Each run writes to `--model-dir` (default `runs/<model>`): `config.json` (the resolved options),
`backup/` (`keras.callbacks.BackupAndRestore`, removed when training finishes), `model.weights.h5`
(weights after the last finished epoch, replaced atomically), `training_log.csv` and, if
TensorBoard is installed, its logs in `logs/`. It then evaluates on the test split, prints
`Test accuracy: <value>`, saves `model.keras` (reload it with `keras.saving.load_model` after
`import tf_revnet` to fine-tune), and exports a new version of the TF Serving model base path
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
import importlib.util
import json
import os
import pathlib
import re
import sys
import time

import keras
import tensorflow as tf

from training import data as data_lib
from training import export as export_lib
from training import recipes, serving_layout

__all__ = ["main", "run", "build_parser", "build_classifier", "AtomicWeightsCheckpoint",
           "TrainResult", "ConfigError"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIXED_PRECISION_POLICIES = ("none", "mixed_bfloat16", "mixed_float16")
NORMALIZATION_ADAPT_EXAMPLES = 10_000


class ConfigError(ValueError):
    """Bad command-line options; the message is one line naming the option."""


@dataclasses.dataclass
class TrainResult:
    """What `run` returns.

    Attributes:
        model: the trained `keras.Model` (raw float32 pixels in, class probabilities out).
        history: `keras.callbacks.History` of this `fit` call (resumed runs start at the restored
            epoch).
        test_accuracy: float. Accuracy on the (capped) test split after training.
        test_loss: float. Loss on the same examples (including the weight-decay penalty).
        export_dir: `pathlib.Path` of the exported version `<export-dir>/<n>/`, or None with
            `--no-export`.
        config: dict. The resolved configuration (also in `<model-dir>/config.json`).
    """

    model: keras.Model
    history: keras.callbacks.History
    test_accuracy: float
    test_loss: float
    export_dir: pathlib.Path | None
    config: dict


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


def _list_models():
    import tf_revnet.models

    return list(tf_revnet.models.list_models())


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
                        help="model name from tf_revnet.models.list_models(). Default: revnet38")
    parser.add_argument("--dataset", default="cifar10",
                        help="TFDS dataset name (ignored with --data-dir). Default: cifar10")
    parser.add_argument("--data-dir", default=None,
                        help="image-folder root DIR with DIR/train/<class>/* and "
                             "DIR/test/<class>/*, used instead of TFDS")
    parser.add_argument("--tfds-data-dir", default=None,
                        help="where TFDS stores datasets. Default: TFDS' default")
    parser.add_argument("--image-size", type=int, default=32,
                        help="side of the square images read from --data-dir. Default: 32")
    parser.add_argument("--recipe", default="cifar", choices=recipes.list_recipes(),
                        help=f"named preset ({recipe_help}). Default: cifar")
    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--learning-rate", type=float, help="initial learning rate")
    group.add_argument("--momentum", type=float)
    group.add_argument("--weight-decay", type=float,
                       help="L2 coefficient on convolution and dense kernels")
    group.add_argument("--steps-per-epoch", type=int,
                       help="cap on the training steps of each epoch")
    group.add_argument("--train-examples", type=int,
                       help="use only this many training examples")
    group.add_argument("--test-examples", type=int,
                       help="use only this many test examples (validation and final evaluation)")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="pad-4 random-crop and horizontal-flip augmentation")
    parser.add_argument("--model-dir", default=None,
                        help="checkpoints, logs and config.json. Default: runs/<model>")
    parser.add_argument("--export-dir", default=None,
                        help="model base path that TF Serving watches: the export becomes its next "
                             "version <export-dir>/<n>/. Default: saved_models/<model>")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="skip the export (export later with python -m training.export)")
    parser.add_argument("--mixed-precision", default="none", choices=MIXED_PRECISION_POLICIES,
                        help="Keras dtype policy. Default: none (float32)")
    parser.add_argument("--no-custom-gradient", dest="use_custom_gradient", action="store_false",
                        help="plain autodiff instead of reversible backprop (for comparison)")
    parser.add_argument("--seed", type=int, default=0, help="random seed. Default: 0")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="Keras fit verbosity (1 = progress bar). Default: 1")
    return parser


def resolve_config(args):
    """Merges the recipe with the command-line overrides and fills in default paths.

    Args:
        args: `argparse.Namespace` from `build_parser()`.

    Returns:
        dict. JSON-serializable configuration.

    Raises:
        ConfigError: for unknown models or out-of-range values.
    """
    models = _list_models()
    if args.model not in models:
        raise ConfigError(f"--model {args.model}: unknown model; choose from {', '.join(models)}")
    try:
        recipe = recipes.get(args.recipe).replace(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            steps_per_epoch=args.steps_per_epoch,
            train_examples=args.train_examples,
            test_examples=args.test_examples,
            augment=args.augment,
        )
    except ValueError as e:
        # Name the command-line option rather than the recipe field: `batch_size` -> --batch-size.
        message = re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise ConfigError(message) from None
    if args.image_size < 1:
        raise ConfigError(f"--image-size must be >= 1. Received: {args.image_size}")
    model_dir = pathlib.Path(args.model_dir or REPO_ROOT / "runs" / args.model)
    export_dir = pathlib.Path(args.export_dir or REPO_ROOT / "saved_models" / args.model)
    try:
        serving_layout.check_base_path(export_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {
        "model": args.model,
        "dataset": None if args.data_dir else args.dataset,
        "data_dir": str(pathlib.Path(args.data_dir).expanduser().resolve()) if args.data_dir
        else None,
        "tfds_data_dir": args.tfds_data_dir,
        "image_size": args.image_size,
        "recipe": recipe.to_dict(),
        "model_dir": str(model_dir.resolve()),
        "export_dir": str(export_dir.resolve()),
        "export": args.export,
        "mixed_precision": args.mixed_precision,
        "use_custom_gradient": args.use_custom_gradient,
        "seed": args.seed,
        "command": " ".join(["python -m training.train"] + list(args.argv)),
    }


def build_classifier(model_name, image_shape, num_classes, normalizer,
                     use_custom_gradient=True):
    """Wraps a zoo model so that it takes raw pixels: `Input -> normalizer -> backbone`.

    Args:
        model_name: str. Name from `tf_revnet.models.list_models()`.
        image_shape: tuple `(H, W, C)`.
        num_classes: int.
        normalizer: an adapted `keras.layers.Normalization` (kept in float32).
        use_custom_gradient: bool. Reversible backprop (True) or plain autodiff.

    Returns:
        A functional `keras.Model`: float32 `(batch, H, W, C)` pixels in [0, 255] ->
        float32 `(batch, num_classes)` softmax probabilities.
    """
    import tf_revnet.models

    backbone = tf_revnet.models.get(model_name)(
        input_shape=tuple(image_shape),
        classes=num_classes,
        classifier_activation="softmax",
        use_custom_gradient=use_custom_gradient,
    )
    pixels = keras.Input(shape=tuple(image_shape), dtype="float32", name="pixels")
    outputs = backbone(normalizer(pixels))
    if outputs.dtype != "float32":
        outputs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(outputs)
    return keras.Model(pixels, outputs, name=f"{model_name}_classifier")


def _adapted_normalizer(datasets, batch_size):
    """Per-channel mean/variance of (up to 10,000) training images, as a Normalization layer."""
    normalizer = keras.layers.Normalization(axis=-1, dtype="float32", name="normalization")
    n = min(datasets.num_train, NORMALIZATION_ADAPT_EXAMPLES)
    sample = datasets.train.take(n).batch(max(batch_size, 256)).map(
        lambda x, y: tf.cast(x, tf.float32)
    )
    normalizer.adapt(sample)
    return normalizer


def _write_json(path, obj):
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Options that must match for a backup in --model-dir to be restorable into the new model.
RESUME_KEYS = ("model", "image_shape", "class_names", "use_custom_gradient")


def _check_resumable(model_dir, config):
    """Raises `ConfigError` if `model_dir` holds an unfinished run of a different model."""
    backup = model_dir / "backup" / "training_metadata.json"
    previous = model_dir / "config.json"
    if not (backup.exists() and previous.exists()):
        return
    old = json.loads(previous.read_text())
    changed = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
    if changed:
        raise ConfigError(
            f"--model-dir {model_dir}: holds an unfinished run with different {', '.join(changed)}; "
            f"rerun it with its own options ({old.get('command')}), or pick another --model-dir, or "
            f"delete {backup.parent}"
        )


def _train(config, callbacks):
    recipe = recipes.Recipe(**{**config["recipe"],
                               "decay_boundaries": tuple(config["recipe"]["decay_boundaries"])})
    model_dir = pathlib.Path(config["model_dir"])
    keras.utils.set_random_seed(config["seed"])

    datasets = data_lib.load(
        dataset=config["dataset"],
        data_dir=config["data_dir"],
        tfds_data_dir=config["tfds_data_dir"],
        image_size=config["image_size"],
        train_examples=recipe.train_examples,
        test_examples=recipe.test_examples,
        seed=config["seed"],
    )
    if datasets.num_train < recipe.batch_size:
        raise ConfigError(
            f"--batch-size {recipe.batch_size}: larger than the {datasets.num_train} training "
            "examples; lower it or use more examples"
        )
    steps_per_epoch = data_lib.num_steps(datasets.num_train, recipe.batch_size)
    if recipe.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, recipe.steps_per_epoch)
    total_steps = steps_per_epoch * recipe.epochs
    config = {**config, "data_source": datasets.source, "num_train": datasets.num_train,
              "num_test": datasets.num_test, "image_shape": list(datasets.image_shape),
              "class_names": datasets.class_names, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps}
    _check_resumable(model_dir, config)
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / "config.json", config)

    train_ds = data_lib.train_pipeline(datasets.train, recipe.batch_size, datasets.num_train,
                                       datasets.image_shape, augment=recipe.augment,
                                       seed=config["seed"])
    test_ds = data_lib.eval_pipeline(datasets.test, recipe.batch_size, datasets.num_test,
                                     datasets.image_shape)

    normalizer = _adapted_normalizer(datasets, recipe.batch_size)
    model = build_classifier(config["model"], datasets.image_shape, datasets.num_classes,
                             normalizer, use_custom_gradient=config["use_custom_gradient"])
    decayed = recipes.apply_weight_decay(model, recipe.weight_decay)
    model.compile(
        optimizer=recipes.make_optimizer(recipe, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile="auto",
    )
    print(
        f"Model {config['model']}: {model.count_params():,} parameters "
        f"({len(decayed)} kernels with weight decay {recipe.weight_decay}); "
        f"dtype policy {keras.config.dtype_policy().name}\n"
        f"Data {datasets.source}: {datasets.num_train} train / {datasets.num_test} test images "
        f"{tuple(datasets.image_shape)}, {datasets.num_classes} classes\n"
        f"Recipe {recipe.name}: {recipe.epochs} epochs x {steps_per_epoch} steps of batch "
        f"{recipe.batch_size} = {total_steps} steps; SGD lr {recipe.learning_rate} momentum "
        f"{recipe.momentum}\nModel dir {model_dir}",
        flush=True,
    )

    backup_dir = model_dir / "backup"
    if (backup_dir / "training_metadata.json").exists():
        print(f"Resuming from the backup in {backup_dir}", flush=True)
    fit_callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
        AtomicWeightsCheckpoint(model_dir / "model.weights.h5"),
        keras.callbacks.CSVLogger(str(model_dir / "training_log.csv"), append=True),
        *callbacks,
    ]
    if importlib.util.find_spec("tensorboard") is not None:  # optional: TF does not require it
        fit_callbacks.insert(3, keras.callbacks.TensorBoard(str(model_dir / "logs"),
                                                            write_graph=False))
    start = time.time()
    history = model.fit(
        train_ds,
        epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds,
        callbacks=fit_callbacks,
        shuffle=False,  # train_ds is already shuffled; Keras cannot shuffle a tf.data.Dataset
        verbose=config["verbose"],
    )
    train_seconds = time.time() - start

    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(f"Training time: {train_seconds:.0f} s")
    print(f"Test loss: {test_loss:.4f}")
    print(f"Test accuracy: {test_accuracy:.4f}", flush=True)
    config = {**config, "test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
              "train_seconds": train_seconds}
    _write_json(model_dir / "config.json", config)
    keras_file = model_dir / "model.keras"
    model.save(keras_file.with_name(".tmp-model.keras"))
    os.replace(keras_file.with_name(".tmp-model.keras"), keras_file)
    export_dir = None
    if config["export"]:
        exported = export_lib.export_saved_model(model, config["export_dir"],
                                                 config["class_names"], run_info=config)
        export_dir = exported.path
        print(f"Exported version {exported.version} to {export_dir}\n"
              f"{export_lib.pin_hint(config['model'], exported.version)}", flush=True)
    return TrainResult(model=model, history=history, test_accuracy=float(test_accuracy),
                       test_loss=float(test_loss), export_dir=export_dir, config=config)


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
        ConfigError: bad options.
        training.data.DataError: the data cannot be loaded (bad `--data-dir`, unknown
            `--dataset`, offline without `--data-dir`).
        SystemExit: from argparse for malformed options or `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    config = resolve_config(args)
    config["verbose"] = args.verbose
    previous_policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    try:
        keras.config.set_dtype_policy(
            "float32" if config["mixed_precision"] == "none" else config["mixed_precision"]
        )
        return _train(config, list(callbacks))
    finally:
        keras.config.set_dtype_policy(previous_policy)


def main(argv=None):
    """Command-line entry point. Returns 0 on success, 2 after a one-line error on bad input."""
    try:
        run(argv)
    except (ConfigError, data_lib.DataError) as e:
        print(f"python -m training.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
