"""TensorFlow pieces of the reversible engine: `tf.custom_gradient` and `tf.while_loop`.

See `tf_revnet.layers.backend` for the contract. How this is exact and memory-flat in TensorFlow (the
project's NOTES): the forward pass runs with recording stopped (an outer eager tape would keep every
activation), each recompute waits for the gradient from above (control dependencies; otherwise a graph
runs them all right after the forward pass), and the variables are explicit inputs of the custom
gradient (so it works under `tf.cond`, `tf.switch_case` and `tf.while_loop`).
"""

import contextlib

import keras
import tensorflow as tf

from tf_revnet.layers.autocast import no_autocast
from tf_revnet.layers.backend.common import split

# Private symbols (tests/layers/test_private_symbols.py fails if one moves or changes behaviour).
try:  # The switch `tf.recompute_grad` uses to stop every tape on this thread; no public API pauses
    # recording for all tapes at once (`GradientTape.stop_recording` pauses one known tape).
    from tensorflow.python.eager.record import stop_recording
except ImportError:  # pragma: no cover - a future TF without it: correct, eager memory not flat.
    stop_recording = contextlib.nullcontext
try:  # What `tf.function` asks to decide whether a backward pass must itself be differentiable; no
    # public API tells how many tapes watch a tensor.
    from tensorflow.python.ops.gradients_util import (
        PossibleTapeGradientTypes as _possible_gradient_types,
    )
except ImportError:  # pragma: no cover
    _possible_gradient_types = None
try:  # The tangents that active `tf.autodiff.ForwardAccumulator`s track for some tensors; no public
    # API asks whether any accumulator is active.
    from tensorflow.python.eager.forwardprop_util import pack_tangents as _pack_tangents
except ImportError:  # pragma: no cover
    _pack_tangents = None

#: The dtype of a Keras seed state on this backend.
RNG_DTYPE = "int64"

#: TensorFlow ops that draw from a hidden, stateful generator: their draws cannot be replayed.
_STATEFUL_RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformInt",
        "RandomStandardNormal",
        "TruncatedNormal",
        "ParameterizedTruncatedNormal",
        "RandomShuffle",
        "RandomCrop",
        "Multinomial",
        "RandomGamma",
        "RandomGammaGrad",
        "RandomPoisson",
        "RandomPoissonV2",
        "StatefulUniform",
        "StatefulUniformInt",
        "StatefulUniformFullInt",
        "StatefulStandardNormal",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulRandomBinomial",
        "RngSkip",
        "RngReadAndSkip",
    }
)

init_scope = tf.init_scope


def read(value):
    """A Keras variable's value (or any array) as a tensor (`tf.convert_to_tensor` reads a variable)."""
    return tf.convert_to_tensor(value)


def is_tracer(value):
    """Whether `value` belongs to a trace that may not be stored in a variable (never, in TF)."""
    return False


def higher_order_possible(tensors):
    """True if `tensors` may be differentiated other than by one reverse-mode tape.

    That is: two or more tapes watch them (gradients of gradients; `tf.function` asks the same question
    to decide whether to record a differentiable backward pass), or a `tf.autodiff.ForwardAccumulator`
    tracks them (forward mode, which a custom gradient cannot serve).
    """
    if _possible_gradient_types is not None and _possible_gradient_types(tensors) == 2:
        return True
    if _pack_tangents is not None:
        return bool(_pack_tangents(tensors).tangents)
    return False


def after(deps, tensors):
    """`tensors` (a tensor or a tuple), re-read only once every tensor of `deps` exists."""
    with tf.control_dependencies(tf.nest.flatten(deps)):
        return tf.nest.map_structure(tf.identity, tensors)


def vjp(fn, *primals):
    """`(fn(*primals), pullback)`: `pullback(cotangents)` is a tuple of gradients, one per primal."""
    with tf.GradientTape() as tape:
        tape.watch(primals)
        outputs = fn(*primals)

    def pullback(cotangents):
        return tuple(tape.gradient(outputs, list(primals), output_gradients=cotangents,
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO))

    return outputs, pullback


