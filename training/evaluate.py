"""Evaluate a trained classifier: top-1 (and top-5), per-class accuracy, confusion-matrix PNG.

    python -m training.evaluate runs/revnet38/20261130-120000          # a run directory
    python -m training.evaluate model.keras --data-dir /tmp/cifar10    # a .keras file
    python -m training.evaluate saved_models/revnet38/1 --data-dir /tmp/cifar10   # a SavedModel

PATH is a run directory of `python -m training.train` (its `model.weights.h5` and `config.json`,
which also give the data set), a `.keras` file, or a SavedModel version directory (its
`serving_default` signature: one image input, float32 pixels in [0, 255] or uint8, and an output
named `probabilities` or the only output; a version written by `training.export` takes uint8
`images` and returns `probabilities`). The data are the test split of `--data-dir` (an image
folder) or `--dataset` (TFDS), by default the run's own (for an exported version, the run's named
in its `assets.extra/export.json`), with the run's test subset (its `--test-examples`, same seed)
unless `--test-examples N` (or `all`) says otherwise. It prints top-1 accuracy, top-5 accuracy
when there are more than 10 classes, and each class' accuracy, and writes `confusion_matrix.png`
(into the run directory, or `--output-dir`, default the current directory).

`main(argv)` returns the exit code (2 after a one-line error); `evaluate(...)` returns the numbers.
`--help` answers without importing TensorFlow (it is imported when needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from training.errors import RunDirError, StageError

__all__ = ["main", "evaluate", "load_predictor", "Evaluation", "EvaluateError"]


class EvaluateError(StageError):
    """PATH or the data cannot be used (parameter `path`: PATH on the command line)."""


def _error(path, reason):
    return EvaluateError("path", path, reason)


@dataclasses.dataclass
class Evaluation:
    """Results of `evaluate`.

    Attributes:
        top1: float. Top-1 accuracy.
        top5: float or None. Top-5 accuracy (more than 10 classes).
        per_class: dict class name -> accuracy (recall) of that class.
        confusion: int array `(K, K)`: rows true class, columns predicted class.
        num_examples: int.
        confusion_png: `pathlib.Path` or None.
    """

    top1: float
    top5: float | None
    per_class: dict
    confusion: object  # numpy int64 array
    num_examples: int
    confusion_png: pathlib.Path | None = None


@dataclasses.dataclass
class _Predictor:
    predict: callable  # float32 (N, H, W, 3) pixels in [0, 255] -> (N, K) probabilities
    image_size: int | None
    run_config: dict | None


def _run_dir_model(path):
    """The run's classifier rebuilt from its weights (float32), as `python -m training.export`."""
    from training import classifier

    try:
        return classifier.load_run(path)
    except RunDirError as e:
        raise EvaluateError("path", path, e.parts) from None


