"""What one call keeps for its backward pass, read from its traced graph (for `tf_revnet.memory`).

A call is traced once with `tf.function` on fixed shapes (batch included): its training-mode forward,
then its backward (ordinary autodiff under a `tf.GradientTape`, or a unit's own `backward` from
`tf_revnet.layers.unit`). Nothing runs. The tensors of the forward that backward ops read are what the
call *stores*; their bytes come from their static shapes and dtypes. A replay of each half in the order
the ops were created (an output is allocated when its op runs and freed after its last reader; views
such as `Identity`, `Reshape` or `ReadVariableOp` share their input's buffer) gives the most bytes
alive at once in the forward and in the backward: the call's working set.

Ops that read only a tensor's shape (`Shape`, `ZerosLike`, ...) do not keep it: TensorFlow folds them
for static shapes. Variables (and views of them) take no bytes: they are held before the step.
"""

import collections
import dataclasses
import math

import keras

from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.autocast import no_autocast

if backend.BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = backend.tensorflow_only(
        "tf_revnet.footprint", "it reads what a call stores from its traced TensorFlow graph")

__all__ = ["DynamicShapeError", "Footprint", "nbytes", "trace_layer", "trace_unit"]

#: Ops that read only their input's shape or dtype: they keep no buffer alive.
_SHAPE_READERS = frozenset({"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike",
                            "BroadcastGradientArgs"})
#: Ops whose first output shares the buffer of their first input.
_VIEWS = frozenset({"Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "StopGradient",
                    "Snapshot", "EnsureShape", "PreventGradient", "ReadVariableOp"})


