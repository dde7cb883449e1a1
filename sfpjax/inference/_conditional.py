"""Exact inference on a conditional factored process: factor states, sampling, myopic entropies.

A ``ConditionalProcess`` (``sfpjax.sequential_chain``, ``conditional_product``,
``product_of_experts``, ``conditional_transitions``) is defined by one state per factor
and the update of ``ConditionalProcess.update``; the routines here run that recursion over
sequences, so they are exact for every coupling, including those that are no GHMM.
Where the process is a GHMM (``ConditionalProcess.joint_ghmm``), ``filter_beliefs`` on that
GHMM gives the same beliefs (the Kronecker products of the factor states).

Alignment is that of ``filter_beliefs`` (see its module): entry ``t`` of the output is the
state after the first ``t + 1`` tokens; the initial state is
``ConditionalProcess.eta0`` (joint: ``ConditionalProcess.initial_belief()``).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ..processes._conditional import ConditionalProcess

__all__ = [
    "ConditionalFilterResult",
    "filter_conditional",
    "myopic_entropies_conditional",
    "sample_conditional",
]

# Past this many words at the deepest level the enumeration is refused.
_MAX_ENUMERATED_WORDS = 1 << 22


class ConditionalFilterResult(NamedTuple):
    """Output of :func:`filter_conditional`.

    Attributes:
        factor_beliefs: per factor ``i``, ``(*batch, L, d_i)``: the state ``<<eta^i|`` after
            tokens ``x_1..x_{t+1}`` at entry ``t``, normalized against the ``|1>>`` of the
            variant that made the last move.
        log_normalizers: ``(*batch, L)``; entry ``t`` is ``log P(x_{t+1} | x_1..x_t)``
            (``-inf`` at an impossible step, after which the states stay put).
    """

    factor_beliefs: tuple[Float[Array, "*batch L _d"], ...]
    log_normalizers: Float[Array, "*batch L"]

    @property
    def beliefs(self) -> Float[Array, "*batch L d"]:
        """The joint belief ``(x)_i <<eta^i|``, shape ``(*batch, L, d_0 ... d_{F-1})``.

        Factor 0 most significant, as in ``sfpjax.product``; for a process with a
        ``joint_ghmm`` this is that GHMM's belief.
        """
        out = self.factor_beliefs[0]
        for b in self.factor_beliefs[1:]:
            out = (out[..., :, None] * b[..., None, :]).reshape(out.shape[:-1] + (-1,))
        return out

    @property
    def log_prob(self) -> Float[Array, "*batch"]:
        """``log P(x_1..x_L)``."""
        return self.log_normalizers.sum(-1)

    @property
    def is_possible(self) -> Bool[Array, "*batch"]:
        """False for sequences with a zero-probability step."""
        return jnp.isfinite(self.log_normalizers).all(-1)


def _check_conditional(process) -> None:
    if not isinstance(process, ConditionalProcess):
        raise ValueError(f"expected a sfpjax.ConditionalProcess, got {type(process).__name__}.")
    if process.token_to_tuple.ndim != 2:
        raise ValueError(
            f"expected a single process (token_to_tuple of shape (V, F)), got shape {process.token_to_tuple.shape}. "
            "For a stack of processes, use jax.vmap over the process and its tokens."
        )


@jax.jit
def _filter(process: ConditionalProcess, tokens: Int[Array, "B L"]):
    V = process.vocab_size
    tokens = eqx.error_if(
        tokens, ((tokens < 0) | (tokens >= V)).any(),
        f"tokens outside the alphabet: every token must lie in [0, {V}) for this process with {V} composite "
        "tokens. Remove BOS, EOS and padding ids before filtering.",
    )

    def one(seq):
        def step(etas, x):
            new, logp = process.update(etas, x)
            return new, (new, logp)

        _, (states, logps) = jax.lax.scan(step, process.eta0, seq)
        return states, logps

    return jax.vmap(one)(tokens)


def filter_conditional(process: ConditionalProcess, tokens: Int[ArrayLike, "*batch L"]) -> ConditionalFilterResult:
    """The factor states after every prefix, and the per-step log probabilities.

    Runs ``process.update`` from ``process.eta0`` along each sequence: factor ``i`` moves
    with the variant ``k^t_i(x_t)`` its transition selector picks from the step's tokens,
    and ``log P(x_t | x_1..x_{t-1})`` is the log of the step's joint emission law (the
    normalized product of experts where that is the coupling). This is the process's own
    definition, so it is exact for every coupling; for one with a ``joint_ghmm`` it equals
    ``filter_beliefs`` on it.

    Args:
        process: a single ``ConditionalProcess`` (``jax.vmap`` over a stack and its tokens).
        tokens: composite tokens ``(*batch, L)`` in ``[0, V)``.

    Returns:
        :class:`ConditionalFilterResult` (``beliefs`` gives the joint Kronecker belief).

    Raises:
        ValueError: a process that is not a ``ConditionalProcess``, non-integer tokens; at
            run time, tokens outside the alphabet.

    >>> import jax.numpy as jnp, sfpjax
    >>> p = sfpjax.sequential_chain([sfpjax.mess3(), [sfpjax.mess3(0.1, 0.6), sfpjax.mess3(0.3, 0.8)]],
    ...                             [None, [0, 1, 1]], eta0=[None, [1 / 3] * 3])
    >>> res = sfpjax.filter_conditional(p, jnp.array([[0, 4, 8, 2]]))
    >>> res.beliefs.shape, res.factor_beliefs[1].shape
    ((1, 4, 9), (1, 4, 3))
    """
    _check_conditional(process)
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}.")
    if tokens.ndim < 1 or tokens.shape[-1] < 1:
        raise ValueError(f"tokens must have a non-empty sequence axis; got shape {tokens.shape}.")
    batch, L = tokens.shape[:-1], tokens.shape[-1]
    states, logps = _filter(process, tokens.reshape(-1, L).astype(jnp.int32))
    states = tuple(s.reshape(batch + (L, s.shape[-1])) for s in states)
    return ConditionalFilterResult(states, logps.reshape(batch + (L,)))


@eqx.filter_jit
def _sample(process: ConditionalProcess, key, batch_size: int, seq_len: int) -> Int[Array, "B L"]:
    def one(k):
        def step(etas, k):
            probs = jnp.maximum(process.observation_probs(etas), 0.0)
            x = jr.categorical(k, jnp.log(probs)).astype(jnp.int32)
            new, _ = process.update(etas, x)
            return new, x

        _, xs = jax.lax.scan(step, process.eta0, jr.split(k, seq_len))
        return xs

    return jax.vmap(one)(jr.split(key, batch_size))


def sample_conditional(
    process: ConditionalProcess, *, key: PRNGKeyArray, batch_size: int, seq_len: int
) -> Int[Array, "B L"]:
    """Draw ``batch_size`` sequences of ``seq_len`` composite tokens.

    Each token is drawn from ``process.observation_probs`` of the current factor states,
    which then move by ``process.update``: the process's law exactly (factor states never
    need hidden-state trajectories). ``jax.vmap`` over a stack of processes and keys.

    >>> import jax.random as jr, sfpjax
    >>> p = sfpjax.sequential_chain([sfpjax.mess3(), [sfpjax.mess3(0.1, 0.6), sfpjax.mess3(0.3, 0.8)]],
    ...                             [None, [0, 1, 1]], eta0=[None, [1 / 3] * 3])
    >>> sfpjax.sample_conditional(p, key=jr.key(0), batch_size=4, seq_len=6).shape
    (4, 6)
    """
    _check_conditional(process)
    if int(batch_size) < 1 or int(seq_len) < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    return _sample(process, key, int(batch_size), int(seq_len))


def _entropy_of(probs: Array) -> Array:
    pos = probs > 0
    return -jnp.where(pos, probs * jnp.log(jnp.where(pos, probs, 1)), 0).sum(-1)


@eqx.filter_jit
def _myopic(process: ConditionalProcess, max_depth: int) -> Float[Array, " depth"]:
    # Every word of length max_depth, filtered in one scan: the entropy of the law before
    # step n, weighted by the prefix's probability, summed over words; each prefix of length
    # n appears V**(max_depth - n) times. One scan body compiles far faster than one
    # program per level, and the extra work over the level-by-level tree is a factor < D.
    V = process.vocab_size
    D = max_depth
    words = np.stack(np.unravel_index(np.arange(V ** D), (V,) * D), -1).astype(np.int32) if D else None

    def one(word):
        def step(carry, x):
            etas, logp = carry
            h = jnp.exp(logp) * _entropy_of(process.observation_probs(etas))
            etas, lp = process.update(etas, x)
            return (etas, logp + lp), h

        (etas, logp), hs = jax.lax.scan(step, (process.eta0, jnp.zeros((), process.dtype)), word)
        last = jnp.exp(logp) * _entropy_of(process.observation_probs(etas))
        return jnp.concatenate([hs, last[None]])

    if D == 0:
        return _entropy_of(process.observation_probs(process.eta0))[None]
    per_word = jax.vmap(one)(jnp.asarray(words))  # (V**D, D + 1)
    repeats = jnp.asarray([float(V) ** (D - n) for n in range(D + 1)], process.dtype)
    return per_word.sum(0) / repeats


def myopic_entropies_conditional(process: ConditionalProcess, max_depth: int) -> Float[Array, " depth"]:
    """``H(X_{n+1} | X_{1:n})`` in nats for ``n = 0..max_depth``, exactly, by enumeration.

    Sums ``P(w) H[P(. | w)]`` over all ``V**n`` words ``w`` (impossible words weigh 0),
    following the factor states of every word. The loss floor of a model at context
    position ``n``. Jitted; ``jax.vmap`` over a stack of processes for a parameter grid.

    Raises:
        ValueError: a negative depth, or more than ``2**22`` words at the deepest level.

    >>> import sfpjax
    >>> p = sfpjax.sequential_chain([sfpjax.coin(0.4), [sfpjax.coin(0.3), sfpjax.coin(0.8)]],
    ...                             [None, [0, 1]], eta0=[None, [1.0]])
    >>> [round(float(h), 4) for h in sfpjax.myopic_entropies_conditional(p, 2)]
    [1.2397, 1.2397, 1.2397]
    """
    _check_conditional(process)
    max_depth = int(max_depth)
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}.")
    if process.vocab_size ** max_depth > _MAX_ENUMERATED_WORDS:
        raise ValueError(
            f"max_depth={max_depth} would enumerate {process.vocab_size}**{max_depth} words (more than "
            f"{_MAX_ENUMERATED_WORDS}); lower max_depth, or, for a process with a joint_ghmm, use "
            "sfpjax.mixed_state_presentation on it, which merges equal beliefs."
        )
    return _myopic(process, max_depth)