def load_predictor(path):
    """Loads PATH (run directory, `.keras` file or SavedModel directory) as a predict function.

    Args:
        path: str or path-like.

    Returns:
        `(predict, image_size, run_config)`: `predict` maps float32 `(N, H, W, 3)` pixels in
        [0, 255] to `(N, K)` probabilities; `image_size` is the model's input side or None;
        `run_config` the run's config.json (run directories; for a version exported by
        `training.export`, the `run_config` of its `assets.extra/export.json`) or None.

    Raises:
        EvaluateError: PATH is none of these or cannot be loaded.
    """
    import keras
    import tensorflow as tf

    from training.export import EXPORT_INFO_FILE

    path = pathlib.Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        model, config = _run_dir_model(path)
        return _Predictor(lambda x: model(x, training=False), model.input_shape[1], config)
    if path.is_file() and path.suffix == ".keras":
        import tf_revnet  # noqa: F401  (registers the layers)

        try:
            model = keras.saving.load_model(str(path))
        except Exception as e:
            raise _error(path, f"cannot load ({str(e).splitlines()[0][:160]})") \
                from None
        return _Predictor(lambda x: model(x, training=False), model.input_shape[1], None)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        loaded = tf.saved_model.load(str(path))
        if "serving_default" not in loaded.signatures:
            raise _error(path, "SavedModel without a serving_default signature")
        serve = loaded.signatures["serving_default"]
        inputs = serve.structured_input_signature[1]
        if len(inputs) != 1:
            raise _error(path, f"serving_default takes {sorted(inputs)}; expected "
                                "one image input")
        (name, spec), = inputs.items()
        outputs = serve.structured_outputs
        key = "probabilities" if "probabilities" in outputs else (
            next(iter(outputs)) if len(outputs) == 1 else None)
        if key is None:
            raise _error(path, f"serving_default returns {sorted(outputs)}; "
                                "expected `probabilities` or a single output")

        def predict(x):
            if spec.dtype == tf.uint8:
                x = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
            return serve(**{name: tf.cast(x, spec.dtype)})[key]

        size = spec.shape[1] if spec.shape.rank == 4 else None
        # A version written by training.export says which run it came from (data, recipe).
        info_path = path / EXPORT_INFO_FILE
        run_config = json.loads(info_path.read_text()).get("run_config") if info_path.is_file() \
            else None
        return _Predictor(predict, size, run_config or None)
    raise _error(path, "not a run directory (config.json), a .keras file or a "
                        "SavedModel directory (saved_model.pb)")


def evaluate(path, data_dir=None, dataset=None, tfds_data_dir=None, batch_size=100,
             preprocessing=None, image_size=None, test_examples=None, output_dir=None,
             verbose=1):
    """Evaluates PATH on the test split of an image folder or TFDS data set.

    Args:
        path: run directory, `.keras` file or SavedModel directory (see `load_predictor`).
        data_dir: str or None. Image folder; defaults to the run's.
        dataset: str or None. TFDS name; defaults to the run's (or cifar10).
        tfds_data_dir: str or None.
        batch_size: int.
        preprocessing: `"cifar"` or `"imagenet"` (resize and centre crop); defaults to the run's
            recipe or `"cifar"`.
        image_size: int or None. Model input side when PATH does not fix it.
        test_examples: int, `"all"` or None. Evaluate a seeded subset of this many test images
            (`"all"`: the whole test split). Defaults to None: the run's own subset (its
            `--test-examples`, drawn with its seed) when the data are the run's (neither
            `data_dir` nor `dataset` given), else the whole test split.
        output_dir: path-like or None. Where `confusion_matrix.png` goes (default: the run
            directory, else the current directory).
        verbose: int. 1 shows a progress bar.

    Returns:
        `Evaluation`.

    Raises:
        EvaluateError: bad PATH, or class counts of model and data differ.
        training.errors.DataError: the data cannot be loaded.
    """
    import keras
    import numpy as np

    from training import data as data_lib
    from training import plots

    predictor = load_predictor(path)
    run = predictor.run_config or {}
    recipe = run.get("recipe", {})
    if data_dir is None and dataset is None:  # the run's own data, and its test subset
        data_dir, dataset = run.get("data_dir"), run.get("dataset") or "cifar10"
        if test_examples is None:
            test_examples = recipe.get("test_examples")
    if test_examples == "all":
        test_examples = None
    preprocessing = preprocessing or recipe.get("preprocessing", "cifar")
    image_size = predictor.image_size or image_size or recipe.get("image_size", 32)
    datasets = data_lib.load(dataset=dataset, data_dir=data_dir, tfds_data_dir=tfds_data_dir,
                             image_size=image_size, in_memory=preprocessing == "cifar",
                             test_examples=test_examples, seed=run.get("seed", 0),
                             validation_split=run.get("validation_split") if data_dir else None,
                             train_examples=1)
    test = data_lib.eval_dataset(datasets.test_split, batch_size, augment=preprocessing,
                                 image_size=image_size)
    k = datasets.num_classes
    steps = -(-datasets.num_test // batch_size)
    bar = keras.utils.Progbar(steps, verbose=verbose, unit_name="batch")
    labels, top1, top5 = [], [], []
    for i, (images, y) in enumerate(test):
        probabilities = np.asarray(predictor.predict(images))
        if probabilities.shape[-1] != k:
            raise _error(path, f"the model has {probabilities.shape[-1]} classes, "
                                f"the data {k} ({datasets.source})")
        order = np.argsort(-probabilities, axis=-1)
        labels.append(y.numpy())
        top1.append(order[:, 0])
        top5.append((order[:, :5] == y.numpy()[:, None]).any(axis=-1))
        bar.update(i + 1)
    labels, top1, top5 = np.concatenate(labels), np.concatenate(top1), np.concatenate(top5)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, top1), 1)
    per_class = {name: float(confusion[c, c] / max(confusion[c].sum(), 1))
                 for c, name in enumerate(datasets.class_names)}
    if output_dir is None:
        # Into a run directory, never into an exported version (TF Serving watches those).
        run_dir = pathlib.Path(path).is_dir() and (pathlib.Path(path) / "config.json").is_file()
        output_dir = path if run_dir else pathlib.Path.cwd()
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png = plots.plot_confusion_matrix(confusion, datasets.class_names,
                                      output_dir / "confusion_matrix.png",
                                      title=f"{pathlib.Path(path).name} on {datasets.source}")
    return Evaluation(top1=float((top1 == labels).mean()), top5=float(top5.mean()) if k > 10
                      else None, per_class=per_class, confusion=confusion,
                      num_examples=len(labels), confusion_png=png)


