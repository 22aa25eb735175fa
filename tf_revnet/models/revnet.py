"""RevNet builders in the `keras.applications` style: generic `RevNet` and the paper's models."""

import keras

from tf_revnet.layers.residual_block import RESIDUAL_FUNCTIONS, ResidualBlock
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_sequence import ReversibleSequence
from tf_revnet.models import application


def RevNet(
    units,
    widths,
    residual_function="basic",
    strides=None,
    stem="cifar",
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    use_custom_gradient=True,
    name="revnet",
    kernel_regularizer=None,
    batch_norm_momentum=0.99,
    batch_norm_epsilon=1e-3,
):
    """Instantiates a reversible residual network (RevNet) of any depth and width.

    The network is a stem, one stage per entry of `units`, and a pre-activation head. Stage `s` is

    - block 1: a non-reversible `ResidualBlock(split=True)` (the stage transition) that applies the
      stage's stride and changes the channels to `widths[s]` (times 4 for bottlenecks). As in the
      authors' code it keeps the two-stream form `y1 = P(x1) + F(x2)`, `y2 = P(x2) + G(y1)`, with a
      parameter-free shortcut `P` (average pooling and zero-padded channels) for basic residual
      functions and a 1x1 projection for bottlenecks. It cannot be inverted, so its input is kept
      for the backward pass (Section 3.3). Where neither the stride nor the channels change (stage
      1 of RevNet-38 and RevNet-110: 32 -> 32 channels, stride 1) the unit is still built as the
      stage's transition, as in the authors' code, with F skipping its pre-activation; its layout
      and parameters are those of a reversible block.
    - blocks 2..n: one `ReversibleSequence` of `ReversibleBlock`s, `y1 = x1 + F(x2)`,
      `y2 = x2 + G(y1)` (Eq. 1), F and G being residual functions on half the channels. With
      `use_custom_gradient=True` the sequence backpropagates without storing its activations
      (Algorithm 1).

    The stem (`"cifar"`: Conv3x3-BN-ReLU; `"imagenet"`: Conv7x7/2-BN-ReLU-MaxPool3x3/2) ends with
    BN-ReLU, so the first unit skips its pre-activation. The head is BN-ReLU, global average pooling
    and `Dense(classes)`. Convolutions have no bias. Layers are named `f"{name}_stem_..."`,
    `f"{name}_stage{s}_block{b}"` (F and G: `f"{name}_stage{s}_block{b}_f"`/`_g`),
    `f"{name}_stage{s}_reversible"` (the sequence) and `f"{name}_post_bn"`, `f"{name}_predictions"`.

    Args:
        units: sequence of int. Residual units per stage, transition included.
        widths: sequence of int. `[stem, stage 1, stage 2, ...]` channels (`len(units) + 1` values);
            a bottleneck stage outputs `4 * width` channels. Every width must be even (the split).
        residual_function: str. `"basic"` (two 3x3 convolutions) or `"bottleneck"` (1x1, 3x3, 1x1).
            Defaults to `"basic"`.
        strides: sequence of int or None. Stride of each stage's transition. Defaults to `None`:
            1 for the first stage, 2 for the others.
        stem: str. `"cifar"` or `"imagenet"`. Defaults to `"cifar"`.
        include_top: bool. Whether to include the classifier (global average pooling and Dense).
            Defaults to `True`.
        weights: must be `None` (random initialization): there are no pretrained weights.
        input_tensor: optional Keras tensor (the output of `keras.Input()`) or tensor to use as the
            model's input.
        input_shape: optional tuple `(height, width, channels)`; height and width may be `None`.
            Defaults to `(32, 32, 3)` for the CIFAR stem and `(224, 224, 3)` for the ImageNet stem.
        pooling: optional `"avg"` or `"max"`: global pooling of the features when
            `include_top=False`. Defaults to `None` (4D features).
        classes: int. Number of classes when `include_top=True`. Defaults to `None`: 10 for the
            CIFAR stem, 1000 for the ImageNet stem.
        classifier_activation: str or callable. Activation of the classifier; `None` returns logits.
            Defaults to `"softmax"`.
        use_custom_gradient: bool. `True` backpropagates through each stage's reversible blocks
            without storing activations (Algorithm 1); `False` runs ordinary autodiff on the same
            architecture and weights. Defaults to `True`.
        name: str. Name of the model, prefix of its layers' names. Defaults to `"revnet"`.
        kernel_regularizer: optional regularizer for every convolution and the classifier kernel
            (the paper: L2 weight decay 2e-4 on CIFAR, 1e-4 on ImageNet). Defaults to `None`.
        batch_norm_momentum: float. Momentum of every BatchNorm. Defaults to `0.99`.
        batch_norm_epsilon: float. Epsilon of every BatchNorm. Defaults to `1e-3`.

    Input shape:
        `(batch_size, height, width, channels)` (NHWC) float images, in the floatx dtype.

    Output shape:
        `(batch_size, classes)` class probabilities (`include_top=True`); otherwise
        `(batch_size, h, w, features)` or `(batch_size, features)` with `pooling`.

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: if an argument is invalid (the message names it and the received value): for
            example `weights` not `None`, `len(widths) != len(units) + 1`, an odd width, an unknown
            `residual_function`, `stem` or `pooling`.

    Example:

    >>> model = RevNet(units=[2, 2], widths=[16, 16, 32], classes=10)
    >>> keras.ops.shape(model(keras.ops.ones((1, 32, 32, 3))))
    (1, 10)

    References:
        Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
        Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3 and Table 1; the authors' code,
        github.com/renmengye/revnet-public (`resnet/models/revnet_model.py`).
    """
    units, widths, strides = application.check_architecture(
        units, widths, residual_function, strides, stem
    )
    odd = [w for w in widths if w % 2]
    if odd:
        raise ValueError(
            "Every width of a RevNet must be even to split the channels into x1 and x2. "
            f"Received: widths={widths!r}"
        )
    if classes is None:
        classes = 10 if stem == "cifar" else 1000
    application.check_head_args(include_top, weights, pooling, classes)
    if not isinstance(use_custom_gradient, bool):
        raise ValueError(
            "`use_custom_gradient` must be a bool. "
            f"Received: use_custom_gradient={use_custom_gradient!r}"
        )

    default_shape = (32, 32, 3) if stem == "cifar" else (224, 224, 3)
    img_input = application.model_input(input_tensor, input_shape, default_shape)
    bn_kwargs = {"momentum": batch_norm_momentum, "epsilon": batch_norm_epsilon}
    common = dict(kernel_regularizer=kernel_regularizer, **_prefixed(bn_kwargs))
    expansion = 4 if residual_function == "bottleneck" else 1

    x = application.stem(img_input, widths[0], stem, name, kernel_regularizer, bn_kwargs)
    for s, (n_units, width, stride) in enumerate(zip(units, widths[1:], strides), 1):
        filters = width * expansion
        x = ResidualBlock(
            filters,
            residual_function,
            strides=stride,
            preactivate=s > 1,
            split=True,
            name=f"{name}_stage{s}_block1",
            **common,
        )(x)
        if n_units == 1:
            continue
        function = RESIDUAL_FUNCTIONS[residual_function]
        blocks = [
            ReversibleBlock(
                function(name=f"{name}_stage{s}_block{b}_f", **common),
                function(name=f"{name}_stage{s}_block{b}_g", **common),
                name=f"{name}_stage{s}_block{b}",
            )
            for b in range(2, n_units + 1)
        ]
        x = ReversibleSequence(
            blocks, use_custom_gradient=use_custom_gradient, name=f"{name}_stage{s}_reversible"
        )(x)
    x = application.head(
        x, include_top, pooling, classes, classifier_activation, name, kernel_regularizer, bn_kwargs
    )
    return keras.Model(application.model_inputs(input_tensor, img_input), x, name=name)


def _prefixed(bn_kwargs):
    return {f"batch_norm_{key}": value for key, value in bn_kwargs.items()}


RevNet38 = application.make_builder(RevNet, "RevNet38")
RevNet110 = application.make_builder(RevNet, "RevNet110")
RevNet164 = application.make_builder(RevNet, "RevNet164")
RevNet56 = application.make_builder(RevNet, "RevNet56")
RevNet104 = application.make_builder(RevNet, "RevNet104")
