"""Numerical fidelity of reversible backprop: reconstruction error and gradient angle.

Reversible backprop (Gomez et al., NeurIPS 2017, arXiv:1707.04585, Algorithm 1) rebuilds each block's
inputs from its outputs instead of storing them. In floating point the rebuilt inputs differ from the
forward pass's by rounding, and the error can grow with depth, with the size of the activations and in
low precision (Section 5.3 of the paper, and its figure of the angle between the true and the
reconstructed gradient). Two measurements make this visible:

- `reconstruction_error(layer_or_model, x)`: for every reversible block, how far the inputs that
  Algorithm 1 rebuilds are from the inputs of the forward pass (relative and maximum absolute error);
- `gradient_angle(model, x, y, loss)`: the angle between the gradient of reversible backprop and the
  gradient of ordinary backprop with stored activations (same weights, same batch), overall and per
  variable, and the relative difference of their norms.

Both run in training mode (BatchNorm on batch statistics, as in a training step) and leave the model as
they found it: BatchNorm moving statistics, `SeedGenerator` states and the sequences'
`use_custom_gradient` switches are unchanged afterwards. `tf_revnet.callbacks.ReversibleNumericsMonitor`
runs both during `model.fit`.
"""

import dataclasses
import math
import typing

import keras
import numpy as np

from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.autocast import no_autocast
from tf_revnet.layers.momentum import MomentumBlock
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_block_stack import ReversibleBlockStack
from tf_revnet.layers.reversible_sequence import ReversibleSequence

if backend.BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = backend.tensorflow_only(
        "tf_revnet.diagnostics", "its passes run under tf.GradientTape")

#: The layers measured: sequences, and blocks or stacks used on their own.
_REVERSIBLE = (ReversibleSequence, ReversibleBlock, ReversibleBlockStack, MomentumBlock)

__all__ = [
    "BlockReconstruction",
    "GradientAngle",
    "ReconstructionReport",
    "angle_degrees",
    "compare_gradients",
    "gradient_angle",
    "gradients",
    "reconstruction_error",
    "reversible_layers",
    "stream_out_of_range",
]


# ----------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class BlockReconstruction:
    """Reconstruction error of one reversible block (all errors computed in float64).

    Attributes:
        name: str. The block's layer name, e.g. `"revnet38_stage1_block2"`.
        sequence: str or None. Name of the `ReversibleSequence` holding the block (None for a block
            measured on its own), with `"#k"` appended for the k-th call of a layer called more than
            once in a model.
        index: int. Position of the block in its sequence (0-based).
        relative_error: float. `||x_rebuilt - x|| / ||x||` (Frobenius norms over the whole batch, both
            halves) where `x_rebuilt` is rebuilt as Algorithm 1 does: from the sequence's output,
            through every block above this one. NaN if a value is not finite.
        max_abs_error: float. `max |x_rebuilt - x|`, same rebuild. NaN if a value is not finite.
        local_relative_error: float. Like `relative_error`, but rebuilt from this block's exact output
            (the error this block alone adds).
        local_max_abs_error: float. Like `max_abs_error` for the local rebuild.
        nonfinite: int. Number of inf or NaN values in the forward inputs and the rebuilt inputs of this
            block together (0 when everything is finite).
        max_abs_stream: float. `max |t|` over the block's forward inputs and outputs (NaN if one
            is not finite).
        exact_range: float. The magnitude below which the block's fixed-point stream adds exactly
            (`coupling.exact_range`; inf for a floating point stream).
    """

    name: str
    sequence: typing.Optional[str]
    index: int
    relative_error: float
    max_abs_error: float
    local_relative_error: float
    local_max_abs_error: float
    nonfinite: int
    max_abs_stream: float = math.nan
    exact_range: float = math.inf

    @property
    def finite(self):
        """bool. True if every forward and rebuilt input value is finite."""
        return self.nonfinite == 0

    @property
    def out_of_range(self):
        """bool. True if the stream left `exact_range` (or is not finite) in this measurement."""
        return not self.max_abs_stream < self.exact_range


