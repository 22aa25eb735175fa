"""The non-reversible residual unit: ResNet's unit and RevNet's stage transition."""

import keras

from tf_revnet.layers.residual_functions import (
    BasicResidualFunction,
    BottleneckResidualFunction,
    _check_batch_norm_args,
    _check_positive_int,
    _default_kernel_initializer,
    _strided_shape,
)

RESIDUAL_FUNCTIONS = {
    "basic": BasicResidualFunction,
    "bottleneck": BottleneckResidualFunction,
}

_SHORTCUTS = ("auto", "pad", "projection")


@keras.saving.register_keras_serializable(package="tf_revnet")
class ResidualBlock(keras.layers.Layer):
    """Non-reversible pre-activation residual unit, optionally split into halves as in RevNet.

    With `split=False` this is the unit of the pre-activation ResNet (He et al., 2016b):
    `y = shortcut(x) + F(x)`, where F is a `BasicResidualFunction` or `BottleneckResidualFunction`
    mapping `channels` to `filters` channels with the given stride.

    With `split=True` it is the stage transition of a RevNet: the unit that changes the spatial size
    and/or the channels, and therefore cannot be inverted, so its input is kept for the backward
    pass (Gomez et al., 2017, Section 3.3). As in the authors' code it keeps the two-stream
    structure of a reversible block: the input is split on the channel axis into halves `x1`, `x2`
    and

        y1 = shortcut(x1) + F(x2)        (F: channels / 2 -> filters / 2, with the stride)
        y2 = shortcut(x2) + G(y1)        (G: filters / 2 -> filters / 2)
        y  = concat([y1, y2])

    so that its parameter count matches the paper's Table 1 (a full-width transition would add about
    23% (108,640 parameters) to RevNet-38).

    The shortcut is the identity when the stride is 1 and the channels do not change. Otherwise
    (`shortcut="auto"`, the authors' choice) it is average pooling with the stride plus zero-padded
    channels for basic residual functions (no parameters; half of the new channels before the input
    channels and half after), and a strided 1x1 convolution without bias (projection) for bottleneck
    residual functions.

    Args:
        filters: int. Output channels (for bottlenecks: 4 times the inner width). With `split=True`
            it must be even, and so must the input channels.
        residual_function: str. `"basic"` (two 3x3 convolutions) or `"bottleneck"` (1x1, 3x3, 1x1).
            Defaults to `"basic"`.
        strides: int. Spatial stride of the unit. Defaults to `1`.
        preactivate: bool. Whether the (first) residual function starts with BatchNorm and ReLU;
            `False` for the first unit after the stem, whose output is already normalised and
            rectified. G of a split unit always pre-activates. Defaults to `True`.
        split: bool. Whether to use the RevNet two-stream form above. Defaults to `False`.
        shortcut: str. `"auto"`, `"pad"` (average pooling and zero-padded channels; needs
            `filters >= channels`) or `"projection"` (1x1 convolution). Only used when the stride or
            the channels change. Defaults to `"auto"`.
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
        4D tensor `(batch_size, ceil(height / strides), ceil(width / strides), filters)`; the
        layer's compute dtype.

    Raises:
        ValueError: if an argument is invalid (naming it and the received value), if `split=True`
            and `filters` or the input channels are odd, or if a `"pad"` shortcut would have to drop
            channels.

    Example:

    >>> block = ResidualBlock(64, strides=2)
    >>> keras.ops.shape(block(keras.ops.ones((2, 32, 32, 32))))
    (2, 16, 16, 64)
    >>> keras.ops.shape(ResidualBlock(128, "bottleneck", split=True)(keras.ops.ones((2, 8, 8, 32))))
    (2, 8, 8, 128)

    References:
        - Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
          Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3.3 and Table 1; the authors' code,
          github.com/renmengye/revnet-public (`resnet/models/revnet_model.py`).
        - He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
    """

    def __init__(
        self,
        filters,
        residual_function="basic",
        strides=1,
        preactivate=True,
        split=False,
        shortcut="auto",
        kernel_initializer=None,
        kernel_regularizer=None,
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("filters", filters)
        if residual_function not in RESIDUAL_FUNCTIONS:
            raise ValueError(
                f"`residual_function` must be one of {sorted(RESIDUAL_FUNCTIONS)}. "
                f"Received: residual_function={residual_function!r}"
            )
        _check_positive_int("strides", strides)
        if not isinstance(preactivate, bool):
            raise ValueError(f"`preactivate` must be a bool. Received: preactivate={preactivate!r}")
        if not isinstance(split, bool):
            raise ValueError(f"`split` must be a bool. Received: split={split!r}")
        if split and filters % 2:
            raise ValueError(
                f"`filters` must be even to split into y1 and y2 when `split=True`. "
                f"Received: filters={filters}"
            )
        if shortcut not in _SHORTCUTS:
            raise ValueError(
                f"`shortcut` must be one of {_SHORTCUTS}. Received: shortcut={shortcut!r}"
            )
        _check_batch_norm_args(batch_norm_momentum, batch_norm_epsilon)
        self.filters = filters
        self.residual_function = residual_function
        self.strides = strides
        self.preactivate = preactivate
        self.split = split
        self.shortcut = shortcut
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else _default_kernel_initializer()
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.batch_norm_momentum = batch_norm_momentum
        self.batch_norm_epsilon = batch_norm_epsilon

    def _make_function(self, filters, strides, preactivate, name):
        return RESIDUAL_FUNCTIONS[self.residual_function](
            filters=filters,
            strides=strides,
            preactivate=preactivate,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            batch_norm_momentum=self.batch_norm_momentum,
            batch_norm_epsilon=self.batch_norm_epsilon,
            name=name,
            dtype=self.dtype_policy,
        )

    def _shortcut_kind(self, in_channels, out_channels):
        if self.strides == 1 and in_channels == out_channels:
            return "identity"
        if self.shortcut != "auto":
            return self.shortcut
        return "pad" if self.residual_function == "basic" else "projection"

    def _make_shortcut(self, shape, out_channels, name):
        """Returns `(kind, layer)`; `layer` is `None` where the shortcut has no layer."""
        kind = self._shortcut_kind(shape[-1], out_channels)
        if kind == "projection":
            layer = keras.layers.Conv2D(
                out_channels,
                1,
                strides=self.strides,
                padding="same",
                use_bias=False,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name=name,
                dtype=self.dtype_policy,
            )
        elif kind == "pad":
            if out_channels < shape[-1]:
                raise ValueError(
                    "A `'pad'` shortcut cannot reduce the channels: use `shortcut='projection'`. "
                    f"Received: filters={self.filters} for input_shape={shape}"
                )
            # Average pooling (no parameters); the channels are zero-padded in `_apply_shortcut`.
            layer = None
            if self.strides > 1:
                layer = keras.layers.AveragePooling2D(
                    self.strides,
                    strides=self.strides,
                    padding="same",
                    name=name,
                    dtype=self.dtype_policy,
                )
        else:
            layer = None
        if layer is not None:
            layer.build(shape)
        return kind, layer

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(
                f"The channel dimension of the input to ResidualBlock must be known. "
                f"Received: input_shape={input_shape}"
            )
        if self.split:
            if in_channels % 2:
                raise ValueError(
                    "The input channels must be even to split into x1 and x2 when `split=True`. "
                    f"Received: input_shape={input_shape}"
                )
            half_in = input_shape[:-1] + (in_channels // 2,)
            half_out = self.filters // 2
            self.f = self._make_function(half_out, self.strides, self.preactivate, name="f")
            self.f.build(half_in)
            self.g = self._make_function(half_out, 1, True, name="g")
            self.g.build(self.f.compute_output_shape(half_in))
            self._shortcut_kind_used, self.shortcut1 = self._make_shortcut(
                half_in, half_out, name="shortcut1"
            )
            _, self.shortcut2 = self._make_shortcut(half_in, half_out, name="shortcut2")
        else:
            self.f = self._make_function(self.filters, self.strides, self.preactivate, name="f")
            self.f.build(input_shape)
            self._shortcut_kind_used, self.shortcut1 = self._make_shortcut(
                input_shape, self.filters, name="shortcut"
            )
        self.built = True

    def _apply_shortcut(self, layer, x, out_channels):
        if layer is not None:
            x = layer(x)
        missing = out_channels - x.shape[-1]
        if self._shortcut_kind_used == "pad" and missing:
            before = missing // 2
            x = keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, missing - before]])
        return x

    def call(self, inputs, training=None):
        if not self.split:
            shortcut = self._apply_shortcut(self.shortcut1, inputs, self.filters)
            return shortcut + self.f(inputs, training=training)
        # Two-stream transition (RevNet): F on x2, then G on y1.
        half = self.filters // 2
        x1, x2 = keras.ops.split(inputs, 2, axis=-1)
        y1 = self._apply_shortcut(self.shortcut1, x1, half) + self.f(x2, training=training)
        y2 = self._apply_shortcut(self.shortcut2, x2, half) + self.g(y1, training=training)
        return keras.ops.concatenate([y1, y2], axis=-1)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "residual_function": self.residual_function,
                "strides": self.strides,
                "preactivate": self.preactivate,
                "split": self.split,
                "shortcut": self.shortcut,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "batch_norm_momentum": self.batch_norm_momentum,
                "batch_norm_epsilon": self.batch_norm_epsilon,
            }
        )
        return config
