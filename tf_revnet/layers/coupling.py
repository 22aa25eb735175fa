"""Coupling laws that join a half x with a residual function's output h.

A reversible block (Gomez et al., 2017, Section 3.1, Eq. 1-2) computes
`y1 = couple(x1, F(x2))` and `y2 = couple(x2, G(y1))`; it is invertible for any `F` and `G` because each
coupling law is invertible in its first argument for a fixed `h`.

- `"additive"` (the paper's, Eq. 1): `couple(x, h) = x + h`, `uncouple(y, h) = y - h`. `h` has the shape of
  `x`.
- `"affine"` (Dinh et al., "Density estimation using Real NVP", 2017, Eq. 4-5):
  `couple(x, h) = x * exp(s) + t`, `uncouple(y, h) = (y - t) * exp(-s)`, where `s, t = split(h, 2, axis)`:
  `h` has twice the size of `x` on the split axis.
"""

import tensorflow as tf

COUPLINGS = ("additive", "affine")


class Coupling:
    """An invertible join of a half `x` with a residual function's output `h` (Section 3.1, Eq. 1).

    Args:
        name: str. One of `"additive"` or `"affine"`.
        axis: int. The axis that splits the channels (`-1` for NHWC and (N, T, C)).

    Raises:
        ValueError: if `name` is not a known coupling law.
    """

    def __init__(self, name, axis=-1):
        if name not in COUPLINGS:
            raise ValueError(
                f"`coupling` must be one of {COUPLINGS}. Received: coupling={name!r}"
            )
        self.name = name
        self.axis = axis

    def residual_size(self, half_size):
        """Size of `h` on the split axis that the law needs for a half of `half_size` (int) channels."""
        return half_size if self.name == "additive" else 2 * half_size

    def couple(self, x, h):
        """Forward law: `x + h` (additive) or `x * exp(s) + t` (affine); float `x`, same dtype out."""
        h = tf.cast(h, x.dtype)
        if self.name == "additive":
            return x + h
        s, t = tf.split(h, 2, axis=self.axis)
        return x * tf.exp(s) + t

    def uncouple(self, y, h):
        """Exact inverse of `couple` in its first argument: `y - h` or `(y - t) * exp(-s)`."""
        h = tf.cast(h, y.dtype)
        if self.name == "additive":
            return y - h
        s, t = tf.split(h, 2, axis=self.axis)
        return (y - t) * tf.exp(-s)
