"""Training entry points for tf_revnet: data pipelines, the paper's recipes, the CLI, export.

Not an installed package: run from the repository root, e.g. `python -m training.train --help`.

Modules:
    data: TFDS or image-folder datasets and the paper's CIFAR augmentation (`tf.data`).
    recipes: named presets (the paper's CIFAR recipe) and the optimizer/weight decay they imply.
    train: `python -m training.train`, train with `model.fit`, evaluate, export.
    export: `python -m training.export`, a run or `.keras` file as a new TF Serving version
        (`saved_models/<model>/<n>/`), optionally TensorFlow Lite.
    serving_signatures: the exported signatures (uint8 images, float pixels, encoded files in;
        probabilities, class ids and names out).
    serving_layout: atomic version directories of a TF Serving model base path (standard library).
    predict: `python -m training.predict`, the client: classify image files with an export or a
        TF Serving server, without `tf_revnet`.
"""
