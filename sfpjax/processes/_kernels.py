"""The GHMM mathematics that every stage computes, each piece written once.

Notation (seed 000, 2.2): transfer matrices ``T(x)`` stacked as ``T`` of shape ``(V, d, d)``,
the right eigenvector ``|1>>`` as ``right``, a belief ``<<eta|`` as a vector of length ``d``.

* :func:`next_token_law`: ``Pr(x | eta) = <<eta|T(x)|1>>`` for every symbol ``x``;
* :func:`every_symbol`: ``<<eta|T(x)|`` for every symbol ``x`` and many beliefs (or words);
* :func:`belief_step`: the belief update ``<<eta|T(x) / <<eta|T(x)|1>>``, made of
  :func:`normalizer` and :func:`condition`, which the tuned batched filter calls too;
* :func:`factor_symbols`: the factor symbols ``x_f`` of a joint symbol ``x``.

Internal: imported across sfpjax's modules, not re-exported from ``sfpjax``. Every function
takes JAX or NumPy arrays and returns the same kind (the mixed-state presentation runs in
float64 NumPy on the host), and batches over trailing axes of ``eta`` (states on axis 0),
or, for :func:`next_token_law`, over leading axes (states last, as the public API).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = [
    "belief_step",
    "condition",
    "every_symbol",
    "factor_symbols",
    "log_normalizer",
    "next_token_law",
    "normalizer",
    "symbol_rows",
]


def _xp(*arrays):
    """NumPy for NumPy inputs, ``jax.numpy`` otherwise."""
    return np if all(isinstance(a, (np.ndarray, np.generic)) for a in arrays) else jnp


def next_token_law(T, right, beliefs):
    """``<<eta|T(x)|1>>`` for every symbol: ``(..., d) -> (..., V)``, negatives clipped to 0.

    For normalized beliefs this is ``Pr(x | eta)``; for unnormalized word vectors
    ``<<eta(0)|T(w)|`` it is the joint ``Pr(w x)``. GHMM rounding can leave tiny negative
    values, which are clipped; the result is not renormalized.
    """
    xp = _xp(T, right, beliefs)
    return xp.maximum(beliefs @ (T @ right).T, 0.0)


def symbol_rows(T):
    """``T (V, d, d)`` as one ``(V d, d)`` matrix: row ``(x, j)``, column ``i`` is ``T[x, i, j]``."""
    V, d, _ = T.shape
    return _xp(T).swapaxes(T, 1, 2).reshape(V * d, d)


def every_symbol(Tm, eta):
    """``<<eta|T(x)`` for every symbol ``x`` and every column of ``eta`` ``(d, n)``: ``(V, d, n)``.

    ``Tm = symbol_rows(T)``; one ``(V d, d) x (d, n)`` product whose long dimension is the
    columns (sequences or words).
    """
    d = eta.shape[0]
    return (Tm @ eta).reshape(Tm.shape[0] // d, d, -1)


# Up to this many states the contraction with |1>> is unrolled into elementwise multiply-adds,
# which XLA fuses into the surrounding loop (a dot would be a separate, slower kernel for
# the (d, B) columns of the batched filter).
_UNROLL_MAX_STATES = 64


def normalizer(unnorm, right):
    """``<<eta|T(x)|1>>`` from ``<<eta|T(x)|`` (states on axis 0, any trailing batch axes)."""
    xp = _xp(unnorm, right)
    d = unnorm.shape[0]
    if xp is np or d > _UNROLL_MAX_STATES:
        return xp.tensordot(right, unnorm, axes=(0, 0))
    norm = unnorm[0] * right[0]
    for j in range(1, d):
        norm = norm + unnorm[j] * right[j]
    return norm


def condition(unnorm, norm, eta, ok):
    """The updated belief ``<<eta|T(x) / <<eta|T(x)|1>>`` where ``ok``, else ``eta`` unchanged.

    ``unnorm`` and ``eta`` have states on axis 0; ``norm`` and ``ok`` the trailing batch axes.
    ``ok`` is ``norm > 0`` for one process; for a product the joint normalizer decides
    whether the step is possible, and every factor is divided by its own ``norm``.
    """
    xp = _xp(unnorm, norm, eta)
    inv = 1.0 / xp.where(ok, norm, xp.ones((), norm.dtype))
    return xp.where(ok[None], unnorm * inv[None], eta)


def log_normalizer(norm, ok):
    """``log <<eta|T(x)|1>>`` where ``ok``, ``-inf`` at an impossible step."""
    xp = _xp(norm)
    return xp.where(ok, xp.log(xp.where(ok, norm, xp.ones((), norm.dtype))), -xp.inf)


def belief_step(T, right, eta, x):
    """One belief update: ``(<<eta|T(x) / <<eta|T(x)|1>>, log <<eta|T(x)|1>>)``.

    ``eta`` of shape ``(d,)``, ``x`` a scalar symbol. An impossible symbol
    (``<<eta|T(x)|1>> <= 0``) returns ``eta`` unchanged and ``-inf``.
    """
    unnorm = eta @ T[x]
    norm = normalizer(unnorm, right)
    ok = norm > 0
    return condition(unnorm, norm, eta, ok), log_normalizer(norm, ok)


def factor_symbols(x, sizes: Sequence[int]) -> tuple:
    """The factor symbols ``(x_0, ..., x_{F-1})`` of joint symbols
    ``x = x_0 (V_1 ... V_{F-1}) + ... + x_{F-1}`` (factor 0 most significant).

    Factor 0 is ``x // (V_1 ... V_{F-1})`` without a modulo, so a joint symbol outside
    ``[0, V_0 ... V_{F-1})`` gives a factor-0 symbol outside ``[0, V_0)`` instead of
    wrapping onto a valid one.
    """
    sizes = [int(v) for v in sizes]
    strides = [int(np.prod(sizes[k + 1:], dtype=np.int64)) for k in range(len(sizes))]
    out = []
    for k, (v, s) in enumerate(zip(sizes, strides)):
        sub = x // s if s > 1 else x
        out.append(sub % v if k > 0 else sub)
    return tuple(out)
