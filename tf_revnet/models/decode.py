"""Class names for predictions, in the style of `keras.applications.*.decode_predictions`."""

import numpy as np

#: CIFAR-10's classes in label order (Krizhevsky, 2009; the order of TFDS `cifar10` and of a sorted
#: listing of the image-folder copy).
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def decode_predictions(preds, class_names=CIFAR10_CLASSES, top=5):
    """Turns a batch of class probabilities into `(class_id, class_name, probability)` tuples.

    Args:
        preds: array-like `(batch, classes)`, float (the output of a classifier of `tf_revnet.models`).
        class_names: sequence of str, one per class. Defaults to `CIFAR10_CLASSES`. Models trained
            with `python -m training.train` carry theirs in the export (`assets.extra/class_names.txt`;
            `training.predict.read_class_names`).
        top: int. How many classes per example, most probable first. Defaults to 5.

    Returns:
        list (one per example) of lists of `(int, str, float)`.

    Raises:
        ValueError: if `preds` is not 2-D, or its number of classes differs from `len(class_names)`.

    Examples:
        >>> decode_predictions([[0.1, 0.7, 0.2]], ["cat", "dog", "frog"], top=2)
        [[(1, 'dog', 0.7), (2, 'frog', 0.2)]]
    """
    preds = np.asarray(preds)
    if preds.ndim != 2:
        raise ValueError(f"`preds` must be (batch, classes). Received shape {preds.shape}")
    if preds.shape[1] != len(class_names):
        raise ValueError(
            f"`preds` has {preds.shape[1]} classes but `class_names` has {len(class_names)}: pass the "
            "class names of the model's data set."
        )
    results = []
    for row in preds:
        order = np.argsort(-row, kind="stable")[:top]
        results.append([(int(i), str(class_names[i]), round(float(row[i]), 7)) for i in order])
    return results
