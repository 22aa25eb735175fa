"""Input pipelines: TFDS datasets or an image-folder tree, the paper's CIFAR augmentation.

Both sources give the same thing, a `Datasets` record whose `train` and `test` are unbatched
`tf.data.Dataset`s of `(image, label)` with `image` a `uint8` tensor of shape `(H, W, C)` (raw
pixels, 0..255) and `label` an `int32` scalar. `train_pipeline` and `eval_pipeline` turn them into
batches of `float32` pixels for `model.fit`. Normalization (per-channel mean and standard deviation)
is not done here: it is a layer inside the model, so the exported SavedModel takes raw pixels.

Shuffling never fills a large buffer with decoded float images (a 50,000-element buffer stalled the
first step of some epochs for 35-50 s, see NOTES.md): datasets that fit in `cache_limit_bytes` are
cached as `uint8` in memory after the first pass and then fully reshuffled every epoch (a cheap
in-memory pass); larger ones shuffle file order plus a bounded buffer.

Example:

```python
datasets = data.load(data_dir="/tmp/cifar10", train_examples=512, test_examples=256)
train = data.train_pipeline(datasets.train, batch_size=64, augment=True)
images, labels = next(iter(train))  # float32 (64, 32, 32, 3) in [0, 255], int32 (64,)
```
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import urllib.error
import urllib.request

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "DataError",
    "Datasets",
    "ARCHIVE_HINT",
    "load",
    "load_image_folder",
    "load_tfds",
    "network_available",
    "augment_cifar",
    "train_pipeline",
    "eval_pipeline",
]

# How to get data without network; shown in error messages.
ARCHIVE_HINT = (
    "extract the CIFAR-10 copy with `mkdir -p /tmp/cifar10 && "
    "tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10` and pass `--data-dir /tmp/cifar10`"
)

# Image-folder splits: DIR/train/<class>/* and DIR/test/<class>/*.
FOLDER_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
SHUFFLE_BUFFER_UNCACHED = 10_000


class DataError(ValueError):
    """Data cannot be loaded as asked; the message is one line that names the option and the fix."""


@dataclasses.dataclass
class Datasets:
    """Train and test splits of one data source.

    Attributes:
        train: `tf.data.Dataset` of `(uint8 (H, W, C), int32 ())`, unbatched, with classes mixed
            (the order may change between passes; `train_pipeline` caches the first pass when it
            fits in memory, so a capped subset stays fixed).
        test: same for the test split, in the same order (and the same capped subset) every pass.
        num_train: int. Number of training examples (after any cap).
        num_test: int. Number of test examples (after any cap).
        image_shape: tuple `(H, W, C)`.
        class_names: list of str, index = label.
        source: str. Human-readable origin, e.g. `tfds:cifar10` or `folder:/tmp/cifar10`.
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    image_shape: tuple
    class_names: list
    source: str

    @property
    def num_classes(self):
        return len(self.class_names)


def load(dataset="cifar10", data_dir=None, tfds_data_dir=None, image_size=32,
         train_examples=None, test_examples=None, seed=0):
    """Loads the training and test splits from an image folder (if `data_dir`) or from TFDS.

    Args:
        dataset: str. TFDS name, used when `data_dir` is None. Defaults to `"cifar10"`.
        data_dir: str or None. Image-folder root with `train/<class>/*` and `test/<class>/*`.
        tfds_data_dir: str or None. TFDS storage directory (TFDS' default if None).
        image_size: int. Side of the square images read from a folder (resized if needed).
        train_examples: int or None. Keep only this many training examples (a fixed, shuffled
            subset).
        test_examples: int or None. Keep only this many test examples.
        seed: int. Seed of the subset choice and file order.

    Returns:
        `Datasets`.

    Raises:
        DataError: unknown TFDS name, bad folder layout, or no data offline.
    """
    if data_dir is not None:
        return load_image_folder(data_dir, image_size=image_size, train_examples=train_examples,
                                 test_examples=test_examples, seed=seed)
    return load_tfds(dataset, tfds_data_dir=tfds_data_dir, train_examples=train_examples,
                     test_examples=test_examples, seed=seed)


def _class_dirs(split_dir):
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def _check_folder_layout(root):
    """Raises `DataError` unless `root/{train,test}/<class>/<images>` exist with equal classes."""
    fix = f"expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg ({ARCHIVE_HINT})"
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory; {fix}")
    classes = {}
    for split in FOLDER_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"--data-dir {root}: missing {split_dir}; {fix}")
        classes[split] = _class_dirs(split_dir)
        if not classes[split]:
            raise DataError(f"--data-dir {root}: no class folders in {split_dir}; {fix}")
        has_images = any(
            f.suffix.lower() in IMAGE_EXTENSIONS
            for c in classes[split]
            # Look at a few files per class only: fast on huge folders.
            for f in itertools.islice((split_dir / c).iterdir(), 50)
        )
        if not has_images:
            raise DataError(f"--data-dir {root}: no images in the class folders of {split_dir}; "
                            f"{fix}")
    if classes["train"] != classes["test"]:
        raise DataError(
            f"--data-dir {root}: train and test have different class folders "
            f"({classes['train']} vs {classes['test']}); both need the same <class> names"
        )


