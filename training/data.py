"""Input pipelines: image folders or TFDS, exact-resume data order, CIFAR and ImageNet augmentation.

A data source is loaded into a `Datasets` record of two `Split`s (train and test). A split is an
index: labels plus either the decoded images in memory (`uint8 (N, H, W, 3)`, the CIFAR-sized case)
or the file paths (`--recipe imagenet`: JPEGs of any size, decoded on the fly).

`train_dataset(split, ..., start_step)` then gives the batches of global steps
`start_step, start_step + 1, ...`: epoch `e` visits the examples in the order of a permutation drawn
from `(seed, e)` alone, and the augmentation of the example at position `j` of epoch `e` is drawn with
stateless random ops from `(seed, e, j)`. The batch of any step is therefore a pure function of the
seed and the step number, so a run resumed at step `k` sees exactly the batches an uninterrupted run
sees from step `k` on (this is what makes `python -m training.train` resume exactly; Keras'
`BackupAndRestore` restores weights and optimizer but not a `tf.data` iterator's position).
`eval_dataset` gives every test example once, in a fixed order.

Real folders: hidden files and folders (names starting with `.`, e.g. `.DS_Store`, `.git/`) and
files without an image extension are ignored, as `keras.utils.image_dataset_from_directory` does;
every listed file is decoded once at load time (`training.image_safety.decode_image(channels=3)`:
JPEG, PNG, GIF (first frame), BMP; grayscale and RGBA become RGB). Before decoding, each file's size
is read from its header: files over `max_image_pixels` (all frames of a GIF together; 100 million
by default), without pixels, or not one of the four formats are refused without being decoded and
listed with the reason in `Datasets.refused`; files that do not decode (truncated, corrupt) are
skipped and listed in `Datasets.skipped`. With `strict=True` either raises `DataError`.

Folder links inside a class folder are not followed (as `keras.utils.image_dataset_from_directory`
with its default `follow_links=False`): a link loop would list the same images again and again.
`follow_links=True` follows them, reading each folder once (a link back to a folder already read,
a loop, is skipped).

Errors are `training.errors.DataError`s that name this module's parameters (`data_dir`, `dataset`,
...); the command line writes them with its flags.

Example:

```python
datasets = data.load_image_folder("/tmp/cifar10", train_examples=512, test_examples=256)
train = data.train_dataset(datasets.train_split, batch_size=64, steps_per_epoch=8, seed=0)
images, labels = next(iter(train))  # float32 (64, 32, 32, 3) in [0, 255], int32 (64,)
```
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import urllib.error
import urllib.request

import numpy as np
import tensorflow as tf

from training import image_safety
from training.errors import DataError, Mention
from training.startup import quiet_stderr

__all__ = [
    "DataError",
    "Split",
    "Datasets",
    "ARCHIVE_HINT",
    "IMAGE_EXTENSIONS",
    "AUGMENTATIONS",
    "load",
    "load_image_folder",
    "list_image_folder",
    "load_tfds",
    "network_available",
    "augment_cifar",
    "random_resized_crop",
    "center_crop",
    "train_dataset",
    "eval_dataset",
    "num_steps",
]

# How to get data without network; the end of error messages (a list of reason parts).
ARCHIVE_HINT = (
    "Extract the CIFAR-10 copy with `mkdir -p /tmp/cifar10 && tar xzf "
    "../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10`, then read it with ",
    Mention("data_dir", "/tmp/cifar10"), ".",
)
# The extensions keras.utils.image_dataset_from_directory accepts.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# "cifar": pad 4, random crop, flip (the paper's CIFAR augmentation); "imagenet": random-resized
# crop and flip for training, resize and centre crop for evaluation.
AUGMENTATIONS = ("none", "cifar", "imagenet")
# ImageNet evaluation: resize the shorter side to 256 and crop the central 224 (scaled with size).
IMAGENET_RESIZE_RATIO = 256 / 224
MAX_REPORTED_FILES = 5



@dataclasses.dataclass(frozen=True)
class Split:
    """The examples of one split, as an index.

    Attributes:
        labels: int32 array `(N,)`.
        images: uint8 array `(N, H, W, 3)` of decoded images, or None (read from `paths`).
        paths: str array `(N,)` of image files, or None (in memory).
        max_image_pixels: int. The pixel budget of each file read from `paths` (see
            `training.image_safety.decode_image`).
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    max_image_pixels: int = image_safety.DEFAULT_MAX_IMAGE_PIXELS

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        """The examples at `indices` (int array), in that order."""
        return Split(
            labels=self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else self.paths[indices],
            max_image_pixels=self.max_image_pixels,
        )


