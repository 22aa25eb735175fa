"""RevNet's stage transition: the non-invertible two-stream unit that changes stride or channels."""

import keras

from tf_revnet.layers.residual_functions import (
    init_unit_args,
    make_residual_function,
    unit_config,
)
from tf_revnet.layers.shortcut import Shortcut, shortcut_kind
from tf_revnet.layers.two_stream import TwoStreamLayer
from tf_revnet.layers.utils import (
    strided_shape,
)


@keras.saving.register_keras_serializable(package="tf_revnet")
class StageTransition(TwoStreamLayer):
    """The first unit of a RevNet stage: changes the spatial size and/or the channels (Section 3.3).

    It cannot be inverted, so `ReversibleSequence` keeps its input for the backward pass and recomputes
    its activations from it. As in the authors' code it keeps the two-stream form of a reversible block:
    the input is split on the channel axis into halves `x1`, `x2` and

        y1 = P(x1) + F(x2)        (F: channels / 2 -> filters / 2, with the stride)
        y2 = P(x2) + G(y1)        (G: filters / 2 -> filters / 2)
        y  = concat([y1, y2])

    so that its parameter count matches the paper's Table 1 (a full-width transition would add about
    23% to RevNet-38). The shortcut `P` (`tf_revnet.layers.Shortcut`) is average pooling with the stride
    plus zero-padded channels for basic residual functions (no parameters) and a strided 1x1 projection
    for bottlenecks (`shortcut="auto"`, the authors' choice). A stage whose first unit changes neither
    the stride nor the channels needs no transition: use a `ReversibleBlock`.

    Args:
        filters: int, even. Output channels (for bottlenecks: 4 times the inner width).
        residual_function: str. `"basic"` or `"bottleneck"`. Defaults to `"basic"`.
        strides: int. Spatial stride. Defaults to `1`.
        preactivate: bool. Whether F starts with BatchNorm and ReLU (`False` right after the stem). G
            always pre-activates. Defaults to `True`.
        shortcut: str. `"auto"`, `"pad"` or `"projection"`. Defaults to `"auto"`.
        kernel_initializer: initializer of the convolutions. Defaults to the authors'
            `VarianceScaling(2.0, "fan_out", "truncated_normal")`.
        kernel_regularizer: optional regularizer of the convolution kernels.
        batch_norm_momentum: float. Defaults to `0.99`.
        batch_norm_epsilon: float. Defaults to `1e-3`.
        **kwargs: base layer arguments (`name`, `dtype`).

    Call arguments:
        inputs: `(N, H, W, C)` float tensor, `C` even.
        training: bool. BatchNorm mode.

    Input shape:
        `(N, H, W, C)` (NHWC), `C` even.

    Output shape:
        `(N, ceil(H / strides), ceil(W / strides), filters)`; the layer's compute dtype.

    Raises:
        ValueError: if an argument is invalid (naming it), `filters` or the input channels are odd, or a
            `"pad"` shortcut would drop channels.

    Examples:
        >>> keras.ops.shape(StageTransition(64, strides=2)(keras.ops.ones((2, 32, 32, 32))))
        (2, 16, 16, 64)

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.3 and Table 1; the
        authors' code, github.com/renmengye/revnet-public (`resnet/models/revnet_model.py`).
    """

    def __init__(
        self,
        filters,
        residual_function="basic",
        strides=1,
        preactivate=True,
        shortcut="auto",
        kernel_initializer=None,
        kernel_regularizer=None,
        batch_norm_momentum=0.99,
        batch_norm_epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(axis=-1, **kwargs)
        init_unit_args(
            self, filters, residual_function, strides, preactivate, shortcut, kernel_initializer,
            kernel_regularizer, batch_norm_momentum, batch_norm_epsilon,
        )
        if isinstance(filters, int) and not isinstance(filters, bool) and filters % 2:
            raise ValueError(
                f"`filters` must be even to split into y1 and y2. Received: filters={filters}"
            )

    @property
    def input_dtype(self):
        return self.compute_dtype

    def _function(self, filters, strides, preactivate, name):
        return make_residual_function(
            self.residual_function, filters, strides, preactivate, self.kernel_initializer,
            self.kernel_regularizer, self.batch_norm_momentum, self.batch_norm_epsilon, name,
            self.dtype_policy,
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if input_shape[-1] is None or input_shape[-1] % 2:
            raise ValueError(
                "The input channels of a StageTransition must be known and even to split into x1 "
                f"and x2. Received: input_shape={input_shape}"
            )
        half_in = input_shape[:-1] + (input_shape[-1] // 2,)
        half_out = self.filters // 2
        self.f = self._function(half_out, self.strides, self.preactivate, "f")
        self.f.build(half_in)
        self.g = self._function(half_out, 1, True, "g")
        self.g.build(self.f.compute_output_shape(half_in))
        kind = shortcut_kind(
            self.shortcut, self.residual_function, self.strides, half_in[-1], half_out
        )
        self.shortcut1, self.shortcut2 = (
            Shortcut(
                half_out, self.strides, kind, self.kernel_initializer, self.kernel_regularizer,
                name=name, dtype=self.dtype_policy,
            )
            for name in ("shortcut1", "shortcut2")
        )
        self.shortcut1.build(half_in)
        self.shortcut2.build(half_in)
        self.built = True

    def call(self, inputs, training=None):
        x1, x2 = keras.ops.split(inputs, 2, axis=-1)
        y1 = self.shortcut1(x1) + self.f(x2, training=training)
        y2 = self.shortcut2(x2) + self.g(y1, training=training)
        return keras.ops.concatenate([y1, y2], axis=-1)

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, self.filters)

    def get_config(self):
        config = super().get_config()
        config.pop("axis")
        config.update(
            unit_config(self)
        )
        return config
