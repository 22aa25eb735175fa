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

import math

import keras
from keras import ops

#: Significand bits (with the implicit bit) of the stream dtypes a fixed-point grid can use.
_SIGNIFICAND_BITS = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}
#: Default exact range of `AdditiveCoupling.fixed_point(dtype)`: float32 2^10 (grid 2^-14).
FIXED_POINT_RANGE = {"float32": 2.0**10, "float64": 2.0**20}


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

    Exact float32 reversal (opt-in): `AdditiveCoupling.fixed_point("float32")` (what
    `ReversibleBlock(..., coupling="fixed_point")` uses) picks `grid_bits` from the stream dtype: `k`
    bits of fraction leave `p - k` bits of range, so the grid `2^-k` trades against the range
    `2^(p - k)` within which sums stay exact (float32: k = 14, grid 6.1e-5, range 1024; k = 16 would
    give grid 1.5e-5 and range 256). With `check_range=True` (the default of `fixed_point`) every
    block counts the forward passes in which a stream value left the range (`exact_range`) in a
    non-trainable variable `stream_out_of_range`, read by `tf_revnet.diagnostics.stream_out_of_range`
    and `tf_revnet.callbacks.StreamRangeMonitor`, which warn naming the block: out of range, the sums
    round as in floating point and the rebuild is no longer bit-identical (never silently).

    Args:
        grid_bits: int or None. Fractional bits of the fixed-point stream; None adds in floating point.
            Defaults to None.
        check_range: bool. Whether blocks with this coupling count forward passes whose stream leaves
            `exact_range` (needs `grid_bits`). Defaults to False.

    Raises:
        ValueError: if `grid_bits` is not None or an int in [1, 40], or `check_range` is not a bool
            or is True without `grid_bits`.

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 1-2; MacKay et
        al., "Reversible Recurrent Neural Networks", NeurIPS 2018, Section 4.1 (fixed-point arithmetic
        for exact reversibility).
    """

    name = "additive"

    def __init__(self, grid_bits=None, check_range=False):
        if grid_bits is not None and (
            isinstance(grid_bits, bool) or not isinstance(grid_bits, int) or not 1 <= grid_bits <= 40
        ):
            raise ValueError(
                f"`grid_bits` must be None or an int in [1, 40]. Received: grid_bits={grid_bits!r}"
            )
        if not isinstance(check_range, bool) or (check_range and grid_bits is None):
            raise ValueError(
                "`check_range` must be a bool, and True only with `grid_bits` (a floating point "
                f"stream has no exact range). Received: check_range={check_range!r}, "
                f"grid_bits={grid_bits!r}"
            )
        self.grid_bits = grid_bits
        self.check_range = check_range

    @classmethod
    def fixed_point(cls, dtype="float32", max_abs=None):
        """The exact fixed-point stream for `dtype`: bit-identical rebuilds while |stream| < range.

        `grid_bits = p - ceil(log2(max_abs))` where `p` is the significand of `dtype` (24 bits for
        float32, 53 for float64), so that sums of grid values below `max_abs` are exact.
        `max_abs` defaults to `FIXED_POINT_RANGE[dtype]`: 1024 for float32 (grid 2^-14 = 6.1e-5;
        RevNet-164's stream reaches about 30 and the 1,994-layer RevNet's about 100 at
        initialisation on CIFAR-10) and 2^20 for float64 (grid 2^-33 = 1.2e-10). The range is
        checked (`check_range=True`).

        Args:
            dtype: str or dtype. The stream dtype (a block's `stream_dtype`). Defaults to
                `"float32"`.
            max_abs: float or None. The largest stream magnitude to keep exact (rounded up to a
                power of two). Defaults to None: `FIXED_POINT_RANGE[dtype]`.

        Returns:
            `AdditiveCoupling(grid_bits=k, check_range=True)`.

        Raises:
            ValueError: if `dtype` is not float32 or float64, or `max_abs` leaves fewer than 1 or
                more than 40 bits of fraction.
        """
        name = keras.backend.standardize_dtype(dtype)
        if name not in FIXED_POINT_RANGE:
            raise ValueError(
                "A fixed-point stream needs a float32 or float64 stream dtype (under mixed precision "
                f"the stream is float32). Received: dtype={name!r}"
            )
        max_abs = FIXED_POINT_RANGE[name] if max_abs is None else max_abs
        if isinstance(max_abs, bool) or not isinstance(max_abs, (int, float)) or not (
                0 < max_abs < math.inf):
            raise ValueError(f"`max_abs` must be a positive number. Received: max_abs={max_abs!r}")
        bits = _SIGNIFICAND_BITS[name] - max(0, math.ceil(math.log2(max_abs)))
        if not 1 <= bits <= 40:
            raise ValueError(
                f"`max_abs`={max_abs!r} leaves {bits} bits of fraction in {name}; it must leave 1 "
                "to 40."
            )
        return cls(grid_bits=bits, check_range=True)

    def exact_range(self, dtype):
        """The magnitude `2^(p - grid_bits)` below which stream sums are exact in `dtype` (inf if none).

        Args:
            dtype: the stream dtype (float32: `p = 24`, float64: `p = 53`).
        """
        if self.grid_bits is None:
            return math.inf
        return float(2.0 ** (_SIGNIFICAND_BITS[keras.backend.standardize_dtype(dtype)] - self.grid_bits))

    def residual_size(self, half_size):
        return half_size

    def quantize(self, x):
        """Rounds `x` to the grid (identity without `grid_bits`); gradient straight through."""
        if self.grid_bits is None:
            return x
        scale = float(2**self.grid_bits)
        return x + ops.stop_gradient(ops.round(x * scale) / scale - x)

    def couple(self, x, h, axis=-1):
        return x + self.quantize(ops.cast(h, x.dtype))

    def uncouple(self, y, h, axis=-1):
        return y - self.quantize(ops.cast(h, y.dtype))

    def get_config(self):
        return {"grid_bits": self.grid_bits, "check_range": self.check_range}


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
        raw_scale, shift = ops.split(ops.cast(h, dtype), 2, axis=axis)
        return self.clamp * ops.tanh(raw_scale / self.clamp), shift

    def couple(self, x, h, axis=-1):
        s, t = self._scale_and_shift(h, x.dtype, axis)
        return x * ops.exp(s) + t

    def uncouple(self, y, h, axis=-1):
        s, t = self._scale_and_shift(h, y.dtype, axis)
        return (y - t) * ops.exp(-s)

    def get_config(self):
        return {"clamp": self.clamp}


COUPLINGS = {"additive": AdditiveCoupling, "affine": AffineCoupling,
             "fixed_point": AdditiveCoupling.fixed_point}


def get(coupling):
    """Returns a `Coupling` from a name, an instance or a config dict.

    Names: `"additive"`, `"affine"`, `"fixed_point"` (`AdditiveCoupling.fixed_point("float32")`; a
    block passes its own stream dtype).

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