class DynamicShapeError(ValueError):
    """A tensor whose static shape is not fully known: its bytes cannot be counted."""


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What one traced call keeps and holds, in bytes (batch size included).

    Attributes:
        stored_inputs: tuple of int. Indices of the call's inputs that its backward reads (kept).
        stored_outputs: tuple of int. Indices of its outputs that its backward reads (kept).
        stored: int. Bytes of every stored tensor, inputs and outputs included.
        internal: int. Bytes of the stored tensors that are neither inputs nor outputs.
        forward_peak: int. Most bytes alive at once in the forward, its inputs included.
        backward_peak: int. Most bytes alive at once in the backward, the stored tensors and the
            gradients arriving at the outputs included.
        outputs: tuple of `tf.TensorSpec`. The outputs, flattened.
        unmeasured: tuple of str. Stored tensors whose size is unknown (dynamic shape, variant).
    """

    stored_inputs: tuple
    stored_outputs: tuple
    stored: int
    internal: int
    forward_peak: int
    backward_peak: int
    outputs: tuple
    unmeasured: tuple

    @property
    def working(self):
        """Bytes the backward holds above its stored tensors (`backward_peak - stored`), >= 0."""
        return max(0, self.backward_peak - self.stored)


def nbytes(shape, dtype):
    """Bytes of a tensor of static `shape` and `dtype`; None if a dimension is unknown."""
    dims = tuple(shape)
    if any(d is None for d in dims):
        return None
    return math.prod(dims) * tf.as_dtype(dtype).size


def trace_layer(call, specs, layer):
    """The footprint of `call(*inputs)` (a training-mode call of `layer`) under ordinary autodiff.

    Args:
        call: function of the input tensors returning the layer's output (a tensor or a structure).
        specs: list of `tf.TensorSpec`, fully defined shapes.
        layer: the Keras layer; the gradient is taken with respect to the floating point inputs and
            its trainable variables.

    Returns:
        `Footprint`.

    Raises:
        DynamicShapeError: if an output's shape is not static (dynamic shapes).
    """
    box = {}

    def forward(xs):
        box["tape"] = tape = tf.GradientTape()
        with keras.StatelessScope(), tape:
            box["watched"] = [x for x in xs if x.dtype.is_floating]
            tape.watch(box["watched"])
            return tf.nest.flatten(call(*xs))

    def backward(ys, dys):
        targets = box["watched"] + [v.value for v in layer.trainable_variables]
        floats = [(y, dy) for y, dy in zip(ys, dys) if y.dtype.is_floating]
        if floats:
            box["tape"].gradient([y for y, _ in floats], targets,
                                 output_gradients=[dy for _, dy in floats])

    return _trace(forward, backward, specs, layer.name)


def trace_unit(unit, specs, training=True):
    """The footprint of a `tf_revnet.layers.unit.Unit`'s own `forward` and `backward` (Algorithm 1).

    Args:
        unit: a unit (`StoredInputUnit`, `BlockUnit`, ...), its layer built.
        specs: list of `tf.TensorSpec`: the unit's input (an invertible unit: the two halves).
        training: bool, passed to the unit.

    Returns:
        `Footprint` (an invertible unit's outputs count as stored: its backward starts from them).
    """
    box = {}

    def forward(xs):
        with no_autocast():
            box["values"] = values = unit.pack(unit_lib.read_values(unit, training))
            y, box["record"], _ = unit.forward(values, tuple(xs) if unit.invertible else xs[0],
                                               training)
        return list(y) if unit.invertible else [y]

    def backward(ys, dys):
        with no_autocast():
            y = tuple(ys) if unit.invertible else ys[0]
            dy = tuple(dys) if unit.invertible else dys[0]
            unit.backward(box["values"], box["record"], y, dy, training)

    return _trace(forward, backward, specs, unit.name)


def _trace(forward, backward, specs, name):
    """Traces `forward(inputs) -> outputs` then `backward(outputs, output_gradients)`; measures."""
    box = {}

    def probe(*xs):
        graph = tf.compat.v1.get_default_graph()
        ys = forward(list(xs))
        box["split"] = len(graph.get_operations())
        for y in ys:
            if not y.shape.is_fully_defined():
                raise DynamicShapeError(
                    f"estimate() needs static shapes: layer '{name}' returns shape {y.shape} for "
                    f"inputs {[tuple(s.shape) for s in specs]}. Fix: build the model with a fixed "
                    "input_shape, or pass input_shape= to estimate()."
                )
        backward(ys, [tf.ones(y.shape, y.dtype) if y.dtype.is_floating else None for y in ys])
        box["graph"], box["xs"], box["ys"] = graph, xs, ys
        return []

    tf.function(probe, autograph=False).get_concrete_function(*specs)
    return _measure(box["graph"], box["split"], box["xs"], box["ys"])


def _measure(graph, split, xs, ys):
    """The `Footprint` of a traced graph whose first `split` ops are the forward."""
    ops = graph.get_operations()
    forward, backward = ops[:split], ops[split:]
    forward_names = {op.name for op in forward}
    read = [t for op in backward if op.type not in _SHAPE_READERS for t in op.inputs
            if t.op.name in forward_names]
    stored = {t.name: t for t in read}
    bases = {}  # one buffer, one count: a view of a stored tensor (or of an input) is its base
    for t in read:
        base = _base(t)
        bases.setdefault(base.name, base)
    sizes = {name: _size(t) for name, t in bases.items()}
    unmeasured = tuple(sorted(n for n, s in sizes.items() if s is None and _counts(bases[n])))
    x_names, y_names = [x.name for x in xs], [_base(y).name for y in ys]
    stored = {**stored, **bases}
    internal = sum(s or 0 for n, s in sizes.items() if n not in x_names and n not in y_names)
    return Footprint(
        stored_inputs=tuple(i for i, n in enumerate(x_names) if n in stored),
        stored_outputs=tuple(i for i, n in enumerate(y_names) if n in stored),
        stored=sum(s or 0 for s in sizes.values()),
        internal=internal,
        forward_peak=_replay(_as_ready(forward), {x.name: x for x in xs}, keep=set(stored)),
        backward_peak=_replay(_as_ready(backward), dict(stored), keep=set()),
        outputs=tuple(tf.TensorSpec(y.shape, y.dtype) for y in ys),
        unmeasured=unmeasured,
    )


def _base(tensor):
    """The tensor whose buffer `tensor` shares (through `Identity`, `Reshape`, ... ops)."""
    while tensor.op.type in _VIEWS and tensor.op.type != "ReadVariableOp" and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor


def _counts(tensor):
    return tensor.dtype not in (tf.resource,) and tensor.op.type not in ("ReadVariableOp",)


def _size(tensor):
    """Bytes of `tensor`'s buffer; 0 for resources and variable reads; None if unknown."""
    if tensor.dtype in (tf.resource, tf.string) or tensor.op.type in ("ReadVariableOp",
                                                                      "VarHandleOp"):
        return 0
    if tensor.dtype == tf.variant:
        return None
    return nbytes(tensor.shape, tensor.dtype) if tensor.shape.rank is not None else None


def _as_ready(ops):
    """`ops` in the order a dataflow executor runs them: each as soon as its inputs exist (FIFO).

    TensorFlow's executor starts an op once its data and control inputs are done, not in the order
    the ops were written: a recompute that does not wait for a gradient runs early, and its tensors
    are alive alongside the gradient's.
    """
    names = {op.name for op in ops}
    waiting, users = {}, {}
    for op in ops:
        deps = {t.op.name for t in op.inputs} | {c.name for c in op.control_inputs}
        deps &= names
        waiting[op.name] = len(deps)
        for dep in deps:
            users.setdefault(dep, []).append(op)
    ready = collections.deque(op for op in ops if waiting[op.name] == 0)
    order = []
    while ready:
        op = ready.popleft()
        order.append(op)
        for user in users.get(op.name, ()):
            waiting[user.name] -= 1
            if waiting[user.name] == 0:
                ready.append(user)
    return order


def _replay(ops, live, keep):
    """Most bytes alive while `ops` run in order, starting from `live` (name -> tensor).

    Each op allocates its outputs (views share their input's buffer); a buffer is freed after its
    last reader among `ops`, unless one of its tensors is in `keep` (stored for a later pass).
    """
    readers = {}
    for op in ops:
        if op.type not in _SHAPE_READERS:
            for t in op.inputs:
                readers[t.name] = readers.get(t.name, 0) + 1
    buffer_of, size, pending, kept = {}, {}, {}, set()

    def add(t, buffer):
        buffer_of[t.name] = buffer
        pending[buffer] = pending.get(buffer, 0) + readers.get(t.name, 0)
        if t.name in keep:
            kept.add(buffer)

    for name, t in live.items():
        base = _base(t).name
        base = base if base in live else name  # a view of a given tensor: its buffer
        if base == name:
            size[name] = _size(t) or 0
        add(t, base)
    current = peak = sum(size.values())
    for op in ops:
        for index, t in enumerate(op.outputs):
            if t.name in buffer_of:  # given (a placeholder of `live`)
                continue
            source = op.inputs[0].name if op.type in _VIEWS and index == 0 and op.inputs else None
            if source in buffer_of:
                add(t, buffer_of[source])
                continue
            size[t.name] = _size(t) or 0
            current += size[t.name]
            add(t, t.name)
        peak = max(peak, current)
        done = [] if op.type in _SHAPE_READERS else [t.name for t in op.inputs]
        for name in done:
            if name in buffer_of:
                pending[buffer_of[name]] -= 1
        for name in {buffer_of[n] for n in done if n in buffer_of} | {t.name for t in op.outputs}:
            if pending.get(name, 1) <= 0 and name not in kept and size.get(name):
                current -= size[name]
                size[name] = 0
    return peak
