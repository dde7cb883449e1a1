"""Data sources for training: fresh samples from a process, or rows of a fixed token array.

A source is an ``eqx.Module`` with one method, ``batch(key, batch_size, seq_len)``, that
returns an int32 array ``(batch_size, seq_len)`` on device. Sources are pytrees, so they are
passed into the jitted training step as arguments (never baked in as constants) and a stack
of ``K`` sources (built with ``eqx.filter_vmap`` or by stacking the leaves) vmaps alongside a
stack of ``K`` models.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray

from ..processes._ghmm import GHMM
from ..inference._sampling import sample

__all__ = ["ArraySource", "ProcessSource", "as_source"]


class ProcessSource(eqx.Module):
    """Fresh sequences ``x_1 .. x_L ~ Pr(. ) = <<eta(0)| T(x_1..x_L) |1>>`` at every call.

    Args:
        process: a :class:`GHMM` (or a stack of them, when the source is used under vmap).

    >>> import jax.random as jr, sfpjax
    >>> src = sfpjax.ProcessSource(sfpjax.mess3())
    >>> src.batch(jr.key(0), 4, 8).shape
    (4, 8)
    """

    process: GHMM

    def __init__(self, process: GHMM):
        if not isinstance(process, GHMM):
            raise ValueError(f"ProcessSource needs a sfpjax.GHMM, got {type(process).__name__}.")
        self.process = process

    @property
    def vocab_size(self) -> int:
        return int(self.process.T.shape[-3])

    def batch(self, key: PRNGKeyArray, batch_size: int, seq_len: int) -> Int[Array, "B L"]:
        return sample(self.process, key=key, batch_size=batch_size, seq_len=seq_len)

    def check(self, vocab_size: int, seq_len: int) -> None:
        """Raise ``ValueError`` unless the source can feed a model with this vocabulary."""
        if self.vocab_size != vocab_size:
            raise ValueError(
                f"the process emits {self.vocab_size} symbols but the model's vocab_size is "
                f"{vocab_size}; build the model with TransformerConfig(vocab_size={self.vocab_size}, ...)."
            )


class ArraySource(eqx.Module):
    """Uniformly drawn rows (with replacement) of a fixed token array, cut to ``seq_len``.

    Rows are cut from their start, so position ``t`` of a batch is position ``t`` of the
    stored sequence (the belief alignment of the rows is kept). Use this to fine-tune on a
    fixed data set, e.g. sequences filtered to one persona.

    Args:
        tokens: int array ``(N, L_max)`` of symbols in ``0 .. V-1`` (``(K, N, L_max)`` for a
            stack of ``K`` sources, one per model of a stack).

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> src = sfpjax.ArraySource(jnp.array([[0, 1, 2, 0], [2, 2, 1, 0]]))
    >>> src.batch(jr.key(0), 3, 2).shape
    (3, 2)
    """

    tokens: Int[Array, "*K N L"]

    def __init__(self, tokens: ArrayLike):
        tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"ArraySource tokens must be integers, got dtype {tokens.dtype}.")
        if tokens.ndim < 2 or tokens.shape[-2] < 1 or tokens.shape[-1] < 1:
            raise ValueError(
                f"ArraySource tokens must have shape (num_sequences, length) with both positive, "
                f"got shape {tokens.shape}."
            )
        self.tokens = tokens.astype(jnp.int32)

    @property
    def vocab_size(self) -> int | None:
        return None

    def batch(self, key: PRNGKeyArray, batch_size: int, seq_len: int) -> Int[Array, "B L"]:
        n, length = self.tokens.shape
        if seq_len > length:
            raise ValueError(f"ArraySource rows have length {length}, shorter than seq_len={seq_len}.")
        rows = jr.randint(key, (batch_size,), 0, n)
        return self.tokens[rows, :seq_len]

    def check(self, vocab_size: int, seq_len: int) -> None:
        """Raise ``ValueError`` if rows are too short or hold tokens outside ``0 .. V-1``."""
        length = self.tokens.shape[-1]
        if seq_len > length:
            raise ValueError(
                f"ArraySource rows have length {length}, shorter than seq_len={seq_len}; "
                f"lower seq_len or supply longer sequences."
            )
        if isinstance(self.tokens, jax.core.Tracer):
            return
        toks = np.asarray(self.tokens)
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"ArraySource tokens must lie in 0 .. {vocab_size - 1} (the model's vocab_size is "
                f"{vocab_size}); found values from {lo} to {hi}."
            )


def as_source(data: GHMM | ProcessSource | ArraySource | ArrayLike | list) -> ProcessSource | ArraySource:
    """A data source from a process, a token array or an existing source.

    >>> import sfpjax
    >>> type(sfpjax.as_source(sfpjax.mess3())).__name__
    'ProcessSource'
    """
    if isinstance(data, (ProcessSource, ArraySource)):
        return data
    if isinstance(data, GHMM):
        return ProcessSource(data)
    if isinstance(data, (jax.Array, np.ndarray)):
        return ArraySource(data)
    raise ValueError(
        f"expected a GHMM, a token array (num_sequences, length), a ProcessSource or an "
        f"ArraySource as the data source, got {type(data).__name__}."
    )
