"""The stem of RevNets and ResNets: the first convolution, BatchNorm, ReLU (and max pooling)."""

import keras

from tf_revnet.layers.utils import check_batch_norm_args, check_positive_int, default_kernel_initializer

STEMS = ("cifar", "imagenet")


@keras.saving.register_keras_serializable(package="tf_revnet")
class Stem(keras.layers.Layer):
    """CIFAR stem: Conv3x3-BN-ReLU. ImageNet stem: Conv7x7/2-BN-ReLU-MaxPool3x3/2.

    As in the authors' code the stem ends with BatchNorm and ReLU, so the first residual unit skips its
    pre-activation. Convolutions have no bias. In a RevNet the stem is the first unit of the body's
    `ReversibleSequence`: it keeps only its input (the image) and is recomputed on the way back.

    Args:
        filters: int. Output channels.
        kind: str. `"cifar"` or `"imagenet"`. Defaults to `"cifar"`.
        kernel_initializer: initializer of the convolution. Defaults to the authors'
            `VarianceScaling(2.0, "fan_out", "truncated_normal")`.
        kernel_regularizer: optional regularizer of the convolution kernel.
        batch_norm_momentum: float. Defaults to `0.99`.
        batch_norm_epsilon: float. Defaults to `1e-3`.
        **kwargs: base layer arguments.

    Input shape:
        `(N, H, W, C)` images (NHWC), float.

    Output shape:
        `(N, H, W, filters)` (CIFAR) or `(N, ceil(H / 4), ceil(W / 4), filters)` (ImageNet).

    Raises:
        ValueError: if `filters` is not a positive int or `kind` is unknown.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1 and Section 4.2;
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Table 1.
    """

    def __init__(
        self, filters, kind="cifar", kernel_initializer=None, kernel_regularizer=None,
        batch_norm_momentum=0.99, batch_norm_epsilon=1e-3, **kwargs,
    ):
        super().__init__(**kwargs)
        filters = check_positive_int("filters", filters)
        if kind not in STEMS:
            raise ValueError(f"`kind` (the stem) must be one of {STEMS}. Received: kind={kind!r}")
        check_batch_norm_args(batch_norm_momentum, batch_norm_epsilon)
        self.filters = filters
        self.kind = kind
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else default_kernel_initializer()
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.batch_norm_momentum = batch_norm_momentum
        self.batch_norm_epsilon = batch_norm_epsilon

    def build(self, input_shape):
        imagenet = self.kind == "imagenet"
        self.conv = keras.layers.Conv2D(
            self.filters, 7 if imagenet else 3, strides=2 if imagenet else 1, padding="same",
            use_bias=False, kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer, name="conv", dtype=self.dtype_policy,
        )
        self.conv.build(input_shape)
        shape = self.conv.compute_output_shape(input_shape)
        self.bn = keras.layers.BatchNormalization(
            momentum=self.batch_norm_momentum, epsilon=self.batch_norm_epsilon, name="bn",
            dtype=self.dtype_policy,
        )
        self.bn.build(shape)
        self.pool = None
        if imagenet:
            self.pool = keras.layers.MaxPooling2D(
                3, strides=2, padding="same", name="pool", dtype=self.dtype_policy
            )
        self.built = True

    def call(self, inputs, training=None):
        x = keras.ops.relu(self.bn(self.conv(inputs), training=training))
        return self.pool(x) if self.pool is not None else x

    def compute_output_shape(self, input_shape):
        shape = self.conv.compute_output_shape(input_shape) if self.built else None
        if shape is None:
            conv = keras.layers.Conv2D(
                self.filters, 7 if self.kind == "imagenet" else 3,
                strides=2 if self.kind == "imagenet" else 1, padding="same",
            )
            shape = conv.compute_output_shape(input_shape)
        if self.kind == "imagenet":
            shape = keras.layers.MaxPooling2D(3, strides=2, padding="same").compute_output_shape(shape)
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kind": self.kind,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "batch_norm_momentum": self.batch_norm_momentum,
                "batch_norm_epsilon": self.batch_norm_epsilon,
            }
        )
        return config
