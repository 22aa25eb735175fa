"""Tests of training/data.py: image folders as real folders hold them, TFDS, exact-resume pipelines."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tests.training import hostile_images as hostile
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
    # A capped subset is a seeded random choice over all classes.
    assert len(set(labels)) >= 8
    # Real photos, not blank images: a wide range of pixel values.
    stacked = np.stack(images)
    assert stacked.min() < 20 and stacked.max() > 235 and 80 < stacked.mean() < 170


def test_image_folder_test_split_is_fixed(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=30, seed=3)
    first = [int(y) for _, y in datasets.test]
    second = [int(y) for _, y in datasets.test]
    assert first == second


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
    with pytest.raises(data_lib.DataError, match="data_dir=") as error:
        data_lib.load_image_folder(root)
    assert "\n" not in str(error.value) and error.value.parameter == "data_dir"
    if layout == "different_classes":
        assert "only in train: cat; only in test: dog" in str(error.value)


def test_unknown_tfds_name_raises_data_error():
    with pytest.raises(data_lib.DataError, match="dataset=no_such_dataset: no such TFDS"):
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
    batch = next(iter(data_lib.train_dataset(datasets.train_split, 4, 5)))
    assert batch[0].shape == (4, 8, 8, 3) and batch[0].dtype == tf.float32

    # Prepared now: no network check needed any more.
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: pytest.fail("checked"))
    assert data_lib.load_tfds(name, tfds_data_dir=str(tmp_path)).num_train == 30


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_offline_tfds_names_the_dataset_asked_for(name, tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: False)
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load(dataset=name, tfds_data_dir=str(tmp_path / "tfds"))
    message = str(error.value)
    assert message.startswith(f"dataset={name}: not downloaded yet") and "\n" not in message
    assert "no network" in message and "data_dir=" in message
    # Only the CIFAR-10 message points at the CIFAR-10 copy.
    assert ("cifar10-jpeg.tar.gz" in message) == (name == "cifar10")


def _real_images(cifar10_small_dir, n):
    files = sorted((cifar10_small_dir / "test" / "cat").glob("*.jpg"))[:n]
    return [(f, tf.io.decode_jpeg(tf.io.read_file(str(f))).numpy()) for f in files]


@pytest.fixture
def messy_folder(cifar10_small_dir, tmp_path):
    """A folder of real CIFAR-10 photos as people's folders hold them: several formats and
    channel counts, a truncated JPEG, hidden files and folders."""
    root = tmp_path / "messy"
    images = _real_images(cifar10_small_dir, 8)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
    cat = root / "train" / "cat"
    (cat / "a.png").write_bytes(tf.io.encode_png(images[0][1]).numpy())
    _write_with_pil(cat / "b.bmp", images[1][1])  # Pillow comes with matplotlib
    _write_with_pil(cat / "c.gif", images[2][1])
    gray = tf.image.rgb_to_grayscale(images[3][1]).numpy()
    (cat / "d_gray.jpg").write_bytes(tf.io.encode_jpeg(gray).numpy())
    rgba = np.concatenate([images[4][1], np.full((32, 32, 1), 128, np.uint8)], axis=-1)
    (cat / "e_rgba.png").write_bytes(tf.io.encode_png(rgba).numpy())
    good = images[5][0].read_bytes()
    (cat / "f.jpg").write_bytes(good)
    (cat / "g_truncated.jpg").write_bytes(good[: len(good) // 2])
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._f.jpg").write_bytes(b"AppleDouble")  # macOS resource fork, hidden
    (root / "train" / ".git").mkdir()
    (root / "train" / ".git" / "x.jpg").write_bytes(good)  # a hidden folder is not a class
    (root / "train" / "dog" / ".hidden").mkdir()
    (root / "train" / "dog" / ".hidden" / "y.jpg").write_bytes(good)
    (root / "train" / "dog" / "h.jpg").write_bytes(images[6][0].read_bytes())
    for label in ("cat", "dog"):
        (root / "test" / label / "t.jpg").write_bytes(images[7][0].read_bytes())
    return root, images


def _write_with_pil(path, array):
    PIL = pytest.importorskip("PIL.Image")
    PIL.fromarray(array).save(path)


def test_messy_folder_skips_bad_and_hidden_files_and_converts_to_rgb(messy_folder):
    root, images = messy_folder
    datasets = data_lib.load_image_folder(root)
    assert datasets.class_names == ["cat", "dog"]
    # cat: png, bmp, gif, gray jpg, rgba png, good jpg; the truncated jpg skipped; dog: 1.
    assert (datasets.num_train, datasets.num_test) == (7, 2)
    assert datasets.skipped == (str(root / "train" / "cat" / "g_truncated.jpg"),)
    train = datasets.train_split
    assert train.images.shape == (7, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [0] * 6 + [1]
    # Lossless formats give back the decoded JPEG pixels exactly; alpha is dropped.
    np.testing.assert_array_equal(train.images[0], images[0][1])  # a.png
    np.testing.assert_array_equal(train.images[1], images[1][1])  # b.bmp
    np.testing.assert_array_equal(train.images[4], images[4][1])  # e_rgba.png
    gray = train.images[3]  # grayscale -> three equal channels
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    # The GIF keeps the photo (a palette image: close, not exact).
    assert np.abs(train.images[2].astype(int) - images[2][1]).mean() < 20


def test_strict_data_names_the_bad_file(messy_folder):
    root, _ = messy_folder
    with pytest.raises(data_lib.DataError, match="g_truncated.jpg") as error:
        data_lib.load_image_folder(root, strict=True)
    assert error.value.parameter == "data_dir" and "\n" not in str(error.value)


def test_bombs_are_refused_before_decoding_and_listed_with_the_reason(messy_folder):
    """Decompression bombs in a folder: refused from their headers (never decoded), left out and
    listed with their size and the limit; the other files load as before."""
    root, images = messy_folder
    cat = root / "train" / "cat"
    (cat / "y_bomb.png").write_bytes(hostile.png_of_zeros(20000, 20000))
    (cat / "z_bomb.gif").write_bytes(hostile.gif_of_zeros(2000, 2000, frames=100))
    datasets = data_lib.load_image_folder(root)
    assert (datasets.num_train, datasets.num_test) == (7, 2)
    assert datasets.skipped == (str(cat / "g_truncated.jpg"),)
    limit = "over the limit of 100000000 pixels (max_image_pixels); refused before decoding"
    assert datasets.refused == (
        f"{cat / 'y_bomb.png'}: 20000 x 20000 pixels x 1 frame = 400000000 pixels, {limit}",
        f"{cat / 'z_bomb.gif'}: 2000 x 2000 pixels x 100 frames = 400000000 pixels, {limit}")
    np.testing.assert_array_equal(datasets.train_split.images[0], images[0][1])  # a.png
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_image_folder(root, strict=True)
    assert "\n" not in str(error.value)
    # The truncated JPEG comes first in file order; without it, the bomb stops the load.
    (cat / "g_truncated.jpg").unlink()
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_image_folder(root, strict=True)
    assert error.value.reason == (
        f"refused {cat / 'y_bomb.png'}: 20000 x 20000 pixels x 1 frame = 400000000 pixels, "
        f"{limit}; remove it, raise the limit `max_image_pixels=100000000`, or skip bad files "
        "with `strict=False`")


def test_max_image_pixels_of_the_loader(mixed_size_jpegs, messy_folder):
    """Files of a folder read on the fly (ImageNet-style) keep the limit: sizes 40x56, 64x48,
    33x33 and 80x100 against a limit of 3000 pixels."""
    datasets = data_lib.load_image_folder(mixed_size_jpegs, in_memory=False,
                                          max_image_pixels=3000)
    refused = sorted(r.split(": ", 1)[1].split(" =")[0] for r in datasets.refused)
    # train: 2 classes x (64x48, 80x100); test: 2 classes x 64x48.
    assert refused == ["100 x 80 pixels x 1 frame"] * 2 + ["48 x 64 pixels x 1 frame"] * 4
    assert (datasets.num_train, datasets.num_test) == (4, 2)
    assert datasets.train_split.max_image_pixels == 3000
    batch, _ = next(iter(data_lib.eval_dataset(datasets.train_split, 4, augment="imagenet",
                                               image_size=24)))
    assert batch.shape == (4, 24, 24, 3)
    root, _ = messy_folder
    with pytest.raises(data_lib.DataError, match=f"no decodable images in {root / 'train'}"):
        data_lib.load_image_folder(root, max_image_pixels=32 * 32 - 1)
    with pytest.raises(data_lib.DataError, match="max_image_pixels=0: must be a positive integer"):
        data_lib.load_image_folder(root, max_image_pixels=0)


def test_empty_class_folder_is_named(messy_folder):
    root, _ = messy_folder
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(data_lib.DataError, match="class folder without images in .*: bird"):
        data_lib.load_image_folder(root)


def test_validation_split_without_test_folder(cifar10_small_dir, tmp_path):
    import shutil

    root = tmp_path / "only_train"
    shutil.copytree(cifar10_small_dir / "train", root / "train")
    with pytest.raises(data_lib.DataError, match="validation_split"):
        data_lib.load_image_folder(root)
    datasets = data_lib.load_image_folder(root, validation_split=0.1, seed=2)
    assert (datasets.num_train, datasets.num_test) == (540, 60)
    assert datasets.test_name == "validation split 0.1 of train"
    again = data_lib.load_image_folder(root, validation_split=0.1, seed=2)
    np.testing.assert_array_equal(datasets.test_split.images, again.test_split.images)
    # Held-out images are not among the training images.
    train = {x.tobytes() for x in datasets.train_split.images}
    assert not any(x.tobytes() in train for x in datasets.test_split.images)
    with pytest.raises(data_lib.DataError, match="has a test/ folder"):
        data_lib.load_image_folder(cifar10_small_dir, validation_split=0.1)


def test_train_dataset_started_at_any_step_gives_the_same_batches(cifar10_small_dir):
    split = data_lib.load_image_folder(cifar10_small_dir, train_examples=96).train_split
    full = [(x.numpy(), y.numpy()) for x, y in
            data_lib.train_dataset(split, 16, 3, seed=5, end_step=9)]
    assert len(full) == 9
    for start in (1, 3, 7):
        resumed = [(x.numpy(), y.numpy()) for x, y in
                   data_lib.train_dataset(split, 16, 3, seed=5, start_step=start, end_step=9)]
        assert len(resumed) == 9 - start
        for (x, y), (rx, ry) in zip(full[start:], resumed):
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)
    # Each epoch is a new order over all examples, and the augmentation differs between epochs.
    epoch0, epoch1 = np.concatenate([b[1] for b in full[:3]]), np.concatenate(
        [b[1] for b in full[3:6]])
    assert sorted(epoch0.tolist()) != epoch0.tolist() or epoch0.tolist() != epoch1.tolist()
    assert not np.array_equal(full[0][0], full[3][0])
    other_seed = next(iter(data_lib.train_dataset(split, 16, 3, seed=6)))
    assert not np.array_equal(other_seed[0].numpy(), full[0][0])


def test_augment_cifar_is_a_shifted_crop_or_flip():
    image = tf.cast(tf.reshape(tf.range(32 * 32 * 3) % 251 + 1, (32, 32, 3)), tf.uint8)
    original = image.numpy()
    seen_shift = seen_flip = False
    for i in range(40):
        out = data_lib.augment_cifar(image, tf.constant([3, i], tf.int64)).numpy()
        again = data_lib.augment_cifar(image, tf.constant([3, i], tf.int64)).numpy()
        np.testing.assert_array_equal(out, again)  # stateless: same seed, same result
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
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


def test_eval_dataset_covers_every_example_once_in_order(cifar10_small_dir):
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=50)
    ds = data_lib.eval_dataset(datasets.test_split, batch_size=16)
    sizes = [int(labels.shape[0]) for _, labels in ds]
    assert sizes == [16, 16, 16, 2]
    labels = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(labels, datasets.test_split.labels)


def test_imagenet_preprocessing_of_mixed_size_jpegs(mixed_size_jpegs):
    datasets = data_lib.load_image_folder(mixed_size_jpegs, in_memory=False)
    assert datasets.image_shape is None and datasets.train_split.images is None
    assert (datasets.num_train, datasets.num_test) == (8, 4)
    train = list(data_lib.train_dataset(datasets.train_split, 4, 2, seed=0, augment="imagenet",
                                        image_size=24, end_step=4))
    assert [x.shape for x, _ in train] == [(4, 24, 24, 3)] * 4
    assert all(0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255 for x, _ in train)
    again = list(data_lib.train_dataset(datasets.train_split, 4, 2, seed=0, augment="imagenet",
                                        image_size=24, start_step=2, end_step=4))
    np.testing.assert_array_equal(train[2][0].numpy(), again[0][0].numpy())
    test = list(data_lib.eval_dataset(datasets.test_split, 3, augment="imagenet", image_size=24))
    assert [x.shape[1:] for x, _ in test] == [(24, 24, 3)] * 2


def test_center_crop_is_resize_256_crop_224_scaled():
    # A 60x90 image: shorter side to round(28 * 256 / 224) = 32, then the central 28x28.
    image = tf.cast(tf.random.stateless_uniform((60, 90, 3), (1, 2), maxval=255), tf.uint8)
    out = data_lib.center_crop(image, 28).numpy()
    resized = tf.image.resize(image, (32, 48))
    expected = tf.cast(tf.clip_by_value(tf.round(resized[2:30, 10:38]), 0, 255), tf.uint8)
    np.testing.assert_array_equal(out, expected.numpy())


def test_folder_links_are_not_followed_unless_asked(cifar10_small_dir, tmp_path):
    """A link loop inside a class folder (`cat/loop -> cat`) and a link to another folder of
    images: not followed by default (as Keras' follow_links=False); with `follow_links=True`
    the linked folder is read, and each folder only once (the loop adds nothing)."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for f in sorted((cifar10_small_dir / split / label).glob("*.jpg"))[:2]:
                (root / split / label / f.name).write_bytes(f.read_bytes())
    extra = tmp_path / "more_cats"
    extra.mkdir()
    for f in sorted((cifar10_small_dir / "train" / "cat").glob("*.jpg"))[2:5]:
        (extra / f.name).write_bytes(f.read_bytes())
    (root / "train" / "cat" / "loop").symlink_to(root / "train" / "cat")
    (root / "train" / "cat" / "more").symlink_to(extra)
    (extra / "back").symlink_to(root / "train" / "cat")  # a loop through two links
    assert data_lib.load_image_folder(root).num_train == 4
    followed = data_lib.load_image_folder(root, follow_links=True)
    assert followed.num_train == 4 + 3
    names, files = data_lib.list_image_folder(root / "train", follow_links=True)
    assert len(files["cat"]) == len(set(map(os.path.realpath, files["cat"]))) == 5
