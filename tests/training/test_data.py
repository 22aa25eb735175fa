"""Tests of training/data.py: image-folder loading, augmentation, batching."""

import numpy as np
import pytest
import tensorflow as tf

from training import data as data_lib


def test_image_folder_labels_follow_sorted_class_names(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, train_examples=100, test_examples=50)
    assert datasets.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck"]
    assert (datasets.num_train, datasets.num_test) == (100, 50)
    assert datasets.image_shape == (32, 32, 3)
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in datasets.train])
    assert len(images) == 100
    assert all(x.dtype == np.uint8 and x.shape == (32, 32, 3) for x in images)
    # A capped subset still mixes the classes (the file list is shuffled before the cap).
    assert len(set(labels)) >= 8
    # Real photos, not blank images: a wide range of pixel values.
    stacked = np.stack(images)
    assert stacked.min() < 20 and stacked.max() > 235 and 80 < stacked.mean() < 170


def test_image_folder_test_split_is_fixed(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=30, seed=3)
    first = [int(y) for _, y in datasets.test]
    second = [int(y) for _, y in datasets.test]
    assert first == second


def test_augment_cifar_is_a_shifted_crop_or_flip():
    image = tf.reshape(tf.range(32 * 32 * 3) % 251 + 1, (32, 32, 3))
    image = tf.cast(image, tf.uint8)
    original = image.numpy()
    seen_shift = seen_flip = False
    for _ in range(40):
        out, label = data_lib.augment_cifar(image, 7)
        out = out.numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and label == 7
        # Every output is a window of the zero-padded (and possibly flipped) original.
        found = False
        for candidate, flipped in ((original, False), (original[:, ::-1], True)):
            padded = np.pad(candidate, ((4, 4), (4, 4), (0, 0)))
            for dy in range(9):
                for dx in range(9):
                    if np.array_equal(padded[dy:dy + 32, dx:dx + 32], out):
                        found = True
                        seen_shift |= (dy, dx) != (4, 4)
                        seen_flip |= flipped
        assert found
    assert seen_shift and seen_flip


def test_train_pipeline_batches(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, train_examples=70)
    ds = data_lib.train_pipeline(datasets.train, batch_size=16, num_examples=70,
                                 image_shape=datasets.image_shape, augment=True, seed=1)
    batches = list(ds.take(10))  # infinite: more batches than one pass (70 // 16 = 4)
    for images, labels in batches:
        assert images.shape == (16, 32, 32, 3) and images.dtype == tf.float32
        assert labels.shape == (16,) and labels.dtype == tf.int32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0


def test_eval_pipeline_covers_every_example_once(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=50)
    ds = data_lib.eval_pipeline(datasets.test, batch_size=16, num_examples=50,
                                image_shape=datasets.image_shape)
    sizes = [int(labels.shape[0]) for _, labels in ds]
    assert sizes == [16, 16, 16, 2]
    reference = np.concatenate([labels.numpy() for _, labels in ds])
    assert reference.tolist() == [int(y) for _, y in datasets.test]


def test_uncached_pipeline_when_over_the_memory_limit(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, train_examples=40)
    ds = data_lib.train_pipeline(datasets.train, batch_size=8, num_examples=40,
                                 image_shape=datasets.image_shape, cache_limit_bytes=0)
    images, _ = next(iter(ds))
    assert images.shape == (8, 32, 32, 3)


@pytest.mark.parametrize("layout", ["missing", "flat_images", "different_classes"])
def test_bad_layouts_raise_data_error(layout, tmp_path):
    root = tmp_path / "data"
    if layout == "flat_images":
        for split in ("train", "test"):
            (root / split).mkdir(parents=True)
            (root / split / "0.jpg").write_bytes(b"")
    elif layout == "different_classes":
        for split, name in (("train", "cat"), ("test", "dog")):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.jpg").write_bytes(b"")
    with pytest.raises(data_lib.DataError, match="--data-dir") as error:
        data_lib.load_image_folder(root)
    assert "\n" not in str(error.value)


def test_unknown_tfds_name_raises_data_error():
    with pytest.raises(data_lib.DataError, match="--dataset no_such_dataset: no such TFDS"):
        data_lib.load_tfds("no_such_dataset")


def test_non_image_tfds_dataset_is_rejected(tmp_path):
    with pytest.raises(data_lib.DataError, match="not an \\(image, class label\\) dataset"):
        data_lib.load_tfds("imdb_reviews", tfds_data_dir=str(tmp_path))


def _register_tiny_tfds_dataset():
    """A small TFDS image-classification dataset generated locally (no download), registered once."""
    import tensorflow_datasets as tfds

    name = "tf_revnet_tiny_images"
    if name in tfds.list_builders():
        return name

    class TfRevnetTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30, 0), "test": self._generate_examples(12, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                label = i % 3
                # Class c has a mean brightness of about 60 * (c + 1): labels are recoverable.
                image = np.clip(rng.normal(60 * (label + 1), 5, (8, 8, 3)), 0, 255).astype(np.uint8)
                yield i, {"image": image, "label": label}

    assert TfRevnetTinyImages.name == name
    return name


def test_tfds_path_prepares_caps_and_labels(tmp_path, monkeypatch):
    name = _register_tiny_tfds_dataset()
    # Not prepared yet: the loader checks the network first, then prepares (locally generated here).
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: True)
    datasets = data_lib.load_tfds(name, tfds_data_dir=str(tmp_path), train_examples=20,
                                  test_examples=100)
    assert (datasets.num_train, datasets.num_test) == (20, 12)
    assert datasets.image_shape == (8, 8, 3) and datasets.class_names == ["a", "b", "c"]
    assert datasets.source == f"tfds:{name}"
    train = [(x.numpy(), int(y)) for x, y in datasets.train]
    assert len(train) == 20
    for image, label in train:
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
        assert abs(image.mean() - 60 * (label + 1)) < 10
    test_labels = [int(y) for _, y in datasets.test]
    assert test_labels == [int(y) for _, y in datasets.test]  # fixed order
    batch = next(iter(data_lib.train_pipeline(datasets.train, 4, 20, datasets.image_shape)))
    assert batch[0].shape == (4, 8, 8, 3) and batch[0].dtype == tf.float32

    # Prepared now: no network check needed any more.
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: pytest.fail("checked"))
    assert data_lib.load_tfds(name, tfds_data_dir=str(tmp_path)).num_train == 30