@dataclasses.dataclass
class Datasets:
    """Train and test splits of one data source.

    Attributes:
        train_split: `Split`.
        test_split: `Split` (the test split, or the held-out part of train with
            `validation_split`).
        image_shape: tuple `(H, W, 3)` of the in-memory images, or None (files of any size).
        class_names: list of str, index = label.
        source: str. Human-readable origin, e.g. `tfds:cifar10` or `folder:/tmp/cifar10`.
        skipped: tuple of str. Files that did not decode and were left out.
        refused: tuple of str. Files refused before decoding and left out, each as
            `"<path>: <reason>"`, e.g. `"/d/train/cat/x.png: 20000 x 20000 pixels x 1 frame =
            400000000 pixels, over the limit of 100000000 pixels (max_image_pixels); refused
            before decoding"`.
        test_name: str. `"test"`, `"validation"` (TFDS) or `"validation split 0.1 of train"`.
    """

    train_split: Split
    test_split: Split
    image_shape: tuple | None
    class_names: list
    source: str
    skipped: tuple = ()
    test_name: str = "test"
    refused: tuple = ()

    @property
    def num_train(self):
        return len(self.train_split)

    @property
    def num_test(self):
        return len(self.test_split)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def train(self):
        """Unbatched `(uint8 (H, W, 3), int32 ())` training examples in index order."""
        return _examples(self.train_split)

    @property
    def test(self):
        """Unbatched `(uint8 (H, W, 3), int32 ())` test examples in index order."""
        return _examples(self.test_split)


def _decode(contents, max_pixels, name="image"):
    """JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3): grayscale and RGBA become RGB, GIF frame 1;
    refused (InvalidArgumentError) before decoding above `max_pixels`."""
    return image_safety.decode_image(contents, max_pixels, channels=3, name=name)


def _resize_uint8(image, size):
    if size is None:
        return image
    shape = tf.shape(image)
    return tf.cond(
        tf.logical_and(shape[0] == size, shape[1] == size),
        lambda: image,
        lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, (size, size))), 0, 255),
                        tf.uint8),
    )


def _examples(split):
    indices = tf.data.Dataset.range(len(split))
    return indices.map(_loader(split, None), num_parallel_calls=tf.data.AUTOTUNE)


def _loader(split, size):
    """index -> (uint8 image, int32 label), from memory or by reading the file."""
    labels = tf.constant(split.labels, tf.int32)
    if split.images is not None:
        images = tf.constant(split.images)

        def load(i):
            return tf.gather(images, i), tf.gather(labels, i)
    else:
        paths = tf.constant(split.paths)

        def load(i):
            path = tf.gather(paths, i)
            image = _decode(tf.io.read_file(path), split.max_image_pixels, name=path)
            return _resize_uint8(image, size), tf.gather(labels, i)
    return load


