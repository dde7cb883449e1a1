"""Linear probes from activations to belief states, their metrics and their inverse.

Notation (seed 000, section 1): a probe is the affine map ``L(x) = x W + b`` from a
residual-stream activation row vector ``x`` (``d_act`` entries) to a belief ``<<eta|``
(``d_target`` entries). Activations are rows so that a batch ``X`` of shape ``(n, d_act)``
maps to ``X W + b`` of shape ``(n, d_target)``; ``W`` has shape ``(d_act, d_target)``.

Fitting runs on the host in float64 NumPy whatever the input dtype (and whether or not
JAX x64 is enabled): activations are float32, the belief simplex of a long-context
process is ill-conditioned, and an SVD in float64 keeps the fit exact to ~1e-12 on
noiseless data. The fitted probe is stored in the (canonicalized) dtype of the
activations. Predictions, metrics and the inverse are plain ``jnp`` functions that work
under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real

from .._numerics import is_traced as _is_traced
from ..processes._structure import factor_marginals

__all__ = [
    "LinearProbe",
    "ProbeMetrics",
    "belief_centroids",
    "concat_sites",
    "evaluate_probe",
    "fit_factor_probes",
    "fit_probe",
    "probe_inverse",
    "probe_r2",
    "probe_rmse",
    "train_test_split",
]


def _host(x, name: str, fn: str) -> np.ndarray:
    """A float64 NumPy copy of a concrete array; tracers get a clear error."""
    if _is_traced(x):
        raise ValueError(
            f"{fn} fits on the host in float64 and needs concrete arrays; {name} is a traced "
            "value. Call it outside jax.jit / jax.vmap (fit once per model, then vmap the probes)."
        )
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}.")
    return a.astype(np.float64)


def _canonical_float(x) -> jnp.dtype:
    dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not np.issubdtype(dt, np.floating):
        dt = np.dtype(np.float32)
    return jnp.dtype(jax.dtypes.canonicalize_dtype(dt))


def _flatten_rows(
    acts: np.ndarray, targets: np.ndarray, weights: np.ndarray | None, fn: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and values, and flatten leading axes into rows ``(n, d)``."""
    if acts.ndim < 1 or targets.ndim < 1:
        raise ValueError(
            f"{fn}: acts and targets need a trailing feature axis, got shapes {acts.shape} and "
            f"{targets.shape}."
        )
    if acts.shape[:-1] != targets.shape[:-1]:
        raise ValueError(
            f"{fn}: acts (*batch, d_act) and targets (*batch, d_target) must have the same leading "
            f"(row) axes; got acts {acts.shape} and targets {targets.shape}."
        )
    lead = acts.shape[:-1]
    n = int(np.prod(lead))
    if n == 0:
        raise ValueError(f"{fn}: got no rows (acts shape {acts.shape}).")
    if acts.shape[-1] == 0 or targets.shape[-1] == 0:
        raise ValueError(
            f"{fn}: acts and targets need at least one feature; got shapes {acts.shape} and "
            f"{targets.shape}."
        )
    X = acts.reshape(n, acts.shape[-1])
    Y = targets.reshape(n, targets.shape[-1])
    for name, a in (("acts", X), ("targets", Y)):
        if not np.all(np.isfinite(a)):
            bad = int(np.sum(~np.isfinite(a).all(-1)))
            raise ValueError(f"{fn}: {name} has non-finite entries (NaN or inf) in {bad} row(s).")
    if weights is None:
        w = np.ones((n,), np.float64)
    else:
        if weights.shape != lead:
            raise ValueError(
                f"{fn}: weights must have the leading shape of acts {lead} (one weight per row), "
                f"got {weights.shape}."
            )
        w = weights.reshape(n)
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{fn}: weights has non-finite entries.")
        if np.any(w < 0):
            raise ValueError(
                f"{fn}: weights must be non-negative (e.g. prefix probabilities); got minimum "
                f"{w.min():.3g}."
            )
        if not w.sum() > 0:
            raise ValueError(f"{fn}: weights sum to zero; at least one row needs positive weight.")
    return X, Y, w


