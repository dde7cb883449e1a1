"""Which SAE latents track a label: AUROC, correlation, top latents, and shifts between models.

These run on the host in float64 NumPy / scikit-learn on concrete arrays of latents
``z`` of shape ``(n, d_sae)`` (``SAE.encode`` of ``n`` activation rows; leading axes are
flattened), one row per context.

Persona labels in the EM setting are exact: for each context the posterior probability
``p = Pr(misaligned persona | x_1..x_t)`` (the misaligned sector's mass in the belief
``<<eta(x_1..x_t)|``), and its log-odds ``log p - log(1 - p)``. The measures:

* ``latent_auroc`` against a binary label (``roc_auc_score`` of scikit-learn, one latent
  at a time), or against a probability label ``p`` in either of two ways:

  - ``threshold=c``: the binary label ``p > c``;
  - ``threshold=None`` (soft AUROC): every row counts once as a positive with weight
    ``p`` and once as a negative with weight ``1 - p``. The result is the probability
    that a context drawn with weight ``p`` (a misaligned-persona draw) has a larger
    latent activation than one drawn with weight ``1 - p`` (ties count 1/2), i.e. the
    AUROC one expects when each context's persona is sampled from its exact posterior.
    For 0/1 labels it is the ordinary AUROC.

  An AUROC of 0.5 means the latent does not separate the label (a latent that never
  fires scores exactly 0.5); 1 (0) means it fires more (less) on the positives.
* ``latent_correlation``: Pearson correlation of each latent with a continuous target
  (e.g. the persona log-odds), optionally with row weights; NaN for a latent that is
  constant on these rows.
* ``top_latents``: latents ordered by ``|score - center|`` (``center = 0.5`` for AUROCs,
  0 for correlations), so strong positive and negative associations both rank high.
* ``compare_latent_activations``: per-latent statistics of the same SAE on the
  activations of two models (e.g. pretrained and fine-tuned, same site, same contexts).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int
from sklearn.metrics import roc_auc_score

__all__ = [
    "LatentActivationShift",
    "compare_latent_activations",
    "latent_auroc",
    "latent_correlation",
    "top_latents",
]


def _rows(latents, fn: str) -> np.ndarray:
    if isinstance(latents, jax.core.Tracer):
        raise ValueError(f"{fn} runs on the host; latents is a traced value. Call it outside jit/vmap.")
    Z = np.asarray(latents, np.float64)
    if Z.ndim < 2:
        raise ValueError(f"{fn}: latents must have shape (*batch, d_sae) with at least one row axis, got {Z.shape}.")
    Z = Z.reshape(-1, Z.shape[-1])
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        raise ValueError(f"{fn}: latents has no rows or no latents (shape {Z.shape}).")
    if not np.all(np.isfinite(Z)):
        raise ValueError(f"{fn}: latents has non-finite entries (NaN or inf).")
    return Z


def _per_row(x, n: int, name: str, fn: str, lead) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.size != n or a.shape not in (tuple(lead), (n,)):
        raise ValueError(
            f"{fn}: {name} must have one value per latent row, shape {tuple(lead)} (or ({n},)), got {a.shape}."
        )
    a = a.reshape(n)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{fn}: {name} has non-finite entries.")
    return a


def latent_auroc(
    latents: Float[ArrayLike, "*batch d_sae"],
    labels: Float[ArrayLike, "*batch"] | Int[ArrayLike, "*batch"] | Bool[ArrayLike, "*batch"],
    *,
    threshold: float | None = None,
    weights: Float[ArrayLike, "*batch"] | None = None,
) -> Float[np.ndarray, " d_sae"]:
    """AUROC of each latent as a score for a binary or probability label (module docstring).

    Args:
        latents: ``(*batch, d_sae)`` latent activations.
        labels: one label per row: 0/1 (or bool), or a probability in ``[0, 1]`` (e.g. the
            exact misaligned-persona posterior).
        threshold: ``None`` for the soft AUROC of a probability label (exact for 0/1
            labels); a number ``c`` to use the binary label ``labels > c``.
        weights: optional non-negative row weights (e.g. prefix probabilities).

    Returns:
        ``(d_sae,)`` AUROCs (scikit-learn's ``roc_auc_score`` per latent).

    >>> import numpy as np, sfpjax
    >>> z = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [3.0, 0.0]])
    >>> sfpjax.latent_auroc(z, np.array([0, 0, 1, 1])).tolist()
    [1.0, 0.0]
    >>> sfpjax.latent_auroc(z, np.array([0.1, 0.2, 0.9, 0.6]), threshold=0.5).tolist()
    [1.0, 0.0]
    """
    fn = "latent_auroc"
    Z = _rows(latents, fn)
    lead = np.shape(latents)[:-1]
    n = Z.shape[0]
    y = _per_row(labels, n, "labels", fn, lead)
    w = np.ones(n) if weights is None else _per_row(weights, n, "weights", fn, lead)
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"{fn}: weights must be non-negative and not all zero.")
    if threshold is not None:
        y = (y > float(threshold)).astype(np.float64)
    elif np.any((y < 0) | (y > 1)):
        raise ValueError(
            f"{fn}: labels must be 0/1 or probabilities in [0, 1] (got range {y.min():.3g} .. {y.max():.3g}); "
            "pass threshold= to binarize another score."
        )
    pos_w = w * y
    neg_w = w * (1.0 - y)
    if not (pos_w.sum() > 0 and neg_w.sum() > 0):
        raise ValueError(
            f"{fn}: the label has no {'positive' if not pos_w.sum() > 0 else 'negative'} mass on these rows; "
            "AUROC needs both classes."
        )
    keep = np.concatenate([pos_w, neg_w]) > 0
    y_true = np.concatenate([np.ones(n), np.zeros(n)])[keep]
    sw = np.concatenate([pos_w, neg_w])[keep]
    out = np.empty(Z.shape[1])
    for j in range(Z.shape[1]):
        score = np.concatenate([Z[:, j], Z[:, j]])[keep]
        out[j] = roc_auc_score(y_true, score, sample_weight=sw)
    return out


def latent_correlation(
    latents: Float[ArrayLike, "*batch d_sae"],
    target: Float[ArrayLike, "*batch"],
    *,
    weights: Float[ArrayLike, "*batch"] | None = None,
) -> Float[np.ndarray, " d_sae"]:
    """Pearson correlation of each latent with a continuous target (e.g. persona log-odds).

    ``r_j = cov_w(z_j, y) / sqrt(var_w(z_j) var_w(y))`` with row weights ``w`` (uniform by
    default). NaN where a latent is constant on these rows.

    >>> import numpy as np, sfpjax
    >>> z = np.array([[0.0, 1.0, 5.0], [1.0, 0.0, 5.0], [2.0, 0.0, 5.0]])
    >>> np.round(sfpjax.latent_correlation(z, np.array([1.0, 2.0, 3.0])), 3).tolist()
    [1.0, -0.866, nan]
    """
    fn = "latent_correlation"
    Z = _rows(latents, fn)
    lead = np.shape(latents)[:-1]
    n = Z.shape[0]
    y = _per_row(target, n, "target", fn, lead)
    w = np.ones(n) if weights is None else _per_row(weights, n, "weights", fn, lead)
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"{fn}: weights must be non-negative and not all zero.")
    w = w / w.sum()
    zc = Z - (w @ Z)[None, :]
    yc = y - w @ y
    var_y = w @ (yc * yc)
    if not var_y > 0:
        raise ValueError(f"{fn}: target is constant on these rows; a correlation needs it to vary.")
    cov = (w * yc) @ zc
    var_z = w @ (zc * zc)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(var_z * var_y)
    # A latent whose variance is rounding noise of a constant column is constant.
    scale = np.maximum(np.abs(w @ Z), 1.0)
    return np.where(var_z > (1e-12 * scale) ** 2, r, np.nan)


def top_latents(
    scores: Float[ArrayLike, " d_sae"],
    n: int = 10,
    *,
    center: float = 0.0,
) -> Int[np.ndarray, " n"]:
    """Indices of the ``n`` latents with the largest ``|score - center|``, strongest first.

    Use ``center=0.5`` for AUROCs and ``center=0`` for correlations; NaN scores come last.

    >>> import numpy as np, sfpjax
    >>> sfpjax.top_latents(np.array([0.5, 0.9, 0.05, 0.6]), 2, center=0.5).tolist()
    [2, 1]
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 1:
        raise ValueError(f"top_latents: scores must be one score per latent, shape (d_sae,), got {s.shape}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"top_latents: n must be a positive int, got {n!r}.")
    gap = np.abs(s - float(center))
    order = np.argsort(np.where(np.isnan(gap), np.inf, -gap), kind="stable")
    return order[: min(int(n), s.size)]


class LatentActivationShift(NamedTuple):
    """Per-latent statistics of one SAE on two sets of activations ``a`` and ``b``.

    Attributes (each ``(d_sae,)``):
        frequency_a, frequency_b: fraction of rows where the latent fires (``z > 0``).
        mean_a, mean_b: mean activation over all rows.
        mean_active_a, mean_active_b: mean activation over the rows where it fires (NaN if
            it never fires).
        delta_frequency: ``frequency_b - frequency_a``.
        delta_mean: ``mean_b - mean_a``.
        paired_correlation: with paired rows (same contexts in both models), the Pearson
            correlation of the latent's activation in ``a`` and in ``b`` across contexts
            (NaN where either is constant); ``None`` when the rows are not paired.
    """

    frequency_a: np.ndarray
    frequency_b: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    mean_active_a: np.ndarray
    mean_active_b: np.ndarray
    delta_frequency: np.ndarray
    delta_mean: np.ndarray
    paired_correlation: np.ndarray | None


def _stats(Z):
    fires = Z > 0
    freq = fires.mean(0)
    count = fires.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_active = np.where(count > 0, (Z * fires).sum(0) / count, np.nan)
    return freq, Z.mean(0), mean_active


def compare_latent_activations(
    latents_a: Float[ArrayLike, "*batch_a d_sae"],
    latents_b: Float[ArrayLike, "*batch_b d_sae"],
    *,
    paired: bool | None = None,
) -> LatentActivationShift:
    """How each latent's activation statistics change from activations ``a`` to ``b``.

    Typical use: one SAE trained on the pretrained model, applied to the same site of the
    pretrained (``a``) and the fine-tuned (``b``) model on the same contexts,
    ``sae.encode(acts_pre)`` and ``sae.encode(acts_ft)``; restrict the rows (e.g. to one
    domain) by indexing before the call.

    Args:
        latents_a, latents_b: ``(*batch, d_sae)`` latents of the two models.
        paired: whether row ``i`` of ``a`` and of ``b`` are the same context; ``None``
            means paired when the shapes match.

    >>> import numpy as np, sfpjax
    >>> a = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> b = np.array([[2.0, 1.0], [0.0, 3.0]])
    >>> s = sfpjax.compare_latent_activations(a, b)
    >>> s.delta_frequency.tolist(), s.delta_mean.tolist(), s.mean_active_b.tolist()
    ([0.5, 0.0], [1.0, 1.0], [2.0, 2.0])
    """
    fn = "compare_latent_activations"
    A = _rows(latents_a, fn)
    B = _rows(latents_b, fn)
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"{fn}: both sets of latents must come from one SAE (same d_sae), got {A.shape[1]} and {B.shape[1]}."
        )
    same = np.shape(latents_a) == np.shape(latents_b)
    if paired is None:
        paired = same
    if paired and not same:
        raise ValueError(f"{fn}: paired rows need equal shapes, got {np.shape(latents_a)} and {np.shape(latents_b)}.")
    fa, ma, maa = _stats(A)
    fb, mb, mab = _stats(B)
    corr = None
    if paired:
        ac, bc = A - ma[None, :], B - mb[None, :]
        va, vb = (ac * ac).mean(0), (bc * bc).mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where((va > 0) & (vb > 0), (ac * bc).mean(0) / np.sqrt(va * vb), np.nan)
    return LatentActivationShift(fa, fb, ma, mb, maa, mab, fb - fa, mb - ma, corr)
