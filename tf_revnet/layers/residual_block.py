"""The non-reversible pre-activation residual unit of ResNet (the baselines of the paper)."""

import keras

from tf_revnet.layers.residual_functions import (
    init_unit_args,
    make_residual_function,
    unit_config,
)
from tf_revnet.layers.shortcut import Shortcut, shortcut_kind
from tf_revnet.layers.utils import (
    strided_shape,
)


@keras.saving.register_keras_serializable(package="tf_revnet")
class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual unit (He et al., 2016b): `y = shortcut(x) + F(x)`.

    F is a `BasicResidualFunction` or `BottleneckResidualFunction` mapping `channels` to `filters`
    channels with the given stride. The shortcut is the identity when the stride is 1 and the channels
    do not change; otherwise (`shortcut="auto"`) average pooling with zero-padded channels for basic
    residual functions and a strided 1x1 projection for bottlenecks (`tf_revnet.layers.Shortcut`).
    RevNet's two-stream stage transition is `tf_revnet.layers.StageTransition`.

    Args:
        filters: int. Output channels (for bottlenecks: 4 times the inner width).
        residual_function: str. `"basic"` (two 3x3 convolutions) or `"bottleneck"` (1x1, 3x3, 1x1).
            Defaults to `"basic"`.
        strides: int. Spatial stride of the unit. Defaults to `1`.
        preactivate: bool. Whether F starts with BatchNorm and ReLU; `False` for the first unit after
            the stem, whose output is already normalised and rectified. Defaults to `True`.
        shortcut: str. `"auto"`, `"pad"` (needs `filters >= channels`) or `"projection"`. Only used when
            the stride or the channels change. Defaults to `"auto"`.
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
        ValueError: if an argument is invalid (naming it and the received value), or if a `"pad"`
            shortcut would have to drop channels.

    Examples:
        >>> block = ResidualBlock(64, strides=2)
        >>> keras.ops.shape(block(keras.ops.ones((2, 32, 32, 32))))
        (2, 16, 16, 64)

    References:
        He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
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
        super().__init__(**kwargs)
        init_unit_args(
            self, filters, residual_function, strides, preactivate, shortcut, kernel_initializer,
            kernel_regularizer, batch_norm_momentum, batch_norm_epsilon,
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if input_shape[-1] is None:
            raise ValueError(
                "The channel dimension of the input to ResidualBlock must be known. "
                f"Received: input_shape={input_shape}"
            )
        self.f = make_residual_function(
            self.residual_function, self.filters, self.strides, self.preactivate,
            self.kernel_initializer, self.kernel_regularizer, self.batch_norm_momentum,
            self.batch_norm_epsilon, "f", self.dtype_policy,
        )
        self.f.build(input_shape)
        kind = shortcut_kind(
            self.shortcut, self.residual_function, self.strides, input_shape[-1], self.filters
        )
        self.shortcut_layer = None
        if kind != "identity":
            self.shortcut_layer = Shortcut(
                self.filters, self.strides, kind, self.kernel_initializer, self.kernel_regularizer,
                name="shortcut", dtype=self.dtype_policy,
            )
            self.shortcut_layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        shortcut = inputs if self.shortcut_layer is None else self.shortcut_layer(inputs)
        return shortcut + self.f(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            unit_config(self)
        )
        return config
