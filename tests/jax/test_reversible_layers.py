"""tf_revnet's reversible layers on the JAX backend: `jax.custom_vjp` + `jax.lax.scan` (Algorithm 1).

Gradients of the memory-saving pass equal plain autodiff (`use_custom_gradient=False`, the same
weights): eagerly (`jax.value_and_grad` over `stateless_call`), under `jax.jit` and in `model.fit`;
state (BatchNorm statistics, seed states) comes out of the forward pass once and equals plain's.

Keras 3.15 on JAX computes BatchNormalization and `tanh` of float64 tensors in float32
(`keras.backend.result_type` maps 64-bit floats to 32-bit), and XLA rounds a loop body and the
unrolled layers differently, so the 1e-10 float64 checks use Conv2D + ReLU residual functions;
layers with BatchNorm are checked in float32 to 1e-5.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import tf_revnet
from tf_revnet.layers import (
    AffineCoupling,
    BasicResidualFunction,
    ReversibleBlock,
    ReversibleBlockStack,
    ReversibleSequence,
    StageTransition,
    Stem,
)

F64, F32 = 1e-10, 1e-5


def _conv(dtype, channels=4, dropout=None):
    layers = [keras.layers.Conv2D(channels, 3, padding="same", activation="relu", dtype=dtype)]
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=7, dtype=dtype))
    return keras.Sequential(layers)


def _block(dtype, channels=4, residual="conv", **kwargs):
    dropout = kwargs.pop("dropout", None)
    make = ((lambda: _conv(dtype, channels, dropout)) if residual == "conv"
            else (lambda: keras.Sequential([BasicResidualFunction(channels, dtype=dtype)] + (
                [keras.layers.Dropout(dropout, seed=5)] if dropout else []))))
    return ReversibleBlock(make(), make(), dtype=dtype, **kwargs)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _loss_and_grads(layer, x, jit=False):
    """`(loss, grads wrt [x] + trainable, non-trainable values after)` through `stateless_call`."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    target = np.random.RandomState(1).standard_normal(layer.compute_output_shape(x.shape))

    def loss(x, trainable):
        y, after = layer.stateless_call(trainable, non_trainable, x, training=True)
        y = jnp.asarray(y)
        return jnp.sum((y - target.astype(y.dtype)) ** 2), after

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (value, after), (dx, dweights) = (jax.jit(step) if jit else step)(x, trainable)
    return value, [dx] + list(dweights), after


def _compare(layer, x, rtol, jit=False, set_custom=None):
    """Custom gradient vs plain autodiff on `layer`'s own weights: gradients and state after."""
    set_custom = set_custom or (lambda flag: setattr(layer, "use_custom_gradient", flag))
    set_custom(True)
    loss, grads, after = _loss_and_grads(layer, x, jit)
    set_custom(False)
    plain_loss, plain_grads, plain_after = _loss_and_grads(layer, x, jit)
    set_custom(True)
    assert _relative(loss, plain_loss) <= rtol
    for g, p in zip(grads, plain_grads, strict=True):
        assert _relative(g, p) <= rtol, (_relative(g, p), g.shape)
    for a, p in zip(after, plain_after, strict=True):
        if np.issubdtype(np.asarray(p).dtype, np.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=rtol, atol=rtol)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(p))
    return grads, after


def _x(shape, dtype):
    return np.random.RandomState(0).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_sequence_of_blocks_float64_equals_plain_autodiff(jit, fuse):
    blocks = [_block("float64") for _ in range(3)]
    seq = ReversibleSequence(blocks, fuse_identical_blocks=fuse, dtype="float64")
    seq.build((2, 6, 6, 8))
    _compare(seq, _x((2, 6, 6, 8), "float64"), F64, jit)


