"""Did post-training compose belief states or only reweight them? Measures that tell.

Three measures, each comparing a post-trained policy ``pi`` with its reference ``pi_0``:

* **Reweighting residual.** A policy that only reweights the reference is an exponential
  tilt ``q_lam(y|h) = pi_0(y|h) exp(lam . phi(h, y)) / Z_lam(h)`` along given features
  ``phi`` (the reward ``r(h, y)`` with ``lam = 1 / beta``: the maximizer of the
  KL-regularized objective; or one-hot tokens: a context-free preference for symbols).
  The residual is ``min_lam KL(pi(.|h) || q_lam(.|h))``, with ``lam`` fitted per context or
  shared by all contexts. It is zero exactly when ``pi`` is such a tilt.
* **New structure.** Held-out linear decodability (R^2 of a ridge probe) of a latent, e.g.
  the composite the reward depends on, from the residual stream before and after
  post-training, beside the decodability of the pre-trained factors' beliefs.
* **Geometry drift.** Principal angles between the subspaces read by the probes of a latent
  fitted before and after post-training.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._geometry import SubspaceAngles, subspace_angles
from ._probes import fit_probe, probe_r2, train_test_split

__all__ = ["ProbeComparison", "TiltFit", "compare_probes", "heldout_r2", "reweighting_residual"]

_STEPS = np.array([1.0, 0.5, 0.25, 0.125, 0.0625, 0.0])


class TiltFit(NamedTuple):
    """The best exponential tilt of the reference and how far the policy is from it.

    Attributes:
        residual: ``(...)`` ``KL(pi(.|h) || q_lam(.|h))`` per context, nats.
        mean: the (weighted) mean residual over contexts.
        lam: the fitted coefficients, ``(..., F)`` per context or ``(F,)`` when shared.
    """

    residual: Float[Array, "..."]
    mean: Float[Array, ""]
    lam: Float[Array, "... F"]


def _tilted(ref_logp, phi, lam):
    # log q_lam = log pi_0 + phi . lam - log Z, rows (..., V).
    s = ref_logp + jnp.einsum("...vf,...f->...v", phi, lam)
    return s - jax.nn.logsumexp(s, axis=-1, keepdims=True)


def _kl(p_logp, q_logp):
    p = jnp.exp(p_logp)
    return jnp.sum(jnp.where(p > 0, p * (p_logp - q_logp), 0.0), axis=-1)


def _newton(objective, grad_hess, lam0, iters):
    def body(lam, _):
        g, H = grad_hess(lam)
        F = lam.shape[-1]
        H = H + 1e-9 * jnp.eye(F, dtype=H.dtype)
        d = jnp.linalg.lstsq(H, g)[0]
        # Backtracking over a fixed ladder of step sizes (0 keeps lam): monotone descent.
        cands = lam[None] - jnp.asarray(_STEPS, lam.dtype)[:, None] * d[None]
        vals = jax.vmap(objective)(cands)
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        return cands[jnp.argmin(vals)], None

    lam, _ = jax.lax.scan(body, lam0, None, length=iters)
    return lam


def _fit_one(p_logp, ref_logp, phi, iters):
    # One context: p_logp, ref_logp (V,), phi (V, F).
    def objective(lam):
        return _kl(p_logp, _tilted(ref_logp, phi, lam))

    def grad_hess(lam):
        q = jnp.exp(_tilted(ref_logp, phi, lam))
        p = jnp.exp(p_logp)
        mq = q @ phi
        g = mq - p @ phi
        c = phi - mq[None]
        return g, (c * q[:, None]).T @ c

    lam = _newton(objective, grad_hess, jnp.zeros(phi.shape[-1], p_logp.dtype), iters)
    return lam, objective(lam)


def _fit_shared(p_logp, ref_logp, phi, w, iters):
    def objective(lam):
        return w @ _kl(p_logp, _tilted(ref_logp, phi, jnp.broadcast_to(lam, phi.shape[:-2] + lam.shape)))

    def grad_hess(lam):
        lamb = jnp.broadcast_to(lam, phi.shape[:-2] + lam.shape)
        q = jnp.exp(_tilted(ref_logp, phi, lamb))
        p = jnp.exp(p_logp)
        mq = jnp.einsum("nv,nvf->nf", q, phi)
        g = w @ (mq - jnp.einsum("nv,nvf->nf", p, phi))
        c = phi - mq[:, None]
        H = jnp.einsum("n,nv,nvf,nvg->fg", w, q, c, c)
        return g, H

    return _newton(objective, grad_hess, jnp.zeros(phi.shape[-1], p_logp.dtype), iters)


@jax.jit
def _one_hot_features(ref_logp):
    V = ref_logp.shape[-1]
    # The last symbol is the reference level: a shift of all lam_y leaves the tilt unchanged.
    return jnp.broadcast_to(jnp.eye(V, V - 1, dtype=ref_logp.dtype), ref_logp.shape + (V - 1,))


def reweighting_residual(
    policy_logp: Float[ArrayLike, "*batch V"],
    ref_logp: Float[ArrayLike, "..."],
    features: Float[ArrayLike, "..."] | None = None,
    *,
    shared: bool = False,
    weights: Float[ArrayLike, "..."] | None = None,
    iters: int = 40,
) -> TiltFit:
    """How far a policy is from the best exponential tilt of its reference, per context.

    For each context ``h`` (a row of the leading axes) finds ``lam`` minimizing
    ``KL(pi(.|h) || q_lam(.|h))`` with ``q_lam(y|h) = pi_0(y|h) exp(lam . phi(h, y)) / Z``
    (a convex problem: damped Newton with moment matching ``E_q[phi] = E_pi[phi]`` at the
    optimum). With ``features = r(h, y)[..., None]`` this is the tilt
    ``pi_0 exp(r / beta) / Z`` of the KL-regularized optimum with ``1 / beta`` fitted per
    context; with ``features=None`` the features are one-hot symbols (a free reweighting
    of each symbol), which is only a constraint with ``shared=True``.

    Args:
        policy_logp: ``log pi(y|h)``, shape ``(*batch, V)`` (``-inf`` allowed).
        ref_logp: ``log pi_0(y|h)``, same shape (finite wherever ``pi > 0``).
        features: ``phi(h, y)``, shape ``(*batch, V, F)``; default one-hot symbols
            (``F = V - 1``).
        shared: fit one ``lam`` for all contexts (minimizing the weighted mean residual)
            instead of one per context.
        weights: weights of the contexts in the mean (and in the shared fit); default equal.
        iters: Newton iterations.

    Returns:
        :class:`TiltFit` ``(residual, mean, lam)``.

    >>> import jax, jax.numpy as jnp, sfpjax
    >>> ref = jax.nn.log_softmax(jnp.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]))
    >>> r = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> pi = jax.nn.log_softmax(ref + r / 0.5)  # the tilt with beta = 0.5
    >>> fit = sfpjax.reweighting_residual(pi, ref, r[..., None])
    >>> bool(fit.mean < 1e-6), jnp.round(fit.lam[:, 0], 3).tolist()
    (True, [2.0, 2.0])
    """
    p = jnp.asarray(policy_logp)
    ref = jnp.asarray(ref_logp)
    if p.ndim < 1 or p.shape != ref.shape:
        raise ValueError(
            f"policy_logp and ref_logp must have the same shape (*batch, V); got {p.shape} and {ref.shape}."
        )
    dtype = jnp.promote_types(p.dtype, ref.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError("policy_logp and ref_logp must be floating-point log-probabilities.")
    p, ref = p.astype(dtype), ref.astype(dtype)
    if features is None:
        if p.shape[-1] < 2:
            raise ValueError("one-hot features need at least 2 symbols.")
        phi = _one_hot_features(ref)
    else:
        phi = jnp.asarray(features).astype(dtype)
        if phi.ndim != p.ndim + 1 or phi.shape[:-1] != p.shape:
            raise ValueError(
                f"features must have shape (*batch, V, F) = {p.shape} + (F,), got {phi.shape}; "
                "for a reward r(h, y) of shape (*batch, V) pass r[..., None]."
            )
    batch = p.shape[:-1]
    n = int(np.prod(batch)) if batch else 1
    V, F = p.shape[-1], phi.shape[-1]
    pf, rf, phif = p.reshape(n, V), ref.reshape(n, V), phi.reshape(n, V, F)
    if weights is None:
        w = jnp.full((n,), 1.0 / n, dtype)
    else:
        w = jnp.asarray(weights).astype(dtype)
        if w.shape != batch:
            raise ValueError(f"weights must have the batch shape {batch}, got {w.shape}.")
        w = w.reshape(n) / w.sum()
    if shared:
        lam = _fit_shared_jit(pf, rf, phif, w, int(iters))
        res = _kl(pf, _tilted(rf, phif, jnp.broadcast_to(lam, (n, F))))
        return TiltFit(res.reshape(batch), w @ res, lam)
    lam, res = _fit_rows_jit(pf, rf, phif, int(iters))
    return TiltFit(res.reshape(batch), w @ res, lam.reshape(batch + (F,)))


@functools.partial(jax.jit, static_argnums=3)
def _fit_rows_jit(p, ref, phi, iters):
    return jax.vmap(lambda a, b, c: _fit_one(a, b, c, iters))(p, ref, phi)


@functools.partial(jax.jit, static_argnums=4)
def _fit_shared_jit(p, ref, phi, w, iters):
    return _fit_shared(p, ref, phi, w, iters)


def heldout_r2(
    acts: Float[ArrayLike, "N d_act"],
    targets: Float[ArrayLike, "N d_target"],
    *,
    key: PRNGKeyArray,
    test_fraction: float = 0.25,
    ridge: float = 1e-3,
) -> float:
    """Held-out R^2 of a ridge probe from activations to a latent (``fit_probe``, ``probe_r2``).

    Rows are split at random (``train_test_split``); the probe is fitted on the train part
    and scored on the test part.

    >>> import numpy as np, jax.random as jr, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 2)); acts = z @ rng.normal(size=(2, 6))
    >>> round(sfpjax.heldout_r2(acts, z, key=jr.key(0)), 3)
    1.0
    """
    acts, targets = jnp.asarray(acts), jnp.asarray(targets)
    if acts.ndim != 2 or targets.ndim != 2 or acts.shape[0] != targets.shape[0]:
        raise ValueError(
            f"acts (N, d_act) and targets (N, d_target) need the same N rows; got {acts.shape} and {targets.shape}."
        )
    a_tr, a_te, t_tr, t_te = train_test_split(acts, targets, key=key, test_fraction=test_fraction)
    probe = fit_probe(a_tr, t_tr, ridge=ridge)
    return float(probe_r2(probe, a_te, t_te))


@dataclasses.dataclass(frozen=True)
class ProbeComparison:
    """A latent probed before and after post-training.

    Attributes:
        r2_before, r2_after: held-out R^2 of the probe (see :func:`heldout_r2`).
        angles: principal angles (radians) between the subspaces the two probes read.
        overlap: mean squared cosine of those angles (1: same subspace, 0: orthogonal).
    """

    r2_before: float
    r2_after: float
    angles: np.ndarray
    overlap: float


def compare_probes(
    acts_before: Float[ArrayLike, "N d_act"],
    acts_after: Float[ArrayLike, "N d_act"],
    latents: Mapping[str, Float[ArrayLike, "N _d"]],
    *,
    key: PRNGKeyArray,
    test_fraction: float = 0.25,
    ridge: float = 1e-3,
) -> dict[str, ProbeComparison]:
    """Decodability and probe geometry of each latent, before against after post-training.

    Args:
        acts_before, acts_after: residual-stream activations of the same ``N`` contexts
            under the reference and the post-trained model.
        latents: name -> targets ``(N, d)``: the factors' beliefs, the composite latent the
            reward depends on, ...
        key: PRNG key of the train/test split (the same split for every latent and model).

    Returns:
        name -> :class:`ProbeComparison`; the angles are those between the column spaces of
        the probes' ``W`` fitted on all rows before and after (``subspace_angles``).

    >>> import numpy as np, jax.random as jr, sfpjax
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 2)); acts = z @ rng.normal(size=(2, 6))
    >>> out = sfpjax.compare_probes(acts, acts, {"z": z}, key=jr.key(0))
    >>> round(out["z"].r2_after, 3), round(out["z"].overlap, 3)
    (1.0, 1.0)
    """
    out = {}
    for name, targets in latents.items():
        t = jnp.asarray(targets)
        r2b = heldout_r2(acts_before, t, key=key, test_fraction=test_fraction, ridge=ridge)
        r2a = heldout_r2(acts_after, t, key=key, test_fraction=test_fraction, ridge=ridge)
        wb = fit_probe(acts_before, t, ridge=ridge).W
        wa = fit_probe(acts_after, t, ridge=ridge).W
        ang: SubspaceAngles = subspace_angles(wb, wa, rtol=1e-6)
        out[name] = ProbeComparison(r2b, r2a, ang.angles, ang.overlap)
    return out
