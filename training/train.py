"""Train a RevNet (or a baseline) with `model.fit`, evaluate it, and export it for TF Serving.

Run from the repository root (`training` is not an installed package):

    # A first run: RevNet-38 on CIFAR-10 (offline: the image-folder copy), a few minutes on CPU:
    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10
    python -m training.train --data-dir /tmp/cifar10 --recipe quick

    # The paper's CIFAR-10 recipe on RevNet-38 (TFDS downloads CIFAR-10 on first use):
    python -m training.train --model revnet38 --dataset cifar10

    # ImageNet (RevNet-104) from a folder of JPEGs DIR/train/<class>/*.JPEG, DIR/test/<class>/*:
    python -m training.train --recipe imagenet --model revnet104 --data-dir /data/imagenet \\
        --distribution mirrored

    # Two workers: the same command on each host, with its own TF_CONFIG task index (0 is the
    # chief, which writes the run dir; the run dir is shared, e.g. on a network file system):
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", '\\
    '"index": 0}}' python -m training.train --data-dir /data/cifar10 --distribution multi_worker \\
        --model-dir /shared/runs/a

    # Save every 500 steps; a killed or interrupted run resumes exactly with the same command:
    python -m training.train --data-dir /tmp/cifar10 --save-every-steps 500 --model-dir runs/a

The run goes through one stage per module: the command line (`training.command_line`), the
cluster and strategy (`training.cluster`, `training.strategy`, `training.replica_sync`), the run
directory (`training.run_dir`), the data (`training.data`), the model (`training.classifier`),
fitting (`training.fitting`, `training.checkpoint`), the export (`training.export`) and the
report (`training.report`). Each run writes its own run directory (`--model-dir`, default a new
`runs/<model>/<time>/`): `config.json`, `backup/` (the resume state, removed when the run is
complete), `model.weights.h5`, `model.keras`, `training_log.csv`, `logs/`, `curves.png` and
`summary.json`; the export is a new version of `--export-dir` (default `saved_models/<model>`).

`main(argv)` returns the process exit code (0; 2 after a one-line error on bad input or a bad
environment; 1 when a worker of a multi-worker run is lost; 130 after Ctrl-C, with the line that
says how to resume); `run(argv)` does the work and returns a `TrainResult` for tests and
notebooks. `--help` answers without importing TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import time

from training import command_line
from training.errors import StageError, WorkerLostError

__all__ = ["main", "run", "TrainResult"]


@dataclasses.dataclass
class TrainResult:
    """What `run` returns.

    Attributes:
        model: the trained `keras.Model` (raw float32 pixels in, class probabilities out).
        history: dict of per-epoch metric lists of this process' `fit` calls.
        test_accuracy: float. Top-1 accuracy on the test split after training.
        test_loss: float. Loss on the same examples (including the weight-decay penalty).
        export_dir: `pathlib.Path` of the exported version `<export-dir>/<n>/`, or None.
        config: dict. The resolved configuration and data facts (also in `config.json`).
        summary: dict. What the end-of-run summary shows (also in `summary.json`).
    """

    model: object
    history: dict
    test_accuracy: float
    test_loss: float
    export_dir: pathlib.Path | None
    config: dict
    summary: dict


@dataclasses.dataclass(frozen=True)
class _Role:
    """This process in the run: the chief writes the run directory `run_dir`."""

    chief: bool
    index: int
    run_dir: pathlib.Path


def _role(config):
    """(`_Role`, this process' config): other workers keep their state in `worker-<i>/`."""
    from training import cluster

    run_dir = pathlib.Path(config.model_dir)
    if config.distribution != "multi_worker":
        return _Role(True, 0, run_dir), config
    task = cluster.cluster_task()
    role = _Role(cluster.is_chief(), task.index, run_dir)
    if not role.chief:  # the Keras multi-worker convention: the chief's files are the run's
        worker = run_dir / f"worker-{task.index}"
        config = dataclasses.replace(config, model_dir=str(worker),
                                     export_dir=str(worker / "export"))
    return role, config


def _strategy(config, reporter):
    from training import strategy

    def format_stop(message, signum):  # the wait for the other workers ends the process
        hint = "" if signum else f" (or raise --worker-timeout {config.worker_timeout:g})"
        return f"python -m training.train: error: --distribution multi_worker: {message}{hint}"

    try:
        return strategy.make_strategy(config.distribution, config.worker_timeout, format_stop,
                                      report=lambda line: reporter.line(line, always=True))
    except StageError:
        raise
    except ValueError as e:
        raise command_line.ConfigError("distribution", config.distribution, str(e)) from None


def _load_data(config, replicas, reporter):
    from training import data, report

    recipe = config.recipe
    if recipe.batch_size % replicas:
        raise command_line.ConfigError("batch_size", recipe.batch_size, (
            f"the global batch is split into {replicas} equal replica batches "
            f"({config.distribution}); use a multiple of {replicas}"))
    reporter.line(f"Loading the data ({config.data_dir or config.dataset}; an image folder's files "
                  "are decoded once)")
    datasets = data.load(progress=reporter.decoding if config.verbose else None,
        dataset=config.dataset, data_dir=config.data_dir, tfds_data_dir=config.tfds_data_dir,
        image_size=recipe.image_size, in_memory=recipe.preprocessing == "cifar",
        train_examples=recipe.train_examples, test_examples=recipe.test_examples,
        seed=config.seed, validation_split=config.validation_split, strict=config.strict_data,
        max_image_pixels=config.max_image_pixels, follow_links=config.follow_links)
    for line in report.left_out_lines(datasets):
        reporter.line(line)
    if datasets.num_train < recipe.batch_size:
        raise command_line.ConfigError("batch_size", recipe.batch_size, (
            f"larger than the {datasets.num_train} training examples; lower it or use more "
            "examples"))
    return datasets


@contextlib.contextmanager
def _checked_start(config, role, strategy, fingerprint, reporter):
    """Yields `(RunDirectory, Datasets)` once this worker's checks passed on every worker: the
    export base path and the run directory are writable, the directory is new or resumable, the
    data load; a failed start leaves no run directory behind (`RunDirectory`)."""
    from training import classifier, replica_sync, run_dir

    advice = ("pick a new --model-dir" if config.distribution == "multi_worker"
              else "pick a new --model-dir or leave it out (a new runs/<model>/<time>)")
    shown_as = None if role.chief else (
        role.run_dir, f"this worker's state folder {pathlib.Path(config.model_dir).name}/ ")
    with contextlib.ExitStack() as stack:
        try:
            if config.export:
                run_dir.probe_writable(config.export_dir, "export_dir")
            run = stack.enter_context(run_dir.RunDirectory(
                config.model_dir, fingerprint, advice, shown_as, classifier.canonical_model_name))
            datasets = _load_data(config, strategy.num_replicas_in_sync, reporter)
        except StageError:
            replica_sync.check_all_ready(strategy, False)
            raise
        replica_sync.check_all_ready(strategy, True)
        # Each host may hold its own copy of the data: the same path must hold the same data.
        replica_sync.check_same_values(strategy, {
            "class names": datasets.class_names, "numbers of training images": datasets.num_train,
            "numbers of test images": datasets.num_test}, verb="loaded data with",
            fix="every worker's data (the --data-dir or --dataset of its host) must be the same")
        yield run, datasets


def _restore(config, role, model, strategy, reporter, plan):
    """(backup of this process, restored step): every worker resumes from the chief's backup
    when it sees the shared run directory, and the workers check they restored the same step."""
    from training import checkpoint, replica_sync
    from training.errors import CheckpointError, RunDirError

    backup = checkpoint.ExactBackup(pathlib.Path(config.model_dir) / "backup",
                                    save_every_steps=config.save_every_steps)
    chief_backup = checkpoint.ExactBackup(role.run_dir / "backup")
    source = chief_backup if not role.chief and chief_backup.exists() else backup
    try:
        step = source.restore(model)
    except CheckpointError as e:
        raise RunDirError("model_dir", role.run_dir, e.parts) from None
    backup.saved_step = step if source is backup else None
    replica_sync.check_same_step(strategy, step)
    reporter.resume(step, plan, source.directory)
    return backup, step


def _config_record(config, datasets, plan, strategy, fingerprint):
    """`config.json`: the resolved options, the data facts and the training fingerprint."""
    recipe = config.recipe
    return {**config.to_dict(), "data_source": datasets.source, "num_train": datasets.num_train,
            "num_test": datasets.num_test, "test_split": datasets.test_name,
            "image_shape": [recipe.image_size, recipe.image_size, 3],
            "class_names": datasets.class_names, "skipped_files": len(datasets.skipped),
            "refused_files": len(datasets.refused), "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps, "num_replicas": strategy.num_replicas_in_sync,
            "fingerprint": fingerprint}


def _fingerprint(config):
    from training import classifier, run_dir

    values = config.to_dict()
    fingerprint = {key: values[key] for key in run_dir.TRAINING_FIELDS}
    fingerprint["model"] = classifier.canonical_model_name(config.model)  # RevNet-38 = revnet38
    fingerprint["recipe"] = {k: v for k, v in fingerprint["recipe"].items()
                             if k not in ("name", "description")}
    return fingerprint


def _best_accuracy(csv_path, final):
    import csv

    try:
        with open(csv_path) as f:
            values = [float(r["val_accuracy"]) for r in csv.DictReader(f) if r.get("val_accuracy")]
    except OSError:
        values = []
    return max(values + [final])


def _save_and_export(model, config, datasets, record, reporter):
    """Writes `model.keras` and (with `config.export`) the new TF Serving version.

    Export before the run is marked finished: a failed export leaves a resumable run (rerun the
    command: it evaluates and exports again) and no partial version.
    """
    from training import export, run_dir

    keras_file = pathlib.Path(config.model_dir) / "model.keras"
    reporter.line(f"Saving {keras_file}")
    with run_dir.atomic_write(keras_file) as tmp:
        model.save(tmp)
    if not config.export:
        return None
    reporter.line(f"Exporting a new version of {config.export_dir} (SavedModel with three "
                  "serving signatures; this takes a while)")
    from training import report

    with report.heartbeat(reporter.line, "exporting"):
        return export.export_saved_model(model, config.export_dir, datasets.class_names,
                                         run_info=record, max_image_pixels=config.max_image_pixels)


def _finish(model, config, role, datasets, fit_result, record, callbacks, reporter):
    """Saves, exports, writes the summary and the finished config; returns the `TrainResult`."""
    from training import export, plots, report, run_dir

    history, test, seconds = fit_result
    model_dir = pathlib.Path(config.model_dir)
    metrics = callbacks.metrics
    memory = report.memory_estimate_mb(
        model, config.recipe.batch_size // max(1, record["num_replicas"]))
    summary = report.summarize(
        config, datasets, test, _best_accuracy(model_dir / "training_log.csv", test["accuracy"]),
        seconds, metrics.images / metrics.seconds if metrics.seconds else None, memory)
    record = {**record, "finished": True, "test_accuracy": summary["test_accuracy"],
              "test_loss": summary["test_loss"], "train_seconds": seconds}
    exported = _save_and_export(model, config, datasets, record, reporter)
    summary.update(keras_file=str(model_dir / "model.keras"),
                   export_dir=str(exported.path) if exported else None,
                   export_version=exported.version if exported else None)
    curves = plots.plot_training_curves(model_dir / "training_log.csv", model_dir / "curves.png",
                                        title=f"{config.model} on {datasets.source}")
    summary["curves"] = str(curves) if curves else None
    reporter.summary(summary, export.pin_hint)
    if not role.chief:  # the run's files, summary and export are the chief's
        reporter.line(f"Worker {role.index} done: test accuracy {summary['test_accuracy']:.4f} "
                      f"(the same on every worker); the run's files are the chief's, in "
                      f"{role.run_dir}", always=True)
    run_dir.write_json(model_dir / "summary.json", summary)
    run_dir.write_json(model_dir / "config.json", record)
    callbacks.backup.delete()
    return TrainResult(model=model, history=history, test_accuracy=summary["test_accuracy"],
                       test_loss=summary["test_loss"], export_dir=exported and exported.path,
                       config=record, summary=summary)


def _train(config, extra_callbacks):
    import keras
    import tensorflow as tf

    from training import classifier, data, fitting, precision, replica_sync, report, run_dir

    role, config = _role(config)
    reporter = report.Reporter(enabled=role.chief)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = _strategy(config, reporter)
    reporter.line("Precision: " + precision.advice(
        config.mixed_precision, len(tf.config.list_logical_devices("GPU"))))
    fingerprint = _fingerprint(config)
    replica_sync.check_same_values(strategy, command_line.shared_options(config, fingerprint,
                                                                         role.run_dir))
    with _checked_start(config, role, strategy, fingerprint, reporter) as (run, datasets):
        plan = fitting.Plan.for_data(datasets.num_train, config.recipe)
        record = _config_record(config, datasets, plan, strategy, fingerprint)
        reporter.line("Building and compiling the model (normalization adapted on the data)")
        model = classifier.build_and_compile(config, datasets, strategy, plan.total_steps)
        reporter.start(config, model, datasets, plan, strategy.num_replicas_in_sync)
        backup, step = _restore(config, role, model, strategy, reporter, plan)
        if not run.resuming:
            run_dir.write_json(run.path / "config.json", record)
        test_ds = data.eval_dataset(datasets.test_split, config.recipe.batch_size,
                                    augment=config.recipe.preprocessing,
                                    image_size=config.recipe.image_size)
        test = (test_ds, -(-datasets.num_test // config.recipe.batch_size),
                f"the {datasets.num_test} {datasets.test_name} images")
        callbacks = fitting.make_callbacks(config, model, strategy, backup, test,
                                           extra_callbacks, reporter.line)
        start = time.time()
        history, metrics = fitting.fit(model, config, datasets, test_ds, plan, step, callbacks,
                                       strategy, reporter.line)
        try:
            return _finish(model, config, role, datasets, (history, metrics, time.time() - start),
                           record, callbacks, reporter)
        except KeyboardInterrupt:  # trained and backed up: a rerun evaluates and exports
            raise fitting.Interrupted(plan.total_steps, backup.saved_step,
                                      config.model_dir) from None


def run(argv=None, callbacks=()):
    """Parses `argv`, trains, evaluates and exports.

    Calls `keras.backend.clear_session()` first (fresh layer names, so a backup restores into the
    same structure) and sets the global dtype policy for the duration of the run only.

    Args:
        argv: list of str or None (`sys.argv[1:]`).
        callbacks: extra `keras.callbacks.Callback`s, called after the run's own (before the
            progress bars).

    Returns:
        `TrainResult`.

    Raises:
        training.errors.StageError: bad options, data, run directory, export base path or
            cluster (one line; `main` writes it with the flags' names).
        training.errors.WorkerLostError: a worker of a multi-worker run stopped.
        training.fitting.Interrupted: Ctrl-C during training (after saving the backup).
        KeyboardInterrupt: Ctrl-C before training (nothing saved, no run directory left).
        SystemExit: from argparse for malformed options or `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = command_line.resolve_config(command_line.build_parser().parse_args(argv), argv)
    import keras

    previous_policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    try:
        keras.config.set_dtype_policy(
            "float32" if config.mixed_precision == "none" else config.mixed_precision)
        return _train(config, list(callbacks))
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _interrupted_line(error, argv):
    if error is None:
        return ("interrupted before training started; run the same command to start (or resume) "
                "it")
    given = any(a == "--model-dir" or a.startswith("--model-dir=") for a in argv)
    again = "run the same command" + ("" if given else f" with --model-dir {error.model_dir}")
    saved = ("" if error.saved_step in (None, error.step)
             else f" (from the backup of step {error.saved_step})")
    return f"interrupted at step {error.step}; {again} to resume{saved}"


def main(argv=None):
    """Command-line entry point: the exit status (see the module docstring)."""
    from training import startup

    argv = list(sys.argv[1:] if argv is None else argv)
    command_line.build_parser().parse_args(argv)  # --help and malformed options at once
    startup.import_tensorflow_quietly()
    from training import fitting

    try:
        run(argv)
    except StageError as e:
        print(f"python -m training.train: error: {command_line.error_line(e)}", file=sys.stderr)
        return 2
    except WorkerLostError as e:
        print(f"python -m training.train: error: --distribution multi_worker: {e}; start every "
              "worker again with the same command: they resume from the last backup",
              file=sys.stderr)
        return 1
    except fitting.Interrupted as e:
        print(f"python -m training.train: {_interrupted_line(e, argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"python -m training.train: {_interrupted_line(None, argv)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