class LinearProbe(eqx.Module):
    """The affine probe ``L(x) = x W + b`` from activations to beliefs.

    Attributes:
        W: weights, shape ``(d_act, d_target)``; predicted belief change per activation change.
        b: intercept, shape ``(d_target,)``.

    Calling the probe maps activations of shape ``(*batch, d_act)`` to predictions of
    shape ``(*batch, d_target)``; activations are cast to the probe's dtype.

    >>> import jax.numpy as jnp, sfpjax
    >>> probe = sfpjax.LinearProbe(jnp.eye(2), jnp.array([0.5, -0.5]))
    >>> probe(jnp.ones((4, 2))).shape
    (4, 2)
    """

    W: Float[Array, "d_act d_target"]
    b: Float[Array, " d_target"]

    def __init__(self, W: Float[ArrayLike, "_d_act _d_target"], b: Float[ArrayLike, " _d_target"]):
        if np.ndim(W) != 2:
            raise ValueError(f"W must have shape (d_act, d_target), got shape {np.shape(W)}.")
        if np.shape(b) != (np.shape(W)[1],):
            raise ValueError(
                f"b must have shape (d_target,) = ({np.shape(W)[1]},) to match W of shape "
                f"{np.shape(W)}, got {np.shape(b)}."
            )
        W = jnp.asarray(W)
        self.W = W
        self.b = jnp.asarray(b, W.dtype)

    @property
    def d_act(self) -> int:
        return self.W.shape[-2]

    @property
    def d_target(self) -> int:
        return self.W.shape[-1]

    def __call__(self, acts: Float[ArrayLike, "... d_act"]) -> Float[Array, "... d_target"]:
        acts = jnp.asarray(acts)
        if acts.ndim < 1 or acts.shape[-1] != self.W.shape[-2]:
            raise ValueError(
                f"acts must have shape (*batch, d_act) with d_act = {self.W.shape[-2]} to match "
                f"the probe, got {acts.shape}."
            )
        out = acts.astype(self.W.dtype) @ self.W
        return out + self.b.reshape((1,) * (out.ndim - 1) + (-1,))

    def predict(self, acts: Float[ArrayLike, "... d_act"]) -> Float[Array, "... d_target"]:
        """Same as calling the probe: ``acts @ W + b``."""
        return self(acts)


