import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax


def _synthetic(n=300, d=3, d_act=8, noise=1e-9, seed=0):
    """Activations acts = beliefs @ A + c + noise with known A (float64)."""
    rng = np.random.default_rng(seed)
    beliefs = rng.dirichlet(np.ones(d), size=n)
    A = rng.normal(size=(d, d_act))
    c = rng.normal(size=(d_act,))
    acts = beliefs @ A + c + noise * rng.normal(size=(n, d_act))
    return acts, beliefs, A, c


def test_probe_recovers_linear_embedding():
    acts, beliefs, _, _ = _synthetic()
    probe = sfpjax.fit_probe(acts, beliefs)
    assert probe.W.shape == (8, 3) and probe.b.shape == (3,)
    assert probe.W.dtype == jnp.float64
    assert float(sfpjax.probe_r2(probe, acts, beliefs)) > 1 - 1e-12
    assert float(sfpjax.probe_rmse(probe, acts, beliefs)) < 1e-8
    np.testing.assert_allclose(probe(acts), beliefs, atol=1e-8)
    # Minimum-norm solution: targets on the simplex give W 1 = 0, predictions sum to 1.
    exact = sfpjax.fit_probe(*_synthetic(noise=0.0)[:2])
    np.testing.assert_allclose(exact.W.sum(-1), 0.0, atol=1e-12)


def test_probe_batch_axes_and_float32_dtype():
    acts, beliefs, _, _ = _synthetic(n=240)
    probe = sfpjax.fit_probe(acts.reshape(4, 60, 8).astype(np.float32), beliefs.reshape(4, 60, 3))
    assert probe.W.dtype == jnp.float32
    pred = probe.predict(jnp.asarray(acts.reshape(2, 2, 60, 8), jnp.float32))
    assert pred.shape == (2, 2, 60, 3)
    np.testing.assert_allclose(pred.reshape(-1, 3), beliefs, atol=1e-4)


