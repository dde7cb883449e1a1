import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sfpjax


def _np_entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dims=st.lists(st.integers(1, 3), min_size=2, max_size=3))
def test_marginals_partial_trace_and_information_against_numpy(seed, dims):
    rng = np.random.default_rng(seed)
    joint = rng.dirichlet(np.ones(int(np.prod(dims))), size=2)  # a batch of two
    x = joint.reshape(2, *dims)
    F = len(dims)
    margs = sfpjax.factor_marginals(jnp.asarray(joint), dims)
    for f in range(F):
        want = x.sum(tuple(1 + g for g in range(F) if g != f))
        np.testing.assert_allclose(np.asarray(margs[f]), want, atol=1e-12)
        rho = sfpjax.density_matrix(jnp.asarray(joint))
        np.testing.assert_allclose(
            np.asarray(sfpjax.partial_trace(rho, dims, keep=f)), np.stack([np.diag(w) for w in want]), atol=1e-12
        )
    tc, pair = sfpjax.factor_mutual_information(jnp.asarray(joint), dims)
    for b in range(2):
        hs = [_np_entropy(x[b].sum(tuple(g for g in range(F) if g != f))) for f in range(F)]
        assert float(tc[b]) == pytest.approx(sum(hs) - _np_entropy(joint[b]), abs=1e-10)
        for f in range(F):
            assert float(pair[b, f, f]) == 0.0
            for g in range(F):
                if g != f:
                    pfg = x[b].sum(tuple(k for k in range(F) if k not in (f, g)))
                    assert float(pair[b, f, g]) == pytest.approx(hs[f] + hs[g] - _np_entropy(pfg.ravel()), abs=1e-10)
    # The product of marginals is a product state with the same marginals and zero correlation.
    prod = sfpjax.nearest_product_state(jnp.asarray(joint), dims)
    assert bool(jnp.all(sfpjax.is_product_state(prod, dims, atol=1e-12)))
    tc_prod, _ = sfpjax.factor_mutual_information(prod, dims)
    np.testing.assert_allclose(np.asarray(tc_prod), 0.0, atol=1e-12)
    assert (np.asarray(tc) >= -1e-12).all()


def test_partial_trace_of_general_matrices_keeps_several_factors():
    rng = np.random.default_rng(3)
    dims = (2, 3, 2)
    rho = rng.normal(size=(12, 12))
    t = rho.reshape(*dims, *dims)
    want = np.einsum("abcdbf->acdf", t).reshape(4, 4)
    np.testing.assert_allclose(np.asarray(sfpjax.partial_trace(jnp.asarray(rho), dims, keep=(0, 2))), want)
    np.testing.assert_allclose(np.asarray(sfpjax.partial_trace(jnp.asarray(rho), dims, keep=[0, 1, 2])), rho)


def test_seed_000_afp_state_is_correlated_and_block_diagonal():
    p = 0.6
    sfp = sfpjax.partitioned_z1r_sfp(p, dtype=jnp.float64)
    eta = sfp.process.eta0
    rho = sfpjax.density_matrix(eta)
    rho_a = sfpjax.partial_trace(rho, (3, 3), keep=0)
    np.testing.assert_allclose(np.diag(np.asarray(rho_a)), [p, (1 - p) / 2, (1 - p) / 2], atol=1e-15)
    assert not bool(sfpjax.is_product_state(eta, (3, 3)))
    tc, pair = sfpjax.factor_mutual_information(eta, (3, 3))
    # The sector label is shared exactly: I(A;B) = H(sector) = H_b(p).
    hb = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert float(tc) == pytest.approx(hb, abs=1e-12)
    assert float(pair[0, 1]) == pytest.approx(hb, abs=1e-12)
    w = sfpjax.sector_weights(eta, [[0], [1, 2], [3, 6], [4, 5, 7, 8]])
    np.testing.assert_allclose(np.asarray(w), [p, 0, 0, 1 - p], atol=1e-15)


def test_sector_weights_with_ghmm_right_and_batch():
    T = sfpjax.tom_quantum(dtype=jnp.float64)
    beliefs = jnp.array([[1.0, 0.3, -0.2], [1.0, 0.0, 0.5]], jnp.float64)
    w = sfpjax.sector_weights(beliefs, [[0], [1, 2]], right=T.right)
    np.testing.assert_allclose(np.asarray(w), [[1.0, 0.0], [1.0, 0.0]])


def test_structure_functions_jit_and_vmap():
    joint = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(6), size=4))
    f = jax.jit(lambda j: sfpjax.factor_mutual_information(j, (2, 3))[0])
    np.testing.assert_allclose(np.asarray(f(joint)), np.asarray(jax.vmap(f)(joint)), atol=1e-12)
    m = jax.vmap(lambda j: sfpjax.factor_marginals(j, (2, 3))[1])(joint)
    assert m.shape == (4, 3)


def test_float32_dtype_is_kept():
    joint = jnp.full((4,), 0.25, jnp.float32)
    assert sfpjax.nearest_product_state(joint, (2, 2)).dtype == jnp.float32
    assert sfpjax.factor_mutual_information(joint, (2, 2))[0].dtype == jnp.float32
    assert sfpjax.density_matrix(joint).dtype == jnp.float32


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sfpjax.factor_marginals(jnp.ones(6) / 6, (2, 2)), r"joint dimension 6 must equal the product"),
        (lambda: sfpjax.factor_marginals(jnp.ones(4) / 4, ()), r"non-empty sequence of positive ints"),
        (lambda: sfpjax.factor_marginals(jnp.ones(4) / 4, (2, 2), rights=[jnp.ones(2)]), r"one \|1>> per factor"),
        (lambda: sfpjax.factor_marginals(jnp.ones(4) / 4, (2, 2), rights=[jnp.ones(2), jnp.ones(3)]),
         r"rights\[1\] must have shape \(2,\)"),
        (lambda: sfpjax.partial_trace(jnp.ones((4, 3)), (2, 2), keep=0), r"shape \(\.\.\., D, D\)"),
        (lambda: sfpjax.partial_trace(jnp.eye(4), (2, 2), keep=2), r"keep must name factors in range\(2\)"),
        (lambda: sfpjax.sector_weights(jnp.ones(3) / 3, [[0], [1]]), r"do not cover all 3 states; missing \[2\]"),
        (lambda: sfpjax.sector_weights(jnp.ones(3) / 3, [[0, 1], [1, 2]]), r"sectors overlap: state 1"),
        (lambda: sfpjax.sector_weights(jnp.ones(3) / 3, [[0], [1, 2]], right=jnp.ones(2)),
         r"right must have shape \(3,\)"),
        (lambda: sfpjax.is_product_state(jnp.ones(5) / 5, (2, 2)), r"joint dimension 5"),
        (lambda: sfpjax.factor_mutual_information(jnp.ones(4) / 4, (4, 2)), r"joint dimension 4"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
