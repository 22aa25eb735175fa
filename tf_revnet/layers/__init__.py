"""Reversible machinery and residual functions (Keras layers).

Nothing here imports `tf_revnet.models` or `training`.
"""

from tf_revnet.layers.coupling import AdditiveCoupling, AffineCoupling, Coupling
from tf_revnet.layers.invertibility import is_invertible
from tf_revnet.layers.momentum import MomentumBlock, MomentumUnit
from tf_revnet.layers.patch_embedding import PatchEmbedding
from tf_revnet.layers.residual_block import ResidualBlock
from tf_revnet.layers.residual_functions import BasicResidualFunction, BottleneckResidualFunction
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_block_stack import ReversibleBlockStack, StackedVariable
from tf_revnet.layers.reversible_sequence import ReversibleSequence
from tf_revnet.layers.shortcut import Shortcut
from tf_revnet.layers.stage_transition import StageTransition
from tf_revnet.layers.stem import Stem
from tf_revnet.layers.transformer_functions import AttentionResidualFunction, MLPResidualFunction
from tf_revnet.layers.two_stream import TwoStreamLayer
from tf_revnet.layers.unit import (
    BlockRecord,
    BlockUnit,
    LoopRecord,
    LoopUnit,
    StoredInputRecord,
    StoredInputUnit,
    Unit,
    UnitValues,
)

__all__ = [
    "AdditiveCoupling",
    "AttentionResidualFunction",
    "BlockRecord",
    "BlockUnit",
    "AffineCoupling",
    "BasicResidualFunction",
    "BottleneckResidualFunction",
    "Coupling",
    "LoopRecord",
    "LoopUnit",
    "MLPResidualFunction",
    "MomentumBlock",
    "StackedVariable",
    "MomentumUnit",
    "PatchEmbedding",
    "ResidualBlock",
    "ReversibleBlock",
    "ReversibleBlockStack",
    "ReversibleSequence",
    "Shortcut",
    "StageTransition",
    "StoredInputRecord",
    "StoredInputUnit",
    "Stem",
    "TwoStreamLayer",
    "Unit",
    "UnitValues",
    "is_invertible",
]
