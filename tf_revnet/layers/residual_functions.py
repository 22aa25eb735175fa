"""Pre-activation residual functions: the F and G of a reversible block.

A residual function maps a tensor to the residual that a unit adds to its shortcut. RevNet uses the
pre-activation (BatchNorm, ReLU, convolution) functions of He et al. (2016) for both F and G
(Gomez et al., 2017, Section 3 and Table 1):

- `BasicResidualFunction`: BN-ReLU-Conv3x3, BN-ReLU-Conv3x3.
- `BottleneckResidualFunction`: BN-ReLU-Conv1x1, BN-ReLU-Conv3x3, BN-ReLU-Conv1x1, the inner width
  being a quarter of the output channels.

With `strides=1` and `filters=None` (or `filters` equal to the input channels) a residual function
keeps the shape of its input, as F and G of a `ReversibleBlock` must. With a stride or a channel
change it is the residual branch of a non-reversible `ResidualBlock`.
"""

import keras

from tf_revnet.layers.utils import (
    check_batch_norm_args,
    check_positive_int,
    default_kernel_initializer,
    strided_shape,
)

_BN_AXIS = -1


class _PreActivationResidualFunction(keras.layers.Layer):
    """Shared machinery of the pre-activation residual functions (not public).

    Subclasses define `_conv_specs(in_channels)`: a list of `(kernel_size, filters, strides)` for
    the convolutions in order; each convolution is preceded by BatchNorm and ReLU (the first pair
    only if `preactivate`).
    """

    _divisor = 1

    def __init__(
        self,
        filters=None,
        strides=1,
        preactivate=True,
        kernel_initializer=None,
        kernel_regularizer=None,
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        filters = check_positive_int("filters", filters, allow_none=True)
        if filters is not None and filters % self._divisor:
            raise ValueError(
                f"`filters` must be divisible by {self._divisor} for "
                f"{self.__class__.__name__}. Received: filters={filters}"
            )
        strides = check_positive_int("strides", strides)
        if not isinstance(preactivate, bool):
            raise ValueError(f"`preactivate` must be a bool. Received: preactivate={preactivate!r}")
        check_batch_norm_args(batch_norm_momentum, batch_norm_epsilon)
        self.filters = filters
        self.strides = strides
        self.preactivate = preactivate
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else default_kernel_initializer()
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.batch_norm_momentum = batch_norm_momentum
        self.batch_norm_epsilon = batch_norm_epsilon

    def _conv_specs(self, in_channels):
        raise NotImplementedError

    def _output_channels(self, in_channels):
        return self.filters if self.filters is not None else in_channels

    def build(self, input_shape):
        in_channels = input_shape[_BN_AXIS]
        if in_channels is None:
            raise ValueError(
                f"The channel dimension of the input to {self.__class__.__name__} must be known. "
                f"Received: input_shape={input_shape}"
            )
        out_channels = self._output_channels(in_channels)
        if out_channels % self._divisor:
            raise ValueError(
                f"The output channels of {self.__class__.__name__} must be divisible by "
                f"{self._divisor}; with `filters=None` they equal the input channels. "
                f"Received: input_shape={input_shape}, filters={self.filters}"
            )
        self.batch_norms = []
        self.convs = []
        shape = tuple(input_shape)
        for i, (kernel_size, filters, strides) in enumerate(self._conv_specs(in_channels), 1):
            if i > 1 or self.preactivate:
                bn = keras.layers.BatchNormalization(
                    axis=_BN_AXIS,
                    momentum=self.batch_norm_momentum,
                    epsilon=self.batch_norm_epsilon,
                    name=f"bn{i}",
                    dtype=self.dtype_policy,
                )
                bn.build(shape)
            else:
                bn = None
            conv = keras.layers.Conv2D(
                filters,
                kernel_size,
                strides=strides,
                padding="same",
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name=f"conv{i}",
                dtype=self.dtype_policy,
            )
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            self.batch_norms.append(bn)
            self.convs.append(conv)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for bn, conv in zip(self.batch_norms, self.convs):
            if bn is not None:
                x = bn(x, training=training)
                x = keras.ops.relu(x)
            x = conv(x)
        return x

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, self._output_channels(input_shape[-1]))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "preactivate": self.preactivate,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "batch_norm_momentum": self.batch_norm_momentum,
                "batch_norm_epsilon": self.batch_norm_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tf_revnet")
