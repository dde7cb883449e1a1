"""Steering one factor between belief classes: the methods, the classes, the process symmetries.

Seed 001 (appendix A) steers factor ``f`` of a factored model from belief class ``s`` to
class ``t``. This module holds what a study of that needs beyond the steering primitives:

* `STEERING_METHODS`, the registry of ways to build the steering vector (class centroids
  at the residual stream or after the final LayerNorm, with or without norm preservation,
  a behavioural difference in means, belief-state steering through the probe inverse or
  through a generative map), and `steering_vectors`, which builds them all for one pair;
* `synchronized_classes`, the classes one steers between: pure (synchronized) states of
  the factor with enough rows in both the fitting and the evaluation set;
* `factor_swap_symmetric` and `belief_sector`, the checks that say whether an asymmetry
  between the factors can be expected and which sector a class lies in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from ..inference._filter import next_token_probs
from ..processes._ghmm import GHMM
from ..processes._structure import sector_weights
from ._probes import LinearProbe
from ._steering import FactorCentroids, belief_state_delta, centroid_vector

__all__ = [
    "STEERING_METHODS",
    "SteeringMethod",
    "belief_sector",
    "factor_swap_symmetric",
    "steering_vectors",
    "synchronized_classes",
]


class SteeringMethod(NamedTuple):
    """How one steering method builds and applies its vector.

    Attributes:
        site: ``"resid"`` (the residual-stream site the probes read) or ``"ln_final"``
            (``ln_final.hook_normalized``, the input of the unembedding).
        preserve_norm: rescale each steered activation to its original norm.
        description: one line for reports.
    """

    site: str
    preserve_norm: bool
    description: str


STEERING_METHODS: dict[str, SteeringMethod] = {
    "centroid": SteeringMethod(
        "resid", False, "c_t - c_s, the difference of the factor's belief-class centroids (seed 001)"
    ),
    "centroid-norm": SteeringMethod(
        "resid", True,
        "centroid, each steered activation rescaled to its original norm (the final LayerNorm "
        "divides by the norm anyway, so this shows whether the norm is what spills over)",
    ),
    "centroid-ln": SteeringMethod(
        "ln_final", False,
        "class centroids of ln_final.hook_normalized, added there: the change of the logits is "
        "exactly v W_U, with no LayerNorm rescaling of the other factor's component",
    ),
    "diff-means": SteeringMethod(
        "resid", False,
        "sum_y (Pr(y|t) - Pr(y|s)) mu_y, mu_y the mean activation of contexts whose next "
        "factor-f symbol was y (labels only, no beliefs)",
    ),
    "belief-pinv": SteeringMethod(
        "resid", False, "belief-state steering (seed 000 steps 1-5) through the joint probe's inverse W^+"
    ),
    "belief-generative": SteeringMethod(
        "resid", False,
        "belief-state steering mapped back by the generative fit x ~ <<eta| A + c "
        "(delta_x = delta_eta A)",
    ),
}


def synchronized_classes(
    centroids: FactorCentroids,
    eval_marginals: Float[ArrayLike, "n d_f"],
    min_count: int,
    *,
    atol: float = 1e-6,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The belief classes of one factor to steer between, with their evaluation rows.

    A class qualifies when its belief ``<<eta_f|`` is a synchronized (pure) state, i.e.
    ``max_i eta_f[i] > 1 - atol``, and it has at least ``min_count`` rows both among the
    rows that formed ``centroids`` and among ``eval_marginals``.

    Args:
        centroids: the factor's classes, from ``factor_centroids`` on the fitting rows.
        eval_marginals: ``(n, d_f)``, the factor's marginal belief of each evaluation row.
        min_count: the fewest rows a class needs in each set.
        atol: tolerance for "pure" and for matching an evaluation row to a class
            (``10 * atol``, the grid ``factor_centroids`` rounds to).

    Returns:
        ``[(belief, mask), ...]`` in class order; ``mask`` is bool ``(n,)``, the evaluation
        rows in the class.

    >>> import numpy as np, sfpjax
    >>> fc = sfpjax.FactorCentroids(np.zeros((3, 1)), np.array([[1.0, 0], [0, 1.0], [0.5, 0.5]]),
    ...                             np.array([5.0, 5.0, 5.0]), 0, 1e-6)
    >>> ev = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    >>> [(b.tolist(), m.tolist()) for b, m in sfpjax.synchronized_classes(fc, ev, 1)]
    [([1.0, 0.0], [True, True, False, False]), ([0.0, 1.0], [False, False, True, False])]
    """
    ev = np.asarray(eval_marginals, np.float64)
    if ev.ndim != 2 or ev.shape[1] != centroids.beliefs.shape[1]:
        raise ValueError(
            f"eval_marginals must have shape (n, {centroids.beliefs.shape[1]}) (factor {centroids.factor}'s "
            f"marginal per row), got {ev.shape}."
        )
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    out = []
    for k in centroids.classes(min_count):
        b = np.asarray(centroids.beliefs[k], np.float64)
        mask = np.abs(ev - b[None]).max(-1) < 10 * atol
        if b.max() > 1 - atol and mask.sum() >= min_count:
            out.append((b, mask))
    return out


