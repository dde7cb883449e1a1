import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

SITE = "blocks.0.hook_resid_pre"


def _model(key):
    cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, d_model=8, d_mlp=16, n_layers=1, n_heads=2)
    return sfpjax.Transformer(cfg, key=key)


def test_unchanged_model_has_zero_drift(getkey):
    model = _model(getkey())
    tokens = jr.randint(getkey(), (16, 6), 0, 3)
    h = jnp.stack([sfpjax.mean_activation(model, tokens, SITE)] * 3)
    dirs = sfpjax.random_directions(8, 7, key=getkey())
    np.testing.assert_array_equal(np.asarray(sfpjax.drift_along(h, dirs)), 0.0)
    np.testing.assert_array_equal(np.asarray(sfpjax.activation_norm_drift(h)), 0.0)


def test_known_shift_along_one_trait_gives_that_drift(getkey):
    model = _model(getkey())
    tokens = jr.randint(getkey(), (16, 6), 0, 3)
    acts = np.asarray(jr.normal(getkey(), (200, 8)), np.float64)
    labels = acts[:, 0] > 0
    traits = sfpjax.trait_directions(acts, {"x0": (labels, ~labels), "x1": (acts[:, 1] > 0, acts[:, 1] <= 0)})
    u = traits.vectors[0]
    # Adding v to every positional embedding shifts resid_pre of block 0 by exactly v.
    shift = 0.3 * u
    shifted = eqx.tree_at(lambda m: m.W_pos, model, model.W_pos + jnp.asarray(shift, jnp.float32)[None, :])
    h0 = sfpjax.mean_activation(model, tokens, SITE)
    h1 = sfpjax.mean_activation(shifted, tokens, SITE)
    d = np.asarray(sfpjax.drift_along(jnp.stack([h0, h1]), traits.vectors), np.float64)
    norm0 = float(jnp.linalg.norm(h0))
    expected = 0.3 * (traits.vectors @ u) / norm0
    np.testing.assert_allclose(d[1], expected, rtol=1e-4, atol=1e-6)
    assert d[1, 0] == pytest.approx(0.3 / norm0, rel=1e-4)


def test_trait_direction_is_the_normalized_mean_difference():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(50, 4))
    pos = rng.random(50) < 0.4
    t = sfpjax.trait_directions(acts, {"t": (pos, ~pos)})
    diff = acts[pos].mean(0) - acts[~pos].mean(0)
    np.testing.assert_allclose(t.vectors[0], diff / np.linalg.norm(diff))
    assert t.raw_norms[0] == pytest.approx(np.linalg.norm(diff))


def test_trait_with_an_empty_context_set_is_an_error():
    acts = np.ones((4, 2))
    pos = np.array([True, True, False, False])
    with pytest.raises(ValueError, match="empty negative context set"):
        sfpjax.trait_directions(acts, {"t": (pos, np.zeros(4, bool))})
    with pytest.raises(ValueError, match="boolean of shape"):
        sfpjax.trait_directions(acts, {"t": (pos, np.ones(3, bool))})


def test_mean_activation_rejects_unknown_site(getkey):
    with pytest.raises(ValueError, match="unknown site"):
        sfpjax.mean_activation(_model(getkey()), jnp.zeros((2, 6), jnp.int32), "blocks.7.hook_resid_post")


def test_mean_activation_vmaps_over_stacked_checkpoints(getkey):
    keys = jr.split(getkey(), 3)
    stacked = eqx.filter_vmap(_model)(keys)
    tokens = jr.randint(getkey(), (4, 6), 0, 3)
    out = eqx.filter_vmap(lambda m: sfpjax.mean_activation(m, tokens, SITE))(stacked)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(out[i], sfpjax.mean_activation(_model(k), tokens, SITE), rtol=1e-5, atol=1e-6)


def test_drift_pca_of_rank_one_drifts():
    rng = np.random.default_rng(1)
    loading = np.array([3.0, -1.0, 0.5])
    drifts = rng.normal(size=(20, 1)) * loading
    p = sfpjax.drift_pca(drifts)
    assert p.explained[0] == pytest.approx(1.0)
    np.testing.assert_allclose(p.loadings[0], loading / np.linalg.norm(loading), atol=1e-10)
    np.testing.assert_allclose(p.project(drifts), (drifts - drifts.mean(0)) @ p.loadings[0])


