"""The file I/O that training runs, checkpoints and sweeps share.

Atomic writes (a reader sees the old file or all of the new one, never a part),
SHA-256 digests of array leaves, bytes, files and JSON records, and the exact
serialization of PRNG keys (typed or raw). One copy of each, so that a checkpoint, a
run's metrics and a sweep folder agree on what "the same data" and "the same key" mean.
Internal: nothing here is re-exported from ``sfpjax``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "atomic_write",
    "key_from_parts",
    "key_parts",
    "sha256_arrays",
    "sha256_bytes",
    "sha256_file",
    "sha256_json",
    "sha256_tree",
]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of the new one.

    The bytes go to a temporary file in the same directory (named ``.<name>.<random>.tmp``),
    are flushed to disk, and the file is renamed over ``path``; the directory entry is then
    synced, so a power loss after return keeps the new file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; these are ordinary files for every reader.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes: the digest ``sha256sum PATH`` prints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(record: Any) -> str:
    """Hex SHA-256 of a JSON-serializable record, independent of dict key order."""
    return sha256_bytes(json.dumps(record, sort_keys=True).encode())


def sha256_arrays(leaves: Iterable[Any]) -> str:
    """Hex SHA-256 of a sequence of arrays: each one's shape, dtype and bytes, in order."""
    h = hashlib.sha256()
    for leaf in leaves:
        leaf = np.asarray(leaf)
        h.update(str((leaf.shape, leaf.dtype.str)).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def sha256_tree(tree: Any) -> str:
    """Hex SHA-256 of the array leaves of a pytree (non-array leaves are ignored)."""
    return sha256_arrays(jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)))


def key_parts(key: Any) -> tuple[np.ndarray, str | None]:
    """A PRNG key as ``(raw key data, implementation name)``; the name is ``None`` for a raw
    ``uint32`` key. ``key_from_parts`` inverts it exactly."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
    return np.asarray(key), None


def key_from_parts(data: Any, impl: str | None) -> jax.Array:
    """The key that ``key_parts`` split into ``(data, impl)``."""
    data = jnp.asarray(data)
    return jax.random.wrap_key_data(data, impl=impl) if impl else data
