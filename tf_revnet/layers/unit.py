"""The unit protocol: how a `ReversibleSequence` runs, inverts and backpropagates each of its units.

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2-3.3 and Algorithm 1.

A `ReversibleSequence` drives a list of units, and a unit is the one place that knows its own math. A
unit owns no variable: it names the Keras variables it reads (`trainable`, `state`), and its methods
take their values explicitly (`UnitValues`), so the sequence can run it under one `tf.custom_gradient`
(the variables are explicit inputs), inside a `tf.while_loop` over stacked values, or side-effect free
(`tf_revnet.diagnostics`):

    forward(values, x, training)          -> (y, record, values_after)
    backward(values, record, y, dy, training) -> (x, dx, dweights)
    inverse(values, y, training)          -> x                      (invertible units only)

`record` is a frozen dataclass of what the backward step needs beyond `y` (for an invertible unit: only
the state to replay, never an activation); `values_after` holds the state after the call (BatchNorm
statistics, seed-generator states), which the sequence assigns once, from the forward pass. `backward`
rebuilds the unit's input and returns it with the gradients with respect to the input and to
`values.weights` (aligned with `trainable`). Invertible units (`invertible = True`) map the two-stream
residual stream, a pair of halves `(x1, x2)`, to `(y1, y2)`; the others map tensors.

The kinds, one class each:

- `StoredInputUnit`: any Keras layer. Keeps its input and recomputes it under a tape in the backward
  pass (as `tf.recompute_grad` does): stem, stage transitions, your own non-invertible layers.
- `BlockUnit`: a `ReversibleBlock` (Eq. 1 forward, Eq. 2 rebuild, Algorithm 1 backward).
- `LoopUnit`: `n` units of one structure over their stacked values, one `tf.while_loop` forward and
  backward; a `ReversibleBlockStack` (values stored stacked) and a sequence's run of identical blocks
  (values stacked at each call) run through it.

A layer chooses its unit with a `reversible_unit()` method; a layer without one runs as a
`StoredInputUnit`. `keras.StatelessScope` mappings are built in one place, `Unit.scope`.
"""

import dataclasses
import typing

import keras
import tensorflow as tf

from tf_revnet.layers.utils import global_seed_state, strip_names

__all__ = [
    "BlockRecord",
    "BlockUnit",
    "LoopRecord",
    "LoopUnit",
    "StoredInputRecord",
    "StoredInputUnit",
    "Unit",
    "UnitValues",
    "as_unit",
    "assign_rng",
    "read_rng",
    "read_values",
    "structure_signature",
]


@dataclasses.dataclass(frozen=True)
class UnitValues:
    """The values a unit's variables take for one call (the variables themselves are not touched).

    Attributes:
        weights: tuple of tensors, aligned with `unit.trainable` (each the variable's own dtype).
        state: tuple of tensors, aligned with `unit.state` (BatchNorm statistics, seed states, frozen
            weights).
        rng: int tensor `(2,)`. The state of Keras' global `SeedGenerator` (unseeded `keras.random`
            calls draw from it); any `(2,)` tensor where that generator does not exist.
    """

    weights: tuple
    state: tuple
    rng: typing.Any

    def replace(self, **changes):
        """A copy with some fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class StoredInputRecord:
    """What a `StoredInputUnit` keeps: its input and the state it saw (replayed in the recompute)."""

    x: typing.Any
    state: tuple
    rng: typing.Any


@dataclasses.dataclass(frozen=True)
class BlockRecord:
    """What a reversible block's recompute replays: no activation, only state (Algorithm 1).

    Attributes:
        state, rng: the unit's state and the global seed state before F (what F saw).
        mid_state, mid_rng: the same between F and G (what G saw).
    """

    state: tuple
    rng: typing.Any
    mid_state: tuple
    mid_rng: typing.Any


@dataclasses.dataclass(frozen=True)
class LoopRecord:
    """A `LoopUnit`'s record: the `BlockRecord` of every block, each field stacked on a new axis 0."""

    blocks: BlockRecord


def assign_rng(value):
    """Assigns `value` to Keras' global seed state (where that generator exists)."""
    rng_variable = global_seed_state()
    if rng_variable is not None:
        rng_variable.assign(value)


