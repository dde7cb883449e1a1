import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax


def _model(key, vocab=16, n_ctx=12, d_model=16):
    cfg = sfpjax.TransformerConfig(vocab_size=vocab, n_ctx=n_ctx, n_layers=2, d_model=d_model, n_heads=2, d_mlp=32)
    m = sfpjax.Transformer(cfg, key=key)
    # Nonzero biases so that folding into them is exercised on a generic model.
    return jax.tree.map(lambda x: x + 0.1 * jr.normal(jr.fold_in(key, 7), x.shape, x.dtype)
                        if eqx_is_bias(x) else x, m)


def eqx_is_bias(x):
    return isinstance(x, jax.Array) and x.ndim == 1


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid",
                                  "blocks.1.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post",
                                  "blocks.0.mlp.hook_post"])
def test_fold_steering_matches_intervention(getkey, site):
    m = _model(getkey())
    width = 32 if site.endswith("mlp.hook_post") else 16
    v = jr.normal(getkey(), (width,))
    toks = jr.randint(getkey(), (3, 7), 0, 16)
    folded = sfpjax.fold_steering(m, site, v).batched(toks)
    hooked = m.batched(toks, interventions={site: sfpjax.steer_add(v)})
    np.testing.assert_allclose(folded, hooked, atol=1e-4)
    assert not np.allclose(folded, m.batched(toks), atol=1e-3)  # the vector did something