def load(dataset="cifar10", data_dir=None, tfds_data_dir=None, image_size=32, in_memory=True,
         train_examples=None, test_examples=None, seed=0, validation_split=None, strict=False,
         max_image_pixels=image_safety.DEFAULT_MAX_IMAGE_PIXELS, follow_links=False,
         progress=None):
    """Loads the training and test splits from an image folder (if `data_dir`) or from TFDS.

    Args:
        dataset: str. TFDS name, used when `data_dir` is None. Defaults to `"cifar10"`.
        data_dir: str or None. Image-folder root (see `load_image_folder`).
        tfds_data_dir: str or None. TFDS storage directory (TFDS' default if None).
        image_size: int. Side of the square images kept in memory (folders only).
        in_memory: bool. Decode the folder's images into memory (resized to `image_size`), or
            keep file paths and decode on the fly (images of any size). TFDS: always in memory.
        train_examples: int or None. Keep a seeded random subset of this many training examples.
        test_examples: int or None. Same for the test split.
        seed: int. Seed of the subsets and of `validation_split`.
        validation_split: float in (0, 1) or None. Folders without `test/`: hold out this
            fraction of `train/`.
        strict: bool. Raise on the first file that does not decode instead of skipping it.
        max_image_pixels: int. Folders only: refuse files whose header announces more pixels
            (see `load_image_folder`).
        follow_links: bool. Folders only: follow folder links inside class folders.
        progress: callable `progress(split, done, total)` or None. Folders only: called while
            the files are decoded (e.g. a progress bar).

    Returns:
        `Datasets`.

    Raises:
        DataError: unknown TFDS name, bad folder layout, undecodable or refused file with
            `strict`, or no data offline.
    """
    if data_dir is not None:
        return load_image_folder(data_dir, image_size=image_size, in_memory=in_memory,
                                 train_examples=train_examples, test_examples=test_examples,
                                 seed=seed, validation_split=validation_split, strict=strict,
                                 max_image_pixels=max_image_pixels, follow_links=follow_links,
                                 progress=progress)
    if validation_split is not None:
        raise DataError("validation_split", validation_split,
                        "only for image folders without test/ (TFDS data sets have a test split)")
    return load_tfds(dataset, tfds_data_dir=tfds_data_dir, train_examples=train_examples,
                     test_examples=test_examples, seed=seed)


def _visible(name):
    return not name.startswith(".")


def _list_class(class_dir, follow_links=False):
    """Image files under `class_dir` (recursively, as Keras reads sub-folders), sorted.

    With `follow_links`, folder links are followed, each folder (by device and inode) once.
    """
    files, seen = [], set()
    for parent, dirs, names in os.walk(class_dir, followlinks=follow_links):
        if follow_links:
            identity = (os.stat(parent).st_dev, os.stat(parent).st_ino)
            if identity in seen:  # a loop, or a second link to a folder already read
                dirs[:] = []
                continue
            seen.add(identity)
        dirs[:] = sorted(d for d in dirs if _visible(d))
        files.extend(
            os.path.join(parent, n) for n in sorted(names)
            if _visible(n) and n.lower().endswith(IMAGE_EXTENSIONS)
        )
    return files


def list_image_folder(split_dir, parameter="data_dir", follow_links=False):
    """Lists `split_dir/<class>/...` image files like `keras.utils.image_dataset_from_directory`.

    Hidden files and folders (`.DS_Store`, `.git/`, `._x.jpg`) and files without an image
    extension are ignored; sub-folders of a class folder are read, folder links inside it only
    with `follow_links` (each folder once, so a link loop is read once).

    Args:
        split_dir: path-like. Folder of class folders.
        parameter: str. Parameter name used in errors.
        follow_links: bool. Follow folder links inside the class folders.

    Returns:
        `(class_names, files)`: sorted class names and a dict class name -> sorted list of paths.

    Raises:
        DataError: if there are no class folders, or a class folder holds no image (named).
    """
    split_dir = pathlib.Path(split_dir)
    class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p.name))
    if not class_names:
        raise DataError(parameter, split_dir.parent,
                        f"no class folders in {split_dir}; expected DIR/train/<class>/*.jpg")
    files = {name: _list_class(split_dir / name, follow_links) for name in class_names}
    empty = [name for name in class_names if not files[name]]
    if empty:
        raise DataError(
            parameter, split_dir.parent,
            f"class folder{'s' if len(empty) > 1 else ''} without images in {split_dir}: "
            f"{', '.join(empty[:MAX_REPORTED_FILES])}{' ...' if len(empty) > 5 else ''} "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder",
        )
    return class_names, files


