"""Factor and sector structure of beliefs over a product state space (seed 000, 2.2-2.3).

A joint latent space ``A_0 (x) A_1 (x) ... (x) A_{F-1}`` with factor dimensions
``factor_dims = (d_0, ..., d_{F-1})`` is flattened row-major, factor 0 most significant:
joint state ``s = s_0 (d_1 ... d_{F-1}) + ... + s_{F-1}``, the same order as the joint
symbols of ``product``. Each factor may be split into sectors (a partition of its
states); a joint sector ``V_sigma`` picks one sector per factor.

All functions here are pure ``jax.numpy`` functions that batch over leading axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._numerics import entropy as _entropy
from .._numerics import kron_vectors as _kron_vectors
from .._numerics import partition_labels as _partition_labels

AnyArray = Array | np.ndarray

__all__ = [
    "factor_marginals",
    "sector_weights",
    "density_matrix",
    "partial_trace",
    "factor_mutual_information",
    "is_product_state",
    "nearest_product_state",
]


def _check_factor_dims(factor_dims, d: int | None = None) -> tuple[int, ...]:
    dims = tuple(int(n) for n in factor_dims)
    if not dims or any(n < 1 for n in dims):
        raise ValueError(f"factor_dims must be a non-empty sequence of positive ints; got {dims}.")
    if d is not None and math.prod(dims) != d:
        raise ValueError(
            f"the joint dimension {d} must equal the product of factor_dims {dims} = {math.prod(dims)}."
        )
    return dims


def joint_sector_labels(sectors, d: int, factor_dims=None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sector label of each joint state, and the shape of the sector grid.

    With ``factor_dims``, ``sectors[f]`` partitions factor ``f``'s states and the label of
    a joint state is the row-major index of its sector tuple ``sigma`` in the grid
    ``(N_0, ..., N_{F-1})``; without it, ``sectors`` partitions the ``d`` joint states
    directly and the grid is ``(K,)``.
    """
    if factor_dims is None:
        labels = _partition_labels(sectors, d, "sectors")
        return labels, (len(sectors),)
    dims = _check_factor_dims(factor_dims, d)
    if len(sectors) != len(dims):
        raise ValueError(
            f"give one partition per factor: factor_dims has {len(dims)} factors, sectors has {len(sectors)}."
        )
    per = [_partition_labels(s, n, f"factor {f} sectors") for f, (s, n) in enumerate(zip(sectors, dims))]
    grid = tuple(len(s) for s in sectors)
    mesh = np.meshgrid(*per, indexing="ij")
    labels = np.ravel_multi_index(tuple(m.ravel() for m in mesh), grid)
    return labels, grid


def factor_marginals(
    beliefs: Float[AnyArray, "*batch d"],
    factor_dims: Sequence[int],
    rights: Sequence[ArrayLike] | None = None,
) -> list[Float[Array, "*batch _"]]:
    """Per-factor marginal beliefs ``<<eta_f|`` of joint beliefs over a product space.

    Factor ``f``'s marginal contracts every other factor ``g`` with its ``|1_g>>``:
    ``eta_f[s_f] = sum_{s_g, g != f} eta[s_0, ..., s_{F-1}] prod_{g != f} 1_g[s_g]``.
    For HMM factors (``|1_g>> = 1``, the default) this is the usual marginal
    distribution (the partial trace of the diagonal density matrix). For a product
    process started in a product state the joint belief stays ``(x)_f <<eta_f(w_f)|``
    and this returns each factor's own belief given its own sub-tokens.

    Args:
        beliefs: joint beliefs, shape ``(..., d_0 * ... * d_{F-1})``.
        factor_dims: ``(d_0, ..., d_{F-1})``, factor 0 most significant.
        rights: the factors' ``|1_f>>`` vectors (default: all ones).

    Returns:
        a list of ``F`` arrays of shapes ``(..., d_f)``.

    >>> import numpy as np, jax.numpy as jnp, sfpjax
    >>> joint = jnp.kron(jnp.array([0.25, 0.75]), jnp.array([0.5, 0.2, 0.3]))
    >>> for m in sfpjax.factor_marginals(joint, (2, 3)):
    ...     print(np.round(np.asarray(m), 3))
    [0.25 0.75]
    [0.5 0.2 0.3]
    """
    beliefs = jnp.asarray(beliefs)
    dims = _check_factor_dims(factor_dims, beliefs.shape[-1])
    if rights is None:
        rights = [jnp.ones((n,), beliefs.dtype) for n in dims]
    else:
        if len(rights) != len(dims):
            raise ValueError(f"give one |1>> per factor: {len(dims)} factors, {len(rights)} rights.")
        rights = [jnp.asarray(r, beliefs.dtype) for r in rights]
        for f, (r, n) in enumerate(zip(rights, dims)):
            if r.shape != (n,):
                raise ValueError(f"rights[{f}] must have shape ({n},) to match factor_dims; got {r.shape}.")
    batch = beliefs.shape[:-1]
    x = beliefs.reshape(*batch, *dims)
    F = len(dims)
    out = []
    for f in range(F):
        m = x
        # Contract from the last factor backwards so the remaining axis indices stay valid.
        for g in reversed(range(F)):
            if g == f:
                continue
            axis = len(batch) + g
            m = jnp.tensordot(m, rights[g], axes=([axis], [0]))
        out.append(m)
    return out


