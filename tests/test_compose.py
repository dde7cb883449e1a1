import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sfpjax
from oracles import all_word_probs

F64 = jnp.float64


def random_hmm(rng, d, V):
    """Random HMM: Pr(next state, symbol | state) from a Dirichlet, random initial state."""
    joint = rng.dirichlet(np.ones(V * d), size=d).reshape(d, V, d)
    T = joint.transpose(1, 0, 2)
    return sfpjax.GHMM(T, rng.dirichlet(np.ones(d)), dtype=F64, hmm=True)


def random_block_hmm(rng, blocks, V):
    """Random HMM whose T(x) are block diagonal over consecutive sector blocks."""
    d = sum(blocks)
    T = np.zeros((V, d, d))
    start = 0
    for n in blocks:
        joint = rng.dirichlet(np.ones(V * n), size=n).reshape(n, V, n).transpose(1, 0, 2)
        T[:, start:start + n, start:start + n] = joint
        start += n
    return sfpjax.GHMM(T, rng.dirichlet(np.ones(d)), dtype=F64, hmm=True)




def np_beliefs(process, tokens):
    """Beliefs after each prefix by plain filtering, float64."""
    T = np.asarray(process.T, np.float64)
    right = np.asarray(process.right, np.float64)
    eta = np.asarray(process.eta0, np.float64)
    out = []
    for x in tokens:
        eta = eta @ T[x]
        eta = eta / (eta @ right)
        out.append(eta)
    return np.array(out)


def np_sample(process, length, rng):
    """One word drawn from the process (so every prefix has positive probability)."""
    T = np.asarray(process.T, np.float64)
    right = np.asarray(process.right, np.float64)
    eta = np.asarray(process.eta0, np.float64)
    out = []
    for _ in range(length):
        p = np.clip(np.einsum("i,xij,j->x", eta, T, right), 0, None)
        x = int(rng.choice(len(p), p=p / p.sum()))
        eta = eta @ T[x]
        eta = eta / (eta @ right)
        out.append(x)
    return np.array(out)


# ---------------------------------------------------------------- product and tokens


def test_product_is_kronecker_with_factor_0_most_significant():
    A, B = sfpjax.z1r(0.3, dtype=F64), sfpjax.mess3(dtype=F64)
    P = sfpjax.product(A, B)
    assert P.vocab_size == 6 and P.num_states == 9
    for xa, xb in itertools.product(range(2), range(3)):
        np.testing.assert_allclose(np.asarray(P.T[xa * 3 + xb]), np.kron(A.T[xa], B.T[xb]))
    np.testing.assert_allclose(np.asarray(P.eta0), np.kron(A.eta0, B.eta0))
    np.testing.assert_allclose(np.asarray(P.right), np.kron(A.right, B.right))


def test_product_of_seed_000_joint_symbols():
    z = sfpjax.partitioned_z1r(dtype=F64)
    P = sfpjax.product(z, z)
    T0, T1 = np.asarray(z.T)
    for sym, (a, b) in zip(range(4), [(T0, T0), (T0, T1), (T1, T0), (T1, T1)]):  # eq. 2.20-2.21
        np.testing.assert_array_equal(np.asarray(P.T[sym]), np.kron(a, b))


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    data=st.data(),
)
def test_encode_decode_roundtrip(sizes, data):
    toks = [np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=5, max_size=5))) for v in sizes]
    joint = sfpjax.encode_tokens(toks, sizes)
    expected = np.zeros(5, np.int64)
    for t, v in zip(toks, sizes):
        expected = expected * v + t
    np.testing.assert_array_equal(np.asarray(joint), expected)
    for got, want in zip(sfpjax.decode_tokens(joint, sizes), toks):
        np.testing.assert_array_equal(np.asarray(got), want)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(2, 3)), min_size=2, max_size=3),
)
def test_product_marginals_equal_factor_beliefs(seed, shapes):
    rng = np.random.default_rng(seed)
    factors = [random_hmm(rng, d, V) for d, V in shapes]
    P = sfpjax.product(*factors)
    dims = [d for d, _ in shapes]
    sizes = [V for _, V in shapes]
    L = 4
    sub = [np_sample(f, L, rng) for f in factors]
    joint_tokens = np.asarray(sfpjax.encode_tokens(sub, sizes))
    joint_beliefs = np_beliefs(P, joint_tokens)
    marginals = sfpjax.factor_marginals(jnp.asarray(joint_beliefs), dims)
    for f, factor in enumerate(factors):
        np.testing.assert_allclose(np.asarray(marginals[f]), np_beliefs(factor, sub[f]), atol=1e-10)
    # Word probabilities factorize too.
    probs = all_word_probs(P, 2).reshape(*(sizes * 2))
    per = [all_word_probs(f, 2).reshape(v, v) for f, v in zip(factors, sizes)]
    F = len(factors)
    letters = "abcdefgh"
    spec = ",".join(letters[f] + letters[F + f] for f in range(F)) + "->" + letters[:F] + letters[F:2 * F]
    np.testing.assert_allclose(probs, np.einsum(spec, *per), atol=1e-12)