def test_probe_inverse_round_trip():
    acts, beliefs, _, _ = _synthetic(noise=0.0)
    probe = sfpjax.fit_probe(acts, beliefs)
    # Tangent directions of the simplex lie in the probe's row space: reached exactly.
    delta = jnp.array([[0.1, -0.05, -0.05], [-0.2, 0.0, 0.2]])
    dx = sfpjax.probe_inverse(probe, delta)
    assert dx.shape == (2, 8)
    np.testing.assert_allclose(probe(acts[:2] + dx) - probe(acts[:2]), delta, atol=1e-10)
    # Minimum norm: dx lies in the column space of W (orthogonal to its null space).
    _, s, Vt = np.linalg.svd(np.asarray(probe.W).T)
    null = Vt[int(np.sum(s > 1e-10)) :]
    np.testing.assert_allclose(np.asarray(dx) @ null.T, 0.0, atol=1e-10)
    # A change of total mass is not in the row space: its projection is reached instead.
    dx1 = sfpjax.probe_inverse(probe, jnp.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(dx1 @ probe.W, 0.0, atol=1e-10)
    # The same under jit and vmap.
    f = jax.jit(jax.vmap(sfpjax.probe_inverse, in_axes=(None, 0)))
    np.testing.assert_allclose(f(probe, delta), dx, atol=1e-12)


def test_weighted_fit_equals_repeated_rows():
    acts, beliefs, _, _ = _synthetic(n=40, noise=0.3, seed=1)
    counts = np.random.default_rng(2).integers(0, 4, size=40)
    counts[0] = 1
    weighted = sfpjax.fit_probe(acts, beliefs, weights=counts.astype(np.float64), ridge=0.1)
    repeated = sfpjax.fit_probe(np.repeat(acts, counts, 0), np.repeat(beliefs, counts, 0), ridge=0.1)
    np.testing.assert_allclose(weighted.W, repeated.W, atol=1e-10)
    np.testing.assert_allclose(weighted.b, repeated.b, atol=1e-10)
    r2w = sfpjax.probe_r2(weighted, acts, beliefs, weights=counts.astype(np.float64))
    r2r = sfpjax.probe_r2(weighted, np.repeat(acts, counts, 0), np.repeat(beliefs, counts, 0))
    np.testing.assert_allclose(r2w, r2r, rtol=1e-12)


def test_ridge_shrinks_weights_and_leaves_intercept_free():
    acts, beliefs, _, _ = _synthetic(n=100, noise=0.1)
    norms = [float(jnp.linalg.norm(sfpjax.fit_probe(acts, beliefs, ridge=r).W)) for r in (0.0, 1.0, 1e3)]
    assert norms[0] > norms[1] > norms[2]
    huge = sfpjax.fit_probe(acts, beliefs, ridge=1e12)
    np.testing.assert_allclose(huge.b, beliefs.mean(0), atol=1e-6)


def test_dedupe_equals_fit_on_class_averages():
    rng = np.random.default_rng(3)
    classes = rng.dirichlet(np.ones(3), size=6)
    labels = np.concatenate([np.arange(6), rng.integers(0, 6, size=54)])
    beliefs = classes[labels] + 1e-9 * rng.normal(size=(60, 3))  # within atol of the class
    acts = rng.normal(size=(60, 5))
    w = rng.uniform(0.1, 1.0, size=60)
    probe = sfpjax.fit_probe(acts, beliefs, weights=w, dedupe=True)
    cents = np.stack([np.average(acts[labels == k], axis=0, weights=w[labels == k]) for k in range(6)])
    tot = np.array([w[labels == k].sum() for k in range(6)])
    manual = sfpjax.fit_probe(cents, classes, weights=tot)
    np.testing.assert_allclose(probe.W, manual.W, atol=1e-7)
    np.testing.assert_allclose(probe.b, manual.b, atol=1e-7)
    C, E, Wk = sfpjax.belief_centroids(acts, beliefs, weights=w)
    assert C.shape == (6, 5) and E.shape == (6, 3)
    order = [int(np.argmin(np.abs(classes - e).sum(-1))) for e in E]
    np.testing.assert_allclose(C, cents[order], atol=1e-12)
    np.testing.assert_allclose(Wk, tot[order], atol=1e-12)


def test_r2_of_constant_predictor_is_zero_and_worse_is_negative():
    _, beliefs, _, _ = _synthetic(n=50, noise=0.0)
    acts = np.zeros((50, 2))
    mean_probe = sfpjax.LinearProbe(np.zeros((2, 3)), beliefs.mean(0))
    assert abs(float(sfpjax.probe_r2(mean_probe, acts, beliefs))) < 1e-12
    off = sfpjax.LinearProbe(np.zeros((2, 3)), beliefs.mean(0) + 0.3)
    assert float(sfpjax.probe_r2(off, acts, beliefs)) < 0
    # Weighted mean is the weighted constant predictor.
    w = np.linspace(0.1, 2.0, 50)
    wmean = sfpjax.LinearProbe(np.zeros((2, 3)), np.average(beliefs, axis=0, weights=w))
    assert abs(float(sfpjax.probe_r2(wmean, acts, beliefs, weights=w))) < 1e-12
    # R^2 is variance-weighted over dimensions (scikit-learn's "variance_weighted").
    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 2)) * np.array([1.0, 3.0])
    p = y + rng.normal(size=(30, 2)) * 0.5
    ident = sfpjax.LinearProbe(np.eye(2), np.zeros(2))
    expected = 1 - ((y - p) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    np.testing.assert_allclose(sfpjax.probe_r2(ident, p, y), expected, rtol=1e-12)
    np.testing.assert_allclose(sfpjax.probe_rmse(ident, p, y), np.sqrt(((y - p) ** 2).mean()), rtol=1e-12)


def test_metrics_under_jit():
    acts, beliefs, _, _ = _synthetic(n=50, noise=0.05)
    probe = sfpjax.fit_probe(acts, beliefs)
    r2 = jax.jit(sfpjax.probe_r2)(probe, acts, beliefs)
    np.testing.assert_allclose(r2, sfpjax.probe_r2(probe, acts, beliefs), rtol=1e-12)
    const = jax.jit(sfpjax.probe_r2)(probe, acts, jnp.ones((50, 3)))
    assert bool(jnp.isnan(const))


def test_train_test_split_and_evaluate():
    acts, beliefs, _, _ = _synthetic(n=100, noise=1e-3)
    key = jr.key(0)
    xtr, xte, ytr, yte = sfpjax.train_test_split(acts, beliefs, key=key, test_fraction=0.25)
    assert xtr.shape == (75, 8) and xte.shape == (25, 8) and ytr.shape == (75, 3)
    # Rows stay paired and the parts partition the data.
    allx = np.concatenate([xtr, xte])
    assert sorted(map(tuple, allx.round(12))) == sorted(map(tuple, acts.round(12)))
    probe = sfpjax.fit_probe(xtr, ytr)
    m = sfpjax.evaluate_probe(probe, xte, yte)
    assert isinstance(m, sfpjax.ProbeMetrics)
    assert m.n == 25 and m.r2 > 0.999 and 0 < m.rmse < 1e-2
    # Same key, same split; another key, another split.
    again = sfpjax.train_test_split(acts, key=key, test_fraction=0.25)
    np.testing.assert_array_equal(again[1], xte)
    other = sfpjax.train_test_split(acts, key=jr.key(1), test_fraction=0.25)
    assert not np.array_equal(other[1], xte)


def test_concat_sites():
    acts = {
        "blocks.0.hook_resid_post": jnp.zeros((2, 5, 4)),
        "blocks.1.hook_resid_post": jnp.ones((2, 5, 3)),
    }
    out = sfpjax.concat_sites(acts, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"])
    assert out.shape == (2, 5, 7)
    np.testing.assert_array_equal(out[..., :3], 1.0)
    with pytest.raises(ValueError, match="not in the activations; available"):
        sfpjax.concat_sites(acts, ["blocks.2.hook_resid_post"])
    with pytest.raises(ValueError, match="same leading axes"):
        sfpjax.concat_sites({"a": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))}, ["a", "b"])
    with pytest.raises(ValueError, match="single string"):
        sfpjax.concat_sites(acts, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="sites is empty"):
        sfpjax.concat_sites(acts, [])


