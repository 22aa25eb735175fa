"""tf_revnet: reversible residual networks (RevNet) for TensorFlow/Keras 3.

Reversible blocks (Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017, arXiv:1707.04585) rebuild their inputs from their outputs during the backward
pass, so activation memory does not grow with depth.
"""

__version__ = "0.1.0"

from tf_revnet import callbacks, diagnostics, layers, models
from tf_revnet.layers import *  # noqa: F401,F403
from tf_revnet.layers import __all__ as _layers_all

__all__ = ["callbacks", "diagnostics", "layers", "models", "__version__"] + list(_layers_all)
