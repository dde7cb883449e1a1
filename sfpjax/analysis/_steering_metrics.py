"""How much a steering intervention moved each factor, and whether it broke the sectors.

Joint symbols of a product of ``F`` factors are ``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}``
(factor 0 most significant). The model's next-token distribution ``q(x)`` over joint
symbols gives each factor's *marginal next-token distribution*
``q_f(x_f) = sum_{x_g, g != f} q(x)`` (``factor_token_marginals``). Every KL below is
between such marginals, in nats, ``KL(p || q) = sum_y p(y) log(p(y) / q(y))`` with
``0 log 0 = 0``.

Seed 001's three KL divergences for steering factor ``f`` from belief class ``s`` to
``t`` (per steered sequence, then averaged; ``steering_kls``):

1. target: ``KL(m_t || q_f)``, with ``m_t`` the mean of the model's unsteered
   factor-``f`` marginal over held-out sequences genuinely in class ``t``, and ``q_f``
   the steered marginal;
2. steered factor: ``KL(q_f || p_f)``, ``p_f`` the unsteered (original) marginal of the
   same sequence;
3. unsteered factor: ``KL(q_g || p_g)`` for the other factor ``g`` (summed over ``g != f``
   when there are more than two factors).

The specificity ratio is ``mean(2) / mean(3)``. The same KLs against the exact process
(``KL(exact || model)``, the exact law first so that its zeros are harmless) say how far
the steered model is from the Bayes-optimal prediction at the target belief.

Sector structure (seed 000, 2.2): each factor's states split into sectors; a joint
block ``P_ij = A_i (x) B_j`` picks a sector per factor. For a target block the joint
symbols fall into three classes (``sector_token_classes``):

* forbidden: impossible from every state of the block (some factor's sector cannot
  emit that factor's sub-symbol at all);
* target-class: possible under the target belief itself (the product of the factors'
  target marginals, ``Pr(x | eta') > 0``);
* allowed-but-not-target: possible in the block, impossible under the target belief.

``token_class_masses`` gives the model's probability on each class; they sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ..processes._ghmm import GHMM
from ._steering import steering_sweep

__all__ = [
    "factor_token_marginals",
    "kl_divergence",
    "SteeringKLs",
    "steering_kls",
    "specificity_ratio",
    "sector_token_classes",
    "token_class_masses",
    "SteeringSweep",
    "evaluate_steering",
]


def _check_vocab(vocab_sizes, V):
    sizes = tuple(int(v) for v in vocab_sizes)
    if not sizes or any(v < 1 for v in sizes) or math.prod(sizes) != V:
        raise ValueError(
            f"vocab_sizes {sizes} must be positive and multiply to the joint vocabulary size {V}."
        )
    return sizes


def factor_token_marginals(
    probs: Float[ArrayLike, "*batch V"], vocab_sizes: Sequence[int]
) -> list[Float[Array, "*batch _"]]:
    """Marginal next-token distribution of each factor's sub-symbol.

    ``q_f(x_f) = sum over the other factors' sub-symbols of q(x)``, with the joint symbol
    ``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}``.

    >>> import jax.numpy as jnp, sfpjax
    >>> q = jnp.array([0.1, 0.2, 0.3, 0.4])     # tokens (0,0), (0,1), (1,0), (1,1)
    >>> [[round(float(v), 2) for v in m] for m in sfpjax.factor_token_marginals(q, (2, 2))]
    [[0.3, 0.7], [0.4, 0.6]]
    """
    probs = jnp.asarray(probs)
    sizes = _check_vocab(vocab_sizes, probs.shape[-1])
    batch = probs.shape[:-1]
    x = probs.reshape(*batch, *sizes)
    F = len(sizes)
    nb = len(batch)
    return [x.sum(tuple(nb + g for g in range(F) if g != f)) if F > 1 else x for f in range(F)]


def kl_divergence(
    p: Float[ArrayLike, "*batch_p n"], q: Float[ArrayLike, "*batch_q n"]
) -> Float[Array, "..."]:
    """``KL(p || q) = sum_y p(y) log(p(y) / q(y))`` in nats, with ``0 log 0 = 0``.

    ``q`` is clipped below at the smallest normal number of its dtype so that a model
    probability that underflowed to 0 gives a large finite value rather than ``inf``.

    >>> import jax.numpy as jnp, sfpjax
    >>> float(sfpjax.kl_divergence(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))) == float(jnp.log(2.0))
    True
    """
    p = jnp.asarray(p)
    q = jnp.asarray(q)
    if p.shape[-1:] != q.shape[-1:]:
        raise ValueError(f"p and q must be distributions over the same outcomes, got shapes {p.shape} and {q.shape}.")
    dtype = jnp.dtype(np.promote_types(p.dtype, q.dtype))
    shape = np.broadcast_shapes(p.shape, q.shape)
    p = jnp.broadcast_to(p.astype(dtype), shape)
    q = jnp.broadcast_to(q, shape)
    q = jnp.maximum(q.astype(dtype), jnp.finfo(dtype).tiny)
    safe_p = jnp.where(p > 0, p, 1.0)
    return jnp.sum(jnp.where(p > 0, p * (jnp.log(safe_p) - jnp.log(q)), 0.0), axis=-1)


class SteeringKLs(NamedTuple):
    """Seed 001's three KLs, per steered sequence (shapes ``(*batch,)``), in nats.

    Attributes:
        target: ``KL(m_t || q_f)``: reference target marginal vs steered marginal.
        steered: ``KL(q_f || p_f)``: effect on the steered factor.
        unsteered: ``sum_{g != f} KL(q_g || p_g)``: spillover to the other factor(s).
    """

    target: Float[Array, "*batch"]
    steered: Float[Array, "*batch"]
    unsteered: Float[Array, "*batch"]


def steering_kls(
    steered_probs: Float[ArrayLike, "*batch V"],
    original_probs: Float[ArrayLike, "*batch_o V"],
    target_marginal: Float[ArrayLike, "*batch_t V_f"],
    vocab_sizes: Sequence[int],
    factor: int,
) -> SteeringKLs:
    """The three KLs of seed 001 for steering ``factor`` (see the module docstring).

    Args:
        steered_probs: the model's joint next-token distribution with the intervention.
        original_probs: the same without it (scale 0).
        target_marginal: reference distribution of the factor's sub-symbol at the target:
            the mean unsteered model marginal over sequences in the target class, or the
            exact ``Pr(x_f | <<eta_t|)`` for the KL against the process.
        vocab_sizes: per-factor alphabet sizes ``(V_0, ..., V_{F-1})``.
        factor: the steered factor ``f``.

    >>> import jax.numpy as jnp, sfpjax
    >>> p = jnp.full((4,), 0.25)
    >>> kls = sfpjax.steering_kls(p, p, jnp.array([0.5, 0.5]), (2, 2), 0)
    >>> [float(k) for k in kls]
    [0.0, 0.0, 0.0]
    """
    steered_probs = jnp.asarray(steered_probs)
    original_probs = jnp.asarray(original_probs)
    if steered_probs.shape[-1] != original_probs.shape[-1]:
        raise ValueError(
            f"steered_probs and original_probs must share the vocabulary axis, got {steered_probs.shape} "
            f"and {original_probs.shape}."
        )
    sizes = _check_vocab(vocab_sizes, steered_probs.shape[-1])
    if not 0 <= int(factor) < len(sizes):
        raise ValueError(f"factor must be in range({len(sizes)}), got {factor}.")
    target_marginal = jnp.asarray(target_marginal)
    if target_marginal.shape[-1] != sizes[factor]:
        raise ValueError(
            f"target_marginal must be a distribution over factor {factor}'s {sizes[factor]} symbols, "
            f"got shape {target_marginal.shape}."
        )
    q = factor_token_marginals(steered_probs, sizes)
    p = factor_token_marginals(original_probs, sizes)
    target = kl_divergence(target_marginal, q[factor])
    steered = kl_divergence(q[factor], p[factor])
    others = [kl_divergence(q[g], p[g]) for g in range(len(sizes)) if g != factor]
    unsteered = sum(others[1:], others[0]) if others else jnp.zeros_like(steered)
    return SteeringKLs(target, steered, unsteered)


def specificity_ratio(steered_kl: ArrayLike, unsteered_kl: ArrayLike) -> Float[Array, "..."]:
    """``steered_kl / unsteered_kl`` (``inf`` when the spillover is exactly 0 and the effect is not).

    Pass means over sequences and pairs to get the ratio of means that seed 001 reports.

    >>> import sfpjax
    >>> float(sfpjax.specificity_ratio(0.146, 0.0001))
    1460.0
    """
    s = jnp.asarray(steered_kl)
    u = jnp.asarray(unsteered_kl)
    return jnp.where(u > 0, s / jnp.where(u > 0, u, 1.0), jnp.where(s > 0, jnp.inf, jnp.nan))


def _emitting_states(process: GHMM, atol: float) -> np.ndarray:
    """``(V, d)`` bool: basis state ``s`` emits ``x`` with positive probability (HMM reading)."""
    Tr = np.asarray(process.T, np.float64) @ np.asarray(process.right, np.float64)
    return Tr > atol


def sector_token_classes(
    factors: Sequence[GHMM],
    sectors: Sequence[Sequence[Sequence[int]]],
    block: Sequence[int],
    target_beliefs: Sequence[ArrayLike | Sequence[float | int]],
    *,
    atol: float = 1e-9,
) -> tuple[Bool[np.ndarray, " V"], Bool[np.ndarray, " V"]]:
    """Target-class and forbidden joint symbols for a steering target in sector block ``block``.

    Args:
        factors: the factor HMMs ``(P_0, ..., P_{F-1})`` (for a semi-factored process,
            ``sfp.factors``).
        sectors: per factor, the partition of its states (``sfp.sectors``).
        block: the target sector of each factor, ``(sigma(0), ..., sigma(F-1))``; e.g.
            ``(1, 0)`` is the block ``P_10 = A_1 (x) B_0``.
        target_beliefs: per factor, the target marginal belief (the steered factor's
            target, the others' unchanged beliefs); each must live in its block sector.

    Returns:
        ``(target_class, forbidden)``, two bool ``(V,)`` masks over joint symbols:
        ``forbidden[x]`` when for some factor ``f`` no state of sector ``block[f]`` can
        emit ``x_f`` (``T_f(x_f)|1>>`` is zero on the whole sector); ``target_class[x]``
        when ``prod_f Pr(x_f | target_f) > atol``. The two are disjoint, and every other
        symbol is allowed by the block but not by the target belief.

    >>> import sfpjax
    >>> sfp = sfpjax.partitioned_z1r_sfp()
    >>> tgt, forb = sfpjax.sector_token_classes(sfp.factors, sfp.sectors, (1, 0), [[0, 1, 0], [1, 0, 0]])
    >>> tgt.tolist(), forb.tolist()   # factor 0 at S1 emits 1, factor 1 at S0 emits 0: only C
    ([False, False, True, False], [False, True, False, True])
    """
    factors = list(factors)
    F = len(factors)
    if len(sectors) != F or len(block) != F or len(target_beliefs) != F:
        raise ValueError(
            f"give one sector partition, one block index and one target belief per factor: {F} factors, "
            f"{len(sectors)} partitions, {len(block)} block indices, {len(target_beliefs)} beliefs."
        )
    possible = []
    emits = []
    for f, (proc, parts, b, eta) in enumerate(zip(factors, sectors, block, target_beliefs)):
        if not 0 <= int(b) < len(parts):
            raise ValueError(f"block[{f}] = {b} is not a sector of factor {f} (it has {len(parts)}).")
        idx = np.asarray(parts[int(b)], np.int64)
        em = _emitting_states(proc, atol)
        possible.append(em[:, idx].any(-1))
        eta = np.asarray(eta, np.float64)
        if eta.shape != (proc.num_states,):
            raise ValueError(f"target_beliefs[{f}] must have shape ({proc.num_states},), got {eta.shape}.")
        outside = np.delete(np.abs(eta), idx)
        if outside.size and outside.max() > 1e-6:
            raise ValueError(
                f"target_beliefs[{f}] puts weight {outside.sum():.3g} outside sector {b} of factor {f}; "
                "the target of a block must live in that block."
            )
        Tr = np.asarray(proc.T, np.float64) @ np.asarray(proc.right, np.float64)
        emits.append(eta @ Tr.T)
    poss = possible[0]
    pr = emits[0]
    for f in range(1, F):
        poss = np.logical_and.outer(poss, possible[f]).reshape(-1)
        pr = np.multiply.outer(pr, emits[f]).reshape(-1)
    target = pr > atol
    return target & poss, ~poss


def token_class_masses(
    probs: Float[ArrayLike, "*batch V"],
    target_class: Bool[ArrayLike, " V"],
    forbidden: Bool[ArrayLike, " V"],
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"], Float[Array, "*batch"]]:
    """Model probability on the target-class, allowed-but-not-target and forbidden symbols.

    >>> import jax.numpy as jnp, sfpjax
    >>> t, a, f = sfpjax.token_class_masses(jnp.array([0.1, 0.2, 0.3, 0.4]),
    ...                                     jnp.array([False, False, True, False]),
    ...                                     jnp.array([False, True, False, True]))
    >>> [round(float(v), 3) for v in (t, a, f)]
    [0.3, 0.1, 0.6]
    """
    probs = jnp.asarray(probs)
    t = jnp.asarray(target_class)
    fb = jnp.asarray(forbidden)
    if t.shape != probs.shape[-1:] or fb.shape != probs.shape[-1:] or t.dtype != jnp.bool_ or fb.dtype != jnp.bool_:
        raise ValueError(
            f"target_class and forbidden must be bool masks of shape ({probs.shape[-1]},), got "
            f"{t.dtype}{list(t.shape)} and {fb.dtype}{list(fb.shape)}."
        )
    if bool(jnp.any(t & fb)):
        raise ValueError("a symbol cannot be both target-class and forbidden; the masks overlap.")
    zero = jnp.zeros((), probs.dtype)
    tm = jnp.sum(jnp.where(t, probs, zero), -1)
    fm = jnp.sum(jnp.where(fb, probs, zero), -1)
    am = jnp.sum(jnp.where(~(t | fb), probs, zero), -1)
    return tm, am, fm


class SteeringSweep(NamedTuple):
    """Per-scale means over the steered sequences (every field has shape ``(n_scales,)``).

    Attributes:
        scales: the steering scales.
        kl_target, kl_steered, kl_unsteered: the three KLs of ``steering_kls`` (model
            reference at the target).
        kl_target_exact: ``KL(Pr(x_f | <<eta_t|) || q_f)`` against the process (NaN when no
            exact target law was given).
        kl_unsteered_exact: ``sum_{g != f} KL(Pr(x_g | <<eta(w)|) || q_g)``: how far the
            steered model's other-factor prediction is from the exact one of the sequence
            (NaN when no exact laws were given).
        target_mass, allowed_mass, forbidden_mass: ``token_class_masses`` (NaN without
            token classes).
    """

    scales: Float[Array, " n"]
    kl_target: Float[Array, " n"]
    kl_steered: Float[Array, " n"]
    kl_unsteered: Float[Array, " n"]
    kl_target_exact: Float[Array, " n"]
    kl_unsteered_exact: Float[Array, " n"]
    target_mass: Float[Array, " n"]
    allowed_mass: Float[Array, " n"]
    forbidden_mass: Float[Array, " n"]


def evaluate_steering(
    model,
    tokens: Int[ArrayLike, "batch seq"],
    site: str,
    vectors: Float[ArrayLike, "*batch d_model"],
    scales: Float[ArrayLike, " n"],
    *,
    factor: int,
    vocab_sizes: Sequence[int],
    target_marginal: Float[ArrayLike, " V_f"],
    exact_target_marginal: Float[ArrayLike, " V_f"] | None = None,
    exact_probs: Float[ArrayLike, "batch V"] | None = None,
    token_classes: tuple[Bool[ArrayLike, " V"], Bool[ArrayLike, " V"]] | None = None,
    mask: Bool[ArrayLike, " batch"] | None = None,
    position: int = -1,
    preserve_norm: bool = False,
) -> SteeringSweep:
    """Steer ``factor`` on every sequence of ``tokens`` at every scale and average the metrics.

    The forward passes are one ``steering_sweep`` call (vmapped over sequences and over
    ``0`` followed by ``scales``; scale 0 gives the original distribution ``p``).

    Args:
        model, tokens, site, vectors, position, preserve_norm: as in ``steering_sweep``
            (``tokens`` are the source-class sequences).
        scales: steering scales ``(n,)``.
        factor, vocab_sizes: the steered factor and the per-factor alphabet sizes.
        target_marginal: ``m_t``, the mean unsteered model marginal of the factor over
            held-out sequences in the target class.
        exact_target_marginal: ``Pr(x_f | <<eta_t|)`` from the factor process.
        exact_probs: the exact joint next-token law ``<<eta(w)|T(x)|1>>`` of each source
            sequence ``(batch, V)``.
        token_classes: ``(target_class, forbidden)`` masks from ``sector_token_classes``.
        mask: bool ``(batch,)``: average only over these sequences. Steering a fixed-size
            batch and masking the source class keeps every call the same shape, so a loop
            over source/target pairs compiles once.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=6), key=jr.key(0))
    >>> out = sfpjax.evaluate_steering(model, jnp.zeros((3, 6), jnp.int32), "blocks.1.hook_resid_post",
    ...                                jnp.zeros(64), jnp.array([0.0, 1.0]), factor=0, vocab_sizes=(2, 2),
    ...                                target_marginal=jnp.array([0.5, 0.5]))
    >>> [round(float(v), 6) for v in out.kl_steered]
    [0.0, 0.0]
    """
    scales = jnp.asarray(scales, jnp.float32)
    sizes = _check_vocab(vocab_sizes, model.config.vocab_size)
    n = jnp.asarray(tokens).shape[0]
    if mask is None:
        w = jnp.full((n,), 1.0 / n, jnp.float32)
    else:
        m = jnp.asarray(mask)
        if m.shape != (n,) or m.dtype != jnp.bool_:
            raise ValueError(f"mask must be a bool array of shape ({n},) (one entry per sequence), got {m.dtype}{list(m.shape)}.")
        if not bool(m.any()):
            raise ValueError("mask selects no sequence; at least one sequence must be averaged over.")
        w = m.astype(jnp.float32) / m.sum().astype(jnp.float32)

    def avg(x):
        return x @ w

    all_scales = jnp.concatenate([jnp.zeros((1,), jnp.float32), scales])
    probs = steering_sweep(model, tokens, site, vectors, all_scales, position=position, preserve_norm=preserve_norm)
    original, steered = probs[0], probs[1:]
    kls = steering_kls(steered, original[None], jnp.asarray(target_marginal, jnp.float32), sizes, factor)
    nan = jnp.full(scales.shape, jnp.nan, jnp.float32)
    q = factor_token_marginals(steered, sizes)
    if exact_target_marginal is None:
        kl_te = nan
    else:
        kl_te = avg(kl_divergence(jnp.asarray(exact_target_marginal, jnp.float32), q[factor]))
    if exact_probs is None:
        kl_ue = nan
    else:
        ex = factor_token_marginals(jnp.asarray(exact_probs, jnp.float32), sizes)
        parts = [kl_divergence(ex[g][None], q[g]) for g in range(len(sizes)) if g != factor]
        kl_ue = avg(sum(parts[1:], parts[0])) if parts else jnp.zeros_like(nan)
    if token_classes is None:
        tm = am = fm = nan
    else:
        tm, am, fm = (avg(c) for c in token_class_masses(steered, *token_classes))
    return SteeringSweep(
        scales, avg(kls.target), avg(kls.steered), avg(kls.unsteered), kl_te, kl_ue, tm, am, fm
    )