def rebuild_half(residual, couple, uncouple, z, weights, y, dy):
    """Half a step of Algorithm 1 for `y = couple(x, R(z))`: `(x, dL/dz, dL/dx, dL/dweights)`.

    One tape over `h = R(z)` and `couple(x, h)`, `x = uncouple(y, h)` cut from `y`. (Two separate
    vjps, one per function, keep about two half-tensors per block alive until an eager backward pass
    ends: measured 16.6 MB per block against 0.58 MB at 64-channel halves, batch 32.) TensorFlow
    never differentiates this backward pass: higher-order use runs plain autodiff instead.
    """
    with tf.GradientTape() as tape:
        tape.watch(z)
        tape.watch(weights)
        h = residual(z, weights)
        x = tf.stop_gradient(uncouple(y, h))
        tape.watch(x)
        y_recomputed = couple(x, h)
    dz, dx, *dweights = tape.gradient(y_recomputed, [z, x, *weights], output_gradients=dy,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return x, dz, dx, tuple(dweights)


def map_slices(fn, stacked):
    """`fn` applied to every slice `stacked[i]`, stacked again (a stacked weight's constraint)."""
    stacked = tf.convert_to_tensor(stacked)
    return tf.map_fn(fn, stacked, fn_output_signature=stacked.dtype)


def scan(fn, carry, xs, length, ys_like=(), reverse=False, sequential=True, differentiable=False):
    """`jax.lax.scan` semantics in one `tf.while_loop`: `fn(carry, x_slices) -> (carry, y_slices)`.

    Args:
        fn: the loop body. `xs` and `ys` are nests of tensors stacked on axis 0.
        carry: nest of tensors.
        xs: nest of stacked tensors, read slice `i` at step `i` (`x[i]`; through `TensorArray`s with
            `differentiable`, so that autodiff writes their gradients slice by slice).
        length: int, the number of steps.
        ys_like: nest of `keras.KerasTensor`s: the shape and dtype of one slice of each `y`.
        reverse: run from the last slice to the first (`ys` keep the slices' order).
        sequential: `parallel_iterations=1` (one step at a time: the memory-flat passes).
        differentiable: read `xs` through `TensorArray`s (the loop is differentiated by autodiff).
    """
    flat_xs, flat_like = tf.nest.flatten(xs), tf.nest.flatten(ys_like)
    if differentiable:
        arrays = [tf.TensorArray(x.dtype, size=length, element_shape=x.shape[1:]).unstack(x)
                  for x in flat_xs]

        def read(i):
            return [ta.read(i) for ta in arrays]
    else:
        def read(i):
            return [x[i] for x in flat_xs]

    def body(k, carry, ys_tas):
        i = length - 1 - k if reverse else k
        carry, ys = fn(carry, tf.nest.pack_sequence_as(xs, read(i)))
        return k + 1, carry, [ta.write(i, y) for ta, y in zip(ys_tas, tf.nest.flatten(ys))]

    tas = [tf.TensorArray(like.dtype, size=length, element_shape=like.shape) for like in flat_like]
    _, carry, tas = tf.while_loop(
        lambda k, *_: k < length, body, (tf.constant(0), carry, tas),
        maximum_iterations=length, **({"parallel_iterations": 1} if sequential else {}),
    )
    return carry, tf.nest.pack_sequence_as(ys_like, [ta.stack() for ta in tas])


def unreplayable_random_ops(layer, input_shape):
    """The op types of `layer`'s training-mode call that draw from a hidden TensorFlow generator."""
    dtype = layer.input_dtype if hasattr(layer, "input_dtype") else "float32"
    spec = tf.TensorSpec([None if d is None else d for d in input_shape], dtype)

    def probe(x):
        with keras.StatelessScope():
            return layer(x, training=True)

    with tf.init_scope():
        graph_def = tf.function(probe).get_concrete_function(spec).graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return sorted(types & _STATEFUL_RANDOM_OPS)


def sequence_gradient(plan, inputs, values, name):
    """Algorithm 1 under one `tf.custom_gradient` whose inputs are `inputs` and every weight value.

    Args:
        plan: the sequence's `_Plan` (`forward`, `backward`, `tap_units`).
        inputs: the sequence's input tensor.
        values: the plan's packed `UnitValues`, one per unit.
        name: the sequence's name (for errors).

    Returns:
        `(taps, states, rng)`: the tapped outputs, each unit's packed state after the forward pass,
        and the global seed state after it (the caller assigns both, once).
    """
    sizes, n_taps = [len(unit_values.weights) for unit_values in values], len(plan.tap_units)
    @tf.custom_gradient
    def reversible_forward(x, *weights):
        unit_values = [v.replace(weights=w) for v, w in zip(values, split(weights, sizes))]
        # Pitfall 1: no tape may record the forward activations.
        with stop_recording():
            taps, records, states, rng = plan.forward(x, unit_values)
        outputs = [*taps, rng, *[t for state in states for t in state]]

        def grad_fn(*output_grads, variables=None):
            if variables:
                names = ", ".join(v.name for v in variables)
                raise ValueError(
                    f"Layer '{name}': a unit reads variables it does not track ({names}); "
                    "create them in the unit's build() so that Keras tracks them."
                )
            # Only the tapped outputs, the records (stored inputs of non-invertible units, replay
            # state) and the weights are captured.
            with no_autocast():
                dx, dweights = plan.backward(taps, output_grads[:n_taps], unit_values, records)
            return [dx] + [g for unit_grads in dweights for g in unit_grads]

        return outputs, grad_fn

    weights = [w for unit_values in values for w in unit_values.weights]
    outputs = reversible_forward(inputs, *weights)
    taps, rng, states = outputs[:n_taps], outputs[n_taps], outputs[n_taps + 1:]
    return list(taps), split(states, [len(v.state) for v in values]), rng
