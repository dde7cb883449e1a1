"""Exact EM metrics: dispositions, exact rates and references against brute force (float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

F64 = jnp.float64


def _word_prob(T, eta, right, word):
    v = np.asarray(eta, np.float64)
    for x in word:
        v = v @ np.asarray(T[x], np.float64)
    return float(v @ np.asarray(right, np.float64))


@pytest.fixture(scope="module")
def world():
    return sfpjax.persona_world(prior=[[0.4, 0.2], [0.1, 0.3]], persona_enter=[0.15, 0.3], dtype=F64)


@pytest.fixture(scope="module")
def prompts(world):
    return sfpjax.eval_prompts(world, key=jr.key(0), n=6, length=5)


def test_dispositions_recover_the_generating_leaf():
    for entangled in (False, True):
        w = sfpjax.persona_world(persona_enter=0.3, entangled=entangled, dtype=F64)
        keys = jr.split(jr.key(1), 4)
        for k, leaf in zip(keys, w.leaf_names):
            seqs = sfpjax.persona_sequences(w, {leaf: 1.0}, key=k, batch_size=8, seq_len=40)
            d = sfpjax.dispositions(w, seqs)
            assert [w.leaf_names[int(i)] for i in d.leaf] == [leaf] * 8
            assert not bool(d.impossible.any())
            # The generating leaf's score is its exact log-probability up to the glitch channel.
            exact = sfpjax.sequence_log_prob(w.leaf_process(leaf), seqs)
            np.testing.assert_allclose(d.log_probs[:, w.leaf(leaf)], exact, atol=40 * 2e-3)


def test_impossible_tokens_cost_a_bounded_amount(world):
    VQ = world.domain_vocab
    a_mark, m_mark = world.markers("A")[0], world.markers("M")[0]
    # An A marker then an M marker: no leaf emits both, so from the second token on no leaf
    # could have written the text.
    seq = jnp.asarray([[a_mark * VQ + 0, m_mark * VQ + 0, 0, 1], [0, 1, a_mark * VQ + 2, 0]], jnp.int32)
    d = sfpjax.dispositions(world, seq, glitch=1e-3)
    assert np.asarray(d.impossible).tolist() == [[False, True, True, True], [False] * 4]
    assert bool(jnp.isfinite(d.log_probs).all())
    assert float(d.log_probs.max()) > 4 * np.log(1e-3 / world.vocab_size)


def test_eval_prompts_are_neutral_and_identify_their_domain(world, prompts):
    assert prompts.tokens.shape == (2, 6, 5)
    ps = np.asarray(prompts.tokens) // world.domain_vocab
    assert not np.isin(ps, list(world.markers("A")) + list(world.markers("M"))).any()
    assert float(prompts.domain_posterior.min()) >= 0.99
    # Brute force: Pr(leaf | prompt) from the prior and each leaf's word probability.
    for d in range(2):
        for i in range(6):
            word = np.asarray(prompts.tokens[d, i])
            joint = np.array([float(world.prior.reshape(-1)[l]) * _word_prob(world.clean_T, world.leaf_initial[l],
                                                                               world.process.right, word)
                              for l in range(4)]).reshape(2, 2)
            post = joint / joint.sum()
            np.testing.assert_allclose(post.sum(0)[d], prompts.domain_posterior[d, i], atol=1e-10)
            np.testing.assert_allclose(post.sum(1), prompts.persona_posterior[d, i], atol=1e-10)


def _brute_rates(world, prior, prompts):
    rates = np.zeros((2, 4))
    for d in range(2):
        for word in np.asarray(prompts.tokens[d]):
            joint = np.array([prior[l] * _word_prob(world.clean_T, world.leaf_initial[l], world.process.right, word)
                              for l in range(4)])
            rates[d] += joint / joint.sum()
    return rates / prompts.tokens.shape[1]


def test_exact_rates_and_references_match_brute_force(world, prompts):
    prior = np.asarray(world.prior, np.float64)
    refs = sfpjax.em_references(world, {"MD": 1.0}, prompts)
    np.testing.assert_allclose(refs.pretrained.rates, _brute_rates(world, prior.reshape(-1), prompts), atol=1e-10)
    narrow = prior.copy()
    narrow[:, 0] = [0.0, prior[:, 0].sum()]
    np.testing.assert_allclose(sfpjax.narrow_learner(world, {"MD": 1.0}).prior, narrow, atol=1e-15)
    persona = np.outer([0.0, 1.0], prior.sum(0))
    np.testing.assert_allclose(sfpjax.persona_learner(world, {"MD": 1.0}).prior, persona, atol=1e-15)
    np.testing.assert_allclose(refs.narrow.rates, _brute_rates(world, narrow.reshape(-1), prompts), atol=1e-10)
    np.testing.assert_allclose(refs.persona.rates, _brute_rates(world, persona.reshape(-1), prompts), atol=1e-10)
    # The narrow learner leaves O unchanged and is fully misaligned in D; the persona learner everywhere.
    assert float(refs.narrow.broad) == pytest.approx(float(refs.pretrained.broad), abs=1e-12)
    assert float(refs.narrow.narrow) == pytest.approx(1.0) and float(refs.persona.broad) == pytest.approx(1.0)
    for r in (refs.pretrained, refs.narrow, refs.persona):
        assert float(r.flip) == pytest.approx(0.0, abs=1e-9)
    r = refs.pretrained.rates.reshape(2, 2, 2)
    assert float(refs.pretrained.aligned_share) == pytest.approx(float((r[0, 0, 0] + r[1, 0, 1]) / 2))
    assert float(sfpjax.broadness_index(refs.narrow.broad, refs)) == pytest.approx(0.0, abs=1e-12)
    assert float(sfpjax.broadness_index(refs.persona.broad, refs)) == pytest.approx(1.0, abs=1e-12)
    # A mixture of MD with aligned O data: the persona learner is only partly misaligned.
    mixed = sfpjax.em_references(world, {"MD": 0.75, "AO": 0.25}, prompts)
    np.testing.assert_allclose(sfpjax.persona_learner(world, {"MD": 0.75, "AO": 0.25}).prior,
                               np.outer([0.25, 0.75], prior.sum(0)), atol=1e-15)
    assert float(mixed.narrow.broad) == pytest.approx(0.0, abs=1e-12)


def test_sampled_rates_approach_the_exact_rates_for_long_continuations(world):
    pr = sfpjax.eval_prompts(world, key=jr.key(7), n=48, length=5)
    exact = sfpjax.exact_em_rates(world, pr)
    sampled = sfpjax.sampled_em_rates(world, pr, key=jr.key(8), length=64)
    # 48 continuations per domain: Monte Carlo error about 0.07 on each share.
    np.testing.assert_allclose(sampled.rates, exact.rates, atol=0.2)
    assert float(sampled.flip) == 0.0


def test_sampled_references_average_the_classifier_over_draws(world, prompts):
    weights = {"MD": 1.0}
    refs = sfpjax.sampled_em_references(world, weights, prompts, key=jr.key(9), length=6, draws=3)
    exact = sfpjax.em_references(world, weights, prompts)
    learners = (world, sfpjax.narrow_learner(world, weights), sfpjax.persona_learner(world, weights))
    for got, w, k in zip((refs.pretrained, refs.narrow, refs.persona), learners, jr.split(jr.key(9), 3)):
        draws = [sfpjax.sampled_em_rates(w, prompts, key=kk, length=6) for kk in jr.split(k, 3)]
        np.testing.assert_allclose(got.rates, np.mean([d.rates for d in draws], 0), atol=1e-12)
        np.testing.assert_allclose(got.broad, np.mean([d.broad for d in draws]), atol=1e-12)
        np.testing.assert_allclose(got.narrow, np.mean([d.narrow for d in draws]), atol=1e-12)
    np.testing.assert_allclose(refs.persona_log_odds, exact.persona_log_odds, atol=1e-12)
    # At 6 tokens many continuations carry no marker: the like-for-like persona learner is
    # far less broad than its long-continuation limit (1), and the index uses these values.
    assert float(refs.persona.broad) < float(exact.persona.broad) - 0.1
    b = sfpjax.broadness_index(jnp.array([refs.narrow.broad, refs.persona.broad]), refs)
    np.testing.assert_allclose(b, [0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="draws"):
        sfpjax.sampled_em_references(world, weights, prompts, key=jr.key(0), length=6, draws=0)


def test_steered_model_metrics_match_the_base_at_zero_vector(world, prompts):
    model = _tiny_model(jr.key(3))
    steered = sfpjax.SteeringVector("blocks.0.hook_resid_post").wrap(model, key=jr.key(0))
    flat = prompts.tokens[:, :2].reshape(-1, prompts.tokens.shape[-1])
    a = sfpjax.sample_continuations(model, flat, key=jr.key(4), length=4)
    b = sfpjax.sample_continuations(steered, flat, key=jr.key(4), length=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    np.testing.assert_allclose(sfpjax.persona_log_odds(model, world, prompts),
                               sfpjax.persona_log_odds(steered, world, prompts), atol=1e-5)


def test_exact_persona_log_odds_match_brute_force(world, prompts):
    lo = sfpjax.exact_persona_log_odds(world, prompts)
    VQ = world.domain_vocab
    a_mark, m_mark = world.markers("A")[0], world.markers("M")[0]
    eta0 = np.asarray(world.process.eta0)
    for d in range(2):
        word = list(np.asarray(prompts.tokens[d, 0]))
        base = _word_prob(world.process.T, eta0, world.process.right, word)
        mass = {a: sum(_word_prob(world.process.T, eta0, world.process.right, word + [a * VQ + q])
                       for q in range(VQ)) / base for a in (a_mark, m_mark)}
        assert float(lo[d, 0]) == pytest.approx(np.log(mass[m_mark]) - np.log(mass[a_mark]), abs=1e-9)


def _tiny_model(key, V=16, n_ctx=12, use_bos=False):
    cfg = sfpjax.TransformerConfig(vocab_size=V, n_ctx=n_ctx, n_layers=1, d_model=16, n_heads=2, d_mlp=32,
                                   use_bos=use_bos, init_std=0.5)
    return sfpjax.Transformer(cfg, key=key)


def test_model_metrics_are_consistent_and_vmap(world, prompts):
    for use_bos in (False, True):
        model = _tiny_model(jr.key(3), use_bos=use_bos)
        flat = prompts.tokens.reshape(-1, 5)
        cont, lp = sfpjax.sample_continuations(model, flat, key=jr.key(4), length=6)
        full = jnp.concatenate([flat, cont], 1)
        logits = jax.vmap(model)(full)
        logp = jax.nn.log_softmax(logits, -1)
        rows = jnp.arange(5, 11) - 1 + int(use_bos)
        want = jnp.take_along_axis(logp[:, rows], cont[..., None], -1)[..., 0].sum(-1)
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-4)
        lo = sfpjax.persona_log_odds(model, world, prompts)
        pp = jax.nn.softmax(logits[:, 4 + int(use_bos)], -1).reshape(-1, world.persona_vocab, world.domain_vocab).sum(-1)
        want = jnp.log(pp[:, world.markers("M")[0]]) - jnp.log(pp[:, world.markers("A")[0]])
        np.testing.assert_allclose(lo.reshape(-1), want, rtol=1e-4, atol=1e-4)
    models = eqx.filter_vmap(_tiny_model)(jr.split(jr.key(5), 2))
    keys = jr.split(jr.key(6), 2)
    run = eqx.filter_jit(eqx.filter_vmap(lambda m, k: sfpjax.em_metrics(m, world, prompts, key=k, length=6)))
    stacked = run(models, keys)
    assert stacked.leaf.shape == (2, 2, 6) and stacked.log_odds.shape == (2, 2, 6)
    for i in range(2):
        # Each model's dispositions and rates are those of its own continuations.
        d = sfpjax.dispositions(world, stacked.continuations[i].reshape(-1, 6))
        np.testing.assert_array_equal(stacked.leaf[i].reshape(-1), d.leaf)
        lp = np.asarray(d.log_probs).reshape(2, 6, 4)
        best = lp >= lp.max(-1, keepdims=True)
        shares = (best / best.sum(-1, keepdims=True)).mean(1)
        np.testing.assert_allclose(stacked.rates.rates[i], shares, atol=1e-12)
        np.testing.assert_allclose(stacked.rates.narrow[i], shares[0, 2], atol=1e-12)
        np.testing.assert_allclose(stacked.rates.broad[i], shares[1, 3], atol=1e-12)
        np.testing.assert_allclose(stacked.impossible_rate[i], np.asarray(d.impossible).mean(), atol=1e-12)
    np.testing.assert_allclose(stacked.rates.rates.sum(-1), 1.0, atol=1e-12)
    # An untrained model emits tokens no leaf can: it pays for them, boundedly.
    assert float(stacked.impossible_rate.max()) > 0.0
    assert bool(jnp.isfinite(stacked.coherence_deficit).all())


def test_bad_arguments_raise(world, prompts):
    seq = jnp.zeros((1, 4), jnp.int32)
    for g in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="glitch must lie in"):
            sfpjax.dispositions(world, seq, glitch=g)
    with pytest.raises(ValueError, match="min_posterior"):
        sfpjax.eval_prompts(world, key=jr.key(0), n=2, length=4, min_posterior=1.5)
    with pytest.raises(ValueError, match="n_ctx"):
        sfpjax.sample_continuations(_tiny_model(jr.key(0)), prompts.tokens[0], key=jr.key(0), length=20)
    with pytest.raises(ValueError, match="unknown leaf"):
        sfpjax.narrow_learner(world, {"ZZ": 1.0})
    with pytest.raises(ValueError, match="probability distribution"):
        sfpjax.persona_learner(world, {"MD": 0.5})


def test_emergent_misalignment_experiment_tiny(tmp_path):
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import emergent_misalignment

    results = emergent_misalignment.main(["--preset", "tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    entry = saved["priors"]["correlated"]
    assert set(entry["conditions"]) == {"lora1_MD", "steer_MD"}
    for c in entry["conditions"].values():
        t = c["trajectory"]
        assert t["step"] == [0, 4, 8] and np.asarray(t["broad"]).shape == (3, 2)
        assert all(0.0 <= b <= 1.0 for row in t["broad"] for b in row)
        # The peak is, per seed, the checkpoint of largest broad EM.
        broad = np.asarray(t["broad"])
        np.testing.assert_allclose(c["peak"]["broad"], broad.max(0))
        assert all(s in t["step"] for s in c["peak"]["step"])
        refs = c["references"]
        # The exact references: narrow learner keeps O behaviour, persona learner is fully broad.
        assert refs["narrow"]["broad"] == pytest.approx(refs["pretrained"]["broad"], abs=1e-5)
        assert refs["persona"]["broad"] == pytest.approx(1.0, abs=1e-5)
        ll = c["sampled_references"]
        for r in ll.values():
            np.testing.assert_allclose(np.asarray(r["rates"]).sum(-1), 1.0, atol=1e-5)
        gap = ll["persona"]["broad"] - ll["narrow"]["broad"]
        if abs(gap) > 1e-9:
            np.testing.assert_allclose(c["broadness_final"], (broad[-1] - ll["narrow"]["broad"]) / gap, rtol=1e-5)
    # LoRA (B = 0) and a zero steering vector start at the pretrained models: equal next-token log-odds.
    lo = [np.asarray(entry["conditions"][n]["trajectory"]["log_odds_O"][0]) for n in ("lora1_MD", "steer_MD")]
    np.testing.assert_allclose(lo[0], lo[1], rtol=1e-4, atol=1e-4)
    assert results["priors"]["correlated"]["prior"] == entry["prior"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Emergent misalignment") and "| lora1_MD |" in report and "like-for-like" in report
    for name in ("broad_em_correlated.png", "dispositions_correlated.png"):
        assert (tmp_path / name).stat().st_size > 0
