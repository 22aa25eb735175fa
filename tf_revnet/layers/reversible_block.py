"""The reversible block: y1 = x1 + F(x2), y2 = x2 + G(y1), and its exact inverse.

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing
Activations", NeurIPS 2017 (arXiv:1707.04585), Section 3.1 (Eq. 1 forward, Eq. 2 inverse) and
Algorithm 1 (the backward step of one block, `ReversibleBlock.backward_step`).
"""

import keras
import tensorflow as tf

from tf_revnet.layers.coupling import Coupling


def _is_float_dtype(dtype):
    return tf.as_dtype(keras.backend.standardize_dtype(dtype)).is_floating


def _replay_variables(layer):
    """A layer's integer-valued state: `SeedGenerator` states and counters.

    Replaying these during the backward recompute makes Dropout and other `keras.random` layers draw the
    same values as in the forward pass. Floating state (BatchNorm moving statistics) is not replayed: the
    forward pass updates it once and the recompute runs in a `keras.StatelessScope` that drops updates.
    """
    return [v for v in layer.non_trainable_variables if not _is_float_dtype(v.dtype)]


def add_gradients(total, grads):
    """Adds `grads` (`{variable ref: gradient}`) into `total` in place, summing shared variables."""
    for key, grad in grads.items():
        total[key] = grad if key not in total else total[key] + grad
    return total


