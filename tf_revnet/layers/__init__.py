"""Reversible machinery and residual functions (Keras layers).

Nothing here imports `tf_revnet.models` or `training`.
"""

from tf_revnet.layers.coupling import Coupling
from tf_revnet.layers.invertibility import is_invertible
from tf_revnet.layers.residual_block import ResidualBlock
from tf_revnet.layers.residual_functions import BasicResidualFunction, BottleneckResidualFunction
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_sequence import ReversibleSequence

__all__ = [
    "BasicResidualFunction",
    "BottleneckResidualFunction",
    "Coupling",
    "ResidualBlock",
    "ReversibleBlock",
    "ReversibleSequence",
    "is_invertible",
]
