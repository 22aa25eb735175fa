"""Coupling laws that join a half x with a residual function's output h.

A reversible block (Gomez et al., 2017, Section 3.1, Eq. 1-2) computes
`y1 = couple(x1, F(x2))` and `y2 = couple(x2, G(y1))`; it is invertible for any `F` and `G` because each
coupling law is invertible in its first argument for a fixed `h`.

- `"additive"` (the paper's, Eq. 1): `couple(x, h) = x + h`, `uncouple(y, h) = y - h`. `h` has the shape of
  `x`.
- `"affine"` (Dinh et al., "Density estimation using Real NVP", 2017, Eq. 4-5):
  `couple(x, h) = x * exp(s) + t`, `uncouple(y, h) = (y - t) * exp(-s)`, where `t` and the raw scale `r`
  are `split(h, 2, axis)` and `s = clamp * tanh(r / clamp)` is soft-clamped to `(-clamp, clamp)` (as in
  Glow-style coupling blocks), so `exp(s)` can neither overflow nor erase `x`: unclamped, an untrained F
  with large outputs made the inverse lose all precision (relative error > 10 in float64). `h` has
  twice the size of `x` on the split axis. The inverse stays exact for any `clamp`.
"""

import tensorflow as tf

COUPLINGS = ("additive", "affine")


class Coupling:
    """An invertible join of a half `x` with a residual function's output `h` (Section 3.1, Eq. 1).

    Args:
        name: str. One of `"additive"` or `"affine"`.
        axis: int. The axis that splits the channels (`-1` for NHWC and (N, T, C)).
        clamp: float. Bound of the affine log-scale `s` (unused by additive coupling). Defaults to 2.0.

    Raises:
        ValueError: if `name` is not a known coupling law, or `clamp` is not a positive number.
    """

    def __init__(self, name, axis=-1, clamp=2.0):
        if name not in COUPLINGS:
            raise ValueError(
                f"`coupling` must be one of {COUPLINGS}. Received: coupling={name!r}"
            )
        if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or not clamp > 0:
            raise ValueError(f"`clamp` must be a positive number. Received: clamp={clamp!r}")
        self.name = name
        self.axis = axis
        self.clamp = float(clamp)

    def _scale_and_shift(self, h):
        raw_scale, shift = tf.split(h, 2, axis=self.axis)
        return self.clamp * tf.tanh(raw_scale / self.clamp), shift

    def residual_size(self, half_size):
        """Size of `h` on the split axis that the law needs for a half of `half_size` (int) channels."""
        return half_size if self.name == "additive" else 2 * half_size

    def couple(self, x, h):
        """Forward law: `x + h` (additive) or `x * exp(s) + t` (affine); float `x`, same dtype out."""
        h = tf.cast(h, x.dtype)
        if self.name == "additive":
            return x + h
        s, t = self._scale_and_shift(h)
        return x * tf.exp(s) + t

    def uncouple(self, y, h):
        """Exact inverse of `couple` in its first argument: `y - h` or `(y - t) * exp(-s)`."""
        h = tf.cast(h, y.dtype)
        if self.name == "additive":
            return y - h
        s, t = self._scale_and_shift(h)
        return (y - t) * tf.exp(-s)
