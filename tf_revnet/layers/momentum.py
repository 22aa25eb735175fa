"""Momentum residual blocks: any residual function F made reversible with a velocity stream.

Sander, Ablin, Blondel, Peyré, "Momentum Residual Neural Networks", ICML 2021 (arXiv:2102.07870),
Section 3, Eq. 4-5. A momentum block keeps a position `x` and a velocity `v` and computes

    v' = gamma * v + (1 - gamma) * F(x)
    x' = x + v'

whose inverse needs F once and no other function (Eq. 5):

    x = x' - v'
    v = (v' - (1 - gamma) * F(x)) / gamma

Unlike a RevNet block (two functions F, G on half the channels, Gomez et al. 2017), one residual
function acts on the whole position, and the velocity is the second stream. In `tf_revnet`'s
two-stream layout the stream is the pair `(x1, x2) := (x, v)` of equal shape, split on `axis`.

Why a layer and not a `Coupling`: a coupling joins one half with one residual output (`couple(x, h)`)
and a `ReversibleBlock` applies two of them with F and G. Momentum needs one residual function, mixes
both streams in one step (`x' = x + gamma v + (1 - gamma) F(x)`) and divides by `gamma` in the
inverse, so it is its own unit kind (`MomentumUnit`), in the protocol of `tf_revnet.layers.unit`.

Rebuild error: each inverse step divides the velocity by `gamma`, so float rounding is amplified by
up to `1 / gamma` per block (`rebuild_error_bound`); `gamma` near 1 (0.9, the paper's default) keeps
it small, `gamma` near 0 makes deep stacks inexact (the paper's Section 3.3 discusses the same).
"""

import math

import keras
import numpy as np
from keras import ops

from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.reversible_block import _shapes_match
from tf_revnet.layers.two_stream import TwoStreamLayer
from tf_revnet.layers.utils import build_sublayer

__all__ = ["MomentumBlock", "MomentumUnit", "rebuild_error_bound"]


def _check_gamma(gamma):
    if (isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating))
            or not math.isfinite(gamma) or not 0.0 < gamma <= 1.0):
        raise ValueError(
            "`gamma` must be a number in (0, 1] (the momentum term; 0 is an ordinary, "
            "non-invertible residual block). Received: gamma=" + repr(gamma)
        )
    return float(gamma)


def rebuild_error_bound(gamma, depth, dtype="float32"):
    """First-order bound on the rebuild error of `depth` momentum blocks, relative to the stream.

    Rounding the output of one block by `u` (the unit roundoff of `dtype`, 2^-24 for float32) changes
    the input rebuilt `k` blocks further down by at most `u * S_k` times the stream's magnitude, where
    `S_k = sum_{j=0}^{k} gamma^-j` (the norm of the inverse steps' product when F's contribution is
    small: the velocity is divided by `gamma` at every step and the position sums the velocities). A
    rounding is made at each of the `depth` blocks (forward and inverse), so

        max |x_rebuilt - x| / max |stream|  <=  2 * depth * u * S_depth

    to first order, with `S_depth = depth + 1` for `gamma = 1` and about `gamma^-depth / (1 - gamma)`
    for `gamma < 1`. F adds a factor `(1 + (1 - gamma) * Lip(F))` per block, close to 1 for the
    paper's `gamma = 0.9` and normalised residual functions. The tests check measured float32
    errors against this bound with a float64 reference.

    Args:
        gamma: float in (0, 1]. The blocks' momentum term.
        depth: int >= 1. Number of blocks rebuilt in sequence.
        dtype: str. Floating point dtype of the stream. Defaults to `"float32"`.

    Returns:
        float. The bound on the relative (max-abs over max-abs) rebuild error.

    Raises:
        ValueError: if `gamma` is not in (0, 1] or `depth` is not a positive int.
    """
    gamma = _check_gamma(gamma)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`depth` must be a positive int. Received: depth={depth!r}")
    u = float(np.finfo(np.dtype(dtype)).eps) / 2
    s = depth + 1.0 if gamma == 1.0 else sum(gamma ** -j for j in range(depth + 1))
    return 2.0 * depth * u * s


