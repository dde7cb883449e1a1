"""Sweeps over process parameters: one compiled, vmapped program, sharded, chunked, resumable.

A sweep evaluates a pure per-point function ``fn(point) -> {metric: array}`` at every
point of a grid. ``point`` is a dict of scalars, one per grid axis (for example the
``x`` and ``a`` of ``mess3(x, a)``, or a ``seed``), plus ``point["key"]`` when a base
``key`` is given: ``fold_in(key, i)`` with ``i`` the point's global index in the grid, so
every point draws the same numbers however the grid is chunked, sharded or resumed.

The engine stacks points along a leading axis and runs ``jax.jit(jax.vmap(fn))`` with that
axis sharded over a one-dimensional ``Mesh`` of the local devices. Points go through in
chunks; each finished chunk is written to disk at once (CSV rows for scalar metrics, an
``.npz`` for array metrics) with atomic writes, so a sweep that is killed resumes where it
stopped and a crash never damages finished chunks.

On-disk layout of ``out_dir``::

    manifest.json            grid, key, chunk size, metric shapes, fingerprint
    chunks/chunk_000000.csv  one row per point of chunk 0: index, parameters, scalar metrics
    chunks/chunk_000000.npz  array metrics of chunk 0 (only if fn returns any)
    results.csv              all rows in grid order, written once every chunk is done
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._io import atomic_write, key_parts, sha256_json

__all__ = ["Grid", "SweepResult", "grid", "load_sweep", "points", "run_sweep"]

_FORMAT = "sfpjax-sweep"
_VERSION = 1
_INDEX = "index"
_KEY = "key"
_DEFAULT_CHUNK = 4096
# Points per device in the probe program whose compiled memory analysis sizes chunks.
_PROBE_PER_DEVICE = 8
_TABLE_KINDS = "biuf"
_RECOMPUTE = (
    "delete it (and results.csv, if the damaged file is a chunk) and run the sweep again to "
    "recompute the missing chunks."
)
# Axis values: anything np.asarray turns into a 1-D numeric array (lists included).
AxisValues = ArrayLike | Sequence[bool | int | float]


# --------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------


def _axis_values(name: str, values: Any) -> np.ndarray:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Grid axis names must be Python identifiers, got {name!r}.")
    if name == _INDEX:
        raise ValueError(f"{_INDEX!r} is reserved for the grid index column; rename the axis.")
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

    def _spec(self) -> dict[str, Any]:
        # A list keeps axis order, which fixes the point order; JSON floats round-trip exactly.
        return {
            "kind": self.kind,
            "axes": [[k, v.dtype.str, v.tolist()] for k, v in self.values.items()],
        }

    @classmethod
    def _from_spec(cls, spec: Mapping[str, Any]) -> Grid:
        return cls(spec["kind"], {k: np.asarray(v, dtype=np.dtype(dt)) for k, dt, v in spec["axes"]})

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


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class _ChunkedArrays(Mapping):
    """Array metrics, merged in grid order from the per-chunk ``.npz`` files on first access."""

    def __init__(self, chunk_files: Sequence[str], specs: Mapping[str, Mapping[str, Any]]):
        self._files = list(chunk_files)
        self._specs = dict(specs)
        self._loaded: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._specs:
            raise KeyError(name)
        if name not in self._loaded:
            spec = self._specs[name]
            parts = []
            for f in self._files:
                with np.load(f) as z:
                    parts.append(z[name])
            empty = np.zeros((0, *spec["shape"]), np.dtype(spec["dtype"]))
            self._loaded[name] = np.concatenate(parts, axis=0) if parts else empty
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


@dataclasses.dataclass(frozen=True, eq=False)
class SweepResult:
    """A sweep read back from its folder.

    Attributes:
        path: the sweep folder.
        grid: the `Grid` that was swept.
        table: column name -> 1-D NumPy array, one entry per finished point in grid order:
            ``index`` (the point's position in the grid), every parameter, every scalar
            metric.
        arrays: metric name -> NumPy array ``(num_finished_points, *metric_shape)``, rows
            aligned with `table`; read from the chunk files on first access.
        complete: whether every chunk has finished. A folder still being swept (or whose
            run was killed) loads with the finished chunks only.
        chunk_size: points per chunk.
    """

    path: str
    grid: Grid
    table: dict[str, np.ndarray]
    arrays: Mapping[str, np.ndarray]
    complete: bool
    chunk_size: int

    def __len__(self) -> int:
        return len(self.table[_INDEX])

    def __repr__(self) -> str:
        return (
            f"SweepResult(path={self.path!r}, rows={len(self)}/{len(self.grid)}, "
            f"columns={list(self.table)}, arrays={list(self.arrays)}, complete={self.complete})"
        )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _format_column(column: np.ndarray) -> list[str]:
    """Each value as its shortest string that reads back to the same value."""
    if column.dtype.kind == "b":
        return ["True" if v else "False" for v in column.tolist()]
    if column.dtype == np.float64 or column.dtype.kind in "iu":
        # repr of a Python float is its shortest round-trip form; ints print exactly.
        return list(map(repr, column.tolist()))
    # str of a NumPy float32/float16 scalar is its shortest round-trip form at that precision.
    return list(map(str, column))


def _parse(values: Sequence[str], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "b":
        return np.asarray([v == "True" for v in values], dtype=bool)
    if dtype.kind == "f":
        return np.asarray(list(map(float, values)), dtype=np.float64).astype(dtype)
    return np.asarray(list(map(int, values)), dtype=dtype)


def _csv_text(header: Sequence[str], columns: Sequence[np.ndarray]) -> str:
    # Names are identifiers and values are numbers, so no field needs CSV quoting.
    rows = map(",".join, zip(*map(_format_column, columns), strict=True))
    return "\n".join([",".join(header), *rows]) + "\n"


def _read_csv(path: str, columns: Sequence[str], num_rows: int) -> list[list[str]]:
    """The rows of a table file, checked against the header and row count it must have."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} cannot be read ({e}); {_RECOMPUTE}") from e
    if not lines or lines[0] != ",".join(columns):
        raise ValueError(
            f"{path!r} does not start with the header {','.join(columns)!r}; the file is damaged: {_RECOMPUTE}"
        )
    if len(lines) - 1 != num_rows:
        raise ValueError(f"{path!r} has {len(lines) - 1} rows, expected {num_rows}; the file is damaged: {_RECOMPUTE}")
    rows = [line.split(",") for line in lines[1:]]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"{path!r} line {i + 2} has {len(row)} fields, expected {len(columns)}; the file is "
                f"damaged: {_RECOMPUTE}"
            )
    return rows


