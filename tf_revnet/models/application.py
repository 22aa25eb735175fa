"""The `keras.applications` scaffolding shared by RevNets and ResNets: inputs, stem, head, checks.

Not public API: `tf_revnet.models.RevNet` and `tf_revnet.models.ResNet` call these helpers.
"""

import inspect
import math
import textwrap

import keras

from tf_revnet.models.architectures import ARCHITECTURES

STEMS = ("cifar", "imagenet")
RESIDUAL_FUNCTION_NAMES = ("basic", "bottleneck")


def check_architecture(units, widths, residual_function, strides, stem):
    """Validates a generic architecture; returns `(units, widths, strides)` as tuples of int.

    `strides=None` means 1 for the first stage and 2 for the others.
    """

    def int_tuple(arg, value):
        try:
            values = tuple(value)
        except TypeError:
            values = None
        if not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
        ):
            raise ValueError(
                f"`{arg}` must be a non-empty sequence of positive integers. "
                f"Received: {arg}={value!r}"
            )
        return values

    units = int_tuple("units", units)
    widths = int_tuple("widths", widths)
    if len(widths) != len(units) + 1:
        raise ValueError(
            "`widths` must list the stem's channels and then one width per stage "
            f"(len(units) + 1 = {len(units) + 1} values). Received: widths={widths!r} for "
            f"units={units!r}"
        )
    strides = (1,) + (2,) * (len(units) - 1) if strides is None else int_tuple("strides", strides)
    if len(strides) != len(units):
        raise ValueError(
            f"`strides` must have one value per stage ({len(units)}). Received: strides={strides!r}"
        )
    if residual_function not in RESIDUAL_FUNCTION_NAMES:
        raise ValueError(
            f"`residual_function` must be one of {RESIDUAL_FUNCTION_NAMES}. "
            f"Received: residual_function={residual_function!r}"
        )
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS}. Received: stem={stem!r}")
    return units, widths, strides


