"""Training-step memory: an estimate per backprop method derived from the plan, and glibc settings.

`estimate(model, batch_size)` follows one training step of `model` on fixed shapes and returns the most
bytes it holds at once above the memory held before it (weights, optimizer slots), for three methods:

- `plain`: ordinary autodiff; every layer keeps what its gradient reads until its backward runs;
- `reversible`: each `ReversibleSequence` runs its memory-saving pass (Algorithm 1) as its plan says
  (`tf_revnet.layers.unit`): a `StoredInputUnit` (stem, stage transition, any non-invertible layer)
  keeps its input; a `BlockUnit` or `LoopUnit` keeps nothing; the sequence keeps its output; each unit's
  backward holds its own working set while it runs. Layers outside sequences are plain;
- `recompute`: `tf.recompute_grad` around every unit of every sequence: each unit keeps its input (a
  `LoopUnit` of `n` blocks: `n` inputs) and is recomputed in its backward. Layers outside are plain.

What a layer keeps and holds is measured, not looked up: `tf_revnet.footprint` traces the layer's
training-mode forward and backward once (`tf.function` on its fixed input shapes, nothing runs) and
counts the bytes of the forward tensors that the backward reads, and the most bytes alive while each
half runs. A model is walked recursively (a functional or Sequential model used as a layer is walked
into; a tensor kept by two layers counts once); identical layers on equal shapes are traced once.
The step's timeline then gives the peak: in the forward of a layer, what the layers before it keep plus
its forward's working set; in its backward, what it and the layers before it keep plus its backward's
working set plus the weight gradients made so far. The input batch is added to every method.

`benchmarks/models.py` compares the estimate with measured per-step peaks (benchmarks/README.md).

`configure_allocator()` sets glibc's `M_MMAP_THRESHOLD` so that large freed buffers go back to the
operating system: with glibc's default, adaptive threshold, TensorFlow's freed activation buffers stay
in the heap and the process RSS of a reversible network grows with depth although live memory does not.
`import tf_revnet` calls it once (set `TF_REVNET_MALLOC_MMAP_THRESHOLD=0` to leave malloc alone, or a
byte count to choose the threshold).
"""

import ctypes
import dataclasses
import itertools
import os
import sys
import warnings

import keras

from tf_revnet import footprint as footprint_lib
from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.reversible_sequence import ReversibleSequence

if backend.BACKEND == "tensorflow":
    import tensorflow as tf
else:
    tf = backend.tensorflow_only(
        "tf_revnet.memory.estimate", "it traces the model's TensorFlow graph to count what each step stores")

__all__ = ["MemoryEstimate", "estimate", "configure_allocator"]