class _Layout:
    def __init__(self, out_dir: str, num_chunks: int):
        self.root = out_dir
        self.chunks = os.path.join(out_dir, "chunks")
        self.manifest = os.path.join(out_dir, "manifest.json")
        self.results = os.path.join(out_dir, "results.csv")
        self.num_chunks = num_chunks

    def chunk_csv(self, c: int) -> str:
        return os.path.join(self.chunks, f"chunk_{c:06d}.csv")

    def chunk_npz(self, c: int) -> str:
        return os.path.join(self.chunks, f"chunk_{c:06d}.npz")

    def done(self, c: int) -> bool:
        # The CSV is written after the .npz, so its presence means the chunk is complete.
        return os.path.exists(self.chunk_csv(c))


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


def _key_spec(key: Any) -> dict[str, Any] | None:
    if key is None:
        return None
    data, impl = key_parts(key)
    return {"impl": impl or "raw", "data": data.tolist()}


def _fingerprint(grid_spec: Mapping[str, Any], key_spec: Any) -> str:
    return sha256_json({"grid": grid_spec, "key": key_spec})


def _read_manifest(path: str) -> dict[str, Any]:
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an sfpjax sweep manifest.")
    return manifest


def _check_manifest(old: Mapping[str, Any], new: Mapping[str, Any], out_dir: str) -> None:
    if old["fingerprint"] != new["fingerprint"]:
        what = []
        if old["grid"] != new["grid"]:
            what.append(f"grid (recorded: {Grid._from_spec(old['grid'])}, given: {Grid._from_spec(new['grid'])})")
        if old["key"] != new["key"]:
            what.append(f"key (recorded: {old['key']}, given: {new['key']})")
        raise ValueError(
            f"out_dir {out_dir!r} holds a different sweep: its {' and '.join(what) or 'config'} "
            "differs from this call. Use a new out_dir, or pass the same grid and key to resume."
        )
    if old["metrics"] != new["metrics"]:
        raise ValueError(
            f"out_dir {out_dir!r} holds a sweep whose metrics were {old['metrics']}, but fn now "
            f"returns {new['metrics']}. Use a new out_dir for a changed fn."
        )


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def _device_params(cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Canonical dtypes up front: float64 grid values become float32 unless x64 is on.
    return {k: np.asarray(v, dtype=jax.dtypes.canonicalize_dtype(v.dtype)) for k, v in cols.items()}


def _batched(fn: Callable, with_key: bool) -> Callable:
    def one(base_key, index, params):
        point = dict(params)
        if with_key:
            point[_KEY] = jax.random.fold_in(base_key, index)
        return fn(point)

    return jax.vmap(one, in_axes=(None, 0, 0))


def _evaluate(fn: Callable, with_key: bool, base_key, index, params):
    return _batched(fn, with_key)(base_key, index, params)


def _metric_specs(fn: Callable, key: Any, grid: Grid) -> dict[str, dict[str, Any]]:
    params = tuple((k, v.dtype) for k, v in _device_params(grid.columns(0, 1)).items())
    key_struct = None if key is None else jax.ShapeDtypeStruct(jnp.shape(key), jnp.asarray(key).dtype)
    specs = _traced_metric_specs(fn, key_struct, params, bool(jax.config.jax_enable_x64))
    return {name: {"shape": list(s["shape"]), "dtype": s["dtype"]} for name, s in specs.items()}


@functools.lru_cache(maxsize=8)  # small: an entry keeps fn, and what it closes over, alive
def _traced_metric_specs(
    fn: Callable,
    key: jax.ShapeDtypeStruct | None,
    param_dtypes: tuple[tuple[str, np.dtype], ...],
    x64: bool,  # part of the cache key: the traced dtypes depend on it
) -> dict[str, dict[str, Any]]:
    # Cached like jit's own trace cache: the same fn over the same parameter dtypes is
    # traced once, however often it is swept.
    params = {k: jax.ShapeDtypeStruct((1,), dtype) for k, dtype in param_dtypes}
    names = tuple(params)
    index = jax.ShapeDtypeStruct((1,), jnp.int32)
    order: list[Any] = []

    def recording(point):
        out = fn(point)
        # Pytrees sort dict keys; the table keeps the order in which fn lists its metrics.
        if isinstance(out, dict):
            order.extend(out)
        return out

    try:
        out = jax.eval_shape(_batched(recording, key is not None), key, index, params)
    except TypeError as e:
        raise ValueError(
            f"fn must return a dict mapping metric names to arrays; tracing it failed with: {e}"
        ) from e
    if not isinstance(out, dict):
        raise ValueError(
            f"fn must return a dict mapping metric names to arrays, got {type(out).__name__}."
        )
    if not out:
        raise ValueError("fn returned an empty dict; return at least one metric.")
    specs = {}
    for name in order:
        leaf = out[name]
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Metric names must be Python identifiers, got {name!r}.")
        if name in names or name in (_INDEX, _KEY):
            raise ValueError(f"Metric {name!r} clashes with a parameter or reserved column; rename it.")
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(
                f"Metric {name!r} must be one array per point (a scalar or an array), got a "
                f"{type(leaf).__name__}; flatten nested metrics into separate names."
            )
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise ValueError(f"Metric {name!r} is a PRNG key; return jax.random.key_data(...) instead.")
        if leaf.shape[:1] != (1,):
            raise ValueError(f"Metric {name!r} has inconsistent leading shape {leaf.shape} under vmap.")
        specs[name] = {"shape": list(leaf.shape[1:]), "dtype": np.dtype(leaf.dtype).str}
    return specs


def _is_table_metric(spec: Mapping[str, Any]) -> bool:
    return not spec["shape"] and np.dtype(spec["dtype"]).kind in _TABLE_KINDS


def _per_point_bytes(lower: Callable, key: Any, grid: Grid, specs: Mapping, n_dev: int, sharding) -> int:
    """Bytes one point needs on a device: max of its I/O and the compiled working set per point."""
    io_bytes = sum(np.dtype(v.dtype).itemsize for v in _device_params(grid.columns(0, 1)).values()) + 4
    io_bytes += sum(math.prod(s["shape"]) * np.dtype(s["dtype"]).itemsize for s in specs.values())
    probe = _PROBE_PER_DEVICE * n_dev
    params = {
        k: jax.ShapeDtypeStruct((probe,), v.dtype, sharding=sharding)
        for k, v in _device_params(grid.columns(0, 1)).items()
    }
    index = jax.ShapeDtypeStruct((probe,), jnp.int32, sharding=sharding)
    try:
        stats = lower(key, index, params).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - backends without memory analysis fall back to I/O sizes.
        stats = None
    if stats is None:
        return io_bytes
    # The outputs count twice: the previous chunk's are still held while its files are
    # written and this chunk runs.
    total = (
        stats.argument_size_in_bytes
        + 2 * stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return max(io_bytes, math.ceil(total / _PROBE_PER_DEVICE))


def _my_chunks(num_chunks: int, process_index: int, process_count: int) -> list[int]:
    return list(range(process_index, num_chunks, process_count))


def _write_chunk(
    layout: _Layout,
    c: int,
    header: Sequence[str],
    columns: Sequence[np.ndarray],
    arrays: Mapping[str, np.ndarray],
) -> None:
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(layout.chunk_npz(c), buf.getvalue())
    atomic_write(layout.chunk_csv(c), _csv_text(header, columns).encode())


def _chunk_rows(manifest: Mapping[str, Any], c: int) -> int:
    size = manifest["chunk_size"]
    return min((c + 1) * size, manifest["num_points"]) - c * size


def _assemble(layout: _Layout, manifest: Mapping[str, Any]) -> None:
    header = ",".join(manifest["columns"]) + "\n"
    pieces = [header]
    for c in range(layout.num_chunks):
        path = layout.chunk_csv(c)
        with open(path) as f:
            text = f.read()
        # The rows are copied byte for byte, after a check that the chunk is whole.
        if not text.startswith(header) or text.count("\n") != _chunk_rows(manifest, c) + 1:
            raise ValueError(f"{path!r} is not a whole chunk of this sweep; the file is damaged: {_RECOMPUTE}")
        pieces.append(text[len(header):])
    atomic_write(layout.results, "".join(pieces).encode())


def _load(out_dir: str, manifest: Mapping[str, Any], table: dict[str, np.ndarray] | None = None) -> SweepResult:
    """The sweep in ``out_dir``; ``table``, when given, is its whole table, already in memory."""
    g = Grid._from_spec(manifest["grid"])
    layout = _Layout(out_dir, manifest["num_chunks"])
    specs = manifest["metrics"]
    complete = os.path.exists(layout.results)
    header = manifest["columns"]
    if table is not None:
        finished = list(range(layout.num_chunks))
    elif complete:
        finished = list(range(layout.num_chunks))
        rows = _read_csv(layout.results, header, manifest["num_points"])
    else:
        finished = [c for c in range(layout.num_chunks) if layout.done(c)]
        rows = []
        for c in finished:
            rows.extend(_read_csv(layout.chunk_csv(c), header, _chunk_rows(manifest, c)))
    if table is None:
        dtypes = {_INDEX: np.dtype(np.int64)}
        dtypes.update({k: v.dtype for k, v in g.values.items()})
        dtypes.update({k: np.dtype(s["dtype"]) for k, s in specs.items() if _is_table_metric(s)})
        transposed = list(zip(*rows, strict=True)) if rows else [()] * len(header)
        try:
            table = {name: _parse(col, dtypes[name]) for name, col in zip(header, transposed, strict=True)}
        except ValueError as e:
            raise ValueError(
                f"The table files in {out_dir!r} hold a value that is not a number ({e}): a file "
                "is damaged; delete results.csv and the damaged chunks/chunk_*.csv, then run the "
                "sweep again to recompute them."
            ) from e
    array_specs = {k: s for k, s in specs.items() if not _is_table_metric(s)}
    npz = [layout.chunk_npz(c) for c in finished] if array_specs else []
    return SweepResult(
        path=out_dir,
        grid=g,
        table=table,
        arrays=_ChunkedArrays(npz, array_specs),
        complete=complete,
        chunk_size=manifest["chunk_size"],
    )


def load_sweep(out_dir: str | os.PathLike) -> SweepResult:
    """Read a sweep folder written by `run_sweep`, finished or not.

    Args:
        out_dir: the folder given to `run_sweep`.

    A folder whose sweep is still running or was killed loads the finished chunks only
    (``result.complete`` is then ``False``).

    >>> import tempfile, jax.numpy as jnp, sfpjax
    >>> d = tempfile.mkdtemp()
    >>> _ = sfpjax.run_sweep(lambda p: {"y": p["x"] ** 2}, sfpjax.grid(x=[1.0, 2.0]), out_dir=d, progress=False)
    >>> sfpjax.load_sweep(d).table["y"]
    array([1., 4.], dtype=float32)
    """
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(path):
        raise ValueError(f"{out_dir!r} holds no sweep (no manifest.json); run run_sweep into it first.")
    return _load(out_dir, _read_manifest(path))


def _real_multihost(process_count: int) -> bool:
    return jax.process_count() > 1 and process_count == jax.process_count()


def run_sweep(
    fn: Callable[[dict[str, Array]], dict[str, Array]],
    grid: Grid,
    *,
    out_dir: str | os.PathLike,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> SweepResult:
    """Evaluate ``fn`` at every point of ``grid`` as one vmapped, sharded, resumable program.

    Args:
        fn: pure per-point function ``fn(point) -> {metric_name: array}``. ``point`` maps
            each grid axis to a scalar array (and ``"key"`` to the point's PRNG key when
            ``key`` is given). Scalar metrics of bool/int/float dtype become table columns;
            any other metric (arrays, complex scalars) is stored in per-chunk ``.npz``
            files and returned merged in `SweepResult.arrays`. ``fn`` is traced once
            under ``jax.vmap``: write it as for one point, with ``jnp``, not Python
            branching on parameter values.
        grid: the points, from `grid` or `points`.
        out_dir: folder for the manifest, chunk files and ``results.csv``. Running again
            into the same folder resumes: finished chunks are skipped. A folder holding a
            different sweep (other grid or key) raises ``ValueError``.
        key: base PRNG key; point ``i`` gets ``jax.random.fold_in(key, i)``, independent
            of chunking, device count and restarts.
        chunk_size: points evaluated per compiled call (default ``min(num_points, 4096)``).
            Each chunk is padded to a multiple of the device count; padded points repeat a
            real point and are dropped.
        memory_budget_bytes: instead of ``chunk_size``, the device memory one chunk may
            use on each device. The per-point cost is the larger of the point's inputs and
            outputs (``jax.eval_shape``) and the compiled program's
            ``argument + 2 output + temp - alias`` bytes (``memory_analysis()``; outputs
            twice because a chunk runs while the previous chunk's outputs are written) for
            a probe of 8 points per device, divided by 8 (conservative: fixed costs are
            counted per point). Then ``chunk_size = num_devices * floor(budget / per_point)``.
        devices: devices to shard over (default: all local devices).
        progress: show a tqdm bar over this process's chunks, with points per second.
        process_index, process_count: this process's share of a multi-host sweep; chunk
            ``c`` is evaluated by process ``c % process_count``. Default to
            ``jax.process_index()`` and ``jax.process_count()`` (after
            ``jax.distributed.initialize()``). ``out_dir`` must be on a filesystem that
            every host sees.

    Returns:
        The `SweepResult` read back from ``out_dir``. Process 0 writes ``results.csv``
        once all chunks exist. Under ``jax.distributed``, every process waits for the
        others and returns the complete result; with ``process_count`` given by hand and
        no distributed runtime, a process returns whatever chunks are finished so far
        (``result.complete`` tells).

    Resuming: the chunk size recorded in ``out_dir`` is reused (a different explicit
    ``chunk_size`` raises ``ValueError``), so a restarted sweep writes exactly the same
    table as an uninterrupted one.

    >>> import tempfile, jax, jax.numpy as jnp, sfpjax
    >>> def fn(p):
    ...     noise = jax.random.normal(p["key"], (3,))
    ...     return {"loss": p["x"] * p["seed"], "noise": noise}
    >>> res = sfpjax.run_sweep(fn, sfpjax.grid(x=[0.5, 1.0], seed=[0, 1, 2]),
    ...                        out_dir=tempfile.mkdtemp(), key=jax.random.key(0), progress=False)
    >>> res.table["loss"].tolist(), res.arrays["noise"].shape
    ([0.0, 0.5, 1.0, 0.0, 1.0, 2.0], (6, 3))
    """
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a Grid from sfpjax.grid(...) or sfpjax.points(...), got {type(grid).__name__}.")
    if not callable(fn):
        raise ValueError(f"fn must be a callable fn(point) -> dict of metrics, got {type(fn).__name__}.")
    if chunk_size is not None and memory_budget_bytes is not None:
        raise ValueError("Pass chunk_size or memory_budget_bytes, not both.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    if memory_budget_bytes is not None and memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}.")
    if key is not None and _KEY in grid.names:
        raise ValueError(f"The grid has an axis named {_KEY!r}, which clashes with the per-point key; rename it.")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}."
        )
    out_dir = os.fspath(out_dir)
    n = len(grid)

    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device or leave it as None.")
    n_dev = len(devices)
    mesh = Mesh(np.asarray(devices, dtype=object), ("points",))
    sharded = NamedSharding(mesh, PartitionSpec("points"))
    replicated = NamedSharding(mesh, PartitionSpec())

    specs = _metric_specs(fn, key, grid)
    # fn is a static argument so that jax's compilation cache serves a resumed or repeated
    # sweep of the same fn without compiling again.
    compiled = jax.jit(
        _evaluate, static_argnums=(0, 1),
        in_shardings=(replicated, sharded, sharded), out_shardings=sharded,
    )
    jitted = functools.partial(compiled, fn, key is not None)
    lower = functools.partial(compiled.lower, fn, key is not None)

    grid_spec, key_spec = grid._spec(), _key_spec(key)
    table_metrics = [k for k, s in specs.items() if _is_table_metric(s)]
    array_metrics = [k for k, s in specs.items() if not _is_table_metric(s)]
    header = [_INDEX, *grid.names, *table_metrics]
    new = {
        "format": _FORMAT,
        "version": _VERSION,
        "fingerprint": _fingerprint(grid_spec, key_spec),
        "grid": grid_spec,
        "key": key_spec,
        "num_points": n,
        "metrics": specs,
        "columns": header,
    }

    def resolve() -> dict[str, Any]:
        return _resolve_manifest(
            out_dir, new, chunk_size, memory_budget_bytes, process_count,
            lambda: _per_point_bytes(lower, key, grid, specs, n_dev, sharded),
            n_dev,
        )

    multihost = _real_multihost(process_count)
    if multihost:
        from jax.experimental import multihost_utils

        # Process 0 fixes the chunk layout (its devices size the memory budget); the
        # others read it back, so every host agrees on which points form chunk c.
        manifest = resolve() if process_index == 0 else None
        multihost_utils.sync_global_devices(f"sfpjax_sweep_manifest_{new['fingerprint'][:16]}")
        if manifest is None:
            manifest = resolve()
    else:
        manifest = resolve()
    chunk_size, num_chunks = manifest["chunk_size"], manifest["num_chunks"]
    layout = _Layout(out_dir, num_chunks)

    computed: dict[int, list[np.ndarray]] = {}
    todo = [c for c in _my_chunks(num_chunks, process_index, process_count) if not layout.done(c)]
    if todo and not os.path.exists(layout.results):
        padded = -(-chunk_size // n_dev) * n_dev
        computed = _run_chunks(jitted, key, grid, layout, todo, chunk_size, padded, header,
                               table_metrics, array_metrics, sharded, replicated, progress)

    if multihost:
        multihost_utils.sync_global_devices(f"sfpjax_sweep_chunks_{manifest['fingerprint'][:16]}")
    if process_index == 0 and not os.path.exists(layout.results):
        missing = [c for c in range(num_chunks) if not layout.done(c)]
        if not missing:
            _assemble(layout, manifest)
        elif multihost:
            raise ValueError(
                f"After all processes finished, chunks {missing[:8]} are missing from {out_dir!r}: "
                "out_dir must be on a filesystem shared by every host."
            )
    if multihost:
        multihost_utils.sync_global_devices(f"sfpjax_sweep_table_{manifest['fingerprint'][:16]}")
    if len(computed) == num_chunks and os.path.exists(layout.results):
        # Every chunk was computed here: the table is in memory, equal to what the files
        # read back as (the text round-trips exactly), so it is not parsed again.
        table = {name: np.concatenate([computed[c][i] for c in range(num_chunks)])
                 for i, name in enumerate(header)}
        return _load(out_dir, manifest, table)
    return _load(out_dir, manifest)


def _resolve_manifest(
    out_dir: str,
    new: Mapping[str, Any],
    chunk_size: int | None,
    memory_budget_bytes: int | None,
    process_count: int,
    per_point_bytes: Callable[[], int],
    n_dev: int,
) -> dict[str, Any]:
    """Validate the manifest in ``out_dir`` against this call, or write a new one."""
    path = os.path.join(out_dir, "manifest.json")
    chunks = os.path.join(out_dir, "chunks")
    n = new["num_points"]
    if os.path.exists(path):
        old = _read_manifest(path)
        _check_manifest(old, new, out_dir)
        if chunk_size is not None and chunk_size != old["chunk_size"]:
            raise ValueError(
                f"out_dir {out_dir!r} was started with chunk_size={old['chunk_size']}, got "
                f"chunk_size={chunk_size}; pass chunk_size={old['chunk_size']} or None to resume."
            )
        os.makedirs(chunks, exist_ok=True)
        if process_count == 1:
            # Leftovers of writes interrupted by a kill; with one process none is in flight.
            for name in os.listdir(chunks):
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(os.path.join(chunks, name))
        return old
    if chunk_size is None:
        if memory_budget_bytes is None:
            chunk_size = _DEFAULT_CHUNK
        else:
            per_point = per_point_bytes()
            per_device = memory_budget_bytes // per_point
            if per_device < 1:
                raise ValueError(
                    f"memory_budget_bytes={memory_budget_bytes} is smaller than one point's "
                    f"working set ({per_point} bytes); raise the budget."
                )
            chunk_size = per_device * n_dev
    chunk_size = int(min(chunk_size, n))
    manifest = {**new, "chunk_size": chunk_size, "num_chunks": -(-n // chunk_size)}
    os.makedirs(chunks, exist_ok=True)
    atomic_write(path, json.dumps(manifest, indent=1).encode())
    return manifest


def _run_chunks(jitted, key, grid, layout, todo, chunk_size, padded, header, table_metrics,
                array_metrics, sharded, replicated, progress) -> dict[int, list[np.ndarray]]:
    """Evaluate and write the chunks in ``todo``; returns each one's table columns."""
    from tqdm.auto import tqdm

    n = len(grid)
    base_key = None if key is None else jax.device_put(key, replicated)

    def launch(c: int):
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
        real = hi - lo
        cols = grid.columns(lo, hi)
        # Padding repeats the last real point, so fn never sees out-of-range parameters.
        pad = np.full(padded - real, real - 1, dtype=np.int64)
        take = np.concatenate([np.arange(real, dtype=np.int64), pad])
        params = {k: jax.device_put(v[take], sharded) for k, v in _device_params(cols).items()}
        index = jax.device_put((lo + take).astype(np.int32), sharded)
        # Dispatch is asynchronous: this returns while the devices compute.
        return c, lo, hi, cols, jitted(base_key, index, params)

    computed = {}

    def finish(c, lo, hi, cols, pending) -> int:
        out = {k: np.asarray(v)[: hi - lo] for k, v in jax.device_get(pending).items()}
        columns = [np.arange(lo, hi, dtype=np.int64), *cols.values(), *(out[k] for k in table_metrics)]
        _write_chunk(layout, c, header, columns, {k: out[k] for k in array_metrics})
        computed[c] = columns
        return hi - lo

    bar = tqdm(total=len(todo), unit="chunk", disable=not progress, desc="sweep")
    done_points, start = 0, time.perf_counter()
    try:
        # The next chunk is dispatched before the current one is written, so the devices
        # compute while the host formats and writes files.
        running = launch(todo[0])
        for c in [*todo[1:], None]:
            try:
                following = None if c is None else launch(c)
            except BaseException:
                finish(*running)  # a failure in the next chunk never loses this one
                raise
            done_points += finish(*running)
            running = following
            bar.update(1)
            bar.set_postfix(points_per_s=f"{done_points / (time.perf_counter() - start):.3g}")
    finally:
        bar.close()
    return computed