#: Per-channel mean and standard deviation of the pixels (0-255) of each stem's data set: CIFAR-10's
#: 50,000 training images, and ImageNet's as `keras.applications` uses them.
PREPROCESSING = {
    "cifar": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


def preprocessing_layer(stem, name, mean=None, std=None):
    """`Normalization` layer mapping raw pixels (0-255) to standardized ones, per channel.

    Raises:
        ValueError: if `mean` or `std` is not a sequence of numbers, or `std` has a value <= 0.
    """
    default_mean, default_std = PREPROCESSING[stem]
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
    try:
        mean, std = [float(m) for m in mean], [float(v) for v in std]
    except (TypeError, ValueError):
        raise ValueError(
            "`preprocessing_mean` and `preprocessing_std` must be sequences of numbers (one per "
            f"channel). Received: preprocessing_mean={mean!r}, preprocessing_std={std!r}"
        ) from None
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise ValueError(
            "`preprocessing_std` must hold one positive value per channel of `preprocessing_mean`. "
            f"Received: preprocessing_mean={mean!r}, preprocessing_std={std!r}"
        )
    return keras.layers.Normalization(
        axis=-1, mean=mean, variance=[v * v for v in std], name=f"{name}_preprocessing"
    )


def check_head_args(include_top, weights, pooling, classes):
    """Validates the `keras.applications` arguments shared by every builder."""
    if weights is not None:
        raise ValueError(
            "`weights` must be None (random initialization): tf_revnet ships no pretrained "
            "weights; load your own with `model.load_weights(path)`. "
            f"Received: weights={weights!r}"
        )
    if not isinstance(include_top, bool):
        raise ValueError(f"`include_top` must be a bool. Received: include_top={include_top!r}")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if include_top and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise ValueError(
            "`classes` must be a positive integer when `include_top=True`. "
            f"Received: classes={classes!r}"
        )


def model_input(input_tensor, input_shape, default_shape):
    """Returns the model's input tensor (NHWC), as `keras.applications` builders do."""
    if input_tensor is not None and keras.backend.is_keras_tensor(input_tensor):
        return input_tensor
    if input_shape is None:
        input_shape = tuple(input_tensor.shape[1:]) if input_tensor is not None else default_shape
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        input_shape = None
    if (
        input_shape is None
        or len(input_shape) != 3
        or not isinstance(input_shape[-1], int)
        or input_shape[-1] < 1
    ):
        raise ValueError(
            "`input_shape` must be `(height, width, channels)` (NHWC without the batch size; "
            "height and width may be None) with a known number of channels. "
            f"Received: input_shape={input_shape!r}"
        )
    if input_tensor is None:
        return keras.Input(shape=input_shape)
    return keras.Input(tensor=input_tensor, shape=input_shape)


def model_inputs(input_tensor, img_input):
    """The model's inputs: `img_input`, or the sources of a given Keras `input_tensor`."""
    if input_tensor is None:
        return img_input
    return keras.utils.get_source_inputs(input_tensor)


def build_network(
    body_fn,
    stem,
    include_top,
    weights,
    input_tensor,
    input_shape,
    pooling,
    classes,
    classifier_activation,
    name,
    kernel_regularizer,
    bn_kwargs,
    include_preprocessing=False,
    preprocessing_mean=None,
    preprocessing_std=None,
):
    """The generic `keras.applications` model: input, `body_fn`, pre-activation head.

    With `include_preprocessing` the model takes raw RGB pixels in [0, 255] and its first layer
    (`f"{name}_preprocessing"`, a `keras.layers.Normalization`) subtracts `preprocessing_mean` and
    divides by `preprocessing_std` (per channel, on the 0-255 scale; defaults: the CIFAR-10 training
    set's for the CIFAR stem, ImageNet's as in `keras.applications` for the ImageNet stem).

    `RevNet` and `ResNet` differ only in `body_fn(images) -> (features, pyramid_outputs)` (stem and
    stages; `pyramid_outputs` as `pyramid` makes it, set on the model as `model.pyramid_outputs`);
    this function
    validates the shared arguments, makes the input and adds the head (as `keras.applications`'
    `ResNet(stack_fn, ...)`).

    Returns:
        A functional `keras.Model` named `name`.

    Raises:
        ValueError: if a shared argument is invalid (see `check_head_args`, `model_input`).
    """
    check_head_args(include_top, weights, pooling, classes)
    default_shape = (32, 32, 3) if stem == "cifar" else (224, 224, 3)
    img_input = model_input(input_tensor, input_shape, default_shape)
    x = img_input
    if include_preprocessing:
        x = preprocessing_layer(stem, name, preprocessing_mean, preprocessing_std)(x)
    elif preprocessing_mean is not None or preprocessing_std is not None:
        raise ValueError(
            "`preprocessing_mean`/`preprocessing_std` need `include_preprocessing=True`."
        )
    x, pyramid_outputs = body_fn(x)
    x = head(
        x, include_top, pooling, classes, classifier_activation, name, kernel_regularizer, bn_kwargs
    )
    model = keras.Model(model_inputs(input_tensor, img_input), x, name=name)
    model.pyramid_outputs = pyramid_outputs
    return model


#: Spatial stride of each stem (the ImageNet stem: a stride-2 convolution and stride-2 max pooling).
STEM_STRIDES = {"cifar": 1, "imagenet": 4}


def pyramid(features, stem, strides):
    """`{"P{level}": feature}` of the stages' outputs, level = log2 of the cumulative stride.

    The keras-hub convention for backbones (`Backbone.pyramid_outputs`): a CIFAR RevNet's stages at
    strides 1, 2, 4 are P0, P1, P2; an ImageNet one's at strides 4 to 32 are P2 to P5. A later stage
    at the same stride replaces an earlier one.

    Args:
        features: list of KerasTensors, each stage's output `(N, H / stride, W / stride, C)`.
        stem: str. The stem kind (`"cifar"` or `"imagenet"`).
        strides: list of int, each stage's stride.

    Returns:
        dict from `"P{level}"` to KerasTensor.
    """
    stride, levels = STEM_STRIDES[stem], {}
    for feature, stage_stride in zip(features, strides):
        stride *= stage_stride
        levels[f"P{int(math.log2(stride))}"] = feature
    return levels


def head(
    x,
    include_top,
    pooling,
    classes,
    classifier_activation,
    name,
    kernel_regularizer=None,
    bn_kwargs=None,
):
    """Pre-activation head: BN-ReLU, then global average pooling and Dense (or `pooling`)."""
    x = keras.layers.BatchNormalization(name=f"{name}_post_bn", **(bn_kwargs or {}))(x)
    x = keras.layers.Activation("relu", name=f"{name}_post_relu")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_avg_pool")(x)
        policy = keras.config.dtype_policy()
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_regularizer=kernel_regularizer,
            name=f"{name}_predictions",
            # Under mixed precision the classifier (softmax) computes in the variable dtype
            # (float32), as the Keras mixed-precision guide recommends for the output layer.
            dtype=policy.variable_dtype if policy.compute_dtype != policy.variable_dtype else None,
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name=f"{name}_max_pool")(x)
    return x


