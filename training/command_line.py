"""The command line of `python -m training.train`: flags, the resolved `RunConfig`, error lines.

This module imports no TensorFlow (so `--help` answers at once). The recipe overrides are made
from the fields of `training.recipes.Recipe` (`--epochs`, `--batch-size`, ...). The stages raise
structured errors (`training.errors.StageError`: parameter, value, reason with `Mention`s);
`error_line` is the one place that writes them with flag names (`data_dir` -> `--data-dir`,
`strict=False` -> "without --strict-data"), for `training.train` and `training.evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from training import precision, recipes, serving_layout
from training.errors import Mention, StageError
from training.run_dir import new_run_dir

__all__ = ["RunConfig", "ConfigError", "build_parser", "resolve_config", "error_line", "flag",
           "shared_options", "RECIPE_FLAGS", "STRATEGIES", "REPO_ROOT"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIXED_PRECISION_POLICIES = ("none", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")
COUPLINGS = ("additive", "fixed_point")
DEFAULT_WORKER_TIMEOUT = 600.0
# training.image_safety.DEFAULT_MAX_IMAGE_PIXELS (that module imports TensorFlow; a test checks
# that the two are equal).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS = 2**63 - 1  # training.image_safety.MAX_LIMIT (int64)
# The recipe fields that flags override, with their help.
_RECIPE_HELP = {
    "epochs": "number of epochs",
    "batch_size": "global batch size (all devices)",
    "learning_rate": "initial learning rate",
    "momentum": "SGD momentum (AdamW's beta_1 with the vit recipes)",
    "weight_decay": "L2 coefficient on convolution and dense kernels (AdamW: its decoupled "
                    "weight decay)",
    "image_size": "side of the square images the model sees",
    "steps_per_epoch": "cap on the training steps of each epoch",
    "train_examples": "use only this many training examples (a seeded subset)",
    "test_examples": "use only this many test examples (validation and final evaluation; a "
                     "seeded subset)",
    "augment": "training augmentation (CIFAR: pad-4 crop + flip; ImageNet: random-resized crop "
               "+ flip)",
}
RECIPE_FLAGS = tuple(f.name for f in dataclasses.fields(recipes.Recipe) if f.name in _RECIPE_HELP)
# Parameters whose flag is not `--` + the name with dashes.
_FLAGS = {"use_custom_gradient": "--no-custom-gradient", "export": "--no-export",
          "strict": "--strict-data",
          "path": "PATH"}  # the positional argument of training.evaluate


class ConfigError(StageError):
    """A command-line option out of range, or options that do not go together."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of a run (recipe with overrides, paths, options).

    Attributes:
        model: str. Model name as given (any name `tf_revnet.models.get` accepts).
        dataset: str or None. TFDS name (None with `data_dir`).
        data_dir: str or None. Absolute image-folder root.
        tfds_data_dir: str or None.
        validation_split: float or None.
        follow_links: bool. Follow folder links inside class folders (with loop detection).
        recipe: `recipes.Recipe` with the command-line overrides.
        model_dir: str. Absolute run directory.
        model_dir_given: bool. Whether `--model-dir` was on the command line.
        export_dir: str. Absolute TF Serving model base path (the export is its next version).
        export: bool. Export at the end of the run (False: `--no-export`).
        mixed_precision: str. `"none"`, `"mixed_bfloat16"` or `"mixed_float16"`.
        use_custom_gradient: bool.
        seed: int.
        deterministic: bool. TensorFlow op determinism.
        distribution: str. One of `STRATEGIES`.
        worker_timeout: float. Seconds a multi-worker process waits for the other workers.
        save_every_steps: int or None.
        strict_data: bool.
        max_image_pixels: int. Image files announcing more pixels are refused before decoding.
        coupling: str. The reversible blocks' coupling (`COUPLINGS`): `"additive"` (the paper's)
            or `"fixed_point"` (exactly reversible float32 stream, `AdditiveCoupling.fixed_point`).
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
    follow_links: bool = False
    model_dir_given: bool = True
    export: bool = True
    mixed_precision: str = "none"
    use_custom_gradient: bool = True
    coupling: str = "additive"
    seed: int = 0
    deterministic: bool = False
    distribution: str = "none"
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    save_every_steps: int | None = None
    strict_data: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
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


def flag(parameter):
    """The flag of a parameter: `data_dir` -> `--data-dir`."""
    return _FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def _mention(mention):
    if isinstance(mention.value, bool):
        return f"{'with' if mention.value else 'without'} {flag(mention.parameter)}"
    if mention.value is None:
        return flag(mention.parameter)
    return f"`{flag(mention.parameter)} {mention.value}`"


