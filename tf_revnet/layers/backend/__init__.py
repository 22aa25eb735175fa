"""The two backend-specific pieces of the reversible engine, one small module per Keras backend.

Everything else in `tf_revnet.layers` is written in `keras.ops`. A backend module provides the same
names (as `keras/src/backend/{jax,tensorflow}/` do):

- `sequence_gradient(plan, inputs, values, name) -> (taps, states, rng)`: the custom gradient around a
  whole `ReversibleSequence` (Algorithm 1 in its backward function): `tf.custom_gradient` on
  TensorFlow, `jax.custom_vjp` on JAX (every value an explicit argument).
- `scan(fn, carry, xs, length, ys_like=(), reverse=False, sequential=True, differentiable=False)`:
  the loop over a stack or a fused run of blocks, `fn(carry, x_slices) -> (carry, y_slices)` with the
  semantics of `jax.lax.scan`: `tf.while_loop` over `TensorArray`s on TensorFlow, `jax.lax.scan` on
  JAX.
- `vjp(fn, *primals) -> (outputs, pullback)`: a unit's recompute and its vector-Jacobian product
  (`tf.GradientTape` / `jax.vjp`); `pullback(cotangents)` returns one gradient per primal, zeros where
  unconnected.
- `rebuild_half(residual, couple, uncouple, z, weights, y, dy) -> (x, dz, dx, dweights)`: half a
  step of Algorithm 1 (one tape with the rebuilt input cut on TensorFlow, for eager memory; two vjps
  on JAX, for gradients of gradients).
- `after(deps, tensors)`: `tensors`, read only once `deps` exist (control dependencies in a TF graph,
  so that each recompute waits for the gradient from above; JAX's XLA schedules by data flow).
- `read`, `stop_recording`, `higher_order_possible`, `init_scope`, `map_slices`,
  `unreplayable_random_ops`, `RNG_DTYPE`, `is_tracer`.

The module is chosen once, by `keras.backend.backend()` at import (Keras fixes its backend then too).
"""

import keras

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from tf_revnet.layers.backend import tensorflow as _impl
elif BACKEND == "jax":
    from tf_revnet.layers.backend import jax as _impl
else:  # pragma: no cover - torch, numpy, openvino
    _impl = None

__all__ = ["BACKEND", "require", "require_tensorflow", "tensorflow_only"]


def require(what):
    """Raises `NotImplementedError` in one line naming `what`, unless a backend module exists."""
    if _impl is None:
        raise NotImplementedError(
            f"{what} needs the 'tensorflow' or 'jax' Keras backend. Received: KERAS_BACKEND="
            f"{BACKEND!r}. Fix: set KERAS_BACKEND=tensorflow or jax before importing keras."
        )
    return _impl


def require_tensorflow(what, why):
    """Raises `NotImplementedError` in one line naming `what` and `why`, unless the backend is TF."""
    if BACKEND != "tensorflow":
        raise NotImplementedError(
            f"{what} needs KERAS_BACKEND=tensorflow ({why}); the Keras backend is {BACKEND!r}."
        )


class _TensorFlowOnly:
    """Stands for the `tensorflow` module in a module that needs it, under another Keras backend."""

    def __init__(self, what, why):
        self._what, self._why = what, why

    def __getattr__(self, name):
        require_tensorflow(self._what, self._why)
        import tensorflow  # pragma: no cover - only reached with BACKEND == "tensorflow"

        return getattr(tensorflow, name)  # pragma: no cover


def tensorflow_only(what, why):
    """A stand-in for `tensorflow` whose every attribute raises `require_tensorflow`'s one line.

    For the modules that trace TensorFlow graphs or tapes (`tf_revnet.memory`, `footprint`,
    `diagnostics`, `callbacks`) under another backend: `import tf_revnet` works without TensorFlow
    installed, and using them says what needs TensorFlow and why.
    """
    return _TensorFlowOnly(what, why)


def __getattr__(name):
    return getattr(require("tf_revnet's reversible layers"), name)