def _decode_scan(paths, size, keep_images, max_pixels, progress=None):
    """Decodes every file once. Returns (uint8 images or None, boolean ok mask).

    `progress(done, total)` is called after each chunk of 1,024 files (None: nothing).
    """
    ds = tf.data.Dataset.from_tensor_slices((paths, np.arange(len(paths))))

    def decode(path, i):
        image = _decode(tf.io.read_file(path), max_pixels, name=path)
        if keep_images:
            return _resize_uint8(image, size), i
        return tf.zeros([0], tf.uint8), i

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(1024)
    ok = np.zeros(len(paths), dtype=bool)
    chunks = []
    with quiet_stderr():
        for done, (images, indices) in enumerate(ds.as_numpy_iterator(), 1):
            ok[indices] = True
            if progress is not None:
                progress(min(done * 1024, len(paths)), len(paths))
            if keep_images:
                chunks.append(images)
    if not keep_images:
        return None, ok
    images = np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)
    return images, ok


def _refusal(path, max_pixels):
    """Why `path` was refused before decoding (`"<path>: <reason>"`), or None if its header passes
    the checks (it failed in the decoder)."""
    try:
        contents = pathlib.Path(path).read_bytes()
    except OSError:
        return None
    try:
        image_safety.check_image(contents, max_pixels, name=str(path))
    except tf.errors.InvalidArgumentError as e:
        return image_safety.refusal_reason(e)
    return None


def _subset_indices(n, cap, seed):
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _check_layout(root, validation_split):
    """Whether `root` has a `test/` folder; raises `DataError` for a layout it cannot read."""
    layout = ["expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg. ", *ARCHIVE_HINT]
    if not root.is_dir():
        raise DataError("data_dir", root, ["no such directory; ", *layout])
    if not (root / "train").is_dir():
        raise DataError("data_dir", root, [f"missing {root / 'train'}; ", *layout])
    has_test = (root / "test").is_dir()
    if validation_split is not None:
        if not 0 < validation_split < 1:
            raise DataError("validation_split", validation_split, "must be in (0, 1), e.g. 0.1")
        if has_test:
            raise DataError("validation_split", validation_split, [
                f"{root} has a test/ folder, which is the test split; drop ",
                Mention("validation_split"), " or move test/ away"])
    elif not has_test:
        raise DataError("data_dir", root, [
            f"missing {root / 'test'}; add DIR/test/<class>/* or hold out part of train with ",
            Mention("validation_split", 0.1), "; ", *layout])
    return has_test


def _list_splits(root, has_test, follow_links):
    """(class names, {split: {class: files}}) of the folder's train/ (and test/)."""
    class_names, train_files = list_image_folder(root / "train", follow_links=follow_links)
    split_files = {"train": train_files}
    if has_test:
        test_names, split_files["test"] = list_image_folder(root / "test",
                                                            follow_links=follow_links)
        if test_names != class_names:
            only_train = sorted(set(class_names) - set(test_names))
            only_test = sorted(set(test_names) - set(class_names))
            raise DataError(
                "data_dir", root,
                "train/ and test/ have different class folders (only in train: "
                f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}); "
                "both need the same <class> names",
            )
    return class_names, split_files


def _index(class_names, files):
    paths = np.array([p for name in class_names for p in files[name]])
    labels = np.array([i for i, name in enumerate(class_names) for _ in files[name]], np.int32)
    return paths, labels