def test_product_marginals_with_ghmm_factor_rights():
    A, B = sfpjax.tom_quantum(dtype=F64), sfpjax.post_quantum(dtype=F64)
    P = sfpjax.product(A, B)
    rng = np.random.default_rng(0)
    # post_quantum's T(0) T(0) = 0 (mu . m = 0): keep its 0s apart so the word has Pr > 0.
    sa, sb = rng.integers(0, 4, size=5), np.array([1, 0, 2, 0, 1])
    joint = np_beliefs(P, np.asarray(sfpjax.encode_tokens([sa, sb], (4, 3))))
    mA, mB = sfpjax.factor_marginals(jnp.asarray(joint), (3, 3), rights=[A.right, B.right])
    np.testing.assert_allclose(np.asarray(mA), np_beliefs(A, sa), atol=1e-10)
    np.testing.assert_allclose(np.asarray(mB), np_beliefs(B, sb), atol=1e-10)


def test_product_vmaps_over_stacked_factors():
    grid = jax.vmap(sfpjax.mess3)(jnp.array([0.05, 0.15]), jnp.array([0.6, 0.85]))
    stacked = jax.vmap(lambda m: sfpjax.product(m, sfpjax.z1r()))(grid)
    assert stacked.T.shape == (2, 6, 9, 9)
    single = sfpjax.product(sfpjax.mess3(0.15, 0.85), sfpjax.z1r())
    np.testing.assert_allclose(np.asarray(stacked.T[1]), np.asarray(single.T), atol=1e-6)


# ---------------------------------------------------------------- direct sum


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 3))
def test_direct_sum_word_probs_are_the_mixture(seed, K):
    rng = np.random.default_rng(seed)
    comps = [random_hmm(rng, int(rng.integers(1, 4)), 2) for _ in range(K)]
    w = rng.dirichlet(np.ones(K))
    P = sfpjax.direct_sum(comps, w)
    for L in (1, 2, 3):
        mix = sum(wi * all_word_probs(c, L) for wi, c in zip(w, comps))
        np.testing.assert_allclose(all_word_probs(P, L), mix, atol=1e-12)


def test_direct_sum_disjoint_and_explicit_vocab():
    A, B = sfpjax.z1r(0.3, dtype=F64), sfpjax.mess3(dtype=F64)
    w = np.array([0.25, 0.75])
    P = sfpjax.direct_sum([A, B], w, vocab="disjoint")
    assert P.vocab_size == 5
    for L in (1, 2, 3):
        pa = all_word_probs(A, L).reshape((2,) * L)
        pb = all_word_probs(B, L).reshape((3,) * L)
        full = all_word_probs(P, L).reshape((5,) * L)
        np.testing.assert_allclose(full[(slice(0, 2),) * L], w[0] * pa, atol=1e-12)
        np.testing.assert_allclose(full[(slice(2, 5),) * L], w[1] * pb, atol=1e-12)
        assert full.sum() == pytest.approx(1.0, abs=1e-12)
    # Explicit map: Mess3 symbols 0 and 1 merged into global 0, symbol 2 -> global 1.
    Q = sfpjax.direct_sum([A, B], w, vocab=[[0, 1], [0, 0, 1]])
    assert Q.vocab_size == 2
    merged = np.stack([B.T[0] + B.T[1], B.T[2]])
    B2 = sfpjax.GHMM(merged, B.eta0, dtype=F64)
    for L in (1, 2, 3):
        np.testing.assert_allclose(all_word_probs(Q, L), w[0] * all_word_probs(A, L) + w[1] * all_word_probs(B2, L), atol=1e-12)


def test_direct_sum_vmaps_over_weights():
    A, B = sfpjax.z1r(), sfpjax.even_process()
    ws = jnp.array([[0.5, 0.5], [0.1, 0.9]])
    stacked = jax.vmap(lambda w: sfpjax.direct_sum([A, B], w))(ws)
    np.testing.assert_allclose(np.asarray(stacked.eta0[1]), np.asarray(sfpjax.direct_sum([A, B], ws[1]).eta0))


# ---------------------------------------------------------------- semi-factored