def steering_vectors(
    factor: int,
    source: Float[ArrayLike, " d_f"] | Sequence[float | int],
    target: Float[ArrayLike, " d_f"] | Sequence[float | int],
    *,
    factor_process: GHMM,
    centroids: FactorCentroids,
    ln_centroids: FactorCentroids,
    label_means: Float[ArrayLike, "V_f d_act"],
    joint_probe: LinearProbe,
    decoder: LinearProbe,
    acts: Float[ArrayLike, "n d_act"],
    factor_dims: Sequence[int],
) -> dict[str, np.ndarray]:
    """The steering vector of every method in `STEERING_METHODS` for one pair ``s -> t``.

    Args:
        factor: the steered factor ``f``.
        source, target: ``<<eta_s|`` and ``<<eta_t|``, the factor's beliefs of the two classes.
        factor_process: factor ``f``'s own process; ``Pr(y | eta) = <<eta|T(y)|1>>`` weights
            the label means for ``diff-means``.
        centroids, ln_centroids: ``factor_centroids`` of the residual-stream and of the
            ``ln_final`` activations.
        label_means: ``(V_f, d_act)``, ``mu_y`` from ``label_means`` of the next factor-f symbol.
        joint_probe: the probe from activations to joint beliefs (``belief-pinv``).
        decoder: the generative fit from joint beliefs to activations (``belief-generative``).
        acts: ``(n, d_act)``, the activations that will be steered (the belief methods give
            one vector per row).
        factor_dims: latent dimension of each factor.

    Returns:
        method name -> ``(n, d_act)`` float32 vectors (a shared vector is repeated per row,
        so every method steers with the same shapes and one compiled sweep serves them all).

    >>> import numpy as np, jax.random as jr, sfpjax
    >>> z = sfpjax.z1r(); joint = sfpjax.product(z, z)
    >>> toks = sfpjax.sample(joint, key=jr.key(0), batch_size=200, seq_len=6)
    >>> beliefs = np.asarray(sfpjax.filter_beliefs(joint, toks).beliefs[:, -1])
    >>> acts = beliefs @ np.asarray(jr.normal(jr.key(1), (9, 8)))
    >>> fc = sfpjax.factor_centroids(acts, beliefs, (3, 3), 0)
    >>> mu, _ = sfpjax.label_means(acts, np.asarray(sfpjax.decode_tokens(toks[:, -1], (2, 2))[0]), 2)
    >>> vs = sfpjax.steering_vectors(0, [1.0, 0, 0], [0, 1.0, 0], factor_process=z, centroids=fc,
    ...     ln_centroids=fc, label_means=mu, joint_probe=sfpjax.fit_probe(acts, beliefs),
    ...     decoder=sfpjax.fit_probe(beliefs, acts), acts=acts, factor_dims=(3, 3))
    >>> sorted(vs) == sorted(sfpjax.STEERING_METHODS), vs["centroid"].shape
    (True, (200, 8))
    """
    x = jnp.asarray(acts, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"acts must be (n, d_act), got shape {x.shape}.")
    n, d = x.shape
    s = jnp.asarray(source, jnp.float32)
    t = jnp.asarray(target, jnp.float32)
    mu = np.asarray(label_means, np.float64)
    if mu.shape != (factor_process.vocab_size, d):
        raise ValueError(
            f"label_means must be ({factor_process.vocab_size}, {d}) (one mean per factor-{factor} symbol), "
            f"got {mu.shape}."
        )

    def shared(v):
        v = np.asarray(v, np.float32)
        if v.shape != (d,):
            raise ValueError(f"a centroid vector has shape {v.shape}, but acts have width {d}.")
        return np.broadcast_to(v, (n, d))

    p_s = np.asarray(next_token_probs(factor_process, s), np.float64)
    p_t = np.asarray(next_token_probs(factor_process, t), np.float64)
    centroid = shared(centroid_vector(centroids, s, t))
    return {
        "centroid": centroid,
        "centroid-norm": centroid,
        "centroid-ln": np.broadcast_to(np.asarray(centroid_vector(ln_centroids, s, t), np.float32),
                                       (n, np.shape(ln_centroids.centroids)[1])),
        "diff-means": shared((p_t - p_s) @ mu),
        "belief-pinv": np.asarray(belief_state_delta(joint_probe, x, factor_dims, factor, t), np.float32),
        "belief-generative": np.asarray(
            belief_state_delta(joint_probe, x, factor_dims, factor, t, decoder=decoder), np.float32
        ),
    }


