"""Fixtures of the training tests built from the real CIFAR-10 images (see tests/conftest.py)."""

import pytest
import tensorflow as tf


@pytest.fixture
def mixed_size_jpegs(cifar10_small_dir, tmp_path):
    """Real CIFAR-10 photos re-encoded as JPEGs of several sizes and aspect ratios."""
    root = tmp_path / "imagenet_like"
    sizes = [(40, 56), (64, 48), (33, 33), (80, 100)]
    for split, per_class in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            files = sorted((cifar10_small_dir / split / label).glob("*.jpg"))[:per_class]
            for i, f in enumerate(files):
                image = tf.io.decode_jpeg(tf.io.read_file(str(f)))
                image = tf.cast(tf.image.resize(image, sizes[i % len(sizes)]), tf.uint8)
                (root / split / label / f"{i}.JPEG").write_bytes(tf.io.encode_jpeg(image).numpy())
    return root