class BasicResidualFunction(_PreActivationResidualFunction):
    """Basic pre-activation residual function: two 3x3 convolutions.

    Computes `conv2(relu(bn2(conv1(relu(bn1(x))))))`, the residual branch of the pre-activation
    ResNet (He et al., 2016b) and the F and G of the paper's basic RevNets (RevNet-38, RevNet-110).
    The first convolution carries the stride and maps to `filters` channels; the second keeps the
    shape. Convolutions have no bias (BatchNorm follows each of them but the last, whose output is
    added to a shortcut).

    Args:
        filters: int or `None`. Output channels. `None` keeps the input channels (what F and G of a
            `ReversibleBlock` need). Defaults to `None`.
        strides: int. Stride of the first convolution (2 halves height and width, rounding up).
            Defaults to `1`.
        preactivate: bool. Whether BatchNorm and ReLU run before the first convolution. `False`
            skips them, as the authors' code does for the first unit after the stem (whose output is
            already normalised and rectified). Defaults to `True`.
        kernel_initializer: Initializer for the convolution kernels. Defaults to
            `VarianceScaling(2.0, "fan_out", "truncated_normal")`, the authors' initialisation.
        kernel_regularizer: Optional regularizer for the convolution kernels. Defaults to `None`.
        batch_norm_momentum: float. Momentum of the BatchNorm moving statistics. Defaults to `0.99`.
        batch_norm_epsilon: float. BatchNorm epsilon. Defaults to `1e-3`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 4D tensor.
        training: bool. Whether BatchNorm uses batch statistics (and updates its moving statistics).

    Input shape:
        4D tensor `(batch_size, height, width, channels)` (NHWC), any float dtype.

    Output shape:
        4D tensor `(batch_size, ceil(height / strides), ceil(width / strides), filters)`, with
        `filters = channels` when `filters=None`; the layer's compute dtype.

    Raises:
        ValueError: if `filters` or `strides` is not a positive integer, `preactivate` not a bool,
            or the channel dimension of the input is unknown when the layer is built.

    Examples:
        >>> f = BasicResidualFunction()
        >>> keras.ops.shape(f(keras.ops.ones((2, 8, 8, 16))))
        (2, 8, 8, 16)
        >>> keras.ops.shape(BasicResidualFunction(filters=32, strides=2)(keras.ops.ones((2, 8, 8, 16))))
        (2, 4, 4, 32)

    References:
        - Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
          Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3.1 and Table 1.
        - He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
    """

    def _conv_specs(self, in_channels):
        out_channels = self._output_channels(in_channels)
        return [(3, out_channels, self.strides), (3, out_channels, 1)]


@keras.saving.register_keras_serializable(package="tf_revnet")
class BottleneckResidualFunction(_PreActivationResidualFunction):
    """Bottleneck pre-activation residual function: 1x1, 3x3 and 1x1 convolutions.

    Computes `conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))`: `conv1` (1x1, carrying the
    stride, as in the authors' code) reduces to `filters // 4` channels, `conv2` (3x3) keeps them
    and `conv3` (1x1) expands to `filters`. It is the residual branch of the pre-activation
    bottleneck ResNet (ResNet-164, ResNet-101) and the F and G of the paper's bottleneck RevNets
    (RevNet-164, RevNet-104). Convolutions have no bias.

    Args:
        filters: int or `None`. Output channels, a multiple of 4; the inner (bottleneck) width is
            `filters // 4`. `None` keeps the input channels (what F and G of a `ReversibleBlock`
            need). Defaults to `None`.
        strides: int. Stride of the first (1x1) convolution. Defaults to `1`.
        preactivate: bool. Whether BatchNorm and ReLU run before the first convolution. `False`
            skips them (the first unit after the stem in the authors' code). Defaults to `True`.
        kernel_initializer: Initializer for the convolution kernels. Defaults to
            `VarianceScaling(2.0, "fan_out", "truncated_normal")`, the authors' initialisation.
        kernel_regularizer: Optional regularizer for the convolution kernels. Defaults to `None`.
        batch_norm_momentum: float. Momentum of the BatchNorm moving statistics. Defaults to `0.99`.
        batch_norm_epsilon: float. BatchNorm epsilon. Defaults to `1e-3`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A 4D tensor.
        training: bool. Whether BatchNorm uses batch statistics (and updates its moving statistics).

    Input shape:
        4D tensor `(batch_size, height, width, channels)` (NHWC), any float dtype.

    Output shape:
        4D tensor `(batch_size, ceil(height / strides), ceil(width / strides), filters)`, with
        `filters = channels` when `filters=None`; the layer's compute dtype.

    Raises:
        ValueError: if `filters` is not a positive multiple of 4 (with `filters=None`: if the input
            channels are not), `strides` not a positive integer or `preactivate` not a bool.

    Examples:
        >>> g = BottleneckResidualFunction()
        >>> keras.ops.shape(g(keras.ops.ones((2, 8, 8, 64))))
        (2, 8, 8, 64)

    References:
        - Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
          Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3.1 and Table 1.
        - He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
    """

    _divisor = 4

    def _conv_specs(self, in_channels):
        out_channels = self._output_channels(in_channels)
        inner = out_channels // 4
        return [(1, inner, self.strides), (3, inner, 1), (1, out_channels, 1)]