def sector_weights(
    beliefs: Float[AnyArray, "*batch d"],
    sectors: Sequence,
    *,
    factor_dims: Sequence[int] | None = None,
    right: ArrayLike | None = None,
) -> Float[Array, "..."]:
    """Weight of each sector: ``<<eta|P_sigma|1>>`` (the coarse-grained sector distribution).

    Args:
        beliefs: joint beliefs, shape ``(..., d)``.
        sectors: with ``factor_dims``, one partition per factor (``sectors[f]`` is a list
            of index arrays covering ``range(d_f)``); without it, a partition of the
            ``d`` joint states.
        factor_dims: factor dimensions for per-factor partitions.
        right: ``|1>>`` of the joint process (default: all ones).

    Returns:
        shape ``(..., N_0, ..., N_{F-1})`` with ``factor_dims``, else ``(..., K)``.

    >>> import numpy as np, jax.numpy as jnp, sfpjax
    >>> p = 0.7
    >>> rho = jnp.array([p, 0, 0, 0, (1 - p) / 4, (1 - p) / 4, 0, (1 - p) / 4, (1 - p) / 4])
    >>> print(np.round(np.asarray(sfpjax.sector_weights(rho, [[[0], [1, 2]]] * 2, factor_dims=(3, 3))), 3))
    [[0.7 0. ]
     [0.  0.3]]
    """
    beliefs = jnp.asarray(beliefs)
    d = beliefs.shape[-1]
    labels, grid = joint_sector_labels(sectors, d, factor_dims)
    onehot = jnp.asarray(labels[:, None] == np.arange(math.prod(grid))[None, :], beliefs.dtype)
    if right is not None:
        right = jnp.asarray(right, beliefs.dtype)
        if right.shape != (d,):
            raise ValueError(f"right must have shape ({d},); got {right.shape}.")
        onehot = onehot * jnp.broadcast_to(right[:, None], onehot.shape)
    w = beliefs @ onehot
    return w.reshape(*beliefs.shape[:-1], *grid)


def density_matrix(p: Float[AnyArray, "*batch d"]) -> Float[Array, "*batch d d"]:
    """The classical density matrix ``rho = sum_s p(s) |s><s|`` (diagonal), eq. 2.24.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.density_matrix(jnp.array([0.25, 0.75]))
    Array([[0.25, 0.  ],
           [0.  , 0.75]], dtype=float32)
    """
    p = jnp.asarray(p)
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    return p[..., :, None] * jnp.broadcast_to(eye, (*p.shape, p.shape[-1]))


