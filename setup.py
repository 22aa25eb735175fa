"""Installs the `tf_revnet` library (reversible residual networks for TensorFlow/Keras).

`training/` (data, recipes, command-line entry points) is deliberately not installed: run it from the
repository root as `python -m training.train`.
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "tf_revnet" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="tf_revnet",
    version=VERSION,
    description="Reversible residual networks (RevNet) with memory-flat exact backprop for Keras 3.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_revnet", "tf_revnet.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "tensorflow-datasets",
        # tensorflow-datasets imports it without declaring it (see NOTES: TFDS 4.9.10 + TF 2.21).
        "importlib_resources",
        "numpy",
        # TensorBoard logs of `python -m training.train`; training-curve and confusion-matrix PNGs.
        "tensorboard",
        "matplotlib",
    ],
    # tensorflow-serving-api: the gRPC client of docs/serving.md, run in its test. MkDocs,
    # mkdocstrings and pymdown-extensions: tests/test_docs.py builds the docs with `mkdocs build --strict`.
    # jax[cpu]: the JAX pass of the suite (tests/jax/, run by tests/test_jax_backend_run.py).
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff", "tensorflow-serving-api", "mkdocs>=1.6",
                 "mkdocstrings[python]>=0.26", "pymdown-extensions", "jax[cpu]"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
