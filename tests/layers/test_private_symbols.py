"""The private TensorFlow/Keras symbols tf_revnet uses, each where no public API does the job.

Each test fails if the symbol moves or changes the behaviour the library relies on, so that an upgrade
of TensorFlow or Keras shows the break here, with the symbol's name, rather than as wrong memory or
gradients elsewhere. The comment at each use in tf_revnet/ names the public API that is missing.
"""

import keras
import tensorflow as tf

from tf_revnet.layers import autocast, utils


def test_stop_recording_hides_ops_from_an_outer_tape():
    """tensorflow.python.eager.record.stop_recording (what tf.recompute_grad uses): memory-flat eager."""
    from tensorflow.python.eager.record import stop_recording

    assert utils.stop_recording is stop_recording
    x = tf.constant(2.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        with stop_recording():
            y = x * x
    assert tape.gradient(y, x) is None


def test_possible_tape_gradient_types_counts_the_tapes_watching():
    """tensorflow.python.ops.gradients_util.PossibleTapeGradientTypes: higher order detection."""
    from tensorflow.python.ops.gradients_util import PossibleTapeGradientTypes

    x = tf.constant(1.0)
    with tf.GradientTape() as outer:
        outer.watch(x)
        assert PossibleTapeGradientTypes([x]) == 1
        assert not utils.higher_order_possible([x])
        with tf.GradientTape() as inner:
            inner.watch(x)
            assert PossibleTapeGradientTypes([x]) == 2
            assert utils.higher_order_possible([x])


def test_pack_tangents_sees_a_forward_accumulator():
    """tensorflow.python.eager.forwardprop_util.pack_tangents: forward-mode detection."""
    from tensorflow.python.eager.forwardprop_util import pack_tangents

    x = tf.constant(1.0)
    assert not pack_tangents([x]).tangents
    with tf.autodiff.ForwardAccumulator(x, tf.constant(1.0)):
        assert pack_tangents([x]).tangents
        assert utils.higher_order_possible([x])


def test_autocast_scope_is_a_global_attribute_that_no_autocast_clears():
    """keras.src.backend.common.global_state "autocast_scope": reading master weights in float32."""
    from keras.src.backend.common import global_state

    seen = {}

    class Probe(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(), initializer="ones")

        def call(self, x):
            seen["scope"] = global_state.get_global_attribute("autocast_scope")
            seen["autocast"] = self.w.value.dtype
            with autocast.no_autocast():
                seen["cleared"] = global_state.get_global_attribute("autocast_scope")
                seen["master"] = self.w.value.dtype
            return x

    Probe(dtype="mixed_float16")(tf.ones((1,)))
    assert seen["scope"] is not None and seen["autocast"] == tf.float16
    assert seen["cleared"] is None and seen["master"] == tf.float32


def test_global_seed_generator_is_what_unseeded_keras_random_draws_from():
    """keras.src.random.seed_generator.GLOBAL_SEED_GENERATOR: replaying unseeded keras.random."""
    from keras.src.random import seed_generator

    assert isinstance(seed_generator.GLOBAL_SEED_GENERATOR, str)
    keras.random.normal((1,))  # creates it if needed
    state = utils.global_seed_state()
    before = state.numpy().copy()
    keras.random.normal((1,))
    assert (state.numpy() != before).any()


def test_variable_autocast_flag_is_readable():
    """keras.Variable._autocast: a stacked weight keeps its block weight's autocast (no getter)."""
    assert keras.Variable(1.0, autocast=False)._autocast is False
    assert keras.Variable(1.0)._autocast is True


def test_in_stateless_scope_tells_whether_a_stateless_scope_is_active():
    """keras.src.backend.common.stateless_scope.in_stateless_scope: `unit.assign_rng` on JAX."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    assert not in_stateless_scope()
    with keras.StatelessScope():
        assert in_stateless_scope()