def _snapshot(variables):
    """`[(variable, value now)]` for `keras.StatelessScope(state_mapping=...)`."""
    return [(v, tf.identity(keras.ops.convert_to_tensor(v))) for v in variables]


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleBlock(keras.layers.Layer):
    """Reversible block with residual functions F and G (Section 3.1, Eq. 1).

    The input is split on `axis` into two equal halves x1, x2, and

        y1 = x1 + F(x2)
        y2 = x2 + G(y1)

    so that the inputs can be rebuilt exactly from the outputs (Eq. 2):

        x2 = y2 - G(y1)
        x1 = y1 - F(x2)

    With `coupling="affine"`, `x + h` becomes `x * exp(s) + t` (Real NVP), where `(r, t) = split(h)` and
    `s = 2 tanh(r / 2)` is soft-clamped (see `tf_revnet.layers.Coupling`); F and G must then return twice
    the channels of a half.

    A block on its own backpropagates with ordinary autodiff; put blocks in a
    `tf_revnet.layers.ReversibleSequence` to backpropagate without storing activations (Algorithm 1).

    The residual stream (x1, x2, y1, y2 and the additions) is computed in the variable dtype of the
    layer's policy (float32 under `mixed_float16`/`mixed_bfloat16`); only F and G run in the compute
    dtype of their own policies.

    Args:
        f: `keras.layers.Layer`. The residual function F; maps a half of shape `(..., C/2)` to the same
            shape (`(..., C)` for affine coupling). Must not change any other dimension (no stride).
        g: `keras.layers.Layer`. The residual function G; same contract as `f`. May be the same layer
            object as `f` (shared weights).
        coupling: str. `"additive"` (the paper's) or `"affine"`. Defaults to `"additive"`.
        axis: int. The axis split into x1 and x2. Defaults to `-1` (channels of NHWC images, or features
            of `(N, T, C)` sequences).
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of rank >= 2, e.g. NHWC `(N, H, W, C)` with `C` even.
        training: bool or None. Passed to F and G (BatchNorm, Dropout).

    Input shape:
        Any shape whose size on `axis` is even, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape. Output dtype: the variable dtype of the layer's policy (float32 by default).

    Raises:
        ValueError: if `f` or `g` is not a Keras layer; if `coupling` is unknown; if `axis` is not an int;
            on build, if the input rank is < 2, the size on `axis` is unknown or odd, or F or G does not
            return the shape the coupling needs (e.g. a strided convolution); on call, if the input is not
            a floating point tensor.

    Example:

    >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock
    >>> block = ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16))
    >>> x = keras.random.normal((2, 8, 8, 32))
    >>> y = block(x, training=True)
    >>> x_rebuilt = block.inverse(y, training=True)   # equal to x up to float rounding

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.1, Eq. 1-2, Algorithm 1.
    """

    def __init__(self, f, g, coupling="additive", axis=-1, **kwargs):
        super().__init__(**kwargs)
        for arg, layer in (("f", f), ("g", g)):
            if not isinstance(layer, keras.layers.Layer):
                raise ValueError(
                    f"`{arg}` must be a keras.layers.Layer (the residual function "
                    f"{arg.upper()}). Received: {arg}={layer!r} of type {type(layer).__name__}"
                )
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(f"`axis` must be an int. Received: axis={axis!r}")
        if not _is_float_dtype(self.dtype_policy.variable_dtype):
            raise ValueError(
                "A reversible block needs a floating point dtype policy. "
                f"Received: dtype={self.dtype_policy.name!r}"
            )
        self.f = f
        self.g = g
        self.coupling = coupling
        self.axis = axis
        self._coupling = Coupling(coupling, axis)

    @property
    def input_dtype(self):
        # The residual stream stays in the variable dtype (float32 under mixed precision).
        return self.dtype_policy.variable_dtype

    def _split_axis(self, rank):
        return self.axis % rank

    def _half_shape(self, input_shape):
        """Validates `input_shape` and returns the shape of one half."""
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"Layer '{self.name}' expects inputs of rank >= 2 (e.g. NHWC images). "
                f"Received: input_shape={input_shape}"
            )
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"`axis`={self.axis} is out of range for inputs of rank {rank}. "
                f"Received: input_shape={input_shape}"
            )
        axis = self._split_axis(rank)
        size = input_shape[axis]
        if size is None or size % 2:
            raise ValueError(
                f"The size of the split axis (axis={self.axis}) must be known and even to split the "
                f"input into x1 and x2 of equal size. Received: input_shape={input_shape}. "
                "Fix: give the layer before the block an even number of channels."
            )
        return input_shape[:axis] + (size // 2,) + input_shape[axis + 1 :]

    def build(self, input_shape):
        half_shape = self._half_shape(input_shape)
        axis = self._split_axis(len(half_shape))
        expected = list(half_shape)
        expected[axis] = self._coupling.residual_size(half_shape[axis])
        for arg, layer in (("f", self.f), ("g", self.g)):
            if not layer.built:
                layer.build(half_shape)
            spec = layer.compute_output_spec(keras.KerasTensor(half_shape, dtype=self.input_dtype))
            out_shape = tuple(spec.shape)
            if len(out_shape) != len(expected) or any(
                o is not None and e is not None and o != e for o, e in zip(out_shape, expected)
            ):
                raise ValueError(
                    f"Residual function {arg.upper()} (`{arg}`, layer '{layer.name}') must map a half "
                    f"of shape {half_shape} to shape {tuple(expected)} for {self.coupling} coupling, "
                    f"but it returns shape {out_shape}. A reversible block cannot change the shape "
                    "(no stride > 1, no change of channels): use a non-reversible block "
                    "(e.g. tf_revnet.layers.ResidualBlock) for downsampling."
                )
        self._f_replay = _replay_variables(self.f)
        self._g_replay = _replay_variables(self.g)
        self.input_spec = keras.InputSpec(
            ndim=len(half_shape), axes={self.axis: 2 * half_shape[axis]}
        )
        self.built = True

    def _check_dtype(self, x):
        if not x.dtype.is_floating:
            raise ValueError(
                f"Layer '{self.name}' expects floating point inputs. Received: dtype={x.dtype.name}. "
                "Fix: cast the inputs, e.g. with keras.ops.cast(x, 'float32')."
            )

    def split(self, inputs):
        """Splits `inputs` on `axis` into the halves `(x1, x2)`."""
        return tuple(tf.split(inputs, 2, axis=self.axis))

    def merge(self, x1, x2):
        """Concatenates halves on `axis`; the inverse of `split`."""
        return tf.concat([x1, x2], axis=self.axis)

    def forward(self, x1, x2, training=None, replay_log=None):
        """Eq. 1 on halves: returns `(y1, y2)` with `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`.

        Args:
            x1, x2: float tensors of the half shape, e.g. `(N, H, W, C/2)`.
            training: bool or None, passed to F and G.
            replay_log: list or None. If a list, the states of F's and G's random number generators
                before each is called are appended to it (for `backward_step`).
        """
        if replay_log is not None:
            replay_log.append(_snapshot(self._f_replay))
        y1 = self._coupling.couple(x1, self.f(x2, training=training))
        if replay_log is not None:
            replay_log.append(_snapshot(self._g_replay))
        y2 = self._coupling.couple(x2, self.g(y1, training=training))
        return y1, y2

    def call(self, inputs, training=None):
        self._check_dtype(inputs)
        return self.merge(*self.forward(*self.split(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.input_dtype)

    def inverse_halves(self, y1, y2, training=None):
        """Eq. 2 on halves: returns `(x1, x2)` with `x2 = y2 - G(y1)`, `x1 = y1 - F(x2)`.

        Runs F and G as they are (variable updates apply); `inverse` is the side-effect-free version.
        """
        x2 = self._coupling.uncouple(y2, self.g(y1, training=training))
        x1 = self._coupling.uncouple(y1, self.f(x2, training=training))
        return x1, x2

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
        outputs = tf.convert_to_tensor(outputs)
        self._check_dtype(outputs)
        with keras.StatelessScope():
            return self.merge(*self.inverse_halves(*self.split(outputs), training=training))

    def backward_step(self, y1, y2, dy1, dy2, replay=None, training=True):
        """One block of the backward pass (Algorithm 1): rebuild the inputs, back-propagate.

        Given the block's outputs `(y1, y2)` and the loss gradients `(dy1, dy2)` with respect to them, it
        rebuilds `x2 = y2 - G(y1)` and `x1 = y1 - F(x2)` while recomputing G and F under
        `tf.GradientTape`s, and returns the gradients with respect to `(x1, x2)` and every trainable
        variable of F and G. Call it inside a `keras.StatelessScope` so that BatchNorm statistics are not
        updated a second time.

        Args:
            y1, y2: float tensors of the half shape, the block's outputs.
            dy1, dy2: float tensors of the same shape, dL/dy1 and dL/dy2.
            replay: the two generator-state snapshots `forward(..., replay_log=...)` logged for this
                block (before F, before G), or None.
            training: bool, passed to F and G; must match the forward call.

        Returns:
            `((x1, x2), (dx1, dx2), grads)` where `grads` maps `tf.Variable.ref()` to the gradient of
            that variable (summed if F and G share it).
        """
        f_state, g_state = replay if replay is not None else ([], [])
        # Algorithm 1: z1 <- y1; recompute G(z1) and rebuild x2 = y2 - G(z1).
        x2, dz1_through_g, dx2, g_grads = self._rebuild_half(self.g, g_state, y1, y2, dy2, training)
        # dL/dz1 = dL/dy1 + (dG/dz1)^T dL/dy2.
        dz1 = dy1 + dz1_through_g
        # Algorithm 1: recompute F(x2) and rebuild x1 = z1 - F(x2).
        x1, dx2_through_f, dx1, f_grads = self._rebuild_half(self.f, f_state, x2, y1, dz1, training)
        # dL/dx2 = dL/dy2 (through the coupling of y2) + (dF/dx2)^T dL/dz1.
        dx2 = dx2 + dx2_through_f
        return (x1, x2), (dx1, dx2), add_gradients(g_grads, f_grads)

    def _rebuild_half(self, residual_function, replay_state, z, y, dy, training):
        """Half a step of Algorithm 1 for `y = couple(x, R(z))`, R being F or G.

        Recomputes `h = R(z)` under a tape, rebuilds `x = uncouple(y, h)`, and back-propagates `dy`
        through `couple(x, h)`. Returns `(x, dL/dz through R, dL/dx, {variable ref: dL/dvariable})`.
        """
        with keras.StatelessScope(state_mapping=replay_state), tf.GradientTape() as tape:
            tape.watch(z)
            h = residual_function(z, training=training)
            x = tf.stop_gradient(self._coupling.uncouple(y, h))
            tape.watch(x)
            y_recomputed = self._coupling.couple(x, h)
        variables = tape.watched_variables()
        dz, dx, *var_grads = tape.gradient(
            y_recomputed,
            [z, x, *variables],
            output_gradients=dy,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        grads = {}
        for var, grad in zip(variables, var_grads):  # a layer used twice in R is watched once
            grads[var.ref()] = grad
        return x, dz, dx, grads

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "f": keras.saving.serialize_keras_object(self.f),
                "g": keras.saving.serialize_keras_object(self.g),
                "coupling": self.coupling,
                "axis": self.axis,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        f = keras.saving.deserialize_keras_object(config.pop("f"))
        g = keras.saving.deserialize_keras_object(config.pop("g"))
        return cls(f=f, g=g, **config)
