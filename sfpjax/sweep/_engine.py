"""The sweep engine: one compiled, vmapped program over a grid, sharded, chunked, resumable.

A sweep evaluates a pure per-point function ``fn(point) -> {metric: array}`` at every
point of a grid (`sfpjax.sweep._grid`). ``point`` is a dict of scalars, one per grid axis
(for example the ``x`` and ``a`` of ``mess3(x, a)``, or a ``seed``), plus ``point["key"]``
when a base ``key`` is given: ``fold_in(key, i)`` with ``i`` the point's global index in
the grid, so every point draws the same numbers however the grid is chunked, sharded or
resumed.

The engine stacks points along a leading axis and runs ``jax.jit(jax.vmap(fn))`` with that
axis sharded over a one-dimensional ``Mesh`` of the local devices. Points go through in
chunks; each finished chunk is written to the sweep folder at once (`sfpjax.sweep._store`
holds the format), so a sweep that is killed resumes where it stopped and a crash never
damages finished chunks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PRNGKeyArray

from .._io import atomic_write
from ._grid import Grid
from ._store import (
    Layout,
    SweepResult,
    assemble,
    check_key_axis,
    check_manifest,
    is_table_metric,
    load_folder,
    metric_spec,
    new_manifest,
    read_manifest,
    this_process,
    verify_chunk,
    write_points,
)

__all__ = ["run_sweep"]

_KEY = "key"
_DEFAULT_CHUNK = 4096
# Points per device in the probe program whose compiled memory analysis sizes chunks.
_PROBE_PER_DEVICE = 8

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
    return {name: metric_spec(name, out[name], 1, names) for name in order}


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
    check_key_axis(grid, key)
    process_index, process_count = this_process(process_index, process_count)
    out_dir = os.fspath(out_dir)

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

    new = new_manifest(grid, key, specs)
    array_metrics = [k for k, s in specs.items() if not is_table_metric(s)]
    header = new["columns"]

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
    layout = Layout.of(out_dir, manifest)

    computed: dict[int, tuple[list[np.ndarray], dict[str, np.ndarray]]] = {}
    mine = _my_chunks(num_chunks, process_index, process_count)
    finished = {c for c in mine if layout.done(c)}
    todo = [c for c in mine if c not in finished]
    if not layout.complete():
        # Resuming: the finished chunks are checked before more work is added to them.
        for c in sorted(finished):
            verify_chunk(layout, c, with_arrays=bool(array_metrics))
    if todo and not layout.complete():
        padded = -(-chunk_size // n_dev) * n_dev
        computed = _run_chunks(jitted, key, grid, layout, todo, chunk_size, padded, header,
                               array_metrics, sharded, replicated, progress)

    if multihost:
        multihost_utils.sync_global_devices(f"sfpjax_sweep_chunks_{manifest['fingerprint'][:16]}")
    if process_index == 0 and not layout.complete():
        missing = [c for c in range(num_chunks) if not layout.done(c)]
        if not missing:
            assemble(layout, manifest)
        elif multihost:
            raise ValueError(
                f"After all processes finished, chunks {missing[:8]} are missing from {out_dir!r}: "
                "out_dir must be on a filesystem shared by every host."
            )
    if multihost:
        multihost_utils.sync_global_devices(f"sfpjax_sweep_table_{manifest['fingerprint'][:16]}")
    if len(computed) == num_chunks and layout.complete():
        # Every chunk was computed here: table and arrays are in memory, equal to what the
        # files read back as (the text round-trips exactly, .npz stores the arrays as they
        # are), so nothing is read back.
        chunks = [computed[c] for c in range(num_chunks)]
        table = {name: np.concatenate([cols[i] for cols, _ in chunks]) for i, name in enumerate(header)}
        arrays = {name: np.concatenate([arr[name] for _, arr in chunks]) for name in array_metrics}
        return load_folder(out_dir, manifest, table, array_values=arrays)
    return load_folder(out_dir, manifest)


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
        old = read_manifest(path)
        check_manifest(old, new, out_dir)
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


def _run_chunks(jitted, key, grid, layout, todo, chunk_size, padded, header, array_metrics, sharded,
                replicated, progress) -> dict[int, tuple[list[np.ndarray], dict[str, np.ndarray]]]:
    """Evaluate and write the chunks in ``todo``; returns each one's table columns and arrays."""
    from tqdm.auto import tqdm

    n = len(grid)
    base_key = None if key is None else jax.device_put(key, replicated)

    def evaluate(lo, cols, take):
        params = {k: jax.device_put(v[take], sharded) for k, v in _device_params(cols).items()}
        index = jax.device_put((lo + take).astype(np.int32), sharded)
        # Dispatch is asynchronous: this returns while the devices compute.
        return jitted(base_key, index, params)

    def launch(c: int):
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
        real = hi - lo
        cols = grid.columns(lo, hi)
        # Padding repeats the last real point, so fn never sees out-of-range parameters.
        pad = np.full(padded - real, real - 1, dtype=np.int64)
        take = np.concatenate([np.arange(real, dtype=np.int64), pad])
        try:
            return c, lo, hi, cols, evaluate(lo, cols, take)
        except (RuntimeError, ValueError) as e:
            raise _name_failing_point(e, grid, lo, real, padded, functools.partial(evaluate, lo, cols)) from e

    computed = {}

    def finish(c, lo, hi, cols, pending) -> int:
        try:
            out = {k: np.asarray(v)[: hi - lo] for k, v in jax.device_get(pending).items()}
        except (RuntimeError, ValueError) as e:
            raise _name_failing_point(e, grid, lo, hi - lo, padded, functools.partial(evaluate, lo, cols)) from e
        computed[c] = write_points(layout, c, header, lo, cols, out, array_metrics)
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



