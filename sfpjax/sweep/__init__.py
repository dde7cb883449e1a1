"""Sweeps over process parameters as one compiled, sharded, resumable program."""

from ._chunked import run_chunked_sweep as run_chunked_sweep
from ._engine import run_sweep as run_sweep
from ._grid import Grid as Grid
from ._grid import grid as grid
from ._grid import points as points
from ._store import SweepResult as SweepResult
from ._store import load_sweep as load_sweep
