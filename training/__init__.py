"""Training entry points for tf_revnet: data pipelines, the paper's recipes, the CLI, export.

Not an installed package: run from the repository root, e.g. `python -m training.train --help`.

Modules:
    data: image folders (as real folders hold them) or TFDS; exact-resume `tf.data` pipelines with
        stateless CIFAR and ImageNet augmentation.
    recipes: named presets (the paper's CIFAR and ImageNet recipes), schedule, optimizer, weight decay.
    train: `python -m training.train`, train with `model.fit`, resume exactly, summarize, export.
    checkpoint: atomic, step-exact backups (`keras.callbacks.BackupAndRestore` subclass).
    distribute: `tf.distribute` strategies for `--distribution`.
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
