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