def _hold_out(paths, labels, validation_split, seed, root):
    """(train paths, train labels, test paths, test labels): a seeded fraction held out."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = max(1, int(round(validation_split * len(paths))))
    if n_val >= len(paths):
        raise DataError("validation_split", validation_split,
                        f"leaves no training images of the {len(paths)} in {root / 'train'}")
    val, keep = np.sort(order[:n_val]), np.sort(order[n_val:])
    return paths[keep], labels[keep], paths[val], labels[val]


def _left_out(paths, ok, root, strict, max_image_pixels):
    """(skipped, refused) files of `paths` that did not decode; with `strict`, the first raises."""
    skipped, refused = [], []
    for path in paths[~ok].tolist():
        reason = _refusal(path, max_image_pixels)
        if strict and reason is not None:
            fix = (["raise the limit ", Mention("max_image_pixels", max_image_pixels), ", "]
                   if "over the limit" in reason else [])
            raise DataError("data_dir", root, [f"refused {reason}; remove it, ", *fix,
                                               "or skip bad files ", Mention("strict", False)])
        if strict:
            raise DataError("data_dir", root, [f"cannot decode {path} (truncated or not an "
                                               "image); remove it, or skip bad files ",
                                               Mention("strict", False)])
        (skipped if reason is None else refused).append(path if reason is None else reason)
    return skipped, refused


def load_image_folder(data_dir, image_size=32, in_memory=True, train_examples=None,
                      test_examples=None, seed=0, validation_split=None, strict=False,
                      max_image_pixels=image_safety.DEFAULT_MAX_IMAGE_PIXELS, follow_links=False,
                      progress=None):
    """Reads `data_dir/train/<class>/*` and `data_dir/test/<class>/*` (or a validation split).

    Labels follow the sorted class-folder names (for CIFAR-10 the standard label order). See the
    module docstring for hidden files, folder links, formats, refused and undecodable files.

    Args:
        data_dir: str or path-like. Root of the tree.
        image_size: int. Side of the square images kept in memory (`in_memory`); images of
            another size are resized (bilinear).
        in_memory: bool. Decode into memory, or keep paths (images of any size, decoded by the
            pipelines; every file is still decoded once here to find bad ones).
        train_examples: int or None. Cap on training examples (a seeded random subset).
        test_examples: int or None. Cap on test examples (a seeded random subset).
        seed: int. Seed of the subsets and of the validation split.
        validation_split: float in (0, 1) or None. Required when there is no `test/`: hold out
            this fraction of `train/` (a seeded random choice) as the test split.
        strict: bool. Raise `DataError` naming the first file that does not decode or is refused.
        max_image_pixels: int. Files whose header announces more pixels (all frames of a GIF
            together) are refused before decoding (`Datasets.refused`). Defaults to
            `training.image_safety.DEFAULT_MAX_IMAGE_PIXELS` (100 million).
        follow_links: bool. Follow folder links inside the class folders (each folder once).
        progress: callable `progress(split, done, total)` or None, called while decoding.

    Returns:
        `Datasets`.

    Raises:
        DataError: missing folders, empty class folders, different class folders in train and
            test, `validation_split` out of range or missing, `max_image_pixels` not a positive
            integer, undecodable or refused file with `strict`.
    """
    try:
        image_safety.check_max_image_pixels(max_image_pixels)
    except ValueError:
        raise DataError("max_image_pixels", max_image_pixels, "must be a positive integer, e.g. "
                        f"{image_safety.DEFAULT_MAX_IMAGE_PIXELS}") from None
    root = pathlib.Path(data_dir).expanduser()
    has_test = _check_layout(root, validation_split)
    class_names, split_files = _list_splits(root, has_test, follow_links)
    paths, labels = _index(class_names, split_files["train"])
    if has_test:
        test_paths, test_labels = _index(class_names, split_files["test"])
    else:
        paths, labels, test_paths, test_labels = _hold_out(paths, labels, validation_split,
                                                           seed, root)
    splits, skipped, refused = {}, [], []
    for name, (p, y, cap) in {"train": (paths, labels, train_examples),
                              "test": (test_paths, test_labels, test_examples)}.items():
        keep = _subset_indices(len(p), cap, seed)
        p, y = p[keep], y[keep]
        images, ok = _decode_scan(p, image_size, keep_images=in_memory,
                                  max_pixels=max_image_pixels,
                                  progress=progress and (lambda d, t, n=name: progress(n, d, t)))
        split_skipped, split_refused = _left_out(p, ok, root, strict, max_image_pixels)
        skipped, refused = skipped + split_skipped, refused + split_refused
        if not ok.any():
            raise DataError("data_dir", root, f"no decodable images in {root / name}")
        splits[name] = Split(labels=y[ok], images=images, paths=None if in_memory else p[ok],
                             max_image_pixels=max_image_pixels)
    return Datasets(
        train_split=splits["train"], test_split=splits["test"],
        image_shape=(image_size, image_size, 3) if in_memory else None,
        class_names=list(class_names), source=f"folder:{root}", skipped=tuple(skipped),
        test_name="test" if has_test else f"validation split {validation_split} of train",
        refused=tuple(refused),
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
    """Loads a fixed-size image-classification dataset from TensorFlow Datasets into memory.

    Downloads it if needed. The test split is `test`, or `validation` if there is no `test`.

    Args:
        name: str. TFDS name, e.g. `"cifar10"`, `"cifar100"`.
        tfds_data_dir: str or None. TFDS storage directory (TFDS' default if None).
        train_examples: int or None. Cap on training examples (a seeded random subset).
        test_examples: int or None. Cap on test examples.
        seed: int. Seed of the subsets.

    Returns:
        `Datasets`.

    Raises:
        DataError: unknown name, not an (image, label) dataset, variable image size, or not
            prepared and no network.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError("dataset", name, [
            "no such TFDS dataset (see https://www.tensorflow.org/datasets/catalog/overview); or "
            "read an image folder with ", Mention("data_dir", "DIR")]) from None
    features = builder.info.features
    keys = builder.info.supervised_keys
    if (
        not keys
        or len(keys) != 2
        or not isinstance(features[keys[0]], tfds.features.Image)
        or not isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise DataError("dataset", name, "not an (image, class label) dataset; pick an image "
                        "classification dataset such as cifar10 or cifar100")
    image_shape = tuple(features[keys[0]].shape)
    if None in image_shape:
        raise DataError(
            "dataset", name,
            f"images have variable size {image_shape}; this loader keeps fixed-size images in "
            "memory (e.g. cifar10, cifar100); read such data (e.g. ImageNet) as an image folder",
        )
    if not builder.is_prepared():
        if not network_available():
            where = tfds_data_dir or "the TFDS default directory"
            raise DataError("dataset", name, [
                f"not downloaded yet (looked in {where}), and there is no network to download "
                f"it. Read {name} from an image folder instead. ",
                *(ARCHIVE_HINT if name == "cifar10"
                  else ["Give its folder with ", Mention("data_dir", "DIR"), "."])])
        builder.download_and_prepare()
    splits = builder.info.splits
    test_split = "test" if "test" in splits else "validation"
    if "train" not in splits or test_split not in splits:
        raise DataError("dataset", name,
                        f"needs train and test (or validation) splits; has {sorted(splits)}")
    loaded = {}
    for key, split, cap in (("train", "train", train_examples), ("test", test_split, test_examples)):
        images, labels = tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True,
                                                          batch_size=-1))
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        keep = _subset_indices(len(labels), cap, seed)
        loaded[key] = Split(labels=labels[keep].astype(np.int32),
                            images=np.ascontiguousarray(images[keep, ..., :3]))
    return Datasets(
        train_split=loaded["train"],
        test_split=loaded["test"],
        image_shape=image_shape[:2] + (3,),
        class_names=list(features[keys[1]].names),
        source=f"tfds:{name}",
        test_name=test_split,
    )