def test_zero_vector_changes_nothing(getkey):
    m = _model(getkey())
    toks = jr.randint(getkey(), (2, 6), 0, 16)
    z = jnp.zeros(16)
    np.testing.assert_array_equal(sfpjax.fold_steering(m, "blocks.1.hook_resid_post", z).batched(toks), m.batched(toks))
    w = sfpjax.persona_world()
    pr = sfpjax.eval_prompts(w, key=getkey(), n=4, length=4)
    key = getkey()
    sweep = sfpjax.reversal_sweep(m, w, pr, "blocks.1.hook_resid_post", z, jnp.array([0.0, 1.0, 3.0]), key=key,
                                  length=6, reference=m)
    plain = sfpjax.reversal_metrics(m, w, pr, key=key, length=6, reference=m)
    for name, col in sweep._asdict().items():
        np.testing.assert_allclose(col, float(getattr(plain, name)), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(sweep.domain_kl_reference, 0.0, atol=1e-6)


def test_sweep_scale_matches_folded_model(getkey):
    m = _model(getkey())
    w = sfpjax.persona_world(mixing=0.5)
    pr = sfpjax.eval_prompts(w, key=getkey(), n=4, length=4)
    v = 3.0 * jr.normal(getkey(), (16,))
    key = getkey()
    sweep = sfpjax.reversal_sweep(m, w, pr, "blocks.0.hook_resid_post", v, jnp.array([0.0, 2.0]), key=key, length=6,
                                  reference=m)
    one = sfpjax.reversal_metrics(sfpjax.fold_steering(m, "blocks.0.hook_resid_post", 2.0 * v), w, pr, key=key,
                                  length=6, reference=m)
    for name, col in sweep._asdict().items():
        np.testing.assert_allclose(col[1], float(getattr(one, name)), rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(sweep.domain_kl_reference[1]) > 1e-6  # a random vector moves the domain prediction


def test_exact_model_kls_are_zero_for_exact_probs(getkey):
    """The exact-process KLs of reversal_metrics are KL(exact || model): check them by hand."""
    m = _model(getkey())
    w = sfpjax.persona_world()
    pr = sfpjax.eval_prompts(w, key=getkey(), n=3, length=4)
    r = sfpjax.reversal_metrics(m, w, pr, key=getkey(), length=4)
    toks = np.asarray(pr.tokens).reshape(-1, 4)
    q = np.asarray(jax.nn.softmax(m.batched(jnp.asarray(toks))[:, -1].astype(jnp.float64), -1)).reshape(-1, 4, 4)
    res = sfpjax.filter_beliefs(w.process, jnp.asarray(toks))
    p = np.asarray(sfpjax.next_token_probs(w.process, res.beliefs[:, -1]), np.float64).reshape(-1, 4, 4)

    def kl(a, b):
        return np.sum(np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0), -1).mean()

    np.testing.assert_allclose(float(r.domain_kl_exact), kl(p.sum(1), q.sum(1)), rtol=1e-4)
    np.testing.assert_allclose(float(r.persona_kl_exact), kl(p.sum(2), q.sum(2)), rtol=1e-4)
    assert np.isnan(float(r.domain_kl_reference))


def _lstsq_probe(X, Y):
    """A float64 least-squares probe ``Y ~ X W + b`` (exact on affine data)."""
    coef = np.linalg.lstsq(np.c_[X, np.ones(len(X))], Y, rcond=None)[0]
    return sfpjax.LinearProbe(jnp.asarray(coef[:-1]), jnp.asarray(coef[-1]))


def test_persona_steering_leaves_domain_belief_untouched(getkey):
    """Exactly factored setting: activations are an injective affine image of the leaf posterior.

    The other factor's marginal of the probe's reading is unchanged exactly in arithmetic
    (the marginal of pi(a) pi(d) over a is pi(d)); the tolerance is float32 rounding.
    """
    w = sfpjax.persona_world(mixing=0.6)
    toks = sfpjax.persona_sequences(w, {"MD": 0.3, "MO": 0.2, "AD": 0.25, "AO": 0.25}, key=getkey(), batch_size=64,
                                    seq_len=8)
    post = np.asarray(sfpjax.leaf_posteriors(w, toks), np.float64).reshape(-1, 4)
    M = np.asarray(jr.normal(getkey(), (4, 12), jnp.float64))
    c = np.asarray(jr.normal(getkey(), (12,), jnp.float64))
    acts = post @ M + c
    probe, decoder = _lstsq_probe(acts, post), _lstsq_probe(post, acts)
    for dec in (None, decoder):
        delta = np.asarray(sfpjax.leaf_belief_delta(w, probe, acts, decoder=dec), np.float64)
        read = np.asarray(probe(acts + delta), np.float64).reshape(-1, 2, 2)  # (persona, domain)
        np.testing.assert_allclose(read.sum(1), post.reshape(-1, 2, 2).sum(1), atol=1e-6)  # domain marginal kept
        np.testing.assert_allclose(read.sum(2)[:, w.aligned], 1.0, atol=1e-6)  # persona moved to aligned
    # Steering the domain factor instead keeps the persona marginal.
    delta = np.asarray(sfpjax.leaf_belief_delta(w, probe, acts, factor="domain", target="O"), np.float64)
    read = np.asarray(probe(acts + delta), np.float64).reshape(-1, 2, 2)
    np.testing.assert_allclose(read.sum(2), post.reshape(-1, 2, 2).sum(2), atol=1e-6)
    np.testing.assert_allclose(read.sum(1)[:, 1], 1.0, atol=1e-6)


def test_leaf_posteriors_oracle(getkey):
    """The leaf posterior equals the sector weights of a belief updated step by step in float64."""
    w = sfpjax.persona_world(mixing=0.4)
    toks = sfpjax.persona_sequences(w, {"MD": 0.5, "AO": 0.5}, key=getkey(), batch_size=4, seq_len=5)
    post = np.asarray(sfpjax.leaf_posteriors(w, toks))
    T = np.asarray(w.process.T, np.float64)
    right = np.asarray(w.process.right, np.float64)
    eta0 = np.asarray(w.process.eta0, np.float64)
    # With leaks, leaf l's posterior is the belief's mass on the leaf's states; check the last step directly.
    for b in range(toks.shape[0]):
        eta = eta0
        for t in range(toks.shape[1]):
            eta = eta @ T[int(toks[b, t])]
            eta = eta / (eta @ right)
        sw = np.asarray(sfpjax.sector_weights(jnp.asarray(eta), w.sectors, factor_dims=w.factor_dims, right=right))
        np.testing.assert_allclose(post[b, -1], sw.reshape(-1), atol=1e-6)
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-6)


def test_ablation_removes_direction_everywhere(getkey):
    m = _model(getkey())
    u = jr.normal(getkey(), (16,))
    toks = jr.randint(getkey(), (3, 7), 0, 16)
    abl = sfpjax.ablate_direction_weights(m, u)
    sites = [s for s in m.site_names if "resid" in s]
    _, acts = abl.batched(toks, sites=sites)
    un = (u / jnp.linalg.norm(u)).astype(jnp.float32)
    for s in sites:
        assert float(jnp.abs(acts[s] @ un).max()) < 1e-4, s
    # Same as removing the projection after each write to the residual stream.
    iv = sfpjax.steer_ablate(u)
    writes = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{h}" for l in range(2) for h in ("hook_attn_out", "hook_mlp_out")]
    np.testing.assert_allclose(abl.batched(toks), m.batched(toks, interventions={s: iv for s in writes}), atol=1e-4)