def _to_uint8(image, label):
    # image_dataset_from_directory returns float32 pixels in [0, 255]; store them as uint8.
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return image, tf.cast(label, tf.int32)


def _fixed_subset(ds, size, cap, seed):
    """The same seeded random `cap` of the `size` elements of `ds` on every pass, in `ds`' order."""
    keep = np.zeros(size, dtype=bool)
    keep[np.random.default_rng(seed).choice(size, cap, replace=False)] = True
    keep = tf.constant(keep)
    ds = ds.enumerate().filter(lambda i, example: tf.gather(keep, i))
    # Known cardinality: Keras then knows the number of validation steps up front.
    ds = ds.apply(tf.data.experimental.assert_cardinality(cap))
    return ds.map(lambda i, example: example)


def load_image_folder(data_dir, image_size=32, train_examples=None, test_examples=None, seed=0):
    """Reads `data_dir/train/<class>/*` and `data_dir/test/<class>/*` with Keras.

    Uses `keras.utils.image_dataset_from_directory`: class names are the sorted folder names (for
    CIFAR-10 the standard label order), images are decoded as RGB and resized to
    `(image_size, image_size)` if they are not already that size.

    Args:
        data_dir: str or path-like. Root of the tree.
        image_size: int. Side of the square images.
        train_examples: int or None. Cap on training examples (a seeded random subset).
        test_examples: int or None. Cap on test examples (a seeded random subset, the same on every
            pass).
        seed: int. Seed of the file-order shuffle and of the subsets.

    Returns:
        `Datasets`.

    Raises:
        DataError: if the layout is wrong (names `--data-dir` and the expected layout).
    """
    root = pathlib.Path(data_dir).expanduser()
    _check_folder_layout(root)
    splits, counts = {}, {}
    class_names = None
    for split, cap in (("train", train_examples), ("test", test_examples)):
        is_train = split == "train"
        try:
            ds = keras.utils.image_dataset_from_directory(
                root / split,
                labels="inferred",
                label_mode="int",
                color_mode="rgb",
                batch_size=None,
                image_size=(image_size, image_size),
                # Train: Keras shuffles the file list once (seeded), then file paths in a
                # 1024-element buffer every pass, so batches and a capped subset mix all classes.
                # Test: the sorted file order, identical on every pass.
                shuffle=is_train,
                seed=seed if is_train else None,
                verbose=False,
            )
        except ValueError as e:
            raise DataError(f"--data-dir {root}: {str(e).splitlines()[0]}") from None
        if class_names is None:
            class_names = list(ds.class_names)
        n = len(ds.file_paths)
        if cap is not None and cap < n:
            if is_train:
                ds = ds.take(cap)
            else:
                ds = _fixed_subset(ds, n, cap, seed)
            n = cap
        splits[split] = ds.map(_to_uint8, num_parallel_calls=tf.data.AUTOTUNE)
        counts[split] = n
    return Datasets(
        train=splits["train"],
        test=splits["test"],
        num_train=counts["train"],
        num_test=counts["test"],
        image_shape=(image_size, image_size, 3),
        class_names=class_names,
        source=f"folder:{root}",
    )


