"""The shortcut of a non-reversible residual unit: identity, pooling and zero padding, or projection."""

import keras

from tf_revnet.layers.utils import check_positive_int, default_kernel_initializer, strided_shape

SHORTCUTS = ("auto", "pad", "projection")


def shortcut_kind(shortcut, residual_function, strides, in_channels, out_channels):
    """The shortcut a unit uses: `"identity"` where nothing changes, else `"pad"` or `"projection"`.

    `"auto"` is the authors' choice: `"pad"` for basic residual functions, `"projection"` for
    bottlenecks.
    """
    if strides == 1 and in_channels == out_channels:
        return "identity"
    if shortcut != "auto":
        return shortcut
    return "pad" if residual_function == "basic" else "projection"


@keras.saving.register_keras_serializable(package="tf_revnet")
class Shortcut(keras.layers.Layer):
    """The shortcut path of a residual unit that changes the stride or the channels.

    - `"identity"`: returns the input.
    - `"pad"`: average pooling with the stride (no parameters), then zero-padded channels, half of the
      new channels before the input channels and half after (He et al., 2016a, option A; the authors'
      code for basic RevNets).
    - `"projection"`: a strided 1x1 convolution without bias (option B; bottleneck units).

    Args:
        filters: int. Output channels.
        strides: int. Spatial stride. Defaults to `1`.
        kind: str. `"identity"`, `"pad"` or `"projection"`. Defaults to `"projection"`.
        kernel_initializer: initializer of the projection kernel. Defaults to the authors'
            `VarianceScaling(2.0, "fan_out", "truncated_normal")`.
        kernel_regularizer: optional regularizer of the projection kernel.
        **kwargs: base layer arguments.

    Input shape:
        `(N, H, W, C)` (NHWC).

    Output shape:
        `(N, ceil(H / strides), ceil(W / strides), filters)`.

    Raises:
        ValueError: if `kind` is unknown, `filters`/`strides` are not positive ints, a `"pad"` shortcut
            would have to drop channels, or an `"identity"` shortcut would change the shape.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Section 3.3.
    """

    def __init__(
        self, filters, strides=1, kind="projection", kernel_initializer=None,
        kernel_regularizer=None, **kwargs,
    ):
        super().__init__(**kwargs)
        filters = check_positive_int("filters", filters)
        strides = check_positive_int("strides", strides)
        if kind not in ("identity", "pad", "projection"):
            raise ValueError(
                f"`kind` must be 'identity', 'pad' or 'projection'. Received: kind={kind!r}"
            )
        self.filters = filters
        self.strides = strides
        self.kind = kind
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else default_kernel_initializer()
        )
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self.conv = self.pool = None
        if self.kind == "identity" and (self.strides != 1 or in_channels != self.filters):
            raise ValueError(
                "An identity shortcut cannot change the shape. "
                f"Received: filters={self.filters}, strides={self.strides}, input_shape={input_shape}"
            )
        if self.kind == "pad":
            if self.filters < in_channels:
                raise ValueError(
                    "A `'pad'` shortcut cannot reduce the channels: use `shortcut='projection'`. "
                    f"Received: filters={self.filters} for input_shape={tuple(input_shape)}"
                )
            if self.strides > 1:
                self.pool = keras.layers.AveragePooling2D(
                    self.strides, strides=self.strides, padding="same", name="pool",
                    dtype=self.dtype_policy,
                )
                self.pool.build(input_shape)
        elif self.kind == "projection":
            self.conv = keras.layers.Conv2D(
                self.filters, 1, strides=self.strides, padding="same", use_bias=False,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer, name="projection",
                dtype=self.dtype_policy,
            )
            self.conv.build(input_shape)
        self.built = True

    def call(self, inputs):
        if self.conv is not None:
            return self.conv(inputs)
        x = self.pool(inputs) if self.pool is not None else inputs
        missing = self.filters - x.shape[-1]
        if missing:
            before = missing // 2
            x = keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, missing - before]])
        return x

    def compute_output_shape(self, input_shape):
        return strided_shape(input_shape, self.strides, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "kind": self.kind,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config
