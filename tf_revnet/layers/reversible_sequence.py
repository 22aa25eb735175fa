"""A stack of reversible blocks that backpropagates without storing activations (Algorithm 1).

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2 and Algorithm 1.

The whole stack runs under ONE `tf.custom_gradient`: the forward pass keeps only the stack's final output,
and the gradient function walks the blocks backwards, rebuilding each block's inputs from its outputs and
recomputing F and G under `tf.GradientTape`s (`ReversibleBlock.backward_step`). A custom gradient per block
would save nothing, because block k's output is block k+1's input and stays referenced.

Four things make this exact and memory-flat in TensorFlow (see the project's NOTES):

1. The forward pass runs with gradient recording stopped, so an outer eager `GradientTape` does not
   keep every activation alive (`tf.recompute_grad` does the same).
2. In a graph, each block's reconstruction is made to wait for the gradient of the block above
   (control dependencies on dy1, dy2); otherwise the executor runs every reconstruction right after the
   forward pass and their tensors all wait in memory.
3. The recompute runs in a `keras.StatelessScope`: BatchNorm moving statistics are updated once (by the
   forward pass), and random generator states are replayed so Dropout draws the same masks.
4. The gradient function takes `variables` (the backing `tf.Variable`s watched in the forward pass) and
   returns their gradients in that order, matched by `ref()`.
"""

import keras
import tensorflow as tf

from tf_revnet.layers.reversible_block import ReversibleBlock, add_gradients

try:  # The non-public switch `tf.recompute_grad` uses to stop every tape on this thread.
    from tensorflow.python.eager.record import stop_recording as _stop_recording
