"""The scope in which the reversible engine reads Keras variables as their own dtype.

Backend-neutral Keras state (the autocast scope): the layers, both backend modules, `footprint` and
`diagnostics` use it. Not public API.
"""

import contextlib


@contextlib.contextmanager
def no_autocast():
    """A scope in which Keras variables read as their own dtype (float32 under mixed precision).

    `Layer.__call__` of a layer whose compute and variable dtypes differ enters an autocast scope even
    with `autocast=False`; the reversible engine reads and maps the master weights. The scope is cleared,
    not replaced by `AutocastScope(None)`: under that, `Variable.dtype` reports `floatx()` and
    `keras.StatelessScope` would cast mapped float64 weights to float32, cutting their gradients.
    Sublayers called inside still open their own autocast scopes.
    """
    # Keras has no public way to leave the autocast scope that `Layer.__call__` entered.
    from keras.src.backend.common import global_state

    previous = global_state.get_global_attribute("autocast_scope")
    global_state.set_global_attribute("autocast_scope", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("autocast_scope", previous)
