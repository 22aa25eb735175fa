"""The unit protocol: how a `ReversibleSequence` runs, inverts and backpropagates each of its units.

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2-3.3 and Algorithm 1.

A `ReversibleSequence` drives a list of units, and a unit is the one place that knows its own math. A
unit owns no variable: it names the Keras variables it reads (`trainable`, `state`), and its methods
take their values explicitly (`UnitValues`), so the sequence can run it under one custom gradient
(`tf.custom_gradient`, `jax.custom_vjp`: the variables are explicit inputs), inside a loop over
stacked values (`tf.while_loop`, `jax.lax.scan`), or side-effect free (`tf_revnet.diagnostics`):

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

- `StoredInputUnit`: any Keras layer. Keeps its input and recomputes it with its vector-Jacobian
  product in the backward pass (as `tf.recompute_grad` does): stem, stage transitions, your own
  non-invertible layers.
- `BlockUnit`: a `ReversibleBlock` (Eq. 1 forward, Eq. 2 rebuild, Algorithm 1 backward).
- `LoopUnit`: `n` units of one structure over their stacked values, one loop forward and backward
  (`tf.while_loop`, `jax.lax.scan`); a `ReversibleBlockStack` (values stored stacked) and a sequence's
  run of identical blocks (values stacked at each call) run through it.

A layer chooses its unit with a `reversible_unit()` method; a layer without one runs as a
`StoredInputUnit`. `keras.StatelessScope` mappings are built in one place, `Unit.scope`.

The units are written in `keras.ops`; the recompute and its vector-Jacobian product (`backend.vjp`),
the ordering of the backward pass (`backend.after`) and the loop (`backend.scan`) come from
`tf_revnet.layers.backend`, one small module per Keras backend.
"""

import dataclasses
import typing

import keras
from keras import ops

from tf_revnet.layers import backend
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
            calls draw from it); any `(2,)` tensor of the backend's seed dtype where that generator
            does not exist.
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
    """Assigns `value` to Keras' global seed state (where that generator exists).

    Skipped for a JAX tracer outside a `keras.StatelessScope` (a `jax.jit` of a direct call):
    unseeded `keras.random` cannot run under `jax.jit`, so the state is unchanged there.
    """
    rng_variable = global_seed_state()
    if rng_variable is None or (backend.is_tracer(value) and not _in_stateless_scope()):
        return
    rng_variable.assign(value)


def _in_stateless_scope():
    # Keras exports `keras.StatelessScope` but no public "is one active" query.
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def read_rng(training=True):
    """The value of Keras' global seed state, int64 `(2,)`.

    Zeros where that generator is absent, and outside training (inference draws no random numbers;
    reading the generator would make every exported inference function capture it).
    """
    rng_variable = global_seed_state() if training else None
    return (backend.read(rng_variable.value) if rng_variable is not None
            else ops.zeros((2,), backend.RNG_DTYPE))


