"""Weights between the two layouts of reversible blocks: stacked, or one layer per block.

A run of identical reversible blocks is stored either as ONE `ReversibleBlockStack` (one variable per
weight of the block, shape `(depth,) + shape`; `RevNet(stack_blocks=True)`, the default) or as one
`ReversibleBlock` layer per block (`stack_blocks=False`). The two compute the same function, but their
variables differ in number and shape, so Keras' `load_weights` and `set_weights` cannot move weights
between them. `transfer_weights(source, target)` does: it walks both models' layers in order (into
nested models and `ReversibleSequence.units`), lets a stack stand for `depth` block slots (slot `i` is
slice `[i]` of each stacked variable) and a `ReversibleBlock` for one, and copies every variable slot
by slot: weights, BatchNorm moving statistics and seed-generator states.

Sources that carry no architecture (a `.weights.h5` file, a `get_weights()` list) are loaded into the
target's own layout if they fit it, otherwise into its counterpart: a clone of the target whose
`ReversibleSequence`s have every stack expanded into `depth` blocks, or every run of identical
consecutive blocks collapsed into a stack.
"""

import dataclasses
import os
import re
import shutil
import tempfile
import warnings

import h5py
import keras
import numpy as np

from tf_revnet.layers import ReversibleBlock, ReversibleBlockStack, ReversibleSequence
from tf_revnet.layers import unit as unit_lib

__all__ = ["transfer_weights"]

_ADVICE = (
    "the models differ in more than `stack_blocks` (only a ReversibleBlockStack against one "
    "ReversibleBlock per block can be mapped)"
)


def transfer_weights(source, target):
    """Copies the weights of a model onto the same model with its reversible blocks stored otherwise.

    `target` gets every variable of a model `source` (`variables`: weights, BatchNorm moving
    statistics, seed-generator states), so that both compute the same predictions, even where one
    stores a stage's identical reversible blocks as one `ReversibleBlockStack`
    (`RevNet(stack_blocks=True)`) and the other as one `ReversibleBlock` per block
    (`stack_blocks=False`); models of the same layout are copied as they are. The layers of both
    models are walked in order, into nested models and into `ReversibleSequence.units`: a stack of
    depth `n` stands for `n` blocks, block `i` being slice `[i]` of each stacked variable
    (`stack.stacked_variable(v)[i]` for `v` in `stack.block.variables`); a `ReversibleBlock` stands
    for one block (its `variables`); any other layer for its `variables`. The slots must match one by
    one (layer type, number and shapes of the variables); nothing is written unless all of them do.

    A `.weights.h5` file or a `get_weights()` list does not say which layout wrote it. It is loaded
    into `target` itself if its entries (paths and shapes) or arrays (shapes, in order) are exactly
    those of `target`'s layout, otherwise into the counterpart of `target` if they are exactly its
    counterpart's: a clone of `target` with each `ReversibleBlockStack` inside a `ReversibleSequence`
    expanded into `depth` `ReversibleBlock`s built from the template block's config (named
    `f"{prefix}_block{i}"` for a stack named `f"{prefix}_blocks{a}to{b}"`, as RevNets name them), or,
    for a target without stacks, with each run of two or more identical consecutive `ReversibleBlock`s
    (same config but for the names, same variable shapes, no shared weights) collapsed into one
    stack. Then the counterpart is transferred as from a model. Files, `.keras` files included, and
    lists hold `model.weights`: the seed-generator states of per-block layers (Dropout) are not in
    them, and `target` keeps its own; a stack's stacked states are. Only functional and `Sequential`
    targets can be cloned so; models that chain blocks directly, outside a `ReversibleSequence`,
    convert from a model or `.keras` source. Optimizer state is not converted (its slots have the
    shapes of the variables of one layout): `target`'s optimizer is left as it was.

    Args:
        source: the weights to copy: a built `keras.Model`; a path (str or `os.PathLike`) to a
            `.keras` file (loaded with `keras.saving.load_model`; `tf_revnet` registers its layers)
            or to a `.weights.h5` file (as `model.save_weights` writes it); or a list of arrays, as
            `model.get_weights()` returns them (weights and BatchNorm statistics, no seed states).
        target: a built `keras.Model` (functional or `Sequential` for a file or list source): the
            same architecture as `source`, with either layout of its reversible blocks.

    Returns:
        `target`, its variables assigned.

    Raises:
        ValueError: in one line naming `stack_blocks`, if the weights cannot be mapped: the models
            differ in more than the layout of their reversible blocks (another depth, other widths,
            another architecture); the message names the first layer that differs (for a file, the
            first entry). Also if `source` or `target` is of an unsupported type or not built.

    Examples:
        >>> stacked = tf_revnet.models.RevNet38()                     # stack_blocks=True
        >>> stacked.save_weights("revnet38.weights.h5")
        >>> per_block = tf_revnet.models.RevNet38(stack_blocks=False)
        >>> tf_revnet.transfer_weights("revnet38.weights.h5", per_block)   # or stacked, or its get_weights()
        >>> tf_revnet.transfer_weights(per_block, tf_revnet.models.RevNet38())   # and back

    References:
        Gomez et al., "The Reversible Residual Network", NeurIPS 2017 (arXiv:1707.04585), Table 1
        (every stage repeats one reversible block structure).
    """
    _check_model("target", target)
    if isinstance(source, keras.Model):
        _check_model("source", source)
        _transfer(source, target)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".keras"):
            loaded = keras.saving.load_model(path, compile=False)
            _transfer(loaded, target, only=_saved(loaded))
        elif path.endswith(".weights.h5"):
            _transfer_file(path, target)
        else:
            raise ValueError(
                "`source` must be a path ending in `.keras` or `.weights.h5`. "
                f"Received: source={path!r}"
            )
    elif isinstance(source, (list, tuple)):
        _transfer_list([np.asarray(w) for w in source], target)
    else:
        raise ValueError(
            "`source` must be a keras.Model, a path to a `.keras` or `.weights.h5` file, or a list "
            f"of arrays from `get_weights()`. Received: source of type {type(source).__name__}"
        )
    return target