RESIDUAL_FUNCTIONS = {
    "basic": BasicResidualFunction,
    "bottleneck": BottleneckResidualFunction,
}


def make_residual_function(
    kind, filters=None, strides=1, preactivate=True, kernel_initializer=None,
    kernel_regularizer=None, batch_norm_momentum=0.99, batch_norm_epsilon=1e-3, name=None, dtype=None,
):
    """Instantiates the residual function `kind` (`"basic"` or `"bottleneck"`) with these arguments.

    Raises:
        ValueError: if `kind` is unknown, naming the known kinds.
    """
    if kind not in RESIDUAL_FUNCTIONS:
        raise ValueError(
            f"`residual_function` must be one of {sorted(RESIDUAL_FUNCTIONS)}. "
            f"Received: residual_function={kind!r}"
        )
    return RESIDUAL_FUNCTIONS[kind](
        filters=filters, strides=strides, preactivate=preactivate,
        kernel_initializer=kernel_initializer, kernel_regularizer=kernel_regularizer,
        batch_norm_momentum=batch_norm_momentum, batch_norm_epsilon=batch_norm_epsilon,
        name=name, dtype=dtype,
    )


def init_unit_args(
    layer, filters, residual_function, strides, preactivate, shortcut, kernel_initializer,
    kernel_regularizer, batch_norm_momentum, batch_norm_epsilon,
):
    """Validates and stores the arguments shared by `ResidualBlock` and `StageTransition`.

    Raises:
        ValueError: naming the argument and the received value.
    """
    from tf_revnet.layers.shortcut import SHORTCUTS

    filters = check_positive_int("filters", filters)
    if residual_function not in RESIDUAL_FUNCTIONS:
        raise ValueError(
            f"`residual_function` must be one of {sorted(RESIDUAL_FUNCTIONS)}. "
            f"Received: residual_function={residual_function!r}"
        )
    strides = check_positive_int("strides", strides)
    if not isinstance(preactivate, bool):
        raise ValueError(f"`preactivate` must be a bool. Received: preactivate={preactivate!r}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"`shortcut` must be one of {SHORTCUTS}. Received: shortcut={shortcut!r}")
    check_batch_norm_args(batch_norm_momentum, batch_norm_epsilon)
    layer.filters = filters
    layer.residual_function = residual_function
    layer.strides = strides
    layer.preactivate = preactivate
    layer.shortcut = shortcut
    layer.kernel_initializer = keras.initializers.get(
        kernel_initializer if kernel_initializer is not None else default_kernel_initializer()
    )
    layer.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    layer.batch_norm_momentum = batch_norm_momentum
    layer.batch_norm_epsilon = batch_norm_epsilon


def unit_config(layer):
    """The config entries of the arguments `init_unit_args` stored."""
    return {
        "filters": layer.filters,
        "residual_function": layer.residual_function,
        "strides": layer.strides,
        "preactivate": layer.preactivate,
        "shortcut": layer.shortcut,
        "kernel_initializer": keras.initializers.serialize(layer.kernel_initializer),
        "kernel_regularizer": keras.regularizers.serialize(layer.kernel_regularizer),
        "batch_norm_momentum": layer.batch_norm_momentum,
        "batch_norm_epsilon": layer.batch_norm_epsilon,
    }