_BUILDER_DOC = """Instantiates {title}, {role}.

    Architecture: {units} {residual_function} units per stage, widths {widths} ([stem, stage 1,
    ...]{expansion_note}), strides {strides}, {stem_text}; {depth} weighted layers.
    {structure}

    Parameters: {params:,} with {classes} classes (`count_params()`, BatchNorm moving statistics
    included; {trainable:,} trainable). {paper_params}
    {paper_result}{note}

    Args:
        include_top: bool. Whether to include the classifier. Defaults to `True`.
        weights: must be `None` (random initialization): there are no pretrained weights.
        input_tensor: optional Keras tensor or tensor to use as the model's input.
        input_shape: optional `(height, width, channels)`; height and width may be `None`.
            Defaults to `{input_shape}`.
        pooling: optional `"avg"` or `"max"` global pooling when `include_top=False`.
        classes: int. Number of classes. Defaults to `{classes}`.
        classifier_activation: str or callable; `None` returns logits. Defaults to `"softmax"`.
        use_custom_gradient: bool. {custom_gradient} Defaults to `True`.
        name: str. Model name and layer-name prefix. Defaults to `"{default_name}"`.

    The further keyword-only arguments are `{generic}`'s (`include_preprocessing`,
    `preprocessing_mean`, `preprocessing_std`, `kernel_regularizer`, `batch_norm_momentum`,
    `batch_norm_epsilon`, ...), documented there; the signature lists them.

    Input shape:
        `(batch_size, height, width, 3)` (NHWC) float images, in the floatx dtype.

    Output shape:
        `(batch_size, classes)` probabilities with `include_top=True` (see `{generic}`).

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: if an argument is invalid (see `{generic}`).

    Examples:
        >>> model = tf_revnet.models.{name}(input_shape=(None, None, 3))
        >>> model.count_params()
        {params}

    References:
        Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
        Activations", NeurIPS 2017 (arXiv:1707.04585), Table 1 and Table {result_table}.
    """

_REVNET_STRUCTURE = (
    "The first unit of each stage is the non-reversible two-stream transition of the authors' "
    "code (see `RevNet`); the stage's other units form one `ReversibleSequence`."
)
_RESNET_STRUCTURE = "Every unit is a full-width pre-activation `ResidualBlock` (see `ResNet`)."


def _paper_texts(arch):
    """The docstring's sentences on the paper's parameter count and result for `arch`."""
    if arch.paper_params is not None:
        diff = 100.0 * (arch.params / 1e6 - arch.paper_params) / arch.paper_params
        trainable_diff = (
            100.0 * (arch.trainable_params / 1e6 - arch.paper_params) / arch.paper_params
        )
        paper_params = (
            f"The paper's Table 1 gives {arch.paper_params}M: {diff:+.2f}% ({trainable_diff:+.2f}% "
            "counting trainable weights only; the paper rounds to two decimals and does not say "
            "whether it counts BatchNorm statistics)."
        )
    else:
        paper_params = "The paper's Table 1 gives no count for this model."
    if arch.paper_errors:
        errors = ", ".join(f"{_DATASET_NAMES[k]} {v:.2f}%" for k, v in arch.paper_errors.items())
        paper_result = f"The paper's error: {errors} (Table {3 if arch.stem == 'imagenet' else 2})."
    else:
        paper_result = "The paper reports no result for this model."
    return paper_params, paper_result


