"""Tests of tf_revnet/memory.py: the estimate derived from the plan, and the allocator setting."""

import ctypes
import re
import warnings

import keras
import pytest

import tf_revnet
from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence, Stem

F32 = 4


def tiny_revnet(**kwargs):
    return tf_revnet.models.RevNet(units=(1, 1), widths=(8, 8, 16), input_shape=(16, 16, 3),
                                   **kwargs)


def conv_bn_relu_model(separate=True):
    """Conv-BN-ReLU twice then a classifier: as Keras layers, or as one layer of our own."""
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for _ in range(2):
        x = (keras.Sequential([keras.layers.Conv2D(4, 3, padding="same"),
                               keras.layers.BatchNormalization(), keras.layers.ReLU()])(x)
             if separate else ConvBNReLU(4)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


class ConvBNReLU(keras.layers.Layer):
    """A layer the estimator has never heard of."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


class Untraceable(keras.layers.Layer):
    """Cannot run inside tf.function (reads a value eagerly)."""

    def call(self, x):
        return x * float(keras.ops.convert_to_numpy(keras.ops.max(x)))

    def compute_output_shape(self, input_shape):
        return input_shape


def test_hand_count_of_a_dense_stack():
    """Plain backprop keeps the ReLU output (also the second Dense's input: once); nothing else."""
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32), keras.layers.ReLU(),
                              keras.layers.Dense(8)])
    e = tf_revnet.memory.estimate(model, 256)
    assert e.breakdown["plain"]["input"] == 256 * 16 * F32
    assert e.breakdown["plain"]["kept"] == 256 * 32 * F32
    assert e.plain == e.reversible == e.recompute  # no reversible layer: every method is plain
    weights = F32 * sum(v.numpy().size for v in model.trainable_variables)
    assert e.breakdown["plain"]["weight_gradients"] <= weights


def test_hand_count_of_a_sequence():
    """Stem (3 -> 4 channels) and one block on halves of 2, batch 2, 8x8: what each method keeps."""
    seq = ReversibleSequence([Stem(4), ReversibleBlock(BasicResidualFunction(),
                                                       BasicResidualFunction())])
    seq.build((None, 8, 8, 3))
    full, half = 2 * 8 * 8 * 4 * F32, 2 * 8 * 8 * 2 * F32
    e = tf_revnet.memory.estimate(seq, 2)
    assert e.breakdown["plain"]["input"] == 2 * 8 * 8 * 3 * F32
    # Plain, at the block's backward: the stem's BN input and ReLU output, F's and G's BN inputs
    # and ReLU outputs (two each); the stem's input is the batch. (+ per-channel BN statistics.)
    assert e.peak_at["plain"] == f"backward of '{seq.units[1].name}'"
    assert e.breakdown["plain"]["kept"] == pytest.approx(2 * full + 8 * half, abs=256)
    # Reversible: nothing kept but the output while the block rebuilds; its own working set.
    assert e.peak_at["reversible"].startswith("backward of")
    assert e.breakdown["reversible"]["kept"] in (0, full)
    # One block: rebuilding it (its output, gradient and recompute) costs more than keeping its input.
    assert e.recompute < e.reversible < e.plain


def test_nested_model_equals_unnested():
    inner = tiny_revnet()
    images = keras.Input((16, 16, 3))
    outer = keras.Model(images, inner(images))
    twice = keras.Model(images, keras.Sequential([outer])(images))
    expected = tf_revnet.memory.estimate(inner, 8).as_dict()
    assert tf_revnet.memory.estimate(outer, 8).as_dict() == expected
    assert tf_revnet.memory.estimate(twice, 8).as_dict() == expected


def test_model_without_reversible_layers_saves_nothing():
    e = tf_revnet.memory.estimate(conv_bn_relu_model(), 8)
    assert e.plain == e.reversible == e.recompute


def test_unknown_layer_counted_from_what_it_stores():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        own = tf_revnet.memory.estimate(conv_bn_relu_model(separate=False), 8)
    # The same ops as Keras layers keep the same tensors (conv input, BN input, ReLU output); the
    # peak falls in one layer of our own instead of in its BN or ReLU.
    separate = tf_revnet.memory.estimate(conv_bn_relu_model(), 8)
    assert own.plain == pytest.approx(separate.plain, rel=0.1)
    unit = ConvBNReLU(4)
    seq = ReversibleSequence([Stem(8), ReversibleBlock(unit, ConvBNReLU(4))])
    seq.build((None, 8, 8, 3))
    full = 8 * 8 * 8 * 8 * F32
    e = tf_revnet.memory.estimate(seq, 8)
    # Stem: BN input, ReLU output; F and G each: conv input, BN input, ReLU output (halves).
    assert e.breakdown["plain"]["kept"] == pytest.approx(2 * full + 3 * full, abs=256)


