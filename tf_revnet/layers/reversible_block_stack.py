"""A stage's run of identical reversible blocks, its weights stored stacked and run by one loop.

Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3 (Eq. 1-2, Algorithm 1) and
Table 1: every stage of a RevNet repeats one reversible block structure `n` times.

`ReversibleBlockStack(block, depth)` holds the weights of `depth` copies of `block` as ONE variable per
weight of the block, with a leading axis of size `depth` (a conv kernel `(3, 3, C, C)` becomes
`(depth, 3, 3, C, C)`), and runs them with one loop (`tf.while_loop`, `jax.lax.scan`). Nothing in the
traced graph, the optimizer or the checkpoint grows with `depth`: one read, one gradient and one
optimizer update per weight of the block, instead of one per weight of every block.
"""

import keras
from keras import ops

from tf_revnet.layers import backend
from tf_revnet.layers import unit as unit_lib
from tf_revnet.layers.autocast import no_autocast
from tf_revnet.layers.reversible_block import ReversibleBlock
from tf_revnet.layers.two_stream import TwoStreamLayer
from tf_revnet.layers.utils import build_sublayer, check_positive_int


class StackedVariable(keras.Variable):
    """A variable of a `ReversibleBlockStack`: one template variable's values for every block.

    Shape `(depth,) + template.shape`, the template's dtype; slice `[i]` is block `i`'s value. It is
    trainable exactly when its template variable is: the flag is read from the template (never
    copied), so freezing the stack, its template or a sub-layer of the template (e.g.
    `stack.block.f.trainable = False`) changes every list of trainable variables at once, before
    any call (an optimizer built after `compile` sees it); setting the flag here sets the template's.

    Args:
        template: the template block's `keras.Variable` it stacks.
        *args: positional arguments of `keras.Variable`.
        **kwargs: keyword arguments of `keras.Variable` (`initializer`, `shape`, `dtype`, ...).
    """

    def __init__(self, *args, template, **kwargs):
        self._template = template
        super().__init__(*args, **kwargs)

    @property
    def template(self):
        """The template block's variable that this variable stacks."""
        return self._template

    @property
    def trainable(self):
        """Whether the variable trains: its template variable's flag."""
        return self._template.trainable

    @trainable.setter
    def trainable(self, value):
        self._template.trainable = bool(value)


