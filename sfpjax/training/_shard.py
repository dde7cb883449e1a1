"""Placement of a stack of ``K`` runs on the local devices: the ``K`` axis split over a ``Mesh``.

A stacked run (:func:`sfpjax.train_stack`, :func:`sfpjax.finetune_stack`) is ``K``
independent runs vmapped, so splitting the ``K`` axis over ``D`` devices changes where each
run computes, not what: every array whose leading axis is the stack axis is placed with
``NamedSharding(mesh, P("stack"))`` and everything shared by the runs is replicated; the
compiled step then runs ``K / D`` runs on each device with no communication between them.

Under ``jax.distributed`` (several processes, one per host) each process trains a
contiguous share of ``K / P`` runs on its own devices (``process_share``, ``take_share``)
and the shares are gathered at the end (``gather_shares``, ``gather_rows``), so every
process returns all ``K`` runs, as one process would. ``K`` must then be a multiple of
the process count.

``K`` need not be a multiple of the device count: the mesh takes the largest number of
local devices ``D' <= D`` that divides ``K`` (so ``K = 6`` on 4 devices uses 3, and a prime
``K`` larger than ``D`` runs on one device). Padding the stack with dummy runs would waste
no fewer devices and would change the history and checkpoints; choose ``K`` a multiple of
``D`` to use every device.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STACK_AXIS = "stack"


def process_share(K: int) -> tuple[int, int]:
    """The runs ``[lo, hi)`` of a stack of ``K`` that this process trains (all of them with one process)."""
    P, i = jax.process_count(), jax.process_index()
    if K % P:
        raise ValueError(
            f"a stack of K={K} runs cannot be split evenly over {P} processes; use a K that is a multiple "
            f"of {P} (each process trains K / {P} runs)."
        )
    return i * (K // P), (i + 1) * (K // P)


def take_share(tree, lo: int, hi: int):
    """Runs ``lo .. hi-1`` of a stack: every array with a leading axis sliced along it."""
    return jax.tree.map(lambda x: x[lo:hi] if eqx.is_array(x) and x.ndim else x, tree)


def gather_shares(tree):
    """Every process's share of a stack, concatenated along the stack axis on every process."""
    from jax.experimental import multihost_utils

    arrays, static = eqx.partition(tree, lambda x: eqx.is_array(x) and x.ndim > 0)
    gathered = multihost_utils.process_allgather(arrays, tiled=True)
    return eqx.combine(jax.tree.map(jax.numpy.asarray, gathered), static)


def gather_rows(rows: list[dict]) -> list[dict]:
    """Log rows of every process's share merged: each per-run value (a list) concatenated
    along the runs; per-step values (``step``, ``lr``) are the same on every process."""
    from jax.experimental import multihost_utils

    fields = [(i, k) for i, row in enumerate(rows) for k in sorted(row) if isinstance(row[k], list)]
    values = multihost_utils.process_allgather([np.asarray(rows[i][k]) for i, k in fields], tiled=True)
    merged = [dict(row) for row in rows]
    for (i, k), v in zip(fields, values):
        merged[i][k] = np.asarray(v).tolist()
    return merged


def stack_mesh(K: int, devices=None) -> Mesh | None:
    """The mesh a stack of ``K`` runs is split over, or ``None`` when it fits one device.

    Args:
        K: the number of stacked runs.
        devices: the devices to use; default ``jax.local_devices()``.

    Returns:
        a one-axis ``Mesh`` (axis ``"stack"``) of the largest number of ``devices`` that
        divides ``K``, or ``None`` when that number is 1.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    used = max(n for n in range(1, len(devices) + 1) if K % n == 0)
    return None if used == 1 else Mesh(np.array(devices[:used]), (STACK_AXIS,))


def shard_stack(tree, mesh: Mesh | None, *, stacked: bool):
    """``tree`` placed on ``mesh``: split along its leading (stack) axis, or replicated.

    ``stacked=True`` splits every array with at least one axis along axis 0 (the arrays of a
    stack of runs); scalars and, with ``stacked=False``, every array are replicated.
    ``mesh=None`` returns ``tree`` unchanged.
    """
    if mesh is None:
        return tree
    split = NamedSharding(mesh, PartitionSpec(STACK_AXIS))
    whole = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if not eqx.is_array(x):
            return x
        return jax.device_put(x, split if stacked and x.ndim else whole)

    return jax.tree.map(put, tree)
