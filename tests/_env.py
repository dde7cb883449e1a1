"""How the tests run XLA, in this process and in the subprocesses some tests start.

The suite is dominated by compiling hundreds of small programs, not by running them:
``--xla_backend_optimization_level=0`` skips LLVM's optimization passes, which cuts the
compile time of an experiment's tiny preset by about a third. The programs compute the
same values (no fast-math is involved); only their speed differs, and speed is measured
by `benchmarks/`, whose scripts check every method against a reference at the default
optimization level before timing it.
"""

import os

COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python on CPU: the tests' compile flags and nothing else
    in ``XLA_FLAGS`` (so a device count forced here does not leak into the child), plus
    ``extra`` (an ``XLA_FLAGS`` given there is added to the compile flags)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(filter(None, [COMPILE_FLAGS, extra.pop("XLA_FLAGS", "")]))
    env.update(extra)
    return env
