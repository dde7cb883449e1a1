"""Steering as pure functional interventions, and steering-vector extraction.

Every intervention here is an :class:`sfpjax.Intervention` built from a module-level
function (so a new vector or scale never retraces) whose arrays live in ``params``:
``{"vector": ..., "scale": ...}`` and friends. The scale is an array, so a sweep over
scales is ``jax.vmap`` over one forward call (see ``steering_sweep``).

Activations are one sequence at a site, shape ``(seq, d_model)``; ``position_mask`` is a
boolean ``(seq,)`` saying which positions are changed. With ``preserve_norm=True`` each
changed position is rescaled afterwards to the Euclidean norm it had before, so only its
direction moves.

Steering vectors (seed 001, appendix A; seed 000, section 1):

* Centroids per factor: activations grouped by the factor's marginal belief
  ``<<eta_f|`` rounded to ``atol``; each class centroid averages over every state of the
  other factors; the vector from source belief ``s`` to target ``t`` is ``c_t - c_s``
  (``factor_centroids``, ``centroid_vector``).
* Difference in means between two sets of activations (``difference_in_means``), and
  per-label means for behavioural contrasts (``label_means``).
* Belief-state steering through a joint probe ``L(x) = x W + b`` (``belief_state_delta``):
  factorize the predicted belief into its marginals, change one marginal, rebuild the
  product, and map the change back to the residual stream, either with the probe's
  minimum-norm inverse ``W^+`` or with a generative map ``x ~ <<eta| A + c`` fitted from
  beliefs to activations (``decoder``).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Real

from ..model._interventions import Intervention
from ..model._transformer import Transformer
from ._probes import LinearProbe, belief_centroids, probe_inverse
from .._numerics import kron_vectors as _kron_vectors
from ..processes._structure import factor_marginals

__all__ = [
    "add_vector",
    "ablate_direction",
    "set_projection",
    "steer_add",
    "steer_ablate",
    "steer_set_projection",
    "position_mask_at",
    "steering_sweep",
    "FactorCentroids",
    "factor_centroids",
    "centroid_vector",
    "difference_in_means",
    "label_means",
    "belief_state_delta",
]


# ---------------------------------------------------------------------------------------
# Intervention functions: fn(activation (seq, d), position_mask (seq,), params) -> activation


def _finish(activation, new, position_mask, preserve_norm):
    if preserve_norm:
        old_norm = jnp.linalg.norm(activation, axis=-1, keepdims=True)
        new_norm = jnp.linalg.norm(new, axis=-1, keepdims=True)
        # A position steered exactly to zero has no direction to keep; leave it at zero.
        safe = jnp.where(new_norm > 0, new_norm, 1.0)
        new = jnp.where(new_norm > 0, new * (old_norm / safe), new)
    out = jnp.where(position_mask[:, None], new, activation)
    return out.astype(activation.dtype)


_NONFINITE_HINT = (
    "a centroid or mean over a class with no rows is NaN: keep only classes with rows "
    "(FactorCentroids.classes(min_count=1), the counts of label_means)"
)


def _vector_rows(v, activation, name):
    v = jnp.asarray(v, activation.dtype)
    seq, d = activation.shape[-2:]
    if v.shape[-1] != d:
        raise ValueError(
            f"the steering {name} has width {v.shape[-1]}, but the activation it is added to has "
            f"width {d} (the site's d_model); pass a {name} of shape ({d},) or ({seq}, {d}). A width-1 "
            f"{name} is not broadcast over the residual stream."
        )
    if v.ndim == 2 and v.shape[0] != seq:
        raise ValueError(
            f"the steering {name} has one row per position, {v.shape[0]} rows, but the activation has "
            f"{seq} positions; pass ({seq}, {d}) or one shared ({d},) {name}."
        )
    v = eqx.error_if(v, ~jnp.all(jnp.isfinite(v)), f"the steering {name} is not finite (NaN or inf); {_NONFINITE_HINT}.")
    return v[None, :] if v.ndim == 1 else v


def _unit(direction, activation):
    u = _vector_rows(direction, activation, "direction")
    n = jnp.linalg.norm(u, axis=-1, keepdims=True)
    return u / jnp.where(n > 0, n, 1.0)


def _add(activation, position_mask, params, preserve_norm):
    scale = jnp.asarray(params["scale"], activation.dtype)
    new = activation + scale * _vector_rows(params["vector"], activation, "vector")
    return _finish(activation, new, position_mask, preserve_norm)


def _ablate(activation, position_mask, params, preserve_norm):
    u = _unit(params["direction"], activation)
    scale = jnp.asarray(params["scale"], activation.dtype)
    proj = jnp.sum(activation * u, axis=-1, keepdims=True)
    new = activation - scale * proj * u
    return _finish(activation, new, position_mask, preserve_norm)


def _set_proj(activation, position_mask, params, preserve_norm):
    u = _unit(params["direction"], activation)
    value = jnp.asarray(params["value"], activation.dtype)
    value = value[..., None] if value.ndim == 1 else value
    proj = jnp.sum(activation * u, axis=-1, keepdims=True)
    new = activation + (value - proj) * u
    return _finish(activation, new, position_mask, preserve_norm)


def add_vector(activation: Array, position_mask: Array, params) -> Array:
    """``a_t -> a_t + scale * v`` at masked positions ``t`` (``params = {"vector", "scale"}``).

    ``vector`` is ``(d,)`` (the same at every position) or ``(seq, d)``; ``scale`` is a
    scalar array. Pass this function to ``Intervention`` or use ``steer_add``.
    """
    return _add(activation, position_mask, params, False)


def add_vector_preserve_norm(activation: Array, position_mask: Array, params) -> Array:
    """``add_vector``, then each changed position rescaled to its original norm."""
    return _add(activation, position_mask, params, True)


def ablate_direction(activation: Array, position_mask: Array, params) -> Array:
    """``a_t -> a_t - scale (a_t . u) u`` with ``u = direction / |direction|``.

    ``params = {"direction", "scale"}``; ``scale = 1`` removes the component along ``u``
    entirely (directional ablation).
    """
    return _ablate(activation, position_mask, params, False)


def ablate_direction_preserve_norm(activation: Array, position_mask: Array, params) -> Array:
    """``ablate_direction``, then each changed position rescaled to its original norm."""
    return _ablate(activation, position_mask, params, True)


def set_projection(activation: Array, position_mask: Array, params) -> Array:
    """``a_t -> a_t + (value - a_t . u) u``: the component along unit ``u`` becomes ``value``.

    ``params = {"direction", "value"}``; ``value`` is a scalar or one value per position.
    """
    return _set_proj(activation, position_mask, params, False)


def set_projection_preserve_norm(activation: Array, position_mask: Array, params) -> Array:
    """``set_projection``, then each changed position rescaled to its original norm."""
    return _set_proj(activation, position_mask, params, True)


def _check_finite(name, v):
    # Concrete vectors are checked here, with a ValueError; traced ones by error_if when applied.
    if not isinstance(v, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(v))
        if bad.any():
            rows = sorted({int(i) for i in np.argwhere(bad)[:, 0]}) if v.ndim == 2 else None
            where = f" (rows {rows[:8]})" if rows is not None else ""
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite entries (NaN or inf){where}; steering with it "
                f"makes every logit NaN. {_NONFINITE_HINT[0].upper()}{_NONFINITE_HINT[1:]}."
            )


def _check_vector(name, v):
    v = jnp.asarray(v)
    if v.ndim not in (1, 2) or not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a float array of shape (d_model,) or (seq, d_model), got "
            f"{v.dtype}{list(v.shape)}."
        )
    _check_finite(name, v)
    return v


def _check_mask(position_mask):
    if position_mask is None:
        return None
    m = jnp.asarray(position_mask)
    if m.ndim != 1 or m.dtype != jnp.bool_:
        raise ValueError(
            f"position_mask must be a bool array of shape (seq,), got {m.dtype}{list(m.shape)}; "
            "build one with position_mask_at(seq_len, positions)."
        )
    return m


def _scalar(name, x, dtype):
    x = jnp.asarray(x, dtype)
    if x.ndim != 0:
        raise ValueError(f"{name} must be a scalar (vmap over a sweep of them), got shape {x.shape}.")
    return x


def steer_add(
    vector: Float[ArrayLike, "*seq d_model"],
    scale: Real[ArrayLike, "..."] = 1.0,
    *,
    position_mask: ArrayLike | None = None,
    preserve_norm: bool = False,
) -> Intervention:
    """Activation addition: ``a_t -> a_t + scale * v`` at the masked positions.

    Args:
        vector: steering vector ``v``, ``(d_model,)`` or one per position ``(seq, d_model)``.
        scale: steering scale (a scalar; an array leaf of the intervention, so vmappable).
        position_mask: boolean ``(seq,)``; ``None`` steers every position.
        preserve_norm: rescale each changed position to its original norm.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=8), key=jr.key(0))
    >>> iv = sfpjax.steer_add(jnp.ones(64), 2.0, position_mask=sfpjax.position_mask_at(3, -1))
    >>> model(jnp.array([0, 1, 2]), interventions={"blocks.1.hook_resid_post": iv}).shape
    (3, 4)
    """
    v = _check_vector("vector", vector)
    fn = add_vector_preserve_norm if preserve_norm else add_vector
    return Intervention(fn, {"vector": v, "scale": _scalar("scale", scale, v.dtype)}, _check_mask(position_mask))


def steer_ablate(
    direction: Float[ArrayLike, "*seq d_model"],
    *,
    scale: Real[ArrayLike, "..."] = 1.0,
    position_mask: ArrayLike | None = None,
    preserve_norm: bool = False,
) -> Intervention:
    """Directional ablation: remove (``scale = 1``) the component of ``a_t`` along ``direction``.

    >>> import jax.numpy as jnp, sfpjax
    >>> iv = sfpjax.steer_ablate(jnp.array([1.0, 0.0]))
    >>> iv.apply("blocks.0.hook_resid_post", jnp.array([[3.0, 4.0]]))
    Array([[0., 4.]], dtype=float32)
    """
    u = _check_vector("direction", direction)
    fn = ablate_direction_preserve_norm if preserve_norm else ablate_direction
    return Intervention(fn, {"direction": u, "scale": _scalar("scale", scale, u.dtype)}, _check_mask(position_mask))


def steer_set_projection(
    direction: Float[ArrayLike, "*seq d_model"],
    value: Real[ArrayLike, "*seq"],
    *,
    position_mask: ArrayLike | None = None,
    preserve_norm: bool = False,
) -> Intervention:
    """Set the component of ``a_t`` along unit ``direction`` to ``value``.

    >>> import jax.numpy as jnp, sfpjax
    >>> iv = sfpjax.steer_set_projection(jnp.array([2.0, 0.0]), 1.5)
    >>> iv.apply("blocks.0.hook_resid_post", jnp.array([[3.0, 4.0]]))
    Array([[1.5, 4. ]], dtype=float32)
    """
    u = _check_vector("direction", direction)
    value = jnp.asarray(value, u.dtype)
    if value.ndim > 1:
        raise ValueError(f"value must be a scalar or one value per position (seq,), got shape {value.shape}.")
    fn = set_projection_preserve_norm if preserve_norm else set_projection
    return Intervention(fn, {"direction": u, "value": value}, _check_mask(position_mask))


def position_mask_at(seq_len: int, positions: int | Sequence[int]) -> Bool[Array, " seq"]:
    """Boolean ``(seq_len,)`` mask that is ``True`` at ``positions`` (negative counts from the end).

    >>> import sfpjax
    >>> sfpjax.position_mask_at(4, -1)
    Array([False, False, False,  True], dtype=bool)
    """
    if isinstance(positions, (int, np.integer)):
        positions = [int(positions)]
    pos = [int(p) for p in positions]
    bad = [p for p in pos if not -seq_len <= p < seq_len]
    if bad:
        raise ValueError(f"positions {bad} are out of range for a sequence of {seq_len} positions.")
    mask = np.zeros((seq_len,), bool)
    mask[pos] = True
    return jnp.asarray(mask)


@eqx.filter_jit
def _sweep(model, tokens, site, vectors, scales, position, preserve_norm, per_sequence):
    seq_out = tokens.shape[1] + int(model.config.use_bos)
    pos = position % seq_out
    mask = jnp.arange(seq_out) == pos
    fn = add_vector_preserve_norm if preserve_norm else add_vector

    def one(tok, vec, scale):
        iv = Intervention(fn, {"vector": vec, "scale": scale}, mask)
        logits = model(tok, interventions={site: iv})
        return jax.nn.softmax(logits[pos])

    per_seq = jax.vmap(one, in_axes=(0, 0 if per_sequence else None, None))
    return jax.vmap(per_seq, in_axes=(None, None, 0))(tokens, vectors, scales)


def steering_sweep(
    model: Transformer,
    tokens: Int[ArrayLike, "batch seq"],
    site: str,
    vectors: Float[ArrayLike, "..."],
    scales: Real[ArrayLike, "..."],
    *,
    position: int = -1,
    preserve_norm: bool = False,
) -> Float[Array, "n_scales batch vocab"]:
    """Next-token distributions at one position while adding ``scale * v`` there, for every scale.

    One compiled call: the model is ``vmap``-ed over the batch and over ``scales`` (the
    intervention's scale is a traced array), so a sweep costs one trace whatever its length.

    Args:
        model: a :class:`Transformer`.
        tokens: ``(batch, L)`` input sequences.
        site: the activation site to steer (e.g. ``"blocks.1.hook_resid_post"``).
        vectors: one steering vector ``(d_model,)`` for every sequence, or one per sequence
            ``(batch, d_model)``.
        scales: ``(n_scales,)`` steering scales.
        position: the model position steered and read out (default the last one, ``-1``;
            with BOS, positions count BOS as 0).
        preserve_norm: rescale the steered activation to its original norm.

    Returns:
        ``softmax(logits)`` at ``position``, shape ``(n_scales, batch, vocab_size)``.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=8), key=jr.key(0))
    >>> probs = sfpjax.steering_sweep(model, jnp.zeros((5, 6), jnp.int32), "blocks.1.hook_resid_post",
    ...                               jnp.ones(64), jnp.array([0.0, 1.0, 2.0]))
    >>> probs.shape
    (3, 5, 4)
    """
    tokens = jnp.asarray(tokens)
    vectors = jnp.asarray(vectors, jnp.float32)
    scales = jnp.asarray(scales, jnp.float32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {tokens.shape}.")
    d = model.config.d_model
    if vectors.shape not in ((d,), (tokens.shape[0], d)):
        raise ValueError(
            f"vectors must have shape ({d},) (shared) or ({tokens.shape[0]}, {d}) (one per sequence), "
            f"got {vectors.shape}."
        )
    _check_finite("vectors", vectors)
    if scales.ndim != 1:
        raise ValueError(f"scales must be a 1-D array, got shape {scales.shape}.")
    if site not in model.site_names:
        raise ValueError(f"Unknown site {site!r}; valid sites: {list(model.site_names)}.")
    seq_out = tokens.shape[1] + int(model.config.use_bos)
    if not -seq_out <= position < seq_out:
        raise ValueError(f"position {position} is out of range for {seq_out} model positions.")
    return _sweep(model, tokens, site, vectors, scales, int(position), bool(preserve_norm), vectors.ndim == 2)


# ---------------------------------------------------------------------------------------
# Steering-vector extraction


class FactorCentroids(eqx.Module):
    """Activation centroids of one factor's belief classes (seed 001).

    Attributes:
        centroids: ``(K, d_act)``, ``c_k``: the mean activation of class ``k``.
        beliefs: ``(K, d_f)``, the factor's marginal belief ``<<eta_f|`` of class ``k``.
        counts: ``(K,)``, total weight (number of rows by default) in class ``k``.
        factor: which factor the classes belong to.
        atol: the rounding grid that defined the classes.
    """

    centroids: Float[np.ndarray, "K d_act"]
    beliefs: Float[np.ndarray, "K d_f"]
    counts: Float[np.ndarray, " K"]
    factor: int = eqx.field(static=True)
    atol: float = eqx.field(static=True)

    def index(self, belief: Float[ArrayLike, " d_f"] | Sequence[float | int]) -> int:
        """The class whose belief is within ``atol`` of ``belief`` (ValueError if none)."""
        b = np.asarray(belief, np.float64)
        if b.shape != self.beliefs.shape[1:]:
            raise ValueError(
                f"belief must have shape {self.beliefs.shape[1:]} (factor {self.factor}'s marginal), got {b.shape}."
            )
        gap = np.abs(self.beliefs - b[None, :]).max(-1)
        k = int(np.argmin(gap))
        if gap[k] > 10 * self.atol:
            raise ValueError(
                f"no belief class of factor {self.factor} matches {b.round(6).tolist()}; the classes are "
                f"{self.beliefs.round(6).tolist()}."
            )
        return k

    def classes(self, min_count: float | int = 1.0) -> list[int]:
        """Indices of the classes with at least ``min_count`` weight."""
        return [int(k) for k in np.flatnonzero(self.counts >= min_count)]


def factor_centroids(
    acts: Float[ArrayLike, "... d_act"],
    joint_beliefs: Float[ArrayLike, "... d_joint"],
    factor_dims: Sequence[int],
    factor: int,
    *,
    rights: Sequence[ArrayLike] | None = None,
    weights: Real[ArrayLike, "..."] | None = None,
    atol: float = 1e-6,
) -> FactorCentroids:
    """Centroids of activations grouped by one factor's marginal belief (seed 001).

    The marginal ``<<eta_f| = Tr_{g != f} <<eta|`` of every joint belief (``factor_marginals``)
    is rounded to a grid of spacing ``atol``; rows with the same rounded marginal form a
    class, and its centroid ``c_k`` is their (weighted) mean activation. A class therefore
    averages over every state of the other factors. Steering from belief ``s`` to ``t``
    adds ``c_t - c_s`` (``centroid_vector``).

    Args:
        acts: activations ``(*batch, d_act)``, e.g. final-position ``blocks.1.hook_resid_post``.
        joint_beliefs: exact joint beliefs ``(*batch, prod(factor_dims))`` of the same rows.
        factor_dims: latent dimension of each factor (factor 0 most significant).
        factor: the factor whose classes to form.
        rights, weights, atol: as in ``factor_marginals`` and ``belief_centroids``.

    >>> import numpy as np, sfpjax
    >>> joint = np.kron(np.eye(2), np.eye(2)[:1]).reshape(2, 4)   # (S0,S0) and (S1,S0)
    >>> fc = sfpjax.factor_centroids(np.array([[0.0], [1.0]]), joint, (2, 2), factor=0)
    >>> sfpjax.centroid_vector(fc, [1.0, 0.0], [0.0, 1.0]).tolist()
    [1.0]
    """
    dims = [int(d) for d in factor_dims]
    if not 0 <= int(factor) < len(dims):
        raise ValueError(f"factor must be in range({len(dims)}) for factor_dims {dims}, got {factor}.")
    J = np.asarray(joint_beliefs, np.float64)
    if J.ndim < 1 or J.shape[-1] != int(np.prod(dims)):
        raise ValueError(
            f"joint_beliefs must have shape (*batch, {int(np.prod(dims))}) to match factor_dims {dims}, "
            f"got {J.shape}."
        )
    marg = np.asarray(factor_marginals(J, dims, rights)[int(factor)])
    C, E, W = belief_centroids(acts, marg, weights=weights, atol=atol)
    return FactorCentroids(centroids=C, beliefs=E, counts=W, factor=int(factor), atol=float(atol))


def centroid_vector(
    centroids: FactorCentroids,
    source: Float[ArrayLike, " d_f"] | Sequence[float | int],
    target: Float[ArrayLike, " d_f"] | Sequence[float | int],
) -> Float[np.ndarray, " d_act"]:
    """The steering vector ``c_t - c_s`` from the class of belief ``source`` to that of ``target``.

    >>> import numpy as np, sfpjax
    >>> fc = sfpjax.FactorCentroids(np.array([[0.0, 1.0], [2.0, 1.0]]), np.eye(2), np.ones(2), 0, 1e-6)
    >>> sfpjax.centroid_vector(fc, [1, 0], [0, 1]).tolist()
    [2.0, 0.0]
    """
    return centroids.centroids[centroids.index(target)] - centroids.centroids[centroids.index(source)]


def difference_in_means(
    target_acts: Float[ArrayLike, "..."],
    source_acts: Float[ArrayLike, "..."],
) -> Float[np.ndarray, " d_act"]:
    """``mean(target_acts) - mean(source_acts)`` over all leading axes (float64).

    The conventional steering vector: the mean activation of contexts that show the
    target behaviour minus that of contexts that show the source behaviour.

    >>> import numpy as np, sfpjax
    >>> sfpjax.difference_in_means(np.ones((3, 2)), np.zeros((5, 2))).tolist()
    [1.0, 1.0]
    """
    a = np.asarray(target_acts, np.float64)
    b = np.asarray(source_acts, np.float64)
    if a.ndim < 1 or b.ndim < 1 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"target_acts and source_acts need the same trailing width d_act, got shapes {a.shape} and {b.shape}."
        )
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"both activation sets need at least one row, got {a.shape[0]} and {b.shape[0]}.")
    return a.mean(0) - b.mean(0)


def label_means(
    acts: Float[ArrayLike, "n d_act"],
    labels: Int[ArrayLike, " n"],
    num_labels: int,
) -> tuple[Float[np.ndarray, "num_labels d_act"], Float[np.ndarray, " num_labels"]]:
    """Mean activation per label, ``mu_y = mean{x_i : y_i = y}``, and the label counts.

    A behavioural contrast ``sum_y (p_t(y) - p_s(y)) mu_y`` (which for two labels is
    ``(p_t(1) - p_s(1)) (mu_1 - mu_0)``, a difference in means) needs only observed
    labels, e.g. the symbol that actually followed each context. Labels with no rows
    get a zero mean and count 0.

    >>> import numpy as np, sfpjax
    >>> mu, n = sfpjax.label_means(np.array([[0.0], [2.0], [4.0]]), np.array([1, 1, 0]), 2)
    >>> mu.ravel().tolist(), n.tolist()
    ([4.0, 1.0], [1.0, 2.0])
    """
    X = np.asarray(acts, np.float64)
    y = np.asarray(labels)
    if X.ndim != 2 or y.shape != X.shape[:1] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"acts must be (n, d_act) and labels an integer (n,) array; got {X.shape} and {y.dtype}{list(y.shape)}."
        )
    if y.size and (y.min() < 0 or y.max() >= num_labels):
        raise ValueError(f"labels must lie in 0 .. {num_labels - 1}, got range {y.min()} .. {y.max()}.")
    counts = np.bincount(y, minlength=num_labels).astype(np.float64)
    sums = np.zeros((num_labels, X.shape[1]))
    np.add.at(sums, y, X)
    return sums / np.maximum(counts, 1.0)[:, None], counts


def belief_state_delta(
    probe: LinearProbe,
    acts: Float[ArrayLike, "*batch d_act"],
    factor_dims: Sequence[int],
    factor: int,
    target: Float[ArrayLike, " d_f"],
    *,
    decoder: LinearProbe | None = None,
) -> Float[Array, "*batch d_act"]:
    """Belief-state steering through a joint probe (seed 000, section 1, steps 1-5).

    With the probe ``L(x) = x W + b`` fitted from activations to joint beliefs:

    1. ``eta_hat = L(x)``, the probe's reading of the activation;
    2. its factorized form: the marginals ``eta_hat_g`` (``factor_marginals``), i.e. the
       nearest product state ``(x)_g eta_hat_g``;
    3. replace factor ``f``'s marginal by ``target``, keeping the others:
       ``eta' = (x)_g eta'_g`` with ``eta'_f = target``;
    4. ``delta_eta = eta' - (x)_g eta_hat_g`` (the change of the factorized form), mapped
       back to the residual stream (the inverse problem of the probe's map):

       * without ``decoder``: the probe's minimum-norm inverse ``delta_x = delta_eta W^+``
         (``probe_inverse``), the smallest activation change that moves the probe's
         reading by ``delta_eta``;
       * with ``decoder``, the affine map ``D(eta) = <<eta| A + c`` from beliefs to
         activations (fit it with ``fit_probe(joint_beliefs, acts)``):
         ``delta_x = delta_eta A``, the change of the mean activation of contexts with
         belief ``eta'`` rather than ``(x)_g eta_hat_g``.

       The two differ when the activations carry directions the probe does not need:
       ``W^+`` lies in the span of ``W``, which for a least-squares probe leans towards
       low-variance directions (the large-gain ones), and the rest of the network may
       ignore those; ``A`` follows the directions along which the activations actually
       vary with the belief.
    5. steer with ``x -> x + scale * delta_x`` (e.g. ``steering_sweep`` with one vector
       per sequence).

    Works on any batch of activations and under ``jit``/``vmap``.

    Args:
        probe: joint-belief probe (``d_target = prod(factor_dims)``).
        acts: unsteered activations ``x`` at the site, ``(*batch, d_act)``.
        factor_dims: factor dimensions (factor 0 most significant).
        factor: the factor to steer.
        target: the factor's target marginal belief ``(d_f,)``.
        decoder: optional generative map from joint beliefs to activations (a
            ``LinearProbe`` with ``d_act = prod(factor_dims)`` inputs and the site's width
            as outputs); ``None`` uses the probe's pseudo-inverse.

    Returns:
        ``delta_x`` of shape ``(*batch, d_act)``.

    >>> import numpy as np, jax.numpy as jnp, sfpjax
    >>> probe = sfpjax.LinearProbe(jnp.eye(4), jnp.zeros(4))      # activations are beliefs
    >>> x = jnp.kron(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))
    >>> sfpjax.belief_state_delta(probe, x, (2, 2), 0, jnp.array([0.0, 1.0])).round(3)
    Array([-0.5, -0.5,  0.5,  0.5], dtype=float32)
    >>> decoder = sfpjax.LinearProbe(2 * jnp.eye(4), jnp.zeros(4))  # activations are 2 * beliefs
    >>> sfpjax.belief_state_delta(probe, x, (2, 2), 0, jnp.array([0.0, 1.0]), decoder=decoder).round(3)
    Array([-1., -1.,  1.,  1.], dtype=float32)
    """
    dims = [int(d) for d in factor_dims]
    if probe.d_target != int(np.prod(dims)):
        raise ValueError(
            f"the probe predicts {probe.d_target} numbers but factor_dims {dims} give a joint belief of "
            f"{int(np.prod(dims))}; fit the probe on joint beliefs."
        )
    if not 0 <= int(factor) < len(dims):
        raise ValueError(f"factor must be in range({len(dims)}), got {factor}.")
    target = jnp.asarray(target, probe.W.dtype)
    if target.shape != (dims[factor],):
        raise ValueError(f"target must have shape ({dims[factor]},) (factor {factor}'s belief), got {target.shape}.")
    if decoder is not None and (decoder.d_act != probe.d_target or decoder.d_target != probe.d_act):
        raise ValueError(
            f"decoder must map joint beliefs ({probe.d_target} numbers) to activations ({probe.d_act} numbers), "
            f"got a map from {decoder.d_act} to {decoder.d_target}; fit it with fit_probe(joint_beliefs, acts)."
        )
    eta_hat = probe(acts)
    marg = factor_marginals(eta_hat, dims)
    new = list(marg)
    new[factor] = jnp.broadcast_to(target, marg[factor].shape)
    delta = _kron_vectors(new) - _kron_vectors(marg)
    if decoder is None:
        return probe_inverse(probe, delta)
    return delta.astype(decoder.W.dtype) @ decoder.W
