"""Conditional factored processes: factors with variants, coupled through same-step tokens.

Notation (the factored GHMM notation of ``_compose``, extended with variants): factor ``i``
of ``F`` is a family of ``K_i`` GHMMs on one latent space, ``T_{i|k}(x^i)`` with
``|1_{i|k}>>``, ``k = 0..K_i-1``, sharing the local alphabet ``V_i`` and dimension
``d_i``. Its state is a row vector ``<<eta^i|``. At each step the composite symbol is a
tuple ``(x^0, ..., x^{F-1})``; two selectors choose, for each factor, which variant it uses:

* the *emission* selector ``k^e_i`` (a function of the same-step tokens of the factor's
  emission parents) gives the factor's emission law
  ``P(x^i | eta^i, k) = <<eta^i|T_{i|k}(x^i)|1_{i|k}>> / <<eta^i|1_{i|k}>>``;
* the *transition* selector ``k^t_i`` (a function of the tokens of its transition parents)
  gives the update after the whole tuple is known:
  ``<<eta^i| <- <<eta^i|T_{i|k}(x^i) / <<eta^i|T_{i|k}(x^i)|1_{i|k}>>``.

A selector is a *control map*: an integer table indexed by the parents' tokens in
mixed radix, parents in increasing factor order, the first parent most significant
(``idx = sum_r x^{p_r} prod_{q > r} V_{p_q}``); a parentless selector is a table of one
entry (the constant variant). The emission law of the tuple is the product of the factor
laws: exact when the emission parents form a DAG (``conditional_product``,
``sequential_chain``, ``conditional_transitions``), and, when every factor is conditioned
on all the others (``product_of_experts``), that product normalized over the encoded
tuples, with the uniform law and frozen states when the normalizer is zero. This is the
semantics of the public generative-process specification v1.0 (section 4), with 0-based
symbols, variants and tokens.

Composite tokens index the tuples through a table ``token_to_tuple`` of shape ``(V, F)``:
by default the full mixed-radix product (``encode_tokens``, factor 0 most significant), or
an explicit table listing only some tuples (``encode_tokens_explicit``). A left-out tuple
must have probability zero (except in ``product_of_experts``, which normalizes over the
encoded tuples).

Two representations, one object. ``ConditionalProcess`` keeps one state per factor and
updates it by the rules above (``observation_probs``, ``update``; sequences in
``sfpjax.filter_conditional``): exact for every structure, since the process is *defined*
by this recursion and the tuple of factor states is a deterministic function of the past
that fixes the law of the future. When the emissions form a DAG, every factor's variants
share one ``|1_i>>``, and the emission and transition variants picked for each tuple emit
alike (``T_{i|k^e}(x^i)|1_i>> = T_{i|k^t}(x^i)|1_i>>``; always so with one selector), the
process is also the GHMM ``T(x) = (x)_i T_{i|k^t_i(x)}(x^i)`` on the joint state whose
belief stays the product of the factor states (``joint_ghmm``): every GHMM routine of
sfpjax applies to it and is exact. Otherwise (the product of experts, whose normalizer
depends on the state; or transitions that reweight the states differently from the
emissions) the process is in general no finite GHMM, and the factor recursion is the
exact one.

Every constructor builds its arrays with ``jax.numpy``: it traces and vmaps over the
variants' arrays and initial states (validation runs only on concrete arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._numerics import default_atol as _default_atol
from .._numerics import is_traced as _is_traced
from ._ghmm import GHMM
from ._compose import product
from ._encoding import Table, check_table, decode_tokens_explicit, encode_tokens_explicit, is_radix, radix_table

__all__ = [
    "ConditionalProcess",
    "conditional_product",
    "sequential_chain",
    "product_of_experts",
    "conditional_transitions",
]

# A factor: one GHMM (one variant), a GHMM with stacked T (K, V, d, d), or a sequence of GHMMs.
Factor = Union[GHMM, Sequence[GHMM]]
ControlMap = Union[None, int, Sequence[int], Int[ArrayLike, " n"]]
InitialStates = Sequence[Union[Float[ArrayLike, " _d"], Sequence[float], None]]


class ConditionalProcess(eqx.Module):
    """A factored process whose factors pick variants from the same step's tokens.

    Build it with ``conditional_product``, ``sequential_chain``, ``product_of_experts`` or
    ``conditional_transitions``; see the module docstring for the semantics.

    Attributes:
        T: per factor, the variants' transfer matrices ``T_{i|k}(x)``, shape
            ``(K_i, V_i, d_i, d_i)``.
        rights: per factor, ``|1_{i|k}>>`` of every variant, shape ``(K_i, d_i)``.
        eta0: per factor, the initial state ``<<eta^i(0)|``, normalized against the
            ``|1>>`` of variant 0.
        emission_maps, transition_maps: per factor, the control map of its emission and
            transition selector (an int table over its parents' tokens, see the module
            docstring).
        token_to_tuple: ``(V, F)``, row ``x`` the factor tokens of composite token ``x``.
        emission_parents, transition_parents: per factor, the parent factors (increasing).
        normalized: ``True`` for the product of experts (normalize the product of the
            factor laws over the encoded tuples; uniform law and frozen states at ``Z = 0``).
        single_selector: ``True`` when every factor's emission and transition selectors
            are the same map.
        structure: the constructor's name for the coupling, for display.
    """

    T: tuple[Float[Array, "_K _V _d _d"], ...]
    rights: tuple[Float[Array, "_K _d"], ...]
    eta0: tuple[Float[Array, " _d"], ...]
    emission_maps: tuple[Int[Array, " _n"], ...]
    transition_maps: tuple[Int[Array, " _n"], ...]
    token_to_tuple: Int[Array, "V F"]
    emission_parents: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    transition_parents: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    normalized: bool = eqx.field(static=True)
    single_selector: bool = eqx.field(static=True)
    structure: str = eqx.field(static=True)

    @property
    def num_factors(self) -> int:
        """``F``."""
        return len(self.T)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """``(V_0, ..., V_{F-1})``: the factors' local alphabets."""
        return tuple(int(t.shape[-3]) for t in self.T)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        """``(d_0, ..., d_{F-1})``."""
        return tuple(int(t.shape[-1]) for t in self.T)

    @property
    def num_variants(self) -> tuple[int, ...]:
        """``(K_0, ..., K_{F-1})``."""
        return tuple(int(t.shape[-4]) for t in self.T)

    @property
    def vocab_size(self) -> int:
        """Number of composite tokens (rows of ``token_to_tuple``)."""
        return int(self.token_to_tuple.shape[-2])

    @property
    def num_states(self) -> int:
        """``d_0 ... d_{F-1}``: the dimension of the joint (Kronecker) belief."""
        return math.prod(self.factor_dims)

    @property
    def dtype(self):
        return self.T[0].dtype

    def emission_variants(self) -> Int[Array, "V F"]:
        """``k^e_i(x)`` for every composite token ``x`` (row) and factor ``i`` (column)."""
        return _variant_table(self.emission_maps, self.emission_parents, self.token_to_tuple, self.vocab_sizes)

    def transition_variants(self) -> Int[Array, "V F"]:
        """``k^t_i(x)`` for every composite token ``x`` (row) and factor ``i`` (column)."""
        return _variant_table(self.transition_maps, self.transition_parents, self.token_to_tuple, self.vocab_sizes)

    def initial_belief(self) -> Float[Array, " d"]:
        """``(x)_i <<eta^i(0)|``: the initial state as one joint row vector."""
        return _kron_vectors(self.eta0)

    def observation_probs(self, etas: Sequence[Float[Array, " _d"]]) -> Float[Array, " V"]:
        """``P(x | eta^0, ..., eta^{F-1})`` for every composite token ``x``.

        Args:
            etas: one state row vector per factor (any positive scale).

        The product over factors of ``P(x^i | eta^i, k^e_i(x))``; for the product of
        experts, divided by its sum ``Z`` over the encoded tuples, or uniform when ``Z = 0``.
        Single states (``jax.vmap`` for batches).

        >>> import sfpjax
        >>> p = sfpjax.sequential_chain([sfpjax.coin(0.4), [sfpjax.coin(0.3), sfpjax.coin(0.8)]],
        ...                             [None, [0, 1]], eta0=[None, [1.0]])
        >>> [round(float(v), 2) for v in p.observation_probs(p.eta0)]
        [0.42, 0.18, 0.08, 0.32]
        """
        etas = self._check_states(etas)
        unnorm = self._unnormalized_probs(etas)
        if not self.normalized:
            return unnorm
        Z = unnorm.sum()
        ok = Z > 0
        return jnp.where(ok, unnorm / jnp.where(ok, Z, 1), jnp.ones_like(unnorm) / self.vocab_size)

    def update(
        self, etas: Sequence[Float[Array, " _d"]], x: Int[Array, ""]
    ) -> tuple[tuple[Float[Array, " _d"], ...], Float[Array, ""]]:
        """One step: the factor states after composite token ``x``, and ``log P(x | etas)``.

        Each factor moves to ``<<eta^i|T_{i|k}(x^i) / <<eta^i|T_{i|k}(x^i)|1_{i|k}>>`` with
        ``k = k^t_i(x)``. An impossible token (``P(x | etas) = 0``) leaves every state
        unchanged and returns ``-inf``, as ``sfpjax.belief_update`` does; in the product
        of experts a zero normalizer freezes every state and ``x`` has probability
        ``1 / V``. A token of positive probability whose selected transition gives a
        factor a zero update normalizer has no defined update (an invalid process):
        that raises at run time. Single state and token (``jax.vmap`` for batches).

        >>> import jax.numpy as jnp, sfpjax
        >>> p = sfpjax.sequential_chain([sfpjax.coin(0.4), [sfpjax.coin(0.3), sfpjax.coin(0.8)]],
        ...                             [None, [0, 1]], eta0=[None, [1.0]])
        >>> etas, logp = p.update(p.eta0, jnp.array(3))
        >>> round(float(jnp.exp(logp)), 2)
        0.32
        """
        etas = self._check_states(etas)
        tup = self.token_to_tuple[x]
        kt = self.transition_variants()[x]
        if self.normalized:
            unnorm = self._unnormalized_probs(etas)
            Z = unnorm.sum()
            frozen = ~(Z > 0)
            px = jnp.where(frozen, 1 / self.vocab_size, unnorm[x] / jnp.where(frozen, 1, Z))
        else:
            ke = self.emission_variants()[x]
            px = jnp.ones((), self.dtype)
            for i, eta in enumerate(etas):
                px = px * _emission(self.T[i][ke[i], tup[i]], self.rights[i][ke[i]], eta)
            frozen = jnp.zeros((), bool)
        possible = px > 0
        moving = possible & ~frozen
        new, undefined = [], jnp.zeros((), bool)
        for i, eta in enumerate(etas):
            unnorm = eta @ self.T[i][kt[i], tup[i]]
            norm = unnorm @ self.rights[i][kt[i]]
            good = norm > 0
            undefined = undefined | (moving & ~good)
            step = moving & good
            new.append(jnp.where(step, unnorm / jnp.where(step, norm, 1), eta))
        if not self.single_selector:
            new[0] = eqx.error_if(
                new[0], undefined,
                "a token of positive probability has no defined update: its transition variant gives "
                "a factor's state zero probability for that factor's token (<<eta^i|T_{i|k^t}(x^i)|1>> = 0). "
                "Choose transition variants that can emit what the emission variants emit.",
            )
        logp = jnp.where(possible, jnp.log(jnp.where(possible, px, 1)), -jnp.inf)
        return tuple(new), logp

    def joint_ghmm(self) -> GHMM:
        """The same process as a GHMM on the joint state, where it is one.

        ``T(x) = T_{0|k^t_0(x)}(x^0) (x) ... (x) T_{F-1|k^t_{F-1}(x)}(x^{F-1})`` for every
        composite token ``x`` (rows of ``token_to_tuple``), ``|1>> = (x)_i |1_i>>`` and
        ``<<eta(0)| = (x)_i <<eta^i(0)|``. Its belief after any word is the Kronecker
        product of the factor states, so ``filter_beliefs``, ``sample``,
        ``myopic_entropies`` and the mixed-state tools give this process's exact answers.
        When every selector is constant this is ``sfpjax.product`` of the selected variants
        (``filter_beliefs`` then tracks one belief per factor).

        Raises:
            ValueError: for the product of experts (its normalizer depends on the state, so
                it is no GHMM in general); when a factor's variants have different ``|1>>``;
                or when for some token the emission and transition variants of a factor emit
                differently (concrete arrays; a traced process raises at run time instead).

        >>> import sfpjax
        >>> p = sfpjax.sequential_chain([sfpjax.mess3(), [sfpjax.mess3(0.1, 0.6), sfpjax.mess3(0.3, 0.8)]],
        ...                             [None, [0, 1, 1]], eta0=[None, [1 / 3] * 3])
        >>> g = p.joint_ghmm()
        >>> g.vocab_size, g.num_states
        (9, 9)
        """
        if self.normalized:
            raise ValueError(
                f"the {self.structure} process is no GHMM on the joint state: its normalizer Z depends on the "
                "factor states, so the law of a word is not <<eta(0)|T(w)|1>> for fixed T(x). Filter it with "
                "sfpjax.filter_conditional (exact), which follows the factor states."
            )
        self._check_shared_rights()
        mismatch, T, eta0 = _joint_arrays(self)
        atol = _default_atol(self.dtype)
        if not _is_traced(mismatch) and float(mismatch) > atol:
            self._raise_mismatch(self.emission_variants(), self.transition_variants(), self.token_to_tuple, atol)
        parentless = all(not p for p in self.transition_parents)
        if parentless and self.vocab_size == math.prod(self.vocab_sizes) and is_radix(self.token_to_tuple):
            factors = [GHMM(t[m[0]], e, r[0], dtype=self.dtype)
                       for t, m, e, r in zip(self.T, self.transition_maps, eta0, self.rights)]
            return product(*factors)
        if _is_traced(mismatch):
            T = eqx.error_if(
                T, mismatch > atol,
                "joint_ghmm: for some token a factor's emission and transition variants emit differently, "
                "so the process is no GHMM on the joint state; use sfpjax.filter_conditional.",
            )
        return GHMM(T, _kron_vectors(eta0), _kron_vectors([r[0] for r in self.rights]), dtype=self.dtype)

    def _check_states(self, etas) -> tuple[Array, ...]:
        etas = tuple(etas)
        if len(etas) != self.num_factors:
            raise ValueError(f"give one state per factor: {self.num_factors} factors, {len(etas)} states.")
        out = []
        for i, (e, d) in enumerate(zip(etas, self.factor_dims)):
            e = jnp.asarray(e, self.dtype)
            if e.shape != (d,):
                raise ValueError(
                    f"the state of factor {i} must have shape ({d},); got {e.shape}. "
                    "For a batch of states use jax.vmap."
                )
            out.append(e)
        return tuple(out)

    def _unnormalized_probs(self, etas) -> Float[Array, " V"]:
        ke, tup = self.emission_variants(), self.token_to_tuple
        p = jnp.ones((self.vocab_size,), self.dtype)
        for i, eta in enumerate(etas):
            law = _factor_laws(self.T[i], self.rights[i], eta)  # (K_i, V_i)
            p = p * law[ke[:, i], tup[:, i]]
        return p

    def _check_shared_rights(self) -> None:
        for i, r in enumerate(self.rights):
            if _is_traced(r):
                continue
            rn = np.asarray(r, np.float64)
            bad = np.flatnonzero(np.abs(rn - rn[:1]).max(-1) > _default_atol(self.dtype))
            if bad.size:
                raise ValueError(
                    f"joint_ghmm: variant {int(bad[0])} of factor {i} has |1>> {rn[bad[0]].round(6).tolist()} but "
                    f"variant 0 has {rn[0].round(6).tolist()}; the joint GHMM needs one |1>> per factor "
                    "(every HMM has |1>> = 1). Use sfpjax.filter_conditional, which normalizes each variant "
                    "in its own gauge."
                )

    def _raise_mismatch(self, ke, kt, tup, atol) -> None:
        for i in range(self.num_factors):
            w = np.asarray(self.rights[i][0], np.float64)
            T = np.asarray(self.T[i], np.float64)
            for x in range(self.vocab_size):
                a, b, s = int(ke[x, i]), int(kt[x, i]), int(tup[x, i])
                if np.abs(T[a, s] @ w - T[b, s] @ w).max() > atol:
                    raise ValueError(
                        f"joint_ghmm: for composite token {x} (tuple {np.asarray(tup[x]).tolist()}) factor {i} "
                        f"emits {s} with variant {a} but moves with variant {b}, and the two give different "
                        f"emission vectors T(x)|1>> ({(T[a, s] @ w).round(6).tolist()} vs "
                        f"{(T[b, s] @ w).round(6).tolist()}). The update then reweights the factor's states "
                        "differently from the emission law, which no GHMM on the joint state does; use "
                        "sfpjax.filter_conditional (exact for this process)."
                    )


