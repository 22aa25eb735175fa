"""Training-step memory: an analytic estimate per backprop method, and glibc allocator settings.

`estimate(model, batch_size)` counts, layer by layer, the activation bytes that a training step keeps for
its backward pass under three methods, from the layers' shapes and dtypes alone (no tracing, no
measurement):

- `plain`: ordinary autodiff stores what each op's gradient needs: the input of every convolution and
  dense layer, the input of every BatchNorm, the output of every ReLU and max pooling (Gomez et al.,
  2017, Section 3: "activations which need to be stored");
- `reversible`: `ReversibleSequence`'s backward pass (Algorithm 1) stores only the inputs of its
  non-invertible units (stem, stage transitions) and its output, plus, while it runs, one unit's
  recomputed activations and its gradients (the working set) and the stacked weights and gradients of
  the blocks it runs as one `tf.while_loop`;
- `recompute`: `tf.recompute_grad` around every unit stores every unit's input, plus one unit's working
  set.

Each adds the head's activations, the weight gradients and the input batch; plain backprop also the
gradient tensors alive at once (about two of the largest activation). `benchmarks/models.py` compares the
estimate with measured per-step peaks (benchmarks/README.md).

`configure_allocator()` sets glibc's `M_MMAP_THRESHOLD` so that large freed buffers go back to the
operating system: with glibc's default, adaptive threshold, TensorFlow's freed activation buffers stay
in the heap and the process RSS of a reversible network grows with depth although live memory does not.
`import tf_revnet` calls it once (set `TF_REVNET_MALLOC_MMAP_THRESHOLD=0` to leave malloc alone, or a
byte count to choose the threshold).
"""

import ctypes
import dataclasses
import math
import os
import sys

import keras

from tf_revnet.layers.residual_block import ResidualBlock
from tf_revnet.layers.residual_functions import _PreActivationResidualFunction
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.reversible_block_stack import ReversibleBlockStack
from tf_revnet.layers.reversible_sequence import ReversibleSequence
from tf_revnet.layers.shortcut import Shortcut
from tf_revnet.layers.stage_transition import StageTransition
from tf_revnet.layers.stem import Stem

__all__ = ["MemoryEstimate", "estimate", "configure_allocator"]