def augment_cifar(image, seed, padding=4):
    """The paper's CIFAR augmentation: zero-pad by `padding`, random crop back, random flip.

    Stateless: the same `seed` gives the same result in any process.

    Args:
        image: `uint8` or `float32` tensor `(H, W, C)`.
        seed: int tensor of shape `(2,)`.
        padding: int. Pixels of zero padding on each side. Defaults to 4.

    Returns:
        A tensor of the same shape and dtype.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.stateless_random_crop(padded, shape, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def random_resized_crop(image, size, seed, area_range=(0.08, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3)):
    """Inception-style random-resized crop to `(size, size)` and random flip (ImageNet training).

    Args:
        image: uint8 tensor `(H, W, 3)` of any size.
        size: int. Output side (224 for ImageNet).
        seed: int tensor of shape `(2,)` (stateless).
        area_range: fractions of the image area the crop covers.
        aspect_ratio_range: width / height of the crop.

    Returns:
        uint8 tensor `(size, size, 3)`.
    """
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=box_seed,
        min_object_covered=0.1, aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, (size, size))
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def center_crop(image, size, resize_ratio=IMAGENET_RESIZE_RATIO):
    """Resizes the shorter side to `size * resize_ratio` and crops the central `(size, size)`.

    With `size=224` this is ImageNet's "resize 256, centre crop 224" evaluation.

    Args:
        image: uint8 tensor `(H, W, 3)` of any size.
        size: int. Output side.
        resize_ratio: float. Shorter side after resizing over `size`.

    Returns:
        uint8 tensor `(size, size, 3)`.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.round(size * resize_ratio) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.ensure_shape(image, (size, size, 3))
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _element_seed(seed, epoch, position, positions_per_epoch):
    return tf.stack([tf.cast(seed, tf.int64), epoch * positions_per_epoch + position])


