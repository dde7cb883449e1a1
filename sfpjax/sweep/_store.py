"""The on-disk format of a sweep folder: manifest, chunk files, results table, and reading back.

Layout of a sweep folder ``out_dir``::

    manifest.json               grid, key, chunk size, metric shapes, fingerprint
    chunks/chunk_000000.csv     one row per point of chunk 0: index, parameters, scalar metrics
    chunks/chunk_000000.npz     array metrics of chunk 0 (only if fn returns any)
    chunks/chunk_000000.sha256  SHA-256 of the chunk's .csv and .npz; written last, it marks
                                the chunk as finished
    results.csv                 all rows in grid order, written once every chunk is done
    results.sha256              SHA-256 of results.csv; written last, it marks the sweep done

Every file is written atomically (`sfpjax._io.atomic_write`), so a crash never leaves a
partial file under its final name. The ``.sha256`` files have the format ``sha256sum``
writes (``cd chunks && sha256sum -c chunk_000000.sha256`` checks a chunk by hand); every
read of a table or an array file verifies it against them first, so a damaged file is
named instead of read as data. The manifest records that its folder is checksummed
(``"checksums": "sha256"``, version 2); version-1 folders, written before checksums
existed, load and resume without them. Each chunk keeps its own checksum file rather than
an entry in the manifest because chunks are finished by many processes at once in a
multi-host sweep, and a shared manifest rewritten after every chunk would race and grow
quadratically. Table values are written as the shortest text that reads back to the same
number, so a table read back equals the one written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._io import atomic_write, key_parts, sha256_bytes, sha256_json
from ._grid import INDEX, Grid, grid_differences, grid_from_spec, grid_spec

__all__ = ["SweepResult", "load_sweep"]

FORMAT = "sfpjax-sweep"
VERSION = 2
_TABLE_KINDS = "biuf"
_RECOMPUTE = (
    "delete it (and results.csv, if the damaged file is a chunk) and run the sweep again to "
    "recompute the missing chunks."
)


def _read_arrays(
    layout: Layout, chunks: Sequence[int], specs: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The array metrics ``names``, merged in grid order from the per-chunk ``.npz`` files."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for c in chunks if names else ():
        path = layout.chunk_npz(c)
        data = read_checked(layout, path, c)
        try:
            with np.load(io.BytesIO(data)) as z:
                for name in names:
                    parts[name].append(z[name])
        except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged file
            raise ValueError(
                f"{path!r} cannot be read as the arrays of this sweep ({type(e).__name__}: {e}); "
                f"the file is damaged: {layout.recompute(c)}"
            ) from e
    out = {}
    for name in names:
        spec = specs[name]
        empty = np.zeros((0, *spec["shape"]), np.dtype(spec["dtype"]))
        out[name] = np.concatenate(parts[name], axis=0) if parts[name] else empty
    return out


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
            aligned with `table`: the array metrics that were loaded (`load_sweep`'s
            ``arrays=`` chooses which).
        complete: whether every chunk has finished. A folder still being swept (or whose
            run was killed) loads with the finished chunks only.
        chunk_size: points per chunk.
    """

    path: str
    grid: Grid
    table: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]
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


