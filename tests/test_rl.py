"""Policy-gradient post-training: sampling, the REINFORCE update, stacking, resume, errors."""

import itertools
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.stats

import sfpjax

CFG = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, n_layers=1, d_model=16, n_heads=2, d_mlp=32,
                               use_bos=True, init_std=0.5)


def _model(seed=0, cfg=CFG):
    return sfpjax.Transformer(cfg, key=jr.key(seed))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


def _trees_equal(a, b):
    la = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree_util.tree_leaves(eqx.filter(b, eqx.is_array))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def prefer_zero(x, y, info):
    return (y[0] == 0).astype(jnp.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_matches_the_models_own_next_token_probabilities(temperature):
    # Chi-square of N draws of (y_1, y_2) after a fixed prompt against the model's law
    # pi(y_1 | x) pi(y_2 | x, y_1), each factor read from the model's logits.
    model = _model(0)
    prompt = jnp.array([2, 0], jnp.int32)
    n = 8000
    out = sfpjax.generate(model, jnp.broadcast_to(prompt, (n, 2)), key=jr.key(1), n_new=2,
                          temperature=temperature, reference=model)
    words = np.asarray(out.completions[:, 0] * 3 + out.completions[:, 1])
    counts = np.bincount(words, minlength=9)
    probs = np.zeros(9)
    for y1, y2 in itertools.product(range(3), repeat=2):
        logits = model(jnp.array([2, 0, y1]))  # rows: after BOS, x_1, x_2, y_1
        p1 = jax.nn.softmax(logits[2] / temperature)[y1]
        p2 = jax.nn.softmax(logits[3] / temperature)[y2]
        probs[y1 * 3 + y2] = float(p1 * p2)
    assert abs(probs.sum() - 1) < 1e-5
    # Cells expecting fewer than 5 draws are pooled into one, as the chi-square test needs.
    small = n * probs < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(n * probs[~small], n * probs[small].sum())
    obs, exp = (obs, exp) if small.any() else (obs[:-1], exp[:-1])
    assert len(obs) >= 4
    chi2 = np.sum((obs - exp) ** 2 / exp)
    assert chi2 < scipy.stats.chi2.ppf(0.999, len(obs) - 1)
    # The test has power: the law at the other temperature is rejected.
    other = 1.0 if temperature != 1.0 else 0.6
    alt = np.array([float(jax.nn.softmax(model(jnp.array([2, 0, a]))[2] / other)[a]
                          * jax.nn.softmax(model(jnp.array([2, 0, a]))[3] / other)[b])
                    for a, b in itertools.product(range(3), repeat=2)])
    alt_exp = np.append(n * alt[~small], n * alt[small].sum())[: len(obs)]
    assert np.sum((obs - alt_exp) ** 2 / alt_exp) > scipy.stats.chi2.ppf(0.999, len(obs) - 1)
    # The returned log-probabilities are those of the drawn tokens under the model.
    np.testing.assert_allclose(np.exp(np.asarray(out.log_probs).sum(1)), probs[words], rtol=1e-4)
    np.testing.assert_allclose(out.log_probs, out.ref_log_probs, rtol=0, atol=0)
    assert out.entropy.shape == (n, 2) and np.all(np.asarray(out.entropy) > 0)


def test_generate_without_bos_reads_the_prompt_and_rejects_an_empty_one():
    cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=5, n_layers=1, d_model=16, d_mlp=32, init_std=0.5)
    model = _model(3, cfg)
    prompts = jnp.array([[0, 1, 1]] * 4000, jnp.int32)
    out = sfpjax.generate(model, prompts, key=jr.key(0), n_new=1)
    p1 = float(jax.nn.softmax(model(jnp.array([0, 1, 1]))[2])[1])
    freq = float(np.mean(np.asarray(out.completions[:, 0]) == 1))
    assert abs(freq - p1) < 4 * np.sqrt(p1 * (1 - p1) / 4000)
    with pytest.raises(ValueError, match="without BOS a prompt needs at least one token"):
        sfpjax.generate(model, jnp.zeros((2, 0), jnp.int32), key=jr.key(0), n_new=1)
    with pytest.raises(ValueError, match="exceeds the model's n_ctx=5"):
        sfpjax.generate(model, prompts[:, :3], key=jr.key(0), n_new=3)