def test_factor_probes_on_product_states():
    rng = np.random.default_rng(4)
    n = 200
    a = rng.dirichlet(np.ones(2), size=n)
    b = rng.dirichlet(np.ones(3), size=n)
    joint = (a[:, :, None] * b[:, None, :]).reshape(n, 6)  # factor 0 most significant
    Ua = rng.normal(size=(2, 10))
    Ub = rng.normal(size=(3, 10))
    acts = a @ Ua + b @ Ub + 0.5
    pa, pb = sfpjax.fit_factor_probes(acts, joint, [2, 3])
    assert pa.W.shape == (10, 2) and pb.W.shape == (10, 3)
    assert float(sfpjax.probe_r2(pa, acts, a)) > 1 - 1e-10
    assert float(sfpjax.probe_r2(pb, acts, b)) > 1 - 1e-10
    # With dedupe, classes are the factor's own marginal beliefs: on a balanced design
    # the class-i centroid of factor A is Ua[i] + mean_j Ub[j], averaged over factor B.
    ia, ib = np.divmod(np.arange(6 * 5), 3)
    ia = ia % 2
    a_disc, b_disc = np.eye(2)[ia], np.eye(3)[ib]
    joint_disc = (a_disc[:, :, None] * b_disc[:, None, :]).reshape(-1, 6)
    acts_disc = a_disc @ Ua + b_disc @ Ub
    qa, qb = sfpjax.fit_factor_probes(acts_disc, joint_disc, [2, 3], dedupe=True)
    np.testing.assert_allclose(qa(Ua + Ub.mean(0)), np.eye(2), atol=1e-10)
    np.testing.assert_allclose(qb(Ub + Ua.mean(0)), np.eye(3), atol=1e-10)
    with pytest.raises(ValueError, match=r"prod\(factor_dims"):
        sfpjax.fit_factor_probes(acts, joint, [2, 2])


def test_fit_probe_rejects_bad_inputs():
    acts, beliefs, _, _ = _synthetic(n=20)
    with pytest.raises(ValueError, match="same leading"):
        sfpjax.fit_probe(acts[:19], beliefs)
    bad = acts.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="acts has non-finite entries"):
        sfpjax.fit_probe(bad, beliefs)
    badt = beliefs.copy()
    badt[0, 0] = np.inf
    with pytest.raises(ValueError, match="targets has non-finite"):
        sfpjax.fit_probe(acts, badt)
    with pytest.raises(ValueError, match="non-negative"):
        sfpjax.fit_probe(acts, beliefs, weights=-np.ones(20))
    with pytest.raises(ValueError, match="sum to zero"):
        sfpjax.fit_probe(acts, beliefs, weights=np.zeros(20))
    with pytest.raises(ValueError, match="one weight per row"):
        sfpjax.fit_probe(acts, beliefs, weights=np.ones(19))
    with pytest.raises(ValueError, match="ridge must be"):
        sfpjax.fit_probe(acts, beliefs, ridge=-1.0)
    with pytest.raises(ValueError, match="atol must be positive"):
        sfpjax.fit_probe(acts, beliefs, dedupe=True, atol=0.0)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(sfpjax.fit_probe)(acts, beliefs)


