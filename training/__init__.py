"""Training entry points for tf_revnet: data pipelines, the paper's recipes, the CLI, export.

Not an installed package: run from the repository root, e.g. `python -m training.train --help`.

Modules:
    data: image folders (as real folders hold them) or TFDS; exact-resume `tf.data` pipelines with
        stateless CIFAR and ImageNet augmentation.
    recipes: named presets (the paper's CIFAR and ImageNet recipes), schedule, optimizer, weight decay.
    train: `python -m training.train`, train with `model.fit`, resume exactly, summarize, export.
    checkpoint: atomic, step-exact backups (a Keras callback on public hooks).
    command_line: the flags of `python -m training.train`, `RunConfig`, errors written with flag names.
    run_dir: the run directory (lock, atomic writes, clean-up of a failed start).
    classifier: model building (a zoo model on raw pixels, compiled; a run rebuilt).
    fitting: the named callbacks and `model.fit` in segments (exact resume, Ctrl-C).
    report: the lines and the end-of-run summary (memory: measured and estimated).
    cluster, strategy, replica_sync, watchdog: `--distribution` (TF_CONFIG, strategies,
        keeping workers in step, the multi-worker start-up watchdog).
    precision: whether bfloat16 is native on this CPU.
    errors: the structured errors of the stages.
    evaluate: `python -m training.evaluate PATH`, top-1/top-5, per-class, confusion matrix.
    plots: training curves and confusion-matrix PNGs (matplotlib).
    startup: quiet TensorFlow start-up for the command-line entry points.
    export: `python -m training.export`, a run or `.keras` file as a new TF Serving version
        (`saved_models/<model>/<n>/`), optionally TensorFlow Lite.
    serving_signatures: the exported signatures (uint8 images, float pixels, encoded files in;
        probabilities, class ids and names out).
    image_safety: image sizes read from the headers inside the TF graph; oversized files (decompression
        bombs), unsized formats and corrupt headers refused before decoding (TensorFlow only).
    serving_layout: atomic version directories of a TF Serving model base path (standard library).
    predict: `python -m training.predict`, the client: classify image files with an export or a
        TF Serving server, without `tf_revnet`.
"""
