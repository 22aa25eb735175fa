"""RevNet builders in the `keras.applications` style: generic `RevNet` and the paper's models."""


from tf_revnet.layers.residual_functions import RESIDUAL_FUNCTIONS
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_block_stack import ReversibleBlockStack
from tf_revnet.layers.reversible_sequence import ReversibleSequence
from tf_revnet.layers.stage_transition import StageTransition
from tf_revnet.layers.stem import Stem
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
    include_preprocessing=False,
    preprocessing_mean=None,
    preprocessing_std=None,
    stack_blocks=True,
    coupling="additive",
):
    """Instantiates a reversible residual network (RevNet) of any depth and width.

    The network is a stem, one stage per entry of `units`, and a pre-activation head. The stem and all
    stages form ONE `ReversibleSequence` (`f"{name}_body"`), so that the whole body backpropagates in
    one memory-saving pass (Algorithm 1) and only the head stores activations. Stage `s` is

    - unit 1, if it changes the stride or the channels: a non-invertible `StageTransition` (two-stream
      `y1 = P(x1) + F(x2)`, `y2 = P(x2) + G(y1)` as in the authors' code, with a parameter-free shortcut
      `P` (average pooling and zero-padded channels) for basic residual functions and a 1x1 projection
      for bottlenecks). The sequence keeps only its input and recomputes it on the way back (Section
      3.3). Where nothing changes (stage 1 of RevNet-38 and RevNet-110: 32 -> 32 channels, stride 1)
      unit 1 is an ordinary `ReversibleBlock`, F skipping its pre-activation after the stem.
    - units 2..n: `ReversibleBlock`s, `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)` (Eq. 1), F and G being
      residual functions on half the channels, rebuilt from their outputs. With `stack_blocks` (the
      default) they are ONE `ReversibleBlockStack` per stage: one variable per weight of the block,
      stacked on a leading axis of size `n - 1`, run by one `tf.while_loop`, so that the traced graph,
      the number of variables and the optimizer's work per step do not grow with depth.

    The stem (`"cifar"`: Conv3x3-BN-ReLU; `"imagenet"`: Conv7x7/2-BN-ReLU-MaxPool3x3/2) is the body's
    first unit and keeps only the image. The head is BN-ReLU, global average pooling and
    `Dense(classes)`. Convolutions have no bias. Layers are named `f"{name}_body"` (the sequence),
    `f"{name}_stem"`, `f"{name}_stage{s}_block{b}"` (units inside the body; F and G:
    `f"{name}_stage{s}_block{b}_f"`/`_g`), `f"{name}_stage{s}_blocks{b}to{n}"` (a stack, whose
    template block is `f"{name}_stage{s}_block"`), `f"{name}_post_bn"` and
    `f"{name}_predictions"`.

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
        include_preprocessing: bool. Whether the model takes raw RGB pixels in [0, 255] and
            standardizes them in its first layer (`f"{name}_preprocessing"`), as Keras' newer
            applications do. Defaults to `False`.
        preprocessing_mean: per-channel sequence on the 0-255 scale, with
            `include_preprocessing`. Defaults to the CIFAR-10 training set's (CIFAR stem) or
            ImageNet's (ImageNet stem).
        preprocessing_std: per-channel sequence on the 0-255 scale, likewise.
        stack_blocks: bool. Store each stage's identical reversible blocks as one
            `ReversibleBlockStack` (stacked weights). `False` makes one `ReversibleBlock` layer, with
            its own variables, per block (graph and variable count then grow with depth). The
            architecture, parameter count and gradients are the same. Defaults to `True`.
        coupling: str or `tf_revnet.layers.Coupling`. The reversible blocks' coupling (see
            `ReversibleBlock`): `"fixed_point"` is the opt-in exact stream (bit-identical rebuilds
            in float32; each block then counts its steps out of the grid's range). Stage
            transitions keep their own floating point additions. Defaults to `"additive"`.

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

    Examples:
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
    for arg, value in (("use_custom_gradient", use_custom_gradient), ("stack_blocks", stack_blocks)):
        if not isinstance(value, bool):
            raise ValueError(f"`{arg}` must be a bool. Received: {arg}={value!r}")
    bn_kwargs = {"momentum": batch_norm_momentum, "epsilon": batch_norm_epsilon}
    common = dict(kernel_regularizer=kernel_regularizer, **_prefixed(bn_kwargs))

    def body(images):
        stages = revnet_units(
            units, widths, residual_function, strides, name, common, stack_blocks=stack_blocks,
            coupling=coupling, by_stage=True,
        )
        body_units = [Stem(widths[0], stem, name=f"{name}_stem", **common)]
        taps = []
        for stage in stages:
            body_units += stage
            taps.append(len(body_units) - 1)  # each stage's output comes out of the backward pass
        features = ReversibleSequence(
            body_units, use_custom_gradient=use_custom_gradient, taps=taps, name=f"{name}_body"
        )(images)
        return features[-1], application.pyramid(features, stem, strides)

    return application.build_network(
        body, stem, include_top, weights, input_tensor, input_shape, pooling, classes,
        classifier_activation, name, kernel_regularizer, bn_kwargs, include_preprocessing,
        preprocessing_mean, preprocessing_std,
    )


def revnet_units(
    units, widths, residual_function, strides, name="revnet", common=None, stack_blocks=True,
    coupling="additive", by_stage=False,
):
    """The units of a RevNet's stages, in order (the stage function of `RevNet`).

    Args:
        units, widths, residual_function, strides: as for `RevNet` (`widths[0]` is the stem's).
        name: str. Prefix of the layer names.
        common: dict of keyword arguments for every residual function and transition
            (`kernel_regularizer`, `batch_norm_momentum`, `batch_norm_epsilon`).
        stack_blocks: bool. One `ReversibleBlockStack` for each stage's run of identical blocks
            (instead of one `ReversibleBlock` per block). Defaults to `True`.
        coupling: str or `tf_revnet.layers.Coupling`. The blocks' coupling. Defaults to
            `"additive"`.
        by_stage: bool. Return one list per stage. Defaults to `False`.

    Returns:
        list of `StageTransition`, `ReversibleBlock` and `ReversibleBlockStack` layers (with
        `by_stage`, a list of such lists, one per stage).
    """
    common = common or {}
    expansion = 4 if residual_function == "bottleneck" else 1
    function = RESIDUAL_FUNCTIONS[residual_function]

    def block(prefix, preactivate=True):
        return ReversibleBlock(
            function(preactivate=preactivate, name=f"{prefix}_f", **common),
            function(name=f"{prefix}_g", **common),
            coupling=coupling,
            name=prefix,
        )

    stages = []
    channels = widths[0]
    for s, (n_units, width, stride) in enumerate(zip(units, widths[1:], strides), 1):
        filters = width * expansion
        prefix = f"{name}_stage{s}"
        layers = []
        stages.append(layers)
        first = 2  # the first block of the stage's run of identical blocks
        if stride != 1 or filters != channels:
            layers.append(
                StageTransition(
                    filters, residual_function, strides=stride, preactivate=s > 1,
                    name=f"{prefix}_block1", **common,
                )
            )
        elif s == 1:  # unit 1 changes nothing: a block, F without pre-activation after the stem
            layers.append(block(f"{prefix}_block1", preactivate=False))
        else:
            first = 1
        if stack_blocks and n_units - first >= 1:
            layers.append(
                ReversibleBlockStack(
                    block(f"{prefix}_block"), depth=n_units - first + 1,
                    name=f"{prefix}_blocks{first}to{n_units}",
                )
            )
        else:
            layers += [block(f"{prefix}_block{b}") for b in range(first, n_units + 1)]
        channels = filters
    return stages if by_stage else [layer for stage in stages for layer in stage]


def _prefixed(bn_kwargs):
    return {f"batch_norm_{key}": value for key, value in bn_kwargs.items()}


RevNet38 = application.make_builder(RevNet, "RevNet38")
RevNet110 = application.make_builder(RevNet, "RevNet110")
RevNet164 = application.make_builder(RevNet, "RevNet164")
RevNet56 = application.make_builder(RevNet, "RevNet56")
RevNet104 = application.make_builder(RevNet, "RevNet104")
