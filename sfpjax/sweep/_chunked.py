"""Sweeps whose function takes a whole chunk of points: training, anything not vmappable.

`run_sweep` traces a per-point function once and vmaps it. A study that trains models per
point (pre-train, fine-tune, measure) cannot be written that way: ``sfpjax.train_stack``
runs a Python loop with logging and checkpoints. `run_chunked_sweep` calls such a function
on a chunk of points at a time, with every parameter as an array of the chunk's values
(``fn`` stacks its processes, models and keys along that axis and trains them as one
program), and keeps everything else of a sweep: the folder format, one checksummed chunk
written as soon as it finishes, resume chunk by chunk, ``load_sweep``, per-point keys
``fold_in(key, index)`` and the split of chunks over processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._io import atomic_write
from ._grid import Grid, grid_spec
from ._store import (
    Layout,
    SweepResult,
    assemble,
    check_key_axis,
    check_manifest,
    fingerprint,
    is_table_metric,
    key_spec,
    load_folder,
    metric_spec,
    new_manifest,
    read_manifest,
    this_process,
    verify_chunk,
    write_points,
)

__all__ = ["run_chunked_sweep"]


def run_chunked_sweep(
    fn: Callable[[dict[str, Array]], Mapping[str, Array]],
    grid: Grid,
    *,
    out_dir: str | os.PathLike,
    chunk_size: int,
    key: PRNGKeyArray | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> SweepResult:
    """Evaluate ``fn`` on the grid a chunk of points at a time, resumable chunk by chunk.

    Args:
        fn: ``fn(points) -> {metric_name: array}``. ``points`` maps each grid axis to a
            ``(n,)`` array of the chunk's values (and ``"key"`` to ``(n,)`` keys, the
            point keys ``fold_in(key, i)`` of their grid indices, when ``key`` is given);
            every metric has ``n`` rows, one per point, in that order. ``fn`` runs as
            ordinary Python (it may train, log and checkpoint); it must be deterministic
            in its inputs for a resumed sweep to equal an uninterrupted one. Scalar
            bool/int/float metrics become table columns, others ``.npz`` arrays, as in
            `run_sweep`.
        grid: the points (a seed is an axis like any other: one row per point and seed).
        out_dir: the sweep folder (same format as `run_sweep`, read with `load_sweep`).
        chunk_size: points per call of ``fn``: the size of the stacks it trains, so the
            memory it needs is ``fn``'s business; choose it for the devices at hand.
        key: base PRNG key for the per-point keys, or ``None``.
        progress: show a progress bar over chunks.
        process_index, process_count: this process's share (chunk ``c`` runs on process
            ``c % process_count``); default ``jax.process_index()``, ``jax.process_count()``.
            ``out_dir`` must then be on a filesystem every process sees; process 0 writes
            the table once every chunk is there.

    Returns:
        the `SweepResult` of the folder (the finished chunks only, if another process is
        still working on the rest).

    Raises:
        ValueError: a ``chunk_size`` that is not a positive int, a grid or key that
            differs from the folder's, metrics whose names, shapes or dtypes differ between
            chunks or from the folder's, or a metric with the wrong number of rows.

    >>> import tempfile, jax.numpy as jnp, sfpjax
    >>> def chunk(points):  # a whole chunk at once: here, one vectorized expression
    ...     return {"y": points["x"] ** 2}
    >>> res = sfpjax.run_chunked_sweep(chunk, sfpjax.grid(x=[1.0, 2.0, 3.0]), out_dir=tempfile.mkdtemp(),
    ...                                chunk_size=2, progress=False)
    >>> res.table["y"].tolist()
    [1.0, 4.0, 9.0]
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (points per call of fn), got {chunk_size!r}.")
    process_index, process_count = this_process(process_index, process_count)
    check_key_axis(grid, key)
    out_dir = os.fspath(out_dir)
    n = len(grid)
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)
    path = os.path.join(out_dir, "manifest.json")
    manifest = read_manifest(path) if os.path.exists(path) else None
    if manifest is not None:
        # The metrics are known once fn has run; the grid and key are checked now.
        check_manifest(manifest, new_manifest(grid, key, manifest["metrics"]), out_dir)
        if manifest["chunk_size"] != chunk_size:
            raise ValueError(
                f"out_dir {out_dir!r} was started with chunk_size={manifest['chunk_size']}, got "
                f"chunk_size={chunk_size}; pass chunk_size={manifest['chunk_size']} to resume."
            )
    layout = Layout(out_dir, num_chunks)
    os.makedirs(layout.chunks, exist_ok=True)

    def evaluate(lo: int, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        points = {k: jnp.asarray(v, jax.dtypes.canonicalize_dtype(v.dtype)) for k, v in cols.items()}
        if key is not None:
            idx = jnp.arange(lo, lo + len(next(iter(cols.values()))), dtype=jnp.int32)
            points["key"] = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        out = fn(points)
        if not isinstance(out, Mapping) or not out:
            raise ValueError(f"fn must return a non-empty dict of metric arrays, got {type(out).__name__}.")
        # fn's order of metrics is the table's (a pytree round trip would sort the names).
        return {name: np.asarray(jax.device_get(v)) for name, v in out.items()}

    from tqdm.auto import tqdm

    mine = list(range(process_index, num_chunks, process_count))
    bar = tqdm(total=len(mine), unit="chunk", disable=not progress, desc="sweep")
    try:
        for c in mine:
            if manifest is not None and layout.done(c):
                verify_chunk(layout, c, with_arrays=any(not is_table_metric(s) for s in manifest["metrics"].values()))
                bar.update(1)
                continue
            lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
            cols = grid.columns(lo, hi)
            out = evaluate(lo, cols)
            specs = {name: metric_spec(name, v, hi - lo, grid.names) for name, v in out.items()}
            if manifest is None:
                manifest = {**new_manifest(grid, key, specs), "chunk_size": chunk_size, "num_chunks": num_chunks}
                if process_index == 0:
                    atomic_write(path, json.dumps(manifest, indent=1).encode())
            else:
                check_manifest(manifest, {**manifest, "metrics": specs}, out_dir)
            arrays = [k for k, s in manifest["metrics"].items() if not is_table_metric(s)]
            write_points(layout, c, manifest["columns"], lo, cols, out, arrays)
            bar.update(1)
    finally:
        bar.close()

    multihost = process_count > 1 and jax.process_count() == process_count
    if multihost:
        from jax.experimental import multihost_utils

        # A process without a chunk has no manifest yet: the barriers are named by grid and key.
        tag = fingerprint(grid_spec(grid), key_spec(key))[:16]
        multihost_utils.sync_global_devices(f"sfpjax_chunked_sweep_{tag}")
    if manifest is None:  # this process had no chunk and none was written yet
        if not os.path.exists(path):
            raise ValueError(f"no chunk of the sweep in {out_dir!r} has finished yet; run process 0 first.")
        manifest = read_manifest(path)
    # Process 0 computes chunk 0, so it holds the manifest and has written it.
    if process_index == 0 and not layout.complete() and all(layout.done(c) for c in range(num_chunks)):
        assemble(layout, manifest)
    if multihost:  # every process returns the whole table
        multihost_utils.sync_global_devices(f"sfpjax_chunked_table_{tag}")
    return load_folder(out_dir, manifest)
