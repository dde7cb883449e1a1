import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

SITE = "blocks.1.hook_resid_post"


def _model(key, vocab=4, n_ctx=6, d_model=16):
    cfg = sfpjax.TransformerConfig(vocab_size=vocab, n_ctx=n_ctx, d_model=d_model, n_heads=2, d_mlp=32)
    # A larger init so the random model's predictions depend on its input.
    return sfpjax.Transformer(cfg, key=key), cfg


# --- intervention functions ---------------------------------------------------------------


def test_add_vector_respects_mask_and_scale():
    a = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    v = jnp.array([1.0, -1.0, 0.5, 0.0], jnp.float32)
    iv = sfpjax.steer_add(v, 2.0, position_mask=sfpjax.position_mask_at(3, [0, 2]))
    out = iv.apply(SITE, a)
    np.testing.assert_allclose(out[0], a[0] + 2 * v)
    np.testing.assert_allclose(out[1], a[1])
    np.testing.assert_allclose(out[2], a[2] + 2 * v)


def test_add_vector_preserve_norm_keeps_norm_and_moves_direction():
    a = jnp.array([[3.0, 4.0, 0.0]], jnp.float32)
    iv = sfpjax.steer_add(jnp.array([0.0, 0.0, 10.0], jnp.float32), 1.0, preserve_norm=True)
    out = iv.apply(SITE, a)
    np.testing.assert_allclose(jnp.linalg.norm(out[0]), 5.0, rtol=1e-6)
    expected = jnp.array([3.0, 4.0, 10.0]) * 5.0 / jnp.linalg.norm(jnp.array([3.0, 4.0, 10.0]))
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_ablation_removes_projection_and_set_projection_sets_it():
    a = jr.normal(jr.key(1), (5, 6), jnp.float32)
    d = jr.normal(jr.key(2), (6,), jnp.float32)
    u = d / jnp.linalg.norm(d)
    out = sfpjax.steer_ablate(d).apply(SITE, a)
    np.testing.assert_allclose(out @ u, 0.0, atol=1e-5)
    # Orthogonal part untouched.
    np.testing.assert_allclose(out, a - (a @ u)[:, None] * u[None, :], atol=1e-6)
    out = sfpjax.steer_set_projection(d, 2.5).apply(SITE, a)
    np.testing.assert_allclose(out @ u, 2.5, rtol=1e-5)
    np.testing.assert_allclose(out - (out @ u)[:, None] * u[None, :], a - (a @ u)[:, None] * u[None, :], atol=1e-5)
    norm_kept = sfpjax.steer_ablate(d, preserve_norm=True).apply(SITE, a)
    np.testing.assert_allclose(jnp.linalg.norm(norm_kept, axis=-1), jnp.linalg.norm(a, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(norm_kept @ u, 0.0, atol=1e-5)


def test_constructors_reject_bad_inputs():
    with pytest.raises(ValueError, match="must be a float array"):
        sfpjax.steer_add(jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="scale must be a scalar"):
        sfpjax.steer_add(jnp.zeros(4), jnp.ones(3))
    with pytest.raises(ValueError, match="position_mask must be a bool"):
        sfpjax.steer_add(jnp.zeros(4), position_mask=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        sfpjax.position_mask_at(3, 5)


# --- sweeps ---------------------------------------------------------------------------------


def test_vector_of_the_wrong_width_is_named_not_broadcast(getkey):
    model, cfg = _model(getkey())
    tokens = jnp.array([0, 1, 2])
    for width in (1, cfg.d_model - 1):
        for iv in (sfpjax.steer_add(jnp.ones(width)), sfpjax.steer_ablate(jnp.ones(width)),
                   sfpjax.steer_set_projection(jnp.ones(width), 1.0)):
            with pytest.raises(ValueError, match=rf"width {width}, but .* width {cfg.d_model}"):
                model(tokens, interventions={SITE: iv})
            with pytest.raises(ValueError, match=rf"width {width}"):
                jax.jit(lambda t, iv=iv: model(t, interventions={SITE: iv}))(tokens)
    per_position = sfpjax.steer_add(jnp.ones((2, cfg.d_model)))
    with pytest.raises(ValueError, match="2 rows, but the activation has 3 positions"):
        model(tokens, interventions={SITE: per_position})


def test_nan_vector_is_refused_before_it_makes_nan_logits(getkey):
    model, cfg = _model(getkey())
    # The centroid of an empty class: what a mean over zero rows gives.
    empty = np.full((cfg.d_model,), np.nan, np.float32)
    for build in (sfpjax.steer_add, sfpjax.steer_ablate, lambda v: sfpjax.steer_set_projection(v, 0.0)):
        with pytest.raises(ValueError, match=r"16 non-finite entries .*FactorCentroids.classes"):
            build(empty)
    tokens = jnp.zeros((3, 6), jnp.int32)
    vectors = np.zeros((3, cfg.d_model), np.float32)
    vectors[1, 4] = np.inf
    with pytest.raises(ValueError, match=r"vectors has 1 non-finite entries .*\(rows \[1\]\)"):
        sfpjax.steering_sweep(model, tokens, SITE, vectors, jnp.ones(2))
    # Traced vectors (a vmap or jit over them) are checked when applied.
    def logits(v):
        return model(tokens[0], interventions={SITE: sfpjax.Intervention(sfpjax.add_vector, {"vector": v, "scale": 1.0})})

    with pytest.raises(Exception, match="steering vector is not finite"):
        jax.block_until_ready(jax.jit(logits)(jnp.asarray(empty)))
    assert np.isfinite(np.asarray(jax.jit(logits)(jnp.ones(cfg.d_model)))).all()


def test_vmapped_sweep_equals_python_loop(getkey):
    model, cfg = _model(getkey())
    tokens = jr.randint(getkey(), (5, 6), 0, 4)
    v = jr.normal(getkey(), (cfg.d_model,), jnp.float32)
    scales = jnp.array([0.0, 0.5, 1.0, 3.0], jnp.float32)
    swept = sfpjax.steering_sweep(model, tokens, SITE, v, scales)
    mask = sfpjax.position_mask_at(6, -1)
    for i, s in enumerate(scales):
        for b in range(tokens.shape[0]):
            logits = model(tokens[b], interventions={SITE: sfpjax.steer_add(v, s, position_mask=mask)})
            np.testing.assert_allclose(swept[i, b], jax.nn.softmax(logits[-1]), rtol=1e-5, atol=1e-6)
    # One vector per sequence gives the same as each vector alone.
    vs = jr.normal(getkey(), (5, cfg.d_model), jnp.float32)
    per_seq = sfpjax.steering_sweep(model, tokens, SITE, vs, scales)
    alone = sfpjax.steering_sweep(model, tokens[2:3], SITE, vs[2], scales)
    np.testing.assert_allclose(per_seq[:, 2], alone[:, 0], rtol=1e-5, atol=1e-6)


def test_sweep_does_not_retrace_for_new_vectors_and_scales(getkey):
    model, cfg = _model(getkey())
    tokens = jr.randint(getkey(), (3, 6), 0, 4)
    from sfpjax.analysis._steering import _sweep

    sfpjax.steering_sweep(model, tokens, SITE, jnp.zeros(cfg.d_model), jnp.zeros(2))
    before = _sweep._cached._cache_size()
    sfpjax.steering_sweep(model, tokens, SITE, jnp.ones(cfg.d_model), jnp.ones(2))
    assert _sweep._cached._cache_size() == before


def test_sweep_rejects_bad_shapes(getkey):
    model, cfg = _model(getkey())
    tokens = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="vectors must have shape"):
        sfpjax.steering_sweep(model, tokens, SITE, jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="Unknown site"):
        sfpjax.steering_sweep(model, tokens, "blocks.9.hook_resid_post", jnp.zeros(cfg.d_model), jnp.zeros(2))
    with pytest.raises(ValueError, match="scales must be a 1-D"):
        sfpjax.steering_sweep(model, tokens, SITE, jnp.zeros(cfg.d_model), jnp.zeros((2, 2)))


# --- metrics --------------------------------------------------------------------------------


def test_kl_and_marginals_known_values():
    q = jnp.array([0.1, 0.2, 0.3, 0.4], jnp.float64)
    m0, m1 = sfpjax.factor_token_marginals(q, (2, 2))
    np.testing.assert_allclose(m0, [0.3, 0.7])
    np.testing.assert_allclose(m1, [0.4, 0.6])
    p = jnp.array([0.5, 0.5], jnp.float64)
    r = jnp.array([0.25, 0.75], jnp.float64)
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(sfpjax.kl_divergence(p, r), expected)
    assert float(sfpjax.kl_divergence(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))) == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="multiply to the joint vocabulary"):
        sfpjax.factor_token_marginals(q, (3, 2))


