"""A zoo of small processes, each returned as a ``GHMM``.

Conventions: ``T[x, i, j] = T(x)_{ij}``; for the HMMs ``T(x)_{ij} = Pr(next state j,
symbol x | state i)``. Every constructor takes ``dtype=None`` (float32 by default) and
builds its arrays with ``jax.numpy`` from its float parameters, so it can be traced:
``jax.vmap(sfpjax.mess3)(xs, as_)`` gives one stacked ``GHMM`` whose leading axis indexes
the grid. Parameter ranges are checked at once (``ValueError``) when the parameters are
concrete; under tracing (``jit``/``vmap``) the same checks, and the GHMM conditions, are
compiled into the returned process with ``eqx.error_if``, so using a process built from an
out-of-range or NaN parameter stops with a runtime error that names the parameter.
"""

from __future__ import annotations

from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._numerics import check_range as _check_range
from .._numerics import float_dtype as _float_dtype
from .._numerics import is_traced as _is_traced
from .._numerics import scalar as _scalar
from ._ghmm import GHMM

__all__ = [
    "coin",
    "z1r",
    "partitioned_z1r",
    "mess3",
    "rrxor",
    "even_process",
    "golden_mean",
    "noisy_and",
    "noisy_not",
    "tom_quantum",
    "post_quantum",
]

# Any shape is accepted here so that a non-scalar gets the ValueError explaining how to vmap.
Scalar = Union[float, int, np.floating, Float[Array, "..."], Float[np.ndarray, "..."]]


def _build(entries: dict, V: int, d: int, dtype) -> Array:
    """Dense ``(V, d, d)`` array from ``{(x, i, j): value}``; values may be tracers."""
    zero = jnp.zeros((), dtype)
    return jnp.stack([
        jnp.stack([
            jnp.stack([jnp.asarray(entries.get((x, i, j), zero), dtype) for j in range(d)])
            for i in range(d)
        ])
        for x in range(V)
    ])


