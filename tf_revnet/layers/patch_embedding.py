"""Patch embedding of a vision transformer: image patches to tokens with learned positions."""

import keras

from tf_revnet.layers.utils import check_positive_int

__all__ = ["PatchEmbedding"]


@keras.saving.register_keras_serializable(package="tf_revnet")
class PatchEmbedding(keras.layers.Layer):
    """Splits an image into patches and embeds each as a token, adding a learned position.

    A `patch_size x patch_size` convolution with stride `patch_size` maps every patch linearly to
    `embed_dim` channels (ViT's linear projection of flattened patches), the `(H/p) x (W/p)` grid is
    flattened row by row into `T = HW / p^2` tokens, and a learned position embedding `(1, T, C)`
    (truncated normal, standard deviation 0.02, as ViT/timm) is added; then dropout. There is no
    class token: RevViT classifies the average of the tokens.

    Args:
        patch_size: int. Side of the square patches (and the stride). Defaults to `16`.
        embed_dim: int. Token width C. Defaults to `768`.
        dropout: float in [0, 1). Dropout after adding the positions. Defaults to `0`.
        kernel_initializer: initializer of the projection. Defaults to `"glorot_uniform"`.
        kernel_regularizer: optional regularizer of the projection kernel.
        seed: int or None. Seed of the dropout generator.
        **kwargs: base layer arguments (`name`, `dtype`).

    Call arguments:
        inputs: float images `(N, H, W, channels)` (NHWC).
        training: bool or None. Dropout only in training.

    Input shape:
        `(N, H, W, channels)`, H and W known and divisible by `patch_size`.

    Output shape:
        `(N, T, embed_dim)` with `T = (H / patch_size) * (W / patch_size)`.

    Raises:
        ValueError: if `patch_size` or `embed_dim` is not a positive int, `dropout` outside
            [0, 1), or, on build, H or W unknown or not divisible by `patch_size`.

    Examples:
        >>> embed = PatchEmbedding(patch_size=4, embed_dim=16)
        >>> keras.ops.shape(embed(keras.ops.ones((2, 32, 32, 3))))
        (2, 64, 16)

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Section 3.1 (Eq. 1);
        Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Section 3.
    """

    def __init__(self, patch_size=16, embed_dim=768, dropout=0.0, kernel_initializer="glorot_uniform",
                 kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}")
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed

    def _grid(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"PatchEmbedding expects NHWC images. Received: input_shape={input_shape}")
        _, height, width, _ = input_shape
        p = self.patch_size
        if height is None or width is None or height % p or width % p:
            raise ValueError(
                f"The image height and width must be known and divisible by `patch_size`={p} "
                f"(the position embedding has one entry per patch). Received: "
                f"input_shape={tuple(input_shape)}")
        return height // p, width // p

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        rows, cols = self._grid(input_shape)
        self.projection = keras.layers.Conv2D(
            self.embed_dim, self.patch_size, strides=self.patch_size, padding="valid",
            kernel_initializer=self.kernel_initializer, kernel_regularizer=self.kernel_regularizer,
            name="projection", dtype=self.dtype_policy)
        self.projection.build(input_shape)
        self.num_tokens = rows * cols
        self.position_embedding = self.add_weight(
            shape=(1, self.num_tokens, self.embed_dim), name="position_embedding",
            initializer=keras.initializers.TruncatedNormal(stddev=0.02), trainable=True)
        self.dropout_layer = (
            keras.layers.Dropout(self.dropout, seed=self.seed, name="dropout", dtype=self.dtype_policy)
            if self.dropout > 0 else None)
        self.built = True

    def call(self, inputs, training=None):
        x = self.projection(inputs)
        x = keras.ops.reshape(x, (-1, self.num_tokens, self.embed_dim))
        x = x + keras.ops.cast(self.position_embedding, x.dtype)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        rows, cols = self._grid(tuple(input_shape))
        return (input_shape[0], rows * cols, self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update({
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "seed": self.seed,
        })
        return config
