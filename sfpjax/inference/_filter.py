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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ..processes._ghmm import GHMM, check_process
from ..processes._kernels import belief_step, next_token_law
from ._batched_filter import batch_sharding, check_tokens, filter_donated, filter_fresh, sharded_filter
from .._numerics import default_atol as _default_atol
from .._numerics import is_traced as _is_traced

__all__ = [
    "FilterResult",
    "belief_update",
    "beliefs_with_initial",
    "filter_beliefs",
    "filter_beliefs_reference",
    "next_token_probs",
    "replicate",
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
    return belief_step(process.T, process.right, eta, x)


def filter_beliefs_reference(
    process: GHMM,
    tokens: Int[Array, " L"],
    *,
    initial: Float[Array, " d"] | None = None,
) -> FilterResult:
    """The plain filter of one sequence: a ``lax.scan`` of :func:`belief_update` over ``tokens``.

    The same result as :func:`filter_beliefs` on one sequence, written as the definition:
    ``<<eta(x_1..x_t)| = <<eta(x_1..x_{t-1})| T(x_t) / <<eta(x_1..x_{t-1})|T(x_t)|1>>``,
    starting from ``<<eta(0)|`` (or ``initial``), always on the full ``d``-dimensional
    state (a product process is filtered jointly, not factor by factor). It is the
    reference the tuned batched kernel behind :func:`filter_beliefs` is tested against, and
    a readable starting point for variants. Batch with ``jax.vmap`` (over sequences, or
    over stacked processes and their tokens), as with dynamax's ``hmm_filter``.

    Args:
        process: a single GHMM (``T`` of shape ``(V, d, d)``).
        tokens: one sequence of symbols in ``[0, V)``, shape ``(L,)``.
        initial: the belief before the first token; default ``process.eta0``.

    Returns:
        :class:`FilterResult` with ``beliefs`` ``(L, d)`` and ``log_normalizers`` ``(L,)``,
        aligned as in :func:`filter_beliefs`.

    >>> import jax, sfpjax, jax.numpy as jnp
    >>> p = sfpjax.mess3(0.15, 0.6)
    >>> toks = jnp.array([[0, 1, 2, 2], [2, 2, 1, 0]])
    >>> ref = jax.vmap(lambda t: sfpjax.filter_beliefs_reference(p, t))(toks)
    >>> bool(jnp.allclose(ref.beliefs, sfpjax.filter_beliefs(p, toks).beliefs, atol=1e-6))
    True
    """
    check_process(process)
    if not isinstance(tokens, jax.Array):
        tokens = jnp.asarray(tokens)
    _check_token_shape(tokens)
    if tokens.ndim != 1:
        raise ValueError(
            f"filter_beliefs_reference filters one sequence of shape (L,), got tokens of shape {tokens.shape}; "
            "use jax.vmap over the leading axes (or filter_beliefs for a batch)."
        )
    if initial is None:
        initial = process.eta0
    initial = jnp.asarray(initial, process.dtype)
    if initial.shape != (process.num_states,):
        raise ValueError(f"initial must have shape ({process.num_states},), got {initial.shape}.")
    beliefs, log_normalizers = _reference_scan(process, tokens, initial)
    return FilterResult(beliefs, log_normalizers)


@jax.jit
def _reference_scan(process: GHMM, tokens: Array, initial: Array) -> tuple[Array, Array]:
    def step(eta, x):
        eta, log_norm = belief_update(process, eta, x)
        return eta, (eta, log_norm)

    return jax.lax.scan(step, initial, check_tokens(process.vocab_size, tokens))[1]


def replicate(process: GHMM, mesh: Mesh) -> GHMM:
    """``process`` with every array copied to every device of ``mesh`` (replicated).

    Place a process on a mesh once, before filtering tokens split over that mesh many
    times: :func:`filter_beliefs` runs each device's sequences against the device's own copy
    and uses a process that is already replicated on the tokens' mesh as it is. A process
    that is not is copied to every device on every call (correct, but the devices wait
    for the copies: about 15% of a two-device Mess3 call at ``B = 4096``).

    Args:
        process: a GHMM (its factors, if any, are placed too).
        mesh: the device mesh the tokens are split over.

    Returns:
        the same process, its arrays ``NamedSharding(mesh, PartitionSpec())``-replicated.

    >>> import jax, sfpjax, jax.numpy as jnp
    >>> mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
    >>> p = sfpjax.replicate(sfpjax.mess3(0.15, 0.6), mesh)
    >>> split = jax.device_put(jnp.zeros((8, 16), jnp.int32), jax.NamedSharding(mesh, jax.P("batch")))
    >>> sfpjax.filter_beliefs(p, split).beliefs.shape
    (8, 16, 3)
    """
    if not isinstance(process, GHMM):
        raise ValueError(f"replicate expects a sfpjax.GHMM, got {type(process).__name__}.")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"replicate expects a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return jax.device_put(process, NamedSharding(mesh, PartitionSpec()))


def _is_replicated_on(process: GHMM, mesh: Mesh) -> bool:
    """Whether every array of ``process`` is already replicated over ``mesh`` (a few us)."""
    for leaf in jax.tree.leaves(process):
        sharding = getattr(leaf, "sharding", None)
        if not (
            isinstance(sharding, NamedSharding) and sharding.mesh == mesh and sharding.is_fully_replicated
        ):
            return False
    return True


def filter_beliefs(
    process: GHMM,
    tokens: Int[Array, "*batch L"],
    *,
    initial: Float[Array, "*#batch d"] | None = None,
    out: FilterResult | None = None,
) -> FilterResult:
    """Beliefs after every prefix, and the per-step log normalizers, for a batch of sequences.

    Computes ``<<eta(x_1..x_t)| = <<eta(0)|T(x_1)...T(x_t) / <<eta(0)|T(x_1..x_t)|1>>``
    for ``t = 1..L`` by normalizing at every step (stable at any length), for HMMs and
    GHMMs alike (the normalizer is ``<<eta|T(x)|1>>``, so negative entries are fine).

    A process built by ``sfpjax.product`` (``process.factors`` set) started from its own
    ``eta0`` is filtered one factor at a time: each factor's belief is updated with its
    own symbol and the joint belief is written as their Kronecker product, which is the
    same belief at a fraction of the cost. An explicit ``initial`` uses the joint update.

    Args:
        process: a single GHMM (``T`` of shape ``(V, d, d)``); ``jax.vmap`` over stacked
            processes and their tokens for sweeps.
        tokens: integer array ``(*batch, L)`` of symbols in ``[0, V)``; any number of
            leading batch axes (none for a single sequence).
        initial: the belief before the first token; default ``process.eta0``. Either one
            row vector ``(d,)`` or one per sequence ``(*batch, d)``; each must be
            normalized, ``<<initial|1>> = 1`` (an unnormalized one would shift every
            log-probability by a constant, so it is refused, not rescaled).
        out: a previous result of the same shape and dtype whose buffers are reused for
            this one. They are *donated*: ``out`` must not be used afterwards (its arrays
            are deleted, as with any donated JAX buffer). Filtering many batches in a loop
            with ``res = filter_beliefs(p, toks, out=res)`` writes into memory that is
            already mapped, which on CPU is several times faster than fresh output
            buffers. Inside ``jit`` the donation is up to the enclosing computation.

    Sharding: tokens split over devices along their first axis (a ``NamedSharding`` whose
    spec names a mesh axis for axis 0 only) are filtered on every device at once, each
    device its own sequences, and the result is split the same way. On a multi-core CPU
    this is how to use every core: start JAX with one CPU device per core
    (``jax.config.update("jax_num_cpu_devices", n)`` before the first computation) and put
    the tokens on a mesh of them (about 2x the one-device throughput on 2 cores). Place the
    process on the same mesh once with :func:`replicate`; a process that is not placed there
    is copied to every device on every call. Tokens sharded any other way are filtered by
    the single-device program.

    Returns:
        :class:`FilterResult` with ``beliefs`` ``(*batch, L, d)`` and ``log_normalizers``
        ``(*batch, L)``. See the module docstring for the alignment convention and for
        zero-probability sequences.

    Raises:
        ValueError: tokens that are not integers or (concrete, on one device) outside the
            alphabet ``[0, V)``, an ``initial`` that is not normalized, an ``out`` of the
            wrong shape or dtype. The token range is checked inside the kernel (no extra
            pass over the tokens): under ``jit``, and for tokens split over devices (whose
            program runs asynchronously), a bad token surfaces as a runtime error carrying
            the same message when the result is used.

    >>> import jax, sfpjax, jax.numpy as jnp
    >>> p = sfpjax.mess3(0.15, 0.6)
    >>> toks = jnp.array([[0, 1, 2, 2]])
    >>> res = sfpjax.filter_beliefs(p, toks)
    >>> res.beliefs.shape, res.log_prob.shape
    ((1, 4, 3), (1,))
    >>> res = sfpjax.filter_beliefs(p, toks, out=res)  # reuses (and invalidates) the old buffers
    >>> mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
    >>> split = jax.device_put(jnp.zeros((8, 16), jnp.int32), jax.NamedSharding(mesh, jax.P("batch")))
    >>> placed = sfpjax.replicate(p, mesh)  # once: a copy of the process on every device
    >>> sfpjax.filter_beliefs(placed, split).beliefs.shape  # each device filters its own sequences
    (8, 16, 3)
    """
    check_process(process)
    if not isinstance(tokens, jax.Array):  # asarray returns an Array as is, at tens of us a call
        tokens = jnp.asarray(tokens)
    _check_token_shape(tokens)
    batch_shape, L = tokens.shape[:-1], tokens.shape[-1]
    d = process.num_states
    if initial is not None:
        initial = jnp.asarray(initial, process.dtype)
        if initial.shape[-1:] != (d,):
            raise ValueError(f"initial must end in the state dimension {d}, got shape {initial.shape}.")
        try:
            jnp.broadcast_shapes(initial.shape[:-1], batch_shape)
        except ValueError:
            raise ValueError(
                f"initial of shape {initial.shape} does not broadcast against the token batch "
                f"shape {batch_shape}; give one (d,) vector or one per sequence (*batch, d)."
            ) from None
        initial = check_initial(process, initial)
    if out is not None:
        _check_out(out, batch_shape + (L, d), batch_shape + (L,), process.dtype)
    sharded = batch_sharding(tokens)
    if sharded is not None:
        mesh, axis = sharded
        per_sequence = initial is not None and initial.ndim > 1
        if per_sequence:
            initial = jnp.broadcast_to(initial, batch_shape + (d,))
            initial = jax.device_put(initial, NamedSharding(mesh, PartitionSpec(axis)))
        if not _is_replicated_on(process, mesh):
            process = replicate(process, mesh)
        run = sharded_filter(mesh, axis, per_sequence, out is not None)
    else:
        run = filter_fresh if out is None else filter_donated
    try:
        return FilterResult(*run(process, tokens, initial, out))
    except jax.errors.JaxRuntimeError:
        # The kernel checks the token range itself (a separate check before it would cost a
        # pass over the tokens and a host sync on every call); when it fails on concrete
        # tokens, name the first bad one in a short message instead of the runtime error.
        message = _out_of_range_message(tokens, process.vocab_size)
        if message is None:
            raise
    raise ValueError(message)


def _out_of_range_message(tokens: Array, V: int) -> str | None:
    """For concrete tokens outside ``[0, V)``, a message naming the first one; else ``None``."""
    if _is_traced(tokens):
        return None
    host = np.asarray(tokens)
    bad = np.argwhere((host < 0) | (host >= V))
    if not bad.size:
        return None
    first = tuple(int(i) for i in bad[0])
    return (
        f"tokens outside the alphabet: every token must lie in [0, {V}) for this process with {V} "
        f"symbols; tokens[{', '.join(map(str, first))}] is {int(host[first])} ({len(bad)} of "
        f"{host.size} tokens are out of range). Check the vocabulary (a BOS or padding id must be "
        "removed before filtering)."
    )


def check_initial(process: GHMM, initial: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """``initial`` after checking ``<<initial|1>> = 1`` for every row: a ``ValueError`` naming
    the first bad row when concrete, an ``eqx.error_if`` on the returned array when traced."""
    norm = initial @ process.right
    tol = _default_atol(process.dtype) * jnp.maximum(1.0, jnp.abs(initial) @ jnp.abs(process.right))
    bad = ~(jnp.abs(norm - 1) <= tol)
    if _is_traced(initial, process.right):
        return eqx.error_if(
            initial, bad,
            "sfpjax: initial belief not normalized: <<initial|1>> must be 1 for every sequence "
            "(an unnormalized initial vector shifts every log-probability); divide it by "
            "initial @ process.right.",
        )
    bad = np.atleast_1d(np.asarray(bad))
    if bad.any():
        i = tuple(int(j) for j in np.argwhere(bad)[0])
        value = float(np.atleast_1d(np.asarray(norm))[i])
        where = f" for sequence {i}" if initial.ndim > 1 else ""
        raise ValueError(
            f"initial must be normalized, <<initial|1>> = 1 (for an HMM: entries summing to 1), "
            f"but it is {value:.6g}{where}; an unnormalized initial vector would shift every "
            "log-probability by a constant. Divide it by initial @ process.right."
        )
    return initial


def _check_token_shape(tokens: Array) -> None:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}.")
    if tokens.ndim < 1:
        raise ValueError("tokens must have at least one axis (the sequence axis), got a scalar.")
    if tokens.shape[-1] < 1:
        raise ValueError("tokens must contain at least one token per sequence (got length 0).")


def _check_out(out, beliefs_shape, lognorm_shape, dtype) -> None:
    if not isinstance(out, FilterResult):
        raise ValueError(f"out must be a FilterResult from a previous filter_beliefs call, got {type(out).__name__}.")
    for name, arr, shape in (("beliefs", out.beliefs, beliefs_shape), ("log_normalizers", out.log_normalizers, lognorm_shape)):
        if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
            raise ValueError(
                f"out.{name} must have shape {tuple(shape)} and dtype {jnp.dtype(dtype).name} to be reused for "
                f"these tokens and this process, got shape {tuple(arr.shape)} and dtype {arr.dtype}. "
                "Pass out=None for a fresh result."
            )


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
    check_process(process)
    beliefs = jnp.asarray(beliefs)
    if beliefs.ndim < 1 or beliefs.shape[-1] != process.num_states:
        raise ValueError(
            f"beliefs must end in the state dimension {process.num_states} of the process, got shape "
            f"{beliefs.shape}."
        )
    probs = next_token_law(process.T, process.right, beliefs)
    return probs / probs.sum(-1, keepdims=True)


def sequence_log_prob(process: GHMM, tokens: Int[Array, "*batch L"]) -> Float[Array, "*batch"]:
    """``log Pr(x_1..x_L) = log <<eta(0)| T(x_1..x_L) |1>>`` (``-inf`` if impossible).

    >>> import sfpjax, jax.numpy as jnp
    >>> float(sfpjax.sequence_log_prob(sfpjax.coin(), jnp.array([0, 1, 1])))  # 3 fair flips
    -2.07944...
    """
    return filter_beliefs(process, tokens).log_prob