@jax.jit
def _joint_arrays(process: ConditionalProcess):
    """``(largest emission mismatch, T of the joint GHMM, factor initial states)``, in one
    compiled call (eager, the dozens of small gathers and products each compile on their own)."""
    ke, kt, tup = process.emission_variants(), process.transition_variants(), process.token_to_tuple
    mismatch = jnp.zeros((), process.dtype)
    mats = []
    for i in range(process.num_factors):
        w = process.rights[i][0]
        emit = process.T[i][ke[:, i], tup[:, i]]
        move = process.T[i][kt[:, i], tup[:, i]]
        mismatch = jnp.maximum(mismatch, jnp.abs(emit @ w - move @ w).max())
        mats.append(move)
    T = mats[0]
    for m in mats[1:]:
        V, a, _ = T.shape
        b = m.shape[-1]
        T = jnp.einsum("xij,xkl->xikjl", T, m).reshape(V, a * b, a * b)
    eta0 = tuple(e / (e @ r[0]) for e, r in zip(process.eta0, process.rights))
    return mismatch, T, eta0


def _emission(Tx: Array, right: Array, eta: Array) -> Array:
    den = eta @ right
    ok = den != 0
    return jnp.where(ok, (eta @ Tx @ right) / jnp.where(ok, den, 1), 0)


