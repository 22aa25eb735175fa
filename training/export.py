"""Export a trained classifier for TF Serving, any TensorFlow runtime and TensorFlow Lite.

`python -m training.export` (run from the repository root) exports a finished or interrupted run of
`python -m training.train` (its `--model-dir`: `config.json` and `model.weights.h5`) or a `.keras`
file, as a new version of a TF Serving model base path:

    python -m training.export --model-dir runs/revnet38/20261130-120000   # -> saved_models/revnet38/<n>/
    python -m training.export --keras-file runs/revnet38/20261130-120000/model.keras \
        --export-dir /models/revnet38
    python -m training.export --model-dir runs/revnet38/20261130-120000 --format tflite

Each export is a new integer version `<export-dir>/<n>/`, reserved atomically and renamed into place
when complete (`training.serving_layout`): concurrent exports get distinct versions, an existing
version is never overwritten, and a failed export leaves nothing behind. A version holds

- the SavedModel with the signatures of `training.serving_signatures` (`serving_default`: uint8
  images; `serving_float`: float32 images in [0, 255]; `serving_bytes`: encoded JPEG/PNG/GIF/BMP
  files, refused before decoding above `--max-image-pixels`, 100 million pixels by default, see
  `training.image_safety`), each returning `probabilities`, `class_ids` and `class_names` (the
  label names are in the graph);
- `assets.extra/class_names.txt` (one name per line, index = class id) and
  `assets.extra/export.json`: the version, the source, the run's configuration, its test
  accuracy (null for a run that did not finish) and the `max_image_pixels` of `serving_bytes`,
  so that every served version says what it is;
- with `--format tflite`: `model.tflite`, the TensorFlow Lite conversion of `serving_default` and
  `serving_float` (TFLite built-in ops only; `--tflite-select-tf-ops` adds `serving_bytes`, whose
  `DecodeImage` and `ResizeBilinear` need the TF Select (Flex) ops).

TF Serving serves the highest version: a smoke run exported last becomes the served model. Pin a
version with `model_version_policy` (see `pin_hint`).

`main(argv)` returns the exit code: 0, or 2 after a one-line error (missing or corrupt checkpoint,
bad option). `--help` answers without importing TensorFlow (it is imported when needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

from training import serving_layout
from training.errors import StageError

__all__ = ["ExportResult", "export_saved_model", "convert_to_tflite", "pin_hint", "build_parser",
           "run", "main", "CLASS_NAMES_FILE", "EXPORT_INFO_FILE", "TFLITE_FILE"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRA_DIR = "assets.extra"
CLASS_NAMES_FILE = f"{EXTRA_DIR}/class_names.txt"
EXPORT_INFO_FILE = f"{EXTRA_DIR}/export.json"
TFLITE_FILE = "model.tflite"
FORMATS = ("saved_model", "tflite")
# training.serving_signatures.TOP_K, TOP_K_MIN_CLASSES and training.image_safety's
# DEFAULT_MAX_IMAGE_PIXELS, for --help without TensorFlow (a test checks that they are equal).
TOP_K, TOP_K_MIN_CLASSES, DEFAULT_MAX_IMAGE_PIXELS = 5, 10, 100_000_000


@dataclasses.dataclass
class ExportResult:
    """What `export_saved_model` returns.

    Attributes:
        version: int. The new version number.
        path: `pathlib.Path` of `<base_path>/<version>/`.
        tflite_path: `pathlib.Path` of `model.tflite` inside it, or None.
    """

    version: int
    path: pathlib.Path
    tflite_path: pathlib.Path | None = None


def pin_hint(model_name, version):
    """One line telling how to make TF Serving serve exactly `version` of `model_name`.

    The `base_path` shown is where the README's `docker run` mounts the model base path.
    """
    return (f"TF Serving serves the highest version; to serve only this one, give it a "
            f"--model_config_file with config {{ name: \"{model_name}\" base_path: "
            f"\"/models/{model_name}\" "
            f"model_platform: \"tensorflow\" model_version_policy {{ specific {{ versions: "
            f"{version} }} }} }}")


def _write_extras(directory, class_names, info):
    extra = directory / EXTRA_DIR
    extra.mkdir()
    (directory / CLASS_NAMES_FILE).write_text("".join(f"{name}\n" for name in class_names))
    (directory / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def export_saved_model(model, base_path, class_names, run_info=None, model_name=None,
                       tflite=False, tflite_select_tf_ops=False, top_k=TOP_K,
                       max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, verbose=False):
    """Writes `model` as a new version of the TF Serving model base path `base_path`.

    Args:
        model: built `keras.Model`, float32 `(N, H, W, 3)` raw pixels in [0, 255] -> float32
            `(N, classes)` probabilities (as `training.classifier.build_classifier` makes it).
        base_path: str or path-like. Model base path (created if missing), e.g.
            `saved_models/revnet38`.
        class_names: sequence of str, one per class (index = class id).
        run_info: dict or None. The training run's configuration; its `test_accuracy` (if any) is
            copied to the top level of `assets.extra/export.json`.
        model_name: str or None. Name shown in `export.json` (default: `run_info["model"]` or the
            Keras model's name).
        tflite: bool. Also write `model.tflite` (see `convert_to_tflite`).
        tflite_select_tf_ops: bool. Include `serving_bytes` in the TFLite model (Flex ops).
        top_k: int. Size of the `top_k_*` outputs (models with more than 10 classes).
        max_image_pixels: int. `serving_bytes` refuses files whose header announces more pixels
            (all frames of a GIF together) before decoding them; recorded in `export.json`.
            Defaults to `image_safety.DEFAULT_MAX_IMAGE_PIXELS` (100 million).
        verbose: bool. Print Keras' list of endpoints.

    Returns:
        `ExportResult`.

    Raises:
        ValueError: bad `base_path`, image input, `class_names` or `max_image_pixels`.
    """
    import keras
    import tensorflow as tf

    from training import serving_signatures

    run_info = dict(run_info or {})
    archive = serving_signatures.build_archive(model, class_names, top_k=top_k,
                                               max_image_pixels=max_image_pixels)
    height, width = serving_signatures.image_size_of(model)
    tflite_path = []

    def write(directory, version):
        archive.write_out(str(directory), verbose=verbose)
        info = {
            "model": model_name or run_info.get("model") or model.name,
            "version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "image_size": [height, width],
            "class_names": list(class_names),
            "signatures": list(serving_signatures.SIGNATURES),
            "max_image_pixels": max_image_pixels,
            "test_accuracy": run_info.get("test_accuracy"),
            "run_config": run_info,
        }
        _write_extras(directory, class_names, info)
        if tflite:
            tflite_path.append(convert_to_tflite(directory, directory / TFLITE_FILE,
                                                 select_tf_ops=tflite_select_tf_ops))

    version, path = serving_layout.write_new_version(base_path, write)
    return ExportResult(version=version, path=path,
                        tflite_path=path / TFLITE_FILE if tflite_path else None)


def convert_to_tflite(saved_model_dir, output_path, select_tf_ops=False):
    """Converts the serving signatures of an exported SavedModel to TensorFlow Lite.

    Args:
        saved_model_dir: str or path-like. A version directory written by `export_saved_model`.
        output_path: str or path-like of the `.tflite` file to write.
        select_tf_ops: bool. If False (default) convert `serving_default` and `serving_float`
            with TFLite built-in ops only. If True also convert `serving_bytes`, whose
            `DecodeImage` and `ResizeBilinear` are not built-in TFLite ops: the file then needs a
            runtime with the TF Select (Flex) delegate linked in. The `tf.lite.Interpreter` of the
            `tensorflow` 2.21 pip package does not have it: it runs `serving_default` and
            `serving_float` of such a file but fails on `serving_bytes`.

    Returns:
        `pathlib.Path` of the written file. Run it with `tf.lite.Interpreter` (or
        `ai_edge_litert.interpreter.Interpreter`) and `get_signature_runner("serving_default")`.
    """
    import tensorflow as tf

    from training import serving_signatures

    keys = [serving_signatures.DEFAULT_SIGNATURE, serving_signatures.FLOAT_SIGNATURE]
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=keys + ([serving_signatures.BYTES_SIGNATURE]
                                                     if select_tf_ops else []))
    if select_tf_ops:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
    output_path = pathlib.Path(output_path)
    output_path.write_bytes(converter.convert())
    return output_path


def _class_names_option(value, num_classes):
    path = pathlib.Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in value.split(",")]
    if len(names) != num_classes:
        raise StageError("class_names", value, f"the model has {num_classes} classes, got "
                         f"{len(names)} names; give a file with one name per line or a "
                         "comma-separated list")
    return names


def build_parser():
    """The command-line interface of `python -m training.export`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a trained classifier as a new version of a TF Serving model base path "
        "(SavedModel with serving_default, serving_float and serving_bytes signatures; optionally "
        "TensorFlow Lite). Every version is new: existing versions are never overwritten.",
        epilog="Examples: python -m training.export --model-dir runs/revnet38/<date-time> | "
        "python -m training.export --keras-file runs/revnet38/<date-time>/model.keras "
        "--format tflite",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir",
                        help="the --model-dir of a finished or interrupted python -m training.train "
                             "run (its config.json and model.weights.h5)")
    source.add_argument("--keras-file",
                        help="a .keras file (python -m training.train writes <model-dir>/model.keras"
                             "); class names come from the config.json beside it or --class-names")
    parser.add_argument("--export-dir", default=None,
                        help="model base path that TF Serving watches; the export becomes its next "
                             "version <export-dir>/<n>/. Default: saved_models/<model>")
    parser.add_argument("--format", default="saved_model", choices=FORMATS,
                        help="saved_model, or tflite: the SavedModel plus <n>/model.tflite "
                             "converted from it. Default: saved_model")
    parser.add_argument("--tflite-select-tf-ops", action="store_true",
                        help="with --format tflite: also convert serving_bytes (JPEG/PNG decoding "
                             "needs the TF Select/Flex ops in the TFLite runtime)")
    parser.add_argument("--class-names", default=None,
                        help="label names, one per class: a file with one name per line or a "
                             "comma-separated list. Default: class_names of the run's config.json")
    parser.add_argument("--top-k", type=int, default=TOP_K,
                        help="size of the top_k_* outputs, added for models with more than "
                             f"{TOP_K_MIN_CLASSES} classes. Default: {TOP_K}")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="PIXELS",
                        help="serving_bytes refuses encoded images whose header announces more "
                             "pixels (all frames of a GIF together), before decoding them; "
                             "recorded in export.json. Default: the run's --max-image-pixels, or "
                             f"{DEFAULT_MAX_IMAGE_PIXELS}")
    return parser


