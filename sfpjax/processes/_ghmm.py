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
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._numerics import default_atol as _default_atol
from .._numerics import float_dtype as _float_dtype
from .._numerics import index_text as _index
from .._numerics import is_traced as _is_traced

__all__ = ["GHMM", "is_hmm", "stationary_state", "validate_ghmm"]


def _tolerance(T: Array, atol: float) -> Array:
    """``atol`` scaled by the size of the net operator's entries (at least 1)."""
    return atol * jnp.maximum(1.0, jnp.abs(T).sum(-3).max((-2, -1)))


_NOT_SIMPLE = (
    "the net operator sum_x T(x) has eigenvalue 1 more than once (a non-ergodic GHMM), so "
    "|1>> is not determined by T(x): pass right=|1>> explicitly, or build the process from "
    "its ergodic components with sfpjax.direct_sum(processes, weights). (Non-negative T(x) "
    "with a row-stochastic net operator are HMMs and get |1>> = 1 without asking.)"
)


def _default_right(T: Array, eta0: Array | None, atol: float, traced: bool) -> Array:
    """``|1>>`` when none is given.

    An HMM (non-negative ``T(x)``, row-stochastic net operator) gets the all-ones vector,
    whatever the multiplicity of eigenvalue 1. Otherwise eigenvalue 1 must be simple, and
    ``|1>>`` is its right eigenvector, scaled so that ``<<eta(0)|1>> = 1`` when ``eta0`` is
    given (the scale of ``|1>>`` is a gauge freedom of a GHMM) and so that its entries sum
    to ``d`` when it is not.
    """
    d = T.shape[-1]
    ones = jnp.ones((d,), T.dtype)
    net = T.sum(0)
    M = net - jnp.eye(d, dtype=T.dtype)
    constraint = jnp.full((d,), 1.0 / d, T.dtype) if eta0 is None else eta0
    tol = _tolerance(T, atol)
    stochastic = (T >= -tol).all() & (jnp.abs(net.sum(-1) - 1) <= tol).all()
    if not traced:
        if bool(stochastic):
            return ones
        if d > 1:
            s = np.linalg.svd(np.asarray(M, np.float64), compute_uv=False)
            multiplicity = int((s <= float(tol)).sum())
            if multiplicity > 1:
                raise ValueError(f"{_NOT_SIMPLE} Here eigenvalue 1 has multiplicity {multiplicity}.")
        return _constrained_null_vector(M, constraint)
    degenerate = jnp.linalg.svd(M, compute_uv=False)[-2] <= tol if d > 1 else jnp.zeros((), bool)
    right = jnp.where(stochastic, ones, _constrained_null_vector(M, constraint))
    return eqx.error_if(right, ~stochastic & degenerate, "sfpjax: invalid process: " + _NOT_SIMPLE)


def _traced_checks(T: Array, eta0: Array, right: Array, hmm: bool, atol: float):
    """The conditions of :func:`validate_ghmm` compiled into ``(T, eta0, right)`` with
    ``eqx.error_if``: any computation that uses the returned arrays stops with the message
    of the first condition that fails. For processes built under ``jit``/``vmap``."""
    tol = _tolerance(T, atol)
    net = T.sum(-3)
    conditions = [
        (~(jnp.isfinite(T).all() & jnp.isfinite(eta0).all() & jnp.isfinite(right).all()),
         "T(x), <<eta(0)| or |1>> has a NaN or infinite entry (a NaN or out-of-range parameter "
         "gives one); every entry must be finite. Check the parameters of the process."),
        (~(jnp.abs(net @ right - right) <= tol).all(),
         "|1>> is not a right eigenvector of the net operator sum_x T(x) with eigenvalue 1. "
         "Check that the transfer matrices sum to an operator with eigenvalue 1, or pass the "
         "correct `right`."),
        (~(jnp.abs(eta0 @ right - 1) <= tol),
         "<<eta0|1>> is not 1. Normalize eta0 so that its contraction with |1>> is 1."),
    ]
    if hmm:
        conditions += [
            ((T < -atol).any(), "HMM transfer matrices must be non-negative; some T(x) has a "
             "negative entry."),
            ((jnp.abs(net.sum(-1) - 1) > tol).any(), "HMM net operator sum_x T(x) must be "
             "row-stochastic; a row does not sum to 1."),
            ((jnp.abs(right - 1) > tol).any(), "HMM |1>> must be the all-ones vector."),
            ((eta0 < -atol).any(), "HMM eta0 must be a probability vector; it has a negative entry."),
        ]
    bad = jnp.stack([c for c, _ in conditions])
    msgs = ["sfpjax: invalid process: " + m for _, m in conditions]
    return eqx.branched_error_if((T, eta0, right), bad.any(), jnp.argmax(bad), msgs)