def read_values(unit, training=True):
    """The current values of `unit`'s variables (as their own dtype: the caller disables autocast)."""
    return UnitValues(
        tuple(backend.read(v.value) for v in unit.trainable),
        tuple(backend.read(v.value) for v in unit.state),
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
        # No stop_gradient: `x` enters the vjp as a primal, and gradients of gradients (JAX) must see
        # how the rebuilt input depends on `y`.
        x = tuple(self.inverse(values, backend.after(dy, y), training))

        def recompute(x, weights):
            return tuple(self.forward(values.replace(weights=weights), x, training)[0])

        _, pullback = backend.vjp(recompute, x, tuple(values.weights))
        dx, dweights = pullback(tuple(dy))
        return x, tuple(dx), list(dweights)

    def inverse(self, values, y, training=None):
        """Rebuilds the input from the output (invertible units only)."""
        raise ValueError(f"Layer '{self.name}' is not invertible: it has no inverse.")


class StoredInputUnit(Unit):
    """Any Keras layer as a unit: keeps its input, recomputes it in the backward pass (`tf.recompute_grad`).

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
        x = backend.after([dy], record.x)
        values = values.replace(state=record.state, rng=record.rng)

        def recompute(x, weights):
            with self.scope(values.replace(weights=weights)):
                return self.layer(x, training=training)

        out, pullback = backend.vjp(recompute, x, tuple(values.weights))
        dx, dweights = pullback(ops.cast(dy, out.dtype))
        return x, dx, list(dweights)


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
        y1, y2 = backend.after([dy1, dy2], (y1, y2))
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

        def residual(z, weights):
            with self.scope(values.replace(weights=weights)):
                return residual_function(z, training=training)

        x, dz, dx, dweights = backend.rebuild_half(
            residual, lambda x, h: coupling.couple(x, h, axis),
            lambda y, h: coupling.uncouple(y, h, axis), z, tuple(values.weights), y, dy)
        return x, dz, dx, list(dweights)


class LoopUnit(Unit):
    """`n` reversible units of one structure over stacked values, run by one loop (`backend.scan`).

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
        return tuple(ops.stack(values[p::width]) for p in range(width))

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
        columns = [ops.unstack(s, num=self.depth) for s in state]
        return tuple(column[i] for i in range(self.depth) for column in columns)

    def _slice(self, values, i, rng):
        return UnitValues(tuple(w[i] for w in values.weights), tuple(s[i] for s in values.state), rng)

    def slices(self, values):
        """`[(name, template, values of block i)]` for each block (packed `values`): diagnostics."""
        return [(self.names[i], self.template, self._slice(values, i, values.rng))
                for i in range(self.depth)]

    def forward(self, values, x, training=True):
        template, state = self.template, tuple(values.state)

        def body(carry, xs):
            x1, x2, rng = carry
            y, record, after = template.forward(UnitValues(*xs, rng), (x1, x2), training)
            return (*y, after.rng), (rng, record.mid_rng, tuple(record.mid_state),
                                     tuple(after.state))

        slices = tuple(_like(s) for s in state)
        (y1, y2, rng), (rngs, mid_rngs, mid_state, new_state) = backend.scan(
            body, (*x, values.rng), (tuple(values.weights), state), self.depth,
            ys_like=(_like(values.rng, 0), _like(values.rng, 0), slices, slices),
        )
        record = LoopRecord(BlockRecord(state, rngs, mid_state, mid_rngs))
        return (y1, y2), record, values.replace(state=new_state, rng=rng)

    def backward(self, values, record, y, dy, training=True):
        template, blocks, weights = self.template, record.blocks, tuple(values.weights)

        def body(carry, xs):
            y1, y2, dy1, dy2 = carry
            block_weights, state, rng, mid_state, mid_rng = xs
            x, dx, dweights = template.backward(
                UnitValues(block_weights, (), rng), BlockRecord(state, rng, mid_state, mid_rng),
                (y1, y2), (dy1, dy2), training)
            return (*x, *dx), tuple(dweights)

        (x1, x2, dx1, dx2), grads = backend.scan(
            body, (*y, *dy),
            (weights, tuple(blocks.state), blocks.rng, tuple(blocks.mid_state), blocks.mid_rng),
            self.depth, ys_like=tuple(_like(w) for w in weights), reverse=True,
        )
        return (x1, x2), (dx1, dx2), list(grads)

    def inverse(self, values, y, training=None):
        def body(carry, xs):
            return tuple(self.template.inverse(UnitValues(*xs, values.rng), carry, training)), ()

        (x1, x2), _ = backend.scan(body, tuple(y), (tuple(values.weights), tuple(values.state)),
                                   self.depth, reverse=True, sequential=False)
        return x1, x2

    def run(self, values, x, training=None):
        """Eq. 1 through the blocks as an ordinary differentiable loop (autodiff stores activations).

        For inference and plain autodiff. On TensorFlow the stacked values are read through
        `TensorArray`s, so that the loop's gradient with respect to them is written slice by slice
        (linear in `n`) rather than as `n` full-size slice gradients. Returns `(y, values_after)`.
        """
        template, state = self.template, tuple(values.state)

        def body(carry, xs):
            x1, x2, rng = carry
            y, _, after = template.forward(UnitValues(*xs, rng), (x1, x2), training)
            return (*y, after.rng), tuple(after.state)

        (y1, y2, rng), new_state = backend.scan(
            body, (*x, values.rng), (tuple(values.weights), state), self.depth,
            ys_like=tuple(_like(s) for s in state), sequential=False, differentiable=True,
        )
        return (y1, y2), values.replace(state=new_state, rng=rng)


def _like(stacked, axis=1):
    """A `keras.KerasTensor` of one slice of `stacked` (`axis=0`: of `stacked` itself)."""
    return keras.KerasTensor(tuple(stacked.shape[axis:]), dtype=keras.backend.standardize_dtype(
        stacked.dtype))


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