def test_mean_ablation_sets_the_component_everywhere_and_keeps_the_rest(getkey):
    m = _model(getkey())
    u = jr.normal(getkey(), (16,))
    un = (u / jnp.linalg.norm(u)).astype(jnp.float32)
    toks = jr.randint(getkey(), (3, 7), 0, 16)
    sites = [s for s in m.site_names if "resid" in s]
    _, zero = sfpjax.ablate_direction_weights(m, u).batched(toks, sites=sites)
    _, mean = sfpjax.ablate_direction_weights(m, u, value=1.5).batched(toks, sites=sites)
    for s in sites:
        np.testing.assert_allclose(mean[s] @ un, 1.5, atol=1e-4, err_msg=s)
    # The first residual stream differs from zero ablation by exactly 1.5 u; later ones
    # differ through the LayerNorms that read the shifted stream, but never along u.
    np.testing.assert_allclose(mean["blocks.0.hook_resid_pre"] - zero["blocks.0.hook_resid_pre"],
                               np.broadcast_to(1.5 * un, zero["blocks.0.hook_resid_pre"].shape), atol=1e-5)
    with pytest.raises(ValueError, match="value must be finite"):
        sfpjax.ablate_direction_weights(m, u, value=float("nan"))


def test_lora_directions_and_overlaps(getkey):
    base = _model(getkey())
    lora = sfpjax.LoRATransformer(base, rank=1, targets=("mlp.W_in", "mlp.W_out"), key=getkey())
    lora = jax.tree.map(lambda x: x + 0.5 if isinstance(x, jax.Array) and x.ndim == 2 and x.shape[0] == 1 else x, lora)
    dirs = sfpjax.lora_residual_directions(lora)
    assert sorted(dirs) == ["blocks.0.mlp.W_in.A", "blocks.0.mlp.W_out.B", "blocks.1.mlp.W_in.A", "blocks.1.mlp.W_out.B"]
    np.testing.assert_allclose(dirs["blocks.1.mlp.W_in.A"], np.asarray(lora.adapters["blocks.1.mlp.W_in"].A))
    ov = sfpjax.direction_overlaps({"A": dirs["blocks.0.mlp.W_in.A"], "same": 2 * dirs["blocks.0.mlp.W_in.A"][:, 0]})
    np.testing.assert_allclose(ov.overlap[0, 1], 1.0, atol=1e-9)
    np.testing.assert_allclose(dirs["blocks.0.mlp.W_out.B"][:, 0], np.asarray(lora.adapters["blocks.0.mlp.W_out"].B)[0])


def test_bad_input_errors(getkey):
    m = _model(getkey())
    w = sfpjax.persona_world()
    pr = sfpjax.eval_prompts(w, key=getkey(), n=2, length=4)
    with pytest.raises(ValueError, match="Unknown site"):
        sfpjax.fold_steering(m, "blocks.5.hook_resid_post", jnp.ones(16))
    with pytest.raises(ValueError, match="Unknown site"):
        sfpjax.reversal_sweep(m, w, pr, "blocks.9.hook_resid_post", jnp.ones(16), jnp.ones(2), key=getkey(), length=4)
    with pytest.raises(ValueError, match="folded"):
        sfpjax.fold_steering(m, "ln_final.hook_normalized", jnp.ones(16))
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        sfpjax.fold_steering(m, "blocks.0.hook_resid_post", jnp.ones(15))
    with pytest.raises(ValueError, match="nonzero"):
        sfpjax.ablate_direction_weights(m, jnp.zeros(16))
    with pytest.raises(ValueError, match="persona sector"):
        sfpjax.leaf_belief_delta(w, sfpjax.LinearProbe(jnp.eye(4), jnp.zeros(4)), jnp.zeros(4), target="X")
    with pytest.raises(ValueError, match="'persona' or 'domain'"):
        sfpjax.leaf_belief_delta(w, sfpjax.LinearProbe(jnp.eye(4), jnp.zeros(4)), jnp.zeros(4), factor="leaf")
    with pytest.raises((ValueError, TypeError), match="LoRATransformer"):
        sfpjax.lora_residual_directions(m)
    with pytest.raises((ValueError, TypeError), match="EvalPrompts"):
        sfpjax.reversal_metrics(m, w, pr.tokens, key=getkey(), length=4)
