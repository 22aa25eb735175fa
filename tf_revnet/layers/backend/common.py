"""What both backend modules share (no backend's ops): cutting flat argument lists per unit."""


def split(items, sizes):
    """`items` cut into consecutive tuples of `sizes` (a custom gradient's flat inputs, per unit)."""
    out, start = [], 0
    for size in sizes:
        out.append(tuple(items[start:start + size]))
        start += size
    return out