METHODS = ("plain", "reversible", "recompute")
MB = 2.0**20  # the benchmarks' "MB"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
DEFAULT_MMAP_THRESHOLD = 131072


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step holds at its peak above the memory held before it, per backprop method.

    `print(estimate)` shows a table: MB (2**20 bytes) per method, the ratios to plain backprop, and
    where each peak falls.

    Attributes:
        plain, reversible, recompute: int. The estimated per-step peak in bytes.
        breakdown: dict `{method: {part: bytes}}` of the peak, parts `"input"` (the batch), `"kept"`
            (what the layers before the peak keep for their backward), `"working_set"` (what the
            layer at the peak holds while it runs) and `"weight_gradients"` (made so far).
        peak_at: dict `{method: str}`, e.g. `"backward of 'revnet38_body/stage1'"`.
        batch_size: int.
        warnings: tuple of str. Layers whose storage could not be measured (also warned at once).
    """

    plain: int
    reversible: int
    recompute: int
    breakdown: dict
    peak_at: dict
    batch_size: int
    warnings: tuple = ()

    def as_dict(self):
        """`{method: bytes}` for the three methods."""
        return {m: getattr(self, m) for m in METHODS}

    def __str__(self):
        rows = [f"Training-step memory estimate, batch {self.batch_size} (MB = 2**20 bytes)",
                "| method     |        MB | vs plain | peak at",
                "|------------|----------:|---------:|--------"]
        for m in METHODS:
            ratio = getattr(self, m) / self.plain if self.plain else float("nan")
            rows.append(f"| {m:<10} | {getattr(self, m) / MB:9.1f} | {ratio:8.2f} | {self.peak_at[m]}")
        rows += [f"warning: {w}" for w in self.warnings]
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class _Step:
    """One layer (or unit) in the step's timeline; `{method: bytes}` each but `weights`.

    Attributes:
        name: str. The layer.
        kept: bytes it keeps from its forward until its backward (tensors kept earlier not again).
        working: bytes its backward holds above what it keeps.
        forward: bytes its forward holds (its inputs and what it keeps included).
        weights: int. Bytes of the weight gradients its backward makes.
    """

    name: str
    kept: dict
    working: dict
    forward: dict
    weights: int


class _Walk:
    """One estimate: tensor specs by key, the timeline so far, tensors already kept, traced layers."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.specs, self.alias, self.steps, self.cache, self.warnings = {}, {}, [], {}, []
        self.kept = {m: set() for m in METHODS}
        self.variables = set()
        self._keys = itertools.count()

    def key(self, keras_tensor):
        """The key of a symbolic tensor (a nested model's inputs and outputs alias the outer ones)."""
        return self.alias.get(id(keras_tensor), id(keras_tensor))

    def new(self, spec):
        """A key for a new tensor of `spec`."""
        key = ("tensor", next(self._keys))
        self.specs[key] = spec
        return key

    def nbytes(self, key):
        spec = self.specs[key]
        return footprint_lib.nbytes(spec.shape, spec.dtype) or 0

    def keep(self, method, keys):
        """Bytes of the tensors of `keys` not kept yet under `method`; marks them kept."""
        fresh = {k for k in keys if k not in self.kept[method]}
        self.kept[method] |= fresh
        return sum(self.nbytes(k) for k in fresh)

    def weights(self, variables):
        """Bytes of the gradients of `variables` not counted yet (a layer used twice: once)."""
        fresh = {id(v): v for v in variables if id(v) not in self.variables}
        self.variables |= set(fresh)
        return _variable_bytes(fresh.values())

    def add(self, name, kept, working, forward, weights):
        self.steps.append(_Step(name, kept, working, forward, weights))

    def trace(self, kind, layer, specs, measure, static=""):
        """`measure()` (a `Footprint`), cached by the layer's structure and the input specs."""
        structure = unit_lib.structure_signature(layer, layer.variables)
        if structure is None:  # no usable config: traced for itself
            structure = ("layer", id(layer))
        key = (kind, structure, tuple((tuple(s.shape), s.dtype.name) for s in specs), static)
        if key not in self.cache:
            self.cache[key] = measure()
            if self.cache[key].unmeasured:
                self.warn(layer, f"stores tensors of unknown size, not counted: "
                          f"{', '.join(self.cache[key].unmeasured[:3])}")
        return self.cache[key]

    def warn(self, layer, message):
        text = f"estimate(): layer '{layer.name}' ({type(layer).__name__}) {message}"
        self.warnings.append(text)
        warnings.warn(text, stacklevel=4)


