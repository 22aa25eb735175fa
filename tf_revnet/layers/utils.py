"""Private helpers shared by the layers of `tf_revnet.layers` (not public API)."""

import math
import operator

import keras

from tf_revnet.layers import backend

# The TensorFlow private symbols behind these live in `tf_revnet.layers.backend.tensorflow`
# (tests/layers/test_private_symbols.py fails if one moves or changes behaviour).
stop_recording = backend.stop_recording
higher_order_possible = backend.higher_order_possible


def is_float_dtype(dtype):
    """Whether `dtype` (a string, `tf.DType`, NumPy or Keras dtype) is a floating point type."""
    return "float" in keras.backend.standardize_dtype(dtype)


def check_positive_int(name, value, allow_none=False):
    """`value` as a Python int (any integer type, e.g. `np.int64`), or None if allowed.

    Raises:
        ValueError: naming `name`, unless `value` is a positive integer (bools are not).
    """
    if value is None and allow_none:
        return None
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None or index < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return index


def check_batch_norm_args(momentum, epsilon):
    """Raises `ValueError` for a BatchNorm momentum outside [0, 1) or a non-positive epsilon."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"`batch_norm_momentum` must be in [0, 1). Received: batch_norm_momentum={momentum}"
        )
    if not epsilon > 0.0:
        raise ValueError(
            f"`batch_norm_epsilon` must be positive. Received: batch_norm_epsilon={epsilon}"
        )


def default_kernel_initializer():
    """He et al. (2015) initialisation on the fan-out, truncated normal (the authors' code)."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="truncated_normal"
    )


def strided_shape(input_shape, strides, channels):
    """NHWC shape after a "same"-padded stride: `ceil(size / strides)`; `None` stays unknown."""

    def down(size):
        return None if size is None else math.ceil(size / strides)

    batch, height, width, _ = input_shape
    return (batch, down(height), down(width), channels)


def build_sublayer(layer, input_shape, dtype):
    """Builds `layer` as Keras' wrapper layers do and returns its symbolic output (a KerasTensor).

    Calling the layer on a `keras.KerasTensor` goes through `Layer._maybe_build`, which calls a custom
    `build()` or, for layers that define none, traces `call()` to create their state; calling `build()`
    directly makes Keras warn about layers without one.
    """
    return layer(keras.KerasTensor(tuple(input_shape), dtype=dtype))


def add_gradients(total, key, grad):
    """Adds `grad` into `total[key]` (a dict), summing where a variable is used more than once."""
    if grad is None:
        return
    total[key] = grad if key not in total else total[key] + grad


def global_seed_state(create=False):
    """The state variable of Keras' global `SeedGenerator` (unseeded `keras.random` calls), or None.

    With `create`, it is created outside any trace if it does not exist yet (`ReversibleSequence.build`
    does, so that its state can be replayed). Returns None where it does not exist, or cannot be created
    (inside a `tf.distribute` replica function after `keras.utils.set_random_seed` dropped it): unseeded
    `keras.random` calls cannot run there either.
    """
    # Keras exports no public accessor for it; `keras.random.*(seed=None)` draws from this generator.
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    generator = global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)
    if generator is not None:
        return generator.state
    if not create:
        return None
    try:
        with backend.init_scope():
            return seed_generator.global_seed_generator().state
    except (ValueError, RuntimeError):
        return None


def scoped_value(scope, variable, default):
    """`scope.get_current_value(variable)`, or `default` when `variable` is None."""
    return default if variable is None else scope.get_current_value(variable)


def strip_names(config):
    """A layer config without its (and its sublayers') names: equal for layers of one structure."""
    if isinstance(config, dict):
        return {k: strip_names(v) for k, v in config.items() if k not in ("name", "build_config")}
    if isinstance(config, (list, tuple)):
        return [strip_names(v) for v in config]
    return config
