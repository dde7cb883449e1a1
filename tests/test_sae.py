"""Sparse autoencoders: training, metrics, splicing into the model, latent-label measures, direction overlaps."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import sfpjax
from sfpjax.analysis._sae import threshold_step as _step
from sfpjax.analysis._sae_train import _auxk, _batch_topk


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _sparse_data(key, n, d, m, s, dtype=jnp.float32):
    """Rows ``z D`` with ``s`` of ``m`` unit atoms active per row, magnitudes in [0.5, 1.5]."""
    kd, ki, kv = jr.split(key, 3)
    D = jr.normal(kd, (m, d), dtype)
    D = D / jnp.linalg.norm(D, axis=-1, keepdims=True)
    idx = jax.vmap(lambda k: jr.choice(k, m, (s,), replace=False))(jr.split(ki, n))
    vals = jr.uniform(kv, (n, s), dtype, minval=0.5, maxval=1.5)
    Z = jnp.zeros((n, m), dtype).at[jnp.arange(n)[:, None], idx].set(vals)
    return Z @ D, D


def _set(sae, **arrays):
    for name, value in arrays.items():
        sae = eqx.tree_at(lambda s: getattr(s, name), sae, jnp.asarray(value, getattr(sae, name).dtype))
    return sae


# ---------------------------------------------------------------------------------------
# Training


def test_topk_recovers_generating_dictionary():
    X, D = _sparse_data(jr.key(0), 4096, 16, 32, 3)
    sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=16, d_sae=64, k=3), key=jr.key(1))
    res = sfpjax.train_sae(sae, X, sfpjax.SAETrainConfig(steps=400, batch_size=128, learning_rate=1e-2), key=jr.key(2))
    W = np.asarray(res.sae.W_dec)
    np.testing.assert_allclose(np.linalg.norm(W, axis=-1), 1.0, atol=1e-5)
    best = np.abs(W @ np.asarray(D).T).max(0)  # each true atom's best match, up to permutation
    assert np.mean(best > 0.9) >= 0.9, np.sort(best)
    m = sfpjax.sae_metrics(res.sae, X)
    assert float(m.l0) == 3.0
    assert float(m.fvu) < 0.2
    assert float(res.mse[-1]) < 0.2 * float(res.mse[0])


def test_stack_equals_separate_trainings():
    X, _ = _sparse_data(jr.key(3), 512, 6, 12, 2, jnp.float64)
    cfg = sfpjax.SAEConfig(d_in=6, d_sae=16, k=3, dead_window=1)
    tcfg = sfpjax.SAETrainConfig(steps=25, batch_size=4, learning_rate=1e-2)
    init_keys = jr.split(jr.key(4), 3)
    train_keys = jr.split(jr.key(5), 3)
    ks, ns = [1, 2, 3], [8, 12, 16]
    stack = sfpjax.sae_stack(cfg, init_keys, k=ks, n_latents=ns, dtype=jnp.float64)
    together = sfpjax.train_sae_stack(stack, X, tcfg, keys=train_keys)
    assert together.loss.shape == (3, 25)
    for i in range(3):
        sae = sfpjax.SAE(cfg, key=init_keys[i], k=ks[i], n_latents=ns[i], dtype=jnp.float64)
        alone = sfpjax.train_sae(sae, X, tcfg, key=train_keys[i])
        for name in ("W_dec", "W_enc", "b_enc", "b_dec"):
            np.testing.assert_allclose(getattr(together.sae, name)[i], getattr(alone.sae, name), atol=1e-10)
        for name in ("loss", "mse", "aux_loss", "dead_fraction"):
            np.testing.assert_allclose(getattr(together, name)[i], getattr(alone, name), atol=1e-10)
        # Masked latents never fire.
        z = np.asarray(alone.sae.encode(X))
        assert np.abs(z[:, ns[i]:]).max(initial=0.0) == 0.0
        assert int((z > 0).sum(-1).max()) <= ks[i]
    # Latents went dead (4 rows of k <= 3 cannot fire all 8..16 latents) and the AuxK loss acted.
    assert float(together.dead_fraction[:, 1:].min()) > 0
    assert float(together.aux_loss[:, 1:].min()) > 0


def test_batchtopk_keeps_k_per_row_on_average():
    sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=4, d_sae=8, k=2, kind="batchtopk"), key=jr.key(0), k=2)
    H = jr.normal(jr.key(1), (5, 8))
    z, smallest = eqx.filter_jit(_batch_topk)(sae, H)
    flat = np.maximum(np.asarray(H), 0.0).ravel()
    kept = np.sort(flat)[::-1][:10]
    assert int((z > 0).sum()) == int((kept > 0).sum())
    np.testing.assert_allclose(np.sort(np.asarray(z).ravel())[::-1][:10], kept)
    assert float(smallest) == float(kept[kept > 0].min())

    X, _ = _sparse_data(jr.key(2), 2048, 8, 16, 2)
    sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=8, d_sae=32, k=2, kind="batchtopk"), key=jr.key(3))
    res = sfpjax.train_sae(sae, X, sfpjax.SAETrainConfig(steps=150, batch_size=64, learning_rate=1e-2), key=jr.key(4))
    assert float(res.sae.batch_threshold) > 0
    l0 = float(sfpjax.sae_metrics(res.sae, X).l0)
    assert 1.0 < l0 < 3.5  # the inference threshold gives about k per row


def test_jumprelu_straight_through_and_sparsity():
    h = jnp.array([0.1, 0.25, 0.3, 0.9])
    theta = jnp.full((4,), 0.3)
    g = jax.grad(lambda t: jnp.sum(_step(h, t, 0.1)))(theta)
    np.testing.assert_allclose(g, [0.0, -10.0, -10.0, 0.0])

    X, _ = _sparse_data(jr.key(5), 2048, 8, 16, 2)
    cfg = sfpjax.SAEConfig(d_in=8, d_sae=32, kind="jumprelu", l0_coef=0.2)
    sae = sfpjax.SAE(cfg, key=jr.key(6))
    res = sfpjax.train_sae(sae, X, sfpjax.SAETrainConfig(steps=150, batch_size=64, learning_rate=1e-2), key=jr.key(7))
    # The thresholds trained (straight-through), the code got sparse and still reconstructs.
    assert not np.allclose(res.sae.log_threshold, np.log(cfg.init_threshold))
    before = sfpjax.sae_metrics(sae, X)
    after = sfpjax.sae_metrics(res.sae, X)
    assert float(after.l0) < 0.5 * float(before.l0)
    assert float(after.fvu) < 0.5


def test_auxk_loss_by_hand():
    cfg = sfpjax.SAEConfig(d_in=2, d_sae=4, k=1, aux_k=2)
    sae = _set(sfpjax.SAE(cfg, key=jr.key(0)), W_dec=np.array([[1.0, 0], [0, 1], [0.6, 0.8], [0.8, -0.6]]))
    H = jnp.array([[0.5, 2.0, 1.0, -1.0], [3.0, 0.1, -0.5, 0.2]], jnp.float32)
    residual = jnp.array([[1.0, 1.0], [0.0, 2.0]], jnp.float32)
    dead = jnp.array([False, True, True, True])
    # Row 0: dead pre-acts (2.0, 1.0, -1.0) -> top 2 are latents 1, 2; row 1: (0.1, -0.5, 0.2) -> 3, 1.
    W = np.asarray(sae.W_dec)
    r0 = np.array([1.0, 1.0]) - (2.0 * W[1] + 1.0 * W[2])
    r1 = np.array([0.0, 2.0]) - (0.2 * W[3] + 0.1 * W[1])
    expect = min(3 / 2, 1.0) * 0.5 * (r0 @ r0 + r1 @ r1)
    auxk = eqx.filter_jit(_auxk)
    np.testing.assert_allclose(auxk(sae, H, residual, dead), expect, rtol=1e-6)
    one_dead = jnp.array([False, False, True, False])
    r0 = np.array([1.0, 1.0]) - 1.0 * W[2]
    r1 = np.array([0.0, 2.0]) - (-0.5) * W[2]
    np.testing.assert_allclose(auxk(sae, H, residual, one_dead), 0.5 * 0.5 * (r0 @ r0 + r1 @ r1), rtol=1e-6)
    assert float(auxk(sae, H, residual, jnp.zeros(4, bool))) == 0.0


# ---------------------------------------------------------------------------------------
# Metrics


def test_metrics_match_hand_computation():
    cfg = sfpjax.SAEConfig(d_in=2, d_sae=3, k=1)
    r = 1 / np.sqrt(2)
    W_dec = np.array([[1.0, 0.0], [0.0, 1.0], [r, r]])
    sae = _set(
        sfpjax.SAE(cfg, key=jr.key(0)),
        W_dec=W_dec, W_enc=W_dec.T, b_enc=np.zeros(3), b_dec=np.array([0.0, 0.0]),
    )
    X = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [3.0, -1.0]], np.float32)
    # TopK with k=1 by hand: the largest pre-activation, ReLU-ed.
    Z = np.zeros((5, 3))
    for i, x in enumerate(X):
        pre = x @ W_dec.T
        j = int(np.argmax(pre))
        Z[i, j] = max(pre[j], 0.0)
    X_hat = Z @ W_dec
    err = X - X_hat
    m = sfpjax.sae_metrics(sae, X, dense_threshold=0.3)
    np.testing.assert_allclose(sfpjax.SAE.encode(sae, X), Z, rtol=1e-6)
    assert float(m.l0) == pytest.approx(4 / 5)
    assert float(m.mse) == pytest.approx(np.mean(err**2), rel=1e-6)
    assert float(m.fvu) == pytest.approx(np.sum(err**2) / np.sum((X - X.mean(0)) ** 2), rel=1e-6)
    np.testing.assert_allclose(m.frequency, [2 / 5, 1 / 5, 1 / 5])
    assert float(m.dead_fraction) == 0.0
    assert float(m.dense_fraction) == pytest.approx(1 / 3)
    # Row 2 sits on atom 2 exactly; row 3 has no positive pre-activation.
    np.testing.assert_allclose(Z[2], [0, 0, np.sqrt(2)], rtol=1e-12)
    assert Z[3].sum() == 0


def test_metrics_vmap_over_stack_and_masked_latents():
    cfg = sfpjax.SAEConfig(d_in=4, d_sae=16, k=2)
    stack = sfpjax.sae_stack(cfg, jr.split(jr.key(0), 2), n_latents=[4, 16])
    X = jr.normal(jr.key(1), (200, 4))
    ms = eqx.filter_vmap(lambda s: sfpjax.sae_metrics(s, X))(stack)
    for i in range(2):
        one = sfpjax.sae_metrics(jax.tree_util.tree_map(lambda a: a[i], stack), X)
        np.testing.assert_allclose(ms.fvu[i], one.fvu, rtol=1e-6)
        np.testing.assert_allclose(ms.frequency[i], one.frequency, rtol=1e-6)
    # The 4-latent SAE: masked latents have frequency 0 but do not count as dead.
    assert float(ms.frequency[0, 4:].max()) == 0.0
    used = np.asarray(ms.frequency[0, :4])
    assert float(ms.dead_fraction[0]) == pytest.approx(np.mean(used == 0))


def _zeros(activation, position_mask, params):
    return jnp.zeros_like(activation)


def _identity_sae(d):
    """TopK SAE with atoms +-e_i and k = d: z = (relu(x), relu(-x)), x_hat = x exactly."""
    cfg = sfpjax.SAEConfig(d_in=d, d_sae=2 * d, k=d)
    eye = np.eye(d)
    W_dec = np.concatenate([eye, -eye])
    return _set(sfpjax.SAE(cfg, key=jr.key(0)), W_dec=W_dec, W_enc=W_dec.T, b_enc=np.zeros(2 * d), b_dec=np.zeros(d))


@pytest.mark.parametrize("use_bos", [False, True])
def test_splicing_identity_recovers_all_loss(use_bos):
    cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, n_heads=2, d_mlp=32,
                                   use_bos=use_bos, init_std=0.3)
    model = sfpjax.Transformer(cfg, key=jr.key(0))
    tokens = jr.randint(jr.key(1), (16, 8), 0, 3)
    site = "blocks.0.hook_resid_post"
    sae = _identity_sae(16)
    m = sfpjax.splice_metrics(model, sae, tokens, site)
    assert abs(float(m.ce_zero_ablation - m.ce_clean)) > 1e-2
    assert float(m.ce_loss_recovered) == pytest.approx(1.0, abs=1e-5)
    assert float(m.kl_spliced) == pytest.approx(0.0, abs=1e-6)
    assert float(m.kl_zero_ablation) > 1e-3
    np.testing.assert_allclose(m.ce_clean, sfpjax.next_token_loss(model, tokens), rtol=1e-6)
    # Zero-ablation by hand through the intervention API.
    @eqx.filter_jit
    def zero_ablated_ce(model, tokens):
        zero = sfpjax.Intervention(_zeros)
        logits = model.batched(tokens, interventions={site: zero})
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        targets = tokens if use_bos else tokens[:, 1:]
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

    np.testing.assert_allclose(m.ce_zero_ablation, zero_ablated_ce(model, tokens), rtol=1e-5)
    # A random SAE (same config, so the same compiled program) changes the predictions.
    bad = sfpjax.SAE(sae.config, key=jr.key(2))
    mb = sfpjax.splice_metrics(model, bad, tokens, site)
    assert float(mb.kl_spliced) > 1e-4
    assert abs(float(mb.ce_spliced - mb.ce_clean)) > 1e-4


def test_site_activations_layout_and_mask():
    cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, n_layers=1, d_model=16, d_mlp=32, use_bos=True)
    model = sfpjax.Transformer(cfg, key=jr.key(0))
    tokens = jr.randint(jr.key(1), (4, 6), 0, 3)
    site = "blocks.0.hook_mlp_out"
    _, acts = eqx.filter_jit(lambda m, t: m.batched(t, sites=[site]))(model, tokens)
    rows = sfpjax.site_activations(model, tokens, site, position_mask=np.arange(7) > 0)
    np.testing.assert_allclose(rows, acts[site][:, 1:].reshape(-1, 16), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, n_layers=1, d_model=16, d_mlp=32)
    model = sfpjax.Transformer(cfg, key=jr.key(0))
    tokens = jnp.zeros((2, 6), jnp.int32)
    sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=16, d_sae=32, k=4), key=jr.key(1))
    with pytest.raises(ValueError, match="Unknown site"):
        sfpjax.site_activations(model, tokens, "blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="Unknown site"):
        sfpjax.splice_metrics(model, sae, tokens, "blocks.0.resid_post")
    with pytest.raises(ValueError, match="larger than the dictionary"):
        sfpjax.SAEConfig(d_in=16, d_sae=8, k=16)
    with pytest.raises(ValueError, match="larger than the dictionary"):
        sfpjax.SAE(sfpjax.SAEConfig(d_in=16, d_sae=32, k=8), key=jr.key(0), k=8, n_latents=4)
    with pytest.raises(ValueError, match="exceeds config.k"):
        sfpjax.sae_stack(sfpjax.SAEConfig(d_in=16, d_sae=32, k=4), jr.split(jr.key(0), 2), k=[2, 5])
    with pytest.raises(ValueError, match="d_in=16"):
        sfpjax.train_sae(sae, jnp.ones((10, 12)), sfpjax.SAETrainConfig(steps=2, batch_size=2), key=jr.key(0))
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(jnp.ones((3, 12)))
    with pytest.raises(ValueError, match="width"):
        small = sfpjax.SAE(sfpjax.SAEConfig(d_in=8, d_sae=16, k=2), key=jr.key(0))
        sfpjax.splice_metrics(model, small, tokens, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="kind"):
        sfpjax.SAEConfig(d_in=4, d_sae=8, kind="relu")
    with pytest.raises(ValueError, match="both classes|no positive"):
        sfpjax.latent_auroc(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sfpjax.latent_auroc(np.ones((4, 2)), np.array([0.0, 2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="shared d_act"):
        sfpjax.direction_overlaps({"a": np.ones(4), "b": np.ones((5, 2))})


# ---------------------------------------------------------------------------------------
# Latent-label measures


def _pairwise_auroc(s, pos_w, neg_w):
    """Brute force: P(score of a positive draw > score of a negative draw), ties 1/2."""
    gt = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    return float(pos_w @ gt @ neg_w / (pos_w.sum() * neg_w.sum()))


def test_latent_auroc_binary_soft_and_thresholded():
    rng = np.random.default_rng(0)
    n = 60
    Z = np.maximum(rng.normal(size=(n, 5)), 0.0)
    Z[:, 4] = 0.0  # a dead latent
    p = rng.uniform(size=n)
    y = (p > 0.5).astype(int)
    w = rng.uniform(0.5, 2.0, size=n)
    binary = sfpjax.latent_auroc(Z, y)
    for j in range(5):
        assert binary[j] == pytest.approx(roc_auc_score(y, Z[:, j]))
        assert binary[j] == pytest.approx(_pairwise_auroc(Z[:, j], y * 1.0, 1.0 - y))
    assert binary[4] == 0.5
    soft = sfpjax.latent_auroc(Z, p, weights=w)
    for j in range(5):
        assert soft[j] == pytest.approx(_pairwise_auroc(Z[:, j], w * p, w * (1 - p)))
    np.testing.assert_allclose(sfpjax.latent_auroc(Z, p, threshold=0.5), binary)
    # Leading axes are flattened; a latent equal to the label separates it perfectly.
    Z2 = np.concatenate([Z, y[:, None] * 1.0], axis=1).reshape(6, 10, 6)
    assert sfpjax.latent_auroc(Z2, y.reshape(6, 10))[-1] == 1.0


def test_latent_correlation_and_top_latents():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(40, 4))
    Z[:, 3] = 2.5
    t = Z[:, 0] * 2 - Z[:, 1] + rng.normal(size=40)
    r = sfpjax.latent_correlation(Z, t)
    for j in range(3):
        assert r[j] == pytest.approx(np.corrcoef(Z[:, j], t)[0, 1])
    assert np.isnan(r[3])
    # Integer weights equal repeated rows.
    counts = rng.integers(1, 4, size=40)
    rw = sfpjax.latent_correlation(Z, t, weights=counts.astype(float))
    rep = sfpjax.latent_correlation(np.repeat(Z, counts, 0), np.repeat(t, counts))
    np.testing.assert_allclose(rw[:3], rep[:3], rtol=1e-10)
    order = sfpjax.top_latents(r, 4)
    assert order.tolist()[:3] == list(np.argsort(-np.abs(r[:3])))
    assert order[-1] == 3
    assert sfpjax.top_latents(np.array([0.2, 0.95, 0.5]), 2, center=0.5).tolist() == [1, 0]


def test_compare_latent_activations():
    a = np.array([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [4.0, 1.0, 0.0]])
    b = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 2.0, 0.0]])
    s = sfpjax.compare_latent_activations(a, b)
    np.testing.assert_allclose(s.frequency_a, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(s.frequency_b, [0.75, 0.25, 0.0])
    np.testing.assert_allclose(s.mean_a, [1.5, 1.5, 0.0])
    np.testing.assert_allclose(s.mean_active_a[:2], [3.0, 1.5])
    np.testing.assert_allclose(s.mean_active_b[:2], [8 / 3, 2.0])
    assert np.isnan(s.mean_active_a[2])
    np.testing.assert_allclose(s.delta_mean, b.mean(0) - a.mean(0))
    assert s.paired_correlation[0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1])
    assert np.isnan(s.paired_correlation[2])
    unpaired = sfpjax.compare_latent_activations(a, b[:3])
    assert unpaired.paired_correlation is None


# ---------------------------------------------------------------------------------------
# Direction overlaps


def test_direction_overlaps_agree_with_subspace_angles_and_chance():
    rng = np.random.default_rng(2)
    d = 32
    dirs = {"lora_A": rng.normal(size=d), "steer": rng.normal(size=d), "probe": rng.normal(size=(d, 3))}
    res = sfpjax.direction_overlaps(dirs)
    names = list(dirs)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            sa = sfpjax.subspace_angles(dirs[names[i]], dirs[names[j]])
            assert res.overlap[i, j] == pytest.approx(sa.overlap)
            assert res.min_angle[i, j] == pytest.approx(sa.angles[0])
    u, v = dirs["lora_A"], dirs["steer"]
    assert res.max_cosine[0, 1] == pytest.approx(abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v))
    assert res.ranks == (1, 1, 3)
    assert res.chance[0, 2] == pytest.approx(3 / d)
    assert len(res.table()) == 3
    # The chance level is the mean overlap of random subspaces.
    draws = [sfpjax.direction_overlaps({"a": rng.normal(size=d), "b": rng.normal(size=(d, 3))}).overlap[0, 1]
             for _ in range(300)]
    assert np.mean(draws) == pytest.approx(3 / d, rel=0.15)