def _read_csv(
    layout: Layout, path: str, columns: Sequence[str], num_rows: int, c: int | None
) -> list[list[str]]:
    """The rows of a table file (chunk ``c``, or results.csv for ``None``), checked against
    its checksum, the header and the row count it must have."""
    try:
        lines = read_checked(layout, path, c).decode().splitlines()
    except UnicodeDecodeError as e:
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
    """The paths of a sweep folder; ``checksummed`` is false for version-1 folders."""

    def __init__(self, out_dir: str, num_chunks: int, checksummed: bool = True):
        self.root = out_dir
        self.chunks = os.path.join(out_dir, "chunks")
        self.manifest = os.path.join(out_dir, "manifest.json")
        self.results = os.path.join(out_dir, "results.csv")
        self.results_sums = os.path.join(out_dir, "results.sha256")
        self.num_chunks = num_chunks
        self.checksummed = checksummed

    @classmethod
    def of(cls, out_dir: str, manifest: Mapping[str, Any]) -> Layout:
        return cls(out_dir, manifest["num_chunks"], manifest.get("checksums") == "sha256")

    def chunk_csv(self, c: int) -> str:
        return os.path.join(self.chunks, f"chunk_{c:06d}.csv")

    def chunk_npz(self, c: int) -> str:
        return os.path.join(self.chunks, f"chunk_{c:06d}.npz")

    def chunk_sums(self, c: int) -> str:
        return os.path.join(self.chunks, f"chunk_{c:06d}.sha256")

    def sums(self, c: int | None) -> str:
        return self.results_sums if c is None else self.chunk_sums(c)

    def done(self, c: int) -> bool:
        # The checksums are written after the .npz and the .csv, so their presence means the
        # chunk is complete; a deleted .csv makes the chunk count as not done.
        if not self.checksummed:
            return os.path.exists(self.chunk_csv(c))
        return os.path.exists(self.chunk_sums(c)) and os.path.exists(self.chunk_csv(c))

    def complete(self) -> bool:
        if not self.checksummed:
            return os.path.exists(self.results)
        return os.path.exists(self.results_sums) and os.path.exists(self.results)

    def recompute(self, c: int | None) -> str:
        """How to recompute chunk ``c`` (``None``: results.csv) after a damaged file."""
        if c is None:
            return (
                f"delete {self.results!r} and run the sweep again (same fn, grid and key): "
                "results.csv is rebuilt from the chunk files."
            )
        stem = os.path.join(self.chunks, f"chunk_{c:06d}")
        return (
            f"delete {stem}.* (and results.csv, if present) and run the sweep again (same fn, "
            "grid and key): only the missing chunks are recomputed."
        )


def _sums_text(files: Mapping[str, bytes]) -> bytes:
    return "".join(f"{sha256_bytes(data)}  {name}\n" for name, data in files.items()).encode()


def read_checked(layout: Layout, path: str, c: int | None) -> bytes:
    """The bytes of ``path``, a file of chunk ``c`` (``None``: results.csv), verified against
    the SHA-256 recorded for it when it was written."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path!r} cannot be read ({e}); {layout.recompute(c)}") from e
    if not layout.checksummed:
        return data
    sums_path = layout.sums(c)
    name = os.path.basename(path)
    try:
        with open(sums_path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"the checksum file {sums_path!r} cannot be read ({e}); {layout.recompute(c)}") from e
    recorded = {}
    for line in lines:
        digest, sep, file = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(
                f"the checksum file {sums_path!r} is damaged (line {line[:80]!r} is not "
                f"'<sha256>  <file>'): {layout.recompute(c)}"
            )
        recorded[file] = digest
    if name not in recorded:
        raise ValueError(f"the checksum file {sums_path!r} has no entry for {name}; it is damaged: {layout.recompute(c)}")
    if sha256_bytes(data) != recorded[name]:
        raise ValueError(
            f"{path!r} does not match the SHA-256 recorded in {sums_path!r} when it was written: the "
            f"file is damaged (check by hand with `cd {os.path.dirname(path) or '.'} && sha256sum -c "
            f"{os.path.basename(sums_path)}`). To recompute it, {layout.recompute(c)}"
        )
    return data



def key_spec(key: Any) -> dict[str, Any] | None:
    if key is None:
        return None
    data, impl = key_parts(key)
    return {"impl": impl or "raw", "data": data.tolist()}


def fingerprint(grid_spec: Mapping[str, Any], key_spec: Any) -> str:
    return sha256_json({"grid": grid_spec, "key": key_spec})


_MANIFEST_KEYS = ("fingerprint", "grid", "key", "num_points", "metrics", "columns", "chunk_size", "num_chunks")


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest at ``path``, or a ``ValueError`` that names the file and the way out."""
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"the sweep manifest {path!r} cannot be read ({type(e).__name__}: {e}); it is damaged. "
            "It records the sweep's grid, key and chunk layout: restore it from a copy, or delete "
            "it and run the sweep again with the same fn, grid, key and chunk_size as the original "
            "call (finished chunks are verified against their checksums and kept); if those are "
            "unknown, delete the whole folder and run the sweep again."
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sfpjax sweep manifest.")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(
            f"the sweep manifest {path!r} lacks the fields {missing}; it is damaged: restore it "
            "from a copy, or delete it and run the sweep again with the original arguments."
        )
    return manifest