def read_rng(training=True):
    """The value of Keras' global seed state, int64 `(2,)`.

    Zeros where that generator is absent, and outside training (inference draws no random numbers;
    reading the generator would make every exported inference function capture it).
    """
    rng_variable = global_seed_state() if training else None
    return (tf.convert_to_tensor(rng_variable.value) if rng_variable is not None
            else tf.zeros((2,), "int64"))


def read_values(unit, training=True):
    """The current values of `unit`'s variables (as their own dtype: the caller disables autocast)."""
    return UnitValues(
        tuple(tf.convert_to_tensor(v.value) for v in unit.trainable),
        tuple(tf.convert_to_tensor(v.value) for v in unit.state),
        read_rng(training),
    )


class Unit:
    """Base class of the units a `ReversibleSequence` drives (the protocol; see the module docstring).

    Args:
        layer: the Keras layer the unit runs (built).
        trainable: list of the Keras variables read as weights (values in `UnitValues.weights`).
            Defaults to `layer.trainable_variables`.
        state: list of the other Keras variables it reads. Defaults to
            `layer.non_trainable_variables`.

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Algorithm 1.
    """

    #: Whether `backward` rebuilds the input from the output (no stored activation).
    invertible = False

    def __init__(self, layer, trainable=None, state=None):
        self.layer = layer
        self.trainable = tuple(layer.trainable_variables if trainable is None else trainable)
        self.state = tuple(layer.non_trainable_variables if state is None else state)

    @property
    def name(self):
        """The layer's name."""
        return self.layer.name

    @property
    def signature(self):
        """`structure_signature` of the layer for fusion into a `LoopUnit`; None: never fused."""
        return None

    def scope(self, values):
        """A `keras.StatelessScope` in which the unit's variables read as `values`.

        The one place where variables are mapped to values: assignments inside the scope (BatchNorm
        statistics, seed states) go to the scope, never to the variables.
        """
        mapping = list(zip(self.trainable, values.weights)) + list(zip(self.state, values.state))
        rng_variable = global_seed_state()
        if rng_variable is not None:
            mapping.append((rng_variable, values.rng))
        return keras.StatelessScope(state_mapping=mapping)

    def values_after(self, scope, values):
        """`values` with the state the variables hold in `scope` now."""
        rng_variable = global_seed_state()
        return values.replace(
            state=tuple(scope.get_current_value(v) for v in self.state),
            rng=values.rng if rng_variable is None else scope.get_current_value(rng_variable),
        )

    def pack(self, values):
        """The values the other methods take, from the values of `trainable` and `state` (`read_values`).

        The identity, except for a `LoopUnit` over separate blocks, which stacks them.
        """
        return values

    def pack_state(self, state):
        """`pack` for the state alone."""
        return state

    def unpack_state(self, state):
        """The inverse of `pack_state`: the values of `self.state`, in order."""
        return state

    def forward(self, values, x, training=True):
        """Runs the unit on `x` with `values`; returns `(y, record, values_after)`."""
        raise NotImplementedError

    def backward(self, values, record, y, dy, training=True):
        """One step of the backward pass: returns `(x, dx, dweights)`, `dweights` aligned with weights.

        The default, for an invertible unit whose `forward` returns the values it ran with as its
        `record` (a `UnitValues`): rebuilds `x = inverse(y)`, then recomputes `forward` on it under a
        tape (Algorithm 1 for any invertible map). Other units implement their own.
        """
        if not self.invertible or not isinstance(record, UnitValues):
            raise NotImplementedError(
                f"{type(self).__name__} must implement backward(), or be invertible and return its "
                "UnitValues as the record of forward()."
            )
        values = values.replace(state=record.state, rng=record.rng)
        with tf.control_dependencies(tf.nest.flatten(dy)):
            x = tuple(tf.stop_gradient(t) for t in self.inverse(values, y, training))
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(values.weights)
            y_recomputed, _, _ = self.forward(values, x, training)
        dx, dweights = tape.gradient(
            y_recomputed, [list(x), list(values.weights)], output_gradients=list(dy),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return x, tuple(dx), dweights

    def inverse(self, values, y, training=None):
        """Rebuilds the input from the output (invertible units only)."""
        raise ValueError(f"Layer '{self.name}' is not invertible: it has no inverse.")


class StoredInputUnit(Unit):
    """Any Keras layer as a unit: keeps its input, recomputes it under a tape (`tf.recompute_grad`).

    Section 3.3: layers that cannot be inverted (stride-2 or channel-changing transitions, the stem)
    store their input; their activations are recomputed from it in the backward pass.
    """

    def forward(self, values, x, training=True):
        with self.scope(values) as scope:
            y = self.layer(x, training=training)
            after = self.values_after(scope, values)
        return y, StoredInputRecord(x, values.state, values.rng), after

    def backward(self, values, record, y, dy, training=True):
        # Recompute only once the gradient from above exists (else a graph runs it at once).
        with tf.control_dependencies([dy]):
            x = tf.identity(record.x)
        values = values.replace(state=record.state, rng=record.rng)
        with self.scope(values), tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(values.weights)
            out = self.layer(x, training=training)
        dx, *dweights = tape.gradient(
            out, [x, *values.weights], output_gradients=tf.cast(dy, out.dtype),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return x, dx, dweights


class BlockUnit(Unit):
    """A `ReversibleBlock` as a unit: Eq. 1 forward, Eq. 2 rebuild and Algorithm 1 backward on halves.

    `x` and `y` are pairs of halves `(x1, x2)`, `(y1, y2)` in the block's `stream_dtype`.
    """

    invertible = True

    @property
    def signature(self):
        return structure_signature(self.layer, self.trainable + self.state)

    def forward(self, values, x, training=True):
        block, coupling = self.layer, self.layer.coupling
        x1, x2 = (coupling.quantize(t) for t in x)
        with self.scope(values) as scope:
            y1 = coupling.couple(x1, block.f(x2, training=training), block.axis)
            mid = self.values_after(scope, values)
            y2 = coupling.couple(x2, block.g(y1, training=training), block.axis)
            block.count_out_of_range((x1, x2, y1, y2), training)  # range-checked grids only
            after = self.values_after(scope, values)
        return (y1, y2), BlockRecord(values.state, values.rng, mid.state, mid.rng), after

    def inverse(self, values, y, training=None):
        with self.scope(values):
            return self.layer.inverse_halves(*y, training=training)

    def backward(self, values, record, y, dy, training=True):
        """Algorithm 1 for one block: rebuild x2 = y2 - G(y1), x1 = y1 - F(x2), backpropagate."""
        block = self.layer
        (y1, y2), (dy1, dy2) = y, dy
        # Rebuild only once the gradient from above exists (else a graph runs every rebuild at once).
        with tf.control_dependencies([dy1, dy2]):
            y1, y2 = tf.identity(y1), tf.identity(y2)
        mid = values.replace(state=record.mid_state, rng=record.mid_rng)
        pre = values.replace(state=record.state, rng=record.rng)
        # Algorithm 1: z1 <- y1; recompute G(z1) and rebuild x2 = y2 - G(z1).
        x2, dz1_through_g, dx2, dw_g = self._rebuild_half(block.g, mid, y1, y2, dy2, training)
        # dL/dz1 = dL/dy1 + (dG/dz1)^T dL/dy2.
        dz1 = dy1 + dz1_through_g
        # Algorithm 1: recompute F(x2) and rebuild x1 = z1 - F(x2).
        x1, dx2_through_f, dx1, dw_f = self._rebuild_half(block.f, pre, x2, y1, dz1, training)
        # dL/dx2 = dL/dy2 (through the coupling of y2) + (dF/dx2)^T dL/dz1.
        return (x1, x2), (dx1, dx2 + dx2_through_f), [a + b for a, b in zip(dw_g, dw_f)]

    def _rebuild_half(self, residual_function, values, z, y, dy, training):
        """Half a step of Algorithm 1 for `y = couple(x, R(z))`, R being F or G.

        Returns `(x, dL/dz through R, dL/dx, [dL/dw for w in values.weights])`.
        """
        coupling, axis = self.layer.coupling, self.layer.axis
        with self.scope(values), tf.GradientTape() as tape:
            tape.watch(z)
            tape.watch(values.weights)
            h = residual_function(z, training=training)
            x = tf.stop_gradient(coupling.uncouple(y, h, axis))
            tape.watch(x)
            y_recomputed = coupling.couple(x, h, axis)
        dz, dx, *dweights = tape.gradient(
            y_recomputed, [z, x, *values.weights], output_gradients=dy,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return x, dz, dx, dweights


class LoopUnit(Unit):
    """`n` reversible units of one structure over stacked values, run by one `tf.while_loop`.

    The traced graph holds one block (`template`) whatever `n` is. Two ways in, one loop:

    - `LoopUnit.for_stack(stack)`: a `ReversibleBlockStack`, whose variables are stacked already
      (`trainable` and `state` aligned with the template's, each of shape `(n,) + shape`);
    - `LoopUnit.for_blocks(units)`: consecutive `BlockUnit`s of one `structure_signature`, whose values
      are stacked at each call (`trainable` and `state`: every block's, block after block).

    Args:
        template: `BlockUnit`. The structure every block has; its variables are mapped to slices.
        depth: int. The number of blocks `n`.
        trainable: list of Keras variables, as described above.
        state: list of Keras variables, as described above.
        stacked: bool. Whether the variables hold stacked values (a stack) or one block's each.
        layer: the Keras layer the unit stands for (the stack, or the first block).
        names: list of `n` block names (for diagnostics).
    """

    invertible = True

    def __init__(self, template, depth, trainable, state, stacked, layer, names):
        super().__init__(layer, trainable, state)
        self.template = template
        self.depth = depth
        self.stacked = stacked
        self.names = list(names)

    @classmethod
    def for_stack(cls, stack):
        """The unit of a built `ReversibleBlockStack`: its template block over its stacked variables."""
        template = BlockUnit(stack.block)
        return cls(
            template, stack.depth, [stack.stacked_variable(v) for v in template.trainable],
            [stack.stacked_variable(v) for v in template.state], True, stack,
            [f"{stack.name}[{i}]" for i in range(stack.depth)],
        )

    @classmethod
    def for_blocks(cls, units):
        """One loop for consecutive `BlockUnit`s of one structure (equal `signature`s)."""
        return cls(
            units[0], len(units), [v for u in units for v in u.trainable],
            [v for u in units for v in u.state], False, units[0].layer, [u.name for u in units],
        )

    # Values of the blocks, stacked by position of the template's variables, and back.

    def _columns(self, values, width):
        return tuple(tf.stack(values[p::width]) for p in range(width))

    def pack(self, values):
        """Stacks the values of separate blocks by position (`(n,) + shape` each); a stack's as given."""
        if self.stacked:
            return values
        return values.replace(weights=self._columns(values.weights, len(self.template.trainable)),
                              state=self.pack_state(values.state))

    def pack_state(self, state):
        return state if self.stacked else self._columns(state, len(self.template.state))

    def unpack_state(self, state):
        if self.stacked:
            return tuple(state)
        columns = [tf.unstack(s, num=self.depth) for s in state]
        return tuple(column[i] for i in range(self.depth) for column in columns)

    def _slice(self, values, i, rng):
        return UnitValues(tuple(w[i] for w in values.weights), tuple(s[i] for s in values.state), rng)

    def slices(self, values):
        """`[(name, template, values of block i)]` for each block (packed `values`): diagnostics."""
        return [(self.names[i], self.template, self._slice(values, i, values.rng))
                for i in range(self.depth)]

    def forward(self, values, x, training=True):
        n, template, state = self.depth, self.template, values.state

        def body(i, x1, x2, rng, rng_ta, mid_rng_ta, mid_tas, new_tas):
            y, record, after = template.forward(self._slice(values, i, rng), (x1, x2), training)
            return (i + 1, *y, after.rng, rng_ta.write(i, rng), mid_rng_ta.write(i, record.mid_rng),
                    [ta.write(i, v) for ta, v in zip(mid_tas, record.mid_state)],
                    [ta.write(i, v) for ta, v in zip(new_tas, after.state)])

        rng_tas = _arrays([tf.expand_dims(values.rng, 0)] * 2, n)
        _, y1, y2, rng, rng_ta, mid_rng_ta, mid_tas, new_tas = tf.while_loop(
            lambda i, *_: i < n, body,
            (tf.constant(0), *x, values.rng, *rng_tas, _arrays(state, n), _arrays(state, n)),
            parallel_iterations=1, maximum_iterations=n,
        )
        record = LoopRecord(BlockRecord(tuple(state), rng_ta.stack(),
                                        tuple(ta.stack() for ta in mid_tas), mid_rng_ta.stack()))
        after = values.replace(state=tuple(ta.stack() for ta in new_tas), rng=rng)
        return (y1, y2), record, after

    def backward(self, values, record, y, dy, training=True):
        n, template, blocks, weights = self.depth, self.template, record.blocks, values.weights

        def body(k, y1, y2, dy1, dy2, grad_tas):
            i = n - 1 - k
            unit_record = BlockRecord(tuple(s[i] for s in blocks.state), blocks.rng[i],
                                      tuple(s[i] for s in blocks.mid_state), blocks.mid_rng[i])
            block_values = UnitValues(tuple(w[i] for w in weights), (), blocks.rng[i])
            x, dx, dweights = template.backward(block_values, unit_record, (y1, y2), (dy1, dy2),
                                                training)
            return (k + 1, *x, *dx, [ta.write(i, g) for ta, g in zip(grad_tas, dweights)])

        _, x1, x2, dx1, dx2, grad_tas = tf.while_loop(
            lambda k, *_: k < n, body, (tf.constant(0), *y, *dy, _arrays(weights, n)),
            parallel_iterations=1, maximum_iterations=n,
        )
        return (x1, x2), (dx1, dx2), [ta.stack() for ta in grad_tas]

    def inverse(self, values, y, training=None):
        def body(k, y1, y2):
            block_values = self._slice(values, self.depth - 1 - k, values.rng)
            return (k + 1, *self.template.inverse(block_values, (y1, y2), training))

        _, x1, x2 = tf.while_loop(lambda k, *_: k < self.depth, body, (tf.constant(0), *y),
                                  maximum_iterations=self.depth)
        return x1, x2

    def run(self, values, x, training=None):
        """Eq. 1 through the blocks as an ordinary differentiable loop (autodiff stores activations).

        For inference and plain autodiff. The stacked weights are read through `TensorArray`s, so that
        the loop's gradient with respect to them is written slice by slice (linear in `n`) rather than
        as `n` full-size slice gradients. Returns `(y, values_after)`.
        """
        n, template, weights, state = self.depth, self.template, values.weights, values.state
        weight_tas = [ta.unstack(w) for ta, w in zip(_arrays(weights, n), weights)]

        def body(i, x1, x2, rng, new_tas):
            block_values = UnitValues(tuple(ta.read(i) for ta in weight_tas),
                                      tuple(s[i] for s in state), rng)
            y, _, after = template.forward(block_values, (x1, x2), training)
            return (i + 1, *y, after.rng, [ta.write(i, v) for ta, v in zip(new_tas, after.state)])

        _, y1, y2, rng, new_tas = tf.while_loop(
            lambda i, *_: i < n, body, (tf.constant(0), *x, values.rng, _arrays(state, n)),
            maximum_iterations=n,
        )
        return (y1, y2), values.replace(state=tuple(ta.stack() for ta in new_tas), rng=rng)


def _arrays(values, n):
    """One `TensorArray` of `n` slices per stacked value (slices of `value.shape[1:]`)."""
    return [tf.TensorArray(v.dtype, size=n, element_shape=v.shape[1:]) for v in values]


def as_unit(layer):
    """The unit that runs `layer`: its own `reversible_unit()`, else a `StoredInputUnit`."""
    make = getattr(layer, "reversible_unit", None)
    return make() if callable(make) else StoredInputUnit(layer)


def structure_signature(layer, variables):
    """Equal for layers that one traced loop body can run with each other's variable values.

    The layer's class, the classes of its residual functions F and G (and whether they are one
    layer), its config without names, and the shapes, dtypes and trainable flags of `variables`.
    None where the config cannot be read (such a layer is never fused).
    """
    try:
        config = strip_names(layer.get_config())
    except Exception:  # noqa: BLE001 - a layer without a usable config is never fused
        return None
    f, g = getattr(layer, "f", None), getattr(layer, "g", None)
    shapes = tuple((tuple(v.shape), str(v.dtype), v.trainable) for v in variables)
    return (type(layer), type(f), type(g), f is g, repr(config), shapes)
