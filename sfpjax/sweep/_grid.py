"""Grids of sweep points: named parameter columns, a cartesian product or an explicit table.

A `Grid` is the pure algebra of a sweep: which points there are, in which order, and the
parameter values of any slice of them, computed on demand. It knows nothing of files or
devices; `grid_spec` and `grid_from_spec` turn it into the JSON record a sweep folder
keeps and back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import ArrayLike

__all__ = ["Grid", "grid", "points"]

# The column of a sweep table that holds each point's position in its grid.
INDEX = "index"
# Axis values: anything np.asarray turns into a 1-D numeric array (lists included).
AxisValues = ArrayLike | Sequence[bool | int | float]


# --------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------


def _axis_values(name: str, values: Any) -> np.ndarray:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Grid axis names must be Python identifiers, got {name!r}.")
    if name == INDEX:
        raise ValueError(f"{INDEX!r} is reserved for the grid index column; rename the axis.")
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(
            f"Grid axis {name!r} must be one-dimensional (a list of scalars), got shape {arr.shape}."
        )
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"Grid axis {name!r} must hold bools, integers or floats, got dtype {arr.dtype}; "
            "encode categories as integer codes."
        )
    if arr.size == 0:
        raise ValueError(f"Empty grid: axis {name!r} has no values.")
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """The points of a sweep: named parameter columns, one entry per point.

    Build with `grid` (cartesian product of axes) or `points` (an explicit table). A
    cartesian grid is never materialized: `columns` computes the rows of any slice on
    demand, so a grid of 10^9 points costs nothing until its chunks are evaluated.
    Point ``i`` of a cartesian grid enumerates the axes like ``itertools.product`` (the
    last axis varies fastest).

    Attributes:
        names: the parameter names, in column order.
        kind: ``"cartesian"`` or ``"points"``.
        values: for ``"cartesian"``, each axis's values; for ``"points"``, each column.
    """

    kind: str
    values: dict[str, np.ndarray]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def shape(self) -> tuple[int, ...]:
        """Axis lengths of a cartesian grid; ``(num_points,)`` for a table of points."""
        if self.kind == "cartesian":
            return tuple(len(v) for v in self.values.values())
        return (len(next(iter(self.values.values()))),)

    def __len__(self) -> int:
        return math.prod(self.shape)

    def columns(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Parameter columns of points ``start .. stop-1`` (all points by default)."""
        n = len(self)
        stop = n if stop is None else min(stop, n)
        if self.kind == "points":
            return {k: v[start:stop] for k, v in self.values.items()}
        flat = np.arange(start, stop, dtype=np.int64)
        idx = np.unravel_index(flat, self.shape)
        return {k: v[i] for (k, v), i in zip(self.values.items(), idx, strict=True)}

    def point(self, i: int) -> dict[str, Any]:
        """Point ``i`` as a dict of Python scalars."""
        if not 0 <= i < len(self):
            raise ValueError(f"Point index {i} is outside the grid of {len(self)} points.")
        return {k: v[0].item() for k, v in self.columns(i, i + 1).items()}

    def __repr__(self) -> str:
        return f"Grid(kind={self.kind!r}, names={self.names}, num_points={len(self)})"


def grid(**axes: AxisValues) -> Grid:
    """The cartesian product of named axes, each a 1-D list of values.

    Args:
        **axes: ``name=values``; a scalar is an axis of one value. A ``seed`` axis makes
            replicates: ``fn`` can build ``jax.random.key(point["seed"])``.

    Points are ordered like ``itertools.product`` over the axes in the order given.

    >>> import sfpjax
    >>> g = sfpjax.grid(x=[0.1, 0.15], a=[0.5, 0.6, 0.7], seed=[0, 1])
    >>> len(g), g.point(1)
    (12, {'x': 0.1, 'a': 0.5, 'seed': 1})
    """
    if not axes:
        raise ValueError("Empty grid: pass at least one axis, e.g. grid(x=[0.1, 0.2]).")
    return Grid("cartesian", {name: _axis_values(name, v) for name, v in axes.items()})


def points(table: Sequence[Mapping[str, Any]] | Mapping[str, AxisValues]) -> Grid:
    """An explicit list of points: a list of dicts, or a mapping of equal-length columns.

    Args:
        table: ``[{"x": 0.1, "a": 0.6}, {"x": 0.2, "a": 0.5}]`` or
            ``{"x": [0.1, 0.2], "a": [0.6, 0.5]}``; every point has the same names.

    >>> import sfpjax
    >>> g = sfpjax.points([{"x": 0.1, "a": 0.6}, {"x": 0.2, "a": 0.5}])
    >>> len(g), g.point(1)
    (2, {'x': 0.2, 'a': 0.5})
    """
    if isinstance(table, Mapping):
        cols = dict(table)
    else:
        rows = list(table)
        if not rows:
            raise ValueError("Empty grid: the list of points is empty.")
        names = list(rows[0])
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"Point {i} must be a dict of parameter values, got {type(row).__name__}.")
            if list(row) != names and set(row) != set(names):
                raise ValueError(
                    f"Point {i} has parameters {sorted(row)}, but point 0 has {sorted(names)}; "
                    "every point needs the same names."
                )
        cols = {k: [row[k] for row in rows] for k in names}
    if not cols:
        raise ValueError("Empty grid: the table has no columns.")
    arrays = {name: _axis_values(name, v) for name, v in cols.items()}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"All columns of a table of points must have the same length, got {lengths}.")
    return Grid("points", arrays)



def grid_spec(g: Grid) -> dict[str, Any]:
    """The JSON record of ``g``; `grid_from_spec` rebuilds an equal grid from it."""
    # A list keeps axis order, which fixes the point order; JSON floats round-trip exactly.
    return {"kind": g.kind, "axes": [[k, v.dtype.str, v.tolist()] for k, v in g.values.items()]}


def grid_from_spec(spec: Mapping[str, Any]) -> Grid:
    """The grid whose `grid_spec` is ``spec``."""
    return Grid(spec["kind"], {k: np.asarray(v, dtype=np.dtype(dt)) for k, dt, v in spec["axes"]})


def _values_text(v: np.ndarray, limit: int = 8) -> str:
    items = v.tolist()
    shown = ", ".join(map(repr, items[:limit]))
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} values)"


def grid_differences(recorded: Grid, given: Grid) -> list[str]:
    """How ``given`` differs from ``recorded``, one line per difference, with the values.

    Used where a sweep folder holds another grid than the one passed, so the message shows
    what differs (kind, axis names and order, dtypes, lengths, the first differing values)
    rather than two descriptions that can read the same.
    """
    out = []
    if recorded.kind != given.kind:
        out.append(f"grid kind: recorded {recorded.kind!r}, given {given.kind!r}")
    if recorded.names != given.names:
        out.append(f"grid axes: recorded {list(recorded.names)}, given {list(given.names)}")
    for name in (n for n in recorded.names if n in given.values):
        a, b = recorded.values[name], given.values[name]
        if a.dtype != b.dtype:
            out.append(f"axis {name!r} dtype: recorded {a.dtype}, given {b.dtype}")
        if a.shape != b.shape:
            out.append(f"axis {name!r}: recorded {_values_text(a)}, given {_values_text(b)}")
            continue
        differ = np.flatnonzero(a != b)
        if differ.size:
            pairs = "; ".join(f"[{i}] recorded {a[i].item()!r}, given {b[i].item()!r}" for i in differ[:5])
            more = f" (and {differ.size - 5} more)" if differ.size > 5 else ""
            out.append(f"axis {name!r} differs at {differ.size} of {a.size} values: {pairs}{more}")
    return out