def check_manifest(old: Mapping[str, Any], new: Mapping[str, Any], out_dir: str) -> None:
    if old["fingerprint"] != new["fingerprint"]:
        what, details = [], []
        if old["grid"] != new["grid"]:
            what.append("grid")
            details += grid_differences(grid_from_spec(old["grid"]), grid_from_spec(new["grid"]))
        if old["key"] != new["key"]:
            what.append("key")
            details.append(f"key: recorded {_key_text(old['key'])}, given {_key_text(new['key'])}")
        raise ValueError(
            f"out_dir {out_dir!r} holds a different sweep: its {' and '.join(what) or 'config'} "
            "differs from this call:\n  " + "\n  ".join(details or ["(fingerprint differs)"])
            + "\nUse a new out_dir, or pass the same grid and key to resume."
        )
    if old["metrics"] != new["metrics"]:
        names = sorted(set(old["metrics"]) | set(new["metrics"]))
        diff = [
            f"{k}: recorded {_metric_text(old['metrics'].get(k))}, fn returns {_metric_text(new['metrics'].get(k))}"
            for k in names
            if old["metrics"].get(k) != new["metrics"].get(k)
        ]
        raise ValueError(
            f"out_dir {out_dir!r} holds a sweep whose metrics were different:\n  " + "\n  ".join(diff)
            + "\nUse a new out_dir for a changed fn."
        )


def _key_text(spec: Mapping[str, Any] | None) -> str:
    return "no key" if spec is None else f"{spec['impl']} key with data {spec['data']}"


def _metric_text(spec: Mapping[str, Any] | None) -> str:
    return "nothing" if spec is None else f"shape {tuple(spec['shape'])} dtype {np.dtype(spec['dtype'])}"


def metric_spec(name: Any, leaf: Any, rows: int, parameters: Sequence[str]) -> dict[str, Any]:
    """The stored shape and dtype of metric ``name``, whose value ``leaf`` (an array or a
    ``jax.ShapeDtypeStruct``) holds ``rows`` points along its leading axis; ``ValueError``
    for a name or value a sweep cannot store."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Metric names must be Python identifiers, got {name!r}.")
    if name in parameters or name in (INDEX, "key"):
        raise ValueError(f"Metric {name!r} clashes with a parameter or reserved column; rename it.")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"Metric {name!r} must be one array per point (a scalar or an array), got a "
            f"{type(leaf).__name__}; flatten nested metrics into separate names."
        )
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise ValueError(f"Metric {name!r} is a PRNG key; return jax.random.key_data(...) instead.")
    if tuple(leaf.shape[:1]) != (rows,):
        raise ValueError(
            f"Metric {name!r} has leading shape {tuple(leaf.shape)}, expected {rows} rows (one per point)."
        )
    return {"shape": list(leaf.shape[1:]), "dtype": np.dtype(leaf.dtype).str}


def this_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(process_index, process_count)`` of a sweep's share, defaulting to JAX's (checked)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}."
        )
    return process_index, process_count


def check_key_axis(grid: Grid, key: Any) -> None:
    """A grid axis named ``key`` would clash with the per-point key column."""
    if key is not None and "key" in grid.names:
        raise ValueError("The grid has an axis named 'key', which clashes with the per-point key; rename it.")


def new_manifest(grid: Grid, key: Any, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest of a sweep of ``grid`` with ``key`` and these metric specs, without its
    chunk layout (``chunk_size``, ``num_chunks``)."""
    g_spec, k_spec = grid_spec(grid), key_spec(key)
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(g_spec, k_spec),
        "grid": g_spec,
        "key": k_spec,
        "num_points": len(grid),
        "metrics": dict(specs),
        "columns": [INDEX, *grid.names, *(k for k, s in specs.items() if is_table_metric(s))],
        "checksums": "sha256",
    }