@dataclasses.dataclass(frozen=True)
class ReconstructionReport:
    """Reconstruction errors of every reversible block of a layer or model, in forward order.

    Attributes:
        blocks: tuple of `BlockReconstruction`, one per block (per call for shared layers).
    """

    blocks: typing.Tuple[BlockReconstruction, ...]

    @property
    def finite(self):
        """bool. True if no block saw an inf or NaN."""
        return all(b.finite for b in self.blocks)

    @property
    def nonfinite(self):
        """int. Total number of inf or NaN values over all blocks."""
        return sum(b.nonfinite for b in self.blocks)

    def worst(self):
        """The `BlockReconstruction` with the largest `relative_error` (a non-finite block first)."""
        return max(self.blocks, key=lambda b: math.inf if math.isnan(b.relative_error)
                   else b.relative_error)

    @property
    def max_relative_error(self):
        """float. Largest `relative_error` over the blocks (NaN if a block saw inf or NaN)."""
        worst = self.worst()
        return worst.relative_error

    @property
    def out_of_range(self):
        """tuple of str. Names of the blocks with a fixed-point stream whose values left its exact
        range in this measurement (empty when every grid held; blocks without a grid never appear)."""
        return tuple(b.name for b in self.blocks
                     if b.exact_range < math.inf and b.out_of_range)

    @property
    def max_abs_stream(self):
        """float. Largest `max_abs_stream` over the blocks (NaN if a block saw inf or NaN)."""
        values = [b.max_abs_stream for b in self.blocks]
        return math.nan if any(math.isnan(v) for v in values) else max(values)

    @property
    def max_abs_error(self):
        """float. Largest `max_abs_error` over the blocks (NaN if a block saw inf or NaN)."""
        values = [b.max_abs_error for b in self.blocks]
        return math.nan if any(math.isnan(v) for v in values) else max(values)


@dataclasses.dataclass(frozen=True)
class GradientAngle:
    """Reversible-backprop gradient against stored-activation gradient, same weights and batch.

    `a` is the gradient of reversible backprop (every `ReversibleSequence` as configured), `b` the
    reference (every `ReversibleSequence` with `use_custom_gradient=False`: ordinary autodiff that
    stores the activations). Both are flattened, cast to float64, and compared as vectors.

    Attributes:
        degrees: float. Angle between `a` and `b` over all trainable variables, in degrees,
            `2 atan2(||a/|a| - b/|b|||, ||a/|a| + b/|b|||)` (accurate down to ~1e-14 degrees, unlike
            `acos` of the cosine). 0 if both are zero, NaN if only one is zero or a value is not finite.
        relative_error: float. `||a - b|| / ||b||` (NaN if `b` is zero or a value is not finite).
        relative_norm_difference: float. `(||a|| - ||b||) / ||b||`: positive if reversible backprop's
            gradient is longer.
        per_variable: dict `{variable path: angle in degrees}`, e.g.
            `{"revnet38_stage1_block2/f/conv1/kernel": 1.2e-5, ...}`, for every trainable variable.
        worst_variable: str or None. Path of the variable with the largest angle (a non-finite one
            first); None if there are no trainable variables.
        loss: float. The loss of the reversible run (unscaled).
        reference_loss: float. The loss of the reference run; equal to `loss` up to rounding, since the
            forward passes are the same computation.
        nonfinite: int. Number of inf or NaN values in the two gradients together.
    """

    degrees: float
    relative_error: float
    relative_norm_difference: float
    per_variable: typing.Dict[str, float]
    worst_variable: typing.Optional[str]
    loss: float
    reference_loss: float
    nonfinite: int

    @property
    def finite(self):
        """bool. True if both gradients are finite."""
        return self.nonfinite == 0


# ----------------------------------------------------------------------------------------------------
# Numerics


