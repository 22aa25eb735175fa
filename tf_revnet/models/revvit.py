"""Reversible vision transformers (RevViT) in the `keras.applications` style.

Mangalam, Fan, Li, Wu, Xiong, Feichtenhofer, Malik, "Reversible Vision Transformers", CVPR 2022.
"""

import keras

from tf_revnet.layers.patch_embedding import PatchEmbedding
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_block_stack import ReversibleBlockStack
from tf_revnet.layers.reversible_sequence import ReversibleSequence
from tf_revnet.layers.transformer_functions import (
    AttentionResidualFunction,
    MLPResidualFunction,
    vit_initializer,
)
from tf_revnet.layers.utils import check_positive_int
from tf_revnet.models import application
from tf_revnet.models.architectures import VIT_ARCHITECTURES


def RevViT(
    patch_size=16,
    embed_dim=384,
    depth=12,
    num_heads=6,
    mlp_ratio=4.0,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    use_custom_gradient=True,
    name="revvit",
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    drop_path_rate=0.0,
    kernel_regularizer=None,
    layer_norm_epsilon=1e-6,
    stack_blocks=True,
    include_preprocessing=False,
    preprocessing_mean=None,
    preprocessing_std=None,
):
    """Instantiates a reversible vision transformer (RevViT) of any patch size, depth and width.

    The image is cut into `patch_size` patches, embedded as `T` tokens of width `C = embed_dim` with
    a learned position embedding (no class token), and the embedding is duplicated into the two
    streams of the reversible residual stream, `X1 = X2 = embedding` (`(N, T, 2C)`, split on the
    channel axis). `depth` reversible blocks follow (Section 3.2):

        Y1 = X1 + F(X2),  F = LayerNorm -> multi-head self-attention (`AttentionResidualFunction`)
        Y2 = X2 + G(Y1),  G = LayerNorm -> MLP (`MLPResidualFunction`)

    They are ONE `ReversibleBlockStack` (one variable per weight of the block, stacked over the
    blocks, one `tf.while_loop`) inside ONE `ReversibleSequence` (`f"{name}_body"`), so a training
    step stores no activation of the blocks and neither the traced graph nor the activation memory
    grows with `depth`. The head concatenates the two streams (mmpretrain's `fusion_mode="concat"`),
    normalizes them (`LayerNorm(2C)`), averages the tokens and classifies with `Dense(classes)`.
    Linear maps start from a truncated normal with standard deviation 0.02 and zero biases (ViT,
    timm), the patch projection from Glorot-uniform.

    Layers are named `f"{name}_patch_embedding"`, `f"{name}_two_streams"`, `f"{name}_body"` (its
    unit `f"{name}_blocks1to{depth}"`, template block `f"{name}_block"` with `f"{name}_block_f"` and
    `_g`), `f"{name}_norm"`, `f"{name}_avg_pool"` and `f"{name}_predictions"`.

    Args:
        patch_size: int. Side of the square patches. Defaults to `16`.
        embed_dim: int. Width C of each stream. Defaults to `384` (RevViT-S).
        depth: int. Number of reversible blocks. Defaults to `12`.
        num_heads: int. Attention heads; must divide `embed_dim`. Defaults to `6`.
        mlp_ratio: float. MLP hidden width over C. Defaults to `4.0`.
        include_top: bool. Whether to include the classifier. Defaults to `True`.
        weights: must be `None` (random initialization): there are no pretrained weights.
        input_tensor: optional Keras tensor or tensor to use as the model's input.
        input_shape: optional `(height, width, channels)`, height and width known and divisible by
            `patch_size`. Defaults to `(224, 224, 3)`.
        pooling: optional `"avg"` or `"max"` pooling of the tokens when `include_top=False`.
            Defaults to `None`: the normalized tokens `(N, T, 2C)`.
        classes: int. Number of classes. Defaults to `1000`.
        classifier_activation: str or callable; `None` returns logits. Defaults to `"softmax"`.
        use_custom_gradient: bool. `True` backpropagates through the blocks without storing
            activations; `False` runs ordinary autodiff on the same architecture and weights.
            Defaults to `True`.
        name: str. Model name and layer-name prefix. Defaults to `"revvit"`.
        dropout_rate: float. Dropout after the position embedding, in the MLP and on the attention
            output (ViT's `drop_rate`). Defaults to `0`.
        attention_dropout_rate: float. Dropout on the attention probabilities. Defaults to `0`.
        drop_path_rate: float. Stochastic depth of every F and G. With `stack_blocks` all blocks
            share one rate (one structure); with `stack_blocks=False` the rate grows linearly from 0
            at the first block to `drop_path_rate` at the last (timm, mmpretrain). Defaults to `0`.
        kernel_regularizer: optional regularizer of every Dense kernel, the projections and the
            classifier included. Defaults to `None`.
        layer_norm_epsilon: float. Defaults to `1e-6`.
        stack_blocks: bool. One `ReversibleBlockStack` for all blocks (stacked weights, one loop).
            `False` makes one `ReversibleBlock` layer per block. Defaults to `True`.
        include_preprocessing: bool. Whether the model takes raw RGB pixels in [0, 255] and
            standardizes them first. Defaults to `False`.
        preprocessing_mean: per-channel sequence on the 0-255 scale, with
            `include_preprocessing`. Defaults to CIFAR-10's for 32x32 inputs, ImageNet's otherwise.
        preprocessing_std: per-channel sequence on the 0-255 scale, likewise.

    Input shape:
        `(batch_size, height, width, channels)` (NHWC) float images.

    Output shape:
        `(batch_size, classes)` with `include_top=True`; otherwise `(batch_size, T, 2C)` or
        `(batch_size, 2C)` with `pooling`.

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: if an argument is invalid (the message names it and the received value): e.g.
            `weights` not `None`, `embed_dim` not divisible by `num_heads`, an image side not
            divisible by `patch_size`, an unknown `pooling`.

    Examples:
        >>> model = RevViT(patch_size=4, embed_dim=32, depth=2, num_heads=2, input_shape=(16, 16, 3),
        ...                classes=10)
        >>> keras.ops.shape(model(keras.ops.ones((1, 16, 16, 3))))
        (1, 10)

    References:
        Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Sections 3.1-3.2 and Table 1;
        mmpretrain `mmpretrain/models/backbones/revvit.py` (concatenated streams, average of the
        tokens); Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
    """
    patch_size = check_positive_int("patch_size", patch_size)
    embed_dim = check_positive_int("embed_dim", embed_dim)
    depth = check_positive_int("depth", depth)
    num_heads = check_positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(
            f"`embed_dim` must be divisible by `num_heads`. Received: embed_dim={embed_dim}, "
            f"num_heads={num_heads}")
    for arg, value in (("use_custom_gradient", use_custom_gradient), ("stack_blocks", stack_blocks)):
        if not isinstance(value, bool):
            raise ValueError(f"`{arg}` must be a bool. Received: {arg}={value!r}")
    application.check_head_args(include_top, weights, pooling, classes)
    img_input = application.model_input(input_tensor, input_shape, (224, 224, 3))
    x = img_input
    if include_preprocessing:
        stats = "cifar" if tuple(img_input.shape[1:3]) == (32, 32) else "imagenet"
        x = application.preprocessing_layer(stats, name, preprocessing_mean, preprocessing_std)(x)
    elif preprocessing_mean is not None or preprocessing_std is not None:
        raise ValueError("`preprocessing_mean`/`preprocessing_std` need `include_preprocessing=True`.")
    common = dict(dropout=dropout_rate, layer_norm_epsilon=layer_norm_epsilon,
                  kernel_regularizer=kernel_regularizer)

    def block(prefix, drop_path):
        return ReversibleBlock(
            AttentionResidualFunction(num_heads, attention_dropout=attention_dropout_rate,
                                      drop_path=drop_path, name=f"{prefix}_f", **common),
            MLPResidualFunction(mlp_ratio, drop_path=drop_path, name=f"{prefix}_g", **common),
            name=prefix,
        )

    if stack_blocks:
        units = [ReversibleBlockStack(block(f"{name}_block", drop_path_rate), depth,
                                      name=f"{name}_blocks1to{depth}")]
    else:
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        units = [block(f"{name}_block{i + 1}", rate) for i, rate in enumerate(rates)]
    x = PatchEmbedding(patch_size, embed_dim, dropout=dropout_rate,
                       kernel_regularizer=kernel_regularizer, name=f"{name}_patch_embedding")(x)
    # X1 = X2 = the embedding: two streams of the full width C (Section 3.2).
    x = keras.layers.Concatenate(axis=-1, name=f"{name}_two_streams")([x, x])
    x = ReversibleSequence(units, use_custom_gradient=use_custom_gradient, name=f"{name}_body")(x)
    x = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name=f"{name}_norm")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling1D(name=f"{name}_avg_pool")(x)
        policy = keras.config.dtype_policy()
        x = keras.layers.Dense(
            classes, activation=classifier_activation, kernel_initializer=vit_initializer(),
            kernel_regularizer=kernel_regularizer, name=f"{name}_predictions",
            # Under mixed precision the classifier (softmax) computes in float32.
            dtype=policy.variable_dtype if policy.compute_dtype != policy.variable_dtype else None,
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling1D(name=f"{name}_avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling1D(name=f"{name}_max_pool")(x)
    return keras.Model(application.model_inputs(input_tensor, img_input), x, name=name)


_BUILDER_DOC = """Instantiates {title}: {role}.

    Architecture: {image_size}x{image_size} images in {patch_size}x{patch_size} patches ({tokens}
    tokens), two streams of width {embed_dim} (the embedding duplicated), {depth} reversible blocks
    (F: {num_heads}-head self-attention, G: MLP of width {hidden}), one `ReversibleBlockStack`
    inside one `ReversibleSequence`; head: both streams concatenated, LayerNorm, average of the
    tokens, Dense (see `RevViT`).

    Parameters: {params:,} with {classes} classes (`count_params()`). {paper}{note}

    Args:
        include_top: bool. Whether to include the classifier. Defaults to `True`.
        weights: must be `None` (random initialization): there are no pretrained weights.
        input_tensor: optional Keras tensor or tensor to use as the model's input.
        input_shape: optional `(height, width, channels)`, sides divisible by {patch_size}.
            Defaults to `{input_shape}`.
        pooling: optional `"avg"` or `"max"` pooling of the tokens when `include_top=False`.
        classes: int. Number of classes. Defaults to `{classes}`.
        classifier_activation: str or callable; `None` returns logits. Defaults to `"softmax"`.
        use_custom_gradient: bool. `False` runs ordinary autodiff on the same architecture and
            weights. Defaults to `True`.
        name: str. Model name and layer-name prefix. Defaults to `"{default_name}"`.

    The further keyword-only arguments are `RevViT`'s (`dropout_rate`, `attention_dropout_rate`,
    `drop_path_rate`, `kernel_regularizer`, `stack_blocks`, `include_preprocessing`, ...),
    documented there; the signature lists them.

    Input shape:
        `(batch_size, height, width, 3)` (NHWC) float images.

    Output shape:
        `(batch_size, classes)` probabilities with `include_top=True` (see `RevViT`).

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: if an argument is invalid (see `RevViT`).

    Examples:
        >>> model = tf_revnet.models.{name}()
        >>> model.count_params()
        {params}

    References:
        Mangalam et al., "Reversible Vision Transformers", CVPR 2022, Section 3 and Table 1.
    """


def _document(arch):
    if arch.paper_params is not None:
        diff = 100.0 * (arch.params / 1e6 - arch.paper_params) / arch.paper_params
        paper = (f"The published count (mmpretrain's model zoo) is {arch.paper_params}M: "
                 f"{diff:+.2f}%.")
    else:
        paper = "The paper has no such model."
    title = {"RevViTSmall": "RevViT-S", "RevViTBase": "RevViT-B"}.get(arch.name, arch.name)
    role = ("the paper's model at ImageNet size" if arch.paper_params is not None
            else "a reversible ViT for CIFAR-size images")
    doc = _BUILDER_DOC.format(
        title=title, role=role, image_size=arch.image_size, patch_size=arch.patch_size,
        tokens=arch.num_tokens, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, hidden=int(round(arch.mlp_ratio * arch.embed_dim)),
        params=arch.params, classes=arch.classes, paper=paper,
        note=f" {arch.note}" if arch.note else "", input_shape=arch.input_shape,
        default_name=arch.name.lower(), name=arch.name,
    )
    return application._wrap_description(doc)


def make_builder(arch_name):
    """Returns the `keras.applications`-style builder of `VIT_ARCHITECTURES[arch_name]`."""
    arch = VIT_ARCHITECTURES[arch_name]
    default_name = arch_name.lower()

    def builder(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None,
                classes=arch.classes, classifier_activation="softmax", use_custom_gradient=True,
                name=default_name, **kwargs):
        return RevViT(
            arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_ratio,
            include_top=include_top, weights=weights, input_tensor=input_tensor,
            input_shape=arch.input_shape if input_shape is None else input_shape,
            pooling=pooling, classes=classes, classifier_activation=classifier_activation,
            use_custom_gradient=use_custom_gradient, name=name, **kwargs,
        )

    builder.__name__ = builder.__qualname__ = arch_name
    builder.__module__ = RevViT.__module__
    builder.__signature__ = application.builder_signature(
        builder, RevViT, fixed=("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"))
    builder.__doc__ = _document(arch)
    return builder


RevViTSmall = make_builder("RevViTSmall")
RevViTBase = make_builder("RevViTBase")
RevViTCifar = make_builder("RevViTCifar")