def test_steering_kls_on_product_distributions():
    a, b, a2 = np.array([0.2, 0.8]), np.array([0.6, 0.4]), np.array([0.9, 0.1])
    orig = jnp.asarray(np.kron(a, b))
    steered = jnp.asarray(np.kron(a2, b))  # only factor 0 changed
    kls = sfpjax.steering_kls(steered, orig, jnp.asarray(a2), (2, 2), 0)
    np.testing.assert_allclose(kls.target, 0.0, atol=1e-12)
    np.testing.assert_allclose(kls.steered, np.sum(a2 * np.log(a2 / a)))
    np.testing.assert_allclose(kls.unsteered, 0.0, atol=1e-12)
    assert float(sfpjax.specificity_ratio(1.0, 0.0)) == np.inf


def test_zero_vector_gives_zero_kl(getkey):
    model, cfg = _model(getkey())
    tokens = jr.randint(getkey(), (4, 6), 0, 4)
    out = sfpjax.evaluate_steering(
        model, tokens, SITE, jnp.zeros(cfg.d_model), jnp.array([0.0, 1.0, 5.0]),
        factor=0, vocab_sizes=(2, 2), target_marginal=jnp.array([0.5, 0.5]),
    )
    np.testing.assert_allclose(out.kl_steered, 0.0, atol=1e-7)
    np.testing.assert_allclose(out.kl_unsteered, 0.0, atol=1e-7)