def factor_swap_symmetric(process: GHMM, factor_dims: Sequence[int], factor_vocab: Sequence[int]) -> bool:
    """Whether exchanging the two factors maps ``process`` to itself.

    The exchange sends joint state ``(a, b)`` to ``(b, a)`` and joint symbol ``(x_0, x_1)``
    to ``(x_1, x_0)`` (factor 0 most significant); the process is symmetric when
    ``T(x)`` and ``<<eta(0)|`` are unchanged. Steering factor 0 and factor 1 of a symmetric
    process is then the same experiment, and no asymmetry between them is expected.
    Processes with other than two factors, or with factors of different sizes, are not.

    >>> import sfpjax
    >>> z = sfpjax.z1r()
    >>> sfpjax.factor_swap_symmetric(sfpjax.product(z, z), (3, 3), (2, 2))
    True
    >>> sfpjax.factor_swap_symmetric(sfpjax.product(z, sfpjax.z1r(0.3)), (3, 3), (2, 2))
    False
    """
    dims, vocab = tuple(int(d) for d in factor_dims), tuple(int(v) for v in factor_vocab)
    T, eta0 = np.asarray(process.T, np.float64), np.asarray(process.eta0, np.float64)
    if T.ndim != 3:
        raise ValueError(f"factor_swap_symmetric takes one process, got transfer matrices of shape {T.shape}.")
    if T.shape != (int(np.prod(vocab)), int(np.prod(dims)), int(np.prod(dims))):
        raise ValueError(
            f"factor_dims {dims} and factor_vocab {vocab} do not match a process with T of shape {T.shape}."
        )
    if len(dims) != 2 or dims[0] != dims[1] or vocab[0] != vocab[1]:
        return False
    s = np.arange(dims[0] * dims[1]).reshape(dims).T.reshape(-1)
    x = np.arange(vocab[0] * vocab[1]).reshape(vocab).T.reshape(-1)
    return bool(np.allclose(T[x][:, s][:, :, s], T) and np.allclose(eta0[s], eta0))


def belief_sector(
    belief: Float[ArrayLike, " d_f"] | Sequence[float | int], sectors: Sequence[Sequence[int]], *, atol: float = 1e-6
) -> int | None:
    """The sector of a factor that holds all of ``belief``'s weight, or ``None`` if none does.

    Args:
        belief: one factor's belief ``<<eta_f|``.
        sectors: the factor's partition, a list of state-index lists.
        atol: weight allowed outside the sector.

    >>> import sfpjax
    >>> sfpjax.belief_sector([0.0, 0.3, 0.7], [[0], [1, 2]]), sfpjax.belief_sector([0.5, 0.5, 0.0], [[0], [1, 2]])
    (1, None)
    """
    b = np.asarray(belief, np.float64)
    w = np.asarray(sector_weights(b, [list(map(int, s)) for s in sectors]))
    k = int(np.argmax(w))
    return k if w[k] > b.sum() - atol else None
