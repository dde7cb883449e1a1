import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpjax
from oracles import all_word_probs

HMMS = {
    "coin": (sfpjax.coin, (0.3,)),
    "z1r": (sfpjax.z1r, (0.3,)),
    "mess3": (sfpjax.mess3, (0.15, 0.6)),
    "rrxor": (sfpjax.rrxor, (0.3, 0.7)),
    "even_process": (sfpjax.even_process, (0.4,)),
    "golden_mean": (sfpjax.golden_mean, (0.4,)),
    "noisy_and": (sfpjax.noisy_and, (0.1,)),
    "noisy_not": (sfpjax.noisy_not, (0.2,)),
}
QUANTUM = {
    "tom_quantum": (sfpjax.tom_quantum, (1.0, 0.5)),
    "post_quantum": (sfpjax.post_quantum, (1.5, 0.5)),
}
ALL = {**HMMS, **QUANTUM, "partitioned_z1r": (sfpjax.partitioned_z1r, ())}




@pytest.mark.parametrize("name", sorted(ALL))
def test_default_constructions_are_valid_float32(name):
    ctor, args = ALL[name]
    p = ctor(*args)
    assert p.dtype == jnp.float32
    sfpjax.validate_ghmm(p)
    T = np.asarray(p.T, np.float64)
    eta = np.asarray(p.eta0, np.float64)
    # <<eta(0)| is stationary: Pr(X_t = x) does not depend on t.
    np.testing.assert_allclose(eta @ T.sum(0), eta, atol=2e-6)
    if name in HMMS or name == "partitioned_z1r":
        assert sfpjax.is_hmm(p)
        sfpjax.validate_ghmm(p, hmm=True)


@pytest.mark.parametrize("name", sorted(ALL))
def test_float64_on_request(name):
    ctor, args = ALL[name]
    p = ctor(*args, dtype=jnp.float64)
    assert p.T.dtype == p.eta0.dtype == p.right.dtype == jnp.float64
    np.testing.assert_allclose(all_word_probs(p, 3).sum(), 1.0, atol=1e-12)


def test_partitioned_z1r_is_seed_000_eq_2_17():
    p = sfpjax.partitioned_z1r(dtype=jnp.float64)
    T0 = [[1, 0, 0], [0, 0, 0], [0, 0.5, 0]]
    T1 = [[0, 0, 0], [0, 0, 1], [0, 0.5, 0]]
    np.testing.assert_array_equal(np.asarray(p.T), np.array([T0, T1]))
    np.testing.assert_array_equal(np.asarray(p.net), [[1, 0, 0], [0, 0, 1], [0, 1, 0]])  # eq. 2.18
    np.testing.assert_allclose(np.asarray(p.eta0), np.full(3, 1 / 3))
    assert sfpjax.is_partition_preserving(p, [[0], [1, 2]])


def test_z1r_matrices():
    p = 0.3
    T = np.asarray(sfpjax.z1r(p, dtype=jnp.float64).T)
    np.testing.assert_allclose(T[0], [[0, 1, 0], [0, 0, 0], [p, 0, 0]])
    np.testing.assert_allclose(T[1], [[0, 0, 0], [0, 0, 1], [1 - p, 0, 0]])


def test_mess3_matches_published_formula():
    x, a = 0.05, 0.85
    b, y = (1 - a) / 2, 1 - 2 * x
    T0 = [[a * y, b * x, b * x], [a * x, b * y, b * x], [a * x, b * x, b * y]]
    T1 = [[b * y, a * x, b * x], [b * x, a * y, b * x], [b * x, a * x, b * y]]
    T2 = [[b * y, b * x, a * x], [b * x, b * y, a * x], [b * x, b * x, a * y]]
    p = sfpjax.mess3(x, a, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(p.T), np.array([T0, T1, T2]), atol=1e-15)
    np.testing.assert_allclose(np.asarray(p.net).sum(1), 1.0, atol=1e-15)
    np.testing.assert_allclose(np.asarray(p.eta0), np.full(3, 1 / 3), atol=1e-15)