def test_zero_reward_and_zero_kl_weight_leave_the_parameters_unchanged():
    model, ref = _model(0), _model(0)
    rc = sfpjax.RLConfig(steps=3, prompts_per_step=4, group_size=4, n_new=2, kl_weight=0.0, learning_rate=0.1)
    out = sfpjax.rl_train(model, ref, sfpjax.ArrayPrompts(jnp.array([[0, 1], [2, 2]])),
                          lambda x, y, info: jnp.float32(0.0), rc, key=jr.key(1))
    assert _trees_equal(out.model, model)
    assert all(r["reward"] == 0.0 for r in out.history)
    # The same run with the KL term on does move the policy only through the KL (it is 0 here).
    assert out.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("advantage", ["baseline", "group"])
def test_bandit_converges_to_the_exponential_tilt_of_the_reference(advantage):
    # One-step bandit (empty prompt, one token): the maximizer of E[r] - beta KL(pi || pi_0)
    # is pi_0(y) exp(r(y) / beta) / Z.
    ref = _model(2)
    pi0 = np.asarray(jax.nn.softmax(ref(jnp.zeros((0,), jnp.int32))[0]), np.float64)
    beta = 0.5
    r = np.array([1.0, 0.0, 0.0])
    tilt = pi0 * np.exp(r / beta)
    tilt /= tilt.sum()
    lr = 0.01 if advantage == "baseline" else 0.003
    rc = sfpjax.RLConfig(steps=400, prompts_per_step=4, group_size=32, n_new=1, kl_weight=beta,
                         learning_rate=lr, advantage=advantage, steps_per_call=50, log_every=50)
    out = sfpjax.rl_train(_copy(ref), ref, sfpjax.ArrayPrompts(jnp.zeros((1, 0), jnp.int32)),
                          prefer_zero, rc, key=jr.key(3))
    pi = np.asarray(jax.nn.softmax(out.model(jnp.zeros((0,), jnp.int32))[0]), np.float64)
    assert np.abs(tilt - pi0).max() > 0.1  # the tilt is far from the start
    np.testing.assert_allclose(pi, tilt, atol=0.03)
    # The KL metric is the exact KL(pi || pi_0) of the final policy (up to the last step).
    kl = float(np.sum(pi * np.log(pi / pi0)))
    assert out.history[-1]["kl"] == pytest.approx(kl, abs=0.03)


def test_stacked_runs_equal_the_sequential_runs():
    ref = _model(0)
    K = 3
    # Leave-one-out baselines: group normalization divides float rounding of near-constant
    # returns by a near-zero spread, which the vmapped and unvmapped programs round differently.
    rc = sfpjax.RLConfig(steps=4, prompts_per_step=2, group_size=3, n_new=2, steps_per_call=2,
                         advantage="baseline")
    src = sfpjax.ArrayPrompts(jnp.array([[0, 1], [2, 2], [1, 0]]))
    keys = jr.split(jr.key(5), K)
    kls = jnp.array([0.0, 0.1, 1.0])
    models = eqx.filter_vmap(lambda _: ref)(jnp.arange(K))
    # Plain SGD: Adam's first steps are sign(g) steps, which turn float rounding in
    # near-zero gradient entries into differences of 2 lr.
    opt = optax.sgd(0.1)
    stack = sfpjax.rl_train_stack(models, ref, src, prefer_zero, rc, keys=keys, kl_weights=kls, optimizer=opt)
    for k in range(K):
        cfg_k = sfpjax.RLConfig(**{**rc.__dict__, "kl_weight": float(kls[k])})
        one = sfpjax.rl_train(_copy(ref), ref, src, prefer_zero, cfg_k, key=keys[k], optimizer=opt)
        got = jax.tree.map(lambda x: x[k] if eqx.is_array(x) else x, stack.model)
        for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(got, eqx.is_array)),
                        jax.tree_util.tree_leaves(eqx.filter(one.model, eqx.is_array))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert stack.history[-1]["reward"][k] == pytest.approx(one.history[-1]["reward"], abs=1e-6)


def test_trainable_subset_freezes_the_rest():
    ref = _model(0)
    rc = sfpjax.RLConfig(steps=2, prompts_per_step=2, group_size=4, n_new=1, learning_rate=0.05)
    only_unembed = jax.tree.map(lambda _: False, ref)
    only_unembed = eqx.tree_at(lambda m: (m.W_U, m.b_U), only_unembed, replace=(True, True))
    out = sfpjax.rl_train(_copy(ref), ref, sfpjax.ArrayPrompts(jnp.array([[0, 1]])), prefer_zero, rc,
                          key=jr.key(0), trainable=only_unembed)
    assert not np.array_equal(out.model.W_U, ref.W_U)
    assert np.array_equal(out.model.W_E, ref.W_E)
    assert np.array_equal(out.model.blocks[0].W_in, ref.blocks[0].W_in)


