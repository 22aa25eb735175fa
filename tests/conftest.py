"""Shared pytest fixtures: the real CIFAR-10 data (JPEG copy) from `../shared/data/`.

The archive (`cifar10-jpeg.tar.gz`, image-folder layout `train/<class>/*.jpg`, `test/<class>/*.jpg`)
sits next to the repository on the development and CI machines. Tests that need it skip, with the
reason, only where it is absent (a user's clone); set `TF_REVNET_CIFAR10_ARCHIVE` to point elsewhere.
"""

import os
import pathlib
import tarfile

import keras
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = pathlib.Path(
    os.environ.get(
        "TF_REVNET_CIFAR10_ARCHIVE", REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    )
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


# Fixtures of the one shared training run (tests/training/conftest.py, serving_fixtures.py).
_SHARED_RUN_FIXTURES = {"trained", "exported"}


def pytest_collection_modifyitems(config, items):
    """Groups tests for pytest-xdist (`-n auto --dist loadgroup`, pyproject's `addopts`): each
    test file on one worker (its module fixtures built once), and every test of the shared
    training run on the same worker (that run trained once)."""
    for item in items:
        shared = _SHARED_RUN_FIXTURES & set(getattr(item, "fixturenames", ()))
        group = "shared_training_run" if shared else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same Python, NumPy and TensorFlow seeds: results are repeatable."""
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def cifar10_archive():
    """Path of the CIFAR-10 JPEG archive; skips the test if it is absent."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"real-data test: CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    return CIFAR10_ARCHIVE


def _extract(archive, target, per_class=None):
    """Extracts `archive` into `target`; with `per_class`, only the first N files of each
    `<split>/<class>/` folder (one streaming pass over the archive, a few thousand files written).
    """
    counts = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if per_class is not None and member.isfile():
                key = parts[-3:-1]  # (split, class)
                limit = per_class.get(key[0], 0) if len(key) == 2 else 0
                if counts.get(key, 0) >= limit:
                    continue
                counts[key] = counts.get(key, 0) + 1
            tar.extract(member, target, filter="data")
    return target


@pytest.fixture(scope="session")
def cifar10_dir(cifar10_archive, tmp_path_factory):
    """All 60,000 CIFAR-10 images extracted once per session: `DIR/{train,test}/<class>/*.jpg`."""
    return _extract(cifar10_archive, tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar10_small_dir(cifar10_archive, tmp_path_factory):
    """A real CIFAR-10 subset in the same layout: 60 training and 20 test images per class
    (600 + 200 images), extracted once per session.
    """
    target = _extract(
        cifar10_archive, tmp_path_factory.mktemp("cifar10_small"), {"train": 60, "test": 20}
    )
    return target

