"""JAX pieces of the reversible engine: `jax.custom_vjp` and `jax.lax.scan`.

See `tf_revnet.layers.backend` for the contract. `jax.custom_vjp` cannot differentiate values its
function closes over, so every value the sequence reads is an explicit argument: the input, every
weight, every state value (BatchNorm statistics, seed states) and Keras' global seed state. The state
after the forward pass comes out as non-differentiable outputs, which the sequence assigns once
(inside `stateless_call`, to its scope), and the backward function replays the state each unit saw
from the residuals (Algorithm 1 keeps no activation: the residuals are the tapped outputs, the
weights, the state and the stored inputs of non-invertible units).

Forward mode (`jax.jvp`, forward-over-reverse Hessian-vector products) cannot go through a
`jax.custom_vjp`: JAX raises `TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp
function`. Reverse-over-reverse (`jax.grad` of `jax.grad`) differentiates the backward pass, exactly.
"""

import contextlib
import dataclasses

import jax
import numpy as np

from tf_revnet.layers.autocast import no_autocast
from tf_revnet.layers.backend.common import split

#: The dtype of a Keras seed state on this backend.
RNG_DTYPE = "uint32"

_REGISTERED = set()


def init_scope():
    """Variables created now are created outside any trace (a no-op: JAX creates them eagerly)."""
    return contextlib.nullcontext()


def stop_recording():
    """No tape to stop: a `jax.custom_vjp` forward pass is never recorded."""
    return contextlib.nullcontext()


def read(value):
    """A Keras variable's value (or any array) as a JAX array."""
    return jax.numpy.asarray(value)


def is_tracer(value):
    """Whether `value` is a JAX tracer (it may not be stored in a variable outside a scope)."""
    return isinstance(value, jax.core.Tracer)


def higher_order_possible(tensors):
    """False: JAX differentiates the custom vjp's backward pass for gradients of gradients."""
    return False


def after(deps, tensors):
    """`tensors` as they are: XLA schedules by data flow (no control dependencies in JAX)."""
    return tensors


def rebuild_half(residual, couple, uncouple, z, weights, y, dy):
    """Half a step of Algorithm 1 for `y = couple(x, R(z))`: `(x, dL/dz, dL/dx, dL/dweights)`.

    Two vjps (R, then the coupling) and no cut: JAX may differentiate this backward pass itself
    (gradients of gradients), which must see how the rebuilt `x` depends on `y`.
    """
    h, residual_pullback = vjp(residual, z, weights)
    x = uncouple(y, h)
    _, coupling_pullback = vjp(couple, x, h)
    dx, dh = coupling_pullback(dy)
    dz, dweights = residual_pullback(dh)
    return x, dz, dx, tuple(dweights)


def vjp(fn, *primals):
    """`(fn(*primals), pullback)` from `jax.vjp`; `pullback(cotangents)` is a tuple per primal."""
    outputs, pullback = jax.vjp(fn, *primals)
    return outputs, lambda cotangents: tuple(pullback(cotangents))


def map_slices(fn, stacked):
    """`fn` applied to every slice `stacked[i]`, stacked again (`jax.lax.map`)."""
    return jax.lax.map(fn, stacked)


def scan(fn, carry, xs, length, ys_like=(), reverse=False, sequential=True, differentiable=False):
    """`jax.lax.scan(fn, carry, xs, length, reverse)` (`ys_like`, `sequential`, `differentiable`:
    what the TensorFlow loop needs, unused here)."""
    return jax.lax.scan(fn, carry, xs, length=length, reverse=reverse)


def unreplayable_random_ops(layer, input_shape):
    """None on JAX: every JAX draw takes an explicit key (Keras' seed states are replayed)."""
    return []


def sequence_gradient(plan, inputs, values, name):
    """Algorithm 1 as one `jax.custom_vjp` over the input, the weights, the state and the seed state.

    Args:
        plan: the sequence's `_Plan` (`forward`, `backward`).
        inputs: the sequence's input array.
        values: the plan's packed `UnitValues`, one per unit (every unit read one seed state).
        name: the sequence's name (unused: a JAX unit cannot read an untracked variable unseen).

    Returns:
        `(taps, states, rng)`: the tapped outputs, each unit's packed state after the forward pass,
        and the global seed state after it (the caller assigns both, once).
    """
    sizes = [len(v.weights) for v in values]
    state_sizes = [len(v.state) for v in values]
    box = {}

    def unit_values(weights, states, rng):
        return [v.replace(weights=w, state=s, rng=rng) for v, w, s in
                zip(values, split(weights, sizes), split(states, state_sizes))]

    @jax.custom_vjp
    def reversible(x, weights, states, rng):
        taps, _, new_states, new_rng = plan.forward(x, unit_values(weights, states, rng))
        return tuple(taps), _flat(new_states), new_rng

    def forward(x, weights, states, rng):
        taps, records, new_states, new_rng = plan.forward(x, unit_values(weights, states, rng))
        arrays, box["records"] = _to_residuals(records)
        outputs = (tuple(taps), _flat(new_states), new_rng)
        return outputs, (tuple(taps), weights, states, rng, arrays)

    def backward(residuals, cotangents):
        taps, weights, states, rng, arrays = residuals
        records = _from_residuals(arrays, box["records"])
        with no_autocast():
            dx, dweights = plan.backward(list(taps), list(cotangents[0]),
                                         unit_values(weights, states, rng), records)
        return (dx, tuple(g for unit_grads in dweights for g in unit_grads),
                jax.tree.map(_zero_cotangent, states), _zero_cotangent(rng))

    reversible.defvjp(forward, backward)
    weights = tuple(w for v in values for w in v.weights)
    states = tuple(s for v in values for s in v.state)
    taps, new_states, rng = reversible(inputs, weights, states, values[0].rng)
    return list(taps), split(new_states, state_sizes), rng


def _flat(states):
    return tuple(s for state in states for s in state)




def _zero_cotangent(value):
    dtype = np.dtype(value.dtype)
    if np.issubdtype(dtype, np.inexact):
        return jax.numpy.zeros(value.shape, dtype)
    return np.zeros(value.shape, jax.dtypes.float0)  # integer inputs (seed states)


def _register(tree):
    """Makes the dataclasses in `tree` (the protocol's records) JAX pytree nodes, once per class."""
    if isinstance(tree, (list, tuple)):
        for item in tree:
            _register(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            _register(item)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        cls = type(tree)
        if cls not in _REGISTERED:
            jax.tree_util.register_dataclass(
                cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])
            _REGISTERED.add(cls)
        for field in dataclasses.fields(cls):
            _register(getattr(tree, field.name))


def _to_residuals(tree):
    """`(arrays, static)`: the arrays of `tree` (residuals) and what rebuilds it around them."""
    _register(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    arrays = [leaf for leaf, d in zip(leaves, dynamic) if d]
    static = [None if d else leaf for leaf, d in zip(leaves, dynamic)]
    return arrays, (treedef, dynamic, static)


def _from_residuals(arrays, static):
    treedef, dynamic, leaves = static
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if d else leaf for d, leaf in zip(dynamic, leaves)])
