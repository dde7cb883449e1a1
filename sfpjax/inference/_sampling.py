"""Sampling token sequences (and, for HMMs, hidden states) from a process, on device."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._filter import check_initial
from ..processes._ghmm import GHMM, is_hmm
from ..processes._ghmm import check_process as _check_process
from ..processes._kernels import belief_step, next_token_law

__all__ = ["sample"]


def _initial_beliefs(process: GHMM, initial, batch_size: int) -> Float[Array, "B d"]:
    d = process.num_states
    if initial is None:
        return jnp.broadcast_to(process.eta0, (batch_size, d))
    initial = jnp.asarray(initial, process.dtype)
    if initial.shape not in ((d,), (batch_size, d)):
        raise ValueError(
            f"initial must be one belief of shape ({d},) or one per sequence ({batch_size}, {d}); "
            f"got shape {initial.shape}."
        )
    return jnp.broadcast_to(check_initial(process, initial), (batch_size, d))


@eqx.filter_jit
def _sample_tokens(process: GHMM, key, eta: Float[Array, "B d"], seq_len: int) -> Int[Array, "B L"]:
    # Exact GHMM sampling: draw from <<eta|T(x)|1>> and condition, so non-HMM processes work.
    update = jax.vmap(belief_step, in_axes=(None, None, 0, 0))

    def step(eta, k):
        probs = next_token_law(process.T, process.right, eta)
        x = jr.categorical(k, jnp.log(probs), axis=-1)
        return update(process.T, process.right, eta, x)[0], x.astype(jnp.int32)

    _, xs = jax.lax.scan(step, eta, jr.split(key, seq_len))
    return xs.T


@eqx.filter_jit
def _sample_hmm_states(
    process: GHMM, key, eta: Float[Array, "B d"], seq_len: int
) -> tuple[Int[Array, "B L"], Int[Array, "B Lp1"]]:
    V, d, _ = process.T.shape
    init_key, step_key = jr.split(key)
    s0 = jr.categorical(init_key, jnp.log(jnp.maximum(eta, 0.0)), axis=-1)
    # Row s of the (d, V*d) matrix is the joint law Pr(x, s' | s).
    joint = jnp.log(jnp.transpose(process.T, (1, 0, 2)).reshape(d, V * d))

    def step(s, k):
        idx = jr.categorical(k, joint[s], axis=-1)
        x, s_next = idx // d, idx % d
        return s_next, (x.astype(jnp.int32), s_next.astype(jnp.int32))

    _, (xs, ss) = jax.lax.scan(step, s0, jr.split(step_key, seq_len))
    states = jnp.concatenate([s0[None].astype(jnp.int32), ss], axis=0)
    return xs.T, states.T


def sample(
    process: GHMM,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    seq_len: int,
    initial: Float[Array, "*B d"] | None = None,
    return_states: bool = False,
) -> Int[Array, "B L"] | tuple[Int[Array, "B L"], Int[Array, "B Lp1"]]:
    """Draw ``batch_size`` token sequences of length ``seq_len``.

    Args:
        process: a single GHMM; ``jax.vmap`` over stacked processes (and keys) for sweeps.
        key: PRNG key.
        batch_size, seq_len: output shape.
        initial: the belief to start from, ``(d,)`` or one per sequence ``(batch_size, d)``,
            normalized (``<<initial|1>> = 1``, else ``ValueError``); default ``process.eta0`` (the stationary state unless the process was built with
            another initial vector).
        return_states: also return the hidden states (HMMs only): ``states[:, t]`` is the state
            before token ``t`` is emitted, so ``tokens[:, t]`` is emitted on the transition
            ``states[:, t] -> states[:, t + 1]`` (shape ``(batch_size, seq_len + 1)``).

    Tokens are drawn from the exact next-token law ``<<eta|T(x)|1>>`` of the current belief,
    so GHMMs with negative entries sample correctly. With ``return_states`` the HMM is run
    forward through its hidden states instead (the same law of tokens).

    >>> import sfpjax, jax.random as jr
    >>> toks = sfpjax.sample(sfpjax.mess3(), key=jr.key(0), batch_size=4, seq_len=8)
    >>> toks.shape, str(toks.dtype)
    ((4, 8), 'int32')
    """
    _check_process(process)
    if int(batch_size) < 1 or int(seq_len) < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    eta = _initial_beliefs(process, initial, int(batch_size))
    if return_states:
        if not isinstance(process.T, jax.core.Tracer) and not is_hmm(process):
            raise ValueError(
                "return_states=True needs an HMM (non-negative T(x), row-stochastic net operator); "
                "this GHMM has no hidden-state trajectories. Sample tokens only (return_states=False)."
            )
        return _sample_hmm_states(process, key, eta, int(seq_len))
    return _sample_tokens(process, key, eta, int(seq_len))
