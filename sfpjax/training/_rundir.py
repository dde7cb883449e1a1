"""The files of a run directory besides checkpoints: the metrics log and fingerprints.

``run_dir/metrics.jsonl`` holds one JSON row per logged step, appended as training goes
and rewritten atomically on resume (cut back to the checkpoint the run continues from).
A crash can tear the last line; since that row is past the last checkpoint (rows are
written before the checkpoint of their step), reading drops it with a warning.
Fingerprints (SHA-256 of the arrays of a pytree) record what a run was trained on, so that
a resume with other data is refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_write, key_parts, sha256_tree
from ._checkpoint import latest_checkpoint

__all__: list[str] = []


def fingerprint(tree) -> str:
    """SHA-256 of the shapes, dtypes and bytes of the array leaves of ``tree``."""
    return sha256_tree(tree)


def key_data(key) -> np.ndarray:
    """The raw bits of a (typed or raw) PRNG key, for comparing keys."""
    return key_parts(key)[0]


def to_json(x):
    """A JSON value for an array: a number for a scalar, nested lists otherwise."""
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` by ``rows`` atomically (a crash leaves the old file or the new one)."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics log; a torn last line is dropped with a warning.

    Raises:
        ValueError: a line other than the last is not JSON (the file was edited or damaged).
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped the torn last line {line[:60]!r} (a write interrupted by a "
                    "crash); its row lies past the last checkpoint and is logged again on resume.",
                    stacklevel=3,
                )
                break
            raise ValueError(
                f"{path} line {i + 1} is not valid JSON ({e.msg}); only the last line can be torn by "
                "a crash. Delete that line (or move the file aside) and resume again."
            ) from e
    return rows


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


def open_run_dir(run_dir, resume: bool) -> tuple[Path, Path, int | None]:
    """``(run_dir, its metrics.jsonl path, latest checkpoint step or None)``, creating the
    folder. A folder that already holds checkpoints is refused unless ``resume``: existing
    checkpoints are never overwritten."""
    run_dir = Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(run_dir)
    if last is not None and not resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest step {last}); pass resume=True to "
            "continue that run, or choose a new run_dir (existing checkpoints are never overwritten)."
        )
    return run_dir, run_dir / "metrics.jsonl", last