def write_points(
    layout: Layout,
    c: int,
    header: Sequence[str],
    lo: int,
    params: Mapping[str, np.ndarray],
    metrics: Mapping[str, np.ndarray],
    array_names: Sequence[str],
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Write chunk ``c``: the points from grid index ``lo`` on, their parameters and metrics.

    Returns the chunk's table columns (in ``header`` order) and its array metrics.
    """
    rows = len(next(iter(params.values())))
    columns = [np.arange(lo, lo + rows, dtype=np.int64), *params.values(),
               *(metrics[k] for k in header[1 + len(params):])]
    arrays = {k: metrics[k] for k in array_names}
    write_chunk(layout, c, header, columns, arrays)
    return columns, arrays


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
    files = {}
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files[os.path.basename(layout.chunk_npz(c))] = buf.getvalue()
        atomic_write(layout.chunk_npz(c), files[os.path.basename(layout.chunk_npz(c))])
    text = csv_text(header, columns).encode()
    files[os.path.basename(layout.chunk_csv(c))] = text
    atomic_write(layout.chunk_csv(c), text)
    if layout.checksummed:
        atomic_write(layout.chunk_sums(c), _sums_text(files))


def verify_chunk(layout: Layout, c: int, with_arrays: bool) -> None:
    """Check a finished chunk's files against their checksums (raises ``ValueError``)."""
    read_checked(layout, layout.chunk_csv(c), c)
    if with_arrays:
        read_checked(layout, layout.chunk_npz(c), c)


def _chunk_rows(manifest: Mapping[str, Any], c: int) -> int:
    size = manifest["chunk_size"]
    return min((c + 1) * size, manifest["num_points"]) - c * size


def assemble(layout: Layout, manifest: Mapping[str, Any]) -> None:
    header = ",".join(manifest["columns"]) + "\n"
    pieces = [header]
    for c in range(layout.num_chunks):
        path = layout.chunk_csv(c)
        text = read_checked(layout, path, c).decode()
        # The rows are copied byte for byte, after a check that the chunk is whole.
        if not text.startswith(header) or text.count("\n") != _chunk_rows(manifest, c) + 1:
            raise ValueError(f"{path!r} is not a whole chunk of this sweep; the file is damaged: {_RECOMPUTE}")
        pieces.append(text[len(header):])
    data = "".join(pieces).encode()
    atomic_write(layout.results, data)
    if layout.checksummed:
        atomic_write(layout.results_sums, _sums_text({os.path.basename(layout.results): data}))


def load_folder(
    out_dir: str,
    manifest: Mapping[str, Any],
    table: dict[str, np.ndarray] | None = None,
    arrays: bool | Sequence[str] = True,
    array_values: dict[str, np.ndarray] | None = None,
) -> SweepResult:
    """The sweep in ``out_dir``; ``table`` and ``array_values``, when given, are its whole
    table and its array metrics, already in memory (the call that computed every chunk)."""
    g = grid_from_spec(manifest["grid"])
    layout = Layout.of(out_dir, manifest)
    specs = manifest["metrics"]
    complete = layout.complete()
    header = manifest["columns"]
    if table is not None:
        finished = list(range(layout.num_chunks))
    elif complete:
        finished = list(range(layout.num_chunks))
        rows = _read_csv(layout, layout.results, header, manifest["num_points"], None)
    else:
        finished = [c for c in range(layout.num_chunks) if layout.done(c)]
        rows = []
        for c in finished:
            rows.extend(_read_csv(layout, layout.chunk_csv(c), header, _chunk_rows(manifest, c), c))
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
    if isinstance(arrays, bool):
        names = list(array_specs) if arrays else []
    else:
        names = list(arrays)
        unknown = [n for n in names if n not in array_specs]
        if unknown:
            raise ValueError(
                f"arrays={names!r} names {unknown!r}, which this sweep does not store as arrays; "
                f"its array metrics are {sorted(array_specs)!r} (table metrics are in .table)."
            )
    return SweepResult(
        path=out_dir,
        grid=g,
        table=table,
        arrays=_read_arrays(layout, finished, array_specs, names) if array_values is None else array_values,
        complete=complete,
        chunk_size=manifest["chunk_size"],
    )


def load_sweep(out_dir: str | os.PathLike, *, arrays: bool | Sequence[str] = True) -> SweepResult:
    """Read a sweep folder written by `run_sweep`, finished or not.

    Args:
        out_dir: the folder given to `run_sweep`.
        arrays: which array metrics to read into ``result.arrays``: all of them (``True``,
            the default), none (``False``: the table alone, without opening any ``.npz``
            file), or a list of metric names. Every file read is checked against its
            recorded SHA-256 first.

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
    return load_folder(out_dir, read_manifest(path), arrays=arrays)
