"""A sequence of residual units that backpropagates storing only what cannot be rebuilt (Algorithm 1).

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2-3.3 and Algorithm 1.

The whole sequence runs under ONE custom gradient (`tf.custom_gradient` on TensorFlow, `jax.custom_vjp`
on JAX: `tf_revnet.layers.backend`). The forward pass keeps only the sequence's output
and the inputs of its non-invertible units (stage transitions, a stem); the gradient function walks the
units backwards, rebuilding each `ReversibleBlock`'s inputs from its outputs (Eq. 2) and recomputing every
unit under `tf.GradientTape`s. A custom gradient per block would save nothing, because block k's output
is block k+1's input and stays referenced.

How it is exact and memory-flat (see the project's NOTES; items 1, 4 and 5 are TensorFlow's):

1. The forward pass runs with gradient recording stopped, so an outer eager `GradientTape` does not keep
   every activation alive (`tf.recompute_grad` does the same).
2. Every layer runs as its unit (`tf_revnet.layers.unit`: `forward`, `backward`, `inverse` over
   explicit variable values, in a `keras.StatelessScope`):
   the variables are explicit inputs of the custom gradient (so it works under `tf.cond`, `tf.switch_case`
   and `tf.while_loop`), BatchNorm statistics are assigned once from the forward pass, and the recompute
   replays the state every unit saw (seed generators, Keras' global generator).
3. A `ReversibleBlockStack` (weights stored stacked) runs as one `LoopUnit`, a `tf.while_loop` forward
   and backward; so do consecutive blocks of one `structure_signature` (no shared variables), over
   their values stacked before the custom gradient: the traced graph holds one block whatever the
   depth, so graph memory and tracing/compile time grow only by each variable's read and update.
4. In a graph, the recompute of each unit waits for the gradient of the unit above (control
   dependencies, or the loop's carried gradient); otherwise the executor would run every recompute right
   after the forward pass and keep all their tensors.
5. If a second tape or a forward accumulator watches the call (gradients of gradients, Hessian-vector
   products, `tf.autodiff.ForwardAccumulator`), the sequence runs as ordinary layers instead: exact higher
   order gradients, at ordinary memory cost.
"""

import collections

import keras
from keras import ops