def angle_degrees(a, b):
    """The angle between two vectors in degrees, accurate for tiny and near-180-degree angles.

    Uses `2 atan2(||u - v||, ||u + v||)` with the unit vectors `u = a/||a||`, `v = b/||b||`,
    accumulated in float64 (W. Kahan, "How futile are mindless assessments of roundoff in
    floating-point computation?", 2006, p. 47). `acos(cos)` loses all digits below about 1e-6
    degrees in float64 (`1 - cos` underflows), this formula does not.

    Args:
        a: array-like of numbers, any shape (flattened).
        b: array-like of numbers of the same size.

    Returns:
        float. The angle in degrees, in [0, 180]; 0.0 if both are zero; NaN if exactly one is zero
        or a value is not finite.

    Raises:
        ValueError: if `a` and `b` have different sizes.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(
            f"`a` and `b` must have the same number of elements. Received: {a.size} and {b.size}"
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    norm_a, norm_b = _norm(a), _norm(b)
    if norm_a == 0.0 and norm_b == 0.0:
        return 0.0
    if norm_a == 0.0 or norm_b == 0.0:
        return math.nan
    u, v = a / norm_a, b / norm_b
    return math.degrees(2.0 * math.atan2(_norm(u - v), _norm(u + v)))


def _norm(a):
    """Euclidean norm in float64, scaled to avoid overflow of the sum of squares."""
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * math.sqrt(float(np.sum(np.square(a / scale))))


def _to_f64(t):
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float64)


def _errors(rebuilt, reference):
    """`(relative error, max abs error, non-finite count)` of `rebuilt` against `reference`."""
    rebuilt = np.concatenate([_to_f64(t).ravel() for t in rebuilt])
    reference = np.concatenate([_to_f64(t).ravel() for t in reference])
    nonfinite = int(np.size(rebuilt) - np.count_nonzero(np.isfinite(rebuilt)))
    nonfinite += int(np.size(reference) - np.count_nonzero(np.isfinite(reference)))
    if nonfinite:
        return math.nan, math.nan, nonfinite
    diff = rebuilt - reference
    norm = _norm(reference)
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    if norm == 0.0:
        return (0.0 if max_abs == 0.0 else math.inf), max_abs, 0
    return _norm(diff) / norm, max_abs, 0


# ----------------------------------------------------------------------------------------------------
# Finding the reversible layers of a model


def reversible_layers(layer_or_model):
    """The `ReversibleSequence`s and stand-alone `ReversibleBlock`s of a layer or (nested) model.

    Walks `layers` of models recursively (a model used as a layer of another model included) and
    does not descend into a `ReversibleSequence` (its blocks belong to it).

    Args:
        layer_or_model: a `keras.layers.Layer` or `keras.Model`.

    Returns:
        list of `ReversibleSequence` and `ReversibleBlock`, each once, in the order of `layers`.
    """
    found, seen = [], set()

    def walk(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, _REVERSIBLE):
            found.append(layer)
            return
        for sub in getattr(layer, "layers", None) or []:
            walk(sub)

    walk(layer_or_model)
    return found


def _require_reversible(layers, arg, value):
    if not layers:
        raise ValueError(
            f"`{arg}` holds no tf_revnet ReversibleSequence or ReversibleBlock, so there is nothing "
            f"to measure. Received: {arg}={getattr(value, 'name', value)!r} of type "
            f"{type(value).__name__}"
        )


class _RecordInputs:
    """Context manager: records the input of every call of the given layers.

    Sets an instance attribute `call` on each layer (Keras' `Layer.__call__` looks `self.call` up at
    call time) that appends the input to `self.records[layer]` and calls the class's `call`, and
    removes it on exit.
    """

    def __init__(self, layers):
        self.layers = layers
        self.records = {id(layer): [] for layer in layers}

    def __enter__(self):
        for layer in self.layers:
            original = type(layer).call
            records = self.records[id(layer)]

            def recording_call(inputs, *args, _layer=layer, _original=original, _records=records,
                               **kwargs):
                _records.append(inputs)
                return _original(_layer, inputs, *args, **kwargs)

            object.__setattr__(layer, "call", recording_call)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        return False


def _check_input(x, arg="x"):
    try:
        x = tf.convert_to_tensor(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{arg}` must be a tensor or array. Received: {type(x).__name__}: "
                         f"{error}") from None
    return x


# ----------------------------------------------------------------------------------------------------
# Reconstruction error


def _forward_segments(units, x):
    """Runs `units` forward through the unit protocol, state threaded as in training.

    Returns the runs of consecutive invertible units ("segments"), each a list of one entry per
    block: `(index, name, block_unit, values, record, inputs, outputs)` (a stack's blocks one by one).
    """
    rng = unit_lib.read_rng()
    state = {id(v): tf.convert_to_tensor(v.value) for u in units for v in u.state}
    h, segments, current = x, [], None
    for index, unit in enumerate(units):
        values = unit.pack(unit_lib.read_values(unit).replace(
            state=tuple(state[id(v)] for v in unit.state), rng=rng))
        if not unit.invertible:
            h, _, after = unit.forward(values, h)
            new_state, rng, current = after.state, after.rng, None
        else:
            layer = unit.layer
            halves = layer.split(layer.check_input(tf.cast(h, layer.stream_dtype)))
            if current is None:
                current = []
                segments.append(current)
            pieces = (unit.slices(values) if isinstance(unit, unit_lib.LoopUnit)
                      else [(unit.name, unit, values)])
            block_states = []
            for name, block_unit, block_values in pieces:
                # The block's own inputs: on the fixed-point grid where its coupling keeps one.
                coupling = getattr(block_unit.layer, "coupling", None)
                inputs = tuple(coupling.quantize(t) for t in halves) if coupling else halves
                halves, record, after = block_unit.forward(block_values.replace(rng=rng), inputs)
                current.append((index, name, block_unit, block_values, record, inputs, halves))
                block_states.append(after.state)
                rng = after.rng
            new_state = (unit.unpack_state(tuple(tf.stack(c) for c in zip(*block_states)))
                         if isinstance(unit, unit_lib.LoopUnit) else block_states[0])
            h = layer.merge(*halves)
        for v, value in zip(unit.state, new_state):
            state[id(v)] = value
    return segments


def _sequence_reconstruction(sequence, x, label):
    """Per-block errors of one `ReversibleSequence` (or one block) on its input `x`.

    Runs the units' forward pass (`_forward_segments`), then rebuilds every run of consecutive blocks
    from its exact output with each block's `backward` (Algorithm 1), as the backward pass does (it
    restarts from the stored input of each non-invertible unit).
    """
    layers = sequence.units if isinstance(sequence, ReversibleSequence) else [sequence]
    results = []
    with no_autocast():
        for segment in _forward_segments([unit_lib.as_unit(layer) for layer in layers], x):
            y = segment[-1][6]
            zeros = (tf.zeros_like(y[0]), tf.zeros_like(y[1]))
            rebuilt = []
            for index, name, block_unit, values, record, inputs, outputs in reversed(segment):
                # Algorithm 1's rebuild, from the rebuilt output of the block above.
                y, _, _ = block_unit.backward(values, record, y, zeros)
                # The same block rebuilt from its exact output.
                local, _, _ = block_unit.backward(values, record, outputs, zeros)
                rel, max_abs, nonfinite = _errors(y, inputs)
                local_rel, local_max, local_nonfinite = _errors(local, inputs)
                coupling = getattr(block_unit.layer, "coupling", None)
                rebuilt.append(BlockReconstruction(
                    name=name, sequence=label, index=index, relative_error=rel,
                    max_abs_error=max_abs, local_relative_error=local_rel,
                    local_max_abs_error=local_max, nonfinite=max(nonfinite, local_nonfinite),
                    max_abs_stream=_max_abs(inputs + tuple(outputs)),
                    exact_range=(coupling.exact_range(block_unit.layer.stream_dtype)
                                 if hasattr(coupling, "exact_range") else math.inf),
                ))
            results += reversed(rebuilt)
    return results


def _max_abs(tensors):
    value = max(float(tf.reduce_max(tf.abs(tf.cast(t, tf.float64)))) for t in tensors)
    return value if math.isfinite(value) else math.nan


def stream_out_of_range(layer_or_model):
    """Training-time counts of forward passes whose fixed-point stream left its exact range.

    Every block with a range-checked coupling (`coupling="fixed_point"`,
    `tf_revnet.AdditiveCoupling.fixed_point(...)`) counts, in its non-trainable variable
    `stream_out_of_range`, the training-mode forward passes in which a value of its stream (inputs or
    outputs) was not below `coupling.exact_range(stream_dtype)` (inf and NaN included). Out of range,
    the stream's sums round as in floating point, so the inputs reversible backprop rebuilds are no
    longer bit-identical to the forward pass's. This reads the counters (no computation, cheap in
    `model.fit` callbacks: `tf_revnet.callbacks.StreamRangeMonitor` warns from it).

    Args:
        layer_or_model: a block, stack, `ReversibleSequence` or a model containing some.

    Returns:
        dict `{block name: count}` (float counts; a stack's blocks as `"stack_name[i]"`), one entry per
        range-checked block in forward order; empty if no block checks its range.

    Raises:
        ValueError: if `layer_or_model` holds no reversible layer.
    """
    layers = reversible_layers(layer_or_model)
    _require_reversible(layers, "layer_or_model", layer_or_model)
    counts = {}
    for layer in layers:
        for unit in (layer.units if isinstance(layer, ReversibleSequence) else [layer]):
            if isinstance(unit, ReversibleBlockStack):
                counter = getattr(unit.block, "stream_out_of_range", None)
                if counter is not None and unit.built:
                    values = unit.stacked_variable(counter).numpy()
                    counts.update({f"{unit.name}[{i}]": float(v) for i, v in enumerate(values)})
            elif getattr(unit, "stream_out_of_range", None) is not None:
                counts[unit.name] = float(unit.stream_out_of_range.numpy())
    return counts


def reconstruction_error(layer_or_model, x):
    """Error of the inputs that reversible backprop rebuilds, per reversible block, in training mode.

    For each `ReversibleBlock`, compares the inputs `(x1, x2)` of a training-mode forward pass with
    the inputs Algorithm 1 rebuilds from the outputs (`x2 = y2 - G(y1)`, `x1 = y1 - F(x2)`, through
    `BlockUnit.backward`, with the forward pass's random-generator states replayed so that
    Dropout draws the same masks). Every block is measured twice: rebuilt from the sequence's output
    through all blocks above it (what the backward pass uses: `relative_error`, `max_abs_error`), and
    from its own exact output (`local_*`: the error the block alone adds).

    For a model, the model runs once in training mode and the input each `ReversibleSequence` (and
    each stand-alone `ReversibleBlock`) receives is recorded; nested models are searched too.

    No side effects: everything runs in a `keras.StatelessScope`, so BatchNorm moving statistics and
    `SeedGenerator` states are unchanged afterwards. Under a mixed policy the residual stream is float32
    (as in the layers) and F and G compute in their policy's dtype; errors are computed in float64.

    Args:
        layer_or_model: a `tf_revnet.layers.ReversibleBlock`, a `tf_revnet.layers.ReversibleSequence`,
            or a `keras.Model` (functional, sequential or subclassed) that contains some.
        x: float tensor or array. The layer's input, e.g. NHWC `(N, H, W, C)`; for a model, the model's
            input (any structure the model accepts; e.g. raw pixels for a classifier).

    Returns:
        `ReconstructionReport` with one `BlockReconstruction` per block in forward order. Non-finite
        values are not hidden: a block whose forward or rebuilt inputs hold inf or NaN has
        `nonfinite > 0` and NaN errors. Each block also reports `max_abs_stream` and, for a
        fixed-point stream, its `exact_range`; `report.out_of_range` names the blocks whose stream
        left it on `x` (their rebuilds are then not bit-identical).

    Raises:
        ValueError: if `layer_or_model` holds no reversible layer, or `x` is not a tensor or array.

    Examples:
        >>> model = tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], input_shape=(16, 16, 3))
        >>> report = reconstruction_error(model, np.random.rand(4, 16, 16, 3).astype("float32"))
        >>> report.max_relative_error < 1e-5
        True

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Eq. 2, Algorithm 1, Section 5.3.
    """
    if isinstance(layer_or_model, _REVERSIBLE):
        layer = layer_or_model
        x = _check_input(x)
        if not layer.built:
            layer.build(x.shape)
        label = layer.name if isinstance(layer, ReversibleSequence) else None
        return ReconstructionReport(tuple(_sequence_reconstruction(layer, x, label)))
    if not isinstance(layer_or_model, keras.layers.Layer):
        raise ValueError(
            "`layer_or_model` must be a ReversibleBlock, a ReversibleSequence or a keras.Model. "
            f"Received: {type(layer_or_model).__name__}"
        )
    layers = reversible_layers(layer_or_model)
    _require_reversible(layers, "layer_or_model", layer_or_model)
    if not isinstance(x, (dict, list, tuple)):
        x = _check_input(x)
    with _RecordInputs(layers) as recorder, keras.StatelessScope():
        layer_or_model(x, training=True)
    results = []
    for layer in layers:
        calls = recorder.records[id(layer)]
        for k, inputs in enumerate(calls):
            label = layer.name if len(calls) == 1 else f"{layer.name}#{k}"
            if isinstance(layer, _REVERSIBLE[1:]):
                label = None if len(calls) == 1 else label
            results.extend(_sequence_reconstruction(layer, inputs, label))
    return ReconstructionReport(tuple(results))


# ----------------------------------------------------------------------------------------------------
# Gradient angle


def _loss_scale(model, loss_scale):
    if loss_scale is not None:
        if not isinstance(loss_scale, (int, float)) or isinstance(loss_scale, bool) or not (
            loss_scale > 0 and math.isfinite(loss_scale)
        ):
            raise ValueError(
                f"`loss_scale` must be a positive finite number or None. Received: {loss_scale!r}"
            )
        return float(loss_scale)
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = getattr(optimizer, "dynamic_scale", None)  # created when the optimizer is built
        if scale is None:
            return float(optimizer.initial_scale)
        return float(keras.ops.convert_to_numpy(scale))
    return 1.0


def _resolve_loss(model, loss):
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "`loss` is None and the model is not compiled with a loss. Fix: pass e.g. "
                "loss='sparse_categorical_crossentropy' or compile the model first."
            )
    try:
        return keras.losses.get(loss)
    except ValueError as error:
        raise ValueError(f"`loss` is not a Keras loss: {error}. Received: loss={loss!r}") from None


def _sequences(model):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    sequences = [s for s in reversible_layers(model) if isinstance(s, ReversibleSequence)]
    _require_reversible(sequences, "model", model)
    return sequences


def gradients(model, x, y, loss=None, use_custom_gradient=None, loss_scale=None):
    """Loss and gradients of every trainable variable in one training-mode pass, in float64.

    Side-effect free (runs in a `keras.StatelessScope`: BatchNorm statistics and seed states are
    unchanged). The building block of `gradient_angle`; use it to compare a model with another
    reference, e.g. the same weights under another dtype policy.

    Args:
        model: a `keras.Model` with at least one `ReversibleSequence`.
        x: the model's input, e.g. NHWC images `(N, H, W, C)`.
        y: the targets, as `loss` expects them.
        loss: a Keras loss name or callable. Defaults to None: the model's compiled loss.
        use_custom_gradient: bool or None. If a bool, every `ReversibleSequence`'s
            `use_custom_gradient` is set to it for this pass (and restored afterwards): True gives
            reversible backprop, False stored-activation autodiff. Defaults to None: as configured.
        loss_scale: positive float or None. The loss is multiplied by it before differentiation and the
            gradients divided by it in float64. Defaults to None: the current scale of the model's
            `LossScaleOptimizer`, else 1.

    Returns:
        `(loss, grads)`: the unscaled mean loss (float) and a list of float64 NumPy arrays, one per
        `model.trainable_variables` entry (zeros for unconnected variables).

    Raises:
        ValueError: as `gradient_angle`.
    """
    sequences = _sequences(model)
    loss_fn = _resolve_loss(model, loss)
    scale = _loss_scale(model, loss_scale)
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(f"`model` has no trainable variables. Received: model={model.name!r}")
    if not isinstance(x, (dict, list, tuple)):
        x = _check_input(x)
    switches = [s.use_custom_gradient for s in sequences]
    try:
        if use_custom_gradient is not None:
            for s in sequences:
                s.use_custom_gradient = bool(use_custom_gradient)
        with keras.StatelessScope(), tf.GradientTape() as tape:
            predictions = model(x, training=True)
            value = tf.reduce_mean(tf.cast(loss_fn(y, predictions), tf.float32))
            scaled = value * scale
        grads = tape.gradient(scaled, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    finally:
        for s, switch in zip(sequences, switches):
            s.use_custom_gradient = switch
    return float(value), [_to_f64(g) / scale for g in grads]


def compare_gradients(grads, reference, names, loss=math.nan, reference_loss=math.nan):
    """Angle, relative error and norm difference of `grads` against `reference` (see `GradientAngle`).

    Args:
        grads: list of arrays, e.g. from `gradients(...)`.
        reference: list of arrays of the same shapes.
        names: list of str, one per array (the keys of `per_variable`).
        loss: float. Stored in the result. Defaults to NaN.
        reference_loss: float. Stored in the result. Defaults to NaN.

    Returns:
        `GradientAngle`.

    Raises:
        ValueError: if the three lists differ in length, are empty, or two arrays differ in size.
    """
    if not (len(grads) == len(reference) == len(names)) or not names:
        raise ValueError(
            "`grads`, `reference` and `names` must be non-empty lists of the same length. "
            f"Received lengths {len(grads)}, {len(reference)}, {len(names)}"
        )
    grads = [np.asarray(g, dtype=np.float64) for g in grads]
    reference = [np.asarray(g, dtype=np.float64) for g in reference]
    nonfinite = sum(int(g.size - np.count_nonzero(np.isfinite(g))) for g in grads + reference)
    per_variable = {name: angle_degrees(a, b) for name, a, b in zip(names, grads, reference)}
    worst = max(per_variable, key=lambda k: math.inf if math.isnan(per_variable[k])
                else per_variable[k])
    a = np.concatenate([g.ravel() for g in grads])
    b = np.concatenate([g.ravel() for g in reference])
    rel_error = rel_norm = math.nan
    if not nonfinite:
        norm_a, norm_b = _norm(a), _norm(b)
        if norm_b:
            rel_error = _norm(a - b) / norm_b
            rel_norm = (norm_a - norm_b) / norm_b
    return GradientAngle(
        degrees=angle_degrees(a, b),
        relative_error=rel_error,
        relative_norm_difference=rel_norm,
        per_variable=per_variable,
        worst_variable=worst,
        loss=float(loss),
        reference_loss=float(reference_loss),
        nonfinite=nonfinite,
    )


def gradient_angle(model, x, y, loss=None, loss_scale=None):
    """Angle between the reversible-backprop gradient and the stored-activation gradient.

    Computes the gradient of `loss(y, model(x, training=True))` with respect to every trainable
    variable twice on the same weights and batch: with each `ReversibleSequence` as configured
    (reversible backprop, Algorithm 1) and with every `ReversibleSequence`'s `use_custom_gradient`
    temporarily set to False (ordinary autodiff, activations stored; restored afterwards). The angle
    between the two, overall and per variable, measures how much the rebuilt activations change the
    gradient's direction (the paper's Section 5.3 reports below about 1 degree for its RevNets).

    Both passes run in a `keras.StatelessScope`: BatchNorm moving statistics and `SeedGenerator` states
    are unchanged afterwards, and Dropout draws the same masks in both passes. In float16 the loss is
    multiplied by `loss_scale` before differentiation and the gradients divided by it afterwards (in
    float64), as a `LossScaleOptimizer` does.

    Args:
        model: a `keras.Model` (or layer) with at least one `ReversibleSequence`.
        x: the model's input (tensor, array, or the structure the model takes), e.g. a batch of NHWC
            images `(N, H, W, C)`.
        y: the targets, as `loss` expects them, e.g. int labels `(N,)`.
        loss: a Keras loss (name, e.g. `"sparse_categorical_crossentropy"`, or callable
            `loss(y_true, y_pred)`). Defaults to None: the loss the model was compiled with.
        loss_scale: positive float or None. Defaults to None: the current scale of the model's
            `keras.optimizers.LossScaleOptimizer` if it has one, else 1.

    Returns:
        `GradientAngle`, with `per_variable` keyed by `variable.path`. Non-finite gradients are not
        hidden: `nonfinite > 0` and the angles are NaN.

    Raises:
        ValueError: if the model has no `ReversibleSequence`, no trainable variables, `loss` is None
            and the model is not compiled, or `loss_scale` is not a positive number.

    Examples:
        >>> model = tf_revnet.models.RevNet(units=[2, 2], widths=[8, 8, 16], input_shape=(16, 16, 3))
        >>> x = np.random.rand(4, 16, 16, 3).astype("float32")
        >>> result = gradient_angle(model, x, np.array([0, 1, 2, 3]), "sparse_categorical_crossentropy")
        >>> result.degrees < 0.01
        True

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 5.3.
    """
    loss_a, grads_a = gradients(model, x, y, loss, None, loss_scale)
    loss_b, grads_b = gradients(model, x, y, loss, False, loss_scale)
    names = [v.path for v in model.trainable_variables]
    return compare_gradients(grads_a, grads_b, names, loss_a, loss_b)