def _independent_factor_model(key):
    """A transformer whose joint logits are a sum of two per-factor parts of the final
    normalized residual: logit(x0, x1) = h[:4] . U0[:, x0] + h[4:8] . U1[:, x1]."""
    model, cfg = _model(key, vocab=4, d_model=16)
    k0, k1 = jr.split(jr.fold_in(key, 7))
    U0 = 3.0 * jr.normal(k0, (4, 2), jnp.float32)
    U1 = 3.0 * jr.normal(k1, (4, 2), jnp.float32)
    W = jnp.zeros((16, 4), jnp.float32)
    for x0 in range(2):
        for x1 in range(2):
            W = W.at[:4, 2 * x0 + x1].set(U0[:, x0]).at[4:8, 2 * x0 + x1].set(U1[:, x1])
    return eqx.tree_at(lambda m: m.W_U, model, W), cfg


def test_steering_one_factor_of_an_independent_model_leaves_the_other_untouched(getkey):
    model, cfg = _independent_factor_model(getkey())
    tokens = jr.randint(getkey(), (6, 6), 0, 4)
    v0 = jnp.zeros(16, jnp.float32).at[:4].set(jr.normal(getkey(), (4,), jnp.float32))
    out = sfpjax.evaluate_steering(
        model, tokens, "ln_final.hook_normalized", v0, jnp.array([0.5, 1.0, 3.0]),
        factor=0, vocab_sizes=(2, 2), target_marginal=jnp.array([0.5, 0.5]),
    )
    assert float(out.kl_steered[-1]) > 1e-2
    np.testing.assert_allclose(out.kl_unsteered, 0.0, atol=1e-6)
    # The same vector, read as steering factor 1, has zero effect on "its" factor.
    out1 = sfpjax.evaluate_steering(
        model, tokens, "ln_final.hook_normalized", v0, jnp.array([1.0]),
        factor=1, vocab_sizes=(2, 2), target_marginal=jnp.array([0.5, 0.5]),
    )
    np.testing.assert_allclose(out1.kl_steered, 0.0, atol=1e-6)


def test_final_layer_norm_undoes_preserve_norm_and_spreads_a_one_factor_vector(getkey):
    model, cfg = _independent_factor_model(getkey())
    # Residuals far above the LayerNorm's epsilon (1e-5), as in a trained model; at the
    # initialization scale the epsilon itself would make the LayerNorm scale-dependent.
    model = eqx.tree_at(lambda m: (m.W_E, m.W_pos), model, (100.0 * model.W_E, 100.0 * model.W_pos))
    tokens = jr.randint(getkey(), (6, 6), 0, 4)
    v0 = jnp.zeros(16, jnp.float32).at[:4].set(2.0 * jr.normal(getkey(), (4,), jnp.float32))
    scales = jnp.array([0.5, 1.0, 3.0])
    plain = sfpjax.steering_sweep(model, tokens, SITE, v0, scales)
    kept = sfpjax.steering_sweep(model, tokens, SITE, v0, scales, preserve_norm=True)
    # The final LayerNorm divides by the residual's scale, so rescaling it first changes nothing.
    np.testing.assert_allclose(kept, plain, atol=1e-4)
    # Before the LayerNorm the same factor-0 vector shifts the mean and the scale of the whole
    # residual, so factor 1's logits move too; after it (previous test) they do not.
    out = sfpjax.evaluate_steering(model, tokens, SITE, v0, scales, factor=0, vocab_sizes=(2, 2),
                                   target_marginal=jnp.array([0.5, 0.5]))
    assert float(out.kl_unsteered[-1]) > 1e-4