from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.autocast import no_autocast
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.utils import (
    build_sublayer,
    global_seed_state,
    higher_order_possible,
    is_float_dtype,
)


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleSequence(keras.layers.Layer):
    """Residual units applied in order, with activation-free backprop (Algorithm 1).

    `units` holds `ReversibleBlock`s (or `ReversibleBlockStack`s: many blocks of one structure with
    stacked weights) and, between them, any other Keras layers (a
    `StageTransition` that changes the stride or the channels, a stem, ...). In training mode the
    backward pass stores no activation: it keeps the sequence's output and the input of each
    non-invertible unit, rebuilds every block's inputs from its outputs (Eq. 2) and recomputes each unit
    (F and G of a block, at about 4N instead of 3N multiply-adds, Section 3.2; a non-invertible unit
    from its stored input, as `tf.recompute_grad` does). Activation memory is therefore independent of
    the number of blocks, and non-invertible units keep only their inputs (Section 3.3).

    The gradients equal ordinary autodiff up to float rounding (relative error ~1e-7 in float32,
    ~1e-16 in float64 with bounded activations), in eager mode, `tf.function`, XLA, `model.fit`,
    `tf.distribute` strategies and inside `tf.cond` / `tf.switch_case` / `tf.while_loop`. With
    `training` False or None the units run as ordinary layers.

    What the recompute replays: the state of every `keras.random.SeedGenerator` the units own (Dropout,
    GaussianNoise, ...) and of Keras' global generator (`keras.random.*` with `seed=None`), and all other
    non-trainable state (BatchNorm statistics, which the forward pass alone updates). Random ops with a
    hidden TensorFlow state (`tf.random.uniform`, `tf.nn.dropout`, `tf.random.Generator`) cannot be
    replayed: building such a sequence for training raises a `ValueError` naming the unit.

    Args:
        units: list of Keras layers, non-empty: `ReversibleBlock`s and `ReversibleBlockStack`s
            (rebuilt from their outputs) and other layers (recomputed from their stored inputs).
            Alias: `blocks`.
        use_custom_gradient: bool. If False, backpropagate with ordinary autodiff on the same weights
            (stores activations; for comparison and debugging). Defaults to True.
        fuse_identical_blocks: bool. Run consecutive blocks of one structure as one `tf.while_loop`
            over their stacked weights (graph size independent of depth). Defaults to True.
        taps: list of int, or None. Indices of units whose outputs the sequence returns (a list, in
            this order) instead of its last output: multi-scale features for detection and
            segmentation heads. The memory-saving backward keeps each tapped output (it is an
            output) and adds its incoming gradient on the way down (Algorithm 1 restarts from the
            exact tapped value); units after the last tap get zero gradients. Defaults to None.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor, e.g. NHWC `(N, H, W, C)`.
        training: bool or None. True runs the memory-saving backward pass.

    Input shape:
        What the first unit accepts; a `ReversibleBlock` needs an even size on its `axis`.

    Output shape:
        What the last unit returns (with `taps`: a list of what each tapped unit returns). A sequence
        of blocks keeps the input shape and returns the blocks' `stream_dtype` (float32 under mixed
        precision).

    Raises:
        ValueError: if `units` is empty or holds something that is not a Keras layer (named by index);
            if the blocks' `axis` differ; on build, if a unit cannot take its input (e.g. F or G with
            stride 2, an odd channel count; named by index and layer), or a unit draws from an
            unreplayable random op; on call, if the input is not floating point; on `inverse`, if a
            unit is not invertible.

    Examples:
        >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence
        >>> blocks = [
        ...     ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16)) for _ in range(8)
        ... ]
        >>> stack = ReversibleSequence(blocks)
        >>> x = keras.random.normal((4, 16, 16, 32))
        >>> import tensorflow as tf  # the TensorFlow backend (on JAX: jax.grad of stateless_call)
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(x)
        ...     loss = tf.reduce_sum(stack(x, training=True) ** 2)
        >>> grads = tape.gradient(loss, [x] + stack.trainable_variables)

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Sections 3.2-3.3, Algorithm 1.
    """

    def __init__(
        self, units=None, use_custom_gradient=True, fuse_identical_blocks=True, blocks=None,
        taps=None, **kwargs
    ):
        super().__init__(**kwargs)
        # The residual stream keeps the variable dtype: no autocast of our own reads to low precision.
        self.autocast = False
        if units is None:
            units = blocks
        elif blocks is not None:
            raise ValueError("Pass `units` or its alias `blocks`, not both.")
        if isinstance(units, keras.layers.Layer):
            units = [units]
        units = list(units) if units is not None else []
        if not units:
            raise ValueError(
                "`units` must be a non-empty list of Keras layers (tf_revnet.layers.ReversibleBlock "
                f"and others). Received: units={units!r}"
            )
        for index, unit in enumerate(units):
            if not isinstance(unit, keras.layers.Layer):
                raise ValueError(
                    f"`units[{index}]` must be a Keras layer (a tf_revnet.layers.ReversibleBlock, or a "
                    "non-invertible layer such as tf_revnet.layers.StageTransition, which is "
                    f"recomputed from its stored input). Received: units[{index}]={unit!r}"
                )
        axes = [u.axis for u in units if _invertible(u)]
        if len(set(axes)) > 1:
            raise ValueError(f"All blocks must split the same axis. Received: axis values {axes}")
        self.units = units
        self.taps = _check_taps(taps, len(units))
        self.use_custom_gradient = bool(use_custom_gradient)
        self.fuse_identical_blocks = bool(fuse_identical_blocks)
        self._plan = None

    @property
    def blocks(self):
        """The units (alias kept for sequences made only of `ReversibleBlock`s)."""
        return self.units

    @property
    def input_dtype(self):
        first = self.units[0]
        return first.input_dtype if _invertible(first) else self.dtype_policy.variable_dtype

    def build(self, input_shape):
        spec_shape, dtype = tuple(input_shape), self.input_dtype
        self._unit_input_shapes = []
        for index, unit in enumerate(self.units):
            self._unit_input_shapes.append(spec_shape)
            try:
                out = build_sublayer(unit, spec_shape, dtype)
            except ValueError as error:
                raise ValueError(f"In `units[{index}]` (layer '{unit.name}'): {error}") from None
            spec_shape, dtype = tuple(out.shape), out.dtype
        global_seed_state(create=True)  # create Keras' global generator now, outside any trace
        first = self.units[0]
        if _invertible(first):
            self.input_spec = first.input_spec
        self._plan = None
        self.built = True

    def compute_output_shape(self, input_shape):
        shapes = [tuple(input_shape)]
        for unit in self.units:
            shapes.append(tuple(unit.compute_output_shape(shapes[-1])))
        return shapes[-1] if self.taps is None else [shapes[i + 1] for i in self.taps]

    def compute_output_spec(self, inputs, training=None):
        if not is_float_dtype(inputs.dtype):
            raise ValueError(
                f"Layer '{self.name}' expects floating point inputs. Received: dtype={inputs.dtype}. "
                "Fix: cast the inputs, e.g. with keras.ops.cast(x, 'float32')."
            )
        specs = [inputs]
        for unit in self.units:
            specs.append(unit.compute_output_spec(specs[-1]))
        outputs = [keras.KerasTensor(s.shape, dtype=s.dtype) for s in specs[1:]]
        return outputs[-1] if self.taps is None else [outputs[i] for i in self.taps]

    def call(self, inputs, training=None):
        inputs = backend.read(inputs)
        if not is_float_dtype(inputs.dtype):
            raise ValueError(
                f"Layer '{self.name}' expects floating point inputs. Received: dtype="
                f"{keras.backend.standardize_dtype(inputs.dtype)}. Fix: cast the inputs, e.g. with "
                "keras.ops.cast(x, 'float32')."
            )
        if self.use_custom_gradient and training:
            plan = self._get_plan()
            with no_autocast():
                values = plan.read_values()
            weights = [w for unit_values in values for w in unit_values.weights]
            # Gradients of gradients need the recorded forward pass (Algorithm 1 keeps none).
            if not higher_order_possible([inputs] + weights):
                with no_autocast():
                    return self._reversible_call(inputs, values)
        outputs = [inputs]
        for unit in self.units:
            outputs.append(unit(outputs[-1], training=training))
        return outputs[-1] if self.taps is None else [outputs[i + 1] for i in self.taps]

    def inverse(self, outputs, training=None):
        """Rebuilds the sequence's inputs from its outputs (Eq. 2, block by block in reverse).

        Side-effect free (runs in a `keras.StatelessScope`); see `ReversibleBlock.inverse` for the
        meaning of `training`.

        Args:
            outputs: float tensor, the sequence's output, e.g. `(N, H, W, C)`.
            training: bool or None, passed to F and G.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.

        Raises:
            ValueError: if a unit is not a `ReversibleBlock` (named by index), or `outputs` is not
                floating point.
        """
        for index, unit in enumerate(self.units):
            if not _invertible(unit):
                raise ValueError(
                    f"`units[{index}]` (layer '{unit.name}') is not invertible: only a sequence of "
                    "ReversibleBlocks (and ReversibleBlockStacks) has an inverse."
                )
        outputs = self.units[0].check_input(backend.read(outputs))
        plan = self._get_plan(check=False)
        with no_autocast():
            values = [unit.pack(unit_lib.read_values(unit, bool(training))) for unit in plan.units]
        with keras.StatelessScope():
            y = self.units[0].split(outputs)
            for unit, unit_values in zip(reversed(plan.units), reversed(values)):
                y = unit.inverse(unit_values, y, training=training)
            return self.units[0].merge(*y)

    # ----------------------------------------------------------------------------------------------
    # The memory-saving pass.

    def _get_plan(self, check=True):
        """The plan of the memory-saving pass, rebuilt when a unit's variables change sides.

        A unit's `trainable` flag can change after the first call (freezing part of a trained model
        before fine-tuning it); the plan's flat lists of weights and state follow it.
        """
        key = tuple(
            (tuple(id(v) for v in unit.trainable_variables),
             tuple(id(v) for v in unit.non_trainable_variables))
            for unit in self.units
        )
        if self._plan is None or self._plan.key != key:
            self._plan = _Plan(self.units, self.fuse_identical_blocks, key, self.taps)
        if check and not self._plan.checked:
            self._plan.check_replayable(self._unit_input_shapes)
        return self._plan

    def _reversible_call(self, inputs, values):
        """Algorithm 1 under one custom gradient whose inputs are `inputs` and every value.

        `backend.sequence_gradient` (`tf.custom_gradient` or `jax.custom_vjp`) runs the plan and returns
        the state after the forward pass, assigned here once.
        """
        plan = self._plan
        taps, states, rng = backend.sequence_gradient(plan, inputs, values, self.name)
        plan.assign_state(states)
        unit_lib.assign_rng(rng)
        return taps[0] if self.taps is None else list(taps)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": _serialize_units(self.units),
                "use_custom_gradient": self.use_custom_gradient,
                "fuse_identical_blocks": self.fuse_identical_blocks,
                "taps": None if self.taps is None else list(self.taps),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        units = config.pop("units", None)
        if units is None:  # configs written before units could be non-invertible
            units = config.pop("blocks")
        return cls(units=_deserialize_units(units), **config)