def test_rewards_read_hidden_states_and_beliefs():
    proc = sfpjax.mess3()
    src = sfpjax.PromptSource(proc, 3, with_states=True, with_beliefs=True)
    batch = src.prompts(jr.key(0), 64)
    exact = sfpjax.filter_beliefs(proc, batch.tokens).beliefs[:, -1]
    np.testing.assert_allclose(batch.beliefs, exact, rtol=1e-6)
    assert batch.states.shape == (64, 4)
    # A reward that reads the hidden state the completion starts from.
    ref = _model(1)
    rc = sfpjax.RLConfig(steps=2, prompts_per_step=4, group_size=2, n_new=1)
    out = sfpjax.rl_train(_copy(ref), ref, src, lambda x, y, info: (y[0] == info.states[-1]).astype(jnp.float32),
                          rc, key=jr.key(2))
    assert 0.0 <= out.history[-1]["reward"] <= 1.0


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    ref = _model(0)
    rc = sfpjax.RLConfig(steps=6, prompts_per_step=2, group_size=2, n_new=2, checkpoint_every=2,
                         keep_checkpoints=None, learning_rate=0.01)
    src = sfpjax.ArrayPrompts(jnp.array([[0, 1], [2, 2]]))
    full = sfpjax.rl_train(_copy(ref), ref, src, prefer_zero, rc, key=jr.key(1), run_dir=tmp_path / "a")
    assert sfpjax.latest_checkpoint(tmp_path / "a") == 6
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for step in ("4", "6"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / step)
    resumed = sfpjax.rl_train(_copy(ref), ref, src, prefer_zero, rc, key=jr.key(1), run_dir=tmp_path / "b",
                              resume=True)
    assert _trees_equal(resumed.model, full.model)
    assert _trees_equal(resumed.opt_state, full.opt_state)
    assert resumed.history == full.history
    with pytest.raises(ValueError, match="already holds checkpoints"):
        sfpjax.rl_train(_copy(ref), ref, src, prefer_zero, rc, key=jr.key(1), run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="key differs"):
        sfpjax.rl_train(_copy(ref), ref, src, prefer_zero, rc, key=jr.key(9), run_dir=tmp_path / "a", resume=True)


def test_bad_input_gives_clear_errors():
    ref = _model(0)
    src = sfpjax.ArrayPrompts(jnp.array([[0, 1]]))
    rc = sfpjax.RLConfig(steps=1, prompts_per_step=2, group_size=2, n_new=2)
    with pytest.raises(ValueError, match="one scalar per completion"):
        sfpjax.rl_train(_copy(ref), ref, src, lambda x, y, info: (y == 0).astype(jnp.float32), rc, key=jr.key(0))
    with pytest.raises(ValueError, match="group_size >= 2"):
        sfpjax.RLConfig(steps=1, prompts_per_step=2, group_size=1, n_new=2, advantage="group")
    sfpjax.RLConfig(steps=1, prompts_per_step=2, group_size=1, n_new=2, advantage="none")
    other = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=6, n_layers=1, d_model=16, d_mlp=32,
                                                        use_bos=True), key=jr.key(0))
    with pytest.raises(ValueError, match="reference model has vocab_size=4 but the policy has vocab_size=3"):
        sfpjax.rl_train(_copy(ref), other, src, prefer_zero, rc, key=jr.key(0))
    with pytest.raises(ValueError, match="reference model has vocab_size=4"):
        sfpjax.generate(ref, jnp.zeros((2, 1), jnp.int32), key=jr.key(0), n_new=1, reference=other)
    with pytest.raises(ValueError, match="prompt process emits 2 symbols"):
        sfpjax.rl_train(_copy(ref), ref, sfpjax.PromptSource(sfpjax.coin(), 2), prefer_zero, rc, key=jr.key(0))
    with pytest.raises(ValueError, match="exceeds the policy's n_ctx"):
        sfpjax.rl_train(_copy(ref), ref, sfpjax.ArrayPrompts(jnp.zeros((1, 5), jnp.int32)), prefer_zero, rc,
                        key=jr.key(0))
    with pytest.raises(ValueError, match="with_states=True needs an HMM"):
        sfpjax.PromptSource(sfpjax.tom_quantum(), 2, with_states=True)
    with pytest.raises(ValueError, match="kl_weights must have shape"):
        models = eqx.filter_vmap(lambda _: ref)(jnp.arange(2))
        sfpjax.rl_train_stack(models, ref, src, prefer_zero, rc, keys=jr.split(jr.key(0), 2), kl_weights=jnp.array([0.1]))