def estimate(model, batch_size, input_shape=None):
    """Estimates the peak bytes one training step of `model` holds, for plain, reversible, recompute.

    The step is followed layer by layer through its forward and backward (a `ReversibleSequence`
    through its plan's units), with what each layer keeps and holds measured from its traced graph
    (see the module docstring). Memory held before the step (weights, optimizer slots, the traced
    graph) is not counted.

    Args:
        model: a built functional or Sequential `keras.Model` (e.g. from `tf_revnet.models`; nested
            models are walked into), or a built `ReversibleSequence`.
        batch_size: int, positive.
        input_shape: optional shape without the batch, e.g. `(32, 32, 3)` (a list of them for several
            inputs), for a model built with unknown sizes. Defaults to the model's own input shapes.

    Returns:
        `MemoryEstimate`, in bytes (`print` it for MB and ratios).

    Raises:
        ValueError: if `batch_size` is not a positive int; if `model` is a subclassed model (no graph
            of layers to follow) or not a Keras model; if an input or a layer's output has an unknown
            size other than the batch (build with a fixed `input_shape`, or pass `input_shape`).

    Examples:
        >>> model = tf_revnet.models.RevNet38()
        >>> e = tf_revnet.memory.estimate(model, batch_size=128)
        >>> e.reversible < e.plain
        True
        >>> print(e)  # doctest: +SKIP

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2 and Table 4
        (memory of RevNet-104 and ResNet-101).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    _check_model(model)
    walk = _Walk(batch_size)
    in_keys = _input_keys(walk, model, input_shape)
    input_bytes = sum(walk.keep(m, in_keys) for m in METHODS) // len(METHODS)
    _visit(walk, model, in_keys, call=None)
    return _result(walk, input_bytes)


def _check_model(model):
    """Raises `ValueError` unless `model` is a model whose layer graph can be followed."""
    if isinstance(model, ReversibleSequence) or _is_functional(model) or isinstance(
            model, keras.Sequential):
        return
    if isinstance(model, keras.Model):
        raise ValueError(
            f"estimate() needs a functional or Sequential model, or a ReversibleSequence. Received: "
            f"the subclassed model '{model.name}' ({type(model).__name__}), whose call() connects "
            "its layers in code that cannot be followed. Fix: build it with the functional API "
            "(keras.Input, then call the layers), or estimate its ReversibleSequence."
        )
    raise ValueError(
        "estimate() needs a functional or Sequential keras.Model, or a ReversibleSequence. "
        f"Received: {model!r}"
    )


def _is_functional(model):
    return isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth")


def _input_keys(walk, model, input_shape):
    """Registers the model's inputs (batch `walk.batch_size`) and returns their keys."""
    if isinstance(model, ReversibleSequence):
        if not model.built and input_shape is None:
            raise footprint_lib.DynamicShapeError(
                f"estimate(): build the sequence '{model.name}' first, or pass input_shape=.")
        shapes = [tuple(input_shape) if input_shape is not None else
                  tuple(model._unit_input_shapes[0])[1:]]
        tensors, dtypes, names = [model], [model.input_dtype], [model.name]
    else:
        tensors = tf.nest.flatten(model.inputs)
        shapes = [tuple(t.shape)[1:] for t in tensors]
        dtypes, names = [t.dtype for t in tensors], [t.name for t in tensors]
    if input_shape is not None and not isinstance(model, ReversibleSequence):
        given = [input_shape] if len(tensors) == 1 else list(input_shape)
        shapes = [tuple(s) for s in given]
    keys = []
    for tensor, shape, dtype, name in zip(tensors, shapes, dtypes, names):
        if any(d is None for d in shape):
            raise footprint_lib.DynamicShapeError(
                f"estimate() needs static shapes; input '{name}' of '{model.name}' has shape "
                f"{(None, *shape)}. Fix: build the model with a fixed input_shape, e.g. (32, 32, 3), "
                "or pass input_shape=(32, 32, 3) to estimate()."
            )
        key = walk.new(tf.TensorSpec((walk.batch_size, *shape), dtype))
        walk.alias[id(tensor)] = key
        keys.append(key)
    return keys


def _visit(walk, layer, in_keys, call):
    """Adds `layer` called on the tensors of `in_keys` to the timeline; returns its outputs' keys.

    `call(*tensors)` runs the layer (None: `layer(x, training=True)`).
    """
    if isinstance(layer, ReversibleSequence):
        return _visit_sequence(walk, layer, in_keys[0])
    if _is_functional(layer):
        return _visit_functional(walk, layer, in_keys)
    if isinstance(layer, keras.Sequential):
        keys = in_keys
        for sub in layer.layers:
            keys = _visit(walk, sub, keys, None)
        return keys
    if isinstance(layer, keras.Model):
        _check_model(layer)
    return _visit_layer(walk, layer, in_keys, call or _training_call(layer))


def _training_call(layer, args=None, kwargs=None):
    """A call of `layer` in training mode (`training=True` where its `call` takes it)."""
    kwargs = dict(kwargs or {})
    if getattr(layer, "_call_has_training_arg", False):
        kwargs.setdefault("training", True)
    return lambda *xs: layer(*(xs if args is None else args(xs)), **kwargs)


def _visit_functional(walk, model, in_keys):
    """The nodes of a functional model in order; its inputs alias `in_keys`."""
    for tensor, key in zip(tf.nest.flatten(model.inputs), in_keys):
        walk.alias[id(tensor)] = key
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or not node.operation:
                continue
            keys = list(dict.fromkeys(walk.key(t) for t in node.input_tensors))
            call = _node_call(walk, node, keys)
            out_keys = _visit(walk, node.operation, keys, call)
            for tensor, key in zip(node.outputs, out_keys):
                walk.alias[id(tensor)] = key
    return [walk.key(t) for t in tf.nest.flatten(model.outputs)]


