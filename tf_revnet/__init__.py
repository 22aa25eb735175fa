"""tf_revnet: reversible residual networks (RevNet) for TensorFlow/Keras 3.

Reversible blocks (Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017, arXiv:1707.04585) rebuild their inputs from their outputs during the backward
pass, so activation memory does not grow with depth.

Importing the package sets glibc's mmap threshold (`tf_revnet.memory.configure_allocator`) so that the
process' memory follows the flat live memory; `TF_REVNET_MALLOC_MMAP_THRESHOLD=0` turns that off.
"""

__version__ = "0.2.0"

from tf_revnet import callbacks, diagnostics, layers, memory, models
from tf_revnet.layers import *  # noqa: F401,F403
from tf_revnet.layers import __all__ as _layers_all
from tf_revnet.weight_transfer import transfer_weights

memory.configure_allocator()

__all__ = [
    "callbacks", "diagnostics", "layers", "memory", "models", "transfer_weights", "__version__"
] + list(_layers_all)