def _read(variable):
    """The value of a Keras variable as a tensor, in its own dtype (the caller does not autocast)."""
    return backend.read(variable.value)


class _Plan:
    """How a `ReversibleSequence` runs its layers: their units, in order.

    Each layer becomes its unit (`tf_revnet.layers.unit.as_unit`); consecutive `BlockUnit`s of one
    `structure_signature` that share no variable are fused into one `LoopUnit` (one `tf.while_loop`
    over their values, stacked before the sequence's custom gradient: its inputs then grow with depth
    by one tensor per variable position, not per variable).

    Args:
        layers: the sequence's units (Keras layers).
        fuse: bool. Fuse runs of identical blocks (a run ends at a tapped layer).
        key: the variable ids the plan was made for (the sequence rebuilds it when they change).
        taps: the sequence's `taps` (layer indices), or None (the last layer).
    """

    def __init__(self, layers, fuse, key, taps=None):
        self.key, self.checked = key, False
        taps = (len(layers) - 1,) if taps is None else taps
        units = [unit_lib.as_unit(layer) for layer in layers]
        self.units, self.layer_index = (_fuse(units, set(taps)) if fuse
                                        else (units, list(range(len(units)))))
        # The unit whose last layer is each tapped layer: a fused run ends at a tapped layer.
        last_layer = [start + getattr(u, "depth", 1) - 1 if isinstance(u, unit_lib.LoopUnit)
                      and not u.stacked else start for u, start in zip(self.units, self.layer_index)]
        #: Plan unit index of each tap, in the order of `taps`.
        self.tap_units = [last_layer.index(t) for t in taps]
        counts = collections.Counter(id(v) for unit in self.units for v in unit.state)
        #: Ids of state variables that more than one unit reads (a layer used twice).
        self.shared_state = {i for i, count in counts.items() if count > 1}

    def read_values(self):
        """Every unit's packed `UnitValues`, each variable read once (shared ones feed every unit)."""
        reads, rng = {}, unit_lib.read_rng()

        def read(variable):
            if id(variable) not in reads:
                reads[id(variable)] = _read(variable)
            return reads[id(variable)]

        return [unit.pack(unit_lib.UnitValues(tuple(read(v) for v in unit.trainable),
                                              tuple(read(v) for v in unit.state), rng))
                for unit in self.units]

    def check_replayable(self, shapes):
        """Raises `ValueError` if a unit draws from a random op whose state cannot be replayed."""
        for unit, index in zip(self.units, self.layer_index):
            found = backend.unreplayable_random_ops(unit.layer, shapes[index])
            if found:
                raise ValueError(
                    f"`units[{index}]` (layer '{unit.layer.name}') draws random numbers with "
                    f"TensorFlow ops whose state cannot be replayed in the backward recompute "
                    f"({', '.join(found)}: e.g. tf.random.uniform, tf.nn.dropout or a "
                    "tf.random.Generator), so its gradients would be wrong. Fix: draw with "
                    "keras.random.* and a keras.random.SeedGenerator owned by the layer (as "
                    "keras.layers.Dropout does) or with seed=None, or pass "
                    "use_custom_gradient=False."
                )
        self.checked = True

    def forward(self, x, values):
        """Runs every unit forward; returns `(taps, records, states, rng)`, a packed state per unit.

        `taps` are the outputs of `tap_units`, in order. The state is threaded by variable: a layer
        used twice sees its own update.
        """
        current, records, states, outputs = {}, [], [], []
        rng = values[0].rng if values else None
        for unit, unit_values in zip(self.units, values):
            if any(id(v) in current for v in unit.state):  # a variable an earlier unit updated
                state = zip(unit.state, unit.unpack_state(unit_values.state))
                unit_values = unit_values.replace(
                    state=unit.pack_state(tuple(current.get(id(v), s) for v, s in state)))
            unit_values, in_dtype = unit_values.replace(rng=rng), x.dtype
            if unit.invertible:
                layer = unit.layer
                y, record, after = unit.forward(unit_values,
                                                layer.split(ops.cast(x, layer.stream_dtype)))
                y = layer.merge(*y)
            else:
                y, record, after = unit.forward(unit_values, x)
            records.append((record, in_dtype))
            outputs.append(y)
            states.append(tuple(after.state))
            if self.shared_state & {id(v) for v in unit.state}:
                current.update(zip(map(id, unit.state), unit.unpack_state(after.state)))
            x, rng = y, after.rng
        return [outputs[i] for i in self.tap_units], records, states, rng

    def backward(self, taps, tap_grads, values, records):
        """Algorithm 1 over the units, last to first; returns `(dx, dweights)`, a list per unit.

        Starts at the highest tapped unit from its output; at each tapped unit the exact tapped output
        replaces the rebuilt one and its incoming gradient is added. Units above the highest tap get
        zero gradients.
        """
        exact = {u: t for u, t in zip(self.tap_units, taps)}
        incoming = {}
        for u, g in zip(self.tap_units, tap_grads):
            incoming[u] = incoming[u] + g if u in incoming else g
        top = max(self.tap_units)
        grads = [[ops.zeros_like(w) for w in v.weights] for v in values[top + 1:]]
        x, dx = exact[top], None
        for index in reversed(range(top + 1)):
            unit, unit_values, (record, in_dtype) = self.units[index], values[index], records[index]
            if index in exact:
                x, grad = exact[index], ops.cast(incoming[index], exact[index].dtype)
                dx = grad if dx is None else dx + ops.cast(grad, dx.dtype)
            if unit.invertible:
                layer = unit.layer
                halves = layer.split(ops.cast(x, layer.stream_dtype))
                grad_halves = layer.split(ops.cast(dx, layer.stream_dtype))
                x, dx, dweights = unit.backward(unit_values, record, halves, grad_halves)
                x, dx = ops.cast(layer.merge(*x), in_dtype), ops.cast(layer.merge(*dx), in_dtype)
            else:
                x, dx, dweights = unit.backward(unit_values, record, x, dx)
            grads.insert(0, list(dweights))
        return dx, grads

    def assign_state(self, states):
        """Assigns each unit's packed state after the forward pass to its variables, once per step."""
        for unit, state in zip(self.units, states):
            for variable, value in zip(unit.state, unit.unpack_state(state)):
                variable.assign(value)


