"""The on-disk format of a sweep folder: manifest, chunk files, results table, and reading back.

Layout of a sweep folder ``out_dir``::

    manifest.json            grid, key, chunk size, metric shapes, fingerprint
    chunks/chunk_000000.csv  one row per point of chunk 0: index, parameters, scalar metrics
    chunks/chunk_000000.npz  array metrics of chunk 0 (only if fn returns any)
    results.csv              all rows in grid order, written once every chunk is done

Every file is written atomically (`sfpjax._io.atomic_write`), so a crash never leaves a
partial file under its final name. Table values are written as the shortest text that
reads back to the same number, so a table read back equals the one written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .._io import atomic_write, key_parts, sha256_json
from ._grid import INDEX, Grid, grid_from_spec

__all__ = ["SweepResult", "load_sweep"]

FORMAT = "sfpjax-sweep"
VERSION = 1
_TABLE_KINDS = "biuf"
_RECOMPUTE = (
    "delete it (and results.csv, if the damaged file is a chunk) and run the sweep again to "
    "recompute the missing chunks."
)


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
        return len(self.table[INDEX])

    def __repr__(self) -> str:
        return (
            f"SweepResult(path={self.path!r}, rows={len(self)}/{len(self.grid)}, "
            f"columns={list(self.table)}, arrays={list(self.arrays)}, complete={self.complete})"
        )



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


def csv_text(header: Sequence[str], columns: Sequence[np.ndarray]) -> str:
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


class Layout:
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



def key_spec(key: Any) -> dict[str, Any] | None:
    if key is None:
        return None
    data, impl = key_parts(key)
    return {"impl": impl or "raw", "data": data.tolist()}


def fingerprint(grid_spec: Mapping[str, Any], key_spec: Any) -> str:
    return sha256_json({"grid": grid_spec, "key": key_spec})


def read_manifest(path: str) -> dict[str, Any]:
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sfpjax sweep manifest.")
    return manifest


def check_manifest(old: Mapping[str, Any], new: Mapping[str, Any], out_dir: str) -> None:
    if old["fingerprint"] != new["fingerprint"]:
        what = []
        if old["grid"] != new["grid"]:
            what.append(f"grid (recorded: {grid_from_spec(old['grid'])}, given: {grid_from_spec(new['grid'])})")
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


def is_table_metric(spec: Mapping[str, Any]) -> bool:
    """Whether a metric of this shape and dtype is a table column (else an ``.npz`` array)."""
    return not spec["shape"] and np.dtype(spec["dtype"]).kind in _TABLE_KINDS


def write_chunk(
    layout: Layout,
    c: int,
    header: Sequence[str],
    columns: Sequence[np.ndarray],
    arrays: Mapping[str, np.ndarray],
) -> None:
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(layout.chunk_npz(c), buf.getvalue())
    atomic_write(layout.chunk_csv(c), csv_text(header, columns).encode())


def _chunk_rows(manifest: Mapping[str, Any], c: int) -> int:
    size = manifest["chunk_size"]
    return min((c + 1) * size, manifest["num_points"]) - c * size


def assemble(layout: Layout, manifest: Mapping[str, Any]) -> None:
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


def load_folder(out_dir: str, manifest: Mapping[str, Any], table: dict[str, np.ndarray] | None = None) -> SweepResult:
    """The sweep in ``out_dir``; ``table``, when given, is its whole table, already in memory."""
    g = grid_from_spec(manifest["grid"])
    layout = Layout(out_dir, manifest["num_chunks"])
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
        dtypes = {INDEX: np.dtype(np.int64)}
        dtypes.update({k: v.dtype for k, v in g.values.items()})
        dtypes.update({k: np.dtype(s["dtype"]) for k, s in specs.items() if is_table_metric(s)})
        transposed = list(zip(*rows, strict=True)) if rows else [()] * len(header)
        try:
            table = {name: _parse(col, dtypes[name]) for name, col in zip(header, transposed, strict=True)}
        except ValueError as e:
            raise ValueError(
                f"The table files in {out_dir!r} hold a value that is not a number ({e}): a file "
                "is damaged; delete results.csv and the damaged chunks/chunk_*.csv, then run the "
                "sweep again to recompute them."
            ) from e
    array_specs = {k: s for k, s in specs.items() if not is_table_metric(s)}
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
    return load_folder(out_dir, read_manifest(path))
