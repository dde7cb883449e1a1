import numpy as np
import jax.numpy as jnp
import pytest

import sfpjax


def _z1r_T():
    T = np.zeros((2, 3, 3))
    T[0, 0, 1] = 1.0  # S0 emits 0 -> S1
    T[1, 1, 2] = 1.0  # S1 emits 1 -> SR
    T[0, 2, 0] = 0.5
    T[1, 2, 0] = 0.5
    return T


def test_default_dtype_is_float32_and_stationary():
    p = sfpjax.GHMM(_z1r_T(), hmm=True)
    assert p.T.dtype == jnp.float32
    np.testing.assert_allclose(p.eta0, [1 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(p.right, [1.0] * 3)


def test_float64_when_asked():
    p = sfpjax.GHMM(_z1r_T(), dtype=jnp.float64, hmm=True)
    assert p.T.dtype == jnp.float64


def test_general_ghmm_right_eigenvector_inferred():
    # A similarity transform of an HMM is a GHMM with negative entries and the same law.
    T = _z1r_T()
    S = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.3], [0.2, 0.0, 1.0]])
    Si = np.linalg.inv(S)
    Tg = np.einsum("ij,xjk,kl->xil", Si, T, S)
    p = sfpjax.GHMM(Tg, dtype=jnp.float64)
    np.testing.assert_allclose(np.einsum("ij,j->i", Tg.sum(0), p.right), p.right, atol=1e-10)
    np.testing.assert_allclose(p.eta0 @ p.right, 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda T: T[:, :, :2], r"shape \(V, d, d\)"),
        (lambda T: T.at[0, 0, 1].set(jnp.nan) if False else np.where(np.arange(27).reshape(3, 3, 3)[:2] == 1, np.nan, T), "non-finite"),
        (lambda T: T * 1.1, "eigenvector"),
    ],
)
def test_bad_transfer_matrices(mutate, match):
    with pytest.raises(ValueError, match=match):
        sfpjax.GHMM(mutate(_z1r_T()), right=np.ones(3))


def test_hmm_negative_entry_named():
    T = _z1r_T()
    T[0, 2, 0] = 1.5
    T[1, 2, 0] = -0.5
    with pytest.raises(ValueError, match=r"non-negative: T\[1\]\[2, 0\]"):
        sfpjax.GHMM(T, hmm=True)


def test_hmm_row_not_stochastic():
    T = _z1r_T()
    T[0, 2, 0] = 0.7
    with pytest.raises(ValueError, match="row 2"):
        sfpjax.GHMM(T, eta0=np.ones(3) / 3, right=np.ones(3))


def test_eta0_normalization_and_shape():
    with pytest.raises(ValueError, match="<<eta0\\|1>> must equal 1"):
        sfpjax.GHMM(_z1r_T(), eta0=np.array([0.5, 0.5, 0.5]), hmm=True)
    with pytest.raises(ValueError, match=r"eta0 must have shape \(3,\)"):
        sfpjax.GHMM(_z1r_T(), eta0=np.array([0.5, 0.5]), hmm=True)
