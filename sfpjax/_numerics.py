"""Low-level helpers shared by every stage: tracing, dtypes, tolerances, entropies, partitions.

Internal: these names are imported across sfpjax's modules but are not part of the public
API (nothing here is re-exported from ``sfpjax``) and may change without notice.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

__all__ = [
    "check_range",
    "default_atol",
    "entropy",
    "float_dtype",
    "is_traced",
    "kron_vectors",
    "partition_labels",
    "index_text",
    "scalar",
]


def is_traced(*xs) -> bool:
    """Whether any argument (or any leaf of a pytree argument) is a tracer (inside
    ``jit``/``vmap``: values are not known)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def default_atol(dtype) -> float:
    """The tolerance of the GHMM checks for arrays of ``dtype``."""
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 2e-5


def float_dtype(dtype) -> jnp.dtype:
    """The dtype a process is built in: float32 unless asked; float64 only with x64 enabled.

    Half-precision dtypes are refused: their 3-4 significant digits cannot hold the
    ``T |1>> = |1>>`` and ``<<eta|1>> = 1`` identities that every belief relies on.
    """
    if dtype is None:
        # float32 unless asked: NumPy inputs are float64 by habit, not by intent.
        return jnp.dtype(jnp.float32)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    if dtype.itemsize < 4:
        raise ValueError(
            f"processes cannot be built in {dtype.name}: with about {int(jnp.finfo(dtype).precision)} "
            "significant digits the GHMM identities (T|1>> = |1>>, <<eta|1>> = 1) and the beliefs "
            "do not hold. Use dtype=jnp.float32 (the default) or jnp.float64; cast model "
            "activations, not the process, to low precision."
        )
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"dtype={dtype.name} needs JAX's 64-bit mode, which is off, so the process would "
            "silently be computed in float32. Enable it at the start of the program, before any "
            "array is created: jax.config.update('jax_enable_x64', True) (or set "
            "JAX_ENABLE_X64=1); or use dtype=jnp.float32."
        )
    return dtype


def scalar(value, dtype) -> Array:
    """``value`` as a 0-d array of ``dtype``; a process parameter must be a scalar."""
    arr = jnp.asarray(value, dtype)
    if jnp.ndim(arr) != 0:
        raise ValueError(
            f"process parameters are scalars; got shape {arr.shape}. "
            "To build a grid of processes, jax.vmap the constructor over the parameter arrays."
        )
    return arr


def check_range(name: str, value, lo: float | int, hi: float | int, *, open_lo=False, open_hi=False):
    """``value`` if it lies in the interval: a ``ValueError`` now when it is concrete, an
    ``eqx.error_if`` on the returned value when it is traced (NaN fails both ways), so the
    caller must build from the returned value."""
    interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    if is_traced(value):
        ok = ((value > lo) if open_lo else (value >= lo)) & ((value < hi) if open_hi else (value <= hi))
        return eqx.error_if(
            value, ~ok, f"sfpjax: invalid process parameter: {name} must lie in {interval} (a value "
            "outside it, or NaN, reached the constructor under jit/vmap)."
        )
    scalar(value, None)
    v = float(value)
    ok_lo = v > lo if open_lo else v >= lo
    ok_hi = v < hi if open_hi else v <= hi
    if not (ok_lo and ok_hi and np.isfinite(v)):
        raise ValueError(f"{name} must lie in {interval}; got {v}.")
    return value


def index_text(idx) -> str:
    """An array index as plain Python ints: ``(0, 2)``, not ``(np.int64(0), np.int64(2))``."""
    return str(tuple(int(i) for i in idx))


def entropy(p: Array) -> Array:
    """``-sum p log p`` over the last axis; entries <= 0 contribute 0."""
    # Clamping instead of selecting keeps the loop branch-free: 1.5x faster on CPU (177k entries).
    q = jnp.maximum(p, 0)
    return -(q * jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))).sum(-1)


def kron_vectors(vs: Sequence[Array]) -> Array:
    """The Kronecker product of vectors over their last axis (leading axes batch)."""
    out = vs[0]
    for v in vs[1:]:
        out = (out[..., :, None] * v[..., None, :]).reshape(*out.shape[:-1], -1)
    return out


def partition_labels(sectors, d: int, what: str) -> np.ndarray:
    """Label each of ``d`` states with its sector; the sectors must partition ``range(d)``."""
    labels = np.full((d,), -1, dtype=np.int64)
    for k, idx in enumerate(sectors):
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{what}: sector {k} must be a non-empty 1-D sequence of state indices; got {idx.tolist()}.")
        if (idx < 0).any() or (idx >= d).any():
            raise ValueError(f"{what}: sector {k} has state indices outside range({d}): {idx.tolist()}.")
        taken = idx[labels[idx] >= 0]
        if taken.size or np.unique(idx).size != idx.size:
            dup = taken[0] if taken.size else idx[np.argmax(np.bincount(idx))]
            raise ValueError(
                f"{what}: sectors overlap: state {int(dup)} appears more than once; "
                "each state must belong to exactly one sector."
            )
        labels[idx] = k
    missing = np.flatnonzero(labels < 0)
    if missing.size:
        raise ValueError(
            f"{what}: sectors do not cover all {d} states; missing {missing.tolist()}. "
            "Every state must belong to exactly one sector."
        )
    return labels
