"""Float64 NumPy oracles: brute-force enumeration over all words on tiny processes."""

import itertools

import numpy as np


def random_hmm(rng, V, d, sparsity=0.0):
    T = rng.random((V, d, d)) * (rng.random((V, d, d)) >= sparsity)
    T[0] += 1e-3  # keep every row non-empty
    T /= T.sum((0, 2), keepdims=True)
    return T


def random_ghmm(rng, V, d):
    """A similarity transform of a random HMM: negative entries, same word law."""
    T = random_hmm(rng, V, d)
    S = np.eye(d) + 0.4 * rng.standard_normal((d, d))
    Si = np.linalg.inv(S)
    Tg = np.einsum("ij,xjk,kl->xil", Si, T, S)
    pi = stationary(T)
    return Tg, pi @ S, Si @ np.ones(d)


def stationary(T):
    net = T.sum(0)
    w, v = np.linalg.eig(net.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def words(V, n):
    return [np.array(w, dtype=np.int32) for w in itertools.product(range(V), repeat=n)]


def word_prob_and_belief(T, eta0, right, w):
    v = np.asarray(eta0, np.float64)
    for x in w:
        v = v @ T[x]
    p = v @ right
    return p, (v / p if p > 0 else None)


def myopic_entropies(T, eta0, right, N):
    V = T.shape[0]
    out = []
    for n in range(N + 1):
        h = 0.0
        for w in words(V, n):
            p, b = word_prob_and_belief(T, eta0, right, w)
            if p <= 1e-15:
                continue
            q = np.array([b @ T[x] @ right for x in range(V)])
            q = q[q > 0]
            h += p * -(q * np.log(q)).sum()
        out.append(h)
    return np.array(out)


def z1r_T():
    """Zero-one-random transfer matrices, states (S0, S1, SR)."""
    T = np.zeros((2, 3, 3))
    T[0, 0, 1] = T[1, 1, 2] = 1.0
    T[0, 2, 0] = T[1, 2, 0] = 0.5
    return T


def all_word_probs(process, length):
    """Pr(w) for every word of the given length, first symbol most significant, float64."""
    T = np.asarray(process.T, np.float64)
    v = np.asarray(process.eta0, np.float64)[None, :]
    for _ in range(length):
        v = np.einsum("wi,xij->wxj", v, T).reshape(-1, T.shape[-1])
    return v @ np.asarray(process.right, np.float64)


def tree_leaves_np(tree):
    import equinox as eqx
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def assert_trees_equal(a, b):
    la, lb = tree_leaves_np(a), tree_leaves_np(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def small_process(kind):
    """``(T, eta0, right)`` of a tiny test process: a random HMM, a random GHMM or Z1R."""
    rng = np.random.default_rng(0)
    if kind == "hmm":
        T = random_hmm(rng, 3, 3)
        return T, stationary(T), np.ones(3)
    if kind == "ghmm":
        return random_ghmm(rng, 2, 3)
    return z1r_T(), np.ones(3) / 3, np.ones(3)