except ImportError:  # pragma: no cover - a future TF without it: correct, but eager memory not flat.
    import contextlib

    _stop_recording = contextlib.nullcontext


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleSequence(keras.layers.Layer):
    """Reversible blocks applied in order, with activation-free backprop (Algorithm 1).

    For blocks 1..N with outputs `(y1, y2)` of block k being the inputs `(x1, x2)` of block k+1, the
    forward pass is the composition of the blocks (Eq. 1). In training mode the backward pass stores no
    activation of the blocks: it keeps only the final output and rebuilds every block's inputs from its
    outputs (Eq. 2) while recomputing F and G, at about 4N instead of 3N multiply-adds (Section 3.2).
    Activation memory is therefore independent of N.

    The gradients equal ordinary autodiff up to float rounding (relative error ~1e-7 in float32,
    ~1e-16 in float64 with bounded activations). In inference mode (`training` False or None) the blocks
    run as ordinary layers: inverses with untrained BatchNorm moving statistics can be inexact, and no
    gradient is normally taken there.

    Args:
        blocks: list of `tf_revnet.layers.ReversibleBlock`, non-empty, all with the same `axis`.
        use_custom_gradient: bool. If False, backpropagate with ordinary autodiff on the same weights
            (stores activations; for comparison and debugging). Defaults to True.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor, e.g. NHWC `(N, H, W, C)` with `C` even.
        training: bool or None. True runs the memory-saving backward pass.

    Input shape:
        Any shape whose size on the blocks' `axis` is even, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape. Output dtype: the variable dtype of the layer's policy (float32 under mixed
        precision; F and G compute in their own policies' dtype).

    Raises:
        ValueError: if `blocks` is empty or holds something that is not a `ReversibleBlock` (named by
            index); if the blocks' `axis` differ; on build, if a block cannot keep the shape (e.g. F or
            G with stride 2; named by index); on call, if the input is not floating point.

    Example:

    >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence
    >>> blocks = [
    ...     ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16)) for _ in range(8)
    ... ]
    >>> stack = ReversibleSequence(blocks)
    >>> x = keras.random.normal((4, 16, 16, 32))
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     loss = tf.reduce_sum(stack(x, training=True) ** 2)
    >>> grads = tape.gradient(loss, [x] + stack.trainable_variables)

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3.2, Algorithm 1.
    """

    def __init__(self, blocks, use_custom_gradient=True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(blocks, ReversibleBlock):
            blocks = [blocks]
        blocks = list(blocks) if blocks is not None else []
        if not blocks:
            raise ValueError(
                "`blocks` must be a non-empty list of tf_revnet.layers.ReversibleBlock. "
                f"Received: blocks={blocks!r}"
            )
        for index, block in enumerate(blocks):
            if not isinstance(block, ReversibleBlock):
                raise ValueError(
                    f"`blocks[{index}]` is not a tf_revnet.layers.ReversibleBlock; only reversible "
                    "blocks can be rebuilt from their outputs. Put non-reversible layers (strided or "
                    "channel-changing units) before or after the sequence. "
                    f"Received: blocks[{index}]={block!r}"
                )
        axes = {block.axis for block in blocks}
        if len(axes) != 1:
            raise ValueError(
                f"All blocks must split the same axis. Received: axis values "
                f"{[block.axis for block in blocks]}"
            )
        self.blocks = blocks
        self.use_custom_gradient = bool(use_custom_gradient)
        self.axis = blocks[0].axis

    @property
    def input_dtype(self):
        # The residual stream stays in the variable dtype (float32 under mixed precision).
        return self.dtype_policy.variable_dtype

    def build(self, input_shape):
        for index, block in enumerate(self.blocks):
            if block.built:
                continue
            try:
                block.build(input_shape)
            except ValueError as error:
                raise ValueError(f"In `blocks[{index}]` (layer '{block.name}'): {error}") from None
        self.input_spec = self.blocks[0].input_spec
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.input_dtype)

    def call(self, inputs, training=None):
        self.blocks[0]._check_dtype(inputs)
        if self.use_custom_gradient and training:
            return self._reversible_call(inputs)
        x1, x2 = self.blocks[0].split(inputs)
        for block in self.blocks:
            x1, x2 = block.forward(x1, x2, training=training)
        return self.blocks[0].merge(x1, x2)

    def inverse(self, outputs, training=None):
        """Rebuilds the sequence's inputs from its outputs (Eq. 2, block by block in reverse).

        Side-effect free (runs in a `keras.StatelessScope`); see `ReversibleBlock.inverse` for the
        meaning of `training`.

        Args:
            outputs: float tensor, the sequence's output, e.g. `(N, H, W, C)`.
            training: bool or None, passed to F and G.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.
        """
        outputs = tf.convert_to_tensor(outputs)
        self.blocks[0]._check_dtype(outputs)
        with keras.StatelessScope():
            y1, y2 = self.blocks[0].split(outputs)
            for block in reversed(self.blocks):
                y1, y2 = block.inverse_halves(y1, y2, training=training)
            return self.blocks[0].merge(y1, y2)

    def _reversible_call(self, inputs):
        blocks = self.blocks

        @tf.custom_gradient
        def reversible_forward(x):
            replay = []
            # Pitfall 1: no tape may record the forward activations.
            with _stop_recording():
                x1, x2 = blocks[0].split(x)
                for block in blocks:
                    x1, x2 = block.forward(x1, x2, training=True, replay_log=replay)
                y = blocks[0].merge(x1, x2)
            del x1, x2

            def grad_fn(dy, variables=None):
                # Only `y`, the generator-state snapshots and the layers are captured.
                return _backward(blocks, y, dy, replay, variables)

            return y, grad_fn

        return reversible_forward(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "blocks": [keras.saving.serialize_keras_object(b) for b in self.blocks],
                "use_custom_gradient": self.use_custom_gradient,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        blocks = [keras.saving.deserialize_keras_object(b) for b in config.pop("blocks")]
        return cls(blocks=blocks, **config)


def _backward(blocks, y, dy, replay, variables):
    """Algorithm 1 over a stack: from `(y, dy)` to `(dx, [dL/dv for v in variables])`."""
    y1, y2 = blocks[0].split(y)
    dy1, dy2 = blocks[0].split(tf.cast(dy, y.dtype))
    grads = {}
    for index in reversed(range(len(blocks))):
        # Pitfall 2: rebuild block `index` only once the gradient of the block above exists.
        with tf.control_dependencies([dy1, dy2]):
            y1, y2 = tf.identity(y1), tf.identity(y2)
        (y1, y2), (dy1, dy2), block_grads = blocks[index].backward_step(
            y1, y2, dy1, dy2, replay=replay[2 * index : 2 * index + 2], training=True
        )
        add_gradients(grads, block_grads)
    dx = blocks[0].merge(dy1, dy2)
    variables = variables or []
    var_grads = [
        grads[v.ref()] if v.ref() in grads else tf.zeros_like(v) for v in variables
    ]
    return dx, var_grads
