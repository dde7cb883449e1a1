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

import collections
import functools
import threading
import weakref
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ..processes._ghmm import GHMM, _default_atol, _is_traced

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
    if jnp.dtype(process.dtype).itemsize < 4:
        raise ValueError(
            f"the process is in {jnp.dtype(process.dtype).name}, too coarse for exact beliefs; "
            "use process.astype(jnp.float32) (or build it in float32, the default)."
        )


def _check_tokens(V: int, tokens) -> Array:
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


def _step_elementwise(T, eta, x):
    # Small processes: <<eta|T(x) as a sum over i of (row i of eta) x (row i of T(x)), each
    # row of T(x) picked per column by a chain of selects. Every operation is elementwise on
    # (d, B), so XLA emits the update as one vectorized loop (no dot, no concatenation).
    V, d, _ = T.shape
    unnorm = None
    for i in range(d):
        row = T[V - 1, i, :, None]
        for v in range(V - 2, -1, -1):
            row = jnp.where((x == v)[None, :], T[v, i, :, None], row)
        term = eta[i][None, :] * row
        unnorm = term if unnorm is None else unnorm + term
    return unnorm


def _symbol_rows(T: Array) -> Array:
    """``T (V, d, d)`` as one ``(V d, d)`` matrix: row ``(x, j)``, column ``i`` is ``T[x, i, j]``."""
    V, d, _ = T.shape
    return jnp.swapaxes(T, 1, 2).reshape(V * d, d)