def test_exact_kls_and_token_classes_in_sweep(getkey):
    model, cfg = _model(getkey())
    tokens = jr.randint(getkey(), (3, 6), 0, 4)
    exact = jnp.full((3, 4), 0.25, jnp.float32)
    t = np.array([True, False, False, False])
    f = np.array([False, False, False, True])
    out = sfpjax.evaluate_steering(
        model, tokens, SITE, jnp.zeros(cfg.d_model), jnp.array([1.0]), factor=1, vocab_sizes=(2, 2),
        target_marginal=jnp.array([0.5, 0.5]), exact_target_marginal=jnp.array([0.5, 0.5]),
        exact_probs=exact, token_classes=(t, f),
    )
    probs = sfpjax.steering_sweep(model, tokens, SITE, jnp.zeros(cfg.d_model), jnp.array([1.0]))[0]
    q0 = sfpjax.factor_token_marginals(probs, (2, 2))[0]
    np.testing.assert_allclose(out.kl_unsteered_exact[0], sfpjax.kl_divergence(jnp.full(2, 0.5), q0).mean(), rtol=1e-4)
    total = out.target_mass + out.allowed_mass + out.forbidden_mass
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.forbidden_mass[0], probs[:, 3].mean(), rtol=1e-5)


def test_sector_token_classes_for_the_cross_sector_blocks():
    sfp = sfpjax.partitioned_z1r_sfp()
    S0, S1, SR = np.eye(3)
    # P10: factor 0 pushed into span{S1, SR}, factor 1 stays at S0 (emits 0 only).
    tgt, forb = sfpjax.sector_token_classes(sfp.factors, sfp.sectors, (1, 0), [SR, S0])
    assert tgt.tolist() == [True, False, True, False]      # A=(0,0), C=(1,0)
    assert forb.tolist() == [False, True, False, True]     # x_1 = 1 impossible
    tgt, forb = sfpjax.sector_token_classes(sfp.factors, sfp.sectors, (0, 1), [S0, S1])
    assert tgt.tolist() == [False, True, False, False]     # B=(0,1)
    assert forb.tolist() == [False, False, True, True]     # x_0 = 1 impossible
    with pytest.raises(ValueError, match="outside sector"):
        sfpjax.sector_token_classes(sfp.factors, sfp.sectors, (0, 1), [S1, S1])
    with pytest.raises(ValueError, match="overlap"):
        sfpjax.token_class_masses(jnp.full(4, 0.25), jnp.ones(4, bool), jnp.ones(4, bool))


# --- extraction -----------------------------------------------------------------------------