def network_available(url="https://storage.googleapis.com/", timeout=3.0):
    """Whether `url` answers within `timeout` seconds (any HTTP status counts as an answer).

    Honours the usual proxy environment variables. Used to fail fast instead of letting TFDS retry a
    download for minutes.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def load_tfds(name="cifar10", tfds_data_dir=None, train_examples=None, test_examples=None, seed=0):
    """Loads a supervised image dataset from TensorFlow Datasets, downloading it if needed.

    The test split is `test`, or `validation` if there is no `test`.

    Args:
        name: str. TFDS name, e.g. `"cifar10"`, `"cifar100"`.
        tfds_data_dir: str or None. TFDS storage directory (TFDS' default if None).
        train_examples: int or None. Cap on training examples (first examples after file shuffle).
        test_examples: int or None. Cap on test examples.
        seed: int. Seed of the file shuffle.

    Returns:
        `Datasets`.

    Raises:
        DataError: unknown name, not an (image, label) dataset, or not prepared and no network.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"--dataset {name}: no such TFDS dataset (see "
            "https://www.tensorflow.org/datasets/catalog/overview), or use --data-dir DIR for an "
            "image folder"
        ) from None
    features = builder.info.features
    keys = builder.info.supervised_keys
    if (
        not keys
        or len(keys) != 2
        or not isinstance(features[keys[0]], tfds.features.Image)
        or not isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise DataError(
            f"--dataset {name}: not an (image, class label) dataset; pick an image classification "
            "dataset such as cifar10 or cifar100, or use --data-dir DIR"
        )
    image_shape = tuple(features[keys[0]].shape)
    if None in image_shape:
        raise DataError(
            f"--dataset {name}: images have variable size {image_shape}; this trainer needs "
            "fixed-size images (e.g. cifar10, cifar100), or use --data-dir DIR (resizes)"
        )
    if not builder.is_prepared():
        if not network_available():
            raise DataError(
                f"--dataset {name}: not downloaded yet and there is no network; give data with "
                f"--data-dir DIR instead, e.g. {ARCHIVE_HINT}"
            )
        builder.download_and_prepare()
    splits = builder.info.splits
    test_split = "test" if "test" in splits else "validation"
    if "train" not in splits or test_split not in splits:
        raise DataError(f"--dataset {name}: needs train and test (or validation) splits; "
                        f"has {sorted(splits)}")
    datasets, counts = {}, {}
    wanted = (("train", "train", train_examples), ("test", test_split, test_examples))
    for key, split, cap in wanted:
        n = splits[split].num_examples
        if cap is not None and cap < n:
            n = cap
            split = f"{split}[:{n}]"
        ds = builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=key == "train",
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
        datasets[key] = ds.map(lambda x, y: (x, tf.cast(y, tf.int32)),
                               num_parallel_calls=tf.data.AUTOTUNE)
        counts[key] = n
    return Datasets(
        train=datasets["train"],
        test=datasets["test"],
        num_train=counts["train"],
        num_test=counts["test"],
        image_shape=image_shape,
        class_names=list(features[keys[1]].names),
        source=f"tfds:{name}",
    )


def augment_cifar(image, label, padding=4):
    """The paper's CIFAR augmentation: zero-pad by `padding`, random crop back, random flip.

    Args:
        image: `uint8` or `float32` tensor `(H, W, C)`.
        label: passed through.
        padding: int. Pixels of zero padding on each side. Defaults to 4.

    Returns:
        `(image, label)` with `image` of the same shape and dtype.
    """
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.random_crop(padded, shape)
    image = tf.image.random_flip_left_right(image)
    return image, label


def _to_float(image, label):
    return tf.cast(image, tf.float32), label


def _fits_in_memory(num_examples, image_shape, cache_limit_bytes):
    return num_examples * math.prod(image_shape) <= cache_limit_bytes


def train_pipeline(ds, batch_size, num_examples, image_shape, augment=True, seed=0,
                   cache_limit_bytes=2 * 2**30):
    """Infinite, shuffled, augmented batches for `model.fit(..., steps_per_epoch=...)`.

    Args:
        ds: unbatched `(uint8 (H, W, C), int32 ())` dataset (`Datasets.train`).
        batch_size: int.
        num_examples: int. Size of `ds`.
        image_shape: tuple `(H, W, C)`.
        augment: bool. Apply `augment_cifar`.
        seed: int. Shuffle seed.
        cache_limit_bytes: int. Cache `uint8` images in memory (and shuffle all of them every
            epoch) when they take at most this many bytes.

    Returns:
        `tf.data.Dataset` of `(float32 (batch_size, H, W, C) in [0, 255], int32 (batch_size,))`;
        incomplete final batches are dropped (static shapes).
    """
    if _fits_in_memory(num_examples, image_shape, cache_limit_bytes):
        ds = ds.cache().shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = ds.shuffle(min(num_examples, SHUFFLE_BUFFER_UNCACHED), seed=seed,
                        reshuffle_each_iteration=True)
    ds = ds.repeat()
    if augment:
        ds = ds.map(augment_cifar, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(ds, batch_size, num_examples, image_shape, cache_limit_bytes=2 * 2**30):
    """Finite batches of the test split, every example exactly once, in a fixed order.

    Args:
        ds: unbatched `(uint8 (H, W, C), int32 ())` dataset (`Datasets.test`).
        batch_size: int.
        num_examples: int. Size of `ds`.
        image_shape: tuple `(H, W, C)`.
        cache_limit_bytes: int. Cache the `uint8` batches in memory when they fit.

    Returns:
        `tf.data.Dataset` of `(float32 (<=batch_size, H, W, C) in [0, 255], int32 (<=batch_size,))`.
    """
    ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    if _fits_in_memory(num_examples, image_shape, cache_limit_bytes):
        ds = ds.cache()
    return ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def num_steps(num_examples, batch_size):
    """Number of full batches in one pass (at least 1)."""
    return max(1, num_examples // batch_size)
