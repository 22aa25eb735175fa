"""Quiet TensorFlow start-up for the command-line entry points (no TensorFlow import here).

TensorFlow 2.21 prints C++ log lines at import and at device initialization ("All log messages
before absl::InitializeLog() is called...", `cudart_stub.cc` "Could not find cuda drivers", the CPU
instruction notice, `failed call to cuInit` on machines without a GPU). `TF_CPP_MIN_LOG_LEVEL`
does not silence them (they are written before absl logging is initialized), so, as Keras users
expect of a command-line tool, `import_tensorflow_quietly` sets `TF_CPP_MIN_LOG_LEVEL=2` and the
absl Python verbosity, and imports TensorFlow and initializes its devices with file descriptor 2
redirected, then writes back every captured line that is not such start-up noise. Setting
`TF_CPP_MIN_LOG_LEVEL` yourself (e.g. to 0) turns the filter off.
"""

import contextlib
import os
import re
import sys
import tempfile

__all__ = ["quiet_stderr", "is_startup_noise", "import_tensorflow_quietly"]

# absl/glog-format lines ("I0000 00:00:1796059161.151648    3958 cudart_stub.cc:31] ...") and the
# lines TensorFlow prints around them at start-up.
_NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:"
    r"|Improper call to JPEG library"
    r"|(Premature end|Corrupt) (of )?JPEG)"
)


def is_startup_noise(line):
    """Whether `line` (one line of stderr) is TensorFlow start-up or libjpeg noise."""
    return bool(_NOISE.match(line))


@contextlib.contextmanager
def quiet_stderr(keep=lambda line: not is_startup_noise(line)):
    """Redirects file descriptor 2 (where C++ libraries write) to a temporary file.

    On exit the captured lines for which `keep(line)` is true are written back to stderr.

    Args:
        keep: callable str -> bool. Defaults to keeping all but start-up noise.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no stderr file descriptor
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines()
            shown = [line for line in lines if keep(line)]
            if shown:
                sys.stderr.write("\n".join(shown) + "\n")
                sys.stderr.flush()


def import_tensorflow_quietly():
    """Imports TensorFlow and initializes its devices without the start-up noise (see module).

    Does nothing special when the user set `TF_CPP_MIN_LOG_LEVEL` or TensorFlow is imported.

    Returns:
        The `tensorflow` module.

    Raises:
        SystemExit: with one line, under another Keras backend (`KERAS_BACKEND=jax`): the entry points
            need TensorFlow (tf.data pipelines, TensorFlow checkpoints, SavedModel export).
    """
    keras = sys.modules.get("keras")
    backend = keras.backend.backend() if keras else os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise SystemExit(
            f"python -m training: error: the training/ entry points need KERAS_BACKEND=tensorflow "
            f"(tf.data pipelines, TensorFlow checkpoints, SavedModel export); received "
            f"KERAS_BACKEND={backend!r}. On JAX, train tf_revnet's models with model.fit in a script."
        )
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with quiet_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # cuInit and the CUDA stubs log here
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    return tf