def _invertible(layer):
    """Whether the sequence rebuilds `layer`'s inputs from its outputs (a reversible unit)."""
    return bool(getattr(layer, "invertible", False))


def _fuse(units, ends=()):
    """Fuses runs of consecutive units of one `signature` that share no variable into `LoopUnit`s.

    A run ends at each layer index in `ends` (a tapped output must be a unit's output). Returns
    `(units, layer_index)`: the new units and, for each, the index of its first layer.
    """
    fused, layer_index, run, run_start = [], [], [], 0

    def flush():
        if len(run) > 1:
            fused.append(unit_lib.LoopUnit.for_blocks(run))
            layer_index.append(run_start)
        elif run:
            fused.append(run[0])
            layer_index.append(run_start)

    signatures = [unit.signature for unit in units]
    for index, (unit, signature) in enumerate(zip(units, signatures)):
        if run and signature == signatures[run_start] and _disjoint(run, unit) and (
                index - 1 not in ends):
            run.append(unit)
            continue
        flush()
        run, run_start = [unit], index
        if signature is None:
            flush()
            run = []
    flush()
    return fused, layer_index


def _check_taps(taps, n_units):
    """`taps` as a tuple of unit indices, or None.

    Raises:
        ValueError: unless `taps` is None or a non-empty list of distinct ints in `[0, n_units)`.
    """
    if taps is None:
        return None
    taps = tuple(taps) if isinstance(taps, (list, tuple)) else (taps,)
    bad = not taps or len(set(taps)) != len(taps) or any(
        isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_units for t in taps)
    if bad:
        raise ValueError(
            f"`taps` must be a non-empty list of distinct unit indices in [0, {n_units}). "
            f"Received: taps={taps!r}"
        )
    return taps


