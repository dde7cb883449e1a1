"""Data sources for training: fresh samples from a process, or rows of a fixed token array.

A GHMM feeds :class:`ProcessSource`; a conditional factored process
(``sfpjax.sequential_chain`` and the other couplings, GHMMs or not) feeds
:class:`ConditionalSource`, which draws with ``sfpjax.sample_conditional``.

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

from ..processes._conditional import ConditionalProcess
from ..processes._ghmm import GHMM
from ..inference._conditional import sample_conditional
from ..inference._sampling import sample

__all__ = ["ArraySource", "ConditionalSource", "ProcessSource", "as_source"]


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

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of sources (one process per model of a stack)."""
        return self.process.T.ndim == 4

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

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of sources (one token array per model of a stack)."""
        return self.tokens.ndim == 3

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


class ConditionalSource(eqx.Module):
    """Fresh sequences of a conditional factored process at every call.

    Each batch is ``sfpjax.sample_conditional(process, ...)``: every composite token is
    drawn from ``P(x | eta^0, ..., eta^{F-1})`` of the current factor states, which then
    move by ``ConditionalProcess.update``. This is the process's own law for every
    coupling, including those that are no GHMM (``product_of_experts``), so no
    ``joint_ghmm`` is needed. Drawn on device inside the jitted training step.

    Args:
        process: a :class:`sfpjax.ConditionalProcess` (or a stack of them, arrays with a
            leading axis ``K``, when the source feeds a stack of ``K`` models).

    >>> import jax.random as jr, sfpjax
    >>> chain = sfpjax.sequential_chain([sfpjax.coin(0.4), [sfpjax.coin(0.3), sfpjax.coin(0.8)]],
    ...                                 [None, [0, 1]], eta0=[None, [1.0]])
    >>> src = sfpjax.ConditionalSource(chain)
    >>> src.vocab_size, src.batch(jr.key(0), 4, 8).shape
    (4, (4, 8))
    """

    process: ConditionalProcess

    def __init__(self, process: ConditionalProcess):
        if not isinstance(process, ConditionalProcess):
            raise ValueError(
                f"ConditionalSource needs a sfpjax.ConditionalProcess (sequential_chain, conditional_product, "
                f"product_of_experts, conditional_transitions), got {type(process).__name__}; for a GHMM use "
                "ProcessSource."
            )
        if process.token_to_tuple.ndim not in (2, 3):
            raise ValueError(
                f"ConditionalSource needs one process (token_to_tuple of shape (V, F)) or a stack of them "
                f"((K, V, F)); got token_to_tuple of shape {process.token_to_tuple.shape}."
            )
        self.process = process

    @property
    def vocab_size(self) -> int:
        return int(self.process.token_to_tuple.shape[-2])

    @property
    def stacked(self) -> bool:
        """Whether this is a stack of sources (one process per model of a stack)."""
        return self.process.token_to_tuple.ndim == 3

    def batch(self, key: PRNGKeyArray, batch_size: int, seq_len: int) -> Int[Array, "B L"]:
        return sample_conditional(self.process, key=key, batch_size=batch_size, seq_len=seq_len)

    def check(self, vocab_size: int, seq_len: int) -> None:
        """Raise ``ValueError`` unless the source can feed a model with this vocabulary."""
        if self.vocab_size != vocab_size:
            raise ValueError(
                f"the conditional process emits {self.vocab_size} composite tokens but the model's vocab_size "
                f"is {vocab_size}; build the model with TransformerConfig(vocab_size={self.vocab_size}, ...)."
            )


def as_source(
    data: GHMM | ConditionalProcess | ProcessSource | ConditionalSource | ArraySource | ArrayLike | list,
) -> ProcessSource | ConditionalSource | ArraySource:
    """A data source from a process, a token array or an existing source.

    A GHMM gives a :class:`ProcessSource`, a ``ConditionalProcess`` a
    :class:`ConditionalSource`, a token array ``(N, L_max)`` an :class:`ArraySource`.

    >>> import sfpjax
    >>> type(sfpjax.as_source(sfpjax.mess3())).__name__
    'ProcessSource'
    """
    if isinstance(data, (ProcessSource, ConditionalSource, ArraySource)):
        return data
    if isinstance(data, GHMM):
        return ProcessSource(data)
    if isinstance(data, ConditionalProcess):
        return ConditionalSource(data)
    if isinstance(data, (jax.Array, np.ndarray)):
        return ArraySource(data)
    raise ValueError(
        f"expected a GHMM, a token array (num_sequences, length), a ConditionalProcess, a ProcessSource, "
        f"a ConditionalSource or an ArraySource as the data source, got {type(data).__name__}."
    )
