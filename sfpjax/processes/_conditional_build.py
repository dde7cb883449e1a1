"""The constructors of conditional factored processes (`ConditionalProcess`).

``conditional_product`` (a DAG of same-step parents), ``sequential_chain`` (its chain),
``product_of_experts`` (every factor conditioned on all the others, normalized) and
``conditional_transitions`` (emissions independent, transitions conditioned): each
validates its factors, control maps, parents, initial states and encoding and builds the
arrays with ``jax.numpy``, so it traces and vmaps over the variants' arrays (validation
runs only on concrete arrays). The process and its semantics are in `_conditional`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._numerics import default_atol as _default_atol
from .._numerics import is_traced as _is_traced
from ._conditional import ConditionalProcess, variant_table
from ._encoding import Table, check_table, radix_table
from ._ghmm import GHMM

__all__ = ["conditional_product", "sequential_chain", "product_of_experts", "conditional_transitions"]

# A factor: one GHMM (one variant), a GHMM with stacked T (K, V, d, d), or a sequence of GHMMs.
Factor = Union[GHMM, Sequence[GHMM]]
ControlMap = Union[None, int, Sequence[int], Int[ArrayLike, " n"]]
InitialStates = Sequence[Union[Float[ArrayLike, " _d"], Sequence[float], None]]


def _variants(factor: Factor, f: int) -> tuple[Array, Array, Array]:
    """``(T (K, V, d, d), rights (K, d), eta0 of variant 0 (d,))`` of one factor."""
    if isinstance(factor, GHMM):
        if factor.T.ndim == 3:
            return factor.T[None], factor.right[None], factor.eta0
        if factor.T.ndim == 4:
            return factor.T, factor.right, factor.eta0[0]
        raise ValueError(f"factor {f}: a GHMM with T of shape (V, d, d) or stacked variants (K, V, d, d) expected; "
                         f"got T of shape {factor.T.shape}.")
    variants = list(factor)
    if not variants or not all(isinstance(g, GHMM) and g.T.ndim == 3 for g in variants):
        raise ValueError(
            f"factor {f} must be a GHMM or a non-empty sequence of GHMMs (its variants); got "
            f"{[type(g).__name__ for g in variants] if variants else 'an empty sequence'}."
        )
    shapes = {g.T.shape for g in variants}
    if len(shapes) != 1:
        raise ValueError(
            f"the variants of factor {f} must share one alphabet and state space (T of one shape (V, d, d)); "
            f"got shapes {[g.T.shape for g in variants]}."
        )
    return (jnp.stack([g.T for g in variants]), jnp.stack([g.right for g in variants]), variants[0].eta0)


def _control_map(m: ControlMap, f: int, parents: tuple[int, ...], sizes, K: int, what: str) -> Array:
    n = math.prod(sizes[p] for p in parents)
    if m is None:
        if parents:
            raise ValueError(f"{what} of factor {f} is missing: it has parents {list(parents)}, so give a table of "
                             f"{n} variant indices (one per parent-token combination).")
        m = [0]
    if _is_traced(m):
        arr = jnp.asarray(m).reshape(-1)
        if arr.shape != (n,) or not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{what} of factor {f} must be {n} integers; got shape {arr.shape}, dtype {arr.dtype}.")
        return arr.astype(jnp.int32)
    arr = np.asarray(m)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer):
        parent_desc = (" x ".join(f"V_{p} = {sizes[p]}" for p in parents)) if parents else "no parents"
        raise ValueError(
            f"{what} of factor {f} must be a table of {n} integer variant indices ({parent_desc}; index "
            f"sum_r x^(p_r) prod_(q>r) V_(p_q) over its parents {list(parents)}); got {arr.tolist()}."
        )
    if ((arr < 0) | (arr >= K)).any():
        bad = int(np.flatnonzero((arr < 0) | (arr >= K))[0])
        raise ValueError(
            f"{what} of factor {f} selects variant {int(arr[bad])} at entry {bad}, but the factor has {K} "
            f"variant(s) (indices 0..{K - 1})."
        )
    return jnp.asarray(arr, jnp.int32)


def _check_parents(parents, F: int, what: str) -> tuple[tuple[int, ...], ...]:
    if len(parents) != F:
        raise ValueError(f"{what}: give one parent list per factor: {F} factors, {len(parents)} lists.")
    out = []
    for i, ps in enumerate(parents):
        ps = tuple(int(p) for p in ps)
        if any(p < 0 or p >= F or p == i for p in ps) or len(set(ps)) != len(ps):
            raise ValueError(f"{what}: the parents of factor {i} must be distinct other factors in 0..{F - 1}; got "
                             f"{list(ps)}.")
        out.append(tuple(sorted(ps)))
    return tuple(out)


def _check_acyclic(parents: tuple[tuple[int, ...], ...]) -> None:
    state = [0] * len(parents)  # 0 new, 1 on the stack, 2 done

    def visit(i, path):
        if state[i] == 1:
            cycle = path[path.index(i):] + [i]
            raise ValueError(
                "the emission parents form a cycle (" + " <- ".join(str(c) for c in cycle) + "); the joint "
                "law is then only defined as the normalized product of experts: use product_of_experts."
            )
        if state[i] == 2:
            return
        state[i] = 1
        for p in parents[i]:
            visit(p, path + [i])
        state[i] = 2

    for i in range(len(parents)):
        visit(i, [])


def _initial_states(eta0, defaults, rights, Ks, dtype) -> tuple[Array, ...]:
    F = len(defaults)
    if eta0 is None:
        eta0 = [None] * F
    if len(eta0) != F:
        raise ValueError(f"eta0 needs one entry per factor (None for the default): {F} factors, {len(eta0)} entries.")
    out = []
    for i, (e, dflt, r, K) in enumerate(zip(eta0, defaults, rights, Ks)):
        d = r.shape[-1]
        if e is None:
            if K > 1:
                raise ValueError(
                    f"factor {i} has {K} variants, so its initial state must be given (eta0[{i}], shape ({d},)); "
                    "only a single-variant factor defaults to its stationary state."
                )
            e = dflt
        e = jnp.asarray(e, dtype)
        if e.shape != (d,):
            raise ValueError(f"eta0[{i}] must have shape ({d},); got {e.shape}.")
        norm = r @ e  # <<eta|1_k>> for every variant k
        if not _is_traced(norm):
            bad = np.flatnonzero(~(np.asarray(norm) > 0))
            if bad.size:
                raise ValueError(
                    f"eta0[{i}] has <<eta|1>> = {float(norm[bad[0]]):.6g} against variant {int(bad[0])}; an "
                    "initial state must have positive weight under every variant's |1>>."
                )
            if not np.isfinite(np.asarray(e)).all():
                raise ValueError(f"eta0[{i}] must be finite; got {np.asarray(e).tolist()}.")
        out.append(e / norm[0])
    return tuple(out)


def _build(
    factors: Sequence[Factor],
    *,
    emission_parents,
    emission_maps,
    transition_parents,
    transition_maps,
    normalized: bool,
    structure: str,
    eta0,
    encoding,
    same_maps: bool,
) -> ConditionalProcess:
    factors = list(factors)
    if not factors:
        raise ValueError(f"{structure} needs at least one factor.")
    parts = [_variants(f, i) for i, f in enumerate(factors)]
    dtypes = {jnp.dtype(T.dtype) for T, _, _ in parts}
    if len(dtypes) != 1:
        raise ValueError(f"{structure}: all factors must share one dtype; got {[str(T.dtype) for T, _, _ in parts]}. "
                         "Cast them with .astype(dtype) first.")
    dtype = dtypes.pop()
    F = len(parts)
    sizes = tuple(int(T.shape[1]) for T, _, _ in parts)
    Ks = tuple(int(T.shape[0]) for T, _, _ in parts)
    e_par = _check_parents(emission_parents, F, f"{structure} emission parents")
    t_par = _check_parents(transition_parents, F, f"{structure} transition parents")
    if not normalized:
        _check_acyclic(e_par)
    for name, maps in (("emission control maps", emission_maps), ("transition control maps", transition_maps)):
        if len(maps) != F:
            raise ValueError(f"{structure}: give one entry of the {name} per factor: {F} factors, {len(maps)} entries.")
    e_maps = tuple(_control_map(m, i, p, sizes, K, "the emission control map")
                   for i, (m, p, K) in enumerate(zip(emission_maps, e_par, Ks)))
    t_maps = e_maps if same_maps else tuple(
        _control_map(m, i, p, sizes, K, "the transition control map")
        for i, (m, p, K) in enumerate(zip(transition_maps, t_par, Ks)))
    table = radix_table(sizes) if encoding is None else check_table(encoding, sizes)
    Ts = tuple(T.astype(dtype) for T, _, _ in parts)
    rights = tuple(r.astype(dtype) for _, r, _ in parts)
    etas = _initial_states(eta0, [e for _, _, e in parts], rights, Ks, dtype)
    process = ConditionalProcess(
        T=Ts, rights=rights, eta0=etas, emission_maps=e_maps, transition_maps=t_maps,
        token_to_tuple=jnp.asarray(table), emission_parents=e_par, transition_parents=t_par,
        normalized=normalized, single_selector=same_maps, structure=structure,
    )
    if encoding is not None and not normalized:
        _check_left_out_tuples(process, table)
    return process


def _check_left_out_tuples(process: ConditionalProcess, table: np.ndarray) -> None:
    """A tuple missing from an explicit encoding must be impossible from every state."""
    if any(_is_traced(t) for t in process.T) or any(_is_traced(m) for m in process.emission_maps):
        return
    full = radix_table(process.vocab_sizes)
    listed = {tuple(r) for r in table.tolist()}
    missing = np.array([r for r in full.tolist() if tuple(r) not in listed], np.int32).reshape(-1, process.num_factors)
    if not missing.size:
        return
    ke = np.asarray(variant_table(process.emission_maps, process.emission_parents, jnp.asarray(missing),
                                   process.vocab_sizes))
    atol = _default_atol(process.dtype)
    for row, ks in zip(missing, ke):
        silent = False
        for i, (x, k) in enumerate(zip(row, ks)):
            v = np.asarray(process.T[i][k, x] @ process.rights[i][k], np.float64)
            silent = silent or bool(np.abs(v).max() <= atol)
        if not silent:
            raise ValueError(
                f"the tuple {row.tolist()} is left out of the explicit encoding but can be emitted (every factor's "
                f"selected variant {ks.tolist()} gives its token positive weight from some state). An explicit "
                "encoding may leave out only impossible tuples; list this tuple too."
            )


def conditional_product(
    factors: Sequence[Factor],
    parents: Sequence[Sequence[int]],
    control_maps: Sequence[ControlMap],
    *,
    eta0: InitialStates | None = None,
    encoding: Table | None = None,
) -> ConditionalProcess:
    """Factors that pick their variant from their parents' same-step tokens (a DAG).

    Factor ``i`` uses variant ``k_i = control_maps[i][idx]`` for both its emission and its
    transition, ``idx`` the mixed-radix index of its parents' tokens (see the module
    docstring). The joint law of a tuple is
    ``P(x) = prod_i P(x^i | eta^i, k_i(x_parents(i)))``, exact because the parents form a
    DAG, and the process is the GHMM ``T(x) = (x)_i T_{i|k_i(x)}(x^i)`` whenever each
    factor's variants share ``|1_i>>`` (``joint_ghmm``). Parentless factors with one-entry
    maps are the independent product with chosen variants; ``parents = [(), (0,), (1,)]``
    is a chain; ``parents = [(), (0,), (0,)]`` a tree (two factors conditioned on factor 0).

    Args:
        factors: per factor, its variants: one GHMM, a sequence of GHMMs of one shape, or
            a GHMM with stacked ``T`` of shape ``(K, V, d, d)``. One dtype throughout.
        parents: per factor, the factors whose same-step tokens select its variant.
        control_maps: per factor, ``prod_{p in parents} V_p`` variant indices (``None``
            or one int for a parentless factor: that constant variant, default 0).
        eta0: per factor, the initial state ``<<eta^i(0)|`` (``None``: the stationary state
            of the factor's only variant; a factor with several variants needs one).
        encoding: ``(V, F)`` explicit table of the encoded tuples (composite token ``x`` is
            row ``x``); default: every tuple, mixed radix, factor 0 most significant.

    Raises:
        ValueError: parents out of range or cyclic, maps of the wrong length or selecting a
            missing variant, variants of different shapes or dtypes, a missing or invalid
            initial state, a malformed encoding or one that leaves out a possible tuple.

    >>> import sfpjax
    >>> root = sfpjax.coin(0.5)
    >>> child = [sfpjax.coin(0.9), sfpjax.coin(0.1)]
    >>> tree = sfpjax.conditional_product([root, child, child], [(), (0,), (0,)], [None, [0, 1], [1, 0]],
    ...                                   eta0=[None, [1.0], [1.0]])
    >>> [round(float(v), 3) for v in tree.observation_probs(tree.eta0)]
    [0.045, 0.005, 0.405, 0.045, 0.045, 0.405, 0.005, 0.045]
    """
    return _build(factors, emission_parents=parents, emission_maps=control_maps, transition_parents=parents,
                  transition_maps=control_maps, normalized=False, structure="conditional_product", eta0=eta0,
                  encoding=encoding, same_maps=True)


def sequential_chain(
    factors: Sequence[Factor],
    control_maps: Sequence[ControlMap],
    *,
    eta0: InitialStates | None = None,
    encoding: Table | None = None,
) -> ConditionalProcess:
    """A chain: factor ``i >= 1`` picks its variant from factor ``i - 1``'s token.

    ``P(x) = P(x^0 | eta^0, k_0) prod_{i >= 1} P(x^i | eta^i, control_maps[i][x^{i-1}])``
    and the same variants move the states. ``control_maps[0]`` is ``None`` (variant 0) or
    the constant variant of factor 0; ``control_maps[i]`` has ``V_{i-1}`` entries.
    Arguments as in ``conditional_product`` (this is its ``parents = [(), (0,), (1,), ...]``).

    >>> import sfpjax
    >>> p = sfpjax.sequential_chain([sfpjax.coin(0.4), [sfpjax.coin(0.3), sfpjax.coin(0.8)]],
    ...                             [None, [0, 1]], eta0=[None, [1.0]])
    >>> [round(float(v), 2) for v in p.observation_probs(p.eta0)]
    [0.42, 0.18, 0.08, 0.32]
    """
    F = len(factors)
    parents = [()] + [(i - 1,) for i in range(1, F)]
    return _build(factors, emission_parents=parents, emission_maps=control_maps, transition_parents=parents,
                  transition_maps=control_maps, normalized=False, structure="sequential_chain", eta0=eta0,
                  encoding=encoding, same_maps=True)


def product_of_experts(
    factors: Sequence[Factor],
    control_maps: Sequence[ControlMap],
    *,
    eta0: InitialStates | None = None,
    encoding: Table | None = None,
) -> ConditionalProcess:
    """Fully conditional factors: each picks its variant from all the others' tokens.

    ``P(x) = prod_i P(x^i | eta^i, k_i(x^{-i})) / Z``, ``Z`` the sum of the product over
    the encoded tuples; ``k_i = control_maps[i][idx]`` with ``idx`` the mixed-radix index
    of ``(x^j)_{j != i}`` in increasing ``j``. The same variants move the states. When
    ``Z = 0`` the law is uniform over the ``V`` composite tokens and no token moves any
    state. This product of conditionals is not the joint law the conditionals come from
    (it is what the cyclic dependence defines), and since ``Z`` depends on the states the
    process is no GHMM in general: filter it with ``sfpjax.filter_conditional``.

    Arguments as in ``conditional_product``; ``control_maps[i]`` has
    ``prod_{j != i} V_j`` entries.

    >>> import sfpjax
    >>> a = [sfpjax.coin(0.4), sfpjax.coin(0.9)]  # Pr(0) = 0.6 or 0.1
    >>> b = [sfpjax.coin(0.3), sfpjax.coin(0.8)]
    >>> p = sfpjax.product_of_experts([a, b], [[0, 1], [1, 0]], eta0=[[1.0], [1.0]])
    >>> [round(float(v), 4) for v in p.observation_probs(p.eta0)]
    [0.16, 0.1067, 0.3733, 0.36]
    """
    F = len(factors)
    parents = [tuple(j for j in range(F) if j != i) for i in range(F)]
    return _build(factors, emission_parents=parents, emission_maps=control_maps, transition_parents=parents,
                  transition_maps=control_maps, normalized=True, structure="product_of_experts", eta0=eta0,
                  encoding=encoding, same_maps=True)


def conditional_transitions(
    factors: Sequence[Factor],
    transition_maps: Sequence[ControlMap],
    *,
    emission_variants: Sequence[int] | None = None,
    emission_maps: Sequence[ControlMap] | None = None,
    eta0: InitialStates | None = None,
    encoding: Table | None = None,
) -> ConditionalProcess:
    """Emissions independent or chained; each factor's update conditioned on the others' tokens.

    Emissions: with ``emission_variants`` factor ``i`` always emits with variant
    ``emission_variants[i]`` (independent emissions); with ``emission_maps`` they form a
    chain as in ``sequential_chain``. After the tuple is emitted, factor ``i`` moves with
    variant ``transition_maps[i][idx]``, ``idx`` the mixed-radix index of all the other
    factors' tokens (``prod_{j != i} V_j`` entries). This couples the dynamics: one
    factor's token changes how another factor's state moves.

    When, for every token, the transition variant emits like the emission variant
    (``T_{i|k^t}(x^i)|1>> = T_{i|k^e}(x^i)|1>>``: variants that differ only in where the
    state goes), the update is Bayesian and ``joint_ghmm`` gives the exact GHMM. Otherwise
    the update ``<<eta^i|T_{i|k^t}(x^i)`` reweights the states by a law other than the one
    that emitted the token; the process is then what this recursion defines (exact through
    ``sfpjax.filter_conditional``) and no GHMM in general.

    Args:
        factors, eta0, encoding: as in ``conditional_product``.
        transition_maps: per factor, ``prod_{j != i} V_j`` variant indices.
        emission_variants: per factor, its constant emission variant (exclusive with
            ``emission_maps``).
        emission_maps: per factor, a chain control map (``None`` for factor 0).

    >>> import jax.numpy as jnp, sfpjax
    >>> a = sfpjax.coin(0.4)
    >>> stay, move = (sfpjax.GHMM(jnp.array([[[1.0, 0.0], [1.0, 0.0]]]), jnp.array([0.3, 0.7])),
    ...               sfpjax.GHMM(jnp.array([[[0.0, 1.0], [0.0, 1.0]]]), jnp.array([0.3, 0.7])))
    >>> p = sfpjax.conditional_transitions([a, [stay, move]], [[0], [0, 1]], emission_variants=[0, 0],
    ...                                    eta0=[None, [0.3, 0.7]])
    >>> etas, _ = p.update(p.eta0, jnp.array(1))  # tuple (1, 0): factor 1 moves with variant 1
    >>> [round(float(v), 6) for v in etas[1]]
    [0.0, 1.0]
    """
    F = len(factors)
    if (emission_variants is None) == (emission_maps is None):
        raise ValueError("conditional_transitions needs exactly one of emission_variants (independent emissions) "
                         "or emission_maps (chained emissions).")
    if emission_variants is not None:
        if len(emission_variants) != F:
            raise ValueError(f"emission_variants needs one variant per factor: {F} factors, "
                             f"{len(emission_variants)} entries.")
        e_parents = [()] * F
        e_maps = [[int(k)] for k in emission_variants]
    else:
        e_parents = [()] + [(i - 1,) for i in range(1, F)]
        e_maps = list(emission_maps)
    t_parents = [tuple(j for j in range(F) if j != i) for i in range(F)]
    return _build(factors, emission_parents=e_parents, emission_maps=e_maps, transition_parents=t_parents,
                  transition_maps=transition_maps, normalized=False, structure="conditional_transitions",
                  eta0=eta0, encoding=encoding, same_maps=False)