def _check_options(args):
    if args.tflite_select_tf_ops and args.format != "tflite":
        raise StageError("tflite_select_tf_ops", True, "only with --format tflite")
    if args.top_k < 1:
        raise StageError("top_k", args.top_k, "must be >= 1")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise StageError("max_image_pixels", args.max_image_pixels, "must be >= 1")
    if args.max_image_pixels is not None and args.max_image_pixels > 2**63 - 1:  # int64 tensor
        raise StageError("max_image_pixels", args.max_image_pixels,
                         f"must be at most {2**63 - 1}")


def _load(args):
    """(model, config, source, class names) of the model the options name."""
    from training import classifier  # imports TensorFlow

    if args.model_dir is not None:
        model, config = classifier.load_run(args.model_dir)
        source = f"model_dir:{pathlib.Path(args.model_dir).resolve()}"
    else:
        model, config = classifier.load_keras_file(args.keras_file)
        source = f"keras_file:{pathlib.Path(args.keras_file).resolve()}"
    num_classes = model.outputs[0].shape[-1]
    if args.class_names is not None:
        class_names = _class_names_option(args.class_names, num_classes)
    elif config.get("class_names"):
        class_names = list(config["class_names"])
    else:
        raise StageError("keras_file", args.keras_file, "no config.json beside it to read the "
                         "class names from; pass --class-names")
    return model, config, source, class_names


