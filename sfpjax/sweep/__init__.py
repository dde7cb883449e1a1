"""Sweeps over process parameters as one compiled, sharded, resumable program."""

from ._engine import Grid as Grid
from ._engine import SweepResult as SweepResult
from ._engine import grid as grid
from ._engine import load_sweep as load_sweep
from ._engine import points as points
from ._engine import run_sweep as run_sweep