def _test_examples(value):
    """`--test-examples`: a positive int or `all`."""
    if value == "all":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or all, got {value!r}")
    return number


def build_parser():
    """The command-line interface of `python -m training.evaluate`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Top-1/top-5 and per-class accuracy and a confusion matrix of a trained model.",
        epilog="Example: python -m training.evaluate saved_models/revnet38/1 --data-dir "
               "/tmp/cifar10",
    )
    parser.add_argument("path", help="run directory, .keras file or SavedModel directory")
    parser.add_argument("--data-dir", help="image folder (DIR/test/<class>/*); default: the run's")
    parser.add_argument("--dataset", help="TFDS data set; default: the run's, or cifar10")
    parser.add_argument("--tfds-data-dir")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--preprocessing", choices=("cifar", "imagenet"),
                        help="imagenet: resize and centre crop; default: the run's recipe, or cifar")
    parser.add_argument("--image-size", type=int, help="input side if PATH does not fix it")
    parser.add_argument("--test-examples", type=_test_examples, metavar="N|all",
                        help="evaluate a seeded subset of N test images, or all of them; default: "
                             "the run's own subset when evaluating on the run's data, else all")
    parser.add_argument("--output-dir", help="where confusion_matrix.png goes")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1))
    return parser


def main(argv=None):
    """Command-line entry point. Returns 0, or 2 after a one-line error."""
    from training import command_line, startup

    args = build_parser().parse_args(argv)  # --help and bad options before TensorFlow
    startup.import_tensorflow_quietly()
    try:
        result = evaluate(args.path, data_dir=args.data_dir, dataset=args.dataset,
                          tfds_data_dir=args.tfds_data_dir, batch_size=args.batch_size,
                          preprocessing=args.preprocessing, image_size=args.image_size,
                          test_examples=args.test_examples, output_dir=args.output_dir,
                          verbose=args.verbose)
    except StageError as e:
        print(f"python -m training.evaluate: error: {command_line.error_line(e)}",
              file=sys.stderr)
        return 2
    print(f"Top-1 accuracy: {result.top1:.4f} ({result.num_examples} images)")
    if result.top5 is not None:
        print(f"Top-5 accuracy: {result.top5:.4f}")
    width = max(len(name) for name in result.per_class)
    print("Per-class accuracy:")
    for name, accuracy in result.per_class.items():
        print(f"  {name:<{width}}  {accuracy:.4f}")
    print(f"Confusion matrix: {result.confusion_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