def test_partitioned_z1r_sfp_reproduces_eq_2_26():
    for p in (0.0, 0.3, 0.8, 1.0):
        sfp = sfpjax.partitioned_z1r_sfp(p, dtype=F64)
        rho = np.zeros(9)
        rho[0] = p
        for s, t in itertools.product((1, 2), repeat=2):  # (S1, SR) x (S1, SR)
            rho[3 * s + t] = (1 - p) / 4
        np.testing.assert_allclose(np.asarray(sfp.process.eta0), rho, atol=1e-15)
        np.testing.assert_allclose(
            np.asarray(sfpjax.density_matrix(sfp.process.eta0)), np.diag(rho), atol=1e-15
        )
        z = sfpjax.partitioned_z1r(dtype=F64)
        np.testing.assert_array_equal(np.asarray(sfp.process.T), np.asarray(sfpjax.product(z, z).T))
        assert sfpjax.is_partition_preserving(sfp.process, sfp.sectors, factor_dims=sfp.factor_dims)
        np.testing.assert_allclose(np.asarray(sfpjax.sector_weights(
            sfp.process.eta0, sfp.sectors, factor_dims=sfp.factor_dims)), [[p, 0], [0, 1 - p]], atol=1e-15)
        if 0 < p < 1:
            assert not bool(sfpjax.is_product_state(sfp.process.eta0, (3, 3)))
    assert [j.tolist() for j in sfpjax.partitioned_z1r_sfp(0.5).joint_sectors()] == [[0], [1, 2], [3, 6], [4, 5, 7, 8]]


def test_partitioned_z1r_sfp_with_mass_on_the_mismatched_blocks():
    p = 0.3
    r = np.sqrt(p * (1 - p))
    independent = 2 * r / (1 + 2 * r)  # (1 - q) r = q / 2: the sector prior is a product
    for q in (0.0, 0.2, independent):
        sfp = sfpjax.partitioned_z1r_sfp(p, p_mismatched=q, dtype=F64)
        w = np.asarray(sfpjax.sector_weights(sfp.process.eta0, sfp.sectors, factor_dims=sfp.factor_dims))
        np.testing.assert_allclose(w, [[p * (1 - q), q / 2], [q / 2, (1 - p) * (1 - q)]], atol=1e-15)
        assert sfpjax.is_partition_preserving(sfp.process, sfp.sectors, factor_dims=sfp.factor_dims)
        assert bool(sfpjax.is_product_state(sfp.process.eta0, (3, 3))) == (q == independent)
    np.testing.assert_array_equal(np.asarray(sfpjax.partitioned_z1r_sfp(p, p_mismatched=0.0).process.eta0),
                                  np.asarray(sfpjax.partitioned_z1r_sfp(p).process.eta0))


