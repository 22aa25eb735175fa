"""A numerical check that a layer's `inverse` undoes its forward pass."""

import keras
import numpy as np


def is_invertible(layer, input_shape, atol=1e-5, training=False, seed=0):
    """Checks numerically that `layer.inverse(layer(x)) == x` on random normal inputs.

    Builds `layer` if needed, draws `x ~ N(0, 1)` of `input_shape` (unknown dimensions become 2), and
    compares `layer.inverse(layer(x, training), training)` with `x`. Inverses run side-effect free, so
    BatchNorm statistics and seed states are left as they were by the forward call.

    Args:
        layer: a Keras layer with an `inverse(outputs, training=None)` method, e.g.
            `tf_revnet.layers.ReversibleBlock` or `ReversibleSequence`.
        input_shape: tuple of int or None, e.g. `(None, 8, 8, 32)` (NHWC).
        atol: float. Largest absolute reconstruction error accepted. Defaults to `1e-5`.
        training: bool. Mode of the forward and inverse calls. Defaults to False. Note: with random
            layers (Dropout) in training mode the forward and inverse draw different values.
        seed: int. Seed of the random input. Defaults to 0.

    Returns:
        bool. True if every element is rebuilt within `atol`.

    Raises:
        ValueError: if `layer` has no `inverse` method, or `input_shape` is not a sequence of
            positive ints or None.

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 2.
    """
    if not callable(getattr(layer, "inverse", None)):
        raise ValueError(
            f"`layer` must have an `inverse(outputs)` method. Received: layer={layer!r}"
        )
    try:
        shape = tuple(2 if d is None else int(d) for d in input_shape)
    except TypeError:
        raise ValueError(
            f"`input_shape` must be a tuple of ints or None. Received: input_shape={input_shape!r}"
        ) from None
    if any(d <= 0 for d in shape):
        raise ValueError(
            f"`input_shape` must hold positive sizes. Received: input_shape={input_shape!r}"
        )
    dtype = keras.backend.standardize_dtype(layer.dtype_policy.variable_dtype)
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    x = keras.ops.convert_to_tensor(x)
    y = layer(x, training=training)
    x_rebuilt = layer.inverse(y, training=training)
    error = float(keras.ops.max(keras.ops.abs(x_rebuilt - x)))
    return error <= atol
