"""Conditional factored processes: conformance vectors of the public spec, brute-force oracles."""

import dataclasses
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from oracles import random_hmm

F64 = jnp.float64


def hmm(T, eta0=None):
    return sfpjax.GHMM(np.asarray(T, np.float64), None if eta0 is None else np.asarray(eta0, np.float64),
                       dtype=F64, hmm=True)


def variants(Ts):
    """A factor from a list of (V, d, d) HMM transfer tensors (the spec's [K, V, S, S])."""
    return [sfpjax.GHMM(np.asarray(T, np.float64), np.ones(np.shape(T)[-1]) / np.shape(T)[-1],
                        np.ones(np.shape(T)[-1]), dtype=F64, validate=False) for T in Ts]


def coin_variants(*p0):
    """Single-state variants emitting 0 with probability p0[k]."""
    return variants([[[[p]], [[1 - p]]] for p in p0])


ONE = [1.0]


# ---------------------------------------------------------------------------------------
# Conformance vectors of the generative-process specification v1.0 (section 7), 0-based.


def test_spec_radix_and_explicit_encodings():
    assert int(sfpjax.encode_tokens([jnp.array(1), jnp.array(2)], (2, 3))) == 5
    assert [int(v) for v in sfpjax.decode_tokens(jnp.array(5), (2, 3))] == [1, 2]
    assert int(sfpjax.encode_tokens([jnp.array(1), jnp.array(0), jnp.array(1)], (2, 2, 2))) == 5
    assert [int(v) for v in sfpjax.decode_tokens(jnp.array(5), (2, 2, 2))] == [1, 0, 1]
    tuples = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
    codes = sfpjax.encode_tokens([tuples[:, 0], tuples[:, 1]], (3, 2))
    np.testing.assert_array_equal(codes, np.arange(6))
    table = [[0, 0], [1, 0], [1, 1]]
    assert int(sfpjax.encode_tokens_explicit([jnp.array(1), jnp.array(0)], table)) == 1
    assert [int(v) for v in sfpjax.decode_tokens_explicit(jnp.array(2), table)] == [1, 1]


def test_explicit_encoding_roundtrip_and_errors():
    table = np.array([[0, 2], [1, 0], [0, 0], [1, 1]])
    back = sfpjax.decode_tokens_explicit(jnp.arange(4), table)
    np.testing.assert_array_equal(sfpjax.encode_tokens_explicit(back, table), np.arange(4))
    with pytest.raises(Exception, match="not listed"):
        sfpjax.encode_tokens_explicit([jnp.array([0]), jnp.array([1])], table)
    with pytest.raises(Exception, match=r"\[0, 4\)"):
        sfpjax.decode_tokens_explicit(jnp.array([4]), table)
    with pytest.raises(ValueError, match="rows \\[0, 2\\]"):
        sfpjax.decode_tokens_explicit(jnp.array([0]), [[0, 1], [1, 1], [0, 1]])
    with pytest.raises(ValueError, match="non-negative"):
        sfpjax.decode_tokens_explicit(jnp.array([0]), [[0, 1], [0, -1]])


@pytest.mark.parametrize(
    "factors, expected",
    [
        ([coin_variants(0.6), coin_variants(0.7)], [0.42, 0.18, 0.28, 0.12]),
        ([coin_variants(0.5), coin_variants(0.6), coin_variants(0.7)],
         [0.21, 0.09, 0.14, 0.06, 0.21, 0.09, 0.14, 0.06]),
    ],
)
def test_spec_independent(factors, expected):
    F = len(factors)
    p = sfpjax.conditional_product(factors, [()] * F, [None] * F, eta0=[ONE] * F)
    np.testing.assert_allclose(p.observation_probs(p.eta0), expected, rtol=1e-6, atol=1e-12)


def test_spec_sequential_chain():
    p = sfpjax.sequential_chain([coin_variants(0.6), coin_variants(0.7, 0.2)], [None, [0, 1]], eta0=[ONE, ONE])
    np.testing.assert_allclose(p.observation_probs(p.eta0), [0.42, 0.18, 0.08, 0.32], rtol=1e-6, atol=1e-12)
    x = sfpjax.encode_tokens([jnp.array(1), jnp.array(0)], (2, 2))
    np.testing.assert_array_equal(p.emission_variants()[x], [0, 1])
    np.testing.assert_array_equal(p.transition_variants()[x], [0, 1])