def belief_centroids(
    acts: Float[ArrayLike, "... d_act"],
    targets: Float[ArrayLike, "... d_target"],
    *,
    weights: Real[ArrayLike, "..."] | None = None,
    atol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by belief class and average activations within each class.

    Two rows are in the same class when their targets agree after rounding to a grid of
    spacing ``atol`` (the convention of seed 001: the full belief vector rounded to 1e-6).
    For class ``k`` with rows ``i`` and weights ``w_i`` (all 1 by default) this returns the
    centroid ``c_k = sum_i w_i x_i / sum_i w_i``, the class belief
    ``eta_k = sum_i w_i eta_i / sum_i w_i`` and the class weight ``W_k = sum_i w_i``
    (classes whose rows all have zero weight get the unweighted means and weight 0).

    Args:
        acts: activations, shape ``(*batch, d_act)``.
        targets: beliefs, shape ``(*batch, d_target)``.
        weights: optional non-negative row weights, shape ``(*batch,)`` (e.g. prefix
            probabilities ``Pr(x_1..x_t)``).
        atol: rounding grid of the belief classes.

    Returns:
        ``(centroids (K, d_act), class_targets (K, d_target), class_weights (K,))`` as float64
        NumPy arrays, classes in lexicographic order of their rounded beliefs.

    >>> import numpy as np, sfpjax
    >>> acts = np.array([[0.0], [2.0], [5.0]])
    >>> beliefs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> c, eta, w = sfpjax.belief_centroids(acts, beliefs)
    >>> c.ravel().tolist(), w.tolist()  # class (0, 1) sorts before class (1, 0)
    ([5.0, 1.0], [1.0, 2.0])
    """
    fn = "belief_centroids"
    X, Y, w = _flatten_rows(
        _host(acts, "acts", fn),
        _host(targets, "targets", fn),
        None if weights is None else _host(weights, "weights", fn),
        fn,
    )
    if not atol > 0:
        raise ValueError(f"{fn}: atol must be positive, got {atol}.")
    return _centroids(X, Y, w, atol)


def _centroids(X, Y, w, atol):
    keys = np.round(Y / atol).astype(np.int64)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    K = int(inv.max()) + 1
    Wk = np.bincount(inv, weights=w, minlength=K)
    # Classes with zero total weight still get a well-defined centroid (the plain mean).
    use_w = np.where(Wk[inv] > 0, w, 1.0)
    denom = np.bincount(inv, weights=use_w, minlength=K)
    C = np.zeros((K, X.shape[1]))
    E = np.zeros((K, Y.shape[1]))
    np.add.at(C, inv, use_w[:, None] * X)
    np.add.at(E, inv, use_w[:, None] * Y)
    return C / denom[:, None], E / denom[:, None], Wk


def _solve(X, Y, w, ridge):
    """Weighted ridge regression with an unpenalized intercept, in float64.

    Centering at the weighted means removes the intercept; the rest is the SVD solution
    ``W = V diag(s / (s^2 + ridge)) U^T Yc`` of the row-weighted centered system, which for
    ``ridge = 0`` is the minimum-norm least-squares solution (singular values below
    ``max(n, d) * eps * s_max`` count as zero, as in ``numpy.linalg.lstsq``).
    """
    sw = w.sum()
    xbar = w @ X / sw
    ybar = w @ Y / sw
    r = np.sqrt(w)[:, None]
    Xc = r * (X - xbar)
    Yc = r * (Y - ybar)
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    cutoff = max(Xc.shape) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    keep = s > cutoff
    f = np.zeros_like(s)
    f[keep] = s[keep] / (s[keep] ** 2 + ridge)
    W = Vt.T @ (f[:, None] * (U.T @ Yc))
    b = ybar - xbar @ W
    return W, b


def fit_probe(
    acts: Float[ArrayLike, "... d_act"],
    targets: Float[ArrayLike, "... d_target"],
    *,
    weights: Real[ArrayLike, "..."] | None = None,
    ridge: float = 0.0,
    dedupe: bool = False,
    atol: float = 1e-6,
) -> LinearProbe:
    """Fit the probe ``L(x) = x W + b`` in closed form (weighted ridge least squares).

    Minimizes ``sum_i w_i ||x_i W + b - eta_i||^2 + ridge ||W||_F^2`` over ``W`` and ``b``
    (the intercept is not penalized). With ``ridge = 0`` and rank-deficient activations the
    minimum-norm ``W`` is returned. The solve is an SVD of the weighted, centered design in
    float64 NumPy on the host (not the normal equations, which would square the condition
    number), so this function is not traceable; the probe it returns is.

    A useful consequence of the minimum-norm solution: if every target sums to 1 (beliefs
    of an HMM), then ``W 1 = 0`` and every prediction sums to 1 too.

    Args:
        acts: activations ``x``, shape ``(*batch, d_act)``; leading axes are flattened into rows.
        targets: beliefs ``<<eta|`` (or any regression targets), shape ``(*batch, d_target)``.
        weights: optional non-negative weight per row, shape ``(*batch,)``, e.g. the prefix
            probabilities ``Pr(x_1..x_t)`` so that each distinct prefix counts once with its
            probability. Integer weights give the fit on rows repeated that many times.
        ridge: L2 penalty on ``W`` (``>= 0``).
        dedupe: first replace the rows by one row per belief class (targets rounded to
            ``atol``): the class centroid of the activations, the class belief, and the
            class's total weight (see ``belief_centroids``). This fits the geometry of the
            belief states rather than the spread of activations within a class.
        atol: rounding grid of the belief classes for ``dedupe``.

    Returns:
        The fitted ``LinearProbe``, in the dtype of ``acts`` (float32 unless ``acts`` is float64
        with x64 enabled).

    Raises:
        ValueError: mismatched leading axes, non-finite activations or targets, negative or
            all-zero weights, a negative ridge, or traced (jitted) inputs.

    >>> import numpy as np, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> beliefs = rng.dirichlet(np.ones(3), size=200)
    >>> A = rng.normal(size=(3, 8))
    >>> probe = sfpjax.fit_probe(beliefs @ A + 1.0, beliefs)
    >>> round(float(sfpjax.probe_r2(probe, beliefs @ A + 1.0, beliefs)), 4)
    1.0
    """
    fn = "fit_probe"
    dtype = _canonical_float(acts) if not _is_traced(acts) else None
    X, Y, w = _flatten_rows(
        _host(acts, "acts", fn),
        _host(targets, "targets", fn),
        None if weights is None else _host(weights, "weights", fn),
        fn,
    )
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"{fn}: ridge must be a finite number >= 0, got {ridge}.")
    if dedupe:
        if not atol > 0:
            raise ValueError(f"{fn}: atol must be positive, got {atol}.")
        X, Y, w = _centroids(X, Y, w, atol)
    W, b = _solve(X, Y, w, float(ridge))
    return LinearProbe(jnp.asarray(W, dtype), jnp.asarray(b, dtype))


def _rows_for_metrics(probe, acts, targets, weights, fn):
    acts = jnp.asarray(acts)
    targets = jnp.asarray(targets)
    if acts.ndim < 1 or targets.ndim < 1 or acts.shape[:-1] != targets.shape[:-1]:
        raise ValueError(
            f"{fn}: acts (*batch, d_act) and targets (*batch, d_target) must have the same leading "
            f"axes; got acts {acts.shape} and targets {targets.shape}."
        )
    if targets.shape[-1] != probe.d_target:
        raise ValueError(
            f"{fn}: targets must have d_target = {probe.d_target} entries to match the probe, "
            f"got shape {targets.shape}."
        )
    pred = probe(acts)
    dtype = jnp.dtype(np.promote_types(pred.dtype, targets.dtype))
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = pred.dtype
    pred = pred.astype(dtype).reshape(-1, probe.d_target)
    Y = targets.astype(dtype).reshape(-1, probe.d_target)
    if weights is None:
        w = jnp.ones(Y.shape[:1], dtype)
    else:
        weights = jnp.asarray(weights)
        if weights.shape != acts.shape[:-1]:
            raise ValueError(
                f"{fn}: weights must have the leading shape of acts {acts.shape[:-1]}, got "
                f"{weights.shape}."
            )
        w = weights.astype(dtype).reshape(-1)
    return pred, Y, w


def probe_r2(
    probe: LinearProbe,
    acts: Float[ArrayLike, "... d_act"],
    targets: Float[ArrayLike, "... d_target"],
    *,
    weights: Real[ArrayLike, "..."] | None = None,
) -> Float[Array, ""]:
    """Coefficient of determination of the probe, variance-weighted over target dimensions.

    With predictions ``p_i = L(x_i)``, row weights ``w_i`` (all 1 by default) and the weighted
    mean target ``eta_bar = sum_i w_i eta_i / sum_i w_i``::

        R^2 = 1 - sum_i w_i ||eta_i - p_i||^2 / sum_i w_i ||eta_i - eta_bar||^2

    i.e. the per-dimension R^2 averaged with weights proportional to each dimension's
    target variance (scikit-learn's ``multioutput="variance_weighted"``). It is 1 for a
    perfect probe, 0 for the constant predictor ``eta_bar``, and negative for a worse one.
    Computed in the wider of the probe's and the targets' dtypes; works under ``jit``.

    Raises:
        ValueError: mismatched shapes, or (for concrete inputs) targets with zero weighted
            variance, for which R^2 is undefined. Traced calls return NaN in that case.

    >>> import jax.numpy as jnp, sfpjax
    >>> probe = sfpjax.LinearProbe(jnp.eye(2), jnp.zeros(2))
    >>> y = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    >>> float(sfpjax.probe_r2(probe, y, y))
    1.0
    """
    pred, Y, w = _rows_for_metrics(probe, acts, targets, weights, "probe_r2")
    sw = w.sum()
    ybar = (w @ Y) / sw
    sse = w @ jnp.sum((Y - pred) ** 2, axis=-1)
    sst = w @ jnp.sum((Y - ybar[None, :]) ** 2, axis=-1)
    if not _is_traced(sst) and not float(sst) > 0:
        raise ValueError(
            "probe_r2: the targets have zero (weighted) variance, so R^2 is undefined; use "
            "probe_rmse for constant targets."
        )
    return jnp.where(sst > 0, 1.0 - sse / jnp.where(sst > 0, sst, 1.0), jnp.nan)


def probe_rmse(
    probe: LinearProbe,
    acts: Float[ArrayLike, "... d_act"],
    targets: Float[ArrayLike, "... d_target"],
    *,
    weights: Real[ArrayLike, "..."] | None = None,
) -> Float[Array, ""]:
    """Root-mean-square error per target coordinate.

    ``RMSE = sqrt( sum_i w_i ||eta_i - L(x_i)||^2 / (d_target * sum_i w_i) )`` with row
    weights ``w_i`` (all 1 by default). Works under ``jit``.

    >>> import jax.numpy as jnp, sfpjax
    >>> probe = sfpjax.LinearProbe(jnp.zeros((1, 2)), jnp.zeros(2))
    >>> float(sfpjax.probe_rmse(probe, jnp.zeros((3, 1)), jnp.full((3, 2), 0.5)))
    0.5
    """
    pred, Y, w = _rows_for_metrics(probe, acts, targets, weights, "probe_rmse")
    sse = w @ jnp.sum((Y - pred) ** 2, axis=-1)
    return jnp.sqrt(sse / (w.sum() * Y.shape[-1]))


@dataclasses.dataclass(frozen=True)
class ProbeMetrics:
    """Held-out quality of a probe: ``r2`` (see ``probe_r2``), ``rmse`` (see ``probe_rmse``)
    and ``n`` rows evaluated."""

    r2: float
    rmse: float
    n: int


def evaluate_probe(
    probe: LinearProbe,
    acts: Float[ArrayLike, "... d_act"],
    targets: Float[ArrayLike, "... d_target"],
    *,
    weights: Real[ArrayLike, "..."] | None = None,
) -> ProbeMetrics:
    """R^2 and RMSE of ``probe`` on (typically held-out) activations, as Python floats.

    >>> import numpy as np, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> eta = rng.dirichlet(np.ones(3), size=100)
    >>> acts = eta @ rng.normal(size=(3, 5))
    >>> (tr_x, te_x), (tr_y, te_y) = np.split(acts, [80]), np.split(eta, [80])
    >>> m = sfpjax.evaluate_probe(sfpjax.fit_probe(tr_x, tr_y), te_x, te_y)
    >>> round(m.r2, 4), m.n
    (1.0, 20)
    """
    r2 = probe_r2(probe, acts, targets, weights=weights)
    rmse = probe_rmse(probe, acts, targets, weights=weights)
    return ProbeMetrics(r2=float(r2), rmse=float(rmse), n=int(np.prod(np.shape(acts)[:-1])))


def train_test_split(
    *arrays: ArrayLike, key: PRNGKeyArray, test_fraction: float = 0.2
) -> list[Array]:
    """Randomly split arrays along their first axis into train and test parts.

    Rows are permuted with ``jax.random.permutation(key, n)``; the last
    ``round(test_fraction * n)`` permuted rows form the test part. Returns
    ``[a_train, a_test, b_train, b_test, ...]`` in the order of ``arrays``.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> x, y = jnp.arange(10.0)[:, None], jnp.arange(10.0)
    >>> x_tr, x_te, y_tr, y_te = sfpjax.train_test_split(x, y, key=jr.key(0), test_fraction=0.3)
    >>> x_tr.shape, x_te.shape, bool(jnp.all(x_te[:, 0] == y_te))
    ((7, 1), (3, 1), True)
    """
    if not arrays:
        raise ValueError("train_test_split needs at least one array.")
    arrays = [jnp.asarray(a) for a in arrays]
    shapes = [a.shape for a in arrays]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"train_test_split: all arrays need the same first (row) axis; got shapes {shapes}."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    n = shapes[0][0]
    n_test = int(round(test_fraction * n))
    if n_test < 1 or n_test >= n:
        raise ValueError(
            f"train_test_split: test_fraction={test_fraction} of {n} rows leaves an empty train or "
            "test part; use more rows or another fraction."
        )
    perm = jr.permutation(key, n)
    train_idx, test_idx = perm[: n - n_test], perm[n - n_test :]
    out: list[Array] = []
    for a in arrays:
        out += [a[train_idx], a[test_idx]]
    return out


def concat_sites(
    activations: Mapping[str, Float[ArrayLike, "... _d_site"]], sites: Sequence[str]
) -> Float[Array, "... d_total"]:
    """Concatenate the activations of several sites along the feature axis, in ``sites`` order.

    Args:
        activations: mapping from site name (TransformerLens style, e.g.
            ``"blocks.0.hook_resid_post"``) to arrays of shape ``(*batch, d_site)``.
        sites: the site names to concatenate.

    Returns:
        Array of shape ``(*batch, sum of d_site)``.

    >>> import jax.numpy as jnp, sfpjax
    >>> acts = {"blocks.0.hook_resid_post": jnp.zeros((2, 5, 4)),
    ...         "blocks.1.hook_resid_post": jnp.ones((2, 5, 4))}
    >>> sfpjax.concat_sites(acts, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]).shape
    (2, 5, 8)
    """
    if isinstance(sites, str):
        raise ValueError(f"sites must be a sequence of site names, got the single string {sites!r}; "
                         "wrap it in a list.")
    sites = list(sites)
    if not sites:
        raise ValueError("concat_sites: sites is empty; name at least one activation site.")
    missing = [s for s in sites if s not in activations]
    if missing:
        raise ValueError(
            f"concat_sites: site(s) {missing} not in the activations; available: "
            f"{sorted(activations)}."
        )
    arrays = [jnp.asarray(activations[s]) for s in sites]
    leads = {s: a.shape[:-1] for s, a in zip(sites, arrays)}
    if any(a.ndim < 1 for a in arrays) or len(set(leads.values())) != 1:
        raise ValueError(
            f"concat_sites: all sites need the same leading axes (*batch, d_site); got {leads}."
        )
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise ValueError(f"concat_sites: sites have different dtypes {sorted(map(str, dtypes))}.")
    return jnp.concatenate(arrays, axis=-1)


def fit_factor_probes(
    acts: Float[ArrayLike, "... d_act"],
    joint_beliefs: Float[ArrayLike, "... d_joint"],
    factor_dims: Sequence[int],
    *,
    rights: Sequence[ArrayLike] | None = None,
    weights: Real[ArrayLike, "..."] | None = None,
    ridge: float = 0.0,
    dedupe: bool = False,
    atol: float = 1e-6,
) -> list[LinearProbe]:
    """One probe per factor, each regressing onto that factor's marginal belief.

    For a joint belief over ``A_0 kron A_1 kron ... kron A_{F-1}`` (factor 0 most
    significant, the ``product`` convention) the marginal of factor ``f`` is the partial
    trace over the other factors, ``eta_f = Tr_{g != f} eta`` (for an HMM: the sum of the
    joint belief over the states of every other factor; for a GHMM: contraction with each
    other factor's ``|1>>_g``; computed by ``factor_marginals``). Each probe is ``fit_probe(acts, eta_f, ...)``; with
    ``dedupe=True`` the belief classes are those of the factor's own marginal, so a
    centroid averages over all states of the other factors (seed 001's convention).

    Args:
        acts: activations, shape ``(*batch, d_act)``.
        joint_beliefs: joint beliefs, shape ``(*batch, prod(factor_dims))``.
        factor_dims: latent dimension of each factor.
        rights: optional per-factor ``|1>>_f`` vectors (default: all ones, the HMM case).
        weights, ridge, dedupe, atol: as in ``fit_probe``.

    Returns:
        A list of ``F`` probes; probe ``f`` has ``d_target = factor_dims[f]``.

    >>> import numpy as np, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.dirichlet(np.ones(2), 50), rng.dirichlet(np.ones(3), 50)
    >>> joint = (a[:, :, None] * b[:, None, :]).reshape(50, 6)
    >>> acts = np.concatenate([a, b], -1) @ rng.normal(size=(5, 7))
    >>> pa, pb = sfpjax.fit_factor_probes(acts, joint, [2, 3])
    >>> round(float(sfpjax.probe_r2(pb, acts, b)), 4)
    1.0
    """
    fn = "fit_factor_probes"
    factor_dims = [int(d) for d in factor_dims]
    if not factor_dims or any(d < 1 for d in factor_dims):
        raise ValueError(f"{fn}: factor_dims must be a non-empty list of positive ints, got {factor_dims}.")
    J = _host(joint_beliefs, "joint_beliefs", fn)
    if J.ndim < 1 or J.shape[-1] != int(np.prod(factor_dims)):
        raise ValueError(
            f"{fn}: joint_beliefs must have shape (*batch, {int(np.prod(factor_dims))}) = "
            f"(*batch, prod(factor_dims={factor_dims})), got {J.shape}."
        )
    marginals = [np.asarray(m) for m in factor_marginals(J, factor_dims, rights)]
    return [
        fit_probe(acts, m, weights=weights, ridge=ridge, dedupe=dedupe, atol=atol)
        for m in marginals
    ]


def probe_inverse(
    probe: LinearProbe, delta_belief: Float[ArrayLike, "... d_target"]
) -> Float[Array, "... d_act"]:
    """The minimum-norm activation change that moves the probe's prediction by ``delta_belief``.

    The probe maps an activation change ``dx`` to the prediction change ``dx W`` (the
    intercept cancels). This returns ``dx = delta W^+`` with ``W^+`` the Moore-Penrose
    pseudo-inverse of ``W`` (shape ``(d_target, d_act)``): among all ``dx`` minimizing
    ``||dx W - delta||``, the one of least norm, which lies in the column space of ``W``
    (the subspace the probe reads). It is exact, ``dx W = delta``, if and only if
    ``delta`` lies in the row space of ``W`` (the span of its rows, i.e. the image of
    ``x -> x W``); otherwise ``dx W`` is the orthogonal projection of ``delta`` onto it.
    For a belief probe of an HMM fitted by ``fit_probe`` the row space is (generically) the
    tangent space of the simplex, so any ``delta`` whose entries sum to 0 is reached
    exactly. Works under ``jit`` and ``vmap``; batched over leading axes of ``delta``.

    >>> import jax.numpy as jnp, sfpjax
    >>> probe = sfpjax.LinearProbe(jnp.array([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]), jnp.zeros(2))
    >>> dx = sfpjax.probe_inverse(probe, jnp.array([0.1, -0.1]))
    >>> [round(float(v), 6) for v in dx @ probe.W]
    [0.1, -0.1]
    """
    delta = jnp.asarray(delta_belief)
    if delta.ndim < 1 or delta.shape[-1] != probe.d_target:
        raise ValueError(
            f"delta_belief must have shape (*batch, d_target) with d_target = {probe.d_target}, "
            f"got {delta.shape}."
        )
    return delta.astype(probe.W.dtype) @ jnp.linalg.pinv(probe.W)