def _is_check_failure(error: BaseException) -> bool:
    """Whether ``error`` is a value check in ``fn`` (``eqx.error_if``) that failed at run time
    (a ``JaxRuntimeError``, or a ``ValueError`` when a cached jitted call reports it)."""
    return "EquinoxRuntimeError" in f"{type(error).__name__}: {error}"


def _name_failing_point(error, grid: Grid, lo: int, real: int, padded: int, evaluate) -> BaseException:
    """A ``ValueError`` naming the first grid point whose value check fails, or ``error`` itself.

    Under ``vmap`` one failing ``eqx.error_if`` (an invalid process parameter, say) stops the
    whole chunk without saying which point tripped it. The chunk's points are bisected by
    evaluating subsets, each repeated to the compiled chunk shape, so no recompilation.
    """
    if not _is_check_failure(error):
        return error

    def fails(subset: np.ndarray) -> bool:
        try:
            jax.block_until_ready(evaluate(subset[np.arange(padded) % subset.size]))
        except (RuntimeError, ValueError) as e:
            if _is_check_failure(e):
                return True
            raise
        return False

    def quiet(record: logging.LogRecord) -> bool:
        # JAX logs every failed callback with its traceback; the search fails on purpose.
        return record.getMessage() != "jax.pure_callback failed"

    callback_log = logging.getLogger("jax._src.callback")
    callback_log.addFilter(quiet)
    try:
        candidates = np.arange(real)
        if not fails(candidates):
            return error
        while candidates.size > 1:
            half = candidates[: candidates.size // 2]
            candidates = half if fails(half) else candidates[candidates.size // 2:]
    finally:
        callback_log.removeFilter(quiet)
    i = lo + int(candidates[0])
    text = str(error)
    reason = text.split("EquinoxRuntimeError: ", 1)[-1].split("\n\n", 1)[0].strip()
    params = ", ".join(f"{k}={v!r}" for k, v in grid.point(i).items())
    return ValueError(
        f"fn fails at grid point {i} ({params}): {reason} Fix or leave out that point; the chunks "
        "finished before it are kept and a rerun resumes after them."
    )