@pytest.mark.parametrize(
    "a, b, maps, expected, rtol",
    [
        ((0.6, 0.1), (0.7, 0.2), [[0, 1], [1, 0]], [0.16, 0.10666667, 0.37333333, 0.36], 1e-6),
        ((1 / 3, 4 / 7), (0.2, 0.4), [[0, 1], [0, 1]], [7 / 110, 24 / 55, 14 / 55, 27 / 110], 1e-5),
    ],
)
def test_spec_fully_conditional(a, b, maps, expected, rtol):
    p = sfpjax.product_of_experts([coin_variants(*a), coin_variants(*b)], maps, eta0=[ONE, ONE])
    # The first vector's expected values are printed to 8 digits.
    np.testing.assert_allclose(p.observation_probs(p.eta0), expected, rtol=max(rtol, 1e-7), atol=1e-12)


def test_spec_fully_conditional_zero_fallback_and_frozen_states():
    dead = variants([[[[0.0]], [[0.0]]]])
    p = sfpjax.product_of_experts([dead, dead], [[0, 0], [0, 0]], eta0=[ONE, ONE])
    np.testing.assert_allclose(p.observation_probs(p.eta0), [0.25] * 4, rtol=1e-6)
    etas, logp = p.update(p.eta0, jnp.array(2))
    np.testing.assert_allclose([e[0] for e in etas], [1.0, 1.0])
    np.testing.assert_allclose(logp, math.log(0.25))
    res = sfpjax.filter_conditional(p, jnp.array([[2, 0, 3]]))
    np.testing.assert_allclose(res.log_prob, 3 * math.log(0.25))


def test_spec_single_factor_update_and_sequence_probability():
    z1r = [[[0, 1, 0], [0, 0, 0], [0.5, 0, 0]], [[0, 0, 0], [0, 0, 1], [0.5, 0, 0]]]
    p = sfpjax.conditional_product([variants([z1r])], [()], [None], eta0=[[0.3, 0.1, 0.6]])
    etas, _ = p.update(p.eta0, jnp.array(0))
    np.testing.assert_allclose(etas[0], [0.5, 0.5, 0.0], atol=1e-12)
    q = sfpjax.conditional_product([coin_variants(0.7)], [()], [None], eta0=[ONE])
    np.testing.assert_allclose(jnp.exp(sfpjax.filter_conditional(q, jnp.array([0, 1, 0])).log_prob), 0.147)


def test_spec_conditional_transitions():
    p = sfpjax.conditional_transitions([coin_variants(0.6, 0.2), coin_variants(0.5, 0.1)], [[1, 0], [0, 1]],
                                       emission_variants=[1, 0], eta0=[ONE, ONE])
    np.testing.assert_allclose(p.observation_probs(p.eta0), [0.1, 0.1, 0.4, 0.4], rtol=1e-6)
    q = sfpjax.conditional_transitions([coin_variants(0.6, 0.2), coin_variants(0.9, 0.3)], [[0, 0], [0, 0]],
                                       emission_maps=[None, [1, 0]], eta0=[ONE, ONE])
    np.testing.assert_allclose(q.observation_probs(q.eta0), [0.18, 0.42, 0.36, 0.04], rtol=1e-6)
    stay = [[[1.0, 0.0], [1.0, 0.0]]]
    move = [[[0.0, 1.0], [0.0, 1.0]]]
    r = sfpjax.conditional_transitions([coin_variants(0.6), variants([stay, move])], [[0], [0, 1]],
                                       emission_variants=[0, 0], eta0=[ONE, [0.3, 0.7]])
    etas, _ = r.update(r.eta0, jnp.array(1))
    np.testing.assert_allclose(etas[0], [1.0])
    np.testing.assert_allclose(etas[1], [0.0, 1.0], atol=1e-12)


# ---------------------------------------------------------------------------------------
# Oracles


def _idx(tup, parents, sizes):
    i = 0
    for p in parents:
        i = i * sizes[p] + int(tup[p])
    return i


