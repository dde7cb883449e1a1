"""Trait directions and the drift of a model's activations along them during fine-tuning.

The trait-space construction of seed 004, in array form:

* a **trait direction** is the difference of mean activations at one site between contexts
  that show the trait and contexts that do not (contrastive means), unit-normalized;
* the **mean activation** ``h(c)`` of checkpoint ``c`` is the mean of the site's activation
  over a fixed evaluation prompt set, every position the model reads (BOS excluded);
* the **drift** of checkpoint ``c`` along direction ``u_k`` is
  ``<h(c) - h(0), u_k> / ||h(0)||``: the change since step 0 projected on the trait,
  in units of the step-0 mean activation norm (the seed's normalization), so runs on
  models of different scale are comparable.

The drift functions are pure ``jax.numpy`` and vmap over runs; the direction and PCA
helpers run on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ..model._transformer import Transformer

__all__ = [
    "DriftPCA",
    "TraitDirections",
    "activation_norm_drift",
    "drift_along",
    "drift_pca",
    "mean_activation",
    "random_directions",
    "trait_directions",
]


@dataclasses.dataclass(frozen=True)
class TraitDirections:
    """Named unit directions in activation space.

    Attributes:
        names: one name per direction.
        vectors: ``(k, d)`` unit rows, ``vectors[i]`` the direction of ``names[i]``.
        raw_norms: ``(k,)`` norms of the contrastive mean differences before normalizing
            (how strongly the site separates each trait's two context sets).
    """

    names: tuple[str, ...]
    vectors: np.ndarray
    raw_norms: np.ndarray


def trait_directions(
    acts: Float[ArrayLike, "n d"],
    traits: Mapping[str, tuple[ArrayLike, ArrayLike]],
) -> TraitDirections:
    """Contrastive-mean trait directions from activations of labelled contexts.

    For each trait ``name -> (positive, negative)`` (boolean masks over the ``n`` rows of
    ``acts``), the direction is ``mean(acts[positive]) - mean(acts[negative])``, divided by
    its norm.

    Args:
        acts: ``(n, d)`` activations, one row per context (flatten batch and position).
        traits: mapping from trait name to two boolean masks of shape ``(n,)``: the
            contexts that show the trait and those that do not. Both must be non-empty.

    >>> import numpy as np, sfpjax
    >>> acts = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    >>> pos = np.array([True, True, False, False])
    >>> t = sfpjax.trait_directions(acts, {"first": (pos, ~pos)})
    >>> t.vectors.round(3).tolist(), t.raw_norms.round(3).tolist()
    ([[0.707, -0.707]], [2.828])
    """
    A = np.asarray(acts, np.float64)
    if A.ndim != 2:
        raise ValueError(f"trait_directions: acts must have shape (n, d), got {A.shape}; flatten batch and position first.")
    if not traits:
        raise ValueError("trait_directions: traits is empty; give at least one name -> (positive, negative) pair.")
    names, vectors, norms = [], [], []
    for name, pair in traits.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"trait {name!r}: expected a (positive, negative) pair of masks.")
        masks = []
        for side, m in zip(("positive", "negative"), pair):
            m = np.asarray(m)
            if m.shape != (A.shape[0],) or m.dtype != np.bool_:
                raise ValueError(
                    f"trait {name!r}: the {side} mask must be boolean of shape ({A.shape[0]},) "
                    f"(one entry per row of acts), got dtype {m.dtype} and shape {m.shape}."
                )
            if not m.any():
                raise ValueError(
                    f"trait {name!r} has an empty {side} context set: no row of acts is selected, "
                    f"so its mean activation is undefined. Widen the contexts or drop the trait."
                )
            masks.append(m)
        diff = A[masks[0]].mean(0) - A[masks[1]].mean(0)
        norm = float(np.linalg.norm(diff))
        if not norm > 0:
            raise ValueError(f"trait {name!r}: the two context sets have the same mean activation; the direction is undefined.")
        names.append(str(name))
        vectors.append(diff / norm)
        norms.append(norm)
    return TraitDirections(tuple(names), np.stack(vectors), np.asarray(norms))


def mean_activation(
    model: Transformer, tokens: Int[ArrayLike, "batch seq"], site: str
) -> Float[Array, " d"]:
    """Mean activation ``h`` of ``model`` at ``site`` over a prompt set.

    The mean runs over every sequence and every position that has read a token (the BOS
    position of a ``use_bos`` model is left out: it has read nothing and does not depend
    on the prompts). Vmap over a stacked model to get one mean per checkpoint.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=4, d_model=8, d_mlp=16), key=jr.key(0))
    >>> sfpjax.mean_activation(model, jnp.zeros((2, 4), jnp.int32), "blocks.0.hook_resid_post").shape
    (8,)
    """
    if site not in model.site_names:
        raise ValueError(f"mean_activation: unknown site {site!r}; the model has {list(model.site_names)}.")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"mean_activation: tokens must have shape (batch, seq), got {tokens.shape}.")
    _, cache = model.batched(tokens, sites=[site])
    act = cache[site]
    if act.ndim != 3:
        raise ValueError(f"mean_activation: site {site!r} is not a per-position vector site (shape {act.shape}).")
    if model.config.use_bos:
        act = act[:, 1:]
    return act.mean((0, 1))


def drift_along(
    mean_acts: Float[ArrayLike, "checkpoints d"],
    directions: Float[ArrayLike, "k d"],
) -> Float[Array, "checkpoints k"]:
    """Drift ``<h(c) - h(0), u_k> / ||h(0)||`` of each checkpoint along each direction.

    Args:
        mean_acts: ``(C, d)`` mean activations of one run's checkpoints, step 0 first
            (from :func:`mean_activation`).
        directions: ``(k, d)`` directions ``u_k`` (for example ``TraitDirections.vectors``);
            used as given, so pass unit rows to read the drift in units of ``||h(0)||``.

    Returns ``(C, k)``; row 0 is zero. Vmap over runs.

    >>> import jax.numpy as jnp, sfpjax
    >>> h = jnp.array([[3.0, 4.0], [3.0, 6.0]])
    >>> sfpjax.drift_along(h, jnp.array([[0.0, 1.0]])).tolist()
    [[0.0], [0.4000000059604645]]
    """
    h = jnp.asarray(mean_acts)
    u = jnp.asarray(directions, h.dtype)
    if h.ndim != 2 or u.ndim != 2 or h.shape[-1] != u.shape[-1]:
        raise ValueError(
            f"drift_along: expected mean_acts (checkpoints, d) and directions (k, d) of the same d, "
            f"got {h.shape} and {u.shape}."
        )
    return ((h - h[:1]) @ u.T) / jnp.linalg.norm(h[0])


def activation_norm_drift(mean_acts: Float[ArrayLike, "checkpoints d"]) -> Float[Array, " checkpoints"]:
    """``(||h(c)|| - ||h(0)||) / ||h(0)||``: the activation-norm baseline of seed 004.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.activation_norm_drift(jnp.array([[3.0, 4.0], [6.0, 8.0]])).tolist()
    [0.0, 1.0]
    """
    h = jnp.asarray(mean_acts)
    n = jnp.linalg.norm(h, axis=-1)
    return (n - n[:1]) / n[0]


def random_directions(d: int, k: int, *, key: jax.Array) -> Float[Array, "k d"]:
    """``k`` independent uniformly random unit directions in ``R^d`` (the random baseline).

    >>> import jax.random as jr, sfpjax
    >>> sfpjax.random_directions(5, 3, key=jr.key(0)).shape
    (3, 5)
    """
    v = jax.random.normal(key, (k, d))
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class DriftPCA:
    """Principal components of a set of drift vectors.

    Attributes:
        explained: ``(m,)`` fraction of the drift variance along each component, descending
            (``m = min(runs, k)``).
        loadings: ``(m, k)``; row ``j`` is component ``j`` in the drift coordinates (one
            entry per direction), signed so that its largest-magnitude loading is positive.
        mean: ``(k,)`` the mean drift vector the components are centered at.
    """

    explained: np.ndarray
    loadings: np.ndarray
    mean: np.ndarray

    def project(self, drift: Float[ArrayLike, "... k"], component: int = 0) -> np.ndarray:
        """Coordinate of each (centered) drift vector along one component."""
        return (np.asarray(drift, np.float64) - self.mean) @ self.loadings[component]


def drift_pca(drifts: Float[ArrayLike, "runs k"]) -> DriftPCA:
    """PCA of drift vectors (seed 004: of the final checkpoints of every run).

    >>> import numpy as np, sfpjax
    >>> d = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.1]])
    >>> p = sfpjax.drift_pca(d)
    >>> round(float(p.explained[0]), 3), p.loadings[0].round(2).tolist()
    (1.0, [0.69, 0.72])
    """
    from sklearn.decomposition import PCA

    X = np.asarray(drifts, np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"drift_pca: need drift vectors of shape (runs, k) with at least 2 runs, got {X.shape}.")
    if not np.all(np.isfinite(X)):
        raise ValueError("drift_pca: drifts has non-finite entries.")
    pca = PCA().fit(X)
    comps = pca.components_
    signs = np.sign(comps[np.arange(comps.shape[0]), np.argmax(np.abs(comps), axis=1)])
    return DriftPCA(pca.explained_variance_ratio_, comps * signs[:, None], pca.mean_)
