"""Exact Bayesian filtering: the belief after every prefix of a token sequence.

Alignment convention (the one place it is defined; every other module follows it):

* ``beliefs[..., t, :]`` (0-indexed ``t``) is the belief ``<<eta(x_1..x_{t+1})|`` after reading
  the first ``t + 1`` tokens; ``log_normalizers[..., t]`` is
  ``log Pr(x_{t+1} | x_1..x_t)``. The initial belief ``<<eta(0)|`` (nothing read yet) is not
  part of the output; it is ``process.eta0``.
* A transformer without a BOS token has read ``x_1..x_{t+1}`` at position ``t``, so its
  position ``t`` matches ``beliefs[t]`` and predicts ``x_{t+2}``; its loss floor there is
  ``myopic_entropies[t + 1]``.
* With a BOS token prepended, model position 0 has read nothing (belief ``eta0``, floor
  ``myopic_entropies[0]``) and model position ``t >= 1`` matches ``beliefs[t - 1]``.
  ``beliefs_with_initial`` gives exactly that array.

Impossible prefixes. A step whose conditional probability ``<<eta|T(x)|1>>`` is not
positive has no belief. Such a step gets ``log_normalizer = -inf`` (so the sequence
log-probability is ``-inf``) and the belief is carried over unchanged, so no NaN ever
appears; ``FilterResult.is_possible`` flags the affected sequences. For GHMMs with negative
entries, rounding may leave a tiny positive probability on an impossible word instead of
an exact zero: the result is then a very negative, finite log-probability.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._ghmm import GHMM

__all__ = [
    "FilterResult",
    "belief_update",
    "beliefs_with_initial",
    "filter_beliefs",
    "next_token_probs",
    "sequence_log_prob",
]


class FilterResult(NamedTuple):
    """Output of :func:`filter_beliefs`.

    Attributes:
        beliefs: ``(*batch, L, d)``; entry ``t`` is the belief after tokens ``x_1..x_{t+1}``.
        log_normalizers: ``(*batch, L)``; entry ``t`` is ``log Pr(x_{t+1} | x_1..x_t)``
            (``-inf`` at an impossible step).
    """

    beliefs: Float[Array, "*batch L d"]
    log_normalizers: Float[Array, "*batch L"]

    @property
    def log_prob(self) -> Float[Array, "*batch"]:
        """``log Pr(x_1..x_L)``: the sum of the per-step log normalizers."""
        return self.log_normalizers.sum(-1)

    @property
    def is_possible(self) -> Bool[Array, "*batch"]:
        """False for sequences that contain a zero-probability step."""
        return jnp.isfinite(self.log_normalizers).all(-1)


def _check_process(process: GHMM) -> None:
    if not isinstance(process, GHMM):
        raise ValueError(f"expected a sfpjax.GHMM, got {type(process).__name__}.")
    if process.T.ndim != 3:
        raise ValueError(
            f"expected a single process with T of shape (V, d, d), got T of shape {process.T.shape}. "
            "For a stack of processes, use jax.vmap over the process and its tokens."
        )


def _check_tokens(process: GHMM, tokens) -> Array:
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}.")
    if tokens.ndim < 1:
        raise ValueError("tokens must have at least one axis (the sequence axis), got a scalar.")
    if tokens.shape[-1] < 1:
        raise ValueError("tokens must contain at least one token per sequence (got length 0).")
    V = process.vocab_size
    out_of_range = jnp.any((tokens < 0) | (tokens >= V))
    return eqx.error_if(
        tokens,
        out_of_range,
        f"tokens outside the alphabet: every token must lie in [0, {V}) for this process with "
        f"{V} symbols. Check the vocabulary (a BOS or padding id must be removed before filtering).",
    )


def belief_update(
    process: GHMM, eta: Float[Array, " d"], x: Int[Array, ""]
) -> tuple[Float[Array, " d"], Float[Array, ""]]:
    """One Bayesian update: ``<<eta| T(x) / <<eta|T(x)|1>>`` and ``log <<eta|T(x)|1>>``.

    Single belief, single token (batch with ``jax.vmap``). An impossible symbol returns the
    input belief and ``-inf``.

    >>> import sfpjax, jax.numpy as jnp
    >>> p = sfpjax.mess3()
    >>> eta, logp = sfpjax.belief_update(p, p.eta0, jnp.array(0))
    >>> float(eta.sum())
    1.0...
    """
    unnorm = eta @ process.T[x]
    norm = unnorm @ process.right
    ok = norm > 0
    safe = jnp.where(ok, norm, 1.0)
    new = jnp.where(ok, unnorm / safe, eta)
    return new, jnp.where(ok, jnp.log(safe), -jnp.inf)


# Above this many multiply-adds per column and step, the GEMM beats unrolled elementwise code.
_ELEMENTWISE_MAX_MACS = 256


def _step_elementwise(T, right, rows, x):
    # Small processes: written as (B,)-vector arithmetic so XLA emits a handful of fused,
    # vectorized loops per step instead of a GEMM call plus a selection pass.
    V, d, _ = T.shape
    unnorm = []
    for j in range(d):
        acc = None
        for v in range(V):
            c = rows[0] * T[v, 0, j]
            for i in range(1, d):
                c = c + rows[i] * T[v, i, j]
            acc = c if acc is None else jnp.where(x == v, c, acc)
        unnorm.append(acc)
    norm = unnorm[0] * right[0]
    for j in range(1, d):
        norm = norm + unnorm[j] * right[j]
    return unnorm, norm


def _step_gemm(Tm, right, eta, x):
    # One (V*d, d) x (d, B) product gives every symbol's update; each column keeps its own.
    V = Tm.shape[0] // eta.shape[0]
    cand = (Tm @ eta).reshape(V, eta.shape[0], -1)
    unnorm = cand[0]
    for v in range(1, V):
        unnorm = jnp.where((x == v)[None, :], cand[v], unnorm)
    return unnorm, right @ unnorm


def _filter_time_major(
    process: GHMM, tokens_t: Int[Array, "L B"], eta0: Float[Array, "d B"]
) -> tuple[Float[Array, "L d B"], Float[Array, "L B"]]:
    """Beliefs ``(L, d, B)`` and the positive normalizers ``(L, B)`` (1 at impossible steps).

    The batch is the minor axis so every per-step operation is a long contiguous vector op.
    The logarithm is left to the caller, outside the sequential loop.
    """
    V, d, _ = process.T.shape
    T, right = process.T, process.right
    elementwise = V * d * d <= _ELEMENTWISE_MAX_MACS
    Tm = jnp.swapaxes(T, 1, 2).reshape(V * d, d)

    def step(eta, x):
        if elementwise:
            rows = [eta[i] for i in range(d)]
            unnorm, norm = _step_elementwise(T, right, rows, x)
        else:
            rows = eta
            unnorm, norm = _step_gemm(Tm, right, eta, x)
        ok = norm > 0
        inv = 1.0 / jnp.where(ok, norm, jnp.ones((), norm.dtype))
        # Per-row expressions keep each update a single fused vector loop per state.
        new = jnp.stack([jnp.where(ok, unnorm[j] * inv, rows[j]) for j in range(d)])
        # A non-positive normalizer is reported as 0 so the caller's log gives -inf.
        return new, (new, jnp.where(ok, norm, jnp.zeros((), norm.dtype)))

    _, (beliefs, norms) = jax.lax.scan(step, eta0, tokens_t)
    return beliefs, norms


def _log_normalizers(norms: Float[Array, "L B"]) -> Float[Array, "B L"]:
    norms = norms.T
    pos = norms > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, norms, jnp.ones((), norms.dtype))), -jnp.inf)


@eqx.filter_jit
def filter_beliefs(
    process: GHMM,
    tokens: Int[Array, "*batch L"],
    *,
    initial: Float[Array, "*#batch d"] | None = None,
) -> FilterResult:
    """Beliefs after every prefix, and the per-step log normalizers, for a batch of sequences.

    Computes ``<<eta(x_1..x_t)| = <<eta(0)|T(x_1)...T(x_t) / <<eta(0)|T(x_1..x_t)|1>>``
    for ``t = 1..L`` by normalizing at every step (stable at any length), for HMMs and
    GHMMs alike (the normalizer is ``<<eta|T(x)|1>>``, so negative entries are fine).

    Args:
        process: a single GHMM (``T`` of shape ``(V, d, d)``); ``jax.vmap`` over stacked
            processes and their tokens for sweeps.
        tokens: integer array ``(*batch, L)`` of symbols in ``[0, V)``; any number of
            leading batch axes (none for a single sequence).
        initial: the belief before the first token; default ``process.eta0``. Either one
            row vector ``(d,)`` or one per sequence ``(*batch, d)``.

    Returns:
        :class:`FilterResult` with ``beliefs`` ``(*batch, L, d)`` and ``log_normalizers``
        ``(*batch, L)``. See the module docstring for the alignment convention and for
        zero-probability sequences.

    Raises:
        ValueError: tokens that are not integers, or (at run time, through
            ``eqx.error_if``) tokens outside the alphabet.

    >>> import sfpjax, jax.numpy as jnp
    >>> p = sfpjax.mess3(0.15, 0.6)
    >>> out = sfpjax.filter_beliefs(p, jnp.array([[0, 1, 2, 2]]))
    >>> out.beliefs.shape, out.log_prob.shape
    ((1, 4, 3), (1,))
    """
    _check_process(process)
    tokens = _check_tokens(process, tokens)
    batch_shape, L = tokens.shape[:-1], tokens.shape[-1]
    d = process.num_states
    flat = tokens.reshape(-1, L).astype(jnp.int32)
    B = flat.shape[0]
    if initial is None:
        eta0 = jnp.broadcast_to(process.eta0[:, None], (d, B))
    else:
        initial = jnp.asarray(initial, process.dtype)
        if initial.shape[-1] != d:
            raise ValueError(f"initial must end in the state dimension {d}, got shape {initial.shape}.")
        eta0 = jnp.broadcast_to(initial, batch_shape + (d,)).reshape(B, d).T
    beliefs, norms = _filter_time_major(process, flat.T, eta0)
    beliefs = jnp.transpose(beliefs, (2, 0, 1)).reshape(batch_shape + (L, d))
    lognorm = _log_normalizers(norms).reshape(batch_shape + (L,))
    return FilterResult(beliefs, lognorm)


def beliefs_with_initial(process: GHMM, result: FilterResult) -> Float[Array, "*batch Lp1 d"]:
    """Prepend the initial belief: entry ``t`` is the belief after ``t`` tokens (``t = 0..L``).

    This is the array that aligns with a model that reads a BOS token first.
    """
    b = result.beliefs
    init = jnp.broadcast_to(process.eta0, b.shape[:-2] + (1, b.shape[-1]))
    return jnp.concatenate([init, b], axis=-2)


def next_token_probs(process: GHMM, beliefs: Float[Array, "*batch d"]) -> Float[Array, "*batch V"]:
    """``Pr(x | eta) = <<eta| T(x) |1>>`` for every symbol ``x``, for any batch of beliefs.

    For GHMMs, rounding can leave tiny negative values; they are clipped to zero and the
    distribution renormalized.

    >>> import sfpjax
    >>> p = sfpjax.mess3()
    >>> sfpjax.next_token_probs(p, p.eta0).shape
    (3,)
    """
    Tr = process.T @ process.right  # (V, d): T(x)|1>>
    probs = jnp.maximum(beliefs @ Tr.T, 0.0)
    return probs / probs.sum(-1, keepdims=True)


def sequence_log_prob(process: GHMM, tokens: Int[Array, "*batch L"]) -> Float[Array, "*batch"]:
    """``log Pr(x_1..x_L) = log <<eta(0)| T(x_1..x_L) |1>>`` (``-inf`` if impossible).

    >>> import sfpjax, jax.numpy as jnp
    >>> float(sfpjax.sequence_log_prob(sfpjax.coin(), jnp.array([0, 1, 1])))  # 3 fair flips
    -2.07944...
    """
    return filter_beliefs(process, tokens).log_prob