def error_line(error):
    """A stage's structured error as one line naming flags: `--data-dir /x: no such directory`."""
    return f"{flag(error.parameter)} {error.value}: {error.render(_mention)}"


def _recipe_flags(parser):
    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    for field in dataclasses.fields(recipes.Recipe):
        if field.name not in _RECIPE_HELP:
            continue
        kind = str(field.type).split()[0]  # "int", "float", "int | None", "bool"
        if kind == "bool":
            group.add_argument(flag(field.name), action=argparse.BooleanOptionalAction,
                               default=None, help=_RECIPE_HELP[field.name])
        else:
            group.add_argument(flag(field.name), type={"int": int, "float": float}[kind],
                               help=_RECIPE_HELP[field.name])
    group.add_argument("--scale-learning-rate", action="store_true",
                       help="linear scaling rule: lr = recipe lr * batch size / recipe batch size")


def _data_flags(parser):
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
    parser.add_argument("--follow-links", action="store_true",
                        help="follow folder links inside class folders (each folder read once; "
                             "link loops are skipped). Default: not followed, as Keras' "
                             "image_dataset_from_directory")
    parser.add_argument("--strict-data", action="store_true",
                        help="stop at the first image file that does not decode (default: skip "
                             "and report such files)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        metavar="PIXELS",
                        help="image files whose header announces more pixels (all frames of a GIF "
                             "together) are skipped before decoding (--strict-data: stop), and "
                             "the export's serving_bytes signature refuses them. "
                             "Default: %(default)d")
    parser.add_argument("--tfds-data-dir", default=None,
                        help="where TFDS stores datasets. Default: TFDS' default")


def _run_flags(parser):
    parser.add_argument("--model-dir", default=None,
                        help="run directory (checkpoints, logs, config.json); give an existing "
                             "one to resume it. Default: a new runs/<model>/<date-time>")
    parser.add_argument("--save-every-steps", type=int, default=None,
                        help="also save the resume state every N steps (default: every epoch "
                             "and on Ctrl-C)")
    parser.add_argument("--export-dir", default=None,
                        help="model base path that TF Serving watches: the export becomes its next "
                             "version <export-dir>/<n>/. Default: saved_models/<model>")
    parser.add_argument("--no-export", dest="export", action="store_false",
                        help="skip the export (export later with python -m training.export)")
    parser.add_argument("--mixed-precision", default="none", choices=MIXED_PRECISION_POLICIES,
                        help="Keras dtype policy. Default: none (float32). Here: "
                             + precision.advice("none").replace("%", "%%"))
    parser.add_argument("--distribution", default="none", choices=STRATEGIES,
                        help="tf.distribute strategy: mirrored (GPUs of this machine), "
                             "multi_worker (TF_CONFIG), tpu. Default: none")
    parser.add_argument("--worker-timeout", type=float, default=DEFAULT_WORKER_TIMEOUT,
                        metavar="SECONDS",
                        help="multi_worker: how long a worker waits for the others of TF_CONFIG "
                             "to start. Default: %(default)g")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialization, data order and augmentation. Default: 0")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow op determinism (tf.config.experimental."
                             "enable_op_determinism): bitwise-repeatable runs, slower on GPU")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="1: progress bars (training and validation), 2: one line per "
                             "epoch. Default: 1")


def _numerics_flags(parser):
    parser.add_argument("--no-custom-gradient", dest="use_custom_gradient", action="store_false",
                        help="plain autodiff instead of reversible backprop (for comparison)")
    parser.add_argument("--coupling", default="additive", choices=COUPLINGS,
                        help="the reversible blocks' coupling: additive (the paper's) or "
                             "fixed_point (an exactly reversible float32 stream; warns when a "
                             "block leaves its exact range). Default: additive")
    parser.add_argument("--monitor-numerics", type=int, default=0, metavar="N",
                        help="every N steps, log the reversible gradient angle and reconstruction "
                             "error on a held-out test batch (tf_revnet.callbacks."
                             "ReversibleNumericsMonitor). Default: 0 (off)")
    parser.add_argument("--max-gradient-angle", type=float, default=1.0, metavar="DEG",
                        help="with --monitor-numerics: warn above this angle. Default: 1.0")
    parser.add_argument("--max-reconstruction-error", type=float, default=1e-2, metavar="REL",
                        help="with --monitor-numerics: warn above this relative error. "
                             "Default: 0.01")