METHODS = ("plain", "reversible", "recompute")
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
DEFAULT_MMAP_THRESHOLD = 131072


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs above the memory held before it, per backprop method.

    Attributes:
        plain, reversible, recompute: int. Estimated per-step peak in bytes: stored activations,
            working set, gradients and the input batch.
        breakdown: dict `{method: {part: bytes}}` with parts `"input"`, `"stem"`, `"transitions"`,
            `"blocks"`, `"working_set"`, `"head"`, `"activation_gradients"`, `"weight_gradients"`,
            `"stacked_weights"` (reversible: the fused blocks' weights and gradients stacked)
            (and `"optimizer_state"`, held before the step and not in the totals).
        batch_size: int.
    """

    plain: int
    reversible: int
    recompute: int
    breakdown: dict
    batch_size: int

    def as_dict(self):
        """`{method: bytes}` for the three methods."""
        return {m: getattr(self, m) for m in METHODS}


def _elements(shape, batch_size):
    return batch_size * math.prod(d for d in shape[1:])


def _itemsize(dtype):
    import numpy as np

    return np.dtype(keras.backend.standardize_dtype(dtype)).itemsize


def _stored(layer, shape, batch_size):
    """Bytes plain autodiff keeps for `layer`'s backward pass on inputs of `shape`, and the output shape."""
    size = lambda s, lay=layer: _elements(s, batch_size) * _itemsize(lay.compute_dtype)  # noqa: E731
    if isinstance(layer, _PreActivationResidualFunction):
        total, s = 0, tuple(shape)
        for bn, conv in zip(layer.batch_norms, layer.convs):
            total += size(s) * (2 if bn is not None else 1)  # BN input and ReLU output, or conv input
            s = tuple(conv.compute_output_shape(s))
        return total, s
    if isinstance(layer, Stem):
        conv_out = tuple(layer.conv.compute_output_shape(shape))
        total = size(shape) + 2 * size(conv_out)  # conv input; BN input; ReLU output
        out = conv_out
        if layer.pool is not None:
            out = tuple(layer.pool.compute_output_shape(conv_out))
            total += size(out)  # max pooling's gradient needs its output too
        return total, out
    if isinstance(layer, StageTransition):
        half = tuple(shape[:-1]) + (shape[-1] // 2,)
        f_bytes, f_out = _stored(layer.f, half, batch_size)
        g_bytes, _ = _stored(layer.g, f_out, batch_size)
        shortcut = sum(size(half) for s in (layer.shortcut1, layer.shortcut2) if s.conv is not None)
        return f_bytes + g_bytes + shortcut, tuple(layer.compute_output_shape(shape))
    if isinstance(layer, ReversibleBlockStack):
        return layer.depth * _stored(layer.block, shape, batch_size)[0], shape
    if isinstance(layer, ReversibleBlock):
        half = tuple(shape[:-1]) + (shape[-1] // 2,)
        return _stored(layer.f, half, batch_size)[0] + _stored(layer.g, half, batch_size)[0], shape
    if isinstance(layer, ResidualBlock):
        f_bytes, out = _stored(layer.f, shape, batch_size)
        projection = layer.shortcut_layer is not None and layer.shortcut_layer.conv is not None
        return f_bytes + (size(shape) if projection else 0), out
    if isinstance(layer, Shortcut):
        return (size(shape) if layer.conv is not None else 0), tuple(layer.compute_output_shape(shape))
    out = tuple(layer.compute_output_shape(shape))
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        return size(shape), out
    if isinstance(layer, keras.layers.BatchNormalization):
        return size(shape), out
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU, keras.layers.MaxPooling2D)):
        return size(out), out
    if isinstance(layer, (keras.layers.InputLayer, keras.layers.GlobalAveragePooling2D,
                          keras.layers.AveragePooling2D, keras.layers.Rescaling,
                          keras.layers.Normalization)):
        return 0, out
    return size(out), out  # an unknown layer: assume it keeps its output


def _working_set(unit, shape, batch_size):
    """Bytes a unit's backward step holds at once: recomputed activations and the tensors around them.

    A `ReversibleBlock` recomputes G, then F (Algorithm 1), each under its own tape: the larger of the
    two, plus its outputs and their gradients (y1, y2, dy1, dy2) and the rebuilt half and its gradient.
    Any other unit is recomputed whole under one tape from its stored input (counted elsewhere), plus
    the gradient arriving at its output and the one it passes to its input.
    """
    itemsize = _itemsize(getattr(unit, "stream_dtype", unit.compute_dtype))
    if isinstance(unit, ReversibleBlockStack):
        unit = unit.block
    if isinstance(unit, ReversibleBlock):
        half = tuple(shape[:-1]) + (shape[-1] // 2,)
        stored = max(_stored(unit.f, half, batch_size)[0], _stored(unit.g, half, batch_size)[0])
        return stored + 3 * itemsize * _elements(shape, batch_size)
    stored, out = _stored(unit, shape, batch_size)
    return stored + itemsize * (_elements(shape, batch_size) + _elements(out, batch_size))


def estimate(model, batch_size):
    """Estimates the bytes one training step of `model` needs, for plain, reversible and recompute.

    Walks the model's layers in order (functional models; a `ReversibleSequence`'s units one by one)
    with their static shapes.

    Args:
        model: a built `keras.Model` (e.g. from `tf_revnet.models`), or a `ReversibleSequence`.
        batch_size: int, positive.

    Returns:
        `MemoryEstimate`, in bytes.

    Raises:
        ValueError: if `batch_size` is not a positive int, or a layer's input shape (other than the
            batch) is unknown (build the model with a fixed `input_shape`).

    Example:

    >>> model = tf_revnet.models.RevNet38()
    >>> e = tf_revnet.memory.estimate(model, batch_size=128)
    >>> e.reversible < e.plain
    True

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2 and Table 4
        (memory of RevNet-104 and ResNet-101).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    if isinstance(model, ReversibleSequence):
        layers = [(model, tuple(model._unit_input_shapes[0]))]
    else:
        layers = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            shape = tuple(layer.input.shape) if not isinstance(layer.input, list) else None
            layers.append((layer, shape))
    parts = {m: dict.fromkeys(("input", "stem", "transitions", "blocks", "working_set", "head"), 0)
             for m in METHODS}
    largest = 0
    for layer, shape in layers:
        if shape is None or any(d is None for d in shape[1:]):
            raise ValueError(
                f"estimate() needs static shapes; layer '{layer.name}' has input shape {shape}. "
                "Fix: build the model with a fixed input_shape, e.g. (32, 32, 3)."
            )
        if not isinstance(layer, ReversibleSequence):
            stored, out = _stored(layer, shape, batch_size)
            largest = max(largest, _elements(out, batch_size) * _itemsize(layer.compute_dtype))
            part = "stem" if isinstance(layer, Stem) else (
                "blocks" if isinstance(layer, (ResidualBlock, ReversibleBlock)) else "head")
            for m in METHODS:
                parts[m][part] += stored
            continue
        working = {"reversible": 0, "recompute": 0}
        unit_shape = shape
        for unit in layer.units:
            stored, out = _stored(unit, unit_shape, batch_size)
            in_bytes = _elements(unit_shape, batch_size) * _itemsize(
                getattr(unit, "input_dtype", unit.compute_dtype))
            largest = max(largest, _elements(out, batch_size) * _itemsize(unit.compute_dtype))
            invertible = isinstance(unit, (ReversibleBlock, ReversibleBlockStack))
            part = ("stem" if isinstance(unit, Stem) else
                    "transitions" if not invertible else "blocks")
            parts["plain"][part] += stored
            ws = _working_set(unit, unit_shape, batch_size)
            working["recompute"] = max(working["recompute"], ws)
            # tf.recompute_grad around each unit keeps each block's input (a stack: `depth` of them).
            parts["recompute"][part] += in_bytes * getattr(unit, "depth", 1)
            if invertible:
                working["reversible"] = max(working["reversible"], ws)
            else:
                parts["reversible"][part] += in_bytes  # kept: the unit is not invertible
                working["reversible"] = max(working["reversible"], ws)
            unit_shape = out
        out_bytes = _elements(unit_shape, batch_size) * 4
        parts["reversible"]["blocks"] += out_bytes  # the sequence's output
        # Blocks fused into a while loop: their weights stacked, and their stacked gradients (a
        # ReversibleBlockStack's weights are stacked already: only the gradients).
        fused = sum(
            math.prod(v.shape) * _itemsize(v.dtype)
            for unit in layer.units if isinstance(unit, ReversibleBlock)
            for v in unit.trainable_variables
        ) if layer.fuse_identical_blocks else 0
        stacks = sum(
            math.prod(v.shape) * _itemsize(v.dtype)
            for unit in layer.units if isinstance(unit, ReversibleBlockStack)
            for v in unit.trainable_variables
        )
        parts["reversible"]["stacked_weights"] = 2 * fused + stacks
        for m in ("reversible", "recompute"):
            parts[m]["working_set"] = max(parts[m]["working_set"], working[m])
    input_shape = layers[0][1] if layers else (None,)
    weights = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in model.trainable_variables)
    optimizer_state = weights  # SGD momentum: one slot per weight (held before the step)
    totals = {}
    for m in METHODS:
        parts[m]["input"] = _elements(input_shape, batch_size) * 4
        # Plain backprop: the gradients in flight next to the stored activations (about two of the
        # largest). The other methods hold theirs in the working set.
        parts[m]["activation_gradients"] = 2 * largest if m == "plain" else 0
        parts[m]["weight_gradients"] = weights
        totals[m] = int(sum(parts[m].values()))
        parts[m]["optimizer_state"] = optimizer_state
    return MemoryEstimate(breakdown=parts, batch_size=batch_size, **totals)


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