# The composing-vs-reweighting signature.


def _rand_logp(rng, shape):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(rng.normal(size=shape) * 1.5)), np.float64)


def test_reweighting_residual_is_zero_for_an_exact_tilt_and_recovers_one_over_beta():
    rng = np.random.default_rng(0)
    ref = _rand_logp(rng, (50, 4))
    r = rng.uniform(size=(50, 4))
    beta = 0.3
    pi = np.asarray(jax.nn.log_softmax(jnp.asarray(ref + r / beta)))
    fit = sfpjax.reweighting_residual(pi, ref, r[..., None])
    assert float(jnp.max(fit.residual)) < 1e-9
    np.testing.assert_allclose(fit.lam[:, 0], 1 / beta, rtol=1e-5)
    # One shared coefficient suffices too; and a global symbol preference is a shared tilt.
    shared = sfpjax.reweighting_residual(pi, ref, r[..., None], shared=True)
    assert float(shared.mean) < 1e-9 and shared.lam.shape == (1,)
    pref = np.asarray(jax.nn.log_softmax(jnp.asarray(ref + np.array([2.0, 0.0, -1.0, 0.0]))))
    onehot = sfpjax.reweighting_residual(pref, ref, shared=True)
    assert float(onehot.mean) < 1e-9
    np.testing.assert_allclose(onehot.lam, [2.0, 0.0, -1.0], atol=1e-5)


def test_reweighting_residual_of_a_non_tilt_is_the_brute_force_minimum():
    rng = np.random.default_rng(1)
    ref = _rand_logp(rng, (3, 3))
    pi = _rand_logp(rng, (3, 3))
    r = rng.uniform(size=(3, 3))
    fit = sfpjax.reweighting_residual(pi, ref, r[..., None])
    grid = np.linspace(-30, 30, 60001)
    for h in range(3):
        s = ref[h][None] + grid[:, None] * r[h][None]
        logq = s - np.log(np.exp(s).sum(1, keepdims=True))
        kl = (np.exp(pi[h])[None] * (pi[h][None] - logq)).sum(1)
        assert float(fit.residual[h]) == pytest.approx(kl.min(), abs=1e-6)
        assert float(fit.residual[h]) > 1e-3
    # A context-dependent change is not a shared symbol reweighting.
    assert float(sfpjax.reweighting_residual(pi, ref, shared=True).mean) > 1e-2


def test_reweighting_residual_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sfpjax.reweighting_residual(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="features must have shape"):
        sfpjax.reweighting_residual(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))


def test_compare_probes_sees_a_latent_appear_and_the_subspace_turn():
    rng = np.random.default_rng(2)
    n = 400
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    implies = ((1 - a) | b).astype(float)[:, None]
    beliefs = np.stack([a, b], 1).astype(float)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    # Before: a and b written linearly, the composite not; after: the composite gets its own direction.
    before = beliefs @ basis[:2] + 0.01 * rng.normal(size=(n, 8))
    after = before + implies @ basis[2:3]
    out = sfpjax.compare_probes(before, after, {"beliefs": beliefs, "implies": implies}, key=jr.key(0))
    assert out["beliefs"].r2_before > 0.99 and out["beliefs"].r2_after > 0.99
    assert out["implies"].r2_before < 0.8 < 0.99 < out["implies"].r2_after
    assert out["beliefs"].overlap > 0.99
    assert out["implies"].overlap < 0.9


def test_lora_policy_trains_only_its_adapters():
    ref = _model(0)
    method = sfpjax.LoRA(rank=1, targets=("mlp.W_out",))
    policy = method.wrap(ref, key=jr.key(7))
    rc = sfpjax.RLConfig(steps=3, prompts_per_step=2, group_size=4, n_new=1, learning_rate=0.05)
    out = sfpjax.rl_train(policy, ref, sfpjax.ArrayPrompts(jnp.array([[0, 1]])), prefer_zero, rc,
                          key=jr.key(0), trainable=method.trainable(policy))
    assert _trees_equal(out.model.base, ref)
    moved = [not np.array_equal(a.B, 0) for a in out.model.adapters.values()]
    assert all(moved)
    assert out.history[-1]["kl"] > 0