def partial_trace(
    rho: Float[AnyArray, "*batch rows cols"],
    dims: Sequence[int],
    keep: int | Sequence[int],
) -> Float[Array, "*batch k k"]:
    """Partial trace of ``rho`` on ``(x)_f A_f`` over every factor not in ``keep``.

    ``rho_A = Tr_B rho_AB``; ``keep`` lists the factors kept (in increasing order in the
    result). Works for any (not only diagonal) matrices.

    >>> import jax.numpy as jnp, sfpjax
    >>> rho = sfpjax.density_matrix(jnp.kron(jnp.array([0.25, 0.75]), jnp.array([0.5, 0.5])))
    >>> sfpjax.partial_trace(rho, (2, 2), keep=0)
    Array([[0.25, 0.  ],
           [0.  , 0.75]], dtype=float32)
    """
    rho = jnp.asarray(rho)
    if rho.ndim < 2 or rho.shape[-1] != rho.shape[-2]:
        raise ValueError(f"rho must have shape (..., D, D); got {rho.shape}.")
    dims = _check_factor_dims(dims, rho.shape[-1])
    F = len(dims)
    keep = sorted({int(keep)} if isinstance(keep, (int, np.integer)) else {int(k) for k in keep})
    if not keep or any(k < 0 or k >= F for k in keep):
        raise ValueError(f"keep must name factors in range({F}); got {keep}.")
    batch = rho.shape[:-2]
    x = rho.reshape(*batch, *dims, *dims)
    letters = "abcdefghijklmnopqrstuvwxyz"
    if 2 * F > len(letters):
        raise ValueError(f"partial_trace supports at most {len(letters) // 2} factors; got {F}.")
    row = [letters[f] for f in range(F)]
    col = [letters[f] if f not in keep else letters[F + f] for f in range(F)]
    out = [letters[f] for f in keep] + [letters[F + f] for f in keep]
    y = jnp.einsum(f"...{''.join(row)}{''.join(col)}->...{''.join(out)}", x)
    k = math.prod(dims[f] for f in keep)
    return y.reshape(*batch, k, k)


def nearest_product_state(
    joint: Float[AnyArray, "*batch d"], factor_dims: Sequence[int]
) -> Float[Array, "*batch d"]:
    """The product of the marginals, ``(x)_f p_f``: the product distribution closest to
    ``joint`` in ``KL(joint || q)`` (its I-projection onto product states).

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.nearest_product_state(jnp.array([0.5, 0.0, 0.0, 0.5]), (2, 2))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """
    joint = jnp.asarray(joint)
    return _kron_vectors(factor_marginals(joint, factor_dims))


def is_product_state(
    joint: Float[AnyArray, "*batch d"], factor_dims: Sequence[int], atol: float = 1e-6
) -> Bool[Array, "*batch"]:
    """Whether ``rho_AB = rho_A (x) rho_B (x) ...`` (seed 000, section 2.3), up to ``atol``.

    Compares ``joint`` with the product of its marginals entrywise.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.is_product_state(jnp.array([0.5, 0.0, 0.0, 0.5]), (2, 2))
    Array(False, dtype=bool)
    """
    joint = jnp.asarray(joint)
    gap = jnp.abs(joint - nearest_product_state(joint, factor_dims)).max(-1)
    return gap <= atol


def factor_mutual_information(
    joint_probs: Float[AnyArray, "*batch d"], factor_dims: Sequence[int]
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch F F"]]:
    """Correlation between the factors of a joint distribution, in nats.

    Returns ``(total_correlation, pairwise)``: the total correlation
    ``sum_f H(S_f) - H(S_0, ..., S_{F-1})`` (zero iff the joint is a product state) and
    the matrix of pairwise mutual informations ``I(S_f; S_g)`` (zero diagonal). For two
    factors both equal ``I(S_A; S_B)``.

    >>> import jax.numpy as jnp, sfpjax
    >>> tc, pair = sfpjax.factor_mutual_information(jnp.array([0.5, 0.0, 0.0, 0.5]), (2, 2))
    >>> tc.round(4)  # ln 2
    Array(0.6931, dtype=float32)
    """
    joint = jnp.asarray(joint_probs)
    dims = _check_factor_dims(factor_dims, joint.shape[-1])
    F = len(dims)
    batch = joint.shape[:-1]
    marginals = factor_marginals(joint, dims)
    h = [_entropy(m) for m in marginals]
    tc = sum(h[1:], h[0]) - _entropy(joint)
    x = joint.reshape(*batch, *dims)
    zero = jnp.zeros(batch, joint.dtype)
    rows = []
    for f in range(F):
        row = []
        for g in range(F):
            if f == g:
                row.append(zero)
                continue
            others = tuple(len(batch) + k for k in range(F) if k not in (f, g))
            pair = x.sum(others) if others else x
            row.append(h[f] + h[g] - _entropy(pair.reshape(*batch, -1)))
        rows.append(jnp.stack(row, -1))
    return tc, jnp.stack(rows, -2)
