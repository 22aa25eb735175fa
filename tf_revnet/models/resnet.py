"""The paper's ResNet baselines in the `keras.applications` style: generic `ResNet` and builders.

These are the pre-activation ResNets the paper compares RevNets with (Table 1), built from the same
residual functions and shortcuts as the RevNets, with ordinary backpropagation.
"""


from tf_revnet.layers.residual_block import ResidualBlock
from tf_revnet.layers.stem import Stem
from tf_revnet.models import application


def ResNet(
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
    name="resnet",
    kernel_regularizer=None,
    batch_norm_momentum=0.99,
    batch_norm_epsilon=1e-3,
    include_preprocessing=False,
    preprocessing_mean=None,
    preprocessing_std=None,
):
    """Instantiates a pre-activation residual network (the RevNet paper's baseline).

    A stem, one stage per entry of `units` and a pre-activation head, as in `RevNet`, but every unit
    is a full-width `ResidualBlock`: `y = shortcut(x) + F(x)`. The first unit of each stage applies
    the stride and the channel change, with a parameter-free shortcut (average pooling and
    zero-padded channels) for basic residual functions and a 1x1 projection for bottlenecks, as in
    the authors' code. Layers are named `f"{name}_stage{s}_block{b}"`.

    Args:
        units: sequence of int. Residual units per stage.
        widths: sequence of int. `[stem, stage 1, stage 2, ...]` channels (`len(units) + 1` values);
            a bottleneck stage outputs `4 * width` channels.
        residual_function: str. `"basic"` or `"bottleneck"`. Defaults to `"basic"`.
        strides: sequence of int or None. Stride of each stage's first unit. Defaults to `None`:
            1 for the first stage, 2 for the others.
        stem: str. `"cifar"` (Conv3x3-BN-ReLU) or `"imagenet"` (Conv7x7/2-BN-ReLU-MaxPool3x3/2).
            Defaults to `"cifar"`.
        include_top: bool. Whether to include the classifier. Defaults to `True`.
        weights: must be `None` (random initialization): there are no pretrained weights.
        input_tensor: optional Keras tensor or tensor to use as the model's input.
        input_shape: optional tuple `(height, width, channels)`; height and width may be `None`.
            Defaults to `(32, 32, 3)` for the CIFAR stem and `(224, 224, 3)` for the ImageNet stem.
        pooling: optional `"avg"` or `"max"` global pooling when `include_top=False`.
        classes: int. Number of classes. Defaults to `None`: 10 (CIFAR stem) or 1000 (ImageNet).
        classifier_activation: str or callable; `None` returns logits. Defaults to `"softmax"`.
        use_custom_gradient: bool. Accepted for the same interface as `RevNet`; a ResNet has no
            reversible blocks and always uses ordinary backpropagation. Defaults to `True`.
        name: str. Model name and layer-name prefix. Defaults to `"resnet"`.
        kernel_regularizer: optional regularizer for every convolution and the classifier kernel.
            Defaults to `None`.
        batch_norm_momentum: float. Momentum of every BatchNorm. Defaults to `0.99`.
        batch_norm_epsilon: float. Epsilon of every BatchNorm. Defaults to `1e-3`.
        include_preprocessing: bool. Whether the model takes raw RGB pixels in [0, 255] and
            standardizes them in its first layer (`f"{name}_preprocessing"`), as Keras' newer
            applications do. Defaults to `False`.
        preprocessing_mean: per-channel sequence on the 0-255 scale, with
            `include_preprocessing`. Defaults to the CIFAR-10 training set's (CIFAR stem) or
            ImageNet's (ImageNet stem).
        preprocessing_std: per-channel sequence on the 0-255 scale, likewise.

    Input shape:
        `(batch_size, height, width, channels)` (NHWC) float images, in the floatx dtype.

    Output shape:
        `(batch_size, classes)` class probabilities (`include_top=True`); otherwise
        `(batch_size, h, w, features)` or `(batch_size, features)` with `pooling`.

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: if an argument is invalid (the message names it and the received value).

    Examples:
        >>> model = ResNet(units=[2, 2], widths=[16, 16, 32])
        >>> keras.ops.shape(model(keras.ops.ones((1, 32, 32, 3))))
        (1, 10)

    References:
        - He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
        - Gomez et al., "The Reversible Residual Network", NeurIPS 2017 (arXiv:1707.04585), Table 1.
    """
    units, widths, strides = application.check_architecture(
        units, widths, residual_function, strides, stem
    )
    if classes is None:
        classes = 10 if stem == "cifar" else 1000
    bn_kwargs = {"momentum": batch_norm_momentum, "epsilon": batch_norm_epsilon}
    common = dict(
        kernel_regularizer=kernel_regularizer,
        batch_norm_momentum=batch_norm_momentum,
        batch_norm_epsilon=batch_norm_epsilon,
    )
    expansion = 4 if residual_function == "bottleneck" else 1

    def body(images):
        x = Stem(widths[0], stem, name=f"{name}_stem", **common)(images)
        features = []
        for s, (n_units, width, stride) in enumerate(zip(units, widths[1:], strides), 1):
            for b in range(1, n_units + 1):
                x = ResidualBlock(
                    width * expansion,
                    residual_function,
                    strides=stride if b == 1 else 1,
                    preactivate=not (s == 1 and b == 1),
                    name=f"{name}_stage{s}_block{b}",
                    **common,
                )(x)
            features.append(x)
        return x, application.pyramid(features, stem, strides)

    return application.build_network(
        body, stem, include_top, weights, input_tensor, input_shape, pooling, classes,
        classifier_activation, name, kernel_regularizer, bn_kwargs, include_preprocessing,
        preprocessing_mean, preprocessing_std,
    )


ResNet32 = application.make_builder(ResNet, "ResNet32")
ResNet110 = application.make_builder(ResNet, "ResNet110")
ResNet164 = application.make_builder(ResNet, "ResNet164")
ResNet101 = application.make_builder(ResNet, "ResNet101")
