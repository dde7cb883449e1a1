"""Placement of a stack of ``K`` runs on the local devices: the ``K`` axis split over a ``Mesh``.

A stacked run (:func:`sfpjax.train_stack`, :func:`sfpjax.finetune_stack`) is ``K``
independent runs vmapped, so splitting the ``K`` axis over ``D`` devices changes where each
run computes, not what: every array whose leading axis is the stack axis is placed with
``NamedSharding(mesh, P("stack"))`` and everything shared by the runs is replicated; the
compiled step then runs ``K / D`` runs on each device with no communication between them.

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