def test_rrxor_third_symbol_is_xor():
    p = sfpjax.rrxor(0.3, 0.6, dtype=jnp.float64)
    # Start in S: every length-3 word has positive probability iff its third bit is the XOR.
    start = p.with_initial(jnp.eye(5, dtype=jnp.float64)[0])
    probs = all_word_probs(start, 3).reshape(2, 2, 2)
    for a, b, c in itertools.product(range(2), repeat=3):
        expected = (0.3 if a == 0 else 0.7) * (0.6 if b == 0 else 0.4) * (c == a ^ b)
        assert probs[a, b, c] == pytest.approx(expected, abs=1e-14)


def test_even_and_golden_mean_forbidden_words():
    even = all_word_probs(sfpjax.even_process(0.5, dtype=jnp.float64), 3).reshape(2, 2, 2)
    assert even[0, 1, 0] == 0.0  # an odd block of 1s between 0s
    golden = all_word_probs(sfpjax.golden_mean(0.5, dtype=jnp.float64), 2).reshape(2, 2)
    assert golden[1, 1] == 0.0
    assert golden[0, 0] > 0 and golden[0, 1] > 0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_noisy_gates_emit_gate_outputs(eps):
    g = sfpjax.noisy_and(eps, dtype=jnp.float64)
    probs = all_word_probs(g.with_initial(jnp.eye(5, dtype=jnp.float64)[0]), 3).reshape(2, 2, 2)
    for a, b, c in itertools.product(range(2), repeat=3):
        expected = 0.25 * ((1 - eps) if c == (a & b) else eps)
        assert probs[a, b, c] == pytest.approx(expected, abs=1e-14)
    n = sfpjax.noisy_not(eps, dtype=jnp.float64)
    probs = all_word_probs(n.with_initial(jnp.eye(3, dtype=jnp.float64)[0]), 2).reshape(2, 2)
    for a, c in itertools.product(range(2), repeat=2):
        assert probs[a, c] == pytest.approx(0.5 * ((1 - eps) if c == 1 - a else eps), abs=1e-14)


@pytest.mark.parametrize(
    "ctor,params",
    [
        (sfpjax.tom_quantum, [(1.0, 0.5), (0.3, 3.0), (5.0, 0.1), (2.0, 1.0)]),
        (sfpjax.post_quantum, [(1.5, 0.5), (1.1, 0.05), (3.0, 0.9), (5.0, 0.2)]),
    ],
)
def test_quantum_ghmms_are_valid_and_not_hmms(ctor, params):
    for alpha, beta in params:
        p = ctor(alpha, beta, dtype=jnp.float64)
        T = np.asarray(p.T)
        assert (T < -1e-3).any(), "a genuinely non-HMM GHMM has negative entries"
        assert not sfpjax.is_hmm(p)
        eig = np.linalg.eigvals(T.sum(0))
        assert np.abs(eig).max() == pytest.approx(1.0, abs=1e-10)
        assert np.min(np.abs(eig - 1)) < 1e-10
        for L in range(1, 7):
            probs = all_word_probs(p, L)
            assert probs.min() > -1e-12, (alpha, beta, L, probs.min())
            assert probs.sum() == pytest.approx(1.0, abs=1e-10)


def test_quantum_float32_word_probabilities():
    for p in (sfpjax.tom_quantum(), sfpjax.post_quantum()):
        probs = all_word_probs(p, 5)
        assert probs.min() > -1e-5
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)


