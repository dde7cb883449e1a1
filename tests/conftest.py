import os

# Tests compare against float64 oracles; enable x64 before JAX is imported anywhere.
# Default dtypes stay float32 in sfpjax (it asks for float32 explicitly).
os.environ.setdefault("JAX_ENABLE_X64", "1")

from _env import COMPILE_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), COMPILE_FLAGS]))

import jax
import jax.random as jr
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function giving a fresh PRNG key on each call (deterministic per test)."""
    key = [jr.key(0)]

    def _getkey():
        key[0], sub = jr.split(key[0])
        return sub

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: a whole-suite run otherwise
    accumulates every module's executables in one process."""
    yield
    jax.clear_caches()