def train_dataset(split, batch_size, steps_per_epoch, seed=0, augment="cifar", image_size=None,
                  start_step=0, end_step=None):
    """Training batches of global steps `start_step, ..., end_step - 1`, resumable exactly.

    Epoch `e` (steps `e * steps_per_epoch` to `(e + 1) * steps_per_epoch - 1`) reads the first
    `steps_per_epoch * batch_size` examples of a permutation of the split drawn from `(seed, e)`;
    the augmentation of position `j` of epoch `e` is drawn from `(seed, e, j)`. So the batch of a
    step does not depend on where the iteration started.

    Args:
        split: `Split` (`Datasets.train_split`).
        batch_size: int. Global batch size.
        steps_per_epoch: int. At most `len(split) // batch_size`.
        seed: int.
        augment: str. One of `AUGMENTATIONS`.
        image_size: int. Output side for `"imagenet"` (random-resized crop) and for files read
            from `split.paths` without augmentation. Ignored for in-memory images otherwise.
        start_step: int. First global step.
        end_step: int or None. One past the last step (None: endless).

    Returns:
        `tf.data.Dataset` of `(float32 (batch_size, H, W, 3) in [0, 255], int32 (batch_size,))`.

    Raises:
        ValueError: if `steps_per_epoch * batch_size` exceeds the split, or `augment` is unknown.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"`augment` must be one of {AUGMENTATIONS}. Received: augment={augment}")
    n = len(split)
    per_epoch = steps_per_epoch * batch_size
    if per_epoch > n:
        raise ValueError(f"`steps_per_epoch` * `batch_size` = {per_epoch} exceeds the {n} "
                         "examples of the split")
    start_epoch, start_batch = divmod(start_step, steps_per_epoch)
    load = _loader(split, None if augment == "imagenet" else image_size)

    def epoch_positions(epoch):
        order = tf.argsort(tf.random.stateless_uniform(
            [n], seed=tf.stack([tf.cast(seed, tf.int64), epoch]), dtype=tf.float32))
        first = tf.where(epoch == start_epoch, start_batch * batch_size, 0)
        positions = tf.range(first, per_epoch, dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.gather(order[:per_epoch], positions), positions))
        return ds.map(lambda i, j: (i, epoch, j))

    end_epoch = None if end_step is None else -(-end_step // steps_per_epoch)
    epochs = tf.data.Dataset.range(start_epoch, end_epoch if end_epoch is not None else 2**62)
    ds = epochs.flat_map(epoch_positions)

    def element(i, epoch, j):
        image, label = load(i)
        element_seed = _element_seed(seed, epoch, j, per_epoch)
        if augment == "cifar":
            image = augment_cifar(image, element_seed)
        elif augment == "imagenet":
            image = random_resized_crop(image, image_size, element_seed)
        return image, label

    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if end_step is not None:
        ds = ds.take(end_step - start_step)
    return ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_dataset(split, batch_size, augment="cifar", image_size=None):
    """Every example of `split` once, in index order, preprocessed for evaluation.

    Args:
        split: `Split`.
        batch_size: int.
        augment: str. `"imagenet"`: resize and centre crop to `image_size` (see `center_crop`);
            otherwise images are used as they are (files resized to `image_size`).
        image_size: int or None.

    Returns:
        `tf.data.Dataset` of `(float32 (<=batch_size, H, W, 3) in [0, 255], int32 (<=batch_size,))`.
    """
    load = _loader(split, None if augment == "imagenet" else image_size)

    def element(i):
        image, label = load(i)
        if augment == "imagenet":
            image = center_crop(image, image_size)
        return image, label

    ds = tf.data.Dataset.range(len(split)).map(element, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size)
    return ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _to_float(image, label):
    return tf.cast(image, tf.float32), label


def num_steps(num_examples, batch_size):
    """Number of full batches in one pass (at least 1)."""
    return max(1, num_examples // batch_size)