def _factor_laws(T: Float[Array, "K V d d"], rights: Float[Array, "K d"], eta: Float[Array, " d"]) -> Array:
    """``P(x | eta, k)`` for every variant ``k`` (row) and local symbol ``x`` (column)."""
    num = jnp.einsum("i,kxij,kj->kx", eta, T, rights)
    den = rights @ eta
    ok = den != 0
    return jnp.where(ok[:, None], num / jnp.where(ok, den, 1)[:, None], 0)


def _kron_vectors(vs: Sequence[Array]) -> Array:
    out = vs[0]
    for v in vs[1:]:
        out = jnp.kron(out, v)
    return out


def _parent_index(tup: Int[Array, "n F"], parents: tuple[int, ...], vocab_sizes: Sequence[int]) -> Int[Array, " n"]:
    idx = jnp.zeros(tup.shape[:-1], jnp.int32)
    for p in parents:
        idx = idx * vocab_sizes[p] + tup[..., p].astype(jnp.int32)
    return idx


def _variant_table(maps, parents, tup, vocab_sizes) -> Int[Array, "n F"]:
    cols = [m[_parent_index(tup, ps, vocab_sizes)] for m, ps in zip(maps, parents)]
    return jnp.stack(cols, axis=-1)


# ---------------------------------------------------------------------------------------
# Constructors


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
    ke = np.asarray(_variant_table(process.emission_maps, process.emission_parents, jnp.asarray(missing),
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
