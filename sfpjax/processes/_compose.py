"""Composing processes: products, direct sums, semi-factored processes, symbol noise.

Notation (seed 000, 2.2): a factored process has ``T(x) = T_0(x_0) (x) ... (x)
T_{F-1}(x_{F-1})`` on ``A_0 (x) ... (x) A_{F-1}``; the joint symbol is
``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}`` and the joint state
``s = s_0 (d_1 ... d_{F-1}) + ... + s_{F-1}`` (factor 0 most significant, as in seed 001).
A semi-factored process (SFP) splits each factor into sectors; its ``T(x)`` leaves
every sector product ``V_sigma`` invariant (partition preservation, eq. 2.9) while the
initial state correlates the factors' sectors (eq. 2.26).

Every constructor builds its arrays with ``jax.numpy``, so it traces and vmaps over its
array inputs (stacked factor processes, weights, priors, noise levels). Invalid inputs raise
``ValueError`` when they are concrete; under ``jit``/``vmap`` the same checks are compiled
into the result with ``eqx.error_if`` (see ``sfpjax.GHMM``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._numerics import check_range as _check_range
from .._numerics import default_atol as _default_atol
from .._numerics import index_text as _index
from .._numerics import is_traced as _is_traced
from .._numerics import partition_labels as _partition_labels
from ._ghmm import GHMM, with_factors
from ._kernels import factor_symbols
from ._structure import joint_sector_labels
from ._zoo import partitioned_z1r

__all__ = [
    "product",
    "encode_tokens",
    "decode_tokens",
    "direct_sum",
    "SemiFactoredProcess",
    "semi_factored",
    "partitioned_z1r_sfp",
    "is_partition_preserving",
    "partition_leakage",
    "with_token_noise",
]

# Any shape is accepted here so that a non-scalar gets the ValueError explaining how to vmap.
Scalar = Union[float, int, np.floating, Float[Array, "..."], Float[np.ndarray, "..."]]


def _common_dtype(processes: Sequence[GHMM], what: str):
    if not processes:
        raise ValueError(f"{what} needs at least one process; got none.")
    for k, p in enumerate(processes):
        if not isinstance(p, GHMM):
            raise ValueError(f"{what}: argument {k} must be a GHMM; got {type(p).__name__}.")
    dtypes = {jnp.dtype(p.dtype) for p in processes}
    if len(dtypes) != 1:
        raise ValueError(
            f"{what}: all processes must share one dtype; got {[str(p.dtype) for p in processes]}. "
            "Cast them with .astype(dtype) first."
        )
    return dtypes.pop()


def _kron_transfer(TA: Array, TB: Array) -> Array:
    VA, dA, _ = TA.shape
    VB, dB, _ = TB.shape
    return jnp.einsum("aij,bkl->abikjl", TA, TB).reshape(VA * VB, dA * dB, dA * dB)


def product(*factors: GHMM) -> GHMM:
    """The factored (Kronecker product) process of ``F`` independent factors.

    ``T(x) = T_0(x_0) (x) ... (x) T_{F-1}(x_{F-1})`` with the joint symbol
    ``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}`` (factor 0 most significant; see
    ``encode_tokens``), ``<<eta(0)| = (x)_f <<eta_f(0)|`` and ``|1>> = (x)_f |1_f>>``.
    Joint states are ordered the same way (lexicographic, eq. 2.19).

    >>> import sfpjax
    >>> p = sfpjax.product(sfpjax.z1r(), sfpjax.mess3())
    >>> p.vocab_size, p.num_states
    (6, 9)
    """
    dtype = _common_dtype(factors, "product")
    T, eta0, right = factors[0].T, factors[0].eta0, factors[0].right
    for f in factors[1:]:
        T = _kron_transfer(T, f.T)
        eta0 = jnp.kron(eta0, f.eta0)
        right = jnp.kron(right, f.right)
    # Keeping the factors lets filter_beliefs track one small belief per factor.
    return with_factors(GHMM(T, eta0, right, dtype=dtype), tuple(f.astype(dtype) for f in factors))


def _check_vocab_sizes(vocab_sizes) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in vocab_sizes)
    if not sizes or any(v < 1 for v in sizes):
        raise ValueError(f"vocab_sizes must be a non-empty sequence of positive ints; got {sizes}.")
    if math.prod(sizes) > np.iinfo(np.int32).max:
        raise ValueError(f"the joint alphabet of vocab_sizes {sizes} has more than 2**31 - 1 symbols.")
    return sizes


def _checked_symbols(tokens, V: int, what: str) -> Array:
    """``tokens`` as int32 after checking every entry lies in ``[0, V)``: a ``ValueError``
    naming the first offending entry when concrete, an ``eqx.error_if`` when traced."""
    if not isinstance(tokens, jax.Array):
        tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{what} must be integers, got dtype {tokens.dtype}.")
    if _is_traced(tokens):
        bad = ((tokens < 0) | (tokens >= V)).any()
        return eqx.error_if(
            tokens.astype(jnp.int32), bad,
            f"sfpjax: {what} outside [0, {V}): symbols are not wrapped onto valid ones; remove or "
            "fix the out-of-range entries.",
        )
    host = np.asarray(tokens)
    bad = np.argwhere((host < 0) | (host >= V))
    if bad.size:
        raise ValueError(
            f"{what} must lie in [0, {V}); entry {_index(bad[0])} is {int(host[tuple(bad[0])])} "
            f"({len(bad)} entries are out of range). Symbols are not wrapped onto valid ones."
        )
    return tokens.astype(jnp.int32)


def encode_tokens(
    factor_tokens: Sequence[Int[ArrayLike, "*shape"]], vocab_sizes: Sequence[int]
) -> Int[Array, "*shape"]:
    """Joint symbols ``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}`` of per-factor symbols.

    Args:
        factor_tokens: ``F`` integer arrays of one shape, ``factor_tokens[f]`` in
            ``range(V_f)``.
        vocab_sizes: ``(V_0, ..., V_{F-1})``.

    Raises:
        ValueError: a token outside its factor's alphabet (checked at run time with
            ``eqx.error_if`` under ``jit``), non-integer tokens, mismatched shapes.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.encode_tokens([jnp.array([0, 1, 1]), jnp.array([2, 0, 1])], (2, 3))
    Array([2, 3, 4], dtype=int32)
    """
    sizes = _check_vocab_sizes(vocab_sizes)
    if len(factor_tokens) != len(sizes):
        raise ValueError(
            f"give one token array per factor: {len(sizes)} vocab sizes, {len(factor_tokens)} token arrays."
        )
    shapes = [tuple(np.shape(t)) for t in factor_tokens]
    if len(set(shapes)) != 1:
        raise ValueError(f"all factor token arrays must share one shape; got {shapes}.")
    toks = [_checked_symbols(t, v, f"factor {f} tokens") for f, (t, v) in enumerate(zip(factor_tokens, sizes))]
    out = jnp.zeros(toks[0].shape, jnp.int32)
    for t, v in zip(toks, sizes):
        out = out * v + t
    return out


def decode_tokens(tokens: Int[ArrayLike, "*shape"], vocab_sizes: Sequence[int]) -> tuple[Int[Array, "*shape"], ...]:
    """Per-factor symbols ``(x_0, ..., x_{F-1})`` of joint symbols (inverse of ``encode_tokens``).

    Joint symbols must lie in ``[0, V_0 ... V_{F-1})``; others raise ``ValueError`` (at run
    time through ``eqx.error_if`` under ``jit``) instead of wrapping onto valid symbols.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.decode_tokens(jnp.array([2, 3, 4]), (2, 3))
    (Array([0, 1, 1], dtype=int32), Array([2, 0, 1], dtype=int32))
    """
    sizes = _check_vocab_sizes(vocab_sizes)
    return factor_symbols(_checked_symbols(tokens, math.prod(sizes), "joint tokens"), sizes)


def _check_distribution(p: Array, what: str, dtype) -> Array:
    """``p`` after checking it is a probability distribution (non-negative, summing to 1):
    ``ValueError`` when concrete, ``eqx.error_if`` on the returned array when traced."""
    atol = max(_default_atol(dtype), 1e-6)
    if _is_traced(p):
        bad = (p < -atol).any() | ~(jnp.abs(p.sum() - 1) <= atol * p.size)
        return eqx.error_if(
            p, bad, f"sfpjax: invalid process: {what} must be non-negative and sum to 1 (checked under jit/vmap)."
        )
    pn = np.asarray(p, np.float64)
    if not np.isfinite(pn).all() or (pn < -atol).any() or abs(pn.sum() - 1) > atol * pn.size:
        shown = pn.tolist() if pn.size <= 16 else f"min {pn.min():.6g}"
        raise ValueError(f"{what} must be non-negative and sum to 1; got {shown} (sum {pn.sum():.6g}).")
    return p


def _check_weights(weights, n: int, what: str, dtype) -> Array:
    w = jnp.asarray(weights, dtype)
    if w.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), one weight per component; got {w.shape}.")
    return _check_distribution(w, what, dtype)


def direct_sum(
    processes: Sequence[GHMM],
    weights: Union[Float[Array, " K"], Float[np.ndarray, " K"], Sequence[float]],
    *,
    vocab: Union[str, Sequence[Sequence[int]]] = "shared",
) -> GHMM:
    """The non-ergodic mixture ``(+)_i`` of processes: block-diagonal ``T(x)``.

    ``T(x) = diag(T_0(x), ..., T_{K-1}(x))``, ``<<eta(0)| = (w_0 <<eta_0(0)|, ...,
    w_{K-1} <<eta_{K-1}(0)|)`` and ``|1>> = (|1_0>>, ..., |1_{K-1}>>)``, so
    ``Pr(w) = sum_i w_i Pr_i(w)``: one component is drawn with probability ``w_i`` and
    then runs forever.

    Args:
        processes: the components (one dtype).
        weights: mixture weights ``w_i`` (non-negative, summing to 1), shape ``(K,)``.
        vocab: how component symbols map to global symbols: ``"shared"`` (symbol ``y``
            of every component is global symbol ``y``; all components need the same
            ``V``), ``"disjoint"`` (the global alphabet is the concatenation: component
            ``i``'s symbol ``y`` is ``V_0 + ... + V_{i-1} + y``), or an explicit map: one
            integer sequence per component, ``vocab[i][y]`` the global symbol of local
            symbol ``y`` (the global ``V`` is the largest entry plus one; local symbols
            sent to one global symbol are merged).

    >>> import sfpjax
    >>> p = sfpjax.direct_sum([sfpjax.z1r(), sfpjax.even_process()], [0.5, 0.5])
    >>> p.vocab_size, p.num_states
    (2, 5)
    """
    processes = list(processes)
    dtype = _common_dtype(processes, "direct_sum")
    K = len(processes)
    w = _check_weights(weights, K, "direct_sum weights", dtype)
    Vs = [p.vocab_size for p in processes]
    if isinstance(vocab, str):
        if vocab == "shared":
            if len(set(Vs)) != 1:
                raise ValueError(
                    f"direct_sum with vocab='shared' needs equal vocabulary sizes; got {Vs}. "
                    "Use vocab='disjoint' or an explicit per-component symbol map."
                )
            maps = [np.arange(v) for v in Vs]
        elif vocab == "disjoint":
            offsets = np.cumsum([0] + Vs[:-1])
            maps = [o + np.arange(v) for o, v in zip(offsets, Vs)]
        else:
            raise ValueError(f"vocab must be 'shared', 'disjoint' or a per-component symbol map; got {vocab!r}.")
    else:
        if len(vocab) != K:
            raise ValueError(f"the symbol map needs one entry per component: {K} components, {len(vocab)} maps.")
        maps = []
        for i, (m, v) in enumerate(zip(vocab, Vs)):
            m = np.asarray(m)
            if m.shape != (v,) or not np.issubdtype(m.dtype, np.integer) or (m < 0).any():
                raise ValueError(
                    f"vocab[{i}] must list {v} non-negative global symbols (one per local symbol of "
                    f"component {i}); got {m.tolist()}."
                )
            maps.append(m)
    Vg = int(max(m.max() for m in maps)) + 1
    ds = [p.num_states for p in processes]
    d = sum(ds)
    T = jnp.zeros((Vg, d, d), dtype)
    start = 0
    for p, m, di in zip(processes, maps, ds):
        block = jnp.zeros((Vg, di, di), dtype).at[jnp.asarray(m)].add(p.T)
        T = T.at[:, start:start + di, start:start + di].set(block)
        start += di
    eta0 = jnp.concatenate([w[i] * p.eta0 for i, p in enumerate(processes)])
    right = jnp.concatenate([p.right for p in processes])
    return GHMM(T, eta0, right, dtype=dtype)


class SemiFactoredProcess(eqx.Module):
    """A semi-factored process (SFP): product dynamics, sector-correlated initial state.

    Attributes:
        process: the joint ``GHMM`` (Kronecker-product ``T(x)``; ``<<eta(0)|`` mixes the
            sector products ``V_sigma`` with ``prior``).
        factors: the factor processes ``(P_0, ..., P_{F-1})``.
        sectors: per factor, the partition of its states, as tuples of state indices.
        prior: joint prior over sector assignments, shape ``(N_0, ..., N_{F-1})``.
    """

    process: GHMM
    factors: tuple[GHMM, ...]
    prior: Float[Array, "..."]
    sectors: tuple[tuple[tuple[int, ...], ...], ...] = eqx.field(static=True)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        return tuple(f.num_states for f in self.factors)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(f.vocab_size for f in self.factors)

    def joint_sectors(self) -> list[np.ndarray]:
        """Joint-state index sets of the sector products ``V_sigma``, ``sigma`` in row-major order."""
        labels, grid = joint_sector_labels(self.sectors, math.prod(self.factor_dims), self.factor_dims)
        return [np.flatnonzero(labels == k) for k in range(math.prod(grid))]


def _check_factor_partition_preserving(T: Array, sectors, f: int, atol: float) -> Array:
    """``T`` after checking it is block diagonal in ``sectors`` (``eqx.error_if`` when traced)."""
    leak = partition_leakage(T, sectors)
    if _is_traced(leak):
        return eqx.error_if(
            T, leak > atol,
            f"sfpjax: invalid process: factor {f} does not preserve its sectors (some T(x) maps a state "
            "of one sector to another; checked under jit/vmap). Every T(x) must be block diagonal "
            "with respect to the factor's sectors.",
        )
    if float(np.max(np.asarray(leak))) > atol:
        labels, _ = joint_sector_labels(sectors, T.shape[-1])
        mask = labels[:, None] != labels[None, :]
        Tn = np.abs(np.asarray(T)) * mask
        x, i, j = np.unravel_index(np.argmax(Tn), Tn.shape)
        raise ValueError(
            f"factor {f} does not preserve its sectors: T({x})[{i}, {j}] = {float(np.asarray(T)[x, i, j]):.6g} "
            f"maps state {i} (sector {labels[i]}) to state {j} (sector {labels[j]}). "
            "Every T(x) must be block diagonal with respect to the factor's sectors."
        )
    return T


def semi_factored(
    factors: Sequence[GHMM],
    sectors: Sequence[Sequence[Sequence[int]]],
    sector_prior: Union[Float[Array, "..."], Float[np.ndarray, "..."], Sequence],
) -> SemiFactoredProcess:
    """A semi-factored process from partition-preserving factors and a sector prior.

    Each factor ``P_f`` comes with a partition of its states into sectors
    ``I^(f)_1 (+) ... (+) I^(f)_{N_f}`` that every ``T_f(x)`` preserves (block
    diagonal). The joint dynamics are the product ``T(x) = (x)_f T_f(x_f)`` (see
    ``product``), which then preserves every sector product
    ``V_sigma = (x)_f I^(f)_{sigma(f)}`` (eq. 2.9). The initial state is

        ``<<eta(0)| = sum_sigma prior[sigma] <<eta_sigma|``,
        ``<<eta_sigma| = (x)_f P_sigma(f) <<eta_f(0)| / <<eta_f(0)| P_sigma(f) |1_f>>``,

    where ``P_i`` zeroes every state outside sector ``i``: the product initial state
    restricted to ``V_sigma`` and renormalized, so ``prior[sigma]`` is exactly the
    weight of ``V_sigma`` (see ``sector_weights``). Every sector a prior puts mass on must
    carry weight under its factor's ``<<eta_f(0)|``.

    Args:
        factors: ``F`` GHMMs (one dtype), each preserving its sectors.
        sectors: ``sectors[f]`` is a list of state-index sequences partitioning
            ``range(d_f)``.
        sector_prior: joint prior over sector assignments, shape ``(N_0, ..., N_{F-1})``,
            non-negative, summing to 1.

    Raises:
        ValueError: sectors that overlap or miss states, a factor that mixes sectors, a
            prior of the wrong shape or not a distribution, a sector with prior mass but
            zero weight under the factor's initial state.

    >>> import jax.numpy as jnp, sfpjax
    >>> z = sfpjax.partitioned_z1r()
    >>> sfp = sfpjax.semi_factored([z, z], [[[0], [1, 2]]] * 2, jnp.array([[0.5, 0], [0, 0.5]]))
    >>> sfp.process.eta0
    Array([0.5  , 0.   , 0.   , 0.   , 0.125, 0.125, 0.   , 0.125, 0.125], dtype=float32)
    """
    factors = list(factors)
    dtype = _common_dtype(factors, "semi_factored")
    F = len(factors)
    if len(sectors) != F:
        raise ValueError(f"give one sector partition per factor: {F} factors, {len(sectors)} partitions.")
    dims = [p.num_states for p in factors]
    for f, (p, s) in enumerate(zip(factors, sectors)):
        _partition_labels(s, dims[f], f"factor {f} sectors")
        T_checked = _check_factor_partition_preserving(p.T, s, f, _default_atol(dtype))
        if T_checked is not p.T:
            factors[f] = eqx.tree_at(lambda q: q.T, p, T_checked)
    grid = tuple(len(s) for s in sectors)
    prior = jnp.asarray(sector_prior, dtype)
    if prior.shape != grid:
        raise ValueError(
            f"sector_prior must have shape {grid} (one entry per sector assignment, "
            f"N_f = number of sectors of factor f); got {prior.shape}."
        )
    prior = _check_distribution(prior, "sector_prior", dtype)
    # restricted[f][i] = P_i <<eta_f(0)| normalized by its weight; stacked (N_f, d_f).
    restricted = []
    for f, (p, s) in enumerate(zip(factors, sectors)):
        labels, _ = joint_sector_labels(s, dims[f])
        masks = jnp.asarray(labels[None, :] == np.arange(len(s))[:, None], dtype)
        parts = masks * jnp.broadcast_to(p.eta0[None, :], masks.shape)
        mass = parts @ p.right
        if _is_traced(mass, prior):
            marg = prior.sum(tuple(g for g in range(F) if g != f))
            mass = eqx.error_if(
                mass, ((jnp.abs(mass) <= _default_atol(dtype)) & (marg > 0)).any(),
                f"sfpjax: invalid process: a sector of factor {f} has prior mass but zero weight under "
                "the factor's initial state <<eta_f(0)| (checked under jit/vmap); give the factor an "
                "initial state with weight on every sector or put no prior mass there.",
            )
        else:
            marg = np.asarray(prior, np.float64).sum(tuple(g for g in range(F) if g != f))
            bad = np.flatnonzero((np.abs(np.asarray(mass)) <= _default_atol(dtype)) & (marg > 0))
            if bad.size:
                raise ValueError(
                    f"sector {int(bad[0])} of factor {f} has prior mass {marg[bad[0]]:.6g} but zero weight "
                    "under the factor's initial state <<eta_f(0)|; give the factor an initial state with "
                    "weight on every sector (e.g. with .with_initial) or put no prior mass there."
                )
        safe = jnp.where(mass == 0, 1, mass)
        restricted.append(parts / jnp.broadcast_to(safe[:, None], parts.shape))
    # eta0 = sum_sigma prior[sigma] (x)_f restricted[f][sigma_f], contracted factor by factor.
    letters = "abcdefghijklmnopqrstuvwxyz"
    if 2 * F > len(letters):
        raise ValueError(f"semi_factored supports at most {len(letters) // 2} factors; got {F}.")
    spec = (letters[:F] + "," + ",".join(letters[f] + letters[F + f] for f in range(F))
            + "->" + letters[F:2 * F])
    eta0 = jnp.einsum(spec, prior, *restricted).reshape(-1)
    joint = product(*factors)
    process = GHMM(joint.T, eta0, joint.right, dtype=dtype)
    sect = tuple(tuple(tuple(int(i) for i in np.asarray(idx)) for idx in s) for s in sectors)
    return SemiFactoredProcess(process=process, factors=tuple(factors), prior=prior, sectors=sect)


def partitioned_z1r_sfp(
    p_matched: Scalar = 0.5, *, p_mismatched: Scalar = 0.0, dtype=None
) -> SemiFactoredProcess:
    """The canonical SFP of seed 000: ``partitioned_z1r (x) partitioned_z1r``, matched sectors.

    Each factor is split ``span{S0} (+) span{S1, SR}``; the prior puts mass
    ``p_matched`` on ``(S0-sector, S0-sector)`` and ``1 - p_matched`` on
    ``({S1,SR}, {S1,SR})``, so the initial belief is eq. 2.26:

        ``rho = p |S0,S0><S0,S0| + (1-p)/4 sum_{s,t in {S1,SR}} |s,t><s,t|``.

    ``p_mismatched = q > 0`` moves mass ``q`` onto the mismatched blocks (``q/2`` on each of
    ``(S0, {S1,SR})`` and ``({S1,SR}, S0)``); the matched blocks keep ``p (1 - q)`` and
    ``(1 - p)(1 - q)``. The sector prior is a product (the factors independent) when
    ``(1 - q) sqrt(p (1 - p)) = q / 2``, e.g. ``p = q = 0.5``. The default ``q = 0`` is
    eq. 2.26 exactly.

    Joint symbols ``A, B, C, D = (0,0), (0,1), (1,0), (1,1)`` are ``0, 1, 2, 3`` (eq. 2.20).
    Vmappable over ``p_matched`` and ``p_mismatched``.

    >>> import numpy as np, sfpjax
    >>> print(np.round(np.asarray(sfpjax.partitioned_z1r_sfp(0.6).process.eta0), 3))
    [0.6 0.  0.  0.  0.1 0.1 0.  0.1 0.1]
    """
    p_matched = _check_range("p_matched", p_matched, 0.0, 1.0)
    p_mismatched = _check_range("p_mismatched", p_mismatched, 0.0, 1.0)
    z = partitioned_z1r(dtype=dtype)
    p = jnp.asarray(p_matched, z.dtype)
    q = jnp.asarray(p_mismatched, z.dtype)
    prior = jnp.stack([jnp.stack([p * (1 - q), q / 2]), jnp.stack([q / 2, (1 - p) * (1 - q)])])
    return semi_factored([z, z], [[[0], [1, 2]], [[0], [1, 2]]], prior)


def partition_leakage(
    T: Union[GHMM, Float[Array, "..."], Float[np.ndarray, "..."]],
    sectors: Sequence,
    *,
    factor_dims: Sequence[int] | None = None,
) -> Float[Array, "*batch"]:
    """The largest ``|T(x)_{ij}|`` with ``i`` and ``j`` in different sectors.

    Zero exactly when every ``T(x)`` is block diagonal, i.e. preserves every sector.
    ``sectors`` is either a partition of the ``d`` joint states, or, with
    ``factor_dims``, one partition per factor (the joint sectors are then the products
    ``V_sigma``). Traceable; batches over leading axes of ``T``.

    >>> import sfpjax
    >>> sfpjax.partition_leakage(sfpjax.z1r(), [[0], [1, 2]])
    Array(1., dtype=float32)
    """
    if isinstance(T, GHMM):
        T = T.T
    T = jnp.asarray(T)
    if T.ndim < 3 or T.shape[-1] != T.shape[-2]:
        raise ValueError(f"T must have shape (..., V, d, d); got {T.shape}.")
    labels, _ = joint_sector_labels(sectors, T.shape[-1], factor_dims)
    mask = jnp.asarray(labels[:, None] != labels[None, :], T.dtype)
    mask = jnp.broadcast_to(mask, T.shape)
    return (jnp.abs(T) * mask).max((-3, -2, -1))


def is_partition_preserving(
    T: Union[GHMM, Float[Array, "..."], Float[np.ndarray, "..."]],
    sectors: Sequence,
    *,
    factor_dims: Sequence[int] | None = None,
    atol: float | None = None,
) -> bool:
    """Whether every ``T(x)`` maps each sector ``V_sigma`` into itself (eq. 2.9).

    Equivalently each ``T(x)`` is block diagonal in the sector decomposition: every
    entry between states of different sectors is at most ``atol`` in absolute value
    (default scales with the dtype). ``sectors`` as in ``partition_leakage``. Needs
    concrete arrays; for a stacked ``T`` every process must pass.

    >>> import sfpjax
    >>> sfp = sfpjax.partitioned_z1r_sfp(0.7)
    >>> sfpjax.is_partition_preserving(sfp.process, [[[0], [1, 2]]] * 2, factor_dims=(3, 3))
    True
    """
    leak = partition_leakage(T, sectors, factor_dims=factor_dims)
    if _is_traced(leak):
        raise ValueError("is_partition_preserving needs concrete arrays; use partition_leakage inside jit/vmap.")
    atol = _default_atol(leak.dtype) if atol is None else atol
    return bool(np.all(np.asarray(leak) <= atol))


def with_token_noise(process: GHMM, eps: Scalar) -> GHMM:
    """Symbol blur: with probability ``eps`` the emitted symbol is replaced by a uniform one.

    ``T'(x) = (1 - eps) T(x) + (eps / V) sum_y T(y)``. The net operator, ``|1>>`` and
    ``<<eta(0)|`` are unchanged, and ``Pr'(x_1..x_n)`` is the law of the original symbols
    passed through an i.i.d. symmetric channel. For ``0 < eps < 1`` this breaks exact
    structure: deterministic emissions become stochastic, and on a product process
    ``T'(x)`` is no longer a Kronecker product ``T_0'(x_0) (x) T_1'(x_1)`` (the noise
    hits the joint symbol, so the factors' beliefs become correlated). Each ``T'(x)`` is
    a combination of the ``T(y)``, so block diagonality (partition preservation) is
    kept. Vmappable over ``eps``.

    >>> import numpy as np, sfpjax
    >>> print(np.round(np.asarray(sfpjax.with_token_noise(sfpjax.coin(1.0), 0.2).T[:, 0, 0]), 3))
    [0.1 0.9]
    """
    if not isinstance(process, GHMM):
        raise ValueError(f"with_token_noise needs a GHMM; got {type(process).__name__}.")
    if np.shape(eps) != ():
        raise ValueError(f"eps must be a scalar (vmap over a grid of eps); got shape {np.shape(eps)}.")
    eps = _check_range("eps", eps, 0, 1)
    eps = jnp.asarray(eps, process.dtype)
    V = process.vocab_size
    T = (1 - eps) * process.T + (eps / V) * jnp.broadcast_to(process.T.sum(-3, keepdims=True), process.T.shape)
    return GHMM(T, process.eta0, process.right, dtype=process.dtype)
