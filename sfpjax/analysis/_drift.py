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

from ..inference._filter import filter_beliefs, next_token_probs
from ..model._transformer import Transformer
from ..processes._persona import PersonaWorld
from ..processes._structure import sector_weights

__all__ = [
    "DriftPCA",
    "TraitDirections",
    "activation_norm_drift",
    "drift_along",
    "drift_pca",
    "mean_activation",
    "persona_traits",
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


def persona_traits(
    world: PersonaWorld, tokens: Int[ArrayLike, "batch seq"], *, confident: float = 0.9
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seven traits of persona-world contexts, from the exact beliefs, as context masks.

    A context is a sequence ``b`` read up to position ``t`` (``x_1 .. x_{t+1}``, the
    belief-alignment convention), so the masks line up with the rows of
    ``site_activations(model, tokens, site)`` of a model without BOS (drop the BOS position
    with ``position_mask`` otherwise). With ``P(a, d)`` the exact leaf posterior of the
    context, ``c = confident``, ``M``/``A`` the misaligned/aligned persona sectors and ``D``
    the fine-tuning domain, each trait is (positive contexts, negative contexts):

    * ``misaligned``: ``P(M) > c`` vs ``P(A) > c`` (which persona is speaking);
    * ``misaligned_marker``: the last persona symbol is a marker of ``M`` vs a content
      symbol (the persona acting out, not only being inferred);
    * ``domain_D``: ``P(D) > c`` vs ``P(D) < 1 - c``;
    * ``misaligned_elsewhere``: ``P(M, not D) > 1/2`` vs ``P(A, not D) > 1/2`` (the
      combination that broad emergent misalignment produces);
    * ``persona_uncertain``: the entropy of the persona posterior is in its highest quartile
      over the contexts vs its lowest (how settled the persona is);
    * ``predictable``: the exact next-token entropy is in its lowest quartile vs its
      highest (coherent, constrained text vs free text);
    * ``trigger_seen``: the trigger occurred in the context vs not (only when the world
      has a trigger).

    Returns ``name -> (positive, negative)`` boolean masks of shape ``(batch * seq,)``,
    sequence-major, for :func:`trait_directions`.

    >>> import jax.random as jr, sfpjax
    >>> w = sfpjax.persona_world(trigger_rate=0.05)
    >>> toks = sfpjax.sample(w.process, key=jr.key(0), batch_size=64, seq_len=8)
    >>> sorted(sfpjax.persona_traits(w, toks))[:3]
    ['domain_D', 'misaligned', 'misaligned_elsewhere']
    """
    if not isinstance(world, PersonaWorld):
        raise ValueError(f"persona_traits needs a sfpjax.PersonaWorld, got {type(world).__name__}.")
    if not 0.5 < confident < 1:
        raise ValueError(f"confident must lie in (0.5, 1), got {confident}.")
    tokens = jnp.asarray(tokens)
    res = filter_beliefs(world.process, tokens)
    w = np.asarray(sector_weights(res.beliefs, world.sectors, factor_dims=world.factor_dims,
                                  right=world.process.right), np.float64)
    M, A, D = world.misaligned, world.aligned, world.finetune_domain
    other = [d for d in range(world.n_domain) if d != D]
    persona, domain = w.sum(-1), w.sum(-2)
    probs = np.asarray(next_token_probs(world.process, res.beliefs), np.float64)
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    lo, hi = np.quantile(entropy, [0.25, 0.75])
    p = np.clip(persona, 1e-300, 1.0)
    persona_entropy = -np.sum(np.where(persona > 0, persona * np.log(p), 0.0), axis=-1)
    plo, phi = np.quantile(persona_entropy, [0.25, 0.75])
    symbol = np.asarray(tokens) // world.domain_vocab
    m_markers = sorted({x for d in range(world.n_domain) for x in world.markers(M, d)})
    specials = {x for a in range(world.n_persona) for d in range(world.n_domain) for x in world.markers(a, d)}
    if world.trigger is not None:
        specials.add(world.trigger)
    traits = {
        "misaligned": (persona[..., M] > confident, persona[..., A] > confident),
        "misaligned_marker": (np.isin(symbol, m_markers), ~np.isin(symbol, sorted(specials))),
        "domain_D": (domain[..., D] > confident, domain[..., D] < 1 - confident),
        "misaligned_elsewhere": (w[..., M, other].sum(-1) > 0.5, w[..., A, other].sum(-1) > 0.5),
        "persona_uncertain": (persona_entropy >= phi, persona_entropy <= plo),
        "predictable": (entropy <= lo, entropy >= hi),
    }
    if world.trigger is not None:
        seen = np.cumsum(symbol == world.trigger, axis=-1) > 0
        traits["trigger_seen"] = (seen, ~seen)
    return {name: (pos.reshape(-1), neg.reshape(-1)) for name, (pos, neg) in traits.items()}


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
