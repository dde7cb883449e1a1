"""The generalized hidden Markov model (GHMM): the one object every process is.

Notation (seed 000, section 2.2): transfer matrices ``T(x)`` for each symbol ``x`` of a
finite alphabet, stacked as an array ``T`` of shape ``(V, d, d)``; the net operator
``T = sum_x T(x)`` with right eigenvector ``|1>>`` (``T |1>> = |1>>``); an initial row
vector ``<<eta(0)|`` with ``<<eta(0)|1>> = 1``. The probability of a word is
``Pr(w) = <<eta(0)| T(w) |1>>`` and the belief after it is
``<<eta(w)| = <<eta(0)| T(w) / Pr(w)``. An HMM is the special case of non-negative
``T(x)`` with a row-stochastic net operator and ``|1>> = 1``; general GHMMs may have
negative entries.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._numerics import default_atol as _default_atol
from .._numerics import float_dtype as _float_dtype
from .._numerics import is_traced as _is_traced

__all__ = ["GHMM", "is_hmm", "stationary_state", "validate_ghmm"]


def _constrained_null_vector(M: Array, constraint: Array) -> Array:
    """Solve ``M v = 0`` subject to ``constraint . v = 1`` in the least-squares sense.

    Traceable and vmappable; when the null space has dimension > 1 (non-ergodic
    processes) this returns the minimum-norm solution, which is still a valid null vector.
    """
    d = M.shape[0]
    A = jnp.concatenate([M, constraint[None, :]], axis=0)
    b = jnp.zeros((d + 1,), M.dtype).at[d].set(1.0)
    v, *_ = jnp.linalg.lstsq(A, b)
    return v


def _right_eigenvector(T: Array) -> Array:
    net = T.sum(0)
    d = net.shape[0]
    # Scale so that sum(|1>>) = d: an HMM (T 1 = 1) gets exactly the all-ones vector.
    v = _constrained_null_vector(net - jnp.eye(d, dtype=T.dtype), jnp.full((d,), 1.0 / d, T.dtype))
    return v


def stationary_state(T: Float[Array, "V d d"], right: Float[Array, " d"]) -> Float[Array, " d"]:
    """The stationary row vector ``<<pi|`` with ``<<pi| T = <<pi|`` and ``<<pi|1>> = 1``.

    Args:
        T: transfer matrices ``T(x)``, shape ``(V, d, d)``.
        right: the right eigenvector ``|1>>`` of the net operator.

    For a non-ergodic process (eigenvalue 1 not simple) this is one valid stationary
    mixture (the minimum-norm one); build such processes with ``direct_sum`` to choose
    the mixture weights explicitly. Traceable and vmappable.

    >>> import sfpjax
    >>> p = sfpjax.mess3(0.15, 0.6)
    >>> sfpjax.stationary_state(p.T, p.right)  # uniform for Mess3
    Array([0.33333..., 0.33333..., 0.33333...], dtype=float32)
    """
    net = T.sum(0)
    d = net.shape[0]
    return _constrained_null_vector((net - jnp.eye(d, dtype=T.dtype)).T, right)


class GHMM(eqx.Module):
    """A generalized hidden Markov model: ``T(x)``, ``<<eta(0)|`` and ``|1>>``.

    Attributes:
        T: transfer matrices, shape ``(V, d, d)``; ``T[x, i, j]`` is ``T(x)_{ij}``.
        eta0: the initial row vector ``<<eta(0)|``, shape ``(d,)``, ``<<eta(0)|1>> = 1``.
        right: the right eigenvector ``|1>>`` of ``sum_x T(x)`` with eigenvalue 1.
        factors: for a process built by ``sfpjax.product``, the factor processes (whose
            Kronecker product this process is, ``eta0`` included); ``None`` otherwise.
            ``filter_beliefs`` uses them to track one belief per factor.

    Args:
        T: transfer matrices (NumPy or JAX array), shape ``(V, d, d)``.
        eta0: initial row vector; default: the stationary state of the net operator.
        right: ``|1>>``; default: the all-ones vector for ``hmm=True``, otherwise the
            eigenvalue-1 right eigenvector of the net operator scaled so
            ``<<eta(0)|1>> = 1``.
        dtype: float dtype (float32 by default; float64 when asked, with x64 enabled).
        hmm: also require the HMM conditions (non-negative ``T(x)``, row-stochastic net
            operator, ``|1>> = 1``, ``eta0`` a probability vector).
        validate: check the GHMM conditions when the arrays are concrete (always
            skipped under ``jit``/``vmap`` tracing; call ``validate_ghmm`` afterwards).
        atol: tolerance of the checks; default scales with the dtype.

    Raises:
        ValueError: naming the offending symbol, row or value and what was expected.

    >>> import numpy as np, sfpjax
    >>> T = np.array([[[0.5]], [[0.5]]])  # a fair coin: one state, two symbols
    >>> coin = sfpjax.GHMM(T, hmm=True)
    >>> coin.vocab_size, coin.num_states
    (2, 1)
    """

    T: Float[Array, "V d d"]
    eta0: Float[Array, " d"]
    right: Float[Array, " d"]
    factors: tuple["GHMM", ...] | None

    def __init__(
        self,
        T: ArrayLike,
        eta0: ArrayLike | None = None,
        right: ArrayLike | None = None,
        *,
        dtype=None,
        hmm: bool = False,
        validate: bool = True,
        atol: float | None = None,
    ):
        dtype = _float_dtype(dtype)
        _check_shapes(T, eta0, right)
        T = jnp.asarray(T, dtype)
        d = T.shape[1]
        if right is None:
            right = jnp.ones((d,), dtype) if hmm else None
        else:
            right = jnp.asarray(right, dtype)
        if eta0 is not None:
            eta0 = jnp.asarray(eta0, dtype)
            if right is None:
                net = T.sum(0)
                right = _constrained_null_vector(net - jnp.eye(d, dtype=dtype), eta0)
        else:
            if right is None:
                right = _right_eigenvector(T)
            eta0 = stationary_state(T, right)
        self.T, self.eta0, self.right = T, eta0, right
        self.factors = None
        if validate and not _is_traced(T, eta0, right):
            validate_ghmm(self, hmm=hmm, atol=atol)

    @property
    def vocab_size(self) -> int:
        """Number of symbols ``V``."""
        return self.T.shape[-3]

    @property
    def num_states(self) -> int:
        """Dimension ``d`` of the latent space."""
        return self.T.shape[-1]

    @property
    def dtype(self):
        return self.T.dtype

    @property
    def net(self) -> Float[Array, "d d"]:
        """The net operator ``T = sum_x T(x)``."""
        return self.T.sum(-3)

    def astype(self, dtype) -> "GHMM":
        """The same process with all arrays cast to ``dtype`` (no re-validation)."""
        new = GHMM(self.T.astype(dtype), self.eta0.astype(dtype), self.right.astype(dtype),
                   dtype=dtype, validate=False)
        if self.factors is None:
            return new
        return with_factors(new, tuple(f.astype(dtype) for f in self.factors))

    def with_initial(self, eta0: ArrayLike) -> "GHMM":
        """The same dynamics started from the row vector ``eta0`` (validated when concrete)."""
        eta0 = jnp.asarray(eta0, self.dtype)
        if eta0.shape != self.eta0.shape:
            raise ValueError(
                f"eta0 must have shape {self.eta0.shape} (one entry per latent state), got {eta0.shape}."
            )
        new = eqx.tree_at(lambda p: p.eta0, self, eta0)
        if not _is_traced(eta0, self.T):
            validate_ghmm(new)
        if new.factors is not None:
            new = with_factors(new, _product_initial(eta0, new.factors))
        return new


def with_factors(process: GHMM, factors: tuple[GHMM, ...] | None) -> GHMM:
    """``process`` with its ``factors`` field set (package-internal: no consistency check)."""
    return eqx.tree_at(lambda p: p.factors, process, factors, is_leaf=lambda x: x is None)


def check_process(process: GHMM) -> None:
    """Raise a ValueError unless ``process`` is one (not a stacked) GHMM (package-internal)."""
    if not isinstance(process, GHMM):
        raise ValueError(f"expected a sfpjax.GHMM, got {type(process).__name__}.")
    if process.T.ndim != 3:
        raise ValueError(
            f"expected a single process with T of shape (V, d, d), got T of shape {process.T.shape}. "
            "For a stack of processes, use jax.vmap over the process and its tokens."
        )


def _product_initial(eta0: Array, factors: tuple[GHMM, ...]) -> tuple[GHMM, ...] | None:
    """The factors restarted from the marginals of ``eta0`` if it is a product state, else None.

    Only decidable on concrete arrays; a traced ``eta0`` drops the factor structure, which
    costs speed in ``filter_beliefs``, never correctness.
    """
    if _is_traced(eta0, *(f.T for f in factors)):
        return None
    dims = [f.num_states for f in factors]
    joint = np.asarray(eta0, np.float64).reshape(dims)
    rights = [np.asarray(f.right, np.float64) for f in factors]
    marginals = []
    for k in range(len(factors)):
        m = np.moveaxis(joint, k, 0)
        for r in rights[:k] + rights[k + 1:]:
            m = np.tensordot(m, r, axes=([1], [0]))
        marginals.append(m)
    rebuilt = marginals[0]
    for m in marginals[1:]:
        rebuilt = np.kron(rebuilt, m)
    if not np.allclose(rebuilt, np.asarray(eta0, np.float64), atol=_default_atol(eta0.dtype), rtol=0):
        return None
    return tuple(f.with_initial(jnp.asarray(m, f.dtype)) for f, m in zip(factors, marginals))


def _check_shapes(T, eta0, right) -> None:
    shape = np.shape(T)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(
            f"T must have shape (V, d, d): one d x d transfer matrix T(x) per symbol x; got shape {shape}."
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"T must have at least one symbol and one state; got shape {shape}.")
    d = shape[1]
    for name, v in (("eta0", eta0), ("right", right)):
        if v is not None and np.shape(v) != (d,):
            raise ValueError(
                f"{name} must have shape ({d},) to match T of shape {shape}; got shape {np.shape(v)}."
            )


def is_hmm(process: GHMM, *, atol: float | None = None) -> bool:
    """Whether ``process`` is an HMM: non-negative ``T(x)``, row-stochastic net operator.

    Needs concrete arrays (call it outside ``jit``).
    """
    if _is_traced(process.T):
        raise ValueError("is_hmm needs concrete arrays; call it outside jit/vmap.")
    atol = _default_atol(process.dtype) if atol is None else atol
    T = np.asarray(process.T, np.float64)
    return bool((T >= -atol).all() and np.allclose(T.sum((0, 2)), 1.0, atol=atol, rtol=0))


def validate_ghmm(process: GHMM, *, hmm: bool = False, atol: float | None = None) -> GHMM:
    """Check the GHMM conditions on concrete arrays; return ``process`` unchanged.

    Checks: finite entries, ``T |1>> = |1>>`` for the net operator, ``<<eta(0)|1>> = 1``,
    and with ``hmm=True`` the HMM conditions (non-negative ``T(x)``, row sums of the net
    operator equal to 1, ``|1>> = 1``, ``eta0`` a probability vector). Works on stacked
    processes too (leading batch axes), naming the first offending index.

    Raises:
        ValueError: what is wrong (symbol, row, value) and what was expected.
    """
    T = np.asarray(process.T, np.float64)
    eta0 = np.asarray(process.eta0, np.float64)
    right = np.asarray(process.right, np.float64)
    atol = _default_atol(process.dtype) if atol is None else atol
    batch = T.shape[:-3]

    def where(idx):
        return f" (process {tuple(int(i) for i in idx)} of the stack)" if batch else ""

    for name, arr in (("T", T), ("eta0", eta0), ("right", right)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{name} has a non-finite entry {arr[tuple(bad[0])]} at index {tuple(bad[0])}; "
                             "every entry must be finite.")
    scale = max(1.0, float(np.abs(T).sum(-3).max()))
    tol = atol * scale
    net = T.sum(-3)
    resid = np.einsum("...ij,...j->...i", net, right) - right
    bad = np.argwhere(np.abs(resid) > tol)
    if bad.size:
        i = tuple(bad[0])
        raise ValueError(
            f"|1>> is not a right eigenvector of the net operator sum_x T(x) with eigenvalue 1{where(i[:-1])}: "
            f"row {i[-1]} of T|1>> - |1>> is {resid[i]:.3g} (tolerance {tol:.2g}). "
            "Check that the transfer matrices sum to an operator with eigenvalue 1, or pass the correct `right`."
        )
    norm = np.einsum("...i,...i->...", eta0, right)
    bad = np.argwhere(np.abs(np.atleast_1d(norm) - 1) > tol)
    if bad.size:
        i = tuple(bad[0])
        raise ValueError(
            f"<<eta0|1>> must equal 1{where(i) if batch else ''}, got {np.atleast_1d(norm)[i]:.6g}. "
            "Normalize eta0 so that its contraction with |1>> is 1."
        )
    if hmm:
        bad = np.argwhere(T < -atol)
        if bad.size:
            i = tuple(bad[0])
            raise ValueError(
                f"HMM transfer matrices must be non-negative: T[{i[-3]}][{i[-2]}, {i[-1]}] = {T[i]:.6g}"
                f"{where(i[:-3])} (symbol {i[-3]}, row {i[-2]}, column {i[-1]})."
            )
        rows = net.sum(-1)
        bad = np.argwhere(np.abs(rows - 1) > tol)
        if bad.size:
            i = tuple(bad[0])
            raise ValueError(
                f"HMM net operator sum_x T(x) must be row-stochastic: row {i[-1]} sums to {rows[i]:.6g}"
                f"{where(i[:-1])}, expected 1 (row s holds Pr(s', x | s) over all symbols x and next states s')."
            )
        bad = np.argwhere(np.abs(right - 1) > tol)
        if bad.size:
            raise ValueError(f"HMM |1>> must be the all-ones vector; entry {tuple(bad[0])} is {right[tuple(bad[0])]:.6g}.")
        bad = np.argwhere(eta0 < -atol)
        if bad.size:
            raise ValueError(
                f"HMM eta0 must be a probability vector; entry {tuple(bad[0])} is {eta0[tuple(bad[0])]:.6g}."
            )
    return process
