"""Transformer residual functions: the F (attention) and G (MLP) of a reversible transformer block.

A pre-norm transformer block (Vaswani et al., 2017; Dosovitskiy et al., 2021) adds two residuals to
its token stream, `LayerNorm -> multi-head self-attention` and `LayerNorm -> MLP`. A reversible
transformer (Kitaev et al., "Reformer", 2020; Mangalam et al., "Reversible Vision Transformers",
CVPR 2022) uses them as F and G of a two-stream reversible block:

    y1 = x1 + F(x2),  F = DropPath(Dropout(MHA(LN(x2))))
    y2 = x2 + G(y1),  G = DropPath(Dropout(Dense(Dropout(GELU(Dense(LN(y1)))))))

Both keep the shape `(N, T, C)` of their input, as a `ReversibleBlock` needs. Every random draw
(attention dropout, dropout, stochastic depth) comes from a `keras.random.SeedGenerator` owned by a
layer, so the recompute of `ReversibleSequence`'s backward pass replays it exactly.
"""

import keras

from tf_revnet.layers.utils import check_positive_int

__all__ = ["AttentionResidualFunction", "MLPResidualFunction"]


def vit_initializer():
    """Truncated normal with standard deviation 0.02: the ViT/timm initialisation of linear maps."""
    return keras.initializers.TruncatedNormal(stddev=0.02)


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


class _TokenResidualFunction(keras.layers.Layer):
    """Shared machinery: LayerNorm, output dropout and stochastic depth (drop path); not public."""

    def __init__(self, dropout=0.0, drop_path=0.0, layer_norm_epsilon=1e-6, kernel_initializer=None,
                 kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.dropout = _check_rate("dropout", dropout)
        self.drop_path = _check_rate("drop_path", drop_path)
        if not layer_norm_epsilon > 0:
            raise ValueError("`layer_norm_epsilon` must be positive. "
                             f"Received: layer_norm_epsilon={layer_norm_epsilon!r}")
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer if kernel_initializer is not None else vit_initializer())
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed
        # Stochastic depth draws from a generator the layer owns (replayed by the recompute).
        self.drop_path_seed_generator = (
            keras.random.SeedGenerator(seed) if self.drop_path > 0 else None)

    def _channels(self, input_shape):
        channels = input_shape[-1]
        if len(input_shape) < 2 or channels is None:
            raise ValueError(
                f"{type(self).__name__} expects tokens `(N, T, C)` with a known C. "
                f"Received: input_shape={tuple(input_shape)}")
        return channels

    def _build_common(self, input_shape):
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="norm", dtype=self.dtype_policy)
        self.norm.build(input_shape)
        self.output_dropout = (
            keras.layers.Dropout(self.dropout, seed=self.seed, name="output_dropout",
                                 dtype=self.dtype_policy) if self.dropout > 0 else None)

    def _dense(self, units, name, activation=None):
        return keras.layers.Dense(
            units, activation=activation, kernel_initializer=self.kernel_initializer,
            bias_initializer="zeros", kernel_regularizer=self.kernel_regularizer, name=name,
            dtype=self.dtype_policy)

    def _finish(self, h, training):
        """Output dropout, then stochastic depth: the residual of a whole sample is dropped at
        `drop_path` and the kept ones scaled by `1 / (1 - drop_path)` (Huang et al., 2016)."""
        if self.output_dropout is not None:
            h = self.output_dropout(h, training=training)
        if training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            shape = (keras.ops.shape(h)[0],) + (1,) * (len(h.shape) - 1)
            draw = keras.random.uniform(shape, seed=self.drop_path_seed_generator)
            mask = keras.ops.cast(draw < keep, h.dtype) / keras.ops.cast(keep, h.dtype)
            h = h * mask
        return h

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "dropout": self.dropout,
            "drop_path": self.drop_path,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "seed": self.seed,
        })
        return config