def _disjoint(run, unit):
    ids = {id(v) for member in run for v in member.trainable + member.state}
    return not any(id(v) in ids for v in unit.trainable + unit.state)


def _serialize_units(units):
    """Unit configs; a unit or residual function that appears again is stored as a reference."""
    seen = {}
    configs = []
    for index, unit in enumerate(units):
        if id(unit) in seen:
            configs.append({"same_as": seen[id(unit)]})
            continue
        seen[id(unit)] = [index]
        config = keras.saving.serialize_keras_object(unit)
        if isinstance(unit, ReversibleBlock):
            inner = config["config"]
            for arg in ("f", "g"):
                layer = getattr(unit, arg)
                if arg == "g" and layer is unit.f:
                    continue
                if id(layer) in seen:
                    inner[arg] = {"same_as": seen[id(layer)]}
                else:
                    seen[id(layer)] = [index, arg]
        configs.append(config)
    return configs


def _deserialize_units(configs):
    """Units from `_serialize_units`' configs: `{"same_as": [index, ...]}` is the layer at that path."""
    units = []
    for config in configs:
        if isinstance(config, dict) and "same_as" in config:
            units.append(_resolve(units, config["same_as"]))
            continue
        if isinstance(config, dict) and isinstance(config.get("config"), dict):
            inner = dict(config["config"])
            for arg in ("f", "g"):
                ref = inner.get(arg)
                path = ref.get("same_as") if isinstance(ref, dict) else None
                # A path from the units (it starts at an index); ["f"] is the block's own.
                if isinstance(path, list) and path and isinstance(path[0], int):
                    inner[arg] = _resolve(units, path)  # ReversibleBlock takes layers
            config = dict(config, config=inner)
        units.append(keras.saving.deserialize_keras_object(config))
    return units


def _resolve(units, path):
    obj = units[path[0]]
    for attr in path[1:]:
        obj = getattr(obj, attr)
    return obj
