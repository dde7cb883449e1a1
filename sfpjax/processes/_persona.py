"""Persona worlds: a persona factor times a domain factor, one Kronecker block per leaf.

The two-factor semi-factored process of seed 000, section 2.2 (eqs. 2.5-2.14), with the
factors named for the emergent-misalignment (EM) experiment of seed 001 (weeks 3-6):

* the persona factor ``P = P_0 (+) ... (+) P_{n_P - 1}`` (default sectors ``A``, aligned,
  and ``M``, misaligned);
* the domain factor ``Q = Q_0 (+) ... (+) Q_{n_D - 1}`` (default ``D``, the fine-tuning
  domain, and ``O``, another domain).

The latent space is ``P (x) Q``, ordered lexicographically, persona most significant; it
is the direct sum of the *leaves* ``V_{ad} = P_a (x) Q_d`` (eq. 2.12). On leaf ``(a, d)``
the dynamics are ``T_{ad}(x) = T^P_{a|d}(x_P) (x) T^Q_d(x_Q)`` and every ``T(x)`` is block
diagonal over the leaves (eq. 2.14): a sequence started in a leaf stays there forever.
The token is the pair ``x = x_P V_Q + x_Q`` (persona most significant, as
``sfpjax.encode_tokens``). The initial state is a prior over leaves times each leaf's own
initial state, so the prior alone correlates persona with domain (eq. 2.26).

``T^P_{a|d}`` is the persona sector's sub-process; it depends on the domain ``d`` only in an
*entangled* persona (domain-specific markers). The default sector sub-process
(``marker_sector``) is readable: a neutral state emitting content symbols shared by all
sectors of the factor, and a special state emitting the sector's own marker symbol, so
"the model emits the marker of M" means "it acts from the misaligned persona".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._numerics import float_dtype as _float_dtype
from .._numerics import is_traced as _traced
from ._compose import direct_sum, encode_tokens, product, semi_factored
from ._ghmm import GHMM

__all__ = ["marker_sector", "PersonaWorld", "persona_world"]

Scalar = Union[float, int, np.floating, Float[Array, "..."], Float[np.ndarray, "..."]]
Params = Union[float, int, np.floating, Float[Array, "..."], Float[np.ndarray, "..."], Sequence[float]]


def _check_interval(name: str, value, lo: float, hi: float, *, open_hi: bool = False) -> None:
    """ValueError unless every entry of a concrete ``value`` lies in [lo, hi] (or [lo, hi))."""
    if _traced(value):
        return
    v = np.asarray(value, np.float64)
    ok = np.isfinite(v) & (v >= lo) & ((v < hi) if open_hi else (v <= hi))
    if not ok.all():
        bad = v.ravel()[np.flatnonzero(~ok.ravel())[0]]
        rb = ")" if open_hi else "]"
        raise ValueError(f"{name} must lie in [{lo}, {hi}{rb}; got {float(bad)}.")


def marker_sector(
    n_content: int,
    n_markers: int,
    marker: int,
    *,
    bias: Scalar = 0.5,
    enter: Scalar = 0.1,
    stay: Scalar = 0.5,
    dtype=None,
) -> GHMM:
    """The default sector sub-process: a neutral state and a special (marker) state.

    Alphabet: ``n_content`` content symbols ``0 .. n_content-1`` shared by every sector of a
    factor, then ``n_markers`` marker symbols; this sector's marker is symbol
    ``n_content + marker``. States ``(N, S)`` (a Mealy HMM, ``T(x)_{ij} = Pr(x, j | i)``):

    * ``N`` emits content symbol ``c`` with probability ``b_c`` and moves to ``S`` with
      probability ``enter`` (else stays in ``N``);
    * ``S`` emits the marker and stays with probability ``stay`` (else returns to ``N``).

    ``b_0 = bias`` and the other content symbols share ``1 - bias`` equally (with one content
    symbol, ``b_0 = 1``). The initial state is the stationary one,
    ``(1 - stay, enter) / (1 - stay + enter)``. Vmappable over ``bias``, ``enter``, ``stay``.

    Args:
        n_content: number of shared content symbols (>= 1).
        n_markers: number of marker symbols of the factor (>= 1).
        marker: which marker this sector emits, in ``range(n_markers)``.
        bias: ``Pr(content symbol 0 | N)``, in ``[0, 1]``.
        enter: ``Pr(N -> S)``, in ``[0, 1]``.
        stay: ``Pr(S -> S)``, in ``[0, 1)``.

    >>> import sfpjax
    >>> p = sfpjax.marker_sector(2, 2, 1, enter=0.2, stay=0.5)
    >>> p.vocab_size, p.num_states
    (4, 2)
    >>> print(p.eta0)
    [0.71428573 0.2857143 ]
    """
    dtype = _float_dtype(dtype)
    for name, v in (("n_content", n_content), ("n_markers", n_markers)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}.")
    if not (isinstance(marker, (int, np.integer)) and 0 <= marker < n_markers):
        raise ValueError(f"marker must be an int in range({n_markers}) (one of the factor's markers); got {marker!r}.")
    _check_interval("marker_sector bias", bias, 0.0, 1.0)
    _check_interval("marker_sector enter", enter, 0.0, 1.0)
    _check_interval("marker_sector stay", stay, 0.0, 1.0, open_hi=True)
    b, e, s = (jnp.asarray(v, dtype) for v in (bias, enter, stay))
    for name, v in (("bias", b), ("enter", e), ("stay", s)):
        if v.shape != ():
            raise ValueError(f"marker_sector {name} must be a scalar (vmap over a grid); got shape {v.shape}.")
    if n_content == 1:
        content = jnp.ones((1,), dtype)
    else:
        content = jnp.concatenate([b[None], jnp.broadcast_to((1 - b) / (n_content - 1), (n_content - 1,))])
    V = n_content + n_markers
    T = jnp.zeros((V, 2, 2), dtype)
    T = T.at[:n_content, 0, 0].set(content * (1 - e))
    T = T.at[:n_content, 0, 1].set(content * e)
    T = T.at[n_content + marker, 1, 1].set(s)
    T = T.at[n_content + marker, 1, 0].set(1 - s)
    eta0 = jnp.stack([1 - s, e]) / (1 - s + e)
    return GHMM(T, eta0, jnp.ones((2,), dtype), dtype=dtype, hmm=True)


def _with_trigger(p: GHMM, rate: Array, stay: Array, emit: int) -> GHMM:
    """``p`` plus a trigger symbol (the last symbol) and one triggered state (the last state).

    From every state the trigger is emitted with probability ``rate`` (every other symbol's
    ``T(x)`` scaled by ``1 - rate``) and moves the sector to its triggered state, which emits
    symbol ``emit`` and stays with probability ``stay``, else restarts from ``<<eta(0)|``.
    ``|1>>`` gains an entry 1, so ``T |1>> = |1>>`` still holds for any GHMM ``p``.
    """
    V, d = p.vocab_size, p.num_states
    T = jnp.zeros((V + 1, d + 1, d + 1), p.dtype)
    T = T.at[:V, :d, :d].set((1 - rate) * p.T)
    T = T.at[V, :d, d].set(rate * p.right)
    T = T.at[emit, d, d].add(stay)
    T = T.at[emit, d, :d].add((1 - stay) * p.eta0)
    one = jnp.ones((1,), p.dtype)
    return GHMM(T, jnp.concatenate([p.eta0, 0 * one]), jnp.concatenate([p.right, one]), dtype=p.dtype,
                validate=False)


def _sector_markers(procs: Sequence[GHMM], V: int) -> tuple[tuple[int, ...], ...]:
    """Per sector, the symbols that it and no other sector can emit (from concrete arrays)."""
    emits = [np.abs(np.asarray(p.T)).reshape(V, -1).max(-1) > 0 for p in procs]
    out = []
    for k, e in enumerate(emits):
        others = np.zeros(V, bool)
        for j, o in enumerate(emits):
            if j != k:
                others |= o
        out.append(tuple(int(x) for x in np.flatnonzero(e & ~others)))
    return tuple(out)


def _names(names, what: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) < 1:
        raise ValueError(f"{what} must be a non-empty sequence of sector names, e.g. ('A', 'M'); got {names!r}.")
    out = tuple(str(n) for n in names)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} must be distinct; got {out}.")
    return out


def _index(name, names: tuple[str, ...], what: str) -> int:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if 0 <= int(name) < len(names):
            return int(name)
    elif name in names:
        return names.index(name)
    raise ValueError(f"unknown {what} {name!r}; the {what}s are {names} (give a name or an index).")


def _per_sector(value, n: int, name: str, dtype) -> Array:
    v = jnp.asarray(value, dtype)
    if v.shape == ():
        return jnp.broadcast_to(v, (n,))
    if v.shape != (n,):
        raise ValueError(f"{name} must be a scalar or one value per sector, shape ({n},); got shape {v.shape}.")
    return v


def _check_distribution(w, shape, what: str) -> None:
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}; got {tuple(w.shape)}.")
    if _traced(w):
        return
    wn = np.asarray(w, np.float64)
    atol = 1e-6
    if not np.isfinite(wn).all() or (wn < -atol).any() or abs(wn.sum() - 1) > atol * max(wn.size, 1):
        raise ValueError(
            f"{what} must be a probability distribution (non-negative, summing to 1); got {wn.tolist()} "
            f"(sum {wn.sum():.6g}, min {wn.min():.6g})."
        )


class PersonaWorld(eqx.Module):
    """A persona world: the joint GHMM plus the leaf structure the EM metrics need.

    Leaves are ``(a, d)`` pairs of a persona sector and a domain sector, numbered
    ``l = a n_D + d`` and named by concatenating the sector names (``"MD"``).

    Attributes:
        process: the joint ``GHMM`` on ``P (x) Q`` (leak included).
        clean_T: the leak-free transfer matrices ``T(x)``, block diagonal over the leaves.
        leaf_initial: ``(n_P n_D, d)``; row ``l`` is leaf ``l``'s initial row vector
            ``<<eta_l|`` (supported on ``V_l``, ``<<eta_l|1>> = 1``), so
            ``<<eta(0)| = sum_l prior_l <<eta_l|``.
        prior: the prior over leaves, ``(n_P, n_D)``.
        leak: the leak rate (0 for a partition-preserving world).
        persona_names, domain_names: sector names.
        persona_sectors, domain_sectors: per sector, its state indices in the persona
            factor ``P`` (dimension ``persona_dim``) and the domain factor ``Q``
            (``domain_dim``); ``[persona_sectors, domain_sectors]`` with
            ``factor_dims = (persona_dim, domain_dim)`` is the partition to give
            ``is_partition_preserving``.
        persona_vocab, domain_vocab: ``V_P`` and ``V_Q``; the joint alphabet has
            ``V_P V_Q`` symbols.
        persona_markers: per persona sector (and per domain sector, for an entangled
            persona: index ``[a][d]``), the persona symbols only that sector emits.
        trigger: the trigger's persona symbol, or ``None``.
        aligned, misaligned, finetune_domain: sector indices the EM metrics read.
    """

    process: GHMM
    clean_T: Float[Array, "V d d"]
    leaf_initial: Float[Array, "L d"]
    prior: Float[Array, "nP nD"]
    leak: Float[Array, ""]
    persona_names: tuple[str, ...] = eqx.field(static=True)
    domain_names: tuple[str, ...] = eqx.field(static=True)
    persona_sectors: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    domain_sectors: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    persona_dim: int = eqx.field(static=True)
    domain_dim: int = eqx.field(static=True)
    persona_vocab: int = eqx.field(static=True)
    domain_vocab: int = eqx.field(static=True)
    persona_markers: tuple[tuple[tuple[int, ...], ...], ...] = eqx.field(static=True)
    trigger: int | None = eqx.field(static=True)
    aligned: int = eqx.field(static=True)
    misaligned: int = eqx.field(static=True)
    finetune_domain: int = eqx.field(static=True)

    @property
    def n_persona(self) -> int:
        return len(self.persona_names)

    @property
    def n_domain(self) -> int:
        return len(self.domain_names)

    @property
    def leaf_names(self) -> tuple[str, ...]:
        return tuple(a + d for a in self.persona_names for d in self.domain_names)

    @property
    def sectors(self) -> list:
        """``[persona_sectors, domain_sectors]``: the per-factor partition of the leaves."""
        return [list(self.persona_sectors), list(self.domain_sectors)]

    @property
    def factor_dims(self) -> tuple[int, int]:
        return (self.persona_dim, self.domain_dim)

    @property
    def vocab_size(self) -> int:
        return self.persona_vocab * self.domain_vocab

    def leaf(self, name) -> int:
        """Leaf index ``a n_D + d`` of a name (``"MD"``), a pair (``("M", "D")`` or ``(1, 0)``) or an index."""
        if isinstance(name, tuple) and len(name) == 2:
            return _index(name[0], self.persona_names, "persona sector") * self.n_domain + _index(
                name[1], self.domain_names, "domain sector")
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            return _index(name, self.leaf_names, "leaf")
        return _index(name, self.leaf_names, "leaf")

    def markers(self, persona, domain=0) -> tuple[int, ...]:
        """The persona symbols only persona sector ``persona`` emits (in domain ``domain``)."""
        a = _index(persona, self.persona_names, "persona sector")
        row = self.persona_markers[a]
        return row[_index(domain, self.domain_names, "domain sector")] if len(row) > 1 else row[0]

    def leaf_weights(self, weights) -> Float[Array, " L"]:
        """A distribution over leaves from ``{leaf: weight}`` (or a ``(n_P n_D,)``/``(n_P, n_D)`` array)."""
        n = self.n_persona * self.n_domain
        dtype = self.process.dtype
        if isinstance(weights, Mapping):
            w = jnp.zeros((n,), dtype)
            for k, v in weights.items():
                w = w.at[self.leaf(k)].add(jnp.asarray(v, dtype))
        else:
            w = jnp.asarray(weights, dtype).reshape(-1)
        _check_distribution(w, (n,), "leaf weights")
        return w

    def restrict(self, weights) -> GHMM:
        """The world started in a mixture of leaves: ``<<eta(0)| = sum_l w_l <<eta_l|``.

        ``weights`` as in ``leaf_weights``: ``{"MD": 1.0}`` for one leaf, ``{"MD": 0.95,
        "AO": 0.05}`` for a mixture. The dynamics (leak included) are the world's.
        """
        w = self.leaf_weights(weights)
        return GHMM(self.process.T, w @ self.leaf_initial, self.process.right, dtype=self.process.dtype,
                    validate=False)

    def leaf_process(self, name) -> GHMM:
        """Leaf ``name``'s own process: the leak-free dynamics started from ``<<eta_l|``."""
        return GHMM(self.clean_T, self.leaf_initial[self.leaf(name)], self.process.right,
                    dtype=self.process.dtype, validate=False)

    def with_prior(self, prior: Union[Float[Array, "nP nD"], Float[np.ndarray, "nP nD"], Sequence]) -> "PersonaWorld":
        """The same world with another prior over leaves (vmappable over ``prior``)."""
        prior = jnp.asarray(prior, self.process.dtype)
        _check_distribution(prior, (self.n_persona, self.n_domain), "the prior over leaves")
        eta0 = prior.reshape(-1) @ self.leaf_initial
        process = eqx.tree_at(lambda p: p.eta0, self.process, eta0)
        return eqx.tree_at(lambda w: (w.process, w.prior), self, (process, prior))

    def encode(self, persona_symbols, domain_symbols):
        """Joint tokens ``x_P V_Q + x_Q``."""
        return encode_tokens([persona_symbols, domain_symbols], (self.persona_vocab, self.domain_vocab))