def test_affine_coupling_equals_plain_autodiff():
    """Keras computes the coupling's tanh and exp in float32 on JAX: float32's tolerance."""
    blocks = [ReversibleBlock(keras.layers.Dense(8, activation="relu", dtype="float64"),
                              keras.layers.Dense(8, dtype="float64"), coupling=AffineCoupling(),
                              dtype="float64") for _ in range(2)]
    seq = ReversibleSequence(blocks, dtype="float64")
    seq.build((4, 8))
    _compare(seq, _x((4, 8), "float64"), F32, jit=True)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_stack_float64_equals_plain_autodiff(jit):
    seq = ReversibleSequence(
        [ReversibleBlockStack(_block("float64"), depth=3), _block("float64")], dtype="float64")
    seq.build((2, 6, 6, 8))
    _compare(seq, _x((2, 6, 6, 8), "float64"), F64, jit)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_stem_transition_blocks_and_stack_with_batch_norm_float32(jit):
    """Blocks, a StageTransition and a Stem (stored inputs), BatchNorm statistics after the step."""
    units = [Stem(8), _block("float32", residual="basic"), StageTransition(16, strides=2)]
    if jit:  # eagerly every op is dispatched on its own: the smaller sequence
        units[2:2] = [_block("float32", residual="basic")]
        units.append(ReversibleBlockStack(_block("float32", 8, "basic"), depth=2))
    seq = ReversibleSequence(units)
    seq.build((2, 8, 8, 3))
    _, after = _compare(seq, _x((2, 8, 8, 3), "float32"), F32, jit)
    before = [np.asarray(v.value) for v in seq.non_trainable_variables]
    assert any(np.max(np.abs(np.asarray(a) - b)) > 0 for a, b in zip(after, before))


def test_dropout_seed_states_are_replayed_in_the_recompute():
    blocks = [_block("float64", dropout=0.3) for _ in range(2)]
    seq = ReversibleSequence(blocks + [ReversibleBlockStack(_block("float64", dropout=0.3), 2)],
                             dtype="float64")
    seq.build((2, 6, 6, 8))
    _, after = _compare(seq, _x((2, 6, 6, 8), "float64"), F64, jit=True)
    seeds = [a for a in after if not np.issubdtype(np.asarray(a).dtype, np.floating)]
    assert seeds and all(  # every generator advanced once per step, as in plain autodiff
        (np.asarray(a) != np.asarray(v.value)).any() for a, v in zip(
            seeds, [v for v in seq.non_trainable_variables if "seed" in v.path]))


def test_taps_equal_plain_autodiff():
    seq = ReversibleSequence([_block("float64") for _ in range(3)], taps=[0, 2], dtype="float64")
    seq.build((2, 6, 6, 8))
    x = _x((2, 6, 6, 8), "float64")
    trainable = [v.value for v in seq.trainable_variables]
    non_trainable = [v.value for v in seq.non_trainable_variables]

    def loss(trainable, custom):
        seq.use_custom_gradient = custom
        ys, _ = seq.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(ys[0] ** 3) + jnp.sum(jnp.sin(ys[1]))

    custom = jax.grad(loss)(trainable, True)
    plain = jax.grad(loss)(trainable, False)
    for g, p in zip(custom, plain, strict=True):
        assert _relative(g, p) <= F64


def test_inverse_rebuilds_the_input():
    seq = ReversibleSequence([_block("float64"), ReversibleBlockStack(_block("float64"), 2)],
                             dtype="float64")
    x = _x((2, 6, 6, 8), "float64")
    y = seq(x, training=True)
    assert _relative(seq.inverse(y, training=True), x) <= F64


def test_eager_call_assigns_batch_norm_statistics_once():
    layers = [_block("float32", residual="basic") for _ in range(2)]
    custom = ReversibleSequence(layers)
    x = _x((2, 6, 6, 8), "float32")
    custom.build(x.shape)
    plain_values = [np.asarray(v.value) for v in custom.variables]
    custom(x, training=True)
    after_custom = [np.asarray(v.value) for v in custom.variables]
    for v, value in zip(custom.variables, plain_values):
        v.assign(value)
    custom.use_custom_gradient = False
    custom(x, training=True)
    for a, p in zip(after_custom, [np.asarray(v.value) for v in custom.variables]):
        np.testing.assert_allclose(a, p, rtol=F32, atol=1e-7)