def test_factor_centroids_average_over_the_other_factor():
    rng = np.random.default_rng(0)
    a_states = rng.integers(0, 3, 300)
    b_states = rng.integers(0, 3, 300)
    joint = np.zeros((300, 9))
    joint[np.arange(300), 3 * a_states + b_states] = 1.0
    dirs_a, dirs_b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    acts = dirs_a[a_states] + dirs_b[b_states]
    fc = sfpjax.factor_centroids(acts, joint, (3, 3), 0)
    assert fc.centroids.shape == (3, 5) and fc.counts.sum() == 300
    v = sfpjax.centroid_vector(fc, np.eye(3)[0], np.eye(3)[2])
    mean_b = lambda k: dirs_b[b_states[a_states == k]].mean(0)
    np.testing.assert_allclose(v, dirs_a[2] - dirs_a[0] + mean_b(2) - mean_b(0), atol=1e-12)
    with pytest.raises(ValueError, match="no belief class"):
        fc.index([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="factor must be in range"):
        sfpjax.factor_centroids(acts, joint, (3, 3), 2)


def test_difference_in_means_and_label_means():
    np.testing.assert_allclose(sfpjax.difference_in_means(np.ones((2, 3)), np.zeros((4, 3))), np.ones(3))
    mu, n = sfpjax.label_means(np.array([[1.0], [3.0], [10.0]]), np.array([0, 0, 1]), 3)
    np.testing.assert_allclose(mu.ravel(), [2.0, 10.0, 0.0])
    np.testing.assert_allclose(n, [2, 1, 0])
    with pytest.raises(ValueError, match="same trailing width"):
        sfpjax.difference_in_means(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="labels must lie"):
        sfpjax.label_means(np.ones((2, 1)), np.array([0, 5]), 2)


def test_belief_state_delta_changes_one_marginal_through_the_probe():
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(3), 200)
    b = rng.dirichlet(np.ones(3), 200)
    joint = (a[:, :, None] * b[:, None, :]).reshape(200, 9)
    A = rng.normal(size=(9, 20))
    acts = joint @ A + rng.normal(size=20)
    probe = sfpjax.fit_probe(jnp.asarray(acts), jnp.asarray(joint))
    target = jnp.array([0.0, 1.0, 0.0])
    dx = sfpjax.belief_state_delta(probe, jnp.asarray(acts[:5]), (3, 3), 0, target)
    new = probe(jnp.asarray(acts[:5]) + dx)
    m0, m1 = sfpjax.factor_marginals(new, (3, 3))
    np.testing.assert_allclose(m0, np.broadcast_to(target, (5, 3)), atol=1e-6)
    np.testing.assert_allclose(m1, b[:5], atol=1e-6)
    with pytest.raises(ValueError, match="fit the probe on joint beliefs"):
        sfpjax.belief_state_delta(probe, jnp.asarray(acts[:5]), (3, 2), 0, target)
    with pytest.raises(ValueError, match="target must have shape"):
        sfpjax.belief_state_delta(probe, jnp.asarray(acts[:5]), (3, 3), 0, jnp.ones(2))


def test_belief_state_delta_with_a_generative_decoder():
    rng = np.random.default_rng(2)
    a = rng.dirichlet(np.ones(3), 300)
    b = rng.dirichlet(np.ones(3), 300)
    joint = (a[:, :, None] * b[:, None, :]).reshape(300, 9)
    A = rng.normal(size=(9, 20))
    acts = joint @ A + rng.normal(size=20)
    probe = sfpjax.fit_probe(jnp.asarray(acts), jnp.asarray(joint))
    decoder = sfpjax.fit_probe(jnp.asarray(joint), jnp.asarray(acts))
    target = jnp.array([0.0, 0.0, 1.0])
    x = jnp.asarray(acts[:6])
    dx = sfpjax.belief_state_delta(probe, x, (3, 3), 1, target, decoder=decoder)
    # The activations are affine in the belief, so the decoder's change is the exact change of
    # the mean activation: (eta' - eta) A with eta' = a (x) target.
    moved = (a[:6, :, None] * np.asarray(target)[None, None, :]).reshape(6, 9)
    np.testing.assert_allclose(dx, (moved - joint[:6]) @ A, atol=2e-3)
    m0, m1 = sfpjax.factor_marginals(probe(x + dx), (3, 3))
    np.testing.assert_allclose(m0, a[:6], atol=1e-4)
    np.testing.assert_allclose(m1, np.broadcast_to(target, (6, 3)), atol=1e-4)
    # The pseudo-inverse reaches the same probe reading with the smallest possible change.
    dx_pinv = sfpjax.belief_state_delta(probe, x, (3, 3), 1, target)
    np.testing.assert_allclose(probe(x + dx_pinv), probe(x + dx), atol=1e-4)
    assert np.all(np.linalg.norm(dx_pinv, axis=-1) <= np.linalg.norm(dx, axis=-1) + 1e-5)
    with pytest.raises(ValueError, match="decoder must map joint beliefs"):
        sfpjax.belief_state_delta(probe, x, (3, 3), 1, target, decoder=probe)


# --- steering methods, classes and symmetries ---------------------------------------------


def test_synchronized_classes_need_a_pure_belief_and_rows_in_both_sets():
    beliefs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    fc = sfpjax.FactorCentroids(np.zeros((4, 2)), beliefs, np.array([5.0, 5.0, 5.0, 1.0]), 0, 1e-6)
    ev = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 1 + [[0, 0.5, 0.5]] * 4 + [[0, 0, 1.0]] * 4)
    got = sfpjax.synchronized_classes(fc, ev, 2)
    # [0, 1, 0] has one eval row, [0, .5, .5] is not pure, [0, 0, 1] has one fitting row.
    assert [b.tolist() for b, _ in got] == [[1.0, 0.0, 0.0]]
    np.testing.assert_array_equal(got[0][1], np.arange(12) < 3)
    assert len(sfpjax.synchronized_classes(fc, ev, 1)) == 3
    with pytest.raises(ValueError, match=r"eval_marginals must have shape \(n, 3\)"):
        sfpjax.synchronized_classes(fc, ev[:, :2], 1)