def _node_call(walk, node, keys):
    """A function of the node's distinct input tensors (in `keys` order) that calls the node."""
    layer = node.operation
    call_kwargs = {"training": True} if getattr(layer, "_call_has_training_arg", False) else {}

    def call(*xs):
        by_key = dict(zip(keys, xs))
        args, kw = node.arguments.fill_in({id(t): by_key[walk.key(t)] for t in node.input_tensors})
        return layer(*args, **{**call_kwargs, **kw})

    return call


def _visit_layer(walk, layer, in_keys, call):
    """A layer outside any sequence: plain in every method."""
    specs = [walk.specs[k] for k in in_keys]
    fp = _plain(walk, layer, specs, call)
    out_keys = [walk.new(s) for s in fp.outputs]
    stored = [in_keys[i] for i in fp.stored_inputs] + [out_keys[i] for i in fp.stored_outputs]
    walk.add(layer.name, {m: fp.internal + walk.keep(m, stored) for m in METHODS},
             dict.fromkeys(METHODS, fp.working), dict.fromkeys(METHODS, fp.forward_peak),
             walk.weights(layer.trainable_variables))
    return out_keys


def _plain(walk, layer, specs, call=None):
    """The traced plain-autodiff footprint of `layer` on `specs`; a warned guess if it cannot trace."""
    call = call or _training_call(layer)
    try:
        return walk.trace("plain", layer, specs,
                          lambda: footprint_lib.trace_layer(call, specs, layer))
    except footprint_lib.DynamicShapeError:
        raise
    except Exception as error:  # noqa: BLE001 - any layer: fall back to its inputs and outputs
        outputs = _output_specs(layer, specs, error)
        walk.warn(layer, f"could not be traced ({type(error).__name__}: {str(error)[:120]}); "
                  "counted as keeping its inputs and outputs")
        io = sum(footprint_lib.nbytes(s.shape, s.dtype) for s in list(specs) + outputs)
        return footprint_lib.Footprint(tuple(range(len(specs))), tuple(range(len(outputs))),
                                       io, 0, io, 2 * io, tuple(outputs), ())


def _output_specs(layer, specs, error):
    """The layer's output specs from `compute_output_spec`; `ValueError` if it has none."""
    try:
        out = layer.compute_output_spec(*[keras.KerasTensor(s.shape, s.dtype) for s in specs])
        outputs = [tf.TensorSpec(t.shape, t.dtype) for t in tf.nest.flatten(out)]
    except Exception:  # noqa: BLE001
        raise ValueError(f"estimate(): layer '{layer.name}' can neither be traced nor report its "
                         f"output shape: {error}") from error
    if not all(s.shape.is_fully_defined() for s in outputs):
        raise footprint_lib.DynamicShapeError(f"estimate() needs static shapes: layer '{layer.name}' returns "
                            f"{[tuple(s.shape) for s in outputs]}. Fix: pass input_shape=.")
    return outputs


def _visit_sequence(walk, sequence, in_key):
    """A `ReversibleSequence` through its plan's units; under `reversible` it keeps its outputs.

    Its outputs are the last unit's, or those of its `taps` (one key each, in order).
    """
    plan, keys = sequence._get_plan(check=False), [in_key]
    for unit in plan.units:
        keys.append(_visit_unit(walk, unit, keys[-1]))
    outputs = [keys[i + 1] for i in plan.tap_units]
    walk.steps[-1].kept["reversible"] += walk.keep("reversible", list(dict.fromkeys(outputs)))
    return outputs


