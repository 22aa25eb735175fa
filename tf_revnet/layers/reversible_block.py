"""The reversible block: y1 = x1 + F(x2), y2 = x2 + G(y1), and its exact inverse.

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3.1 (Eq. 1 forward, Eq. 2 inverse) and
Algorithm 1 (the backward step of one block, `tf_revnet.layers.unit.BlockUnit.backward`).
"""

import keras
from keras import ops

from tf_revnet.layers import backend
from tf_revnet.layers import coupling as coupling_lib
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.two_stream import TwoStreamLayer
from tf_revnet.layers.utils import build_sublayer

MIXED_PRECISION_GRID_BITS = 12  # see AdditiveCoupling: exact while |stream| < 2^(24 - 12)
_PROBE_SIZE = 8  # stands in for unknown non-batch dimensions when checking F and G (odd-free, > 1)


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleBlock(TwoStreamLayer):
    """Reversible block with residual functions F and G (Section 3.1, Eq. 1).

    The input is split on `axis` into two equal halves x1, x2, and

        y1 = x1 + F(x2)
        y2 = x2 + G(y1)

    so that the inputs can be rebuilt exactly from the outputs (Eq. 2):

        x2 = y2 - G(y1)
        x1 = y1 - F(x2)

    With `coupling="affine"` (or an `AffineCoupling(clamp)`), `x + h` becomes `x * exp(s) + t`
    (Real NVP; see `tf_revnet.layers.AffineCoupling`); F and G must then return twice the channels of a
    half.

    A block on its own backpropagates with ordinary autodiff; put blocks in a
    `tf_revnet.layers.ReversibleSequence` to backpropagate without storing activations (Algorithm 1).
    The residual stream (x1, x2, y1, y2 and the additions) is computed in `stream_dtype`, the variable
    dtype of the layer's policy (float32 under `mixed_float16`/`mixed_bfloat16`); only F and G run in
    the compute dtype of their own policies.

    Args:
        f: `keras.layers.Layer`. The residual function F; maps a half of shape `(..., C/2)` to the same
            shape (`(..., C)` for affine coupling). Must not change any other dimension (no stride).
        g: `keras.layers.Layer`. The residual function G; same contract as `f`. May be the same layer
            object as `f` (shared weights; kept shared by `get_config`/`from_config` and cloning).
        coupling: str or `tf_revnet.layers.Coupling`. `"additive"` (the paper's), `"affine"`, or an
            instance such as `AffineCoupling(clamp=3.0)` or `AdditiveCoupling(grid_bits=k)`. Under a
            mixed policy `"additive"` means `AdditiveCoupling(grid_bits=12)`: a fixed-point residual
            stream whose rebuilt inputs are bit-identical to the forward pass's. `"fixed_point"`
            is the same exactness in any policy, the grid chosen from `stream_dtype`
            (`AdditiveCoupling.fixed_point`: float32 grid 2^-14, exact while |stream| < 1024), with
            a range check: the block then has a non-trainable variable `stream_out_of_range`
            counting training-mode forward passes that left the range (see
            `tf_revnet.diagnostics.stream_out_of_range`). Defaults to `"additive"`.
        axis: int. The axis split into x1 and x2. Defaults to `-1`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of rank >= 2, e.g. NHWC `(N, H, W, C)` with `C` even.
        training: bool or None. Passed to F and G (BatchNorm, Dropout).

    Input shape:
        Any shape whose size on `axis` is even, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape. Output dtype: `stream_dtype` (float32 by default).

    Raises:
        ValueError: if `f` or `g` is not a Keras layer; if `coupling` is unknown; if `axis` is not an
            int; if `strides` or `filters` is given (use a `StageTransition`); on build, if the
            input rank is < 2, the size on `axis` is unknown or odd, or F or G does not return the
            shape the coupling needs (e.g. a strided convolution; unknown spatial sizes are checked
            with a probe size of 8); on call, if the input is not floating point.

    Examples:
        >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock
        >>> block = ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16))
        >>> x = keras.random.normal((2, 8, 8, 32))
        >>> y = block(x, training=True)
        >>> x_rebuilt = block.inverse(y, training=True)   # equal to x up to float rounding

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 1-2, Algorithm 1.
    """

    invertible = True

    def __init__(self, f, g, coupling="additive", axis=-1, **kwargs):
        for shape_arg in ("strides", "filters"):
            if shape_arg in kwargs:
                raise ValueError(
                    f"`{shape_arg}` is not an argument of ReversibleBlock: a reversible block keeps "
                    f"the shape of its input (Eq. 1-2), so that it can be inverted. Received: "
                    f"{shape_arg}={kwargs[shape_arg]!r}. Fix: change the stride or the channels "
                    "with a tf_revnet.StageTransition(filters, strides=...) before the blocks."
                )
        super().__init__(axis=axis, **kwargs)
        for arg, layer in (("f", f), ("g", g)):
            if not isinstance(layer, keras.layers.Layer):
                raise ValueError(
                    f"`{arg}` must be a keras.layers.Layer (the residual function "
                    f"{arg.upper()}). Received: {arg}={layer!r} of type {type(layer).__name__}"
                )
        self.f = f
        self.g = g
        if coupling == "additive" and self.dtype_policy.compute_dtype != self.stream_dtype:
            # Mixed precision: a fixed-point stream makes the rebuilt inputs bit-identical.
            coupling = coupling_lib.AdditiveCoupling(grid_bits=MIXED_PRECISION_GRID_BITS)
        elif coupling == "fixed_point":  # the exact stream, its grid chosen from the stream dtype
            coupling = coupling_lib.AdditiveCoupling.fixed_point(self.stream_dtype)
        self.coupling = coupling_lib.get(coupling)

    def build(self, input_shape):
        half_shape = self.half_shape(input_shape)
        axis = self.split_axis(len(half_shape))
        expected = list(half_shape)
        expected[axis] = self.coupling.residual_size(half_shape[axis])
        probe = tuple(
            d if d is not None or i == 0 else _PROBE_SIZE for i, d in enumerate(half_shape)
        )
        probe_expected = list(probe)
        probe_expected[axis] = expected[axis]
        for arg, layer in (("f", self.f), ("g", self.g)):
            out_shape = tuple(build_sublayer(layer, half_shape, self.stream_dtype).shape)
            if probe != half_shape:  # unknown sizes: a stride only shows on a concrete shape
                try:
                    probe_out = tuple(
                        layer.compute_output_spec(
                            keras.KerasTensor(probe, dtype=self.stream_dtype)
                        ).shape
                    )
                except Exception:  # noqa: BLE001 - a layer that cannot take the probe size
                    probe_out = None
                if probe_out is not None and not _shapes_match(probe_out, probe_expected):
                    out_shape = probe_out
                    shown = probe
                else:
                    shown = half_shape
            else:
                shown = half_shape
            if not _shapes_match(out_shape, expected if shown == half_shape else probe_expected):
                raise ValueError(
                    f"Residual function {arg.upper()} (`{arg}`, layer '{layer.name}') must map a half "
                    f"of shape {shown}"
                    + ("" if shown == half_shape else
                       f" (the half {half_shape} with unknown sizes set to {_PROBE_SIZE})")
                    + " to shape "
                    f"{tuple(expected if shown == half_shape else probe_expected)} for "
                    f"{self.coupling.name} coupling, but it returns shape {out_shape}. A reversible "
                    "block cannot change the shape (no stride > 1, no change of channels): use a "
                    "non-reversible unit (tf_revnet.layers.StageTransition) for downsampling."
                )
        if getattr(self.coupling, "check_range", False):
            # Forward passes (training mode) in which the stream left the coupling's exact range.
            self.stream_out_of_range = self.add_weight(
                shape=(), initializer="zeros", dtype="float32", trainable=False, autocast=False,
                name="stream_out_of_range",
            )
        self.input_spec = keras.InputSpec(
            ndim=len(half_shape), axes={self.axis: 2 * half_shape[axis]}
        )
        self.built = True

    def count_out_of_range(self, streams, training=True):
        """Counts a forward pass whose stream values leave the coupling's exact range.

        With a range-checked coupling (`AdditiveCoupling.fixed_point`), adds 1 to the non-trainable
        variable `stream_out_of_range` when `max |t|` over `streams` (the block's inputs and outputs)
        is not below `coupling.exact_range(stream_dtype)` (NaN and inf count too). Inside a unit's
        `keras.StatelessScope` the update goes to the scope (assigned once per step by the
        sequence). `tf_revnet.diagnostics.stream_out_of_range` reads the counts and
        `tf_revnet.callbacks.StreamRangeMonitor` warns naming the block (a warning from here could
        not name a block of a fused loop, and graph mode could not emit it). A no-op for other
        couplings and outside training (`training` False or None).
        """
        if not getattr(self.coupling, "check_range", False) or training is None or (
                training is False):
            return
        limit = self.coupling.exact_range(self.stream_dtype)
        peak = ops.max(ops.stack([ops.max(ops.abs(t)) for t in streams]))
        out = ops.cast(ops.logical_not(peak < limit), "float32")
        self.stream_out_of_range.assign(self.stream_out_of_range + out)

    # ----------------------------------------------------------------------------------------------
    # Eq. 1 and Eq. 2 on halves.

    def forward(self, x1, x2, training=None):
        """Eq. 1 on halves: returns `(y1, y2)` with `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`.

        Args:
            x1: float tensor of the half shape, e.g. `(N, H, W, C/2)`, in `stream_dtype`.
            x2: float tensor of the same shape and dtype as `x1`.
            training: bool or None, passed to F and G.
        """
        x1, x2 = self.coupling.quantize(x1), self.coupling.quantize(x2)
        y1 = self.coupling.couple(x1, self.f(x2, training=training), self.axis)
        y2 = self.coupling.couple(x2, self.g(y1, training=training), self.axis)
        self.count_out_of_range((x1, x2, y1, y2), training)
        return y1, y2

    def inverse_halves(self, y1, y2, training=None):
        """Eq. 2 on halves: returns `(x1, x2)` with `x2 = y2 - G(y1)`, `x1 = y1 - F(x2)`.

        Runs F and G as they are (variable updates apply); `inverse` is the side-effect-free version.
        """
        x2 = self.coupling.uncouple(y2, self.g(y1, training=training), self.axis)
        x1 = self.coupling.uncouple(y1, self.f(x2, training=training), self.axis)
        return x1, x2

    def call(self, inputs, training=None):
        self.check_input(inputs)
        return self.merge(*self.forward(*self.split(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.stream_dtype)

    def inverse(self, outputs, training=None):
        """Rebuilds the block's inputs from its outputs (Eq. 2), without side effects.

        F and G run inside a `keras.StatelessScope`: BatchNorm moving statistics and random seed states
        are left unchanged. With `training=True`, BatchNorm uses the batch statistics, so the result
        inverts a training-mode forward pass on the same batch; layers that draw random values (Dropout)
        draw new ones, so such a forward pass is only inverted exactly by `ReversibleSequence`'s
        backward pass, which replays the generator states.

        Args:
            outputs: float tensor `(..., C)`, the block's output.
            training: bool or None, passed to F and G. Use the value of the forward call.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.
        """
        outputs = self.check_input(backend.read(outputs))
        with keras.StatelessScope():
            return self.merge(*self.inverse_halves(*self.split(outputs), training=training))

    def reversible_unit(self):
        """The block as a unit of `ReversibleSequence`: `tf_revnet.layers.unit.BlockUnit` (Algorithm 1)."""
        return unit_lib.BlockUnit(self)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "f": keras.saving.serialize_keras_object(self.f),
                # F and G may be one layer (shared weights): keep it one layer when rebuilt. A shared
                # layer is `{"same_as": path}`, the path of keys to its first occurrence (as in
                # `ReversibleSequence`'s config, where the path starts at the unit's index).
                "g": {"same_as": ["f"]}
                if self.g is self.f
                else keras.saving.serialize_keras_object(self.g),
                "coupling": keras.saving.serialize_keras_object(self.coupling),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        f, g = config.pop("f"), config.pop("g")
        if not isinstance(f, keras.layers.Layer):
            f = keras.saving.deserialize_keras_object(f)
        # `{"same_as": "f"}`: files written by tf_revnet 0.2.0.
        if g in ({"same_as": ["f"]}, {"same_as": "f"}):
            g = f
        elif not isinstance(g, keras.layers.Layer):
            g = keras.saving.deserialize_keras_object(g)
        coupling = config.pop("coupling", "additive")
        if isinstance(coupling, dict):
            coupling = keras.saving.deserialize_keras_object(coupling)
        return cls(f=f, g=g, coupling=coupling, **config)


def _shapes_match(actual, expected):
    return len(actual) == len(expected) and all(
        a is None or e is None or a == e for a, e in zip(actual, expected)
    )