def test_probe_and_metric_shape_errors():
    probe = sfpjax.LinearProbe(np.eye(3), np.zeros(3))
    with pytest.raises(ValueError, match="d_act = 3"):
        probe(np.ones((4, 2)))
    with pytest.raises(ValueError, match="b must have shape"):
        sfpjax.LinearProbe(np.eye(3), np.zeros(2))
    with pytest.raises(ValueError, match="d_target = 3"):
        sfpjax.probe_inverse(probe, np.ones(2))
    with pytest.raises(ValueError, match="d_target = 3"):
        sfpjax.probe_r2(probe, np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="zero \\(weighted\\) variance"):
        sfpjax.probe_r2(probe, np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="same first"):
        sfpjax.train_test_split(np.ones((4, 1)), np.ones((5, 1)), key=jr.key(0))
    with pytest.raises(ValueError, match="empty train or test"):
        sfpjax.train_test_split(np.ones((2, 1)), key=jr.key(0), test_fraction=0.1)


def test_subspace_angles():
    rng = np.random.default_rng(5)
    W = rng.normal(size=(6, 3))
    same = sfpjax.subspace_angles(W, W @ rng.normal(size=(3, 3)))  # same column space
    np.testing.assert_allclose(same.angles, 0.0, atol=1e-7)
    assert abs(same.overlap - 1.0) < 1e-12 and same.ranks == (3, 3)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    orth = sfpjax.subspace_angles(Q[:, :2], Q[:, 2:5])
    np.testing.assert_allclose(orth.angles, np.pi / 2, atol=1e-7)
    assert orth.overlap < 1e-12 and orth.angles.shape == (2,)
    # A 45 degree pair, and a vector (steering direction) against a plane.
    v = (Q[:, 0] + Q[:, 2]) / np.sqrt(2)
    r = sfpjax.subspace_angles(v, Q[:, :2])
    np.testing.assert_allclose(r.angles, [np.pi / 4], atol=1e-12)
    np.testing.assert_allclose(r.overlap, 0.5, atol=1e-12)
    # Rank deficiency (e.g. a simplex probe with W 1 = 0) is detected.
    assert sfpjax.subspace_angles(np.c_[W, W[:, :1]], W).ranks == (3, 3)
    with pytest.raises(ValueError, match="same d_act"):
        sfpjax.subspace_angles(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="is zero"):
        sfpjax.subspace_angles(np.zeros((5, 2)), np.ones((5, 2)))


def test_pca_on_a_plane():
    rng = np.random.default_rng(6)
    plane = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 7)) + 3.0
    frac = sfpjax.pca_explained_variance(plane)
    assert frac.shape == (7,)
    np.testing.assert_allclose(frac.sum(), 1.0, rtol=1e-12)
    assert np.all(np.diff(frac) <= 1e-15) and frac[2:].max() < 1e-20
    assert sfpjax.n_components_for_variance(plane, 1.0) == 2
    assert sfpjax.n_components_for_variance(plane.reshape(10, 20, 7), 0.95) in (1, 2)
    noisy = plane + 1e-3 * rng.normal(size=plane.shape)
    assert sfpjax.n_components_for_variance(noisy, 0.999) == 2
    assert sfpjax.n_components_for_variance(noisy, 1.0) == 7
    with pytest.raises(ValueError, match="threshold"):
        sfpjax.n_components_for_variance(plane, 0.0)
    with pytest.raises(ValueError, match="zero variance"):
        sfpjax.pca_explained_variance(np.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        sfpjax.pca_explained_variance(np.ones((1, 3)))


def test_probe_on_exact_mess3_beliefs():
    """End to end with exact beliefs of Mess3: activations = embedding of the belief."""
    p = sfpjax.mess3(0.15, 0.6).astype(jnp.float64)
    tokens = sfpjax.sample(p, key=jr.key(0), batch_size=8, seq_len=12)
    beliefs = np.asarray(sfpjax.filter_beliefs(p, tokens).beliefs)
    A = np.random.default_rng(0).normal(size=(3, 16))
    acts = beliefs @ A
    probe = sfpjax.fit_probe(acts, beliefs, dedupe=True)
    assert float(sfpjax.probe_r2(probe, acts, beliefs)) > 1 - 1e-10