def _visit_unit(walk, unit, key):
    """One unit of a plan: plain autodiff, its own backward (Algorithm 1), or `tf.recompute_grad`."""
    loop = isinstance(unit, unit_lib.LoopUnit)
    layer, depth = (unit.template.layer, unit.depth) if loop else (unit.layer, 1)
    spec = walk.specs[key]
    if unit.invertible:
        spec = tf.TensorSpec(spec.shape, layer.stream_dtype)
    plain = _plain(walk, layer, [spec])
    out = walk.new(plain.outputs[0])
    stored_io = [key] * len(plain.stored_inputs) + [out] * len(plain.stored_outputs)
    recompute_unit = unit_lib.StoredInputUnit(layer)
    recompute = walk.trace("stored_input_unit", layer, [spec],
                           lambda: footprint_lib.trace_unit(recompute_unit, [spec]))
    x_bytes = walk.nbytes(key)
    kept = {"plain": depth * plain.internal + walk.keep("plain", stored_io)
            + (depth - 1) * sum(walk.nbytes(k) for k in stored_io),
            "recompute": depth * recompute.internal + walk.keep("recompute", [key])
            + (depth - 1) * x_bytes}
    working = {"plain": plain.working, "recompute": recompute.working}
    forward = {"plain": plain.forward_peak, "recompute": recompute.forward_peak}
    if unit.invertible:
        rev = _invertible(walk, unit.template if loop else unit, layer, spec)
        own = rev.stored - sum(footprint_lib.nbytes(rev.outputs[i].shape, rev.outputs[i].dtype)
                               for i in rev.stored_outputs)  # replayed state: no activation
        # Separate blocks fused into a loop: their weights stacked (kept) and gradients stacked.
        stacked = _variable_bytes(unit.trainable) if loop and not unit.stacked else 0
        kept["reversible"] = depth * own + stacked
        working["reversible"] = rev.backward_peak - own + stacked
        forward["reversible"] = rev.forward_peak
    else:
        kept["reversible"] = recompute.internal + walk.keep("reversible", [key])
        working["reversible"] = recompute.working
        forward["reversible"] = recompute.forward_peak
    walk.add(unit.name, kept, working, forward, walk.weights(unit.trainable))
    return out


def _variable_bytes(variables):
    """Bytes of `variables`' values."""
    return sum(footprint_lib.nbytes(v.shape, v.dtype) for v in variables)


def _invertible(walk, unit, layer, spec):
    """The footprint of an invertible unit's own forward and backward on the halves of `spec`."""
    half = tf.TensorSpec(layer.half_shape(tuple(spec.shape)), spec.dtype)
    return walk.trace("unit", layer, [half, half],
                      lambda: footprint_lib.trace_unit(unit, [half, half]))


def _result(walk, input_bytes):
    """The peak of the timeline per method (forward, then backward in reverse, then the update)."""
    totals, breakdown, peak_at = {}, {}, {}
    for m in METHODS:
        kept, grads, candidates = 0, 0, []
        for step in walk.steps:
            candidates.append((kept + step.forward[m], kept, step.forward[m], 0,
                               f"forward of '{step.name}'"))
            kept += step.kept[m]
        for step in reversed(walk.steps):
            grads += step.weights
            candidates.append((kept + step.working[m] + grads, kept, step.working[m], grads,
                               f"backward of '{step.name}'"))
            kept -= step.kept[m]
        candidates.append((grads, 0, 0, grads, "weight update"))
        peak, kept_at, working_at, grads_at, where = max(candidates, key=lambda c: c[0])
        totals[m] = int(peak + input_bytes)
        breakdown[m] = {"input": input_bytes, "kept": kept_at, "working_set": working_at,
                        "weight_gradients": grads_at}
        peak_at[m] = where
    return MemoryEstimate(breakdown=breakdown, peak_at=peak_at, batch_size=walk.batch_size,
                          warnings=tuple(walk.warnings), **totals)



def configure_allocator(threshold=None):
    """Makes glibc return large freed buffers to the OS (`mallopt(M_MMAP_THRESHOLD, threshold)`).

    With glibc's default the mmap threshold adapts upwards to the largest freed buffer, after which
    TensorFlow's activation buffers are served from (and kept in) the heap: the RSS then follows the
    largest amount ever allocated, not the live memory. A fixed threshold makes buffers of at least
    `threshold` bytes `mmap`ed and unmapped when freed, as `MALLOC_MMAP_THRESHOLD_` would.

    Args:
        threshold: int bytes, or None for the environment variable `TF_REVNET_MALLOC_MMAP_THRESHOLD`
            (`0`: do nothing) or else 131072 (128 KiB).

    Returns:
        bool. True if the threshold was set (Linux with glibc), False otherwise.
    """
    if threshold is None:
        threshold = int(os.environ.get("TF_REVNET_MALLOC_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user chose already
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