def _check_model(arg, model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{arg}` must be a keras.Model. Received: {arg} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(f"`{arg}` must be built (call it once or build it). Received: {model.name!r}")


# ----------------------------------------------------------------------------------------------------
# Slots: the variables of each layer, a stack standing for `depth` blocks.


@dataclasses.dataclass(frozen=True)
class _Slot:
    """The variables of one block, or of one other layer, in order.

    `refs` are `(variable, index)` pairs: `index` is the block's slice of a stacked variable, or None.
    """

    layer: keras.layers.Layer
    kind: str
    refs: tuple
    block: bool

    @property
    def shapes(self):
        return tuple(
            tuple(v.shape[1:]) if i is not None else tuple(v.shape) for v, i in self.refs
        )


def _block_kind(block):
    return f"ReversibleBlock({type(block.f).__name__}, {type(block.g).__name__})"


def _slots(layer, seen=None):
    """The slots of `layer` in order, recursing into models and `ReversibleSequence.units`."""
    seen = set() if seen is None else seen
    if id(layer) in seen:  # a layer used twice is copied once
        return []
    seen.add(id(layer))
    if isinstance(layer, keras.Model):
        return [slot for sub in layer.layers for slot in _slots(sub, seen)]
    if isinstance(layer, ReversibleSequence):
        return [slot for unit in layer.units for slot in _slots(unit, seen)]
    if isinstance(layer, ReversibleBlockStack):
        kind = _block_kind(layer.block)
        stacked = [layer.stacked_variable(v) for v in layer.block.variables]
        return [
            _Slot(layer, kind, tuple((v, i) for v in stacked), True) for i in range(layer.depth)
        ]
    if isinstance(layer, ReversibleBlock):
        return [_Slot(layer, _block_kind(layer), tuple((v, None) for v in layer.variables), True)]
    if not layer.variables:
        return []
    return [_Slot(layer, type(layer).__name__, tuple((v, None) for v in layer.variables), False)]


def _runs(slots):
    """Consecutive block slots of one kind and shapes form a run; any other slot is its own."""
    runs = []
    for slot in slots:
        last = runs[-1][-1] if runs else None
        if (slot.block and last is not None and last.block and last.kind == slot.kind
                and last.shapes == slot.shapes):
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs


def _describe(run):
    names = list(dict.fromkeys(slot.layer.name for slot in run))
    where = f"'{names[0]}'" if len(names) == 1 else f"'{names[0]}' to '{names[-1]}'"
    if not run[0].block:
        return f"{where} ({run[0].kind})"
    n = len(run)
    return f"{where} ({n} block{'s' if n != 1 else ''})"


def _owner(layer):
    if isinstance(layer, ReversibleBlockStack):
        return f"'{layer.name}' (ReversibleBlockStack of {layer.depth} blocks)"
    return f"'{layer.name}' ({type(layer).__name__})"


def _mismatch(source_run, target_run):
    """Why two runs cannot be mapped, or None."""
    s, t = source_run[0], target_run[0]
    if s.kind != t.kind:
        return f"a {s.kind} against a {t.kind}"
    if len(source_run) != len(target_run):
        return f"{len(source_run)} blocks against {len(target_run)}"
    if len(s.shapes) != len(t.shapes):
        return f"{len(s.shapes)} variables against {len(t.shapes)}"
    for k, (a, b, (v, _)) in enumerate(zip(s.shapes, t.shapes, t.refs)):
        if a != b:
            return f"variable {k} ('{v.path}') has shape {a} in the source and {b} in the target"
    return None


def _transfer(source, target, only=None):
    """Copies `source`'s variables onto `target` slot by slot (`only`: ids of the source variables
    to copy, None for all)."""
    source_runs, target_runs = _runs(_slots(source)), _runs(_slots(target))
    for k in range(max(len(source_runs), len(target_runs))):
        if k >= len(source_runs) or k >= len(target_runs):
            extra, owner = ((target_runs[k], "target") if k >= len(source_runs)
                            else (source_runs[k], "source"))
            raise ValueError(
                f"transfer_weights cannot map model '{source.name}' onto model '{target.name}': "
                f"the {owner} has {_describe(extra)} where the other has no more layers; {_ADVICE}."
            )
        reason = _mismatch(source_runs[k], target_runs[k])
        if reason is not None:
            raise ValueError(
                f"transfer_weights cannot map the weights of {_describe(source_runs[k])} of model "
                f"'{source.name}' onto {_describe(target_runs[k])} of model '{target.name}': "
                f"{reason}; {_ADVICE}."
            )
    read = {}
    values = {}
    for s_slot, t_slot in zip(
        (slot for run in source_runs for slot in run), (slot for run in target_runs for slot in run)
    ):
        for (sv, si), (tv, ti) in zip(s_slot.refs, t_slot.refs):
            if only is not None and id(sv) not in only:
                continue
            if id(sv) not in read:
                read[id(sv)] = keras.ops.convert_to_numpy(sv.value)
            x = read[id(sv)] if si is None else read[id(sv)][si]
            if ti is None:
                values[id(tv)] = (tv, x)
            else:
                if id(tv) not in values:
                    values[id(tv)] = (tv, np.array(keras.ops.convert_to_numpy(tv.value)))
                values[id(tv)][1][ti] = x
    for variable, value in values.values():
        variable.assign(keras.ops.cast(value, variable.dtype))


# ----------------------------------------------------------------------------------------------------
# Sources without an architecture: the target's layout or its counterpart.


def _candidates(target):
    """`(label, build)` for the layouts a file or list may have: the target's own (`build` None),
    then its counterpart."""
    units = [unit for sequence in _sequences(target) for unit in sequence.units]
    if any(isinstance(u, ReversibleBlockStack) for u in units):
        return [("its own layout (stack_blocks=True)", None),
                ("one ReversibleBlock per block (stack_blocks=False)",
                 lambda: _counterpart(target, _expand))]
    candidates = [("its own layout (stack_blocks=False)", None)]
    if any(isinstance(u, ReversibleBlock) for u in units):
        candidates.append(("identical blocks stacked (stack_blocks=True)",
                           lambda: _counterpart(target, _collapse)))
    return candidates


def _sequences(layer, seen=None):
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return []
    seen.add(id(layer))
    if isinstance(layer, ReversibleSequence):
        return [layer]
    if isinstance(layer, keras.Model):
        return [s for sub in layer.layers for s in _sequences(sub, seen)]
    return []


def _counterpart(model, rewrite):
    """A clone of `model` whose `ReversibleSequence`s have their units rewritten by `rewrite`."""

    def clone(layer):
        if isinstance(layer, ReversibleSequence):
            config = layer.get_config()
            config.pop("units", None)
            taps = config.pop("taps", None)
            units, ends = rewrite(layer.units, taps or ())
            # A tapped unit's output is the output of the unit it became (or the last of its copies).
            return type(layer)(units=units, taps=None if taps is None else [ends[t] for t in taps],
                               **config)
        return layer.__class__.from_config(layer.get_config())

    try:
        return keras.models.clone_model(model, clone_function=clone, recursive=True)
    except ValueError as error:
        raise ValueError(
            f"transfer_weights needs a functional or Sequential `target` to load a file or list "
            f"written with the other `stack_blocks` layout; model '{model.name}' cannot be cloned "
            f"({' '.join(str(error).split())[:160]})"
        ) from None


def _copy(layer, name=None):
    """A new, unbuilt layer from `layer`'s config; `name` renames it (and F and G of a block)."""
    config = keras.saving.serialize_keras_object(layer)
    if name is not None:
        inner = config["config"]
        old = inner.get("name", "")
        inner["name"] = name
        for arg in ("f", "g"):
            sub = inner.get(arg)
            if isinstance(sub, dict) and isinstance(sub.get("config"), dict):
                sub_name = sub["config"].get("name", "")
                sub["config"]["name"] = (name + sub_name[len(old):] if old and sub_name.startswith(old)
                                         else f"{name}_{arg}")
    return keras.saving.deserialize_keras_object(config)


def _expand(units, taps=()):
    """Units with each `ReversibleBlockStack` replaced by `depth` blocks of its template's config.

    Returns `(units, ends)`: `ends[i]` is the new index of the last unit made from `units[i]`.
    """
    copies, out, ends = {}, [], []
    for unit in units:
        if id(unit) not in copies:
            if isinstance(unit, ReversibleBlockStack):
                match = re.fullmatch(r"(.*)_blocks(\d+)to(\d+)", unit.name)
                if match and int(match[3]) - int(match[2]) + 1 == unit.depth:
                    names = [f"{match[1]}_block{b}" for b in range(int(match[2]), int(match[3]) + 1)]
                else:
                    names = [f"{unit.name}_block{b}" for b in range(1, unit.depth + 1)]
                copies[id(unit)] = [_copy(unit.block, name) for name in names]
            else:
                copies[id(unit)] = [_copy(unit)]
        out += copies[id(unit)]
        ends.append(len(out) - 1)
    return out, ends


def _signature(block):
    """What makes blocks identical: the unit protocol's `structure_signature` (config without names,
    the residual functions' classes, the variables' shapes, dtypes and trainable flags)."""
    return unit_lib.structure_signature(block, block.variables)


def _collapse(units, taps=()):
    """Units with each run of two or more identical consecutive blocks replaced by one stack.

    A run ends at a tapped unit (its output must stay a unit's output). Returns `(units, ends)`:
    `ends[i]` is the new index of the unit that `units[i]` became part of.
    """
    copies, out, ends, i = {}, [], [], 0
    while i < len(units):
        unit = units[i]
        j = i + 1
        if type(unit) is ReversibleBlock:
            signature, ids = _signature(unit), {id(v) for v in unit.variables}
            while (j - 1 not in taps and j < len(units) and type(units[j]) is ReversibleBlock
                   and not ids & {id(v) for v in units[j].variables}
                   and signature is not None and _signature(units[j]) == signature):
                ids |= {id(v) for v in units[j].variables}
                j += 1
        if j - i >= 2:
            first, last = units[i].name, units[j - 1].name
            a = re.fullmatch(r"(.*)_block(\d+)", first)
            b = re.fullmatch(r"(.*)_block(\d+)", last)
            if a and b and a[1] == b[1] and int(b[2]) - int(a[2]) == j - i - 1:
                template, name = f"{a[1]}_block", f"{a[1]}_blocks{a[2]}to{b[2]}"
            else:
                template, name = first, f"{first}_stack"
            out.append(ReversibleBlockStack(_copy(unit, template), depth=j - i, name=name))
        else:  # a unit used twice stays one layer
            if id(unit) not in copies:
                copies[id(unit)] = _copy(unit)
            out.append(copies[id(unit)])
        ends += [len(out) - 1] * (j - i)
        i = j
    return out, ends


def _saved(model):
    """Ids of the variables a weights file or `get_weights()` holds: `model.weights` (Keras leaves out
    the seed-generator states of `variables`; a stack's stacked states are ordinary weights)."""
    return {id(w) for w in model.weights}


def _h5_entries(path):
    """`{entry: shape}` of the datasets of a `.weights.h5` file under its `layers/` group."""
    entries = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: entries.__setitem__(name, tuple(obj.shape))
            if isinstance(obj, h5py.Dataset) and name.startswith("layers/") else None
        )
    return entries


def _transfer_file(path, target):
    """A `.weights.h5` file: loaded into the layout whose entries it holds, then transferred."""
    if not os.path.isfile(path):
        raise ValueError(f"`source` must be an existing `.weights.h5` file. Received: source={path!r}")
    entries = _h5_entries(path)
    tried = []
    scratch = tempfile.mkdtemp()
    try:
        for label, build in _candidates(target):
            model = target if build is None else build()
            own = os.path.join(scratch, f"{len(tried)}.weights.h5")
            model.save_weights(own)
            expected = _h5_entries(own)
            if expected == entries:
                if model is target:
                    model.load_weights(path)
                    return
                with warnings.catch_warnings():
                    # A clone of a compiled target is compiled too; the optimizer state of the other
                    # layout does not fit it, and is not converted.
                    warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                    model.load_weights(path)
                _transfer(model, target, only=_saved(model))
                return
            tried.append((label, expected))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def first_difference(expected):
        for name in sorted(set(expected) | set(entries)):
            if expected.get(name) != entries.get(name):
                return name, entries.get(name), expected.get(name)

    label, expected = min(
        tried, key=lambda c: len(set(c[1].items()) ^ set(entries.items()))
    )
    name, in_file, in_model = first_difference(expected)
    raise ValueError(
        f"transfer_weights cannot map the weights in '{path}' onto model '{target.name}': the file "
        f"fits neither {' nor '.join(lab for lab, _ in tried)}; for the closest, {label}, entry "
        f"'{name}' is {_shape_or_missing(in_file)} in the file and {_shape_or_missing(in_model)} in "
        f"the model; {_ADVICE}."
    )


def _shape_or_missing(shape):
    return "absent" if shape is None else f"of shape {shape}"


def _transfer_list(arrays, target):
    """A `get_weights()` list: set on the layout whose weights it fits, then transferred."""
    tried = []
    for label, build in _candidates(target):
        model = target if build is None else build()
        weights = model.weights
        shapes = [tuple(w.shape) for w in weights]
        if shapes == [a.shape for a in arrays]:
            if model is target:
                target.set_weights(arrays)
            else:
                model.set_weights(arrays)
                _transfer(model, target, only=_saved(model))
            return
        tried.append((label, model, shapes))
    # The closest layout: the longest run of matching shapes; name the layer of the first mismatch.
    label, model, shapes = max(tried, key=lambda c: _common_prefix(c[2], [a.shape for a in arrays]))
    k = _common_prefix(shapes, [a.shape for a in arrays])
    owners = {id(v): _owner(slot.layer) for slot in _slots(model) for v, _ in slot.refs}
    where = (f"array {k} (shape {arrays[k].shape}) meets {owners.get(id(model.weights[k]), '?')}, "
             f"which expects shape {shapes[k]}" if k < min(len(shapes), len(arrays)) else
             f"the list holds {len(arrays)} arrays and the model {len(shapes)} weights")
    raise ValueError(
        f"transfer_weights cannot map a list of {len(arrays)} arrays onto model '{target.name}': it "
        f"fits neither {' nor '.join(lab for lab, _, _ in tried)}; for the closest, {label}, {where}; "
        f"{_ADVICE}."
    )


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if tuple(x) != tuple(y):
            break
        n += 1
    return n