@keras.saving.register_keras_serializable(package="tf_revnet")
class ReversibleBlockStack(TwoStreamLayer):
    """`depth` reversible blocks of one structure, applied in order, with stacked weights.

    Equivalent to `depth` separate `ReversibleBlock`s built from `block`'s config (each initialised
    independently), applied one after the other (Eq. 1 per block); `inverse` applies Eq. 2 from the
    last block to the first. Each weight of `block` is stored once, stacked: the layer's variables have
    shape `(depth,) + weight.shape` (BatchNorm statistics and seed-generator states likewise), so the
    number of variables, the size of the traced graph and the per-variable work of the optimizer do not
    grow with `depth`. Inside a `ReversibleSequence` its blocks backpropagate by Algorithm 1 in one
    `tf.while_loop`, storing no activation.

    Args:
        block: `ReversibleBlock`: the structure of every block (its F, G, coupling and axis). It is
            kept as the template the loop runs; its own variables are not trained (if it is built,
            their values initialise the first block).
        depth: int >= 1. The number of blocks.
        **kwargs: base `keras.layers.Layer` arguments (`name`, ...). The dtype policy is the block's.

    Call arguments:
        inputs: float tensor, e.g. NHWC `(N, H, W, C)` with `C` even.
        training: bool or None. Passed to every F and G.

    Input shape:
        What `block` accepts, e.g. `(N, H, W, C)`.

    Output shape:
        The input shape; dtype `stream_dtype` (float32 under mixed precision).

    Raises:
        ValueError: if `block` is not a `ReversibleBlock`; if `depth` is not a
            positive integer (any integer type); on build, what `ReversibleBlock.build` raises
            (odd channels, a strided F or G).

    Examples:
        >>> from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleBlockStack
        >>> stack = ReversibleBlockStack(
        ...     ReversibleBlock(BasicResidualFunction(16), BasicResidualFunction(16)), depth=18)
        >>> y = stack(keras.random.normal((2, 8, 8, 32)), training=True)
        >>> [tuple(v.shape) for v in stack.trainable_variables if "conv1" in v.name][:1]
        [(18, 3, 3, 16, 16)]

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017, Section 3, Table 1, Algorithm 1.
    """

    invertible = True

    def __init__(self, block, depth, **kwargs):
        if not isinstance(block, ReversibleBlock):
            raise ValueError(
                "`block` must be a tf_revnet.layers.ReversibleBlock (the structure every block of the "
                f"stack repeats). Received: block={block!r} of type {type(block).__name__}"
            )
        depth = check_positive_int("depth", depth)
        kwargs.setdefault("dtype", block.dtype_policy)
        super().__init__(axis=block.axis, **kwargs)
        self.depth = depth
        # The template is not a tracked sublayer: its variables belong to no checkpoint or optimizer;
        # the loop maps them to slices of the stacked variables (whose `trainable` flags read the
        # template's, and the `trainable` setter passes the stack's flag on to the template).
        object.__setattr__(self, "_block", block)
        if not self.trainable:  # `trainable=False` given to the constructor (or a config)
            block.trainable = False

    @property
    def block(self):
        """The template `ReversibleBlock` (its own variables are unused)."""
        return self._block

    def stacked_variable(self, variable):
        """The stacked variable `(depth,) + variable.shape` that holds `variable` of `block` per block.

        Args:
            variable: a variable of the template `block` (an entry of `block.variables`).

        Returns:
            The stack's Keras variable; its slice `[i]` is block `i`'s value of `variable`.

        Raises:
            ValueError: if the stack is not built or `variable` is not one of the template's.
        """
        stacked = getattr(self, "_stacked", {}).get(id(variable))
        if stacked is None:
            raise ValueError(
                f"`variable` must be a variable of the built template `{self.name}.block`. "
                f"Received: {getattr(variable, 'path', variable)!r}"
            )
        return stacked


    @property
    def trainable(self):
        """Settable bool: whether the stack trains; the template block follows it.

        As for a tracked sub-layer (`keras.layers.Wrapper`), setting it sets the template's flag
        (a frozen BatchNorm of the template normalises with its moving statistics) and, through it,
        every stacked variable's (a `StackedVariable` is trainable exactly when its template
        variable is, so `stack.block.f.trainable = False` freezes F's stacked weights at once).
        """
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        keras.layers.Layer.trainable.fset(self, value)
        block = self.__dict__.get("_block")
        if block is not None:
            block.trainable = value

    @property
    def coupling(self):
        """The template block's `Coupling` (every block's)."""
        return self._block.coupling

    @property
    def stream_dtype(self):
        """The residual stream's dtype: the template block's (float32 under mixed precision)."""
        return self._block.stream_dtype

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        block = self._block
        build_sublayer(block, input_shape, block.input_dtype)
        template = block.trainable_variables + block.non_trainable_variables
        # Initial values: those of `depth` independently initialised blocks (the template is the first).
        initial = [[v.value] for v in template]
        for _ in range(self.depth - 1):
            copy = self._copy_block()
            build_sublayer(copy, input_shape, block.input_dtype)
            for values, v in zip(initial, copy.trainable_variables + copy.non_trainable_variables):
                values.append(v.value)
            del copy
        # id(template variable) -> its stacked variable. Untracked: a tracked dict with int keys
        # cannot be written to a SavedModel; the variables are tracked as `stacked_variables`.
        object.__setattr__(self, "_stacked", {})
        names = set()
        for v, values in zip(template, initial):
            value = ops.stack(values)
            name = _relative_name(v.path, block.name)
            while name in names:
                name += "_"
            names.add(name)
            self._stacked[id(v)] = self._stacked_variable(v, value, name)
        # Assigning the list tracks them (Keras' attribute tracking, as for `Conv2D.kernel`), in
        # template order; `tf.saved_model.save` and `tf.train.Checkpoint` see them by name.
        self.stacked_variables = list(self._stacked.values())
        self.input_spec = block.input_spec
        self.built = True

    def _stacked_variable(self, v, value, name):
        """The `StackedVariable` of template variable `v`, initialised to `value` (all blocks')."""
        with keras.name_scope(self.name, caller=self):  # the path `add_weight` would give
            stacked = StackedVariable(
                template=v,
                initializer=lambda shape, dtype, value=value: ops.cast(value, dtype),
                shape=tuple(value.shape),
                dtype=v.dtype,
                trainable=v.trainable,
                autocast=v._autocast,  # no public getter (keras.Variable(autocast=...) only)
                aggregation=v.aggregation,
                name=name,
            )
        # What `add_weight` sets on its variables.
        stacked.regularizer = self._per_block_regularizer(v, value)
        stacked.constraint = PerBlockConstraint(v.constraint) if v.constraint is not None else None
        return stacked

    def _per_block_regularizer(self, variable, value):
        """`variable.regularizer` applied to each block's slice (None without one).

        Raises:
            ValueError: naming the stack, the layer and the fix, if the regularizer fails on one
                block's value (e.g. an `OrthogonalRegularizer` on a convolution kernel).
        """
        regularizer = getattr(variable, "regularizer", None)
        if regularizer is None:
            return None
        try:
            regularizer(ops.cast(value[0], variable.dtype))
        except Exception as error:  # noqa: BLE001 - whatever the user's regularizer raises
            raise ValueError(
                f"ReversibleBlockStack '{self.name}': the regularizer of weight '{variable.path}' "
                f"({type(regularizer).__name__}) fails on one block's value of shape "
                f"{tuple(value.shape[1:])} ({type(error).__name__}: {_short(error)}). Fix: give that "
                "layer a regularizer that accepts its weight's shape (as it must without a stack)."
            ) from None
        return PerBlockRegularizer(regularizer)

    def reversible_unit(self):
        """The stack as a unit of `ReversibleSequence`: `tf_revnet.layers.unit.LoopUnit.for_stack`."""
        return unit_lib.LoopUnit.for_stack(self)

    def _copy_block(self):
        """A new block of the template's structure, F and G rebuilt from their configs."""
        block = self._block
        copies = {}
        for arg in ("f", "g"):
            layer = getattr(block, arg)
            if arg == "g" and layer is block.f:
                copies["g"] = copies["f"]
                continue
            copies[arg] = self._copy_residual_function(arg, layer)
        config = block.get_config()
        config.update(copies)
        return type(block).from_config(config)

    def _copy_residual_function(self, arg, layer):
        """A new layer from `layer`'s config: `from_config(get_config())`, as Keras clones layers.

        A `Lambda` holds a Python function, which Keras' safe mode refuses to rebuild from a config;
        copying the caller's own live function is no deserialization of untrusted data, so a `Lambda`
        is copied with `safe_mode=False`.
        """
        try:
            if isinstance(layer, keras.layers.Lambda):
                return keras.saving.deserialize_keras_object(
                    keras.saving.serialize_keras_object(layer), safe_mode=False)
            return type(layer).from_config(layer.get_config())
        except Exception as error:  # noqa: BLE001 - any failure of a user's get_config/from_config
            cause = ("it holds a Lambda or other Python code, which Keras' safe mode refuses to rebuild "
                     "from a config" if "safe_mode" in str(error) else "it cannot be rebuilt from its "
                     "config")
            fix = ("write it as a Layer subclass with a get_config(), or call "
                   "keras.config.enable_unsafe_deserialization() if you trust the code"
                   if "safe_mode" in str(error) else
                   "give the layer a get_config() that returns its constructor arguments (as Keras "
                   "layers do)")
            raise ValueError(
                f"ReversibleBlockStack '{self.name}' initialises each of its {self.depth} blocks "
                f"as a new copy of `block`, but residual function {arg.upper()} (layer "
                f"'{layer.name}', {type(layer).__name__}): {cause} ({type(error).__name__}: "
                f"{_short(error)}). Fix: {fix}."
            ) from None

    # ----------------------------------------------------------------------------------------------
    # Ordinary layer (inference, plain autodiff, gradients of gradients).

    def call(self, inputs, training=None):
        self.check_input(inputs)
        unit = self.reversible_unit()
        with no_autocast():
            values = unit.pack(unit_lib.read_values(unit, training=bool(training)))
        y, after = unit.run(values, self.split(ops.cast(inputs, self.stream_dtype)), training)
        for variable, value in zip(unit.state, after.state):
            variable.assign(value)
        if training:
            unit_lib.assign_rng(after.rng)
        return self.merge(*y)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, dtype=self.stream_dtype)

    def inverse_halves(self, y1, y2, training=None):
        """Eq. 2 through every block, last to first: returns the stack's input halves `(x1, x2)`."""
        unit = self.reversible_unit()
        with no_autocast():
            return unit.inverse(unit.pack(unit_lib.read_values(unit, bool(training))), (y1, y2),
                                training)

    def inverse(self, outputs, training=None):
        """Rebuilds the stack's inputs from its outputs (Eq. 2), without side effects.

        Args:
            outputs: float tensor `(..., C)`, the stack's output.
            training: bool or None, passed to F and G; use the value of the forward call.

        Returns:
            The rebuilt inputs, same shape and dtype as `outputs`.
        """
        outputs = self.check_input(backend.read(outputs))
        with keras.StatelessScope():
            return self.merge(*self.inverse_halves(*self.split(outputs), training=training))

    def get_config(self):
        config = super().get_config()
        config.pop("axis", None)  # the block's
        config.pop("dtype", None)  # the block's policy
        config.update(
            {"block": keras.saving.serialize_keras_object(self._block), "depth": self.depth}
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = config.pop("block")
        if not isinstance(block, keras.layers.Layer):
            block = keras.saving.deserialize_keras_object(block)
        return cls(block=block, **config)


def _relative_name(path, block_name):
    """`.../{block}/{block}_f/conv1/kernel` -> `f_conv1_kernel`: a variable's path inside the block."""
    relative = path.split(block_name + "/", 1)[-1]
    if relative.startswith(block_name + "_"):
        relative = relative[len(block_name) + 1 :]
    return relative.replace("/", "_")


def _short(error, limit=160):
    """An exception's message on one line, cut to `limit` characters."""
    reason = " ".join(str(error).split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


@keras.saving.register_keras_serializable(package="tf_revnet")
class PerBlockConstraint(keras.constraints.Constraint):
    """A weight constraint applied to each block's slice `w[i]` of a stacked weight `(depth, ...)`.

    Keras' optimizer applies `variable.constraint` after each update; on a stacked weight the block's
    own constraint (e.g. `MaxNorm` over axis 0 of a kernel) must see one block's kernel, not the stack.

    Args:
        constraint: the block weight's `keras.constraints.Constraint` (or callable).
    """

    def __init__(self, constraint):
        self.constraint = keras.constraints.get(constraint)

    def __call__(self, w):
        return backend.map_slices(self.constraint, w)

    def get_config(self):
        return {"constraint": keras.saving.serialize_keras_object(self.constraint)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["constraint"]))


@keras.saving.register_keras_serializable(package="tf_revnet")
class PerBlockRegularizer(keras.regularizers.Regularizer):
    """A weight regularizer summed over each block's slice `w[i]` of a stacked weight `(depth, ...)`.

    Equal to the sum of the penalties of `depth` separate blocks, for any regularizer (L1/L2, and
    those that need the weight's own rank, such as `OrthogonalRegularizer`).

    Args:
        regularizer: the block weight's `keras.regularizers.Regularizer` (or callable).
    """

    def __init__(self, regularizer):
        self.regularizer = keras.regularizers.get(regularizer)

    def __call__(self, w):
        w = backend.read(w)
        penalties = backend.map_slices(lambda block: ops.cast(self.regularizer(block), w.dtype), w)
        return ops.sum(penalties)

    def get_config(self):
        return {"regularizer": keras.saving.serialize_keras_object(self.regularizer)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["regularizer"]))
