"""The model zoo: the papers' RevNets, their ResNet baselines and RevViTs, built like `keras.applications`.

`tf_revnet.models.get("revnet38")` returns a builder by name; `list_models()` lists the names.
"""

from tf_revnet.models.architectures import (
    ARCHITECTURES,
    VIT_ARCHITECTURES,
    Architecture,
    ViTArchitecture,
)
from tf_revnet.models.decode import CIFAR10_CLASSES, decode_predictions
from tf_revnet.models.registry import get, list_models
from tf_revnet.models.resnet import ResNet, ResNet32, ResNet101, ResNet110, ResNet164
from tf_revnet.models.revnet import RevNet, RevNet38, RevNet56, RevNet104, RevNet110, RevNet164
from tf_revnet.models.revvit import RevViT, RevViTBase, RevViTCifar, RevViTSmall

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CIFAR10_CLASSES",
    "ResNet",
    "ResNet32",
    "ResNet101",
    "ResNet110",
    "ResNet164",
    "RevNet",
    "RevNet38",
    "RevNet56",
    "RevNet104",
    "RevNet110",
    "RevNet164",
    "RevViT",
    "RevViTBase",
    "RevViTCifar",
    "RevViTSmall",
    "VIT_ARCHITECTURES",
    "ViTArchitecture",
    "decode_predictions",
    "get",
    "list_models",
]
