"""Training entry points for tf_revnet: data pipelines, the paper's recipes, the CLI, export.

Not an installed package: run from the repository root, e.g. `python -m training.train --help`.

Modules:
    data: TFDS or image-folder datasets and the paper's CIFAR augmentation (`tf.data`).
    recipes: named presets (the paper's CIFAR recipe) and the optimizer/weight decay they imply.
    train: `python -m training.train`, train with `model.fit`, evaluate, export.
    export: SavedModel export in the TF Serving layout (`saved_models/<model>/<version>/`).
"""