def _constrained_null_vector(M: Array, constraint: Array) -> Array:
    """Solve ``M v = 0`` subject to ``constraint . v = 1`` in the least-squares sense.

    Traceable and vmappable; when the null space has dimension > 1 this returns the
    minimum-norm solution (``GHMM`` only relies on it for ``|1>>`` when eigenvalue 1 is
    simple; ``stationary_state`` documents its choice).
    """
    d = M.shape[0]
    A = jnp.concatenate([M, constraint[None, :]], axis=0)
    b = jnp.zeros((d + 1,), M.dtype).at[d].set(1.0)
    v, *_ = jnp.linalg.lstsq(A, b)
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
        right: ``|1>>``; default: the all-ones vector when ``T(x)`` is an HMM (non-negative
            entries, row-stochastic net operator; also for non-ergodic HMMs, whose net
            operator has eigenvalue 1 more than once), otherwise the eigenvalue-1 right
            eigenvector of the net operator scaled so ``<<eta(0)|1>> = 1``. That eigenvalue
            must then be simple: a non-ergodic GHMM needs an explicit ``right`` (or
            ``sfpjax.direct_sum``).
        dtype: float dtype: float32 by default; float64 when asked (needs
            ``jax_enable_x64``); half precision is refused.
        hmm: also require the HMM conditions (non-negative ``T(x)``, row-stochastic net
            operator, ``|1>> = 1``, ``eta0`` a probability vector).
        validate: check the GHMM conditions. On concrete arrays a failure raises
            ``ValueError`` at once; under ``jit``/``vmap`` the checks are compiled into the
            process's arrays with ``eqx.error_if``, so any computation that uses an invalid
            process stops with a runtime error naming the condition.
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
        traced = _is_traced(T, eta0, right)
        T = jnp.asarray(T, dtype)
        d = T.shape[1]
        eta0 = None if eta0 is None else jnp.asarray(eta0, dtype)
        if right is not None:
            right = jnp.asarray(right, dtype)
        elif hmm:
            right = jnp.ones((d,), dtype)
        else:
            right = _default_right(T, eta0, _default_atol(dtype) if atol is None else atol, traced)
        if eta0 is None:
            eta0 = stationary_state(T, right)
        if validate and traced:
            T, eta0, right = _traced_checks(T, eta0, right, hmm, _default_atol(dtype) if atol is None else atol)
        self.T, self.eta0, self.right = T, eta0, right
        self.factors = None
        if validate and not traced:
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
        """The same dynamics started from the row vector ``eta0`` (validated as in ``GHMM``)."""
        eta0 = jnp.asarray(eta0, self.dtype)
        if eta0.shape != self.eta0.shape:
            raise ValueError(
                f"eta0 must have shape {self.eta0.shape} (one entry per latent state), got {eta0.shape}."
            )
        new = validate_ghmm(eqx.tree_at(lambda p: p.eta0, self, eta0))
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
    if jnp.dtype(process.dtype).itemsize < 4:
        raise ValueError(
            f"the process is in {jnp.dtype(process.dtype).name}, too coarse for exact beliefs; "
            "use process.astype(jnp.float32) (or build it in float32, the default)."
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
    """Whether ``process`` is an HMM: non-negative ``T(x)``, row-stochastic net operator,
    ``|1>> = 1`` and a non-negative ``<<eta(0)|``.

    Needs concrete arrays (call it outside ``jit``).

    >>> import sfpjax
    >>> sfpjax.is_hmm(sfpjax.mess3()), sfpjax.is_hmm(sfpjax.tom_quantum())
    (True, False)
    """
    if _is_traced(process.T, process.eta0, process.right):
        raise ValueError("is_hmm needs concrete arrays; call it outside jit/vmap.")
    atol = _default_atol(process.dtype) if atol is None else atol
    T = np.asarray(process.T, np.float64)
    return bool(
        (T >= -atol).all()
        and np.allclose(T.sum((-3, -1)), 1.0, atol=atol, rtol=0)
        and np.allclose(np.asarray(process.right, np.float64), 1.0, atol=atol, rtol=0)
        and (np.asarray(process.eta0, np.float64) >= -atol).all()
    )


def validate_ghmm(process: GHMM, *, hmm: bool = False, atol: float | None = None) -> GHMM:
    """Check the GHMM conditions; return ``process`` (unchanged when concrete).

    Checks: finite entries, ``T |1>> = |1>>`` for the net operator, ``<<eta(0)|1>> = 1``,
    and with ``hmm=True`` the HMM conditions (non-negative ``T(x)``, row sums of the net
    operator equal to 1, ``|1>> = 1``, ``eta0`` a probability vector). Works on stacked
    processes too (leading batch axes), naming the first offending index.

    On concrete arrays a failure raises ``ValueError`` at once. On traced arrays (inside
    ``jit``/``vmap``) the checks are compiled into the returned process with
    ``eqx.error_if``: use the returned process, and any computation that reads it stops
    with a runtime error naming the condition. Every constructor already does this; call
    it on processes assembled by hand (``eqx.tree_at``, ``validate=False``).

    Raises:
        ValueError: what is wrong (symbol, row, value) and what was expected.

    >>> import jax, sfpjax
    >>> p = sfpjax.validate_ghmm(sfpjax.mess3())  # concrete: checked now
    >>> q = jax.jit(lambda p: sfpjax.validate_ghmm(p).T.sum())(p)  # traced: checked at run time
    """
    if not isinstance(process, GHMM):
        raise ValueError(f"validate_ghmm needs a sfpjax.GHMM, got {type(process).__name__}.")
    if _is_traced(process.T, process.eta0, process.right):
        atol = _default_atol(process.dtype) if atol is None else atol
        check = _traced_checks
        if process.T.ndim > 3:
            check = jax.vmap(check, in_axes=(0, 0, 0, None, None))
            for _ in range(process.T.ndim - 4):
                check = jax.vmap(check, in_axes=(0, 0, 0, None, None))
        T, eta0, right = check(process.T, process.eta0, process.right, hmm, atol)
        return eqx.tree_at(lambda p: (p.T, p.eta0, p.right), process, (T, eta0, right))
    T = np.asarray(process.T, np.float64)
    eta0 = np.asarray(process.eta0, np.float64)
    right = np.asarray(process.right, np.float64)
    atol = _default_atol(process.dtype) if atol is None else atol
    batch = T.shape[:-3]

    def where(idx):
        return f" (process {_index(idx)} of the stack)" if batch else ""

    for name, arr in (("T", T), ("eta0", eta0), ("right", right)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{name} has a non-finite entry {arr[tuple(bad[0])]} at index {_index(bad[0])}; "
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
            raise ValueError(f"HMM |1>> must be the all-ones vector; entry {_index(bad[0])} is {right[tuple(bad[0])]:.6g}.")
        bad = np.argwhere(eta0 < -atol)
        if bad.size:
            raise ValueError(
                f"HMM eta0 must be a probability vector; entry {_index(bad[0])} is {eta0[tuple(bad[0])]:.6g}."
            )
    return process