def build_parser():
    """The command-line interface; recipe fields default to `None` (= take the recipe's value)."""
    recipe_help = "; ".join(
        f"{name}: {recipes.get(name).description}" for name in recipes.list_recipes()
    ).replace("%", "%%")
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a RevNet (or RevViT) with model.fit, evaluate it, export a SavedModel for "
        "TF Serving. Ctrl-C saves the run and stops (exit status 130); the same command resumes "
        "it.",
        epilog="Example: python -m training.train --data-dir /tmp/cifar10 --recipe quick",
    )
    _data_flags(parser)
    parser.add_argument("--recipe", default=None, choices=recipes.list_recipes(),
                        help=f"named preset ({recipe_help}). Default: the model's (vit_cifar for "
                        "revvit_cifar, vit_imagenet for revvitsmall/revvitbase, cifar for the "
                        "others)")
    _recipe_flags(parser)
    _run_flags(parser)
    _numerics_flags(parser)
    return parser


def _check_options(args):
    positive = {"max_image_pixels": args.max_image_pixels, "worker_timeout": args.worker_timeout}
    if args.save_every_steps is not None:
        positive["save_every_steps"] = args.save_every_steps
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(name, value, "must be > 0")
    if args.max_image_pixels > MAX_IMAGE_PIXELS:  # the limit is an int64 tensor
        raise ConfigError("max_image_pixels", args.max_image_pixels,
                          f"must be at most {MAX_IMAGE_PIXELS}")
    if args.monitor_numerics < 0:
        raise ConfigError("monitor_numerics", args.monitor_numerics, "must be >= 0 (0: off)")
    if args.distribution == "multi_worker" and not args.model_dir:
        raise ConfigError("distribution", "multi_worker", [
            "needs ", Mention("model_dir"), ": one run directory that every worker sees (e.g. on "
            "a network file system), the same in each worker's command"])


def _resolve_recipe(args):
    from training import classifier  # imports TensorFlow (the model zoo)

    if not classifier.is_known_model(args.model):
        raise ConfigError("model", args.model, "unknown model; choose from "
                          f"{', '.join(classifier.model_names())} (case, '-' and '_' do not "
                          "matter)")
    if args.coupling != "additive" and not classifier.has_coupling(args.model):
        raise ConfigError("coupling", args.coupling, f"model {args.model} has no reversible "
                          "blocks with a coupling; use a RevNet (e.g. --model revnet38) or "
                          "leave --coupling out")
    recipe = recipes.get(args.recipe
                         or recipes.default_recipe(classifier.canonical_model_name(args.model)))
    if args.scale_learning_rate and args.batch_size is not None:
        recipe = recipe.scaled_to_batch(args.batch_size)
    return recipe.replace(**{field: getattr(args, field) for field in RECIPE_FLAGS})


def resolve_config(args, argv=()):
    """Merges the recipe with the command-line overrides and fills in default paths.

    Args:
        args: `argparse.Namespace` from `build_parser()`.
        argv: list of str. The arguments, for `RunConfig.command`.

    Returns:
        `RunConfig`.

    Raises:
        ConfigError: out-of-range values, options that do not go together.
        training.recipes.RecipeError: a recipe override out of range.
    """
    _check_options(args)
    recipe = _resolve_recipe(args)
    if args.model_dir:
        model_dir = pathlib.Path(args.model_dir).expanduser().resolve()
    else:
        model_dir = new_run_dir(REPO_ROOT / "runs" / args.model)
    export_dir = pathlib.Path(args.export_dir or REPO_ROOT / "saved_models" / args.model)
    serving_layout.check_base_path(export_dir)
    values = {k: getattr(args, k) for k in (
        "model", "tfds_data_dir", "validation_split", "follow_links", "export", "mixed_precision",
        "use_custom_gradient", "coupling", "seed", "deterministic", "distribution", "worker_timeout",
        "save_every_steps", "strict_data", "max_image_pixels", "monitor_numerics",
        "max_gradient_angle", "max_reconstruction_error", "verbose")}
    return RunConfig(
        dataset=None if args.data_dir else args.dataset,
        data_dir=str(pathlib.Path(args.data_dir).expanduser().resolve()) if args.data_dir
        else None,
        recipe=recipe, model_dir=str(model_dir), model_dir_given=bool(args.model_dir),
        export_dir=str(export_dir.expanduser().resolve()),
        command=" ".join(["python -m training.train", *argv]), **values)


def shared_options(config, fingerprint, run_dir):
    """The options every worker of a multi-worker run must share, keyed by flag."""
    options = {"--model-dir": str(run_dir), "--save-every-steps": config.save_every_steps,
               "--monitor-numerics": config.monitor_numerics,
               "--max-image-pixels": config.max_image_pixels}
    for key, value in fingerprint.items():
        if key == "recipe":  # the values --recipe sets, and those that flags override
            for field, field_value in value.items():
                name = flag(field) if field in RECIPE_FLAGS else "--recipe"
                options.setdefault(name, []).append([field, field_value])
        else:
            options[flag(key)] = value
    return options