class Spec:
    """The process in plain NumPy, straight from its definition (loops over tuples)."""

    def __init__(self, Ts, rights, eta0, e_par, e_maps, t_par, t_maps, normalized, table=None):
        self.Ts = [np.asarray(T, np.float64) for T in Ts]  # (K, V, d, d)
        self.rights = [np.asarray(r, np.float64) for r in rights]  # (K, d)
        self.eta0 = [np.asarray(e, np.float64) for e in eta0]
        self.sizes = [T.shape[1] for T in self.Ts]
        self.e_par, self.e_maps, self.t_par, self.t_maps = e_par, e_maps, t_par, t_maps
        self.normalized = normalized
        self.table = (np.array(list(itertools.product(*[range(v) for v in self.sizes])))
                      if table is None else np.asarray(table))

    def law(self, etas):
        p = np.ones(len(self.table))
        for c, tup in enumerate(self.table):
            for i, eta in enumerate(etas):
                k = self.e_maps[i][_idx(tup, self.e_par[i], self.sizes)]
                w = self.rights[i][k]
                p[c] *= eta @ self.Ts[i][k, tup[i]] @ w / (eta @ w)
        if self.normalized:
            Z = p.sum()
            return (p / Z, False) if Z > 0 else (np.full(len(p), 1 / len(p)), True)
        return p, False

    def word(self, w):
        """(P(w), factor states after w)."""
        etas, prob = [e / (e @ r[0]) for e, r in zip(self.eta0, self.rights)], 1.0
        for x in w:
            law, frozen = self.law(etas)
            prob *= law[x]
            if prob == 0:
                return 0.0, None
            if frozen:
                continue
            tup = self.table[x]
            new = []
            for i, eta in enumerate(etas):
                k = self.t_maps[i][_idx(tup, self.t_par[i], self.sizes)]
                u = eta @ self.Ts[i][k, tup[i]]
                new.append(u / (u @ self.rights[i][k]))
            etas = new
        return prob, etas

    def myopic(self, n_max):
        V = len(self.table)
        out = []
        for n in range(n_max + 1):
            h = 0.0
            for w in itertools.product(range(V), repeat=n):
                p, etas = self.word(w)
                if p > 0:
                    q = self.law(etas)[0]
                    q = q[q > 0]
                    h += p * -(q * np.log(q)).sum()
            out.append(h)
        return np.array(out)


def linear_word(Ts, rights, eta0, par, maps, table, w):
    """A single-selector DAG: P(w) = prod_i <<eta^i(0)| T_{i|k}(x^i_1) ... |1_i>>, per factor."""
    sizes = [np.shape(T)[1] for T in Ts]
    prob, etas = 1.0, []
    for i in range(len(Ts)):
        v = np.asarray(eta0[i], np.float64)
        v = v / (v @ rights[i][0])
        for x in w:
            tup = table[x]
            v = v @ Ts[i][maps[i][_idx(tup, par[i], sizes)], tup[i]]
        prob *= v @ rights[i][0]
        etas.append(v / (v @ rights[i][0]) if v @ rights[i][0] > 0 else None)
    return prob, etas


def all_words(V, n):
    return jnp.asarray(np.array(list(itertools.product(range(V), repeat=n)), np.int32).reshape(-1, n))


def random_factor(rng, K, V, d, ghmm=False):
    """K HMM variants; with ghmm, all conjugated by one matrix (shared |1>>, negative entries)."""
    Ts = np.stack([random_hmm(rng, V, d) for _ in range(K)])
    right = np.ones(d)
    if ghmm:
        S = np.eye(d) + 0.3 * rng.standard_normal((d, d))
        Si = np.linalg.inv(S)
        Ts = np.einsum("ij,kxjl,lm->kxim", Si, Ts, S)
        right = Si @ right
    eta = rng.random(d) + 0.1
    eta = eta / eta.sum()
    if ghmm:
        eta = eta @ S
    return Ts, np.stack([right] * K), eta


def to_factor(Ts, rights, eta):
    return [sfpjax.GHMM(T, eta / (eta @ r), r, dtype=F64) for T, r in zip(Ts, rights)]


# ---------------------------------------------------------------------------------------
# Linear couplings: the joint GHMM, the factor recursion and brute force agree.


LINEAR_CASES = {
    # name: (K, V, d per factor, parents, maps)
    "chain": ([2, 3, 2], [2, 3, 2], [2, 3, 2], [(), (0,), (1,)], [[1], [0, 2], [1, 0, 1]]),
    "tree": ([1, 2, 2], [3, 2, 2], [2, 2, 3], [(), (0,), (0,)], [[0], [1, 0, 1], [0, 0, 1]]),
    "two_parents": ([1, 1, 3], [2, 2, 2], [2, 2, 2], [(), (), (0, 1)], [[0], [0], [0, 2, 1, 2]]),
}


