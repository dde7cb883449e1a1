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

The constructors live in `_conditional_build`; every one builds its arrays with
``jax.numpy``: it traces and vmaps over the variants' arrays and initial states
(validation runs only on concrete arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._numerics import default_atol as _default_atol
from .._numerics import is_traced as _is_traced
from ._ghmm import GHMM
from ._compose import product
from ._encoding import is_radix

__all__ = ["ConditionalProcess"]


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
        return variant_table(self.emission_maps, self.emission_parents, self.token_to_tuple, self.vocab_sizes)

    def transition_variants(self) -> Int[Array, "V F"]:
        """``k^t_i(x)`` for every composite token ``x`` (row) and factor ``i`` (column)."""
        return variant_table(self.transition_maps, self.transition_parents, self.token_to_tuple, self.vocab_sizes)

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


def variant_table(maps, parents, tup, vocab_sizes) -> Int[Array, "n F"]:
    cols = [m[_parent_index(tup, ps, vocab_sizes)] for m, ps in zip(maps, parents)]
    return jnp.stack(cols, axis=-1)