GRIDS = {
    "coin": (sfpjax.coin, [np.array([0.1, 0.5, 0.9])]),
    "z1r": (sfpjax.z1r, [np.array([0.0, 0.5, 1.0])]),
    "mess3": (sfpjax.mess3, [np.array([0.05, 0.15, 0.3]), np.array([0.6, 0.85, 0.5])]),
    "rrxor": (sfpjax.rrxor, [np.array([0.5, 0.2, 0.9]), np.array([0.5, 0.7, 0.1])]),
    "even_process": (sfpjax.even_process, [np.array([0.2, 0.5, 0.8])]),
    "golden_mean": (sfpjax.golden_mean, [np.array([0.2, 0.5, 0.8])]),
    "noisy_and": (sfpjax.noisy_and, [np.array([0.0, 0.1, 0.4])]),
    "noisy_not": (sfpjax.noisy_not, [np.array([0.0, 0.1, 0.4])]),
    "tom_quantum": (sfpjax.tom_quantum, [np.array([1.0, 0.3, 2.0]), np.array([0.5, 3.0, 1.0])]),
    "post_quantum": (sfpjax.post_quantum, [np.array([1.5, 1.1, 3.0]), np.array([0.5, 0.05, 0.9])]),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_vmap_over_parameters_gives_stacked_pytree(name):
    ctor, grid = GRIDS[name]
    stacked = jax.vmap(ctor)(*[jnp.asarray(g, jnp.float32) for g in grid])
    assert isinstance(stacked, sfpjax.GHMM)
    assert stacked.T.shape[0] == len(grid[0])
    sfpjax.validate_ghmm(stacked)
    for k in range(len(grid[0])):
        single = ctor(*[float(g[k]) for g in grid])
        sliced = jax.tree.map(lambda leaf: leaf[k], stacked)
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_jit_of_constructor():
    p = jax.jit(sfpjax.mess3)(0.1, 0.7)
    np.testing.assert_allclose(np.asarray(p.T), np.asarray(sfpjax.mess3(0.1, 0.7).T), atol=1e-7)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sfpjax.coin(1.5), r"coin probability p must lie in \[0.0, 1.0\]; got 1.5"),
        (lambda: sfpjax.z1r(-0.1), r"z1r probability p must lie in"),
        (lambda: sfpjax.mess3(0.6, 0.5), r"mess3 x must lie in \[0.0, 0.5\]"),
        (lambda: sfpjax.mess3(0.1, 1.5), r"mess3 a must lie in"),
        (lambda: sfpjax.rrxor(0.5, 2.0), r"rrxor p2 must lie in"),
        (lambda: sfpjax.even_process(float("nan")), r"even_process p must lie in"),
        (lambda: sfpjax.noisy_and(1.1), r"noisy_and eps must lie in"),
        (lambda: sfpjax.noisy_not(-1.0), r"noisy_not eps must lie in"),
        (lambda: sfpjax.tom_quantum(0.0, 0.0), r"alpha\^2 \+ beta\^2 > 0"),
        (lambda: sfpjax.post_quantum(0.5, 0.5), r"alpha > 1 > beta > 0"),
        (lambda: sfpjax.coin(jnp.array([0.1, 0.2])), r"parameters are scalars; got shape \(2,\)"),
        (lambda: sfpjax.mess3(dtype=jnp.int32), r"dtype must be a floating dtype"),
    ],
)
def test_bad_parameters_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_post_quantum_grid_float32_is_valid():
    # Small beta makes the net operator's eigenvector entries nearly cancel: a float32
    # stress test of the spectral normalization and of |1>>.
    a, b = jnp.meshgrid(jnp.linspace(1.05, 5.0, 12, dtype=jnp.float32), jnp.linspace(0.02, 0.95, 12, dtype=jnp.float32))
    grid = jax.jit(jax.vmap(sfpjax.post_quantum))(a.ravel(), b.ravel())
    sfpjax.validate_ghmm(grid)
    radius = np.abs(np.linalg.eigvals(np.asarray(grid.T, np.float64).sum(1))).max(-1)
    np.testing.assert_allclose(radius, 1.0, atol=1e-5)
