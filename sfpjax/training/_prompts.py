"""Prompt sources for post-training: fresh prompts from a process, or rows of a fixed array.

A source is any object with ``prompt_len``, ``vocab_size`` and ``prompts(key, batch_size) ->
PromptBatch``; `PromptSource` and `ArrayPrompts` are the two built in.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ..inference._filter import filter_beliefs
from ..inference._sampling import sample
from ..processes._ghmm import GHMM, is_hmm

__all__ = ["ArrayPrompts", "PromptBatch", "PromptSource"]


class PromptBatch(NamedTuple):
    """Prompts and what a reward may read about them (one row per prompt).

    Attributes:
        tokens: ``(B, P)`` the prompts ``x_1 .. x_P``.
        states: ``(B, P + 1)`` hidden states of an HMM (``states[:, t]`` is the state before
            token ``t``; ``states[:, P]`` the state the completion starts from), or ``None``.
        beliefs: ``(B, d)`` the exact belief ``<<eta(x_1 .. x_P)|`` after the prompt, or ``None``.
    """

    tokens: Int[Array, "B P"]
    states: Int[Array, "B Pp1"] | None
    beliefs: Float[Array, "B d"] | None


class PromptSource(eqx.Module):
    """Fresh prompts ``x_1 .. x_P`` drawn from a process at every step.

    Args:
        process: the GHMM the prompts come from.
        prompt_len: ``P``.
        initial: the belief to start from (default ``process.eta0``); e.g. the indicator of
            one component of a direct sum so that every prompt comes from it.
        with_states: also draw the hidden states (HMMs only) so rewards can read them.
        with_beliefs: also compute the exact belief after each prompt.

    >>> import jax.random as jr, sfpjax
    >>> src = sfpjax.PromptSource(sfpjax.mess3(), 4, with_states=True, with_beliefs=True)
    >>> b = src.prompts(jr.key(0), 2)
    >>> b.tokens.shape, b.states.shape, b.beliefs.shape
    ((2, 4), (2, 5), (2, 3))
    """

    process: GHMM
    initial: Float[Array, " d"] | None
    prompt_len: int = eqx.field(static=True)
    with_states: bool = eqx.field(static=True)
    with_beliefs: bool = eqx.field(static=True)

    def __init__(self, process: GHMM, prompt_len: int, *, initial=None, with_states: bool = False,
                 with_beliefs: bool = False):
        if not isinstance(process, GHMM):
            raise ValueError(f"PromptSource needs a sfpjax.GHMM, got {type(process).__name__}.")
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0:
            raise ValueError(f"prompt_len must be an int >= 0, got {prompt_len!r}.")
        if with_states and not isinstance(process.T, jax.core.Tracer) and not is_hmm(process):
            raise ValueError(
                "with_states=True needs an HMM (non-negative T(x), row-stochastic net operator); "
                "a GHMM has no hidden-state trajectories. Use with_beliefs=True instead."
            )
        self.process = process
        self.initial = None if initial is None else jnp.asarray(initial, process.dtype)
        if self.initial is not None and self.initial.shape != (process.num_states,):
            raise ValueError(
                f"initial must be one belief of shape ({process.num_states},), got {self.initial.shape}."
            )
        self.prompt_len = prompt_len
        self.with_states = bool(with_states)
        self.with_beliefs = bool(with_beliefs)

    @property
    def vocab_size(self) -> int:
        return int(self.process.T.shape[-3])

    def prompts(self, key: PRNGKeyArray, batch_size: int) -> PromptBatch:
        """Draw ``batch_size`` prompts (and their states and beliefs, if asked)."""
        P, B = self.prompt_len, int(batch_size)
        eta = self.process.eta0 if self.initial is None else self.initial
        states = beliefs = None
        if P == 0:
            tokens = jnp.zeros((B, 0), jnp.int32)
            if self.with_states:
                tokens, states = sample(self.process, key=key, batch_size=B, seq_len=1,
                                        initial=eta, return_states=True)
                tokens, states = tokens[:, :0], states[:, :1]
        elif self.with_states:
            tokens, states = sample(self.process, key=key, batch_size=B, seq_len=P, initial=eta,
                                    return_states=True)
        else:
            tokens = sample(self.process, key=key, batch_size=B, seq_len=P, initial=eta)
        if self.with_beliefs:
            if P == 0:
                beliefs = jnp.broadcast_to(eta, (B, eta.shape[0]))
            else:
                beliefs = filter_beliefs(self.process, tokens, initial=eta).beliefs[:, -1]
        return PromptBatch(tokens, states, beliefs)


class ArrayPrompts(eqx.Module):
    """Prompts drawn uniformly (with replacement) from the rows of a fixed array.

    Args:
        tokens: ``(N, P)`` prompts.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> sfpjax.ArrayPrompts(jnp.array([[0, 1], [1, 1]])).prompts(jr.key(0), 3).tokens.shape
    (3, 2)
    """

    tokens: Int[Array, "N P"]

    def __init__(self, tokens: Int[ArrayLike, "N P"]):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[0] < 1:
            raise ValueError(
                f"ArrayPrompts needs a non-empty integer array of shape (N, prompt_len), got shape "
                f"{tokens.shape} and dtype {tokens.dtype}."
            )
        self.tokens = tokens.astype(jnp.int32)

    @property
    def prompt_len(self) -> int:
        return int(self.tokens.shape[-1])

    @property
    def vocab_size(self) -> int | None:
        return None

    def prompts(self, key: PRNGKeyArray, batch_size: int) -> PromptBatch:
        rows = jr.randint(key, (int(batch_size),), 0, self.tokens.shape[0])
        return PromptBatch(self.tokens[rows], None, None)