def _synthetic(rng, n_groups=4, per=12):
    """Dangerous rows drift along feature 0, benign ones do not: separable by construction."""
    X, y, g = [], [], []
    for group in range(n_groups):
        danger = rng.random(per) < 0.5
        X.append(np.column_stack([np.where(danger, 1.0, 0.0) + 0.05 * rng.normal(size=per), rng.normal(size=(per, 2))]))
        y.append(np.where(danger, 0.3 + 0.1 * rng.random(per), 0.01 * rng.random(per)))
        g.append(np.full(per, group))
    return np.concatenate(X), np.concatenate(y), np.concatenate(g)


def test_monitor_on_separable_data_reaches_auroc_one_and_lopo_never_trains_on_held_out():
    X, y, g = _synthetic(np.random.default_rng(2))
    cv = sfpjax.cross_validate_monitor(X, y, g, n_estimators=30, param_grid={"max_depth": (2, None)})
    assert cv.scores.auroc == 1.0
    assert cv.scores.fnr == 0.0 and cv.scores.fpr == 0.0
    assert len(cv.folds) == 4
    for held, trained in cv.folds:
        assert held not in trained
        assert set(trained) | {held} == {0, 1, 2, 3}


def test_held_out_evaluation_and_scores_by_hand():
    X, y, g = _synthetic(np.random.default_rng(3))
    ev = sfpjax.evaluate_held_out(X, y, g, {3}, n_estimators=30)
    assert ev.held_out.sum() == 12 and ev.scores.auroc == 1.0
    s = sfpjax.monitor_scores(np.array([0.0, 0.2, 0.1, 0.01]), np.array([0.0, 0.3, 0.01, 0.2]))
    assert (s.fnr, s.fpr, s.auroc, s.n_dangerous, s.n_benign) == (0.5, 0.5, 0.75, 2, 2)


def test_fewer_than_two_classes_is_an_error():
    with pytest.raises(ValueError, match="both dangerous and benign"):
        sfpjax.monitor_scores(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
    with pytest.raises(ValueError, match="at least 2 groups"):
        sfpjax.cross_validate_monitor(np.zeros((3, 1)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="do not occur"):
        sfpjax.evaluate_held_out(np.zeros((3, 1)), np.zeros(3), np.array([0, 1, 1]), {5})


def test_alarm_steps():
    flags = np.array([[False, True, True], [False, False, False], [True, False, True]])
    assert sfpjax.alarm_steps(flags, steps=[0, 5, 10]).tolist() == [5, -1, 0]


def test_persona_traits_match_the_leaf_decomposition_of_the_posterior(getkey):
    world = sfpjax.persona_world(trigger_rate=0.1, mixing=0.3)
    tokens = sfpjax.sample(world.process, key=getkey(), batch_size=6, seq_len=5)
    traits = sfpjax.persona_traits(world, tokens, confident=0.8)
    assert set(traits) == {"misaligned", "misaligned_marker", "domain_D", "misaligned_elsewhere",
                           "persona_uncertain", "predictable", "trigger_seen"}
    # Oracle: without leak, P(a, d | x_1..t) = prior(a, d) Pr_{ad}(x_1..t) / sum over leaves.
    prior = np.asarray(world.prior, np.float64).reshape(-1)
    logp = np.stack([
        np.stack([np.asarray(sfpjax.sequence_log_prob(world.leaf_process(l), tokens[:, : t + 1]), np.float64)
                  for t in range(tokens.shape[1])], axis=1)
        for l in range(prior.size)
    ], axis=-1)
    joint = prior * np.exp(logp)
    post = (joint / joint.sum(-1, keepdims=True)).reshape(6, 5, world.n_persona, world.n_domain)
    p_m = post[..., world.misaligned, :].sum(-1).reshape(-1)
    p_a = post[..., world.aligned, :].sum(-1).reshape(-1)
    np.testing.assert_array_equal(traits["misaligned"][0], p_m > 0.8)
    np.testing.assert_array_equal(traits["misaligned"][1], p_a > 0.8)
    persona_symbol = np.asarray(tokens) // world.domain_vocab
    seen = np.cumsum(persona_symbol == world.trigger, axis=1) > 0
    np.testing.assert_array_equal(traits["trigger_seen"][0], seen.reshape(-1))
    for pos, neg in traits.values():
        assert pos.shape == neg.shape == (30,)
        assert not np.any(pos & neg)