@keras.saving.register_keras_serializable(package="tf_revnet")
class MomentumBlock(TwoStreamLayer):
    """Momentum residual block: a position/velocity stream made reversible with one function F.

    The input is split on `axis` into the position `x` and the velocity `v` (equal halves), and

        v' = gamma * v + (1 - gamma) * F(x)
        x' = x + v'

    returned as `concat([x', v'], axis)`. The inverse is exact up to rounding amplified by `1 / gamma`
    per block (`tf_revnet.layers.momentum.rebuild_error_bound`):

        x = x' - v'
        v = (v' - (1 - gamma) * F(x)) / gamma

    `gamma = 1` makes F irrelevant (`x' = x + v`); `gamma` near 0 approaches an ordinary, not
    invertible, residual block `x' = x + F(x)`. Put blocks in a `tf_revnet.layers.ReversibleSequence`
    to backpropagate without storing activations (the sequence rebuilds each block's input from its
    output and recomputes F once per block); consecutive blocks of one structure run as one
    `tf.while_loop`. To start from zero velocity, put a layer before the first block that
    concatenates `[x, zeros_like(x)]` on `axis`.

    Args:
        f: `keras.layers.Layer`. The residual function; maps a half (the position) of shape
            `(..., C/2)` to the same shape (no stride, no change of channels).
        gamma: float in (0, 1]. The momentum term. Defaults to `0.9` (the paper's).
        axis: int. The axis split into `x` and `v`. Defaults to `-1`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of rank >= 2, e.g. NHWC `(N, H, W, C)` with `C` even: `[x, v]`.
        training: bool or None. Passed to F (BatchNorm, Dropout).

    Input shape:
        Any shape whose size on `axis` is even, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape. Output dtype: `stream_dtype` (the policy's variable dtype: float32 under
        mixed precision, where only F computes in low precision).

    Raises:
        ValueError: if `f` is not a Keras layer, or `gamma` is not a number in (0, 1] (naming it);
            on build, if the input rank is < 2, the size on `axis` is unknown or odd, or F does not
            keep the half's shape; on call, if the input is not floating point.

    Examples:
        >>> from tf_revnet.layers import BasicResidualFunction, MomentumBlock, ReversibleSequence
        >>> blocks = [MomentumBlock(BasicResidualFunction(16), gamma=0.9) for _ in range(4)]
        >>> x = keras.random.normal((2, 8, 8, 32))          # [position, velocity], 16 channels each
        >>> y = ReversibleSequence(blocks)(x, training=True)
        >>> x_rebuilt = blocks[0].inverse(blocks[0](x, training=True), training=True)

    References:
        Sander et al., "Momentum Residual Neural Networks", ICML 2021, Section 3, Eq. 4-5.
    """

    invertible = True

    def __init__(self, f, gamma=0.9, axis=-1, **kwargs):
        super().__init__(axis=axis, **kwargs)
        if not isinstance(f, keras.layers.Layer):
            raise ValueError(
                "`f` must be a keras.layers.Layer (the residual function F). "
                f"Received: f={f!r} of type {type(f).__name__}"
            )
        self.f = f
        self.gamma = _check_gamma(gamma)

    def build(self, input_shape):
        half_shape = self.half_shape(input_shape)
        out_shape = tuple(build_sublayer(self.f, half_shape, self.stream_dtype).shape)
        if not _shapes_match(out_shape, half_shape):
            raise ValueError(
                f"Residual function F (`f`, layer '{self.f.name}') must map a half of shape "
                f"{half_shape} to the same shape for a momentum block, but it returns shape "
                f"{out_shape}. A reversible block cannot change the shape (no stride > 1, no change "
                "of channels): use a non-reversible unit (tf_revnet.layers.StageTransition) for "
                "downsampling."
            )
        axis = self.split_axis(len(half_shape))
        self.input_spec = keras.InputSpec(
            ndim=len(half_shape), axes={self.axis: 2 * half_shape[axis]}
        )
        self.built = True

    # ----------------------------------------------------------------------------------------------
    # Eq. 4 and Eq. 5 on the two streams.

    def step(self, x, v, h):
        """Eq. 4 given `h = F(x)`: returns `(x', v')` in the dtype of `x`."""
        v_new = self.gamma * v + (1.0 - self.gamma) * ops.cast(h, v.dtype)
        return x + v_new, v_new

    def unstep(self, y, v_new, h):
        """Eq. 5's velocity given the rebuilt `x`'s `h = F(x)`: `v = (v' - (1 - gamma) h) / gamma`."""
        del y
        return (v_new - (1.0 - self.gamma) * ops.cast(h, v_new.dtype)) / self.gamma

    def forward(self, x, v, training=None):
        """Eq. 4 on the streams: returns `(x', v')`.

        Args:
            x: float tensor of the half shape, e.g. `(N, H, W, C/2)`, in `stream_dtype`.
            v: float tensor of the same shape and dtype as `x` (the velocity).
            training: bool or None, passed to F.
        """
        return self.step(x, v, self.f(x, training=training))

    def inverse_halves(self, x_new, v_new, training=None):
        """Eq. 5: returns `(x, v)`. Runs F as it is (variable updates apply); see `inverse`."""
        x = x_new - v_new
        return x, self.unstep(x_new, v_new, self.f(x, training=training))

    def call(self, inputs, training=None):
        self.check_input(inputs)
        return self.merge(*self.forward(*self.split(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.stream_dtype)

    def inverse(self, outputs, training=None):
        """Rebuilds the block's inputs `[x, v]` from its outputs (Eq. 5), without side effects.

        F runs inside a `keras.StatelessScope` (BatchNorm statistics and seed states unchanged); pass
        the `training` value of the forward call (see `ReversibleBlock.inverse`).

        Args:
            outputs: float tensor `(..., C)`, the block's output `[x', v']`.
            training: bool or None, passed to F.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.
        """
        outputs = self.check_input(backend.read(outputs))
        with keras.StatelessScope():
            return self.merge(*self.inverse_halves(*self.split(outputs), training=training))

    def reversible_unit(self):
        """The block as a unit of `ReversibleSequence`: a `MomentumUnit`."""
        return MomentumUnit(self)

    def get_config(self):
        config = super().get_config()
        config.update({"f": keras.saving.serialize_keras_object(self.f), "gamma": self.gamma})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        f = config.pop("f")
        if not isinstance(f, keras.layers.Layer):
            f = keras.saving.deserialize_keras_object(f)
        return cls(f=f, **config)


class MomentumUnit(unit_lib.Unit):
    """A `MomentumBlock` as a unit: Eq. 4 forward, Eq. 5 rebuild, one recompute of F backward.

    `x` and `y` are the pairs `(x, v)` and `(x', v')` in the block's `stream_dtype`. The record is a
    `tf_revnet.layers.unit.BlockRecord`: the state and global seed state F saw (`state`, `rng`), and
    the state after F (`mid_state`, `mid_rng`, what a second function would see; kept so that a run of
    identical momentum blocks loops through `LoopUnit` like reversible blocks). No activation is kept.

    References:
        Sander et al., "Momentum Residual Neural Networks", ICML 2021, Eq. 4-5; Gomez et al., "The
        Reversible Residual Network", NeurIPS 2017, Algorithm 1 (the backward step's shape).
    """

    invertible = True

    @property
    def signature(self):
        return unit_lib.structure_signature(self.layer, self.trainable + self.state)

    def forward(self, values, x, training=True):
        block = self.layer
        position, velocity = x
        with self.scope(values) as scope:
            h = block.f(position, training=training)
            after = self.values_after(scope, values)
        y = block.step(position, velocity, h)
        return y, unit_lib.BlockRecord(values.state, values.rng, after.state, after.rng), after

    def inverse(self, values, y, training=None):
        with self.scope(values):
            return self.layer.inverse_halves(*y, training=training)

    def backward(self, values, record, y, dy, training=True):
        """Rebuild `x = x' - v'`, recompute `h = F(x)`, rebuild `v`, backpropagate Eq. 4."""
        block, gamma = self.layer, self.layer.gamma
        (x_new, v_new), (dx_new, dv_new) = y, dy
        # Rebuild only once the gradient from above exists (else a graph runs every rebuild at once).
        x_new, v_new = backend.after([dx_new, dv_new], (x_new, v_new))
        x = x_new - v_new  # a primal of the vjp below (no stop_gradient: gradients of gradients)
        pre = values.replace(state=record.state, rng=record.rng)
        # dL/dv' in total: directly, and through x' = x + v'.
        dv_total = dv_new + dx_new

        def residual(x, weights):
            with self.scope(pre.replace(weights=weights)):
                return block.f(x, training=training)

        h, pullback = backend.vjp(residual, x, tuple(pre.weights))
        # Eq. 5's velocity, from the recomputed F(x) (no gradient flows through the rebuild).
        v = block.unstep(x_new, v_new, h)
        dx_through_f, dweights = pullback(ops.cast((1.0 - gamma) * dv_total, h.dtype))
        # x' = x + v', v' = gamma v + (1 - gamma) F(x).
        dx = dx_new + ops.cast(dx_through_f, x.dtype)
        dv = gamma * dv_total
        return (x, v), (dx, dv), list(dweights)