def test_reverse_over_reverse_hessian_vector_product_is_exact():
    seq = ReversibleSequence([_block("float64") for _ in range(2)], dtype="float64")
    seq.build((2, 4, 4, 8))
    x = _x((2, 4, 4, 8), "float64")
    trainable = [v.value for v in seq.trainable_variables]
    tangent = [jnp.ones_like(w) for w in trainable]

    def hvp(custom):
        seq.use_custom_gradient = custom

        def loss(trainable):
            return jnp.sum(seq.stateless_call(trainable, [], x, training=True)[0] ** 2)

        def dot(trainable):
            grads = jax.grad(loss)(trainable)
            return sum(jnp.sum(g * t) for g, t in zip(grads, tangent))

        return jax.grad(dot)(trainable)

    for g, p in zip(hvp(True), hvp(False), strict=True):
        assert _relative(g, p) <= 1e-8


def test_forward_mode_raises_one_clear_line_and_plain_autodiff_serves_it():
    seq = ReversibleSequence([_block("float64") for _ in range(2)], dtype="float64")
    seq.build((2, 4, 4, 8))
    x = _x((2, 4, 4, 8), "float64")

    def f(x):
        return seq.stateless_call([v.value for v in seq.trainable_variables], [], x,
                                  training=True)[0]

    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(f, (x,), (jnp.ones_like(x),))
    seq.use_custom_gradient = False
    jax.jvp(f, (x,), (jnp.ones_like(x),))


def _fit_model(custom, dtype):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3), dtype=dtype)
    body = ReversibleSequence([
        Stem(8, dtype=dtype), _block(dtype, residual="basic"),
        ReversibleBlockStack(_block(dtype, residual="basic"), depth=2),
        StageTransition(16, strides=2, dtype=dtype), _block(dtype, 8, "basic", dropout=0.2),
    ], use_custom_gradient=custom, dtype=dtype)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(body(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(x))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.MeanSquaredError())
    return model


def test_fit_two_steps_equals_plain():
    x, y = _x((8, 8, 8, 3), "float32"), _x((8, 3), "float32")
    weights, start = [], None
    for custom in (True, False):
        model = _fit_model(custom, "float32")
        if start is None:
            start = model.get_weights()
        model.set_weights(start)  # weights, BatchNorm statistics and seed states
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, p in zip(*weights, strict=True):  # weights, BatchNorm statistics, seed states
        np.testing.assert_allclose(a, p, rtol=1e-4, atol=1e-6)


def test_is_tf_revnet_public_api():
    assert keras.backend.backend() == "jax"
    assert tf_revnet.ReversibleSequence is ReversibleSequence


def test_momentum_blocks_equal_plain_autodiff():
    from tf_revnet.layers import MomentumBlock

    seq = ReversibleSequence([MomentumBlock(_conv("float64", 4), gamma=0.9, dtype="float64")
                              for _ in range(3)], dtype="float64")
    seq.build((2, 6, 6, 8))
    _compare(seq, _x((2, 6, 6, 8), "float64"), F64, jit=True)


def test_fixed_point_stream_rebuilds_exactly_and_equals_plain_autodiff():
    blocks = [_block("float32", coupling="fixed_point") for _ in range(2)]
    seq = ReversibleSequence(blocks + [ReversibleBlockStack(
        _block("float32", coupling="fixed_point"), 2)])
    x = _x((2, 6, 6, 8), "float32")
    seq.build(x.shape)
    _compare(seq, x, F32, jit=True)
    y = seq(x, training=True)
    np.testing.assert_array_equal(np.asarray(seq.inverse(y, training=True)),
                                  np.asarray(blocks[0].coupling.quantize(x)))