def coin(p: Scalar = 0.5, *, dtype=None) -> GHMM:
    """A biased coin: one state, ``Pr(1) = p``, i.i.d. symbols.

    ``T(0) = [[1 - p]]``, ``T(1) = [[p]]``, ``<<eta(0)| = (1)``, ``|1>> = (1)``.

    >>> import sfpjax
    >>> sfpjax.coin(0.25).T[:, 0, 0]
    Array([0.75, 0.25], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    p = _check_range("coin probability p", p, 0.0, 1.0)
    p = _scalar(p, dtype)
    T = _build({(0, 0, 0): 1 - p, (1, 0, 0): p}, 2, 1, dtype)
    return GHMM(T, jnp.ones((1,), dtype), dtype=dtype, hmm=True)


def z1r(p: Scalar = 0.5, *, dtype=None) -> GHMM:
    """The zero-one-random (Z1R) process: the period-3 pattern ``0, 1, random``.

    States ``(S0, S1, SR)``; ``S0`` emits 0 and goes to ``S1``; ``S1`` emits 1 and goes to
    ``SR``; ``SR`` emits 0 with probability ``p`` and 1 otherwise, and goes to ``S0``::

        T(0) = [[0, 1, 0],        T(1) = [[0, 0, 0],
                [0, 0, 0],                [0, 0, 1],
                [p, 0, 0]]                [1 - p, 0, 0]]

    Initial state: the stationary distribution (uniform).

    >>> import sfpjax
    >>> sfpjax.z1r().eta0
    Array([0.33333..., 0.33333..., 0.33333...], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    p = _check_range("z1r probability p", p, 0.0, 1.0)
    p = _scalar(p, dtype)
    T = _build({(0, 0, 1): 1.0, (1, 1, 2): 1.0, (0, 2, 0): p, (1, 2, 0): 1 - p}, 2, 3, dtype)
    return GHMM(T, jnp.full((3,), 1.0 / 3.0, dtype), dtype=dtype, hmm=True)


def partitioned_z1r(*, dtype=None) -> GHMM:
    """The partition-preserving Z1R-like process of seed 000, eq. 2.17.

    States ``(S0, S1, SR)``, alphabet ``{0, 1}``; it preserves the split
    ``span{S0} (+) span{S1, SR}`` (eq. 2.16) while keeping the Z1R emission probabilities
    ``Pr(0|S0) = 1``, ``Pr(1|S1) = 1``, ``Pr(0|SR) = Pr(1|SR) = 1/2``::

        T'(0) = [[1, 0,   0],     T'(1) = [[0, 0,   0],
                 [0, 0,   0],              [0, 0,   1],
                 [0, 1/2, 0]]              [0, 1/2, 0]]

    The net operator ``T' = [[1,0,0],[0,0,1],[0,1,0]]`` (eq. 2.18) is not irreducible:
    ``S0`` is absorbing and ``{S1, SR}`` is a 2-cycle, so the stationary states form a
    one-parameter family ``w delta_S0 + (1 - w)(0, 1/2, 1/2)``. The default
    ``<<eta(0)|`` is uniform over the three states (``w = 1/3``): ``T'`` is a permutation
    matrix, so the uniform vector is stationary, and it weights every state equally.
    Choose another mixture with ``.with_initial(...)`` or, for the sector-correlated
    two-factor process of eq. 2.26, use ``partitioned_z1r_sfp``.

    >>> import sfpjax
    >>> sfpjax.partitioned_z1r().net
    Array([[1., 0., 0.],
           [0., 0., 1.],
           [0., 1., 0.]], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    T = _build({(0, 0, 0): 1.0, (0, 2, 1): 0.5, (1, 1, 2): 1.0, (1, 2, 1): 0.5}, 2, 3, dtype)
    return GHMM(T, jnp.full((3,), 1.0 / 3.0, dtype), dtype=dtype, hmm=True)


def mess3(x: Scalar = 0.15, a: Scalar = 0.6, *, dtype=None) -> GHMM:
    """The Mess3 process (Marzen & Crutchfield), 3 states and 3 symbols.

    With ``b = (1 - a) / 2`` and ``y = 1 - 2x``::

        T(0) = [[a y, b x, b x],   T(1) = [[b y, a x, b x],   T(2) = [[b y, b x, a x],
                [a x, b y, b x],           [b x, a y, b x],           [b x, b y, a x],
                [a x, b x, b y]]           [b x, a x, b y]]           [b x, b x, a y]]

    Every row of the net operator sums to ``a + 2b = 1``; the stationary state is uniform.
    ``x`` in ``[0, 1/2]`` sets how often the state changes, ``a`` in ``[0, 1]`` how
    strongly symbol ``k`` points at state ``k``.

    >>> import jax, jax.numpy as jnp, sfpjax
    >>> grid = jax.vmap(sfpjax.mess3)(jnp.array([0.05, 0.15]), jnp.array([0.6, 0.85]))
    >>> grid.T.shape
    (2, 3, 3, 3)
    """
    dtype = _float_dtype(dtype)
    x = _check_range("mess3 x", x, 0.0, 0.5)
    a = _check_range("mess3 a", a, 0.0, 1.0)
    x, a = _scalar(x, dtype), _scalar(a, dtype)
    b = (1 - a) / 2
    y = 1 - 2 * x
    entries = {}
    for k in range(3):
        for i in range(3):
            for j in range(3):
                strength = a if j == k else b
                move = y if i == j else x
                entries[(k, i, j)] = strength * move
    T = _build(entries, 3, 3, dtype)
    return GHMM(T, jnp.full((3,), 1.0 / 3.0, dtype), dtype=dtype, hmm=True)


def rrxor(p1: Scalar = 0.5, p2: Scalar = 0.5, *, dtype=None) -> GHMM:
    """Random-random-XOR: two random bits, then their XOR, repeated.

    States, in order: ``S`` (start: about to emit the first bit), ``0`` and ``1`` (the
    first bit was 0 / 1), ``T`` (the XOR is 1), ``F`` (the XOR is 0). The first bit is 0
    with probability ``p1``, the second is 0 with probability ``p2``:

    - ``S --0 (p1)--> 0``, ``S --1 (1-p1)--> 1``;
    - ``0 --0 (p2)--> F``, ``0 --1 (1-p2)--> T``; ``1 --0 (p2)--> T``, ``1 --1 (1-p2)--> F``;
    - ``T --1 (1)--> S``, ``F --0 (1)--> S``.

    The stationary state is ``(1/3, p1/3, (1-p1)/3, Pr(xor=1)/3, Pr(xor=0)/3)``.

    >>> import sfpjax
    >>> sfpjax.rrxor().eta0
    Array([0.33333..., 0.16666..., 0.16666..., 0.16666..., 0.16666...], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    p1 = _check_range("rrxor p1", p1, 0.0, 1.0)
    p2 = _check_range("rrxor p2", p2, 0.0, 1.0)
    p1, p2 = _scalar(p1, dtype), _scalar(p2, dtype)
    S, Z, O, Tr, F = range(5)
    entries = {
        (0, S, Z): p1, (1, S, O): 1 - p1,
        (0, Z, F): p2, (1, Z, Tr): 1 - p2,
        (0, O, Tr): p2, (1, O, F): 1 - p2,
        (1, Tr, S): 1.0, (0, F, S): 1.0,
    }
    x1 = p1 * (1 - p2) + (1 - p1) * p2
    eta0 = jnp.stack([jnp.ones((), dtype), p1, 1 - p1, x1, 1 - x1]) / 3
    return GHMM(_build(entries, 2, 5, dtype), eta0, dtype=dtype, hmm=True)


def even_process(p: Scalar = 0.5, *, dtype=None) -> GHMM:
    """The even process: 1s come in blocks of even length.

    States ``(A, B)``: ``A`` emits 1 with probability ``p`` and goes to ``B``, else emits 0
    and stays; ``B`` emits 1 and returns to ``A``::

        T(0) = [[1 - p, 0],    T(1) = [[0, p],
                [0,     0]]            [1, 0]]

    Stationary state ``(1, p) / (1 + p)``.

    >>> import sfpjax
    >>> sfpjax.even_process(0.5).eta0
    Array([0.66666..., 0.33333...], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    p = _check_range("even_process p", p, 0.0, 1.0)
    p = _scalar(p, dtype)
    T = _build({(0, 0, 0): 1 - p, (1, 0, 1): p, (1, 1, 0): 1.0}, 2, 2, dtype)
    return GHMM(T, jnp.stack([jnp.ones((), dtype), p]) / (1 + p), dtype=dtype, hmm=True)


def golden_mean(p: Scalar = 0.5, *, dtype=None) -> GHMM:
    """The golden-mean process: no two consecutive 1s.

    States ``(A, B)``: ``A`` emits 1 with probability ``p`` and goes to ``B``, else emits 0
    and stays; ``B`` emits 0 and returns to ``A``::

        T(0) = [[1 - p, 0],    T(1) = [[0, p],
                [1,     0]]            [0, 0]]

    Stationary state ``(1, p) / (1 + p)``.

    >>> import sfpjax
    >>> sfpjax.golden_mean(0.5).T[1]
    Array([[0. , 0.5],
           [0. , 0. ]], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    p = _check_range("golden_mean p", p, 0.0, 1.0)
    p = _scalar(p, dtype)
    T = _build({(0, 0, 0): 1 - p, (1, 0, 1): p, (0, 1, 0): 1.0}, 2, 2, dtype)
    return GHMM(T, jnp.stack([jnp.ones((), dtype), p]) / (1 + p), dtype=dtype, hmm=True)


def noisy_and(eps: Scalar = 0.1, *, dtype=None) -> GHMM:
    """A noisy AND gate as a process: repeating triples ``(a, b, a AND b)``, output flipped.

    ``a`` and ``b`` are fair random bits; the third symbol is ``a AND b`` flipped with
    probability ``eps``. States, in order: ``S`` (about to emit ``a``), ``A0``, ``A1``
    (``a`` was 0 / 1, about to emit ``b``), ``C0``, ``C1`` (``a AND b`` is 0 / 1, about
    to emit the output):

    - ``S --a (1/2)--> A_a``;
    - ``A0 --b (1/2)--> C0``; ``A1 --b (1/2)--> C_b``;
    - ``C_v --v (1 - eps)--> S``, ``C_v --(1 - v) (eps)--> S``.

    Stationary state ``(1/3, 1/6, 1/6, 1/4, 1/12)``.

    >>> import sfpjax
    >>> sfpjax.noisy_and(0.1).eta0
    Array([0.33333..., 0.16666..., 0.16666..., 0.25..., 0.08333...], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    eps = _check_range("noisy_and eps", eps, 0.0, 1.0)
    eps = _scalar(eps, dtype)
    S, A0, A1, C0, C1 = range(5)
    entries = {
        (0, S, A0): 0.5, (1, S, A1): 0.5,
        (0, A0, C0): 0.5, (1, A0, C0): 0.5,
        (0, A1, C0): 0.5, (1, A1, C1): 0.5,
        (0, C0, S): 1 - eps, (1, C0, S): eps,
        (1, C1, S): 1 - eps, (0, C1, S): eps,
    }
    eta0 = jnp.asarray([1 / 3, 1 / 6, 1 / 6, 1 / 4, 1 / 12], dtype)
    return GHMM(_build(entries, 2, 5, dtype), eta0, dtype=dtype, hmm=True)


def noisy_not(eps: Scalar = 0.1, *, dtype=None) -> GHMM:
    """A noisy NOT gate as a process: repeating pairs ``(a, NOT a)``, output flipped.

    ``a`` is a fair random bit; the second symbol is ``NOT a`` flipped with probability
    ``eps``. States, in order: ``S`` (about to emit ``a``), ``N0``, ``N1`` (``NOT a`` is
    0 / 1, about to emit the output):

    - ``S --0 (1/2)--> N1``, ``S --1 (1/2)--> N0``;
    - ``N_v --v (1 - eps)--> S``, ``N_v --(1 - v) (eps)--> S``.

    Stationary state ``(1/2, 1/4, 1/4)``.

    >>> import sfpjax
    >>> sfpjax.noisy_not(0.0).T[0]
    Array([[0. , 0. , 0.5],
           [1. , 0. , 0. ],
           [0. , 0. , 0. ]], dtype=float32)
    """
    dtype = _float_dtype(dtype)
    eps = _check_range("noisy_not eps", eps, 0.0, 1.0)
    eps = _scalar(eps, dtype)
    S, N0, N1 = range(3)
    entries = {
        (0, S, N1): 0.5, (1, S, N0): 0.5,
        (0, N0, S): 1 - eps, (1, N0, S): eps,
        (1, N1, S): 1 - eps, (0, N1, S): eps,
    }
    eta0 = jnp.asarray([0.5, 0.25, 0.25], dtype)
    return GHMM(_build(entries, 2, 3, dtype), eta0, dtype=dtype, hmm=True)


def tom_quantum(alpha: Scalar = 1.0, beta: Scalar = 0.5, *, dtype=None) -> GHMM:
    """A qubit measured in two bases: a 3-dimensional GHMM with negative entries.

    The latent vector is a qubit's Bloch representation ``(1, r_1, r_2)``. With
    ``g = 1 / (4 (alpha^2 + beta^2))``, ``c = 2 alpha beta g`` and
    ``m = (alpha^2 - beta^2) g``, the four symbols are::

        T(0) = [[1/4, 0, c  ],   T(1) = [[1/4,  0, -c ],
                [0,   m, 0  ],           [0,    m,  0 ],
                [c,   0, 1/4]]           [-c,   0, 1/4]]

        T(2) = [[1/4, c,   0],   T(3) = [[1/4, -c,   0],
                [c,   1/4, 0],           [-c,  1/4,  0],
                [0,   0,   m]]           [0,   0,    m]]

    The net operator is ``diag(1, k, k)`` with ``k = alpha^2 / (alpha^2 + beta^2)``, so
    ``|1>> = (1, 0, 0)`` and ``<<eta(0)| = (1, 0, 0)`` (the maximally mixed qubit, which
    is stationary); every word has ``Pr(w) >= 0`` although ``T(1)`` and ``T(3)`` have
    negative entries whenever ``alpha beta != 0``. No finite HMM generates this process
    for generic parameters. Public reference: ``tom_quantum`` in the ``simplexity``
    transition-matrix collection.

    >>> import sfpjax
    >>> p = sfpjax.tom_quantum(1.0, 0.5)
    >>> bool((p.T < 0).any()), p.right
    (True, Array([1., 0., 0.], dtype=float32))
    """
    dtype = _float_dtype(dtype)
    alpha, beta = _scalar(alpha, dtype), _scalar(beta, dtype)
    if not _is_traced(alpha, beta):
        if not (np.isfinite(float(alpha)) and np.isfinite(float(beta)) and float(alpha) ** 2 + float(beta) ** 2 > 0):
            raise ValueError(
                f"tom_quantum needs finite alpha, beta with alpha^2 + beta^2 > 0; got alpha={float(alpha)}, "
                f"beta={float(beta)}."
            )
    else:
        alpha = eqx.error_if(
            alpha, ~(alpha**2 + beta**2 > 0),
            "sfpjax: invalid process parameter: tom_quantum needs alpha^2 + beta^2 > 0 (a zero or NaN "
            "pair reached the constructor under jit/vmap).",
        )
    g = 1 / (4 * (alpha**2 + beta**2))
    c = 2 * alpha * beta * g
    m = (alpha**2 - beta**2) * g
    q = 0.25
    entries = {}
    for x, (i, j, sign) in enumerate([(0, 2, 1), (0, 2, -1), (0, 1, 1), (0, 1, -1)]):
        other = 3 - j  # the Bloch axis not measured by this symbol's basis
        entries[(x, 0, 0)] = q
        entries[(x, j, j)] = q
        entries[(x, other, other)] = m
        entries[(x, i, j)] = sign * c
        entries[(x, j, i)] = sign * c
    T = _build(entries, 4, 3, dtype)
    e0 = jnp.zeros((3,), dtype).at[0].set(1.0)
    return GHMM(T, e0, e0, dtype=dtype)


def _largest_real_root_cubic(c2: Array, c1: Array, c0: Array, upper: Array) -> Array:
    """Largest real root of ``l^3 - c2 l^2 + c1 l - c0`` by Newton from an upper bound.

    Valid when that root is at least the real part of the other roots (then the cubic is
    increasing and convex to its right, so Newton from above converges monotonically);
    that holds for the dominant eigenvalue of ``post_quantum``'s net operator. Unlike
    ``jnp.linalg.eigvals`` this traces, vmaps and differentiates on every backend.
    """

    def body(_, lam):
        p = ((lam - c2) * lam + c1) * lam - c0
        dp = (3 * lam - 2 * c2) * lam + c1
        step = jnp.where(dp > 0, p / jnp.where(dp > 0, dp, 1), 0)
        return lam - step

    return jax.lax.fori_loop(0, 100, body, upper)


def post_quantum(alpha: Scalar = 1.5, beta: Scalar = 0.5, *, dtype=None) -> GHMM:
    """A 3-state GHMM with negative entries whose process no finite HMM or qubit generates.

    With ``m = (1, 1, 0)^T``, ``mu = (1, -1, -1)`` and
    ``A(v) = [[v, 0, 0], [0, 1, 0], [0, ln v, 1]]``, the unnormalized operators are
    ``(m mu, A(alpha), A(beta))``, all divided by the spectral radius of their sum so that
    the net operator has eigenvalue 1 (the dominant eigenvalue is real). ``|1>>`` is its
    eigenvalue-1 right eigenvector and ``<<eta(0)|`` the stationary state. Parameters:
    ``alpha > 1 > beta > 0``; the construction is genuinely post-quantum when also
    ``alpha + beta != 2`` and ``ln(alpha) / ln(beta)`` is irrational (true for the
    defaults). ``T(0) = m mu`` has negative entries, yet every word has ``Pr(w) >= 0``.
    Public reference: ``post_quantum`` in the ``simplexity`` transition-matrix
    collection (which takes ``ln(alpha)``; we take ``alpha``).

    >>> import sfpjax
    >>> p = sfpjax.post_quantum(1.5, 0.5)
    >>> bool((p.T < 0).any()), p.T.shape
    (True, (3, 3, 3))
    """
    dtype = _float_dtype(dtype)
    alpha, beta = _scalar(alpha, dtype), _scalar(beta, dtype)
    if not _is_traced(alpha, beta):
        a_, b_ = float(alpha), float(beta)
        if not (a_ > 1 > b_ > 0):
            raise ValueError(f"post_quantum needs alpha > 1 > beta > 0; got alpha={a_}, beta={b_}.")
    else:
        alpha = eqx.error_if(
            alpha, ~((alpha > 1) & (beta < 1) & (beta > 0)),
            "sfpjax: invalid process parameter: post_quantum needs alpha > 1 > beta > 0 (a value "
            "outside, or NaN, reached the constructor under jit/vmap).",
        )

    def A(v):
        return {(0, 0): v, (1, 1): 1.0, (2, 1): jnp.log(v), (2, 2): 1.0}

    entries = {(0, i, j): mi * mj for i, mi in enumerate((1.0, 1.0, 0.0))
               for j, mj in enumerate((1.0, -1.0, -1.0)) if mi != 0.0}
    entries.update({(1, *k): v for k, v in A(alpha).items()})
    entries.update({(2, *k): v for k, v in A(beta).items()})
    T = _build(entries, 3, 3, dtype)
    net = T.sum(0)
    # Characteristic polynomial l^3 - tr l^2 + (sum of principal 2x2 minors) l - det.
    tr = jnp.trace(net)
    minors = (net[0, 0] * net[1, 1] - net[0, 1] * net[1, 0]
              + net[0, 0] * net[2, 2] - net[0, 2] * net[2, 0]
              + net[1, 1] * net[2, 2] - net[1, 2] * net[2, 1])
    det = jnp.linalg.det(net)
    upper = jnp.abs(net).sum(1).max()
    radius = _largest_real_root_cubic(tr, minors, det, upper)
    # The cubic's coefficients lose digits to cancellation in float32; a few steps of
    # shifted inverse iteration on the matrix itself recover them (Rayleigh quotient).
    eye = jnp.eye(3, dtype=dtype)
    v = jnp.ones((3,), dtype)
    shift = radius * (1 + 10 * float(np.sqrt(jnp.finfo(dtype).eps)))
    for _ in range(4):
        v = jnp.linalg.solve(net - shift * eye, v)
        v = v / jnp.linalg.norm(v)
    radius = (v @ net @ v) / (v @ v)
    # v is |1>> up to scale. Scaling it to entries summing to d (GHMM's default) blows
    # it up where the entries nearly cancel, so fix its norm to that of the ones vector.
    right = v * (jnp.sqrt(jnp.asarray(3.0, dtype)) * jnp.where(v.sum() < 0, -1, 1).astype(dtype))
    return GHMM(T / radius, right=right, dtype=dtype)