def test_untraceable_layer_is_named_in_a_warning():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Untraceable(name="odd_one")(inputs)))
    with pytest.warns(UserWarning, match="'odd_one'.*could not be traced"):
        e = tf_revnet.memory.estimate(model, 2)
    assert any("odd_one" in w for w in e.warnings) and "odd_one" in str(e)


def test_split_axis_1():
    """Blocks that split the tokens (axis=1) of (N, T, C) instead of the channels."""
    def dense():
        return keras.Sequential([keras.layers.LayerNormalization(), keras.layers.Dense(32)])

    seq = ReversibleSequence([ReversibleBlock(dense(), dense(), axis=1) for _ in range(4)])
    seq.build((None, 16, 32))
    e = tf_revnet.memory.estimate(seq, 64)
    assert e.reversible < e.recompute < e.plain
    # At most the output and the blocks' weights stacked for their loop.
    stacked = F32 * sum(v.numpy().size for v in seq.trainable_variables)
    assert e.breakdown["reversible"]["kept"] <= 64 * 16 * 32 * F32 + stacked


def test_multi_head_attention_on_tokens():
    class Attention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.mha = keras.layers.MultiHeadAttention(2, 4)

        def call(self, x, training=None):
            return self.mha(x, x, training=training)

    inputs = keras.Input((12, 8))
    x = ReversibleSequence([ReversibleBlock(Attention(), Attention()) for _ in range(2)])(inputs)
    mha = keras.layers.MultiHeadAttention(2, 4)
    x = mha(x, x)  # a layer of two inputs, outside the sequence
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = tf_revnet.memory.estimate(model, 4)
    assert e.reversible < e.plain
    scores = 4 * 2 * 12 * 12 * F32  # one attention's softmax (N, heads, T, T)
    assert e.breakdown["plain"]["kept"] > 5 * scores  # five attentions keep theirs


def test_subclassed_model_is_refused():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(keras.ops.zeros((1, 3)))
    with pytest.raises(ValueError, match="functional or Sequential.*subclassed model"):
        tf_revnet.memory.estimate(model, 2)
    with pytest.raises(ValueError, match="functional or Sequential"):
        tf_revnet.memory.estimate(keras.layers.Dense(2), 2)


def test_dynamic_shapes_need_a_fixed_input_shape():
    with pytest.raises(ValueError, match="batch_size"):
        tf_revnet.memory.estimate(tiny_revnet(), 0)
    dynamic = tf_revnet.models.RevNet(units=(1, 1), widths=(8, 8, 16), input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="static shapes.*input_shape"):
        tf_revnet.memory.estimate(dynamic, 8)
    given = tf_revnet.memory.estimate(dynamic, 8, input_shape=(16, 16, 3))
    assert given.as_dict() == tf_revnet.memory.estimate(tiny_revnet(), 8).as_dict()


def test_print_shows_mb_and_ratios():
    e = tf_revnet.memory.estimate(tiny_revnet(), 32)
    text = str(e)
    assert "MB" in text and "vs plain" in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in text.splitlines()
            if line.startswith("| ") and "method" not in line}
    assert set(rows) == {"plain", "reversible", "recompute"}
    assert float(rows["plain"][1]) == 1.0
    assert float(rows["reversible"][1]) == pytest.approx(e.reversible / e.plain, abs=0.005)
    assert float(rows["reversible"][0]) == pytest.approx(e.reversible / 2**20, abs=0.05)
    assert not re.search(r"\d{7}", text)  # no raw byte counts


def test_estimate_scales_with_batch_and_orders_methods():
    model = tf_revnet.models.RevNet38()
    small, large = (tf_revnet.memory.estimate(model, b) for b in (32, 128))
    assert small.reversible < small.recompute < small.plain
    assert large.plain > 3 * large.reversible
    assert 3.5 * small.plain < large.plain < 4.1 * small.plain


def test_configure_allocator(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert tf_revnet.memory.configure_allocator(131072) is True
    monkeypatch.setenv("TF_REVNET_MALLOC_MMAP_THRESHOLD", "0")
    assert tf_revnet.memory.configure_allocator() is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tf_revnet.memory.configure_allocator(131072) is False  # the user's own setting wins


def test_docstring_example():
    model = tf_revnet.models.RevNet38()
    e = tf_revnet.memory.estimate(model, batch_size=128)
    assert e.reversible < e.plain
