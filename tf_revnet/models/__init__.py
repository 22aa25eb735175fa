"""The paper's model zoo: RevNets and their ResNet baselines, built like `keras.applications`.

`tf_revnet.models.get("revnet38")` returns a builder by name; `list_models()` lists the names.
"""

from tf_revnet.models.architectures import ARCHITECTURES, Architecture
from tf_revnet.models.decode import CIFAR10_CLASSES, decode_predictions
from tf_revnet.models.registry import get, list_models
from tf_revnet.models.resnet import ResNet, ResNet32, ResNet101, ResNet110, ResNet164
from tf_revnet.models.revnet import RevNet, RevNet38, RevNet56, RevNet104, RevNet110, RevNet164

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
    "decode_predictions",
    "get",
    "list_models",
]