def test_factor_swap_symmetry_and_belief_sector():
    z = sfpjax.z1r()
    assert sfpjax.factor_swap_symmetric(sfpjax.product(z, z), (3, 3), (2, 2))
    assert sfpjax.factor_swap_symmetric(sfpjax.partitioned_z1r_sfp(0.5).process, (3, 3), (2, 2))
    assert not sfpjax.factor_swap_symmetric(sfpjax.product(z, sfpjax.z1r(0.3)), (3, 3), (2, 2))
    assert not sfpjax.factor_swap_symmetric(sfpjax.product(z, sfpjax.coin(0.5)), (3, 1), (2, 2))
    with pytest.raises(ValueError, match="do not match"):
        sfpjax.factor_swap_symmetric(sfpjax.product(z, z), (3, 2), (2, 2))
    sectors = [[0], [1, 2]]
    assert sfpjax.belief_sector([1.0, 0.0, 0.0], sectors) == 0
    assert sfpjax.belief_sector([0.0, 0.2, 0.8], sectors) == 1
    assert sfpjax.belief_sector([0.1, 0.9, 0.0], sectors) is None


def test_steering_vectors_are_the_methods_own_formulas(getkey):
    z = sfpjax.z1r()
    joint = sfpjax.product(z, z)
    toks = sfpjax.sample(joint, key=getkey(), batch_size=300, seq_len=6)
    beliefs = np.asarray(sfpjax.filter_beliefs(joint, toks).beliefs[:, -1], np.float64)
    acts = beliefs @ np.asarray(jr.normal(getkey(), (9, 8)), np.float64) + 0.01 * np.asarray(jr.normal(getkey(), (300, 8)))
    ln_acts = acts[:, :5]
    fc = sfpjax.factor_centroids(acts, beliefs, (3, 3), 1)
    fc_ln = sfpjax.factor_centroids(ln_acts, beliefs, (3, 3), 1)
    mu, _ = sfpjax.label_means(acts, np.asarray(sfpjax.decode_tokens(toks[:, -1], (2, 2))[1]), 2)
    probe, decoder = sfpjax.fit_probe(acts, beliefs), sfpjax.fit_probe(beliefs, acts)
    s, t = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    vs = sfpjax.steering_vectors(1, s, t, factor_process=z, centroids=fc, ln_centroids=fc_ln, label_means=mu,
                                 joint_probe=probe, decoder=decoder, acts=acts, factor_dims=(3, 3))
    assert list(vs) == list(sfpjax.STEERING_METHODS)
    assert {m.site for m in sfpjax.STEERING_METHODS.values()} == {"resid", "ln_final"}
    assert [k for k, m in sfpjax.STEERING_METHODS.items() if m.preserve_norm] == ["centroid-norm"]
    np.testing.assert_allclose(vs["centroid"], np.broadcast_to(sfpjax.centroid_vector(fc, s, t), (300, 8)), rtol=1e-6)
    np.testing.assert_array_equal(vs["centroid-norm"], vs["centroid"])
    assert vs["centroid-ln"].shape == (300, 5)
    p_s = np.asarray(sfpjax.next_token_probs(z, jnp.asarray(s, jnp.float32)), np.float64)
    p_t = np.asarray(sfpjax.next_token_probs(z, jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(vs["diff-means"][0], (p_t - p_s) @ mu, rtol=1e-5, atol=1e-6)
    x = jnp.asarray(acts, jnp.float32)
    np.testing.assert_allclose(vs["belief-pinv"], sfpjax.belief_state_delta(probe, x, (3, 3), 1, jnp.asarray(t, jnp.float32)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"label_means must be \(2, 8\)"):  # one row per symbol of factor 1
        sfpjax.steering_vectors(1, s, t, factor_process=z, centroids=fc, ln_centroids=fc_ln, label_means=np.vstack([mu, mu[:1]]),
                                joint_probe=probe, decoder=decoder, acts=acts, factor_dims=(3, 3))
