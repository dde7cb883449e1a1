"""Subspace geometry of probes and activations: principal angles and PCA spectra.

These run on the host in float64 NumPy: the number of principal angles and the numerical
rank depend on the values, so the output shapes are not static and the functions are not
traceable. Inputs may be NumPy or (concrete) JAX arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jaxtyping import ArrayLike, Float

__all__ = [
    "DirectionOverlaps",
    "SubspaceAngles",
    "direction_overlaps",
    "n_components_for_variance",
    "pca_explained_variance",
    "subspace_angles",
]


def _host(x, name: str, fn: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{fn} runs on the host; {name} is a traced value. Call it outside jit/vmap.")
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{fn}: {name} has non-finite entries (NaN or inf).")
    return a


def _orthonormal_basis(M: np.ndarray, rtol: float) -> np.ndarray:
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return U[:, :0]
    return U[:, s > rtol * s[0]]


@dataclasses.dataclass(frozen=True)
class SubspaceAngles:
    """Principal angles between two subspaces.

    Attributes:
        angles: principal angles in radians, ascending, shape ``(min(r1, r2),)`` with ``r1``,
            ``r2`` the numerical ranks.
        overlap: mean squared cosine of the angles, ``||Q1^T Q2||_F^2 / min(r1, r2)``: 1 when
            one subspace contains the other, 0 when they are orthogonal.
        ranks: ``(r1, r2)``.
    """

    angles: np.ndarray
    overlap: float
    ranks: tuple[int, int]


def subspace_angles(
    W1: Float[ArrayLike, "_d_act _k1"] | Float[ArrayLike, " _d_act"],
    W2: Float[ArrayLike, "_d_act _k2"] | Float[ArrayLike, " _d_act"],
    *,
    rtol: float = 1e-8,
) -> SubspaceAngles:
    """Principal angles between the column spaces of two matrices in activation space.

    For probe weights ``W`` of shape ``(d_act, d_target)`` the column space is the
    subspace of the residual stream that the probe reads (``x W`` only depends on the
    projection of ``x`` onto it); a 1-D input (a steering vector) is one column. With
    orthonormal bases ``Q1``, ``Q2`` of the column spaces (singular values below
    ``rtol * s_max`` dropped), the cosines of the principal angles are the singular values
    of ``Q1^T Q2`` (Bjorck and Golub, 1973).

    Args:
        W1, W2: matrices ``(d_act, k)`` or vectors ``(d_act,)`` with the same ``d_act``.
        rtol: relative cutoff of the numerical rank.

    Returns:
        ``SubspaceAngles(angles, overlap, ranks)``.

    >>> import numpy as np, sfpjax
    >>> e = np.eye(4)
    >>> r = sfpjax.subspace_angles(e[:, :2], e[:, 1:3])
    >>> np.round(r.angles, 4).tolist(), r.overlap
    ([0.0, 1.5708], 0.5)
    """
    fn = "subspace_angles"
    A = _host(W1, "W1", fn)
    B = _host(W2, "W2", fn)
    A = A[:, None] if A.ndim == 1 else A
    B = B[:, None] if B.ndim == 1 else B
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"{fn}: W1 and W2 must be (d_act, k) matrices or (d_act,) vectors with the same d_act "
            f"(probe weights are (d_act, d_target)); got shapes {np.shape(W1)} and {np.shape(W2)}."
        )
    Q1 = _orthonormal_basis(A, rtol)
    Q2 = _orthonormal_basis(B, rtol)
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        raise ValueError(f"{fn}: W1 or W2 is zero; a subspace angle needs a non-zero subspace.")
    cos = np.clip(np.linalg.svd(Q1.T @ Q2, compute_uv=False), 0.0, 1.0)
    angles = np.sort(np.arccos(cos))
    k = min(Q1.shape[1], Q2.shape[1])
    return SubspaceAngles(
        angles=angles[:k],
        overlap=float(np.sum(cos[:k] ** 2) / k),
        ranks=(int(Q1.shape[1]), int(Q2.shape[1])),
    )


@dataclasses.dataclass(frozen=True)
class DirectionOverlaps:
    """Pairwise principal-angle geometry of named sets of directions (``direction_overlaps``).

    Attributes:
        names: the set names, in the order of the matrices' rows and columns.
        overlap: ``(m, m)``, ``subspace_angles(W_i, W_j).overlap`` (mean squared cosine of
            the principal angles; 1 on the diagonal).
        min_angle: ``(m, m)``, the smallest principal angle in radians (0: the subspaces
            share a direction).
        max_cosine: ``(m, m)``, ``cos(min_angle)``; for two single directions the absolute
            cosine similarity.
        chance: ``(m, m)``, the expected overlap of uniformly random subspaces of the same
            ranks in ``d_act`` dimensions, ``max(r_i, r_j) / d_act`` (off the diagonal).
        ranks: numerical rank of each set.
    """

    names: tuple[str, ...]
    overlap: np.ndarray
    min_angle: np.ndarray
    max_cosine: np.ndarray
    chance: np.ndarray
    ranks: tuple[int, ...]

    def table(self) -> list[dict]:
        """One row per unordered pair ``i < j``: names, overlap, min angle (degrees), chance."""
        rows = []
        for i in range(len(self.names)):
            for j in range(i + 1, len(self.names)):
                rows.append(
                    {
                        "a": self.names[i],
                        "b": self.names[j],
                        "overlap": float(self.overlap[i, j]),
                        "min_angle_deg": float(np.degrees(self.min_angle[i, j])),
                        "max_cosine": float(self.max_cosine[i, j]),
                        "chance": float(self.chance[i, j]),
                    }
                )
        return rows


def direction_overlaps(
    directions: Mapping[str, Float[ArrayLike, "_d_act _k"] | Float[ArrayLike, " _d_act"]],
    *,
    rtol: float = 1e-8,
) -> DirectionOverlaps:
    """Principal angles and overlaps between every pair of named sets of directions.

    Each entry is a vector ``(d_act,)`` or a matrix ``(d_act, k)`` whose columns span a
    subspace of activation space; every pair goes through :func:`subspace_angles`.
    Examples in the residual basis: a steering vector; probe weights ``W`` ``(d_model,
    d_target)`` (the subspace the probe reads); the directions of a rank-``r`` LoRA update
    ``Delta W`` (``x -> x W`` layout). On a matrix that reads the residual stream
    (``W_in``, ``W_QKV``) the update only sees the projection of ``x`` onto the column
    space of ``Delta W`` ``(d_model, d_out)``; on one that writes to it (``W_out``, ``W_O``)
    it writes within the row space, so pass ``Delta W.T``. In the PyTorch convention
    ``Delta W = B A`` these are the rows of ``A`` and the columns of ``B``.

    Args:
        directions: mapping from a name to a vector or matrix with ``d_act`` rows; at least
            two entries, all with the same ``d_act``.
        rtol: relative cutoff of the numerical rank (as in ``subspace_angles``).

    >>> import numpy as np, sfpjax
    >>> e = np.eye(4)
    >>> r = sfpjax.direction_overlaps({"probe": e[:, :2], "steer": e[:, 0] + e[:, 2], "lora_B": e[:, 3]})
    >>> np.round(r.overlap, 3).tolist()
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]
    >>> float(r.chance[0, 1]), round(float(np.degrees(r.min_angle[0, 1])), 1)
    (0.5, 45.0)
    """
    if not isinstance(directions, Mapping) or len(directions) < 2:
        raise ValueError("direction_overlaps: directions must be a mapping from names to arrays, with at least two entries.")
    names = tuple(str(n) for n in directions)
    mats = [_host(directions[n], f"directions[{n!r}]", "direction_overlaps") for n in directions]
    widths = {n: m.shape[0] if m.ndim in (1, 2) else None for n, m in zip(names, mats)}
    if None in widths.values() or len(set(widths.values())) != 1:
        shapes = {n: tuple(m.shape) for n, m in zip(names, mats)}
        raise ValueError(
            f"direction_overlaps: every entry must be (d_act,) or (d_act, k) with one shared d_act; got {shapes}."
        )
    d = next(iter(widths.values()))
    m = len(names)
    overlap = np.eye(m)
    min_angle = np.zeros((m, m))
    ranks = [0] * m
    for i in range(m):
        for j in range(i + 1, m):
            r = subspace_angles(mats[i], mats[j], rtol=rtol)
            overlap[i, j] = overlap[j, i] = r.overlap
            min_angle[i, j] = min_angle[j, i] = r.angles[0]
            ranks[i], ranks[j] = r.ranks
    rk = np.asarray(ranks, np.float64)
    chance = np.maximum(rk[:, None], rk[None, :]) / d
    np.fill_diagonal(chance, 1.0)
    return DirectionOverlaps(names, overlap, min_angle, np.cos(min_angle), chance, tuple(ranks))


def pca_explained_variance(acts: Float[ArrayLike, "... d"]) -> np.ndarray:
    """Fraction of the variance of ``acts`` along each principal component, descending.

    Leading axes are flattened into rows; rows are centered at their mean. Entry ``k`` is
    ``s_k^2 / sum_j s_j^2`` with ``s`` the singular values of the centered data, so the
    entries sum to 1. Shape ``(min(n, d),)``.

    >>> import numpy as np, sfpjax
    >>> x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    >>> sfpjax.pca_explained_variance(x).round(2).tolist()
    [0.8, 0.2]
    """
    fn = "pca_explained_variance"
    X = _host(acts, "acts", fn)
    if X.ndim < 2 or X.shape[-1] == 0:
        raise ValueError(f"{fn}: acts must have shape (*batch, d) with at least one row axis, got {X.shape}.")
    X = X.reshape(-1, X.shape[-1])
    if X.shape[0] < 2:
        raise ValueError(f"{fn}: need at least 2 rows to measure variance, got {X.shape[0]}.")
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    var = s**2
    total = var.sum()
    if not total > 0:
        raise ValueError(f"{fn}: acts has zero variance (all rows are equal).")
    return var / total


def n_components_for_variance(acts: Float[ArrayLike, "... d"], threshold: float = 0.95) -> int:
    """The fewest principal components explaining at least ``threshold`` of the variance.

    The smallest ``k`` with ``sum_{j<k} pca_explained_variance(acts)[j] >= threshold``
    (compared with a 1e-12 slack so that data exactly on a ``k``-plane gives ``k`` at
    ``threshold = 1``).

    >>> import numpy as np, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> plane = rng.normal(size=(100, 2)) @ rng.normal(size=(2, 6))
    >>> sfpjax.n_components_for_variance(plane, 0.999)
    2
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}.")
    frac = pca_explained_variance(acts)
    k = int(np.searchsorted(np.cumsum(frac), threshold - 1e-12) + 1)
    return min(k, frac.size)