def _compute_dtypes(layer):
    dtypes = {layer.dtype_policy.compute_dtype}
    for sub in getattr(layer, "layers", ()):
        dtypes |= _compute_dtypes(sub)
    return dtypes


def _check_tflite_precision(model, args):
    """TFLite's built-in ops take float32: a model that computes in (b)float16 is refused."""
    low = sorted(_compute_dtypes(model) & {"bfloat16", "float16"})
    if low:
        source = ("--keras-file holds a model" if args.keras_file is not None else "the model")
        raise StageError("format", "tflite", f"{source} that computes in {', '.join(low)} (a "
                         "--mixed-precision run); TFLite's built-in ops need float32: export the "
                         "run with --model-dir RUN_DIR instead, which rebuilds it in float32")


def run(argv=None):
    """Parses `argv` and exports. Returns the `ExportResult`.

    Raises:
        training.errors.StageError: missing or corrupt checkpoint, bad option (one line).
        SystemExit: from argparse for malformed options or `--help`.
    """
    args = build_parser().parse_args(argv)
    _check_options(args)
    model, config, source, class_names = _load(args)
    if args.format == "tflite":
        _check_tflite_precision(model, args)
    model_name = config.get("model") or model.name
    max_image_pixels = (args.max_image_pixels or config.get("max_image_pixels")
                        or DEFAULT_MAX_IMAGE_PIXELS)
    base_path = pathlib.Path(args.export_dir or REPO_ROOT / "saved_models" / model_name)
    serving_layout.check_base_path(base_path)
    try:
        result = export_saved_model(
            model, base_path, class_names, run_info={**config, "export_source": source},
            model_name=model_name, tflite=args.format == "tflite",
            tflite_select_tf_ops=args.tflite_select_tf_ops, top_k=args.top_k,
            max_image_pixels=max_image_pixels)
    except StageError:
        raise
    except (ValueError, OSError) as e:
        raise StageError("export_dir", base_path, " ".join(str(e).split())[:300]) from None
    accuracy = config.get("test_accuracy")
    print(f"Exported {model_name} version {result.version} to {result.path} (test accuracy: "
          f"{'unknown, the run did not finish' if accuracy is None else f'{accuracy:.4f}'})")
    if result.tflite_path is not None:
        print(f"TensorFlow Lite model: {result.tflite_path}")
    print(pin_hint(model_name, result.version), flush=True)
    return result


def main(argv=None):
    """Command-line entry point. Returns 0 on success, 2 after a one-line error."""
    from training import command_line, startup

    build_parser().parse_args(argv)  # --help and malformed options before TensorFlow
    startup.import_tensorflow_quietly()
    try:
        run(argv)
    except StageError as e:
        print(f"python -m training.export: error: {command_line.error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