def test_sfp_sector_weights_are_conserved_along_words():
    sfp = sfpjax.partitioned_z1r_sfp(0.7, dtype=F64)
    # In a partition-preserving process Pr(sector | w) only moves by Bayes' rule on the
    # sectors' own likelihoods; beliefs never leave the union of sectors with prior mass.
    rng = np.random.default_rng(1)
    tokens = np_sample(sfp.process, 8, rng)
    beliefs = np_beliefs(sfp.process, tokens)
    w = np.asarray(sfpjax.sector_weights(jnp.asarray(beliefs), sfp.sectors, factor_dims=(3, 3)))
    np.testing.assert_allclose(w[:, 0, 1], 0.0, atol=1e-15)
    np.testing.assert_allclose(w[:, 1, 0], 0.0, atol=1e-15)
    np.testing.assert_allclose(w.sum((1, 2)), 1.0, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_sfp_is_partition_preserving_and_perturbation_breaks_it(seed):
    rng = np.random.default_rng(seed)
    blocks = [[int(n) for n in rng.integers(1, 3, size=int(rng.integers(1, 3)))] for _ in range(2)]
    factors = [random_block_hmm(rng, b, int(rng.integers(2, 4))) for b in blocks]
    sectors = []
    for b in blocks:
        edges = np.cumsum([0] + b)
        sectors.append([list(range(edges[i], edges[i + 1])) for i in range(len(b))])
    grid = tuple(len(b) for b in blocks)
    prior = rng.dirichlet(np.ones(int(np.prod(grid)))).reshape(grid)
    sfp = sfpjax.semi_factored(factors, sectors, prior)
    dims = sfp.factor_dims
    assert sfpjax.is_partition_preserving(sfp.process, sectors, factor_dims=dims)
    assert float(sfpjax.partition_leakage(sfp.process, sectors, factor_dims=dims)) == 0.0
    np.testing.assert_allclose(
        np.asarray(sfpjax.sector_weights(sfp.process.eta0, sectors, factor_dims=dims)), prior, atol=1e-12
    )
    sfpjax.validate_ghmm(sfp.process, hmm=True)
    # eta0 restricted to each V_sigma is the normalized product restriction.
    for k, idx in enumerate(sfp.joint_sectors()):
        sigma = np.unravel_index(k, grid)
        parts = []
        for f, fac in enumerate(factors):
            e = np.zeros(fac.num_states)
            sel = sectors[f][sigma[f]]
            e[sel] = np.asarray(fac.eta0)[sel]
            parts.append(e / e.sum())
        expected = prior[sigma] * np.kron(*parts)
        np.testing.assert_allclose(np.asarray(sfp.process.eta0), np.asarray(sfp.process.eta0))
        np.testing.assert_allclose(np.asarray(sfp.process.eta0)[idx], expected[idx], atol=1e-12)
    labels = np.empty(sfp.process.num_states, int)
    for k, idx in enumerate(sfp.joint_sectors()):
        labels[idx] = k
    if len(sfp.joint_sectors()) > 1:
        i = 0
        j = int(np.flatnonzero(labels != labels[0])[0])
        T = np.array(sfp.process.T)
        T[0, i, j] += 1e-3
        assert not sfpjax.is_partition_preserving(T, sectors, factor_dims=dims)
        assert float(sfpjax.partition_leakage(T, sectors, factor_dims=dims)) == pytest.approx(1e-3)


def test_semi_factored_vmaps_over_prior():
    stacked = jax.vmap(sfpjax.partitioned_z1r_sfp)(jnp.array([0.2, 0.9]))
    assert isinstance(stacked, sfpjax.SemiFactoredProcess)
    assert stacked.process.T.shape == (2, 4, 9, 9) and stacked.prior.shape == (2, 2, 2)
    np.testing.assert_allclose(np.asarray(stacked.process.eta0[1]),
                               np.asarray(sfpjax.partitioned_z1r_sfp(0.9).process.eta0), atol=1e-7)
    np.testing.assert_allclose(np.asarray(sfpjax.partition_leakage(stacked.process, stacked.sectors,
                                                                   factor_dims=(3, 3))), 0.0)


def test_is_partition_preserving_with_joint_index_sets():
    z = sfpjax.partitioned_z1r()
    assert sfpjax.is_partition_preserving(z.T, [[0], [1, 2]])
    assert not sfpjax.is_partition_preserving(sfpjax.z1r(), [[0], [1, 2]])
    # The coarser split {S0 S0} + rest is preserved too; splitting a sector product is not.
    P = sfpjax.product(z, z)
    assert sfpjax.is_partition_preserving(P, [[0], list(range(1, 9))])
    assert not sfpjax.is_partition_preserving(P, [[0, 1, 2, 3, 4], [5, 6, 7, 8]])


# ---------------------------------------------------------------- token noise


def test_with_token_noise():
    m = sfpjax.mess3(dtype=F64)
    assert np.array_equal(np.asarray(sfpjax.with_token_noise(m, 0.0).T), np.asarray(m.T))
    full = sfpjax.with_token_noise(m, 1.0)
    np.testing.assert_allclose(all_word_probs(full, 2), np.full(9, 1 / 9), atol=1e-12)
    eps = 0.2
    noisy = sfpjax.with_token_noise(m, eps)
    sfpjax.validate_ghmm(noisy, hmm=True)
    # Pr'(w) is Pr passed through an i.i.d. symmetric channel.
    channel = (1 - eps) * np.eye(3) + eps / 3
    pw = all_word_probs(m, 2).reshape(3, 3)
    np.testing.assert_allclose(all_word_probs(noisy, 2).reshape(3, 3), channel.T @ pw @ channel, atol=1e-12)
    q = sfpjax.with_token_noise(sfpjax.tom_quantum(dtype=F64), 0.3)
    sfpjax.validate_ghmm(q)
    for L in range(1, 5):
        assert all_word_probs(q, L).min() > -1e-12
    # Noise on the joint symbol breaks the Kronecker factorization of a product.
    P = sfpjax.product(sfpjax.z1r(dtype=F64), sfpjax.z1r(dtype=F64))
    noisy_p = sfpjax.with_token_noise(P, 0.3)
    tokens = np.array([0, 3, 1, 2, 0])
    joint = np_beliefs(noisy_p, tokens)
    assert not bool(sfpjax.is_product_state(jnp.asarray(joint[-1]), (3, 3), atol=1e-6))


def test_with_token_noise_vmaps_over_eps():
    m = sfpjax.mess3()
    stacked = jax.vmap(sfpjax.with_token_noise, in_axes=(None, 0))(m, jnp.array([0.0, 0.1, 0.5]))
    assert stacked.T.shape == (3, 3, 3, 3)
    np.testing.assert_allclose(np.asarray(stacked.T[1]), np.asarray(sfpjax.with_token_noise(m, 0.1).T), atol=1e-7)


# ---------------------------------------------------------------- bad input

Z = sfpjax.partitioned_z1r()
Z_SECTORS = [[0], [1, 2]]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sfpjax.product(), r"product needs at least one process"),
        (lambda: sfpjax.product(sfpjax.z1r(), sfpjax.z1r(dtype=F64)), r"share one dtype"),
        (lambda: sfpjax.encode_tokens([np.array([0]), np.array([0, 1])], (2, 2)), r"share one shape"),
        (lambda: sfpjax.encode_tokens([np.array([0])], (2, 2)), r"one token array per factor"),
        (lambda: sfpjax.decode_tokens(np.array([0]), (0, 2)), r"positive ints"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r(), sfpjax.mess3()], [0.5, 0.5]), r"equal vocabulary sizes"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r(), sfpjax.z1r()], [0.5, 0.6]), r"non-negative and sum to 1"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r(), sfpjax.z1r()], [1.2, -0.2]), r"non-negative and sum to 1"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r(), sfpjax.z1r()], [1.0]), r"shape \(2,\), one weight per"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r()], [1.0], vocab="merged"), r"'shared', 'disjoint'"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r()], [1.0], vocab=[[0, 1, 2]]), r"vocab\[0\] must list 2"),
        (lambda: sfpjax.direct_sum([sfpjax.z1r()], [1.0], vocab=[[0], [1]]), r"one entry per component"),
        (lambda: sfpjax.semi_factored([Z, Z], [Z_SECTORS], np.eye(2) / 2), r"one sector partition per factor"),
        (lambda: sfpjax.semi_factored([Z, Z], [[[0], [1]], Z_SECTORS], np.eye(2) / 2),
         r"factor 0 sectors: sectors do not cover all 3 states; missing \[2\]"),
        (lambda: sfpjax.semi_factored([Z, Z], [[[0, 1], [1, 2]], Z_SECTORS], np.eye(2) / 2),
         r"factor 0 sectors: sectors overlap: state 1"),
        (lambda: sfpjax.semi_factored([Z, Z], [[[0], [1, 5]], Z_SECTORS], np.eye(2) / 2),
         r"outside range\(3\)"),
        (lambda: sfpjax.semi_factored([Z, Z], [[[0], []], Z_SECTORS], np.eye(2) / 2), r"non-empty"),
        (lambda: sfpjax.semi_factored([Z, Z], [Z_SECTORS] * 2, np.eye(3) / 3), r"must have shape \(2, 2\)"),
        (lambda: sfpjax.semi_factored([Z, Z], [Z_SECTORS] * 2, np.eye(2)), r"non-negative and sum to 1"),
        (lambda: sfpjax.semi_factored([Z, Z], [Z_SECTORS] * 2, np.array([[1.5, 0], [0, -0.5]])),
         r"non-negative and sum to 1"),
        (lambda: sfpjax.semi_factored([sfpjax.z1r(), Z], [Z_SECTORS] * 2, np.eye(2) / 2),
         r"factor 0 does not preserve its sectors"),
        (lambda: sfpjax.semi_factored([Z.with_initial(jnp.array([0.0, 0.5, 0.5])), Z], [Z_SECTORS] * 2,
                                      np.eye(2) / 2), r"sector 0 of factor 0 has prior mass 0.5 but zero weight"),
        (lambda: sfpjax.partitioned_z1r_sfp(1.5), r"p_matched must lie in"),
        (lambda: sfpjax.partitioned_z1r_sfp(0.5, p_mismatched=-0.1), r"p_mismatched must lie in"),
        (lambda: sfpjax.is_partition_preserving(Z, [[0], [1, 2]], factor_dims=(3,)), r"one partition per factor"),
        (lambda: sfpjax.is_partition_preserving(Z, [[[0]], [[0]]], factor_dims=(3, 3)),
         r"joint dimension 3 must equal the product of factor_dims"),
        (lambda: sfpjax.partition_leakage(np.eye(3), [[0], [1, 2]]), r"shape \(\.\.\., V, d, d\)"),
        (lambda: sfpjax.with_token_noise(Z, 1.5), r"eps must lie in \[0, 1\]"),
        (lambda: sfpjax.with_token_noise(Z, -0.1), r"eps must lie in \[0, 1\]"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
