"""Sweeps run in a subprocess by tests/test_sweep.py (device count and kills need a fresh process).

Usage: python tests/_sweep_worker.py shard OUT_DIR   (expects 8 forced host devices)
       python tests/_sweep_worker.py slow OUT_DIR    (pauses after every chunk, to be killed)
       python tests/_sweep_worker.py distributed OUT_DIR PORT PROCESS_ID   (one of 2 processes)
       python tests/_sweep_worker.py chunked OUT_DIR PORT PROCESS_ID   (run_chunked_sweep, one of 2)
"""

import os
import sys
import time

os.environ.setdefault("JAX_ENABLE_X64", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import sfpjax  # noqa: E402
from sfpjax.sweep import _engine as _sweep  # noqa: E402

SHARD_GRID = dict(a=[0.3, -0.7, 1.1], b=[0.5, 2.0], seed=[0, 1])  # 12 points
SHARD_CHUNK = 5  # padded to 8 on 8 devices: exercises padding and a short last chunk
SLOW_GRID = dict(a=[0.25, 0.5, 0.75], b=[1.0, 2.0], seed=[0, 1])  # 12 points
SLOW_CHUNK = 2


def point_fn(p):
    """Pure jnp math depending on the parameters, the seed and the per-point key."""
    a, b = p["a"], p["b"]
    noise = jax.random.uniform(p["key"], (4, 4), dtype=a.dtype, minval=-1.0, maxval=1.0)
    seeded = jnp.sin(p["seed"].astype(a.dtype) + jnp.arange(4, dtype=a.dtype))
    m = a * noise + b * jnp.eye(4, dtype=a.dtype) + jnp.outer(seeded, seeded)
    cube = m @ m @ m
    return {
        "trace": jnp.trace(cube),
        "frob": jnp.sum(cube * cube),
        "argmax": jnp.argmax(cube.ravel()),
        "positive": jnp.trace(cube) > 0,
        "cube": cube,
        "scaled": seeded * jnp.exp(-a * b),
    }


METRIC_ORDER = ("trace", "frob", "argmax", "positive", "cube", "scaled")


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode in ("distributed", "chunked"):
        # Must come before anything that starts the XLA backend, such as making a key.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[4])
        )
    key = jax.random.key(7)
    if mode == "shard":
        if jax.local_device_count() != 8:
            raise SystemExit(f"expected 8 devices, got {jax.local_device_count()}")
        sfpjax.run_sweep(
            point_fn, sfpjax.grid(**SHARD_GRID), out_dir=out_dir, key=key,
            chunk_size=SHARD_CHUNK, progress=False,
        )
    elif mode == "slow":
        write = _sweep.write_points

        def write_then_pause(*args, **kwargs):
            out = write(*args, **kwargs)
            time.sleep(0.4)
            return out

        _sweep.write_points = write_then_pause
        sfpjax.run_sweep(
            point_fn, sfpjax.grid(**SLOW_GRID), out_dir=out_dir, key=key,
            chunk_size=SLOW_CHUNK, progress=False,
        )
    elif mode == "distributed":
        res = sfpjax.run_sweep(
            point_fn, sfpjax.grid(**SLOW_GRID), out_dir=out_dir, key=key,
            chunk_size=SLOW_CHUNK, progress=False,
        )
        if not res.complete or len(res) != len(sfpjax.grid(**SLOW_GRID)):
            raise SystemExit(f"process {jax.process_index()} got an incomplete result: {res}")
    elif mode == "chunked":
        def chunk_fn(points):
            out = jax.vmap(point_fn)(points)
            return {k: out[k] for k in METRIC_ORDER}  # point_fn's order, as run_sweep keeps it

        res = sfpjax.run_chunked_sweep(
            chunk_fn, sfpjax.grid(**SLOW_GRID), out_dir=out_dir, key=key, chunk_size=SLOW_CHUNK, progress=False,
        )
        if not res.complete or len(res) != len(sfpjax.grid(**SLOW_GRID)):
            raise SystemExit(f"process {jax.process_index()} got an incomplete result: {res}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
