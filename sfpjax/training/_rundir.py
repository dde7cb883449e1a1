"""The files of a run directory besides checkpoints: the metrics log and fingerprints.

``run_dir/metrics.jsonl`` holds one JSON row per logged step, appended as training goes
and rewritten atomically on resume (cut back to the checkpoint the run continues from).
Fingerprints (SHA-256 of the arrays of a pytree) record what a run was trained on, so that
a resume with other data is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []


def fingerprint(tree) -> str:
    """SHA-256 of the shapes, dtypes and bytes of the array leaves of ``tree``."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)):
        leaf = np.asarray(leaf)
        h.update(str((leaf.shape, leaf.dtype.str)).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def key_data(key) -> np.ndarray:
    """The raw bits of a (typed or raw) PRNG key, for comparing keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def to_json(x):
    """A JSON value for an array: a number for a scalar, nested lists otherwise."""
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` by ``rows`` atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics log."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (flushed per row); ``path=None`` keeps them in memory only."""

    def __init__(self, path: Path | None, rows: list[dict]):
        self.rows = rows
        self._file = open(path, "a") if path is not None else None

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
