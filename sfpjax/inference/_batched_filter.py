"""The tuned batched filter behind ``filter_beliefs``: many sequences, every prefix, in place.

The mathematics is the belief update of :mod:`sfpjax.processes._kernels`
(``<<eta|T(x)`` normalized by ``<<eta|T(x)|1>>``, an impossible step keeping the belief);
this module only lays it out for speed: beliefs as ``(d, B)`` columns (the batch as the
minor axis), ``<<eta|T(x)`` of a small process by elementwise selects instead of a gather,
one belief per factor of a product process, sequences in cache-sized chunks and time in
blocks, and the output written in place. ``filter_beliefs_reference`` in ``_filter.py`` is
the plain per-sequence ``lax.scan`` it must agree with.

Internal: imported by ``_filter.py``; nothing here is public API.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int

from .._numerics import is_traced
from ..processes._ghmm import GHMM
from ..processes._kernels import condition, every_symbol, factor_symbols, log_normalizer, normalizer, symbol_rows

__all__ = ["batch_sharding", "check_tokens", "filter_batch", "filter_donated", "filter_fresh", "sharded_filter"]


def check_tokens(V: int, tokens) -> Array:
    """``tokens`` unchanged, with a run-time error if any lies outside ``[0, V)``."""
    out_of_range = jnp.any((tokens < 0) | (tokens >= V))
    return eqx.error_if(
        tokens,
        out_of_range,
        f"tokens outside the alphabet: every token must lie in [0, {V}) for this process with "
        f"{V} symbols. Check the vocabulary (a BOS or padding id must be removed before filtering).",
    )


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


def _step_gemm(Tm, eta, x):
    # Every symbol's update in one product; each column keeps its own symbol's.
    cand = every_symbol(Tm, eta)
    V = cand.shape[0]
    unnorm = cand[0]
    for v in range(1, V):
        unnorm = jnp.where((x == v)[None, :], cand[v], unnorm)
    return unnorm


def _leaf_factors(process: GHMM) -> list[GHMM]:
    if process.factors is None:
        return [process]
    return [leaf for f in process.factors for leaf in _leaf_factors(f)]


def _column_step(factors: list[GHMM]):
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
    updates = [_factor_update(f) for f in factors]

    def step(etas, x):
        xs = factor_symbols(x, sizes)
        parts = [upd(eta, x_f) for upd, eta, x_f in zip(updates, etas, xs)]
        # Materialize the unnormalized updates and normalizers: otherwise XLA fuses them
        # into every consumer, recomputing each d times (measured 4x slower on Mess3).
        parts = jax.lax.optimization_barrier(parts)
        norm = parts[0][1]
        for _, n in parts[1:]:
            norm = norm * n
        ok = norm > 0
        new = tuple(condition(unnorm, n, eta, ok) for (unnorm, n), eta in zip(parts, etas))
        # The log is taken here, inside the step's own loop, rather than in a pass over the
        # block (measured 4-8% faster on Mess3).
        return new, log_normalizer(norm, ok)

    return step


def _factor_update(process: GHMM):
    """``eta (d, B), x (B,) -> (<<eta|T(x) (d, B), <<eta|T(x)|1>> (B,))``, column by column."""
    V, d, _ = process.T.shape
    T, right = process.T, process.right
    elementwise = V * d * d <= _ELEMENTWISE_MAX_MACS
    Tm = symbol_rows(T)  # once, outside the step loop

    def update(eta, x):
        unnorm = _step_elementwise(T, eta, x) if elementwise else _step_gemm(Tm, eta, x)
        return unnorm, normalizer(unnorm, right)

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
            tok = check_tokens(V, jax.lax.dynamic_slice(tokens, (b0, t0), (nb, n))).T
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


def filter_batch(process: GHMM, tokens, initial, out) -> tuple[Array, Array]:
    """Beliefs ``(*batch, L, d)`` and log normalizers ``(*batch, L)`` of ``tokens (*batch, L)``.

    ``initial``: ``None`` (start from ``eta0``, one belief per factor of a product process),
    a ``(d,)`` or a per-sequence ``(*batch, d)`` belief (the joint update). ``out``: ``None``
    or a ``(beliefs, log_normalizers)`` pair whose buffers are written in place.
    """
    batch_shape, L = tokens.shape[:-1], tokens.shape[-1]
    d = process.num_states
    flat = tokens.reshape(-1, L).astype(jnp.int32)
    B = flat.shape[0]
    factors = _leaf_factors(process) if initial is None else [process]
    step = _column_step(factors)
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
        beliefs, lognorm = out
        beliefs, lognorm = beliefs.reshape(B, L, d), lognorm.reshape(B, L)
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
    return beliefs.reshape(batch_shape + (L, d)), lognorm.reshape(batch_shape + (L,))


filter_fresh = jax.jit(filter_batch)
filter_donated = jax.jit(filter_batch, donate_argnames="out")



def batch_sharding(tokens) -> tuple[Mesh, object] | None:
    """The mesh and mesh axis that ``tokens`` is split over along its first axis, if that is all."""
    if is_traced(tokens):
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



@functools.lru_cache(maxsize=None)
def sharded_filter(mesh: Mesh, axis, per_sequence_initial: bool, donate: bool):
    batch = PartitionSpec(axis)
    run = jax.shard_map(
        filter_batch,
        mesh=mesh,
        in_specs=(PartitionSpec(), batch, batch if per_sequence_initial else PartitionSpec(), batch),
        out_specs=batch,
        # The token check's error branch is replicated while the tokens are per device.
        check_vma=False,
    )
    return jax.jit(run, donate_argnums=(3,) if donate else ())