def _every_symbol(Tm: Array, eta: Float[Array, "d n"]) -> Float[Array, "V d n"]:
    """``<<eta|T(x)`` for every symbol ``x`` and every column of ``eta``, from
    ``Tm = _symbol_rows(T)``: one ``(V d, d) x (d, n)`` product whose long dimension is the
    columns (sequences or words)."""
    d = eta.shape[0]
    return (Tm @ eta).reshape(Tm.shape[0] // d, d, -1)


def _step_gemm(Tm, eta, x):
    # Every symbol's update in one product; each column keeps its own symbol's.
    cand = _every_symbol(Tm, eta)
    V = cand.shape[0]
    unnorm = cand[0]
    for v in range(1, V):
        unnorm = jnp.where((x == v)[None, :], cand[v], unnorm)
    return unnorm


def _leaf_factors(process: GHMM) -> list[GHMM]:
    if process.factors is None:
        return [process]
    return [leaf for f in process.factors for leaf in _leaf_factors(f)]


def _factored_step(factors: list[GHMM]):
    """Step on one belief ``(d_f, B)`` per factor of a product process.

    With a single factor (any process filtered on its full state space) this is the joint
    step.
    The joint normalizer is the product of the factor normalizers; an impossible joint step
    (product not positive) leaves every factor unchanged, as the joint step leaves the
    joint belief, and dividing each factor by its own normalizer then gives exactly the
    Kronecker factors of the joint update. Returns the new beliefs and the joint
    ``log <<eta|T(x)|1>>`` (``-inf`` at an impossible step).
    """
    sizes = [f.vocab_size for f in factors]
    strides = [int(np.prod(sizes[k + 1:], dtype=np.int64)) for k in range(len(sizes))]
    updates = [_factor_update(f) for f in factors]

    def symbol(x, k):
        # decode_tokens for one factor; the most significant factor needs no modulo
        sub = x // strides[k] if strides[k] > 1 else x
        return sub % sizes[k] if k > 0 else sub

    def step(etas, x):
        parts = [upd(eta, symbol(x, k)) for k, (upd, eta) in enumerate(zip(updates, etas))]
        # Materialize the unnormalized updates and normalizers: otherwise XLA fuses them
        # into every consumer, recomputing each d times (measured 4x slower on Mess3).
        parts = jax.lax.optimization_barrier(parts)
        norm = parts[0][1]
        for _, n in parts[1:]:
            norm = norm * n
        ok = norm > 0
        new = []
        for (unnorm, n), eta in zip(parts, etas):
            inv = 1.0 / jnp.where(ok, n, jnp.ones((), n.dtype))
            new.append(jnp.where(ok[None, :], unnorm * inv[None, :], eta))
        # The log is taken here, inside the step's own loop, rather than in a pass over the
        # block (measured 4-8% faster on Mess3).
        return tuple(new), jnp.where(ok, jnp.log(jnp.where(ok, norm, jnp.ones((), norm.dtype))), -jnp.inf)

    return step


def _factor_update(process: GHMM):
    """``eta (d, B), x (B,) -> (<<eta|T(x) (d, B), <<eta|T(x)|1>> (B,))``, column by column."""
    V, d, _ = process.T.shape
    T, right = process.T, process.right
    elementwise = V * d * d <= _ELEMENTWISE_MAX_MACS
    Tm = _symbol_rows(T)  # once, outside the step loop

    def update(eta, x):
        unnorm = _step_elementwise(T, eta, x) if elementwise else _step_gemm(Tm, eta, x)
        norm = unnorm[0] * right[0]
        for j in range(1, d):
            norm = norm + unnorm[j] * right[j]
        return unnorm, norm

    return update


def _kron_rows(blocks: list[Array]) -> Array:
    """``(n, d_0, B), (n, d_1, B), ... -> (n, d_0 d_1 ..., B)``: the Kronecker product per column."""
    out = blocks[0]
    for b in blocks[1:]:
        n, da, B = out.shape
        out = (out[:, :, None, :] * b[:, None, :, :]).reshape(n, da * b.shape[1], B)
    return out


# Time steps per block, and belief entries per chunk (sequences per chunk times the summed
# factor dimensions): a block's beliefs (Lb, d, Bc) stay in cache while they are transposed
# to the output layout, the big output is only ever written in place, and each step's loop
# stays below the size at which XLA:CPU splits a loop over its thread pool (measured on a
# 2-core CPU with 2 MB of L2 per core: the split costs more than it gains on loops this short).
_BLOCK = 32
_CHUNK_ENTRIES = 1536
# On GPUs and TPUs every step is a kernel launch, so a step must cover as many sequences as
# possible: chunks there are bounded only to keep a block's beliefs (Lb, d, Bc) small
# next to the output (2**18 entries: 87,381 Mess3 sequences, 1 MB per step in float32).
_ACCELERATOR_CHUNK_ENTRIES = 1 << 18


def _chunk_size(etas: tuple[Array, ...], entries: int) -> int:
    rows = sum(e.shape[0] for e in etas)
    return max(64, 1 << int(np.log2(max(1, entries // rows))))


def _filter_into(
    step, etas: tuple[Array, ...], tokens: Int[Array, "B L"], beliefs: Array, lognorm: Array, V: int,
    size: int,
) -> tuple[Array, Array]:
    """Run ``step`` over all ``L`` tokens, writing ``(B, L, d)`` beliefs and ``(B, L)`` logs.

    The belief state keeps the batch as its minor axis (long contiguous vector operations);
    the output buffers are loop carries updated with ``dynamic_update_slice``, which XLA
    performs in place, so no full-size intermediate is ever materialized.
    """
    B, L = tokens.shape
    d = beliefs.shape[-1]

    def scan_step(etas, x):
        new, log_norm = step(etas, x)
        return new, (new, log_norm)

    def chunk(b0, nb, beliefs, lognorm):
        def block(t0, n, etas, beliefs, lognorm):
            # Checked block by block while in cache: a separate pass would read all tokens again.
            tok = _check_tokens(V, jax.lax.dynamic_slice(tokens, (b0, t0), (nb, n))).T
            etas, (stack, logs) = jax.lax.scan(scan_step, etas, tok)
            rows = _kron_rows(list(stack)).reshape(n * d, nb)
            beliefs = jax.lax.dynamic_update_slice(beliefs, rows.T.reshape(nb, n, d), (b0, t0, 0))
            lognorm = jax.lax.dynamic_update_slice(lognorm, logs.T, (b0, t0))
            return etas, beliefs, lognorm

        start = tuple(jax.lax.dynamic_slice_in_dim(e, b0, nb, axis=1) for e in etas)
        nblocks, rest = divmod(L, _BLOCK)
        carry = (start, beliefs, lognorm)
        if nblocks:
            carry = jax.lax.fori_loop(0, nblocks, lambda i, c: block(i * _BLOCK, _BLOCK, *c), carry)
        if rest:
            carry = block(nblocks * _BLOCK, rest, *carry)
        return carry[1], carry[2]

    nchunks, rest = divmod(B, size)
    out = (beliefs, lognorm)
    if nchunks:
        out = jax.lax.fori_loop(0, nchunks, lambda i, c: chunk(i * size, size, *c), out)
    if rest:
        out = chunk(nchunks * size, rest, *out)
    return out


def _filter_impl(process, tokens, initial, out):
    batch_shape, L = tokens.shape[:-1], tokens.shape[-1]
    d = process.num_states
    flat = tokens.reshape(-1, L).astype(jnp.int32)
    B = flat.shape[0]
    factors = _leaf_factors(process) if initial is None else [process]
    step = _factored_step(factors)
    if len(factors) > 1:
        etas = tuple(jnp.broadcast_to(f.eta0[:, None], (f.num_states, B)) for f in factors)
    else:
        if initial is None:
            eta0 = jnp.broadcast_to(process.eta0[:, None], (d, B))
        else:
            eta0 = jnp.broadcast_to(initial, batch_shape + (d,)).reshape(B, d).T
        etas = (eta0,)
    if out is None:
        beliefs = jnp.zeros((B, L, d), process.dtype)
        lognorm = jnp.zeros((B, L), process.dtype)
    else:
        beliefs = out.beliefs.reshape(B, L, d)
        lognorm = out.log_normalizers.reshape(B, L)
    cpu_size = min(max(B, 1), _chunk_size(etas, _CHUNK_ENTRIES))
    accelerator_size = min(max(B, 1), _chunk_size(etas, _ACCELERATOR_CHUNK_ENTRIES))

    def run(size):
        return lambda b, n: _filter_into(step, etas, flat, b, n, process.vocab_size, size)

    if cpu_size == accelerator_size:
        beliefs, lognorm = run(cpu_size)(beliefs, lognorm)
    else:
        # Chosen when the program is lowered for its platform: cache-sized chunks on CPU.
        beliefs, lognorm = jax.lax.platform_dependent(
            beliefs, lognorm, cpu=run(cpu_size), default=run(accelerator_size)
        )
    return FilterResult(beliefs.reshape(batch_shape + (L, d)), lognorm.reshape(batch_shape + (L,)))


_filter_fresh = jax.jit(_filter_impl)
_filter_donated = jax.jit(_filter_impl, donate_argnames="out")


def _batch_sharding(tokens) -> tuple[Mesh, object] | None:
    """The mesh and mesh axis that ``tokens`` is split over along its first axis, if that is all."""
    if _is_traced(tokens):
        return None
    sharding = getattr(tokens, "sharding", None)
    if not isinstance(sharding, NamedSharding) or tokens.ndim < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * (tokens.ndim - len(sharding.spec))
    if spec[0] is None or any(s is not None for s in spec[1:]):
        return None
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = int(np.prod([sharding.mesh.shape[n] for n in names]))
    if shards == 1 or tokens.shape[0] % shards:
        return None
    return sharding.mesh, spec[0]


# Replicated copies of the processes recently filtered on a mesh. A process lives on one
# device; the sharded program needs it on every device, and copying it there on every call
# cost about 15% of a two-device Mess3 call at B = 4096 (the devices wait while the host
# copies). Keyed by mesh and leaf identities, checked through weak references, so a copy is
# only reused for the very same arrays (processes are immutable).
_REPLICATED: collections.OrderedDict = collections.OrderedDict()
_REPLICATED_MAX = 8
_REPLICATED_LOCK = threading.Lock()


def _replicated(process: GHMM, mesh: Mesh) -> GHMM:
    leaves = jax.tree.leaves(process)
    if not all(isinstance(leaf, jax.Array) and not _is_traced(leaf) for leaf in leaves):
        return process
    key = (mesh, tuple(id(leaf) for leaf in leaves))
    with _REPLICATED_LOCK:
        hit = _REPLICATED.get(key)
        if hit is not None and all(ref() is leaf for ref, leaf in zip(hit[0], leaves)):
            _REPLICATED.move_to_end(key)
            return hit[1]
    copy = jax.device_put(process, NamedSharding(mesh, PartitionSpec()))
    with _REPLICATED_LOCK:
        _REPLICATED[key] = ([weakref.ref(leaf) for leaf in leaves], copy)
        while len(_REPLICATED) > _REPLICATED_MAX:
            _REPLICATED.popitem(last=False)
    return copy


@functools.lru_cache(maxsize=None)
def _sharded_filter(mesh: Mesh, axis, per_sequence_initial: bool, donate: bool):
    batch = PartitionSpec(axis)
    run = jax.shard_map(
        _filter_impl,
        mesh=mesh,
        in_specs=(PartitionSpec(), batch, batch if per_sequence_initial else PartitionSpec(), batch),
        out_specs=batch,
        # The token check's error branch is replicated while the tokens are per device.
        check_vma=False,
    )
    return jax.jit(run, donate_argnums=(3,) if donate else ())


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
    the tokens on a mesh of them (about 2x the one-device throughput on 2 cores). Tokens
    sharded any other way are filtered by the single-device program.

    Returns:
        :class:`FilterResult` with ``beliefs`` ``(*batch, L, d)`` and ``log_normalizers``
        ``(*batch, L)``. See the module docstring for the alignment convention and for
        zero-probability sequences.

    Raises:
        ValueError: tokens that are not integers or (when concrete) outside the alphabet
            ``[0, V)``, an ``initial`` that is not normalized, an ``out`` of the wrong shape
            or dtype. Under ``jit`` the token range and the normalization are checked at
            run time through ``eqx.error_if``.

    >>> import jax, sfpjax, jax.numpy as jnp
    >>> p = sfpjax.mess3(0.15, 0.6)
    >>> toks = jnp.array([[0, 1, 2, 2]])
    >>> res = sfpjax.filter_beliefs(p, toks)
    >>> res.beliefs.shape, res.log_prob.shape
    ((1, 4, 3), (1,))
    >>> res = sfpjax.filter_beliefs(p, toks, out=res)  # reuses (and invalidates) the old buffers
    >>> mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
    >>> split = jax.device_put(jnp.zeros((8, 16), jnp.int32), jax.NamedSharding(mesh, jax.P("batch")))
    >>> sfpjax.filter_beliefs(p, split).beliefs.shape  # each device filters its own sequences
    (8, 16, 3)
    """
    _check_process(process)
    if not isinstance(tokens, jax.Array):  # asarray returns an Array as is, at tens of us a call
        tokens = jnp.asarray(tokens)
    _check_token_shape(tokens)
    _check_token_values(tokens, process.vocab_size)
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
        initial = _check_initial(process, initial)
    if out is not None:
        _check_out(out, batch_shape + (L, d), batch_shape + (L,), process.dtype)
    sharded = _batch_sharding(tokens)
    if sharded is not None:
        per_sequence = initial is not None and initial.ndim > 1
        if per_sequence:
            initial = jnp.broadcast_to(initial, batch_shape + (d,))
            initial = jax.device_put(initial, NamedSharding(sharded[0], PartitionSpec(sharded[1])))
        run = _sharded_filter(*sharded, per_sequence, out is not None)
        return run(_replicated(process, sharded[0]), tokens, initial, out)
    if out is None:
        return _filter_fresh(process, tokens, initial, None)
    return _filter_donated(process, tokens, initial, out)


@functools.partial(jax.jit, static_argnums=1)
def _any_out_of_range(tokens: Array, V: int) -> Array:
    return ((tokens < 0) | (tokens >= V)).any()


def _check_token_values(tokens: Array, V: int) -> None:
    """Concrete tokens outside ``[0, V)``: a ``ValueError`` naming the first one, before any
    kernel runs (the kernel's own check reports through a runtime callback, whose message
    comes after pages of callback log). Traced tokens are left to the kernel's check."""
    if _is_traced(tokens):
        return
    with jax.ensure_compile_time_eval():  # concrete tokens inside an enclosing jit too
        if not bool(_any_out_of_range(tokens, V)):
            return
    host = np.asarray(tokens)
    bad = np.argwhere((host < 0) | (host >= V))
    first = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"tokens outside the alphabet: every token must lie in [0, {V}) for this process with {V} "
        f"symbols; tokens[{', '.join(map(str, first))}] is {int(host[first])} ({len(bad)} of "
        f"{host.size} tokens are out of range). Check the vocabulary (a BOS or padding id must be "
        "removed before filtering)."
    )


def _check_initial(process: GHMM, initial: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
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
    _check_process(process)
    beliefs = jnp.asarray(beliefs)
    if beliefs.ndim < 1 or beliefs.shape[-1] != process.num_states:
        raise ValueError(
            f"beliefs must end in the state dimension {process.num_states} of the process, got shape "
            f"{beliefs.shape}."
        )
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