def _leaf_prior(nP, nD, prior, persona_weights, domain_weights, mixing, matched, pnames, dnames, dtype):
    if prior is not None:
        if persona_weights is not None or domain_weights is not None or matched is not None:
            raise ValueError("give either an explicit prior or persona_weights/domain_weights/matched, not both.")
        p = jnp.asarray(prior, dtype)
        _check_distribution(p, (nP, nD), "the prior over leaves (persona x domain)")
        if not _traced(mixing) and float(mixing) != 0.0:
            raise ValueError("mixing only applies to the product prior; with an explicit prior leave mixing at 0.")
        return p
    pw = jnp.full((nP,), 1.0 / nP, dtype) if persona_weights is None else jnp.asarray(persona_weights, dtype)
    dw = jnp.full((nD,), 1.0 / nD, dtype) if domain_weights is None else jnp.asarray(domain_weights, dtype)
    _check_distribution(pw, (nP,), "persona_weights")
    _check_distribution(dw, (nD,), "domain_weights")
    _check_interval("mixing", mixing, 0.0, 1.0)
    if matched is None:
        pairs = [(i, i) for i in range(min(nP, nD))]
    else:
        pairs = [(_index(a, pnames, "persona sector"), _index(d, dnames, "domain sector")) for a, d in matched]
        if not pairs:
            raise ValueError("matched must name at least one (persona, domain) leaf.")
    M = np.zeros((nP, nD))
    for a, d in pairs:
        M[a, d] = 1.0
    M = jnp.asarray(M / M.sum(), dtype)
    m = jnp.asarray(mixing, dtype)
    if m.shape != ():
        raise ValueError(f"mixing must be a scalar (vmap over a grid); got shape {m.shape}.")
    return (1 - m) * jnp.outer(pw, dw) + m * M