@keras.saving.register_keras_serializable(package="tf_revnet")
class AttentionResidualFunction(_TokenResidualFunction):
    """Pre-norm multi-head self-attention: the F of a reversible transformer block.

    Computes `DropPath(Dropout(MHA(h, h)))` with `h = LayerNorm(x)`: `num_heads` heads of width
    `key_dim` (the query, key, value and output projections of `keras.layers.MultiHeadAttention`,
    `4 C^2 + 4 C` weights for `key_dim = C / num_heads`), dropout `attention_dropout` on the
    attention probabilities, `dropout` on the output projection and stochastic depth `drop_path`
    on the whole residual of a sample.

    Args:
        num_heads: int. Number of attention heads.
        key_dim: int or None. Width of each head. Defaults to `None`: `C // num_heads` (C must then
            be divisible by `num_heads`).
        attention_dropout: float in [0, 1). Dropout on the attention probabilities. Defaults to `0`.
        dropout: float in [0, 1). Dropout on the output projection. Defaults to `0`.
        drop_path: float in [0, 1). Stochastic depth: probability of dropping the residual of a
            sample. Defaults to `0`.
        use_causal_mask: bool. Each token attends only to itself and earlier tokens (the mask holds
            inside a `ReversibleSequence`, whose units take no mask argument). Defaults to `False`.
        use_bias: bool. Biases on the projections (ViT's `qkv_bias`). Defaults to `True`.
        layer_norm_epsilon: float. Defaults to `1e-6` (ViT/timm).
        kernel_initializer: initializer of the projection kernels. Defaults to
            `TruncatedNormal(stddev=0.02)` (ViT/timm); biases start at zero.
        kernel_regularizer: optional regularizer of the projection kernels.
        seed: int or None. Seed of the dropout and stochastic-depth generators.
        **kwargs: base layer arguments (`name`, `dtype`).

    Call arguments:
        inputs: float tensor `(N, T, C)`.
        training: bool or None. Dropout and stochastic depth only in training.
        attention_mask: optional boolean tensor `(N, T, T)`, True where a query may attend to a
            key (Keras' `MultiHeadAttention` convention). Only for direct calls: inside a
            `ReversibleBlock` F is called without one (use `use_causal_mask` for a fixed mask).

    Input shape:
        `(N, T, C)`, any float dtype.

    Output shape:
        `(N, T, C)`, the layer's compute dtype.

    Raises:
        ValueError: if `num_heads` or `key_dim` is not a positive int, a rate is outside [0, 1),
            or, on build, C is unknown or not divisible by `num_heads` (with `key_dim=None`).

    Examples:
        >>> f = AttentionResidualFunction(num_heads=2)
        >>> keras.ops.shape(f(keras.ops.ones((2, 5, 8))))
        (2, 5, 8)

    References:
        - Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Section 3.2 (F = attention).
        - Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Eq. 2.
        - Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """

    def __init__(self, num_heads, key_dim=None, attention_dropout=0.0, dropout=0.0, drop_path=0.0,
                 use_causal_mask=False, use_bias=True, layer_norm_epsilon=1e-6,
                 kernel_initializer=None, kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(dropout=dropout, drop_path=drop_path,
                         layer_norm_epsilon=layer_norm_epsilon,
                         kernel_initializer=kernel_initializer,
                         kernel_regularizer=kernel_regularizer, seed=seed, **kwargs)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.key_dim = check_positive_int("key_dim", key_dim, allow_none=True)
        self.attention_dropout = _check_rate("attention_dropout", attention_dropout)
        for arg, value in (("use_causal_mask", use_causal_mask), ("use_bias", use_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"`{arg}` must be a bool. Received: {arg}={value!r}")
        self.use_causal_mask = use_causal_mask
        self.use_bias = use_bias

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        channels = self._channels(input_shape)
        key_dim = self.key_dim
        if key_dim is None:
            if channels % self.num_heads:
                raise ValueError(
                    f"The token width C={channels} must be divisible by `num_heads` when "
                    f"`key_dim` is None. Received: num_heads={self.num_heads}, "
                    f"input_shape={input_shape}")
            key_dim = channels // self.num_heads
        self._build_common(input_shape)
        self.attention = keras.layers.MultiHeadAttention(
            self.num_heads, key_dim, dropout=self.attention_dropout, use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer, bias_initializer="zeros",
            kernel_regularizer=self.kernel_regularizer, seed=self.seed, name="attention",
            dtype=self.dtype_policy)
        self.attention.build(input_shape, input_shape)
        self.built = True

    def call(self, inputs, training=None, attention_mask=None):
        h = self.norm(inputs)
        h = self.attention(h, h, attention_mask=attention_mask,
                           use_causal_mask=self.use_causal_mask, training=training)
        return self._finish(h, training)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "attention_dropout": self.attention_dropout,
            "use_causal_mask": self.use_causal_mask,
            "use_bias": self.use_bias,
        })
        return config


