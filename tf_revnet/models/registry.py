"""Look up the zoo's builders by name: `get("revnet38")`, `list_models()`."""

from tf_revnet.models import resnet, revnet, revvit
from tf_revnet.models.architectures import ARCHITECTURES, VIT_ARCHITECTURES

_MODULES = {True: revnet, False: resnet}


def list_models():
    """Returns the lower-case names of the zoo's models: RevNets, ResNets, then RevViTs.

    Returns:
        list of str: `["revnet38", "revnet110", "revnet164", "revnet56", "revnet104", "resnet32",
        "resnet110", "resnet164", "resnet101", "revvitsmall", "revvitbase", "revvitcifar"]`.

    Examples:
        >>> "revnet38" in tf_revnet.models.list_models()
        True
    """
    return [name.lower() for name in (*ARCHITECTURES, *VIT_ARCHITECTURES)]


def get(name):
    """Returns the builder of a model of the zoo, by case-insensitive name.

    Dashes and underscores are ignored, so `"RevNet38"`, `"revnet38"` and `"revnet-38"` all give
    `tf_revnet.models.RevNet38`, and `"revvit_cifar"` gives `tf_revnet.models.RevViTCifar`.

    Args:
        name: str. A name from `list_models()`.

    Returns:
        The builder function, called as `builder(input_shape=..., classes=..., ...)`.

    Raises:
        ValueError: if `name` is not a model of the zoo; the message lists the valid names.

    Examples:
        >>> model = tf_revnet.models.get("revnet38")(input_shape=(32, 32, 3), classes=10)
    """
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else None
    for arch_name, arch in ARCHITECTURES.items():
        if arch_name.lower() == key:
            return getattr(_MODULES[arch.reversible], arch_name)
    for arch_name in VIT_ARCHITECTURES:
        if arch_name.lower() == key:
            return getattr(revvit, arch_name)
    raise ValueError(
        f"Unknown model name. Valid names: {', '.join(list_models())}. Received: name={name!r}"
    )
