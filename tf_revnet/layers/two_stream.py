"""The contract of layers on RevNet's two-stream residual stream (x1, x2).

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1: the activations of a RevNet
are split on the channel axis into two halves x1 and x2 (the residual stream), and every unit maps
`(x1, x2)` to `(y1, y2)`. `TwoStreamLayer` is the one place that defines, for every such unit:

- the split axis (`axis`, default: last) and `split` / `merge` of a tensor into its halves;
- the residual-stream dtype (`stream_dtype`: the variable dtype of the layer's policy, float32 under
  `mixed_float16` / `mixed_bfloat16`, so that the additions of the stream are exact to float32; only the
  residual functions compute in low precision);
- the checks of an input (floating point, rank >= 2, even and known size on `axis`), with errors that
  name the parameter and the fix.

How `ReversibleSequence` runs a layer (stores its input, or rebuilds it from its output) is the layer's
unit (`reversible_unit()`, see `tf_revnet.layers.unit`): `ReversibleBlock` (invertible: Eq. 2),
`ReversibleBlockStack` (invertible: `depth` blocks of one structure with stacked weights, one loop) and
`StageTransition` (not invertible: changes the stride or the channels, so the sequence keeps its input
and recomputes it, Section 3.3).
"""

import keras
from keras import ops

from tf_revnet.layers.utils import is_float_dtype


class TwoStreamLayer(keras.layers.Layer):
    """Base class of layers on the two-stream residual stream (Section 3.1).

    Not used directly: see `ReversibleBlock` and `StageTransition`. Subclasses call
    `self.half_shape(input_shape)` in `build` and may use `split`, `merge` and `check_input`.

    Args:
        axis: int. The axis split into x1 and x2. Defaults to `-1` (channels of NHWC images, features
            of `(N, T, C)` sequences).
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: if `axis` is not an int, or the dtype policy is not floating point.
    """

    #: Whether `ReversibleSequence` can rebuild the layer's inputs from its outputs.
    invertible = False

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(f"`axis` must be an int. Received: axis={axis!r}")
        if not is_float_dtype(self.dtype_policy.variable_dtype):
            raise ValueError(
                f"Layer '{self.name}' needs a floating point dtype policy. "
                f"Received: dtype={self.dtype_policy.name!r}"
            )
        self.axis = axis

    @property
    def stream_dtype(self):
        """The residual stream's dtype: the policy's variable dtype (float32 under mixed precision)."""
        return self.dtype_policy.variable_dtype

    @property
    def input_dtype(self):
        return self.stream_dtype

    def split_axis(self, rank):
        """The non-negative split axis for inputs of `rank`."""
        return self.axis % rank

    def half_shape(self, input_shape):
        """Validates `input_shape` and returns the shape of one half.

        Raises:
            ValueError: if the rank is < 2, `axis` is out of range, or the size on `axis` is unknown or
                odd.
        """
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"Layer '{self.name}' expects inputs of rank >= 2 (e.g. NHWC images). "
                f"Received: input_shape={input_shape}"
            )
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"`axis`={self.axis} is out of range for inputs of rank {rank}. "
                f"Received: input_shape={input_shape}"
            )
        axis = self.split_axis(rank)
        size = input_shape[axis]
        if size is None or size % 2:
            raise ValueError(
                f"The size of the split axis (axis={self.axis}) must be known and even to split the "
                f"input into x1 and x2 of equal size. Received: input_shape={input_shape}. "
                "Fix: give the layer before the block an even number of channels."
            )
        return input_shape[:axis] + (size // 2,) + input_shape[axis + 1 :]

    def check_input(self, x):
        """Raises `ValueError` unless `x` is a floating point tensor; returns it."""
        if not is_float_dtype(x.dtype):
            raise ValueError(
                f"Layer '{self.name}' expects floating point inputs. Received: dtype="
                f"{keras.backend.standardize_dtype(x.dtype)}. "
                "Fix: cast the inputs, e.g. with keras.ops.cast(x, 'float32')."
            )
        return x

    def split(self, inputs):
        """Splits `inputs` on `axis` into the halves `(x1, x2)`."""
        return tuple(ops.split(inputs, 2, axis=self.axis))

    def merge(self, x1, x2):
        """Concatenates halves on `axis`; the inverse of `split`."""
        return ops.concatenate([x1, x2], axis=self.axis)

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config
