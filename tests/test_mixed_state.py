import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from oracles import small_process, z1r_T
from oracles import myopic_entropies as oracle_myopic
from oracles import random_ghmm, random_hmm, stationary, word_prob_and_belief, words


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r"])
def test_myopic_entropies_brute_force(kind):
    T, eta0, right = small_process(kind)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    h = sfpjax.myopic_entropies(p, 6)
    np.testing.assert_allclose(h, oracle_myopic(T, eta0, right, 6), rtol=1e-9, atol=1e-12)
    msp = sfpjax.mixed_state_presentation(p, 6)
    np.testing.assert_allclose(msp.myopic_entropies(), h, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r"])
@pytest.mark.parametrize("words_per_block", [1, 3, 9, 27])
def test_myopic_entropies_depth_first_blocks_brute_force(kind, words_per_block):
    # Small blocks force the depth-first path (used for deep trees) at a depth the oracle
    # can enumerate; 1 word per block is the level-by-level path.
    from sfpjax.inference._mixed_state import _myopic_entropies

    T, eta0, right = small_process(kind)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    h = jax.jit(_myopic_entropies, static_argnums=(1, 2))(p, 6, words_per_block)
    np.testing.assert_allclose(h, oracle_myopic(T, eta0, right, 6), rtol=1e-9, atol=1e-12)


def test_myopic_entropies_deep_tree_vmapped_float32_matches_float64():
    # Depth 10 of a 3-symbol process takes the depth-first path; vmapped in float32 over a
    # small grid it matches the float64 level-by-level enumeration.
    from sfpjax.inference._mixed_state import _myopic_entropies

    xs, a_s = jnp.array([0.05, 0.15, 0.3]), jnp.array([0.3, 0.6, 0.9])
    h32 = jax.vmap(lambda x, a: sfpjax.myopic_entropies(sfpjax.mess3(x, a, dtype=jnp.float32), 10))(xs, a_s)
    assert h32.dtype == jnp.float32
    for k in range(3):
        p = sfpjax.mess3(xs[k], a_s[k], dtype=jnp.float64)
        ref = jax.jit(_myopic_entropies, static_argnums=(1, 2))(p, 10, 3**10)
        np.testing.assert_allclose(h32[k], ref, atol=2e-5)
        assert np.all(np.diff(np.asarray(ref)) <= 1e-12)  # H(X_{n+1}|X_{1:n}) never increases


def test_z1r_known_values_and_msp():
    p = sfpjax.GHMM(z1r_T(), hmm=True, dtype=jnp.float64)
    h = np.asarray(sfpjax.myopic_entropies(p, 8))
    # entropy rate of Z1R: one fair bit every 3 symbols
    assert abs(h[-1] - np.log(2) / 3) < 0.02 and np.all(np.diff(h) <= 1e-12)
    msp = sfpjax.mixed_state_presentation(p, 10)
    # transient mixed states plus the 3 recurrent causal states
    recurrent = [b for b in msp.beliefs if np.isclose(b.max(), 1.0)]
    assert len(recurrent) == 3
    for s in range(len(msp.beliefs)):
        for x in range(2):
            j = msp.transitions[s, x]
            if j >= 0:
                v = msp.beliefs[s] @ z1r_T()[x]
                np.testing.assert_allclose(v / v.sum(), msp.beliefs[j], atol=1e-8)
    for lp in msp.level_probs:
        np.testing.assert_allclose(lp.sum(), 1.0)


def test_depth10_three_symbols_fast():
    import time

    rng = np.random.default_rng(1)
    p = sfpjax.GHMM(random_hmm(rng, 3, 3), hmm=True)
    sfpjax.myopic_entropies(p, 10).block_until_ready()
    t = time.perf_counter()
    sfpjax.myopic_entropies(p, 10).block_until_ready()
    # Not a performance assertion: just that level-by-level enumeration is the code path.
    assert time.perf_counter() - t < 30


def test_vmap_over_processes_and_distinct_beliefs():
    rng = np.random.default_rng(2)
    Ts = jnp.asarray(np.stack([random_hmm(rng, 2, 3) for _ in range(3)]))
    procs = jax.vmap(lambda T: sfpjax.GHMM(T, right=jnp.ones(3)))(Ts)
    h = jax.vmap(lambda p: sfpjax.myopic_entropies(p, 4))(procs)
    for k in range(3):
        np.testing.assert_allclose(h[k], sfpjax.myopic_entropies(sfpjax.GHMM(Ts[k], hmm=True), 4), rtol=1e-5)
    n = jax.vmap(lambda p: sfpjax.num_distinct_beliefs(p, 3))(procs)
    assert n.shape == (3,) and bool((n == 8).all())  # generic HMM: every word its own belief
    z = sfpjax.GHMM(z1r_T(), eta0=np.array([1.0, 0, 0]), hmm=True)
    assert int(sfpjax.num_distinct_beliefs(z, 4)) == 1


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r"])
def test_num_distinct_beliefs_brute_force(kind):
    T, eta0, right = small_process(kind)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    for depth in range(6):
        seen = set()
        for w in words(T.shape[0], depth):
            prob, b = word_prob_and_belief(T, eta0, right, w)
            if prob > 0:
                seen.add(tuple(np.round(b * 1e3) + 0.0))
        assert int(sfpjax.num_distinct_beliefs(p, depth, decimals=3)) == len(seen)


def test_num_distinct_beliefs_merges_signed_zeros_and_skips_impossible_words():
    # Z1R from S0: only the words of the cycle 0 1 r are possible, and the beliefs there
    # are vertices; coordinates that round to -0.0 count as 0.0.
    z = sfpjax.GHMM(z1r_T(), eta0=np.array([1.0, 0, 0]), hmm=True, dtype=jnp.float64)
    assert int(sfpjax.num_distinct_beliefs(z, 5)) == 1
    # Symbol 0 keeps the belief (1 + 1e-12, -1e-12), symbol 1 sends every belief to (1, 0):
    # the two round to (1e6, -0.0) and (1e6, 0.0), one belief.
    T = np.array([[[0.5, 0.0], [0.0, 0.5]], [[0.5, 0.0], [0.5, 0.0]]])
    bent = sfpjax.GHMM(T, eta0=np.array([1.0 + 1e-12, -1e-12]), right=np.ones(2), dtype=jnp.float64)
    b, _ = sfpjax.word_beliefs(bent, 1)
    assert np.signbit(np.round(b[0, 1] * 1e6)) and not np.signbit(b[1, 1])
    assert int(sfpjax.num_distinct_beliefs(bent, 1)) == 1


def test_word_beliefs_probabilities_sum_to_one():
    rng = np.random.default_rng(3)
    T, eta0, right = random_ghmm(rng, 2, 3)
    b, pw = sfpjax.word_beliefs(sfpjax.GHMM(T, eta0, right, dtype=jnp.float64), 5)
    np.testing.assert_allclose(pw.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(b @ right, 1.0, atol=1e-9)


def test_entropy_rate_estimate(getkey):
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    h, se = sfpjax.entropy_rate(p, key=getkey(), num_sequences=16, seq_len=3000, burn_in=30)
    assert abs(float(h) - np.log(2) / 3) < 5 * float(se) + 1e-3


def test_bad_depths():
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    with pytest.raises(ValueError, match="max_depth must be >= 0"):
        sfpjax.myopic_entropies(p, -1)
    with pytest.raises(ValueError, match="mixed_state_presentation"):
        sfpjax.myopic_entropies(p, 40)
    with pytest.raises(ValueError, match="burn_in"):
        sfpjax.entropy_rate(p, key=jr.key(0), seq_len=10, burn_in=10)


def test_belief_spread_brute_force():
    from oracles import word_prob_and_belief, words

    T, eta0, right = small_process("hmm")
    pairs = [word_prob_and_belief(T, eta0, right, w) for w in words(3, 3)]
    probs = np.array([p for p, _ in pairs])
    beliefs = np.stack([b for _, b in pairs])
    mean = probs @ beliefs
    expected = np.sqrt(probs @ ((beliefs - mean) ** 2).sum(-1))
    got = sfpjax.belief_spread(sfpjax.GHMM(T, eta0, right, dtype=jnp.float64), 3)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert float(sfpjax.belief_spread(sfpjax.coin(), 4)) == 0.0


def test_word_beliefs_rows_follow_the_documented_word_order():
    # Row sum_t x_t V**(n - t): first symbol most significant, checked word by word.
    rng = np.random.default_rng(5)
    T, eta0, right = random_ghmm(rng, 3, 2)
    b, pw = sfpjax.word_beliefs(sfpjax.GHMM(T, eta0, right, dtype=jnp.float64), 4)
    for row, w in enumerate(words(3, 4)):
        assert row == sum(x * 3 ** (3 - t) for t, x in enumerate(w))
        p, belief = word_prob_and_belief(T, eta0, right, w)
        np.testing.assert_allclose(pw[row], p, atol=1e-12)
        np.testing.assert_allclose(b[row], belief, atol=1e-9)
