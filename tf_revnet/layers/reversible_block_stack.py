"""A stage's run of identical reversible blocks, its weights stored stacked and run by one loop.

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3 (Eq. 1-2, Algorithm 1) and
Table 1: every stage of a RevNet repeats one reversible block structure `n` times.

`ReversibleBlockStack(block, depth)` holds the weights of `depth` copies of `block` as ONE variable per
weight of the block, with a leading axis of size `depth` (a conv kernel `(3, 3, C, C)` becomes
`(depth, 3, 3, C, C)`), and runs them with one `tf.while_loop`. Nothing in the traced graph, the
optimizer or the checkpoint grows with `depth`: one read, one gradient and one optimizer update per
weight of the block, instead of one per weight of every block.
"""

import keras
import tensorflow as tf

from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.two_stream import StateRecord, TwoStreamLayer
from tf_revnet.layers.utils import build_sublayer, check_positive_int, global_seed_state, no_autocast


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleBlockStack(TwoStreamLayer):
    """`depth` reversible blocks of one structure, applied in order, with stacked weights.

    Equivalent to `depth` separate `ReversibleBlock`s built from `block`'s config (each initialised
    independently), applied one after the other (Eq. 1 per block); `inverse` applies Eq. 2 from the
    last block to the first. Each weight of `block` is stored once, stacked: the layer's variables have
    shape `(depth,) + weight.shape` (BatchNorm statistics and seed-generator states likewise), so the
    number of variables, the size of the traced graph and the per-variable work of the optimizer do not
    grow with `depth`. Inside a `ReversibleSequence` its blocks backpropagate by Algorithm 1 in one
    `tf.while_loop`, storing no activation.

    Args:
        block: `ReversibleBlock`: the structure of every block (its F, G, coupling and axis). It is
            kept as the template the loop runs; its own variables are not trained (if it is built,
            their values initialise the first block).
        depth: int >= 1. The number of blocks.
        **kwargs: base `keras.layers.Layer` arguments (`name`, ...). The dtype policy is the block's.

    Call arguments:
        inputs: float tensor, e.g. NHWC `(N, H, W, C)` with `C` even.
        training: bool or None. Passed to every F and G.

    Input shape:
        What `block` accepts, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape; dtype `stream_dtype` (float32 under mixed precision).

    Raises:
        ValueError: if `block` is not a `ReversibleBlock`; if `depth` is not a
            positive integer (any integer type); on build, what `ReversibleBlock.build` raises
            (odd channels, a strided F or G).

    Example:

    >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleBlockStack
    >>> stack = ReversibleBlockStack(
    ...     ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16)), depth=18)
    >>> y = stack(keras.random.normal((2, 8, 8, 32)), training=True)
    >>> [tuple(v.shape) for v in stack.trainable_variables if "conv1" in v.name][:1]
    [(18, 3, 3, 16, 16)]

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3, Table 1, Algorithm 1.
    """

    invertible = True

    def __init__(self, block, depth, **kwargs):
        if not isinstance(block, ReversibleBlock):
            raise ValueError(
                "`block` must be a tf_revnet.layers.ReversibleBlock (the structure every block of the "
                f"stack repeats). Received: block={block!r} of type {type(block).__name__}"
            )
        depth = check_positive_int("depth", depth)
        kwargs.setdefault("dtype", block.dtype_policy)
        super().__init__(axis=block.axis, **kwargs)
        self.depth = depth
        # The template is not a tracked sublayer: its variables belong to no checkpoint or optimizer;
        # the loop maps them to slices of the stacked variables.
        object.__setattr__(self, "_block", block)

    @property
    def block(self):
        """The template `ReversibleBlock` (its own variables are unused)."""
        return self._block

    def stacked_variable(self, variable):
        """The stacked variable `(depth,) + variable.shape` that holds `variable` of `block` per block.

        Args:
            variable: a variable of the template `block` (an entry of `block.variables`).

        Returns:
            The stack's Keras variable; its slice `[i]` is block `i`'s value of `variable`.

        Raises:
            ValueError: if the stack is not built or `variable` is not one of the template's.
        """
        stacked = getattr(self, "_stacked", {}).get(id(variable))
        if stacked is None:
            raise ValueError(
                f"`variable` must be a variable of the built template `{self.name}.block`. "
                f"Received: {getattr(variable, 'path', variable)!r}"
            )
        return stacked

    def _sync_flags(self):
        if getattr(self, "built", False):
            self._slots()

    @property
    def variables(self):
        """Keras' `variables`, after the stacked variables took the template's trainable flags.

        Keras derives every variable list (`trainable_variables`, a model's included) from
        `variables` and `weights`, so a sub-layer of `block` frozen on its own
        (`stack.block.f.trainable = False`) freezes its stacked weights at once.
        """
        self._sync_flags()
        return super().variables

    @property
    def weights(self):
        """Keras' `weights`, after the stacked variables took the template's trainable flags."""
        self._sync_flags()
        return super().weights

    @property
    def coupling(self):
        """The template block's `Coupling` (every block's)."""
        return self._block.coupling

    @property
    def stream_dtype(self):
        """The residual stream's dtype: the template block's (float32 under mixed precision)."""
        return self._block.stream_dtype

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        block = self._block
        build_sublayer(block, input_shape, block.input_dtype)
        template = block.trainable_variables + block.non_trainable_variables
        # Initial values: those of `depth` independently initialised blocks (the template is the first).
        initial = [[v.value] for v in template]
        for _ in range(self.depth - 1):
            copy = self._copy_block()
            build_sublayer(copy, input_shape, block.input_dtype)
            for values, v in zip(initial, copy.trainable_variables + copy.non_trainable_variables):
                values.append(v.value)
            del copy
        # id(template variable) -> its stacked variable. Untracked: the variables are tracked by
        # `add_weight`, and a tracked dict with int keys cannot be written to a SavedModel.
        object.__setattr__(self, "_stacked", {})
        names = set()
        for v, values in zip(template, initial):
            value = tf.stack(values)
            name = _relative_name(v.path, block.name)
            while name in names:
                name += "_"
            names.add(name)
            # A regularizer of the stacked weight is the sum of its slices' (L1, L2): kept.
            self._stacked[id(v)] = self.add_weight(
                shape=tuple(value.shape),
                dtype=v.dtype,
                initializer=lambda shape, dtype, value=value: tf.cast(value, dtype),
                trainable=v.trainable,
                regularizer=getattr(v, "regularizer", None),
                name=name,
            )
        # The stacked variables as a tracked attribute too (as `Conv2D.kernel` is), so that
        # `tf.saved_model.save` and `tf.train.Checkpoint` see them by name.
        self.stacked_variables = list(self._stacked.values())
        self.input_spec = block.input_spec
        self.built = True

    def _slots(self):
        """The stacked variables aligned with the template's trainable and non-trainable variables.

        The template follows the stack's `trainable` flag (as a tracked sublayer would: a frozen
        BatchNorm normalises with its moving statistics), and the stacked variables follow the
        template's (a sub-layer of `block` frozen on its own freezes its stacked weights), so the
        split is read at each call.
        """
        if self._block.trainable != self.trainable:
            self._block.trainable = self.trainable
        if self.trainable:  # a sub-layer of the template frozen on its own (e.g. `block.f`)
            for v in self._block.variables:
                stacked = self._stacked.get(id(v))
                if stacked is not None and stacked.trainable != v.trainable:
                    stacked.trainable = v.trainable
        return ([self._stacked[id(v)] for v in self._block.trainable_variables],
                [self._stacked[id(v)] for v in self._block.non_trainable_variables])

    def _template_values(self, weights, state):
        """Values given for (`trainable_variables`, `non_trainable_variables`) -> template order."""
        values = {id(v): x for v, x in zip(self.trainable_variables, weights)}
        values.update({id(v): x for v, x in zip(self.non_trainable_variables, state)})
        weight_slots, state_slots = self._slots()
        return values, [values[id(v)] for v in weight_slots], [values[id(v)] for v in state_slots]

    def _copy_block(self):
        """A new block of the template's structure, F and G rebuilt from their configs."""
        block = self._block
        copies = {}
        for arg in ("f", "g"):
            layer = getattr(block, arg)
            if arg == "g" and layer is block.f:
                copies["g"] = copies["f"]
                continue
            try:
                copies[arg] = type(layer).from_config(layer.get_config())
            except Exception as error:  # noqa: BLE001 - any failure of a user's get_config/from_config
                reason = " ".join(str(error).split())
                reason = reason if len(reason) <= 160 else reason[:157] + "..."
                raise ValueError(
                    f"ReversibleBlockStack '{self.name}' initialises each of its {self.depth} blocks "
                    f"as a new copy of `block`, but residual function {arg.upper()} (layer "
                    f"'{layer.name}', {type(layer).__name__}) cannot be rebuilt from its config "
                    f"({type(error).__name__}: {reason}). Fix: give the layer a get_config() "
                    "that returns its constructor arguments (as Keras layers do)."
                ) from None
        config = block.get_config()
        config.update(copies)
        return type(block).from_config(config)

    # ----------------------------------------------------------------------------------------------
    # Ordinary layer (inference, plain autodiff, gradients of gradients).

    def call(self, inputs, training=None):
        self.check_input(inputs)
        x1, x2 = self.split(tf.cast(inputs, self.stream_dtype))
        rng_variable = global_seed_state() if training else None
        weight_slots, state_slots = self._slots()
        with no_autocast():
            weights = [tf.convert_to_tensor(v.value) for v in weight_slots]
            state = [tf.convert_to_tensor(v.value) for v in state_slots]
            rng = (tf.convert_to_tensor(rng_variable.value) if rng_variable is not None
                   else tf.zeros((2,), "int64"))
        (y1, y2), new_state, new_rng = loop_call(
            self._block, self.depth, weights, state, rng_variable, rng, x1, x2, training
        )
        for variable, value in zip(state_slots, new_state):
            variable.assign(value)
        if rng_variable is not None:
            rng_variable.assign(new_rng)
        return self.merge(y1, y2)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.stream_dtype)

    def inverse_halves(self, y1, y2, training=None):
        """Eq. 2 through every block, last to first: returns the stack's input halves `(x1, x2)`."""
        weight_slots, state_slots = self._slots()
        with no_autocast():
            weights = [tf.convert_to_tensor(v.value) for v in weight_slots]
            state = [tf.convert_to_tensor(v.value) for v in state_slots]
        block = self._block

        def body(k, y1, y2):
            i = self.depth - 1 - k
            mapping = block.state_mapping([w[i] for w in weights], [s[i] for s in state], None, None)
            with keras.StatelessScope(state_mapping=mapping):
                x1, x2 = block.inverse_halves(y1, y2, training=training)
            return k + 1, x1, x2

        _, x1, x2 = tf.while_loop(
            lambda k, *_: k < self.depth, body, (tf.constant(0), y1, y2),
            maximum_iterations=self.depth,
        )
        return x1, x2

    def inverse(self, outputs, training=None):
        """Rebuilds the stack's inputs from its outputs (Eq. 2), without side effects.

        Args:
            outputs: float tensor `(..., C)`, the stack's output.
            training: bool or None, passed to F and G; use the value of the forward call.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.
        """
        outputs = self.check_input(tf.convert_to_tensor(outputs))
        with keras.StatelessScope():
            return self.merge(*self.inverse_halves(*self.split(outputs), training=training))

    # ----------------------------------------------------------------------------------------------
    # The stateless form `ReversibleSequence` runs (the contract of `ReversibleBlock`).

    def stateless_forward(self, weights, state, rng_variable, rng, x1, x2, training=True):
        """Eq. 1 through every block with the stacked values given (see `ReversibleBlock`).

        Args:
            weights, state: lists of stacked tensors `(depth, ...)`, the values of
                `trainable_variables` and `non_trainable_variables`.
            rng_variable, rng: Keras' global seed state variable (or None) and its value.
            x1, x2: the input halves, `stream_dtype`.

        Returns:
            `((y1, y2), record, (new_state, new_rng))`, `new_state` stacked like `state`.
        """
        values, weights, state = self._template_values(weights, state)
        (y1, y2), record, (new_state, new_rng) = loop_forward(
            self._block, self.depth, weights, state, rng_variable, rng, x1, x2, training
        )
        values.update({id(v): x for v, x in zip(self._slots()[1], new_state)})
        new_state = [values[id(v)] for v in self.non_trainable_variables]
        # The record carries the template-order weights: frozen ones are not in `weights` later.
        return (y1, y2), (record, weights), (new_state, new_rng)

    def stateless_backward(self, weights, record, rng_variable, y1, y2, dy1, dy2, training=True):
        """Algorithm 1 through every block, last to first (see `ReversibleBlock`).

        Returns:
            `((x1, x2), (dx1, dx2), dweights)`, `dweights` stacked like `weights`.
        """
        record, template_weights = record
        weight_slots = self._slots()[0]
        # The trainable values given now (the same tensors as in the forward pass, or their values).
        given = {id(v): w for v, w in zip(self.trainable_variables, weights)}
        template_weights = [given.get(id(v), w) for v, w in zip(weight_slots, template_weights)]
        x, dx, dweights = loop_backward(self._block, self.depth, template_weights, record,
                                        rng_variable, y1, y2, dy1, dy2, training)
        grads = {id(v): g for v, g in zip(weight_slots, dweights)}
        return x, dx, [grads.get(id(v), tf.zeros_like(w))
                       for v, w in zip(self.trainable_variables, weights)]

    def get_config(self):
        config = super().get_config()
        config.pop("axis", None)  # the block's
        config.pop("dtype", None)  # the block's policy
        config.update(
            {"block": keras.saving.serialize_keras_object(self._block), "depth": self.depth}
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = config.pop("block")
        if not isinstance(block, keras.layers.Layer):
            block = keras.saving.deserialize_keras_object(block)
        return cls(block=block, **config)


def _relative_name(path, block_name):
    """`.../{block}/{block}_f/conv1/kernel` -> `f_conv1_kernel`: a variable's path inside the block."""
    relative = path.split(block_name + "/", 1)[-1]
    if relative.startswith(block_name + "_"):
        relative = relative[len(block_name) + 1 :]
    return relative.replace("/", "_")


# --------------------------------------------------------------------------------------------------
# The loops over stacked values (shared with `ReversibleSequence`'s fusion of identical blocks).


def _arrays(values, n):
    return [tf.TensorArray(v.dtype, size=n, element_shape=v.shape[1:]) for v in values]


def loop_call(block, n, weights, state, rng_variable, rng, x1, x2, training):
    """Eq. 1 through `n` blocks as an ordinary differentiable loop (autodiff stores activations).

    The stacked weights are read through `TensorArray`s, so that the loop's gradient with respect to
    them is written slice by slice (linear in `n`) rather than as `n` full-size slice gradients.

    Returns:
        `((y1, y2), new_state, new_rng)`.
    """
    weight_arrays = [ta.unstack(w) for ta, w in zip(_arrays(weights, n), weights)]

    def body(i, x1, x2, rng, new_tas):
        unit_weights = [ta.read(i) for ta in weight_arrays]
        unit_state = [s[i] for s in state]
        (y1, y2), _, (new, new_rng) = block.stateless_forward(
            unit_weights, unit_state, rng_variable, rng, x1, x2, training=training
        )
        return i + 1, y1, y2, new_rng, [ta.write(i, v) for ta, v in zip(new_tas, new)]

    _, y1, y2, rng, new_tas = tf.while_loop(
        lambda i, *_: i < n, body, (tf.constant(0), x1, x2, rng, _arrays(state, n)),
        maximum_iterations=n,
    )
    return (y1, y2), [ta.stack() for ta in new_tas], rng


def loop_forward(block, n, weights, state, rng_variable, rng, x1, x2, training=True):
    """Eq. 1 through `n` blocks with stacked values, recording what each block's recompute replays.

    Returns:
        `((y1, y2), record, (new_state, new_rng))` with `new_state` stacked.
    """

    def body(i, x1, x2, rng, rng_ta, mid_rng_ta, mid_tas, new_tas):
        (y1, y2), record, (new, new_rng) = block.stateless_forward(
            [w[i] for w in weights], [s[i] for s in state], rng_variable, rng, x1, x2,
            training=training,
        )
        rng_ta = rng_ta.write(i, rng)
        mid_rng_ta = mid_rng_ta.write(i, record.mid_rng)
        mid_tas = [ta.write(i, v) for ta, v in zip(mid_tas, record.mid_state)]
        new_tas = [ta.write(i, v) for ta, v in zip(new_tas, new)]
        return i + 1, y1, y2, new_rng, rng_ta, mid_rng_ta, mid_tas, new_tas

    rng_arrays = _arrays([tf.expand_dims(rng, 0)] * 2, n)
    loop_vars = (
        tf.constant(0), x1, x2, rng, rng_arrays[0], rng_arrays[1], _arrays(state, n),
        _arrays(state, n),
    )
    _, x1, x2, new_rng, rng_ta, mid_rng_ta, mid_tas, new_tas = tf.while_loop(
        lambda i, *_: i < n, body, loop_vars, parallel_iterations=1, maximum_iterations=n
    )
    record = StateRecord(list(state), rng_ta.stack(), [ta.stack() for ta in mid_tas],
                         mid_rng_ta.stack())
    return (x1, x2), record, ([ta.stack() for ta in new_tas], new_rng)


def loop_backward(block, n, weights, record, rng_variable, y1, y2, dy1, dy2, training=True):
    """Algorithm 1 through `n` blocks, last to first, with stacked values (one traced step).

    Returns:
        `((x1, x2), (dx1, dx2), dweights)` with `dweights` stacked like `weights`.
    """

    def body(k, y1, y2, dy1, dy2, grad_tas):
        i = n - 1 - k
        unit_record = StateRecord(
            [s[i] for s in record.state], record.rng[i], [s[i] for s in record.mid_state],
            record.mid_rng[i],
        )
        (x1, x2), (dx1, dx2), dweights = block.stateless_backward(
            [w[i] for w in weights], unit_record, rng_variable, y1, y2, dy1, dy2, training=training
        )
        return k + 1, x1, x2, dx1, dx2, [ta.write(i, g) for ta, g in zip(grad_tas, dweights)]

    _, x1, x2, dx1, dx2, grad_tas = tf.while_loop(
        lambda k, *_: k < n, body, (tf.constant(0), y1, y2, dy1, dy2, _arrays(weights, n)),
        parallel_iterations=1, maximum_iterations=n,
    )
    return (x1, x2), (dx1, dx2), [ta.stack() for ta in grad_tas]
