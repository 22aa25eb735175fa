"""Coupling laws that join a half x with a residual function's output h.

A reversible block (Gomez et al., 2017, Section 3.1, Eq. 1-2) computes `y1 = couple(x1, F(x2))` and
`y2 = couple(x2, G(y1))`; it is invertible for any F and G because each coupling law is invertible in its
first argument for a fixed `h`.

- `AdditiveCoupling` (the paper's, Eq. 1): `couple(x, h) = x + h`, `uncouple(y, h) = y - h`.
- `AffineCoupling` (Dinh et al., "Density estimation using Real NVP", 2017, Eq. 4-5):
  `couple(x, h) = x * exp(s) + t`, `uncouple(y, h) = (y - t) * exp(-s)`, where `t` and the raw scale
  `r` are `split(h, 2, axis)` and `s = clamp * tanh(r / clamp)` is soft-clamped to `(-clamp, clamp)`
  (as in Glow-style coupling blocks), so `exp(s)` can neither overflow nor erase `x`: unclamped, an
  untrained F with large outputs made the inverse lose all precision (relative error > 10 in float64).

Couplings are small serializable objects: a block accepts one by name (`"additive"`, `"affine"`) or as an
instance (`AffineCoupling(clamp=3.0)`), and saves it in its config.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_revnet")
class Coupling:
    """Base class: an invertible join of a half `x` with a residual function's output `h`.

    Subclasses implement `couple(x, h, axis)`, `uncouple(y, h, axis)` and `residual_size(half_size)`.
    `x`, `y` are float tensors of the half shape (e.g. NHWC `(N, H, W, C/2)`), `h` the residual
    function's output; the result has the dtype of `x` (`h` is cast to it).

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 1-2.
    """

    name = None

    def quantize(self, x):
        """Puts the residual stream on the law's grid (identity unless the law keeps one)."""
        return x

    def residual_size(self, half_size):
        """Size of `h` on the split axis for a half of `half_size` (int) channels."""
        raise NotImplementedError

    def couple(self, x, h, axis=-1):
        """Forward law; returns a tensor of the shape and dtype of `x`."""
        raise NotImplementedError

    def uncouple(self, y, h, axis=-1):
        """Exact inverse of `couple` in its first argument."""
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="tf_revnet")
class AdditiveCoupling(Coupling):
    """The paper's additive coupling (Eq. 1-2): `y = x + h`, `x = y - h`; `h` has the shape of `x`.

    With `grid_bits=k` the residual stream is kept on the fixed-point grid `2^-k`: the stream is rounded
    to it once (`quantize`) and `h` is rounded to it before it is added, `y = x + q(h)` with
    `q(h) = round(h * 2^k) / 2^k` (the gradient passes straight through `q`). Sums and differences of
    grid values below `2^(p - k)` in magnitude (`p` = 24 significant bits for float32) are exact, so
    `y - q(h)` rebuilds `x` bit for bit and F and G see exactly the inputs of the forward pass. That
    makes reversible backprop under mixed precision as accurate as plain low-precision backprop (a
    float32 rebuild that is off by one rounding can otherwise round to another bf16/fp16 value inside F
    or G). `ReversibleBlock` uses `grid_bits=12` by default under `mixed_float16`/`mixed_bfloat16`
    (exact while |stream| < 4096; the grid, 2.4e-4, is finer than bf16's and fp16's rounding of values
    above 0.06 and 0.5).

    Args:
        grid_bits: int or None. Fractional bits of the fixed-point stream; None adds in floating point.
            Defaults to None.

    Raises:
        ValueError: if `grid_bits` is not None or an int in [1, 40].

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 1-2; MacKay et
        al., "Reversible Recurrent Neural Networks", NeurIPS 2018, Section 4.1 (fixed-point arithmetic
        for exact reversibility).
    """

    name = "additive"

    def __init__(self, grid_bits=None):
        if grid_bits is not None and (
            isinstance(grid_bits, bool) or not isinstance(grid_bits, int) or not 1 <= grid_bits <= 40
        ):
            raise ValueError(
                f"`grid_bits` must be None or an int in [1, 40]. Received: grid_bits={grid_bits!r}"
            )
        self.grid_bits = grid_bits

    def residual_size(self, half_size):
        return half_size

    def quantize(self, x):
        """Rounds `x` to the grid (identity without `grid_bits`); gradient straight through."""
        if self.grid_bits is None:
            return x
        scale = float(2**self.grid_bits)
        return x + tf.stop_gradient(tf.round(x * scale) / scale - x)

    def couple(self, x, h, axis=-1):
        return x + self.quantize(tf.cast(h, x.dtype))

    def uncouple(self, y, h, axis=-1):
        return y - self.quantize(tf.cast(h, y.dtype))

    def get_config(self):
        return {"grid_bits": self.grid_bits}


@keras.saving.register_keras_serializable(package="tf_revnet")
class AffineCoupling(Coupling):
    """Affine (Real NVP) coupling: `y = x * exp(s) + t`, `x = (y - t) * exp(-s)`.

    `h` has twice the size of `x` on the split axis: `(r, t) = split(h, 2, axis)` and the log-scale
    `s = clamp * tanh(r / clamp)` is soft-clamped to `(-clamp, clamp)`. The inverse is exact for any
    `clamp`.

    Args:
        clamp: float. Bound of the log-scale `s`. Defaults to `2.0`.

    Raises:
        ValueError: if `clamp` is not a positive number.

    References:
        Dinh et al., "Density estimation using Real NVP", ICLR 2017, Eq. 4-5; Kingma and Dhariwal,
        "Glow", NeurIPS 2018 (soft clamping as in its public implementations).
    """

    name = "affine"

    def __init__(self, clamp=2.0):
        if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or not clamp > 0:
            raise ValueError(f"`clamp` must be a positive number. Received: clamp={clamp!r}")
        self.clamp = float(clamp)

    def residual_size(self, half_size):
        return 2 * half_size

    def _scale_and_shift(self, h, dtype, axis):
        raw_scale, shift = tf.split(tf.cast(h, dtype), 2, axis=axis)
        return self.clamp * tf.tanh(raw_scale / self.clamp), shift

    def couple(self, x, h, axis=-1):
        s, t = self._scale_and_shift(h, x.dtype, axis)
        return x * tf.exp(s) + t

    def uncouple(self, y, h, axis=-1):
        s, t = self._scale_and_shift(h, y.dtype, axis)
        return (y - t) * tf.exp(-s)

    def get_config(self):
        return {"clamp": self.clamp}


COUPLINGS = {"additive": AdditiveCoupling, "affine": AffineCoupling}


def get(coupling):
    """Returns a `Coupling` from a name (`"additive"`, `"affine"`), an instance or a config dict.

    Raises:
        ValueError: if `coupling` is none of these, naming the known names.
    """
    if isinstance(coupling, Coupling):
        return coupling
    if isinstance(coupling, str) and coupling in COUPLINGS:
        return COUPLINGS[coupling]()
    if isinstance(coupling, dict):
        return keras.saving.deserialize_keras_object(coupling)
    raise ValueError(
        f"`coupling` must be one of {sorted(COUPLINGS)} or a tf_revnet.layers.Coupling instance. "
        f"Received: coupling={coupling!r}"
    )