@pytest.mark.parametrize("name, ghmm", [("chain", False), ("tree", True), ("two_parents", True)])
def test_linear_couplings_match_brute_force(name, ghmm):
    Ks, Vs, ds, par, maps = LINEAR_CASES[name]
    rng = np.random.default_rng(7)
    parts = [random_factor(rng, K, V, d, ghmm) for K, V, d in zip(Ks, Vs, ds)]
    p = sfpjax.conditional_product([to_factor(*f) for f in parts], par, maps, eta0=[f[2] for f in parts])
    g = p.joint_ghmm()
    Vc = math.prod(Vs)
    assert (g.vocab_size, g.num_states) == (Vc, math.prod(ds))
    table = np.array(list(itertools.product(*[range(v) for v in Vs])))
    words = all_words(Vc, 3)
    res = sfpjax.filter_conditional(p, words)
    joint = sfpjax.filter_beliefs(g, words)
    np.testing.assert_allclose(res.beliefs, joint.beliefs, atol=1e-10)
    np.testing.assert_allclose(res.log_normalizers, joint.log_normalizers, atol=1e-10)
    for w, lp, fb in zip(words, np.asarray(res.log_prob), zip(*[np.asarray(b[:, -1]) for b in res.factor_beliefs])):
        prob, etas = linear_word([f[0] for f in parts], [f[1] for f in parts], [f[2] for f in parts], par, maps,
                                 table, w)
        np.testing.assert_allclose(np.exp(lp), prob, rtol=1e-9, atol=1e-14)
        for e, b in zip(etas, fb):
            np.testing.assert_allclose(b, e, atol=1e-9)
    if name == "chain":  # the enumeration itself is covered once; the law per word is checked above
        spec = Spec([f[0] for f in parts], [f[1] for f in parts], [f[2] for f in parts], par, maps, par, maps, False)
        expected = spec.myopic(2)
        np.testing.assert_allclose(sfpjax.myopic_entropies_conditional(p, 2), expected, atol=1e-10)
        np.testing.assert_allclose(sfpjax.myopic_entropies(g, 2), expected, atol=1e-10)


def test_constant_selectors_give_the_factored_product():
    rng = np.random.default_rng(3)
    parts = [random_factor(rng, 3, 2, 2), random_factor(rng, 2, 3, 3)]
    p = sfpjax.conditional_product([to_factor(*f) for f in parts], [(), ()], [2, [1]], eta0=[f[2] for f in parts])
    g = p.joint_ghmm()
    assert g.factors is not None  # filter_beliefs tracks one belief per factor
    ref = sfpjax.product(sfpjax.GHMM(parts[0][0][2], parts[0][2], dtype=F64),
                         sfpjax.GHMM(parts[1][0][1], parts[1][2], dtype=F64))
    np.testing.assert_allclose(g.T, ref.T, atol=1e-14)
    np.testing.assert_allclose(g.eta0, ref.eta0 / ref.eta0.sum(), atol=1e-14)


