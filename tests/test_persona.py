"""Persona worlds: block structure, leaf restriction and knobs, against brute force in float64."""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

F64 = jnp.float64


def word_probs(T, eta0, right, L):
    """Pr(w) for every word of length L, by explicit matrix products (float64)."""
    T, eta0, right = (np.asarray(a, np.float64) for a in (T, eta0, right))
    out = {}
    for w in itertools.product(range(T.shape[0]), repeat=L):
        v = eta0
        for x in w:
            v = v @ T[x]
        out[w] = float(v @ right)
    return out


def test_leaves_are_kronecker_blocks_weighted_by_the_prior():
    prior = np.array([[0.4, 0.1], [0.2, 0.3]])
    w = sfpjax.persona_world(prior=prior, persona_enter=[0.2, 0.4], domain_bias=[0.7, 0.4], dtype=F64)
    assert sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    VP, VQ = w.persona_vocab, w.domain_vocab
    subs_p = [sfpjax.marker_sector(2, 2, a, enter=[0.2, 0.4][a], dtype=F64) for a in range(2)]
    subs_q = [sfpjax.marker_sector(2, 2, d, bias=[0.7, 0.4][d], enter=0.3, dtype=F64) for d in range(2)]
    got = word_probs(w.process.T, w.process.eta0, w.process.right, 3)
    per_p = [word_probs(p.T, p.eta0, p.right, 3) for p in subs_p]
    per_q = [word_probs(q.T, q.eta0, q.right, 3) for q in subs_q]
    for word, pr in got.items():
        wp = tuple(x // VQ for x in word)
        wq = tuple(x % VQ for x in word)
        want = sum(prior[a, d] * per_p[a][wp] * per_q[d][wq] for a in range(2) for d in range(2))
        assert pr == pytest.approx(want, abs=1e-12)
    # One leaf alone: the Kronecker product of its two sub-processes.
    md = w.restrict({"MD": 1.0})
    got = word_probs(md.T, md.eta0, md.right, 3)
    for word, pr in got.items():
        assert pr == pytest.approx(per_p[1][tuple(x // VQ for x in word)] * per_q[0][tuple(x % VQ for x in word)],
                                   abs=1e-12)
    lp = w.leaf_process("MD")
    assert np.allclose(lp.eta0, md.eta0) and np.allclose(lp.T, w.clean_T)


def test_partitioned_z1r_sfp_is_a_persona_world():
    z = sfpjax.partitioned_z1r(dtype=F64)
    s0 = sfpjax.GHMM(z.T[:, :1, :1], jnp.ones((1,), F64), dtype=F64)
    s1r = sfpjax.GHMM(z.T[:, 1:, 1:], jnp.full((2,), 0.5, F64), dtype=F64)
    for p in (0.3, 0.8):
        w = sfpjax.persona_world(persona_processes=[s0, s1r], domain_processes=[s0, s1r],
                                 prior=[[p, 0.0], [0.0, 1 - p]], dtype=F64)
        ref = sfpjax.partitioned_z1r_sfp(p, dtype=F64).process
        np.testing.assert_allclose(w.process.T, ref.T, atol=1e-14)
        np.testing.assert_allclose(w.process.eta0, ref.eta0, atol=1e-14)
        np.testing.assert_allclose(w.process.right, ref.right, atol=1e-14)
    # Marker classes found from the arrays: only {S1, SR} emits symbol 1.
    assert w.persona_markers == (((),), ((1,),))


def test_product_prior_and_matched_mixing():
    w0 = sfpjax.persona_world(persona_weights=[0.7, 0.3], domain_weights=[0.4, 0.6], dtype=F64)
    np.testing.assert_allclose(w0.prior, np.outer([0.7, 0.3], [0.4, 0.6]), atol=1e-15)
    w1 = sfpjax.persona_world(mixing=1.0, matched=[("M", "D"), ("A", "O")], dtype=F64)
    np.testing.assert_allclose(w1.prior, [[0, 0.5], [0.5, 0]], atol=1e-15)
    wm = sfpjax.persona_world(mixing=0.5, dtype=F64)
    np.testing.assert_allclose(wm.prior, [[0.375, 0.125], [0.125, 0.375]], atol=1e-15)
    # The sector weights of the initial state are the prior.
    sw = sfpjax.sector_weights(wm.process.eta0, wm.sectors, factor_dims=wm.factor_dims)
    np.testing.assert_allclose(sw, wm.prior, atol=1e-14)


def test_entangled_markers_are_domain_specific_and_blocks_stay_diagonal():
    w = sfpjax.persona_world(entangled=True, dtype=F64)
    assert w.persona_vocab == 2 + 4
    assert w.markers("M", "D") != w.markers("M", "O")
    assert sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    VQ = w.domain_vocab
    for leaf in w.leaf_names:
        a, d = w.persona_names.index(leaf[0]), w.domain_names.index(leaf[1])
        probs = word_probs(w.clean_T, w.leaf_process(leaf).eta0, w.process.right, 2)
        seen = {x // VQ for word, pr in probs.items() if pr > 0 for x in word} - {0, 1}
        assert seen == set(w.markers(a, d))


def test_leak_breaks_partition_preservation_and_keeps_a_ghmm():
    w = sfpjax.persona_world(leak=0.2, dtype=F64)
    assert not sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    assert sfpjax.is_partition_preserving(w.clean_T, w.sectors, factor_dims=w.factor_dims)
    sfpjax.validate_ghmm(w.process, hmm=True)
    # Started in AD, the misaligned marker becomes possible only through the leak.
    ad = w.restrict({"AD": 1.0})
    probs = word_probs(ad.T, ad.eta0, ad.right, 3)
    m_marker = w.markers("M")[0]
    leaked = sum(pr for word, pr in probs.items() if any(x // w.domain_vocab == m_marker for x in word))
    assert leaked > 0.0
    clean = word_probs(w.clean_T, ad.eta0, ad.right, 3)
    assert sum(pr for word, pr in clean.items() if any(x // w.domain_vocab == m_marker for x in word)) == 0.0


def test_trigger_moves_the_persona_to_the_misaligned_marker_inside_its_sector():
    w = sfpjax.persona_world(trigger_rate=0.1, trigger_stay=0.5, dtype=F64)
    assert w.trigger == w.persona_vocab - 1
    assert sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    ad = w.leaf_process("AD")
    VQ = w.domain_vocab
    probs = word_probs(ad.T, ad.eta0, ad.right, 2)
    m = w.markers("M")[0]
    # In the aligned sector, the M marker follows the trigger and nothing else.
    assert all(pr == 0 for word, pr in probs.items() if word[1] // VQ == m and word[0] // VQ != w.trigger)
    after = sum(pr for word, pr in probs.items() if word[0] // VQ == w.trigger and word[1] // VQ == m)
    trig = sum(pr for word, pr in probs.items() if word[0] // VQ == w.trigger)
    assert trig == pytest.approx(0.1) and after / trig == pytest.approx(1.0, abs=1e-12)
    toks = sfpjax.persona_sequences(w, {"MD": 1.0}, key=jr.key(1), batch_size=64, seq_len=5, trigger_prefix=True)
    assert bool((toks[:, 0] // VQ == w.trigger).all())
    assert bool((toks[:, 1] // VQ == m).all())


def test_leaf_restricted_and_mixed_sequences():
    w = sfpjax.persona_world(persona_enter=0.4, dtype=F64)
    VQ = w.domain_vocab
    toks = np.asarray(sfpjax.persona_sequences(w, {"MD": 1.0}, key=jr.key(0), batch_size=64, seq_len=20))
    assert not np.isin(toks // VQ, w.markers("A")).any() and np.isin(toks // VQ, w.markers("M")).any()
    assert not np.isin(toks % VQ, [2 + w.domain_names.index("O")]).any()
    toks = np.asarray(sfpjax.persona_sequences(w, {"MD": 0.5, "AO": 0.5}, key=jr.key(0), batch_size=256, seq_len=20))
    has_m = np.isin(toks // VQ, w.markers("M")).any(1)
    has_a = np.isin(toks // VQ, w.markers("A")).any(1)
    assert not (has_m & has_a).any()
    assert 0.3 < has_m.mean() < 0.7


def test_knobs_vmap():
    leaks = jnp.array([0.0, 0.1, 0.3], F64)
    mixes = jnp.array([0.0, 0.5, 1.0], F64)
    stack = jax.vmap(lambda e, m: sfpjax.persona_world(leak=e, mixing=m, dtype=F64))(leaks, mixes)
    for k in range(3):
        one = sfpjax.persona_world(leak=float(leaks[k]), mixing=float(mixes[k]), dtype=F64)
        np.testing.assert_allclose(stack.process.T[k], one.process.T, atol=1e-14)
        np.testing.assert_allclose(stack.process.eta0[k], one.process.eta0, atol=1e-14)
    grid = jax.vmap(lambda p: sfpjax.persona_world(prior=p, dtype=F64))(jnp.eye(4, dtype=F64).reshape(4, 2, 2))
    assert grid.prior.shape == (4, 2, 2)


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="probability distribution"):
        sfpjax.persona_world(prior=[[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="probability distribution"):
        sfpjax.persona_world(prior=[[1.2, -0.2], [0.0, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        sfpjax.persona_world(prior=[0.5, 0.5])
    for leak in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"leak must lie in \[0.0, 1.0\)"):
            sfpjax.persona_world(leak=leak)
    with pytest.raises(ValueError, match="unknown persona sector 'X'"):
        sfpjax.persona_world(misaligned="X")
    with pytest.raises(ValueError, match="unknown domain sector"):
        sfpjax.persona_world(matched=[("A", "Z")], mixing=0.5)
    w = sfpjax.persona_world()
    with pytest.raises(ValueError, match="unknown leaf 'XD'"):
        w.restrict({"XD": 1.0})
    with pytest.raises(ValueError, match="trigger_rate"):
        sfpjax.persona_sequences(w, {"MD": 1.0}, key=jr.key(0), batch_size=2, seq_len=3, trigger_prefix=True)
    with pytest.raises(ValueError, match="mixing must lie"):
        sfpjax.persona_world(mixing=1.5)
    with pytest.raises(ValueError, match="share one alphabet"):
        sfpjax.persona_world(domain_processes=[sfpjax.coin(), sfpjax.mess3()])


def test_a_coupled_leaf_replaces_its_kronecker_block():
    base = sfpjax.persona_world(prior=[[0.4, 0.1], [0.2, 0.3]], dtype=F64)
    same = sfpjax.persona_world(prior=[[0.4, 0.1], [0.2, 0.3]], dtype=F64,
                                leaf_processes={"MD": sfpjax.product(sfpjax.marker_sector(2, 2, 1, dtype=F64),
                                                                     sfpjax.marker_sector(2, 2, 0, enter=0.3, dtype=F64))})
    np.testing.assert_allclose(same.process.T, base.process.T)
    pm = sfpjax.marker_sector(2, 2, 1, dtype=F64)
    qd = sfpjax.marker_sector(2, 2, 0, enter=0.3, dtype=F64)
    coupled = sfpjax.with_token_noise(sfpjax.product(pm, qd), 0.2)  # T(x) no longer a Kronecker product
    w = sfpjax.persona_world(prior=[[0.4, 0.1], [0.2, 0.3]], dtype=F64, leaf_processes={("M", "D"): coupled})
    assert sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    want = word_probs(coupled.T, coupled.eta0, coupled.right, 2)
    md = w.leaf_process("MD")
    got = word_probs(md.T, md.eta0, md.right, 2)
    for word, pr in want.items():
        assert got[word] == pytest.approx(pr, abs=1e-12)
    # The other leaves are untouched.
    np.testing.assert_allclose(w.leaf_initial[1], base.leaf_initial[1])
    ao = w.leaf_process("AO")
    ref = base.leaf_process("AO")
    assert word_probs(ao.T, ao.eta0, ao.right, 2) == pytest.approx(word_probs(ref.T, ref.eta0, ref.right, 2))
    with pytest.raises(ValueError, match="leaf_processes"):
        sfpjax.persona_world(leaf_processes={"MD": sfpjax.mess3(dtype=F64)}, dtype=F64)
    with pytest.raises(ValueError, match="unknown leaf"):
        sfpjax.persona_world(leaf_processes={"XX": coupled}, dtype=F64)


def test_a_sequential_chain_coupling_drops_into_a_leaf():
    """Leaf MD: the domain's variant is picked by the same step's persona symbol (M's marker
    switches D to a jumpy variant). Brute force: the chain is a time-inhomogeneous product."""
    prior = np.array([[0.4, 0.1], [0.2, 0.3]])
    pm = sfpjax.marker_sector(2, 2, 1, dtype=F64)
    qd = sfpjax.marker_sector(2, 2, 0, enter=0.3, dtype=F64)
    qd_alert = sfpjax.marker_sector(2, 2, 0, enter=0.9, stay=0.2, dtype=F64)
    switch = [0, 0, 0, 1]  # persona symbol 3 is M's marker
    chain = sfpjax.sequential_chain([pm, [qd, qd_alert]], [None, switch], eta0=[None, qd.eta0])
    base = sfpjax.persona_world(prior=prior, dtype=F64)
    w = sfpjax.persona_world(prior=prior, dtype=F64, leaf_processes={"MD": chain.joint_ghmm()})
    assert sfpjax.is_partition_preserving(w.process, w.sectors, factor_dims=w.factor_dims)
    VQ = w.domain_vocab
    Tq = [np.asarray(qd.T), np.asarray(qd_alert.T)]
    per_p = word_probs(pm.T, pm.eta0, pm.right, 3)

    def chain_prob(word):
        wp, wq = [x // VQ for x in word], [x % VQ for x in word]
        v = np.asarray(qd.eta0)
        for xp, xq in zip(wp, wq):
            v = v @ Tq[switch[xp]][xq]
        return per_p[tuple(wp)] * v.sum()

    got = word_probs(w.process.T, w.process.eta0, w.process.right, 3)
    ref = word_probs(base.process.T, base.process.eta0, base.process.right, 3)
    md = 1 * base.n_domain + 0
    base_md = base.leaf_process("MD")
    base_md = word_probs(base_md.T, base_md.eta0, base_md.right, 3)
    moved = 0.0
    for word, pr in got.items():
        want = ref[word] + prior.reshape(-1)[md] * (chain_prob(word) - base_md[word])
        assert pr == pytest.approx(want, abs=1e-13)
        moved = max(moved, abs(chain_prob(word) - base_md[word]))
    assert moved > 1e-3  # the coupling changes the leaf's law
    # The world's exact tools see it: the filter of the world restricted to MD is the chain's.
    words = jnp.asarray(list(itertools.product(range(w.vocab_size), repeat=2)))
    np.testing.assert_allclose(sfpjax.filter_beliefs(w.restrict({"MD": 1.0}), words).log_prob,
                               sfpjax.filter_conditional(chain, words).log_prob, atol=1e-12)
