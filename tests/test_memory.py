"""Tests of tf_revnet/memory.py: the analytic memory estimate and the allocator setting."""

import ctypes

import keras
import pytest

import tf_revnet
from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence, Stem


def small_body():
    """Stem (3 -> 4 channels) then one reversible block of basic residual functions on halves of 2."""
    seq = ReversibleSequence(
        [Stem(4), ReversibleBlock(BasicResidualFunction(), BasicResidualFunction())]
    )
    seq.build((None, 8, 8, 3))
    return seq


def test_estimate_counts_what_each_method_stores():
    """Hand count, float32, batch 2, 8x8 images (a full tensor of 4 channels is 2 KiB)."""
    batch, image, full, half = 2, 2 * 8 * 8 * 3 * 4, 2 * 8 * 8 * 4 * 4, 2 * 8 * 8 * 2 * 4
    e = tf_revnet.memory.estimate(small_body(), batch)
    plain = e.breakdown["plain"]
    # Stem: conv input (the image), BN input and ReLU output (full tensors).
    assert plain["stem"] == image + 2 * full
    # Block: F and G each BN-ReLU-Conv twice on a half: BN input and ReLU output per convolution.
    assert plain["blocks"] == 2 * 2 * 2 * half
    reversible = e.breakdown["reversible"]
    assert reversible["stem"] == image  # the stem keeps only its input
    assert reversible["blocks"] == full  # the block keeps nothing; the sequence keeps its output
    # Working set: the stem's recompute (its activations and the gradients at its output and input)
    # against the block's (F's activations, y1, y2, dy1, dy2, rebuilt half, its gradient).
    stem_ws = image + 2 * full + (image + full)
    block_ws = 2 * 2 * half + 3 * full
    assert reversible["working_set"] == max(stem_ws, block_ws)
    weights = 4 * sum(v.numpy().size for v in small_body().trainable_variables)
    # The block's weights and gradients, stacked for the while loop.
    block_weights = 4 * sum(v.numpy().size for v in small_body().units[1].trainable_variables)
    assert reversible["stacked_weights"] == 2 * block_weights
    for method in ("plain", "reversible", "recompute"):
        parts = e.breakdown[method]
        assert parts["weight_gradients"] == weights
        expected = sum(v for k, v in parts.items() if k != "optimizer_state")
        assert getattr(e, method) == expected


def test_estimate_scales_with_batch_and_orders_methods():
    model = tf_revnet.models.RevNet110()
    small, large = (tf_revnet.memory.estimate(model, b) for b in (32, 128))
    assert small.reversible < small.recompute < small.plain
    weights = small.breakdown["plain"]["weight_gradients"]
    # Activations are linear in the batch; weight gradients are not.
    assert (large.plain - weights) == pytest.approx(4 * (small.plain - weights), rel=1e-9)
    # Plain backprop stores ~7x more than the reversible body at CIFAR size.
    assert large.plain > 5 * large.reversible


def test_estimate_needs_static_shapes_and_a_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        tf_revnet.memory.estimate(tf_revnet.models.RevNet38(), 0)
    with pytest.raises(ValueError, match="static shapes.*input_shape"):
        tf_revnet.memory.estimate(tf_revnet.models.RevNet38(input_shape=(None, None, 3)), 8)


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
    assert keras.backend.standardize_dtype(model.dtype) == "float32"