def test_transitions_that_only_redirect_states_are_a_ghmm():
    """Variants with equal emission vectors: conditional transitions are then Bayesian (a GHMM)."""
    rng = np.random.default_rng(11)
    base = random_hmm(rng, 2, 3)
    redirect = base.copy()
    perm = np.array([2, 0, 1])
    redirect = redirect[:, :, perm]  # same row sums, different successor states
    Ts = np.stack([base, redirect])
    rights = np.ones((2, 3))
    a = random_factor(rng, 1, 2, 2)
    eta = np.array([0.2, 0.5, 0.3])
    p = sfpjax.conditional_transitions([to_factor(*a), to_factor(Ts, rights, eta)], [[0, 0], [0, 1]],
                                       emission_variants=[0, 0], eta0=[a[2], eta])
    g = p.joint_ghmm()
    words = all_words(4, 3)
    np.testing.assert_allclose(sfpjax.filter_conditional(p, words).beliefs, sfpjax.filter_beliefs(g, words).beliefs,
                               atol=1e-12)
    spec = Spec([a[0], Ts], [a[1], rights], [a[2], eta], [(), ()], [[0], [0]], [(1,), (0,)], [[0, 0], [0, 1]],
                False)
    for w, lp in zip(words, np.asarray(sfpjax.filter_conditional(p, words).log_prob)):
        np.testing.assert_allclose(np.exp(lp), spec.word(w)[0], rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Couplings that are no GHMM: the recursion against the definition, word by word.


def _nonlinear_cases():
    rng = np.random.default_rng(5)
    poe = [random_factor(rng, 2, 2, 2), random_factor(rng, 3, 2, 3)]
    hybrid = [random_factor(rng, 2, 2, 2), random_factor(rng, 2, 3, 2)]
    return {
        "product_of_experts": (
            poe, lambda fs, e: sfpjax.product_of_experts(fs, [[0, 1], [2, 0]], eta0=e),
            [(1,), (0,)], [[0, 1], [2, 0]], [(1,), (0,)], [[0, 1], [2, 0]], True),
        "conditional_transitions_chained": (
            hybrid, lambda fs, e: sfpjax.conditional_transitions(fs, [[1, 0, 1], [0, 1]], emission_maps=[None, [1, 0]],
                                                                  eta0=e),
            [(), (0,)], [[0], [1, 0]], [(1,), (0,)], [[1, 0, 1], [0, 1]], False),
        "conditional_transitions_independent": (
            hybrid, lambda fs, e: sfpjax.conditional_transitions(fs, [[0, 1, 1], [1, 0]], emission_variants=[1, 0],
                                                                  eta0=e),
            [(), ()], [[1], [0]], [(1,), (0,)], [[0, 1, 1], [1, 0]], False),
    }


NONLINEAR = _nonlinear_cases()


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_couplings_match_their_definition(name):
    parts, build, e_par, e_maps, t_par, t_maps, normalized = NONLINEAR[name]
    p = build([to_factor(*f) for f in parts], [f[2] for f in parts])
    spec = Spec([f[0] for f in parts], [f[1] for f in parts], [f[2] for f in parts], e_par, e_maps, t_par, t_maps,
                normalized)
    words = all_words(p.vocab_size, 3)
    res = sfpjax.filter_conditional(p, words)
    step_probs = np.exp(np.cumsum(np.asarray(res.log_normalizers), -1))  # P(x_1..x_t), t = 1..3
    np.testing.assert_allclose(step_probs[:, -1].sum(), 1.0, atol=1e-12)
    for w, probs, fb in zip(np.asarray(words), step_probs, zip(*[np.asarray(b) for b in res.factor_beliefs])):
        for t in range(3):
            ref, etas = spec.word(w[:t + 1])
            np.testing.assert_allclose(probs[t], ref, rtol=1e-10, atol=1e-15)
            for e, b in zip(etas, fb):
                np.testing.assert_allclose(b[t], e, atol=1e-10)
    np.testing.assert_allclose(sfpjax.myopic_entropies_conditional(p, 2), spec.myopic(2), atol=1e-10)
    with pytest.raises(ValueError, match="no GHMM"):
        p.joint_ghmm()


def test_product_of_experts_normalizes_over_an_explicit_encoding():
    parts = NONLINEAR["product_of_experts"][0]
    table = [[0, 0], [1, 1], [0, 1]]
    p = sfpjax.product_of_experts([to_factor(*f) for f in parts], [[0, 1], [2, 0]], eta0=[f[2] for f in parts],
                                  encoding=table)
    assert p.vocab_size == 3
    spec = Spec([f[0] for f in parts], [f[1] for f in parts], [f[2] for f in parts], [(1,), (0,)],
                [[0, 1], [2, 0]], [(1,), (0,)], [[0, 1], [2, 0]], True, table=table)
    words = all_words(3, 3)
    res = sfpjax.filter_conditional(p, words)
    for w, lp in zip(words, np.asarray(res.log_prob)):
        np.testing.assert_allclose(np.exp(lp), spec.word(w)[0], rtol=1e-10)


def test_explicit_encoding_of_a_chain_drops_only_impossible_tuples():
    # Factor 1 under variant 1 (chosen by x^0 = 1) never emits 0: the tuple (1, 0) is impossible.
    T1 = [np.array([[[0.3, 0.2], [0.1, 0.1]], [[0.25, 0.25], [0.4, 0.4]]]),
          np.array([[[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.2, 0.8]]])]
    f0 = [hmm([[[0.4, 0.2], [0.3, 0.1]], [[0.1, 0.3], [0.2, 0.4]]])]
    f1 = [hmm(T, [0.5, 0.5]) for T in T1]
    dense = sfpjax.sequential_chain([f0, f1], [None, [0, 1]], eta0=[None, [0.5, 0.5]])
    table = [[0, 0], [0, 1], [1, 1]]
    sparse = sfpjax.sequential_chain([f0, f1], [None, [0, 1]], eta0=[None, [0.5, 0.5]], encoding=table)
    g = sparse.joint_ghmm()  # validated: the left-out tuple carries no mass
    keep = np.array([0, 1, 3])
    np.testing.assert_allclose(g.T, dense.joint_ghmm().T[keep], atol=1e-15)
    words = all_words(3, 3)
    dense_words = keep[words]
    np.testing.assert_allclose(sfpjax.filter_conditional(sparse, words).log_prob,
                               sfpjax.filter_conditional(dense, dense_words).log_prob, atol=1e-12)
    with pytest.raises(ValueError, match=r"tuple \[1, 1\] is left out"):
        sfpjax.sequential_chain([f0, f1], [None, [0, 1]], eta0=[None, [0.5, 0.5]], encoding=[[0, 0], [0, 1]])


# ---------------------------------------------------------------------------------------
# Sampling, vmap, errors.


def test_sampling_follows_the_exact_law(getkey):
    parts = NONLINEAR["product_of_experts"][0]
    p = sfpjax.product_of_experts([to_factor(*f) for f in parts], [[0, 1], [2, 0]], eta0=[f[2] for f in parts])
    n = 20000
    toks = sfpjax.sample_conditional(p, key=getkey(), batch_size=n, seq_len=2)
    V = p.vocab_size
    words = all_words(V, 2)
    exact = np.exp(np.asarray(sfpjax.filter_conditional(p, words).log_prob))
    counts = np.bincount(np.asarray(toks[:, 0] * V + toks[:, 1]), minlength=V * V) / n
    assert np.all(np.abs(counts - exact) <= 5 * np.sqrt(exact * (1 - exact) / n) + 1e-3)


def test_vmap_over_variant_parameters():
    def build(a):
        return sfpjax.sequential_chain(
            [sfpjax.mess3(a, 0.7, dtype=F64), [sfpjax.mess3(a, 0.6, dtype=F64), sfpjax.mess3(0.3, 0.8, dtype=F64)]],
            [None, [0, 1, 1]], eta0=[None, jnp.ones(3, F64) / 3])

    toks = jnp.array([[0, 4, 8, 2, 7]])

    @jax.jit
    def run(a):
        p = build(a)
        return sfpjax.myopic_entropies_conditional(p, 2), sfpjax.filter_conditional(p, toks).beliefs

    alphas = jnp.array([0.1, 0.2, 0.35], F64)
    stacked = jax.vmap(run)(alphas)
    single = run(alphas[2])
    for s, one in zip(stacked, single):
        np.testing.assert_allclose(s[2], one, atol=1e-12)
    assert float(jnp.abs(stacked[0][0] - stacked[0][2]).max()) > 1e-3  # the parameter matters
    joint = jax.vmap(lambda a: build(a).joint_ghmm().T)(alphas)
    np.testing.assert_allclose(joint[2], build(0.35).joint_ghmm().T, atol=1e-14)


def test_filter_is_traced_once_per_shape():
    p = sfpjax.sequential_chain([coin_variants(0.6), coin_variants(0.7, 0.2)], [None, [0, 1]], eta0=[ONE, ONE])
    f = eqx.debug.assert_max_traces(lambda proc, t: sfpjax.filter_conditional(proc, t).log_prob, max_traces=1)
    jf = jax.jit(f)
    jf(p, jnp.zeros((2, 3), jnp.int32))
    jf(p, jnp.ones((2, 3), jnp.int32))


def test_construction_errors():
    c2 = coin_variants(0.7, 0.2)
    with pytest.raises(ValueError, match="table of 2 integer variant indices"):
        sfpjax.sequential_chain([coin_variants(0.6), c2], [None, [0, 1, 1]], eta0=[ONE, ONE])
    with pytest.raises(ValueError, match="selects variant 2"):
        sfpjax.sequential_chain([coin_variants(0.6), c2], [None, [0, 2]], eta0=[ONE, ONE])
    with pytest.raises(ValueError, match="initial state must be given"):
        sfpjax.sequential_chain([coin_variants(0.6), c2], [None, [0, 1]])
    with pytest.raises(ValueError, match="cycle"):
        sfpjax.conditional_product([c2, c2], [(1,), (0,)], [[0, 1], [1, 0]], eta0=[ONE, ONE])
    with pytest.raises(ValueError, match="distinct other factors"):
        sfpjax.conditional_product([c2, c2], [(), (1,)], [[0], [0, 1]], eta0=[ONE, ONE])
    with pytest.raises(ValueError, match="exactly one of"):
        sfpjax.conditional_transitions([c2, c2], [[0, 1], [0, 1]], eta0=[ONE, ONE])
    with pytest.raises(ValueError, match="outside its alphabet"):
        sfpjax.product_of_experts([c2, c2], [[0, 1], [0, 1]], eta0=[ONE, ONE], encoding=[[0, 0], [2, 1]])
    with pytest.raises(ValueError, match="one dtype"):
        sfpjax.sequential_chain([sfpjax.coin(0.5), c2], [None, [0, 1]], eta0=[None, ONE])
    p = sfpjax.sequential_chain([coin_variants(0.6), c2], [None, [0, 1]], eta0=[ONE, ONE])
    with pytest.raises(Exception, match="tokens outside the alphabet"):
        sfpjax.filter_conditional(p, jnp.array([[0, 4]]))
    with pytest.raises(ValueError, match="one state per factor"):
        p.observation_probs(p.eta0[:1])


def test_undefined_transition_update_raises():
    # Factor 1 emits with a variant that can emit 0 but moves with one that cannot.
    stuck = [[[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]]
    free = [[[0.25, 0.25], [0.25, 0.25]], [[0.25, 0.25], [0.25, 0.25]]]
    p = sfpjax.conditional_transitions([coin_variants(0.5), variants([free, stuck])], [[0, 0], [1, 1]],
                                       emission_variants=[0, 0], eta0=[ONE, [0.5, 0.5]])
    with pytest.raises(ValueError, match="different emission vectors"):
        p.joint_ghmm()
    with pytest.raises(Exception, match="no defined update"):
        sfpjax.filter_conditional(p, jnp.array([[0]]))
    np.testing.assert_allclose(sfpjax.filter_conditional(p, jnp.array([[1]])).log_prob, math.log(0.25))


def test_different_rights_per_variant_use_their_own_gauge():
    """GHMM variants with different |1>> (the spec's projective states): no joint GHMM, the
    recursion normalizes each variant in its own gauge, as the definition does."""
    rng = np.random.default_rng(2)
    Ts, rights, eta = [], [], None
    for _ in range(2):
        T = random_hmm(rng, 2, 2)
        S = np.diag(rng.random(2) + 0.5)
        Ts.append(np.linalg.inv(S) @ T @ S)
        rights.append(np.linalg.inv(S) @ np.ones(2))
    Ts, rights = np.stack(Ts), np.stack(rights)
    eta = np.array([0.6, 0.4])
    a = random_factor(rng, 1, 2, 1)
    p = sfpjax.sequential_chain([to_factor(*a), to_factor(Ts, rights, eta)], [None, [0, 1]], eta0=[a[2], eta])
    with pytest.raises(ValueError, match="one \\|1>> per factor"):
        p.joint_ghmm()
    spec = Spec([a[0], Ts], [a[1], rights], [a[2], eta], [(), (0,)], [[0], [0, 1]], [(), (0,)], [[0], [0, 1]], False)
    words = all_words(4, 3)
    res = sfpjax.filter_conditional(p, words)
    for w, lp in zip(words, np.asarray(res.log_prob)):
        np.testing.assert_allclose(np.exp(lp), spec.word(w)[0], rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Training on conditional processes: the data source and the loss floor.


def mess3_chain(a=0.15, dtype=F64):
    """Factor 1 (mess3) picks its variant from factor 0's token: a GHMM coupling."""
    return sfpjax.sequential_chain(
        [sfpjax.mess3(a, 0.7, dtype=dtype), [sfpjax.mess3(0.1, 0.6, dtype=dtype), sfpjax.mess3(0.3, 0.8, dtype=dtype)]],
        [None, [0, 1, 1]], eta0=[None, jnp.ones(3, dtype) / 3])


def test_conditional_source_draws_the_process_law_and_vmaps(getkey):
    chain = mess3_chain()
    src = sfpjax.as_source(chain)
    assert isinstance(src, sfpjax.ConditionalSource) and src.vocab_size == 9 and not src.stacked
    key = getkey()
    np.testing.assert_array_equal(src.batch(key, 4, 6),
                                  sfpjax.sample_conditional(chain, key=key, batch_size=4, seq_len=6))
    # A stack of sources, one process per model, vmaps like a stack of ProcessSources.
    alphas = jnp.array([0.1, 0.35], F64)
    stack = sfpjax.ConditionalSource(eqx.filter_vmap(mess3_chain)(alphas))
    assert stack.stacked and stack.vocab_size == 9
    keys = jr.split(getkey(), 2)
    drawn = eqx.filter_vmap(lambda s, k: s.batch(k, 4, 6))(stack, keys)
    np.testing.assert_array_equal(drawn[1], sfpjax.sample_conditional(mess3_chain(0.35), key=keys[1],
                                                                      batch_size=4, seq_len=6))
    with pytest.raises(ValueError, match="vocab_size=9"):
        src.check(4, 6)


@pytest.mark.parametrize("use_bos", [False, True])
def test_loss_floor_of_a_conditional_process_is_its_myopic_entropies(use_bos, getkey):
    chain = mess3_chain()
    L = 5
    exact = sfpjax.myopic_entropies_conditional(chain, L - 1)
    floor = sfpjax.loss_floor(chain, L, use_bos=use_bos)
    np.testing.assert_allclose(floor, exact if use_bos else exact[1:], atol=1e-12)
    # A GHMM coupling: the floor of its joint GHMM is the same.
    np.testing.assert_allclose(floor, sfpjax.loss_floor(chain.joint_ghmm(), L, use_bos=use_bos), atol=1e-12)
    # No GHMM at all (product of experts): the floor still follows the factor states.
    parts = NONLINEAR["product_of_experts"][0]
    poe = sfpjax.product_of_experts([to_factor(*f) for f in parts], [[0, 1], [2, 0]], eta0=[f[2] for f in parts])
    spec = Spec([f[0] for f in parts], [f[1] for f in parts], [f[2] for f in parts], [(1,), (0,)],
                [[0, 1], [2, 0]], [(1,), (0,)], [[0, 1], [2, 0]], True)
    ref = spec.myopic(3)
    np.testing.assert_allclose(sfpjax.loss_floor(poe, 4, use_bos=use_bos), ref if use_bos else ref[1:], atol=1e-10)
    # Past max_exact_words the deeper positions are estimated from sampled contexts.
    est = sfpjax.loss_floor(chain, L, use_bos=use_bos, key=getkey(), num_samples=4096, max_exact_words=81)
    n_exact = 3 if use_bos else 2
    np.testing.assert_allclose(est[:n_exact], floor[:n_exact], atol=1e-12)
    np.testing.assert_allclose(est[n_exact:], floor[n_exact:], atol=0.02)
    assert not np.allclose(est[n_exact:], floor[n_exact:], atol=1e-9)  # sampled, not enumerated
    with pytest.raises(ValueError, match="pass key="):
        sfpjax.loss_floor(chain, L, use_bos=use_bos, max_exact_words=81)


def test_train_on_a_sequential_chain():
    chain = mess3_chain(dtype=jnp.float32)
    cfg = sfpjax.TransformerConfig(vocab_size=9, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    model = sfpjax.Transformer(cfg, key=jr.key(0))
    tc = sfpjax.TrainConfig(steps=2, batch_size=8, seq_len=5, eval_every=2, eval_batch_size=16, log_every=1)
    out = sfpjax.train(model, chain, tc, key=jr.key(1), progress=False)
    last = out.history[-1]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and np.isfinite(last["excess"])
    floor = sfpjax.myopic_entropies_conditional(mess3_chain(), 4)[1:]
    np.testing.assert_allclose(last["floor"], float(floor.mean()), rtol=1e-5)
    assert not np.array_equal(np.asarray(out.model.W_U), np.asarray(model.W_U))


def test_train_a_stack_on_a_shared_and_a_stacked_chain():
    cfg = sfpjax.TransformerConfig(vocab_size=9, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(cfg, key=k))(jr.split(jr.key(0), 2))
    tc = sfpjax.TrainConfig(steps=2, batch_size=8, seq_len=4, eval_every=2, eval_batch_size=16, log_every=1)
    keys = jr.split(jr.key(1), 2)
    alphas = jnp.array([0.1, 0.35], jnp.float32)
    stacked = sfpjax.train_stack(models, eqx.filter_vmap(lambda a: mess3_chain(a, jnp.float32))(alphas), tc,
                                 keys=keys, progress=False)
    floors = [float(sfpjax.myopic_entropies_conditional(mess3_chain(a), 3)[1:].mean()) for a in (0.1, 0.35)]
    np.testing.assert_allclose(stacked.history[-1]["floor"], floors, rtol=1e-5)
    tc = dataclasses.replace(tc, eval_every=0)
    shared = sfpjax.train_stack(models, mess3_chain(0.35, jnp.float32), tc, keys=keys, progress=False)
    # Model 1 of the stacked run trained on the same process with the same key as in the shared run.
    np.testing.assert_allclose(np.asarray(stacked.model.W_U[1]), np.asarray(shared.model.W_U[1]), atol=1e-6)
