"""The serving signatures of an exported classifier: raw images or encoded files in, class names out.

A client of the SavedModel needs neither `tf_revnet` nor the image size, the normalization or the label
list: all of them are inside the signatures. Every signature runs the model with `training=False`
(inference only: BatchNorm uses its moving statistics, and the reversible layers' custom gradient,
the training path, is not traced into the graph).

Signatures (`N` is the batch, `H, W` the model's image size, `K = min(TOP_K, classes)`):

| signature | input | dtype, shape |
|---|---|---|
| `serving_default` | `images` | uint8 `(N, H, W, 3)` raw RGB pixels |
| `serving_float` | `images` | float32 `(N, H, W, 3)` raw RGB pixels in [0, 255] (not normalized) |
| `serving_bytes` | `image_bytes` | string `(N,)` encoded JPEG, PNG, GIF or BMP files (see below) |

`serving_bytes` decodes each file as RGB and resizes it to `(H, W)` with bilinear interpolation (as
`keras.utils.image_dataset_from_directory` did for training; images already of size `(H, W)` are
unchanged). Before decoding, it reads each file's size from its header (`training.image_safety`)
and refuses files over `max_image_pixels` (all frames of a GIF together; 100 million by default),
without pixels, or not JPEG, PNG, GIF or BMP: the request fails as a whole with an
`InvalidArgumentError` naming the image's index, its size and the limit, e.g.
`image_bytes[2]: 20000 x 20000 pixels x 1 frame = 400000000 pixels, over the limit of 100000000
pixels (max_image_pixels); refused before decoding`. Only a GIF's first frame is decoded, and one
image at a time, so a request's memory grows with its resized images only. All three return the
same outputs:

| output | dtype, shape | value |
|---|---|---|
| `probabilities` | float32 `(N, classes)` | softmax probabilities |
| `class_ids` | int64 `(N,)` | index of the most probable class |
| `class_names` | string `(N,)` | its name (the label list is a constant in the graph) |
| `top_k_class_ids`, `top_k_class_names`, `top_k_probabilities` | `(N, K)` | only if classes > 10 |

Example:

```python
archive = serving_signatures.build_archive(model, class_names=["airplane", ..., "truck"])
archive.write_out("saved_models/revnet38/1", verbose=False)
```
"""

from __future__ import annotations

import keras
import tensorflow as tf

from training import image_safety

__all__ = ["DEFAULT_SIGNATURE", "FLOAT_SIGNATURE", "BYTES_SIGNATURE", "SIGNATURES", "TOP_K",
           "TOP_K_MIN_CLASSES", "build_archive", "image_size_of"]

DEFAULT_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_float"
BYTES_SIGNATURE = "serving_bytes"
SIGNATURES = (DEFAULT_SIGNATURE, FLOAT_SIGNATURE, BYTES_SIGNATURE)
TOP_K = 5
# `top_k_*` outputs are added when the model has more classes than this.
TOP_K_MIN_CLASSES = 10


def image_size_of(model):
    """Returns `(H, W)` of a model that takes `(N, H, W, 3)` images.

    Args:
        model: `keras.Model` with one image input.

    Returns:
        tuple of two ints.

    Raises:
        ValueError: if the input is not `(N, H, W, 3)` with known `H` and `W`.
    """
    if len(model.inputs) != 1:
        raise ValueError(f"`model` must have one image input. Received {len(model.inputs)} inputs")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(
            "`model` must take RGB images of a fixed size, shape (N, H, W, 3). Received input "
            f"shape {shape}; build it with `input_shape=(H, W, 3)`"
        )
    return int(shape[1]), int(shape[2])


def build_archive(model, class_names, top_k=TOP_K,
                  max_image_pixels=image_safety.DEFAULT_MAX_IMAGE_PIXELS):
    """Builds a `keras.export.ExportArchive` with the three serving signatures of `model`.

    Args:
        model: a built `keras.Model` mapping float32 `(N, H, W, 3)` raw pixels in [0, 255] to
            float32 `(N, classes)` probabilities (normalization inside the model, as
            `training.train.build_classifier` builds it).
        class_names: sequence of `classes` str, index = class id.
        top_k: int. Number of `top_k_*` outputs when there are more than 10 classes.
        max_image_pixels: int. `serving_bytes` refuses files whose header announces more pixels
            (all frames of a GIF together), before decoding them. Defaults to
            `image_safety.DEFAULT_MAX_IMAGE_PIXELS` (100 million).

    Returns:
        `keras.export.ExportArchive`; call `write_out(path)` on it.

    Raises:
        ValueError: if the model's input is not fixed-size RGB, `class_names` does not have one
            name per output of the model, or `max_image_pixels` is not a positive integer.
    """
    height, width = image_size_of(model)
    class_names = [str(name) for name in class_names]
    num_classes = model.outputs[0].shape[-1]
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` must have one name per class of the model ({num_classes}). Received "
            f"{len(class_names)} names"
        )
    if top_k < 1:
        raise ValueError(f"`top_k` must be >= 1. Received: top_k={top_k}")
    max_image_pixels = image_safety.check_max_image_pixels(max_image_pixels, "`max_image_pixels`")
    k = min(top_k, num_classes)
    names = tf.constant(class_names, dtype=tf.string)

    def classify(pixels):
        probabilities = tf.cast(model(pixels, training=False), tf.float32)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        outputs = {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids),
        }
        if num_classes > TOP_K_MIN_CLASSES:
            top = tf.math.top_k(probabilities, k=k)
            top_ids = tf.cast(top.indices, tf.int64)
            outputs.update(top_k_probabilities=top.values, top_k_class_ids=top_ids,
                           top_k_class_names=tf.gather(names, top_ids))
        return outputs

    def from_uint8(images):
        return classify(tf.cast(images, tf.float32))

    def from_float(images):
        return classify(images)

    def from_bytes(image_bytes):
        return classify(image_safety.decode_images(image_bytes, (height, width), max_image_pixels,
                                                   name="image_bytes"))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(DEFAULT_SIGNATURE, from_uint8,
                         [tf.TensorSpec((None, height, width, 3), tf.uint8, name="images")])
    archive.add_endpoint(FLOAT_SIGNATURE, from_float,
                         [tf.TensorSpec((None, height, width, 3), tf.float32, name="images")])
    archive.add_endpoint(BYTES_SIGNATURE, from_bytes,
                         [tf.TensorSpec((None,), tf.string, name="image_bytes")])
    return archive
