import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from oracles import random_ghmm, random_hmm, stationary, word_prob_and_belief, words


def _empirical_vs_exact(p, T, eta0, right, key, n=3, batch=40_000):
    toks = np.asarray(sfpjax.sample(p, key=key, batch_size=batch, seq_len=n))
    V = T.shape[0]
    codes = (toks * V ** np.arange(n - 1, -1, -1)).sum(-1)
    freq = np.bincount(codes, minlength=V**n) / batch
    exact = np.array([word_prob_and_belief(T, eta0, right, w)[0] for w in words(V, n)])
    # 5 binomial standard deviations
    tol = 5 * np.sqrt(exact * (1 - exact) / batch) + 1e-4
    assert np.all(np.abs(freq - exact) <= tol), np.max(np.abs(freq - exact) / tol)


def test_hmm_word_frequencies(getkey):
    rng = np.random.default_rng(0)
    T = random_hmm(rng, 2, 3)
    p = sfpjax.GHMM(T, hmm=True)
    _empirical_vs_exact(p, T, stationary(T), np.ones(3), getkey())


def test_ghmm_with_negative_entries_word_frequencies(getkey):
    rng = np.random.default_rng(1)
    T, eta0, right = random_ghmm(rng, 2, 3)
    assert (T < 0).any()
    p = sfpjax.GHMM(T, eta0, right)
    _empirical_vs_exact(p, T, eta0, right, getkey())


def test_hidden_states_are_consistent_with_tokens(getkey):
    rng = np.random.default_rng(2)
    T = random_hmm(rng, 3, 4, sparsity=0.5)
    p = sfpjax.GHMM(T, hmm=True)
    toks, states = sfpjax.sample(p, key=getkey(), batch_size=64, seq_len=50, return_states=True)
    assert toks.shape == (64, 50) and states.shape == (64, 51)
    toks, states = np.asarray(toks), np.asarray(states)
    assert (T[toks, states[:, :-1], states[:, 1:]] > 0).all()
    # state frequencies follow the stationary distribution
    np.testing.assert_allclose(np.bincount(states.ravel(), minlength=4) / states.size, stationary(T), atol=0.03)


def test_initial_belief_and_determinism(getkey):
    T = np.zeros((2, 3, 3))
    T[0, 0, 1] = T[1, 1, 2] = 1.0
    T[0, 2, 0] = T[1, 2, 0] = 0.5
    p = sfpjax.GHMM(T, hmm=True)
    k = getkey()
    a = sfpjax.sample(p, key=k, batch_size=8, seq_len=6, initial=jnp.array([1.0, 0.0, 0.0]))
    b = sfpjax.sample(p, key=k, batch_size=8, seq_len=6, initial=jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :2], np.tile([0, 1], (8, 1)))  # S0 -> 0 -> S1 -> 1


def test_sampling_under_vmap_over_stacked_processes(getkey):
    rng = np.random.default_rng(3)
    Ts = jnp.asarray(np.stack([random_hmm(rng, 2, 3) for _ in range(3)]))
    procs = jax.vmap(lambda T: sfpjax.GHMM(T, right=jnp.ones(3)))(Ts)
    keys = jr.split(getkey(), 3)
    toks = jax.vmap(lambda p, k: sfpjax.sample(p, key=k, batch_size=5, seq_len=7))(procs, keys)
    assert toks.shape == (3, 5, 7)
    single = sfpjax.sample(sfpjax.GHMM(Ts[1], hmm=True), key=keys[1], batch_size=5, seq_len=7)
    np.testing.assert_array_equal(toks[1], single)


def test_bad_arguments(getkey):
    rng = np.random.default_rng(4)
    T, eta0, right = random_ghmm(rng, 2, 3)
    g = sfpjax.GHMM(T, eta0, right)
    with pytest.raises(ValueError, match="needs an HMM"):
        sfpjax.sample(g, key=getkey(), batch_size=2, seq_len=3, return_states=True)
    with pytest.raises(ValueError, match="must be positive"):
        sfpjax.sample(g, key=getkey(), batch_size=0, seq_len=3)
    with pytest.raises(ValueError, match="initial must be"):
        sfpjax.sample(g, key=getkey(), batch_size=2, seq_len=3, initial=jnp.ones(4) / 4)
