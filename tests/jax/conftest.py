"""The JAX pass: these tests run only in a pytest process started with `KERAS_BACKEND=jax`.

Keras fixes its backend when it is first imported, so the TensorFlow run (the README's `pytest`)
ignores this folder and `tests/test_jax_backend_run.py` runs it in a second process. float64 needs
`jax_enable_x64`, set here before any array is made.
"""

import keras

if keras.backend.backend() != "jax":
    collect_ignore_glob = ["test_*.py"]
else:
    import jax

    jax.config.update("jax_enable_x64", True)