def _embed(vec: Array, start: int, total: int) -> Array:
    return jnp.zeros((total,), vec.dtype).at[start:start + vec.shape[0]].set(vec)


def persona_world(
    persona: Sequence[str] = ("A", "M"),
    domains: Sequence[str] = ("D", "O"),
    *,
    persona_processes: Sequence[GHMM | Sequence[GHMM]] | None = None,
    domain_processes: Sequence[GHMM] | None = None,
    n_content: int = 2,
    n_domain_content: int = 2,
    persona_bias: Params = 0.5,
    persona_enter: Params = 0.1,
    persona_stay: Params = 0.5,
    domain_bias: Params = 0.5,
    domain_enter: Params = 0.3,
    domain_stay: Params = 0.5,
    prior: Union[Float[Array, "nP nD"], Float[np.ndarray, "nP nD"], Sequence, None] = None,
    persona_weights: Union[Float[Array, " nP"], Float[np.ndarray, " nP"], Sequence[float], None] = None,
    domain_weights: Union[Float[Array, " nD"], Float[np.ndarray, " nD"], Sequence[float], None] = None,
    mixing: Scalar = 0.0,
    matched: Sequence[tuple] | None = None,
    leak: Scalar = 0.0,
    entangled: bool = False,
    trigger_rate: Scalar | None = None,
    trigger_stay: Scalar = 0.9,
    trigger_emits: int | None = None,
    leaf_processes: Mapping | None = None,
    aligned: str | int = "A",
    misaligned: str | int = "M",
    finetune_domain: str | int = "D",
    dtype=None,
) -> PersonaWorld:
    """A persona world: persona sectors x domain sectors, block diagonal over the leaves.

    Sector sub-processes: by default ``marker_sector``s. Persona sector ``a`` has the
    content symbols ``0 .. n_content-1`` and the marker ``n_content + a`` (factored
    persona: one marker per persona sector, shared by every domain) or
    ``n_content + a n_D + d`` in domain ``d`` (``entangled=True``: a marker per persona
    and domain, so the misaligned persona looks different in every domain). Domain sector
    ``d`` has content symbols ``0 .. n_domain_content-1`` and marker
    ``n_domain_content + d``. The ``*_bias``, ``*_enter`` and ``*_stay`` parameters (a
    scalar, or one value per sector) are ``marker_sector``'s.

    Any GHMM may be given instead: ``persona_processes[a]`` (one GHMM for all domains, or
    a sequence of ``n_D`` GHMMs, one per domain: an entangled persona) and
    ``domain_processes[d]``; all persona sub-processes share one alphabet, as do all
    domain sub-processes. Seed 000's partitioned Z1R SFP (eq. 2.26) is the world whose
    sectors are the blocks ``span{S0}`` and ``span{S1, SR}`` of ``partitioned_z1r`` in
    both factors, with ``prior = [[p, 0], [0, 1 - p]]``.

    Leaf ``(a, d)`` has ``T_{ad}(x) = T^P_{a|d}(x_P) (x) T^Q_d(x_Q)`` and initial state
    ``<<eta^P_{a|d}(0)| (x) <<eta^Q_d(0)|``; the factored world is
    ``semi_factored([(+)_a P_a, (+)_d Q_d], ..., prior)``; an entangled one sums the
    products of each domain's persona factor with that domain's block.

    Knobs (all vmappable: scalars may be traced):

    * prior: an explicit ``(n_P, n_D)`` prior over leaves, or
      ``(1 - mixing) persona_weights (x) domain_weights + mixing U_matched``, with
      ``U_matched`` uniform on the ``matched`` leaves (default: ``(i, i)``, i.e. ``AD`` and
      ``MO``); ``mixing = 0`` is the product prior (persona independent of domain).
    * leak: after every symbol, with probability ``leak`` the persona is redrawn (uniform
      over persona sectors, each from its initial state; the domain state is kept):
      ``T'(x) = T(x) [(1 - leak) I + leak sum_d |1_P>><<rho_d| (x) Pi_d]``. ``leak > 0``
      breaks partition preservation between persona sectors; ``T'|1>> = |1>>`` still.
    * trigger_rate: adds a trigger persona symbol (the last one). Every persona sector
      emits it with probability ``trigger_rate`` per step; it moves the persona to a
      triggered state that emits the misaligned persona's marker (``trigger_emits``, by
      default ``markers(misaligned, d)[0]``) and stays with probability ``trigger_stay``,
      else restarts its sector. The triggered state lives inside every persona sector, so
      the trigger explains the marker without evidence about the persona (partition kept):
      the inoculation-prompting analogue.

    Extension point (coupled leaves): each leaf is built from ``(persona sub-process,
    domain sub-process)`` by ``product``; ``leaf_processes={"MD": g}`` replaces that
    product by any GHMM ``g`` on ``P_M (x) Q_D`` (states in the same lexicographic order,
    ``d_M d_D`` of them, and the joint alphabet ``V_P V_Q``), e.g. a coupled or
    conditional process whose ``T(x)`` is not a Kronecker product. The leaf keeps its place
    in the block-diagonal structure, the prior and every knob; the leak's redraw still acts
    on the persona part of the leaf's states.

    Couplings (a dynamic persona-capability correlation, beside the static one of the
    prior): a conditional factored process on the leaf's two sub-processes whose
    ``joint_ghmm()`` exists drops in as ``leaf_processes={"MD": chain.joint_ghmm()}``.
    Persona first, domain second: ``sequential_chain([P_M, [Q_D variants]], [None, map])``
    (the domain's variant is picked by the same step's persona symbol), or
    ``conditional_product``, or ``conditional_transitions`` whose selected variants emit
    alike; its states ``P_M (x) Q_D`` and tokens ``x_P V_Q + x_Q`` are the leaf's order.
    E.g. the domain behaves differently right after the misaligned persona's marker::

        pm = sfpjax.marker_sector(2, 2, 1)                      # persona M (marker: symbol 3)
        qd = sfpjax.marker_sector(2, 2, 0, enter=0.3)           # domain D as in the default world
        qd_alert = sfpjax.marker_sector(2, 2, 0, enter=0.9)     # domain D after M's marker
        chain = sfpjax.sequential_chain([pm, [qd, qd_alert]], [None, [0, 0, 0, 1]], eta0=[None, qd.eta0])
        w = sfpjax.persona_world(leaf_processes={"MD": chain.joint_ghmm()})

    Non-linear couplings are not supported: the product of experts (its normalizer
    ``Z(eta)`` depends on the state) and conditional transitions whose transition variant
    reweights states differently from the emission variant are in general no finite GHMM
    (``joint_ghmm`` raises), while a persona world is one GHMM, block diagonal over leaves,
    on which the beliefs, the mixed-state tools and the EM metrics rely. Study such a
    coupling alone with ``sfpjax.filter_conditional`` and ``sfpjax.ConditionalSource``.

    Args:
        persona, domains: sector names (``n_P``, ``n_D`` of them).
        aligned, misaligned, finetune_domain: the sectors the EM metrics call aligned,
            misaligned and fine-tuning domain (name or index).
        dtype: float dtype (float32 by default).

    Raises:
        ValueError: a prior that is not a distribution or has the wrong shape, a leak rate
            outside ``[0, 1)``, an unknown sector name, sub-processes whose alphabets differ.

    >>> import sfpjax
    >>> w = sfpjax.persona_world(mixing=0.5)
    >>> w.leaf_names, w.process.vocab_size, w.process.num_states
    (('AD', 'AO', 'MD', 'MO'), 16, 16)
    >>> sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    True
    """
    dtype = _float_dtype(dtype)
    pnames, dnames = _names(persona, "persona sector names"), _names(domains, "domain sector names")
    nP, nD = len(pnames), len(dnames)
    ia = _index(aligned, pnames, "persona sector")
    im = _index(misaligned, pnames, "persona sector")
    ifd = _index(finetune_domain, dnames, "domain sector")
    _check_interval("leak", leak, 0.0, 1.0, open_hi=True)
    if not isinstance(entangled, bool):
        raise ValueError(f"entangled must be a bool; got {entangled!r}.")

    # Domain sub-processes.
    if domain_processes is None:
        db = _per_sector(domain_bias, nD, "domain_bias", dtype)
        de = _per_sector(domain_enter, nD, "domain_enter", dtype)
        ds = _per_sector(domain_stay, nD, "domain_stay", dtype)
        dprocs = [marker_sector(n_domain_content, nD, d, bias=db[d], enter=de[d], stay=ds[d], dtype=dtype)
                  for d in range(nD)]
    else:
        dprocs = list(domain_processes)
        if len(dprocs) != nD:
            raise ValueError(f"give one domain sub-process per domain sector: {nD} names, {len(dprocs)} processes.")
    # Persona sub-processes, one per (sector, domain).
    if persona_processes is None:
        pb = _per_sector(persona_bias, nP, "persona_bias", dtype)
        pe = _per_sector(persona_enter, nP, "persona_enter", dtype)
        ps = _per_sector(persona_stay, nP, "persona_stay", dtype)
        n_mark = nP * nD if entangled else nP
        pgrid = [[marker_sector(n_content, n_mark, a * nD + d if entangled else a, bias=pb[a], enter=pe[a],
                                stay=ps[a], dtype=dtype) for d in range(nD)] for a in range(nP)]
        markers = tuple(tuple((n_content + (a * nD + d if entangled else a),) for d in range(nD)) for a in range(nP))
        if not entangled:
            markers = tuple((m[0],) for m in markers)
    else:
        if entangled:
            raise ValueError("entangled=True builds domain-specific default markers; with persona_processes give "
                             "one sub-process per domain for each persona sector instead.")
        if len(persona_processes) != nP:
            raise ValueError(f"give one persona sub-process per persona sector: {nP} names, "
                             f"{len(persona_processes)} entries.")
        pgrid = []
        for a, entry in enumerate(persona_processes):
            if isinstance(entry, GHMM):
                pgrid.append([entry] * nD)
            else:
                row = list(entry)
                if len(row) != nD or not all(isinstance(p, GHMM) for p in row):
                    raise ValueError(f"persona_processes[{a}] must be a GHMM or a sequence of {nD} GHMMs "
                                     "(one per domain sector).")
                pgrid.append(row)
        entangled = any(pgrid[a][d] is not pgrid[a][0] for a in range(nP) for d in range(nD))
        if _traced(*[p.T for row in pgrid for p in row]):
            markers = tuple(((),) * (nD if entangled else 1) for _ in range(nP))
        else:
            Vp0 = pgrid[0][0].vocab_size
            per_d = [_sector_markers([pgrid[a][d] for a in range(nP)], Vp0) if all(
                pgrid[a][d].vocab_size == Vp0 for a in range(nP)) else None for d in range(nD)]
            if any(m is None for m in per_d):
                per_d = [tuple(() for _ in range(nP))] * nD
            markers = tuple(tuple(per_d[d][a] for d in range(nD)) if entangled else (per_d[0][a],)
                            for a in range(nP))
    Vp = {p.vocab_size for row in pgrid for p in row}
    Vq = {p.vocab_size for p in dprocs}
    if len(Vp) != 1 or len(Vq) != 1:
        raise ValueError(f"all persona sub-processes must share one alphabet, and all domain sub-processes another; "
                         f"got persona vocab sizes {sorted(Vp)} and domain vocab sizes {sorted(Vq)}.")
    for p in [p for row in pgrid for p in row] + dprocs:
        if not isinstance(p, GHMM) or jnp.dtype(p.dtype) != dtype:
            raise ValueError(f"sub-processes must be GHMMs of dtype {dtype.name} (cast with .astype); "
                             f"got {type(p).__name__} of dtype {getattr(p, 'dtype', None)}.")
    Vp, Vq = Vp.pop(), Vq.pop()

    trigger = None
    if trigger_rate is not None:
        _check_interval("trigger_rate", trigger_rate, 0.0, 1.0, open_hi=True)
        _check_interval("trigger_stay", trigger_stay, 0.0, 1.0, open_hi=True)
        rate, tstay = jnp.asarray(trigger_rate, dtype), jnp.asarray(trigger_stay, dtype)
        new = []
        for a in range(nP):
            row = []
            for d in range(nD):
                if trigger_emits is not None:
                    emit = int(trigger_emits)
                    if not 0 <= emit < Vp:
                        raise ValueError(f"trigger_emits must be a persona symbol in range({Vp}); got {emit}.")
                else:
                    mk = markers[im][d if len(markers[im]) > 1 else 0]
                    if not mk:
                        raise ValueError("the misaligned persona sector has no symbol of its own; give "
                                         "trigger_emits (the persona symbol the triggered state emits).")
                    emit = mk[0]
                row.append(_with_trigger(pgrid[a][d], rate, tstay, emit))
            new.append(row)
        pgrid = new
        trigger = Vp
        Vp = Vp + 1

    uniform_p = jnp.full((nP,), 1.0 / nP, dtype)
    uniform_d = jnp.full((nD,), 1.0 / nD, dtype)
    pfactors = [direct_sum([pgrid[a][d] for a in range(nP)], uniform_p, vocab="shared") for d in range(nD)]
    qfactor = direct_sum(dprocs, uniform_d, vocab="shared")
    pdims = [pgrid[a][0].num_states for a in range(nP)]
    qdims = [p.num_states for p in dprocs]
    pstarts, qstarts = np.cumsum([0] + pdims[:-1]), np.cumsum([0] + qdims[:-1])
    psect = tuple(tuple(range(int(s), int(s) + n)) for s, n in zip(pstarts, pdims))
    qsect = tuple(tuple(range(int(s), int(s) + n)) for s, n in zip(qstarts, qdims))
    dP, dQ = sum(pdims), sum(qdims)

    leaf_prior = _leaf_prior(nP, nD, prior, persona_weights, domain_weights, mixing, matched, pnames, dnames, dtype)
    sectors = [list(psect), list(qsect)]
    if not entangled:
        # The factored world is exactly the semi-factored process of the two factors.
        sfp = semi_factored([pfactors[0], qfactor], sectors, leaf_prior)
        T = sfp.process.T
    else:
        T = jnp.zeros((Vp * Vq, dP * dQ, dP * dQ), dtype)
        for d in range(nD):
            qmask = np.zeros(dQ)
            qmask[list(qsect[d])] = 1.0
            mask = np.kron(np.ones(dP), qmask)
            T = T + product(pfactors[d], qfactor).T * jnp.asarray(np.outer(mask, mask), dtype)[None]
    leaf_init = jnp.stack([
        jnp.kron(_embed(pgrid[a][d].eta0, int(pstarts[a]), dP), _embed(dprocs[d].eta0, int(qstarts[d]), dQ))
        for a in range(nP) for d in range(nD)
    ])
    right = jnp.kron(pfactors[0].right, qfactor.right)
    leaf_names = [a + d for a in pnames for d in dnames]
    for name, g in (leaf_processes or {}).items():
        if isinstance(name, tuple) and len(name) == 2:
            a, d = _index(name[0], pnames, "persona sector"), _index(name[1], dnames, "domain sector")
        else:
            l = _index(name, tuple(leaf_names), "leaf")
            a, d = divmod(l, nD)
        idx = np.asarray([p * dQ + q for p in psect[a] for q in qsect[d]])
        if not isinstance(g, GHMM) or g.T.shape != (Vp * Vq, idx.size, idx.size) or jnp.dtype(g.dtype) != dtype:
            raise ValueError(
                f"leaf_processes[{name!r}] must be a {dtype.name} GHMM with T of shape ({Vp * Vq}, {idx.size}, "
                f"{idx.size}) (the joint alphabet, states of P_a (x) Q_d in lexicographic order); got "
                f"{getattr(getattr(g, 'T', None), 'shape', type(g).__name__)}."
            )
        T = T.at[:, idx[:, None], idx[None, :]].set(g.T)
        right = right.at[idx].set(g.right)
        leaf_init = leaf_init.at[a * nD + d].set(jnp.zeros((dP * dQ,), dtype).at[idx].set(g.eta0))
    eta0 = leaf_prior.reshape(-1) @ leaf_init

    eps = jnp.asarray(leak, dtype)
    if eps.shape != ():
        raise ValueError(f"leak must be a scalar (vmap over a grid); got shape {eps.shape}.")
    # Redraw operator: the persona part goes to rho_d (uniform over persona sectors), the domain part stays.
    redraw = jnp.zeros((dP * dQ, dP * dQ), dtype)
    for d in range(nD):
        rho = sum(_embed(pgrid[a][d].eta0, int(pstarts[a]), dP) for a in range(nP)) / nP
        qproj = np.zeros((dQ, dQ))
        qproj[list(qsect[d]), list(qsect[d])] = 1.0
        redraw = redraw + jnp.kron(jnp.outer(pfactors[d].right, rho), jnp.asarray(qproj, dtype))
    mix = (1 - eps) * jnp.eye(dP * dQ, dtype=dtype) + eps * redraw
    T_leak = jnp.einsum("xij,jk->xik", T, mix)
    process = GHMM(T_leak, eta0, right, dtype=dtype, validate=not _traced(T_leak, eta0, right))
    return PersonaWorld(
        process=process, clean_T=T, leaf_initial=leaf_init, prior=leaf_prior, leak=eps,
        persona_names=pnames, domain_names=dnames, persona_sectors=psect, domain_sectors=qsect,
        persona_dim=dP, domain_dim=dQ, persona_vocab=Vp, domain_vocab=Vq, persona_markers=markers,
        trigger=trigger, aligned=ia, misaligned=im, finetune_domain=ifd,
    )