@keras.saving.register_keras_serializable(package="tf_revnet")
class MLPResidualFunction(_TokenResidualFunction):
    """Pre-norm MLP: the G of a reversible transformer block.

    Computes `DropPath(Dropout(Dense_C(Dropout(act(Dense_H(LayerNorm(x)))))))`, with a hidden
    width `H = hidden_units` or `round(mlp_ratio * C)` and `activation` GELU (exact, as ViT and
    timm): `2 C H + H + C` weights.

    Args:
        mlp_ratio: float > 0. Hidden width over C when `hidden_units` is None. Defaults to `4.0`.
        hidden_units: int or None. Hidden width. Defaults to `None` (`mlp_ratio * C`).
        activation: str or callable. Defaults to `"gelu"`.
        dropout: float in [0, 1). Dropout after the activation and after the second Dense (ViT's
            `drop_rate`). Defaults to `0`.
        drop_path: float in [0, 1). Stochastic depth on the residual. Defaults to `0`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        kernel_initializer: initializer of the Dense kernels. Defaults to
            `TruncatedNormal(stddev=0.02)`; biases start at zero.
        kernel_regularizer: optional regularizer of the Dense kernels.
        seed: int or None. Seed of the dropout and stochastic-depth generators.
        **kwargs: base layer arguments (`name`, `dtype`).

    Call arguments:
        inputs: float tensor `(N, T, C)`.
        training: bool or None. Dropout and stochastic depth only in training.

    Input shape:
        `(..., C)`, e.g. tokens `(N, T, C)`, any float dtype.

    Output shape:
        The input shape, the layer's compute dtype.

    Raises:
        ValueError: if `mlp_ratio` is not positive, `hidden_units` not a positive int, a rate
            outside [0, 1), or C unknown on build.

    Examples:
        >>> g = MLPResidualFunction(mlp_ratio=2.0)
        >>> keras.ops.shape(g(keras.ops.ones((2, 5, 8))))
        (2, 5, 8)

    References:
        - Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Section 3.2 (G = MLP).
        - Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Eq. 3.
    """

    def __init__(self, mlp_ratio=4.0, hidden_units=None, activation="gelu", dropout=0.0,
                 drop_path=0.0, layer_norm_epsilon=1e-6, kernel_initializer=None,
                 kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(dropout=dropout, drop_path=drop_path,
                         layer_norm_epsilon=layer_norm_epsilon,
                         kernel_initializer=kernel_initializer,
                         kernel_regularizer=kernel_regularizer, seed=seed, **kwargs)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"`mlp_ratio` must be a positive number. Received: mlp_ratio={mlp_ratio!r}")
        self.mlp_ratio = float(mlp_ratio)
        self.hidden_units = check_positive_int("hidden_units", hidden_units, allow_none=True)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        channels = self._channels(input_shape)
        hidden = self.hidden_units or max(1, int(round(self.mlp_ratio * channels)))
        self._build_common(input_shape)
        self.hidden = self._dense(hidden, "hidden", activation=self.activation)
        self.hidden.build(input_shape)
        self.hidden_dropout = (
            keras.layers.Dropout(self.dropout, seed=self.seed, name="hidden_dropout",
                                 dtype=self.dtype_policy) if self.dropout > 0 else None)
        self.projection = self._dense(channels, "projection")
        self.projection.build(input_shape[:-1] + (hidden,))
        self.built = True

    def call(self, inputs, training=None):
        h = self.hidden(self.norm(inputs))
        if self.hidden_dropout is not None:
            h = self.hidden_dropout(h, training=training)
        return self._finish(self.projection(h), training)

    def get_config(self):
        config = super().get_config()
        config.update({
            "mlp_ratio": self.mlp_ratio,
            "hidden_units": self.hidden_units,
            "activation": keras.activations.serialize(self.activation),
        })
        return config