def _wrap_description(doc):
    """`doc` with its description (everything before `Args:`) wrapped at 100 columns."""
    head, sep, rest = doc.partition("\n    Args:")
    summary, _, body = head.partition("\n\n")
    paragraphs = [
        textwrap.fill(
            " ".join(p.split()), width=100, initial_indent="    ", subsequent_indent="    "
        )
        for p in body.split("\n\n")
    ]
    return summary + "\n\n" + "\n\n".join(paragraphs) + "\n" + sep + rest


def _document(arch, generic_name, default_name):
    """The docstring of the builder of `arch`, from `_BUILDER_DOC`."""
    imagenet = arch.stem == "imagenet"
    paper_params, paper_result = _paper_texts(arch)
    doc = _BUILDER_DOC.format(
        title=f"{'RevNet' if arch.reversible else 'ResNet'}-{arch.depth}",
        role=(
            f"the paper's {'ImageNet' if imagenet else 'CIFAR'} "
            + ("RevNet" if arch.reversible else "ResNet baseline")
            + (" (Table 1)" if arch.paper_params is not None else "")
        ),
        note=f" {arch.note}" if arch.note else "",
        units="-".join(map(str, arch.units)),
        residual_function=arch.residual_function,
        widths=list(arch.widths),
        expansion_note=(
            "; a stage outputs 4x its width" if arch.residual_function == "bottleneck" else ""
        ),
        strides="-".join(map(str, arch.strides)),
        stem_text=(
            "a 7x7 stride-2 convolution and max pooling as stem"
            if imagenet
            else "a 3x3 convolution as stem"
        ),
        depth=arch.depth,
        structure=_REVNET_STRUCTURE if arch.reversible else _RESNET_STRUCTURE,
        params=arch.params,
        trainable=arch.trainable_params,
        classes=arch.classes,
        paper_params=paper_params,
        paper_result=paper_result,
        input_shape=arch.input_shape,
        custom_gradient=(
            "`False` runs ordinary autodiff on the same architecture and weights."
            if arch.reversible
            else "Accepted for the same interface as the RevNets; ResNets always use ordinary "
            "backpropagation."
        ),
        default_name=default_name,
        generic=generic_name,
        name=arch.name,
        result_table=3 if imagenet else 2,
    )
    return _wrap_description(doc)


_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet top-1"}


def builder_signature(builder, generic, fixed):
    """`builder`'s own parameters, then `generic`'s that `**kwargs` passes on (keyword-only).

    Args:
        builder: the named builder, `def builder(..., **kwargs)`.
        generic: the generic function it calls (`RevNet`, `ResNet`, `RevViT`).
        fixed: names of `generic`'s parameters that the architecture sets (not the user).

    Returns:
        `inspect.Signature`, for `builder.__signature__` (`help()` and `inspect` show every
        argument the builder takes).
    """
    own = [p for p in inspect.signature(builder).parameters.values()
           if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in own} | set(fixed)
    passed_on = [p.replace(kind=p.KEYWORD_ONLY)
                 for p in inspect.signature(generic).parameters.values()
                 if p.name not in taken and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return inspect.Signature(own + passed_on)


def make_builder(generic, arch_name):
    """Returns the `keras.applications`-style builder of `ARCHITECTURES[arch_name]`."""
    arch = ARCHITECTURES[arch_name]
    default_name = arch_name.lower()

    def builder(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=arch.classes,
        classifier_activation="softmax",
        use_custom_gradient=True,
        name=default_name,
        **kwargs,
    ):
        return generic(
            arch.units,
            arch.widths,
            residual_function=arch.residual_function,
            strides=arch.strides,
            stem=arch.stem,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            use_custom_gradient=use_custom_gradient,
            name=name,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = arch_name
    builder.__module__ = generic.__module__
    builder.__signature__ = builder_signature(
        builder, generic, fixed=("units", "widths", "residual_function", "strides", "stem"))
    builder.__doc__ = _document(arch, generic.__name__, default_name)
    return builder
