import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from _env import subprocess_env
from oracles import small_process, z1r_T
from oracles import random_ghmm, random_hmm, word_prob_and_belief, words


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r"])
def test_brute_force_words_up_to_length_6(kind):
    T, eta0, right = small_process(kind)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    V = T.shape[0]
    for n in range(1, 7):
        ws = np.stack(words(V, n))
        out = sfpjax.filter_beliefs(p, jnp.asarray(ws))
        total = 0.0
        for i, w in enumerate(ws):
            prob, belief = word_prob_and_belief(T, eta0, right, w)
            total += prob
            if prob > 1e-14:
                np.testing.assert_allclose(np.exp(out.log_prob[i]), prob, rtol=1e-9, atol=1e-14)
                np.testing.assert_allclose(out.beliefs[i, -1], belief, rtol=1e-8, atol=1e-10)
                # every prefix belief too
                np.testing.assert_allclose(out.beliefs[i, n // 2], word_prob_and_belief(T, eta0, right, w[: n // 2 + 1])[1], atol=1e-9)
            elif kind == "z1r":
                assert out.log_prob[i] == -np.inf
                assert np.isfinite(out.beliefs[i]).all()
        np.testing.assert_allclose(total, 1.0, atol=1e-10)


def test_alignment_convention_and_initial():
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    toks = jnp.array([0, 1, 0, 0, 1])
    out = sfpjax.filter_beliefs(p, toks)
    assert out.beliefs.shape == (5, 3)
    # after "0" from the uniform start: SR->S0 (1/2) or S0->S1 (1) => weights S0:1/6... normalized
    np.testing.assert_allclose(out.beliefs[0], [1 / 3, 2 / 3, 0.0], atol=1e-6)
    full = sfpjax.beliefs_with_initial(p, out)
    np.testing.assert_allclose(full[0], p.eta0)
    np.testing.assert_allclose(full[1:], out.beliefs)
    # a given initial belief
    out2 = sfpjax.filter_beliefs(p, toks, initial=jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(out2.beliefs[0], [0.0, 1.0, 0.0], atol=1e-7)


def test_batch_axes_and_single_sequence_agree():
    rng = np.random.default_rng(1)
    p = sfpjax.GHMM(random_hmm(rng, 3, 4), hmm=True)
    toks = jnp.asarray(rng.integers(0, 3, (2, 3, 7)), jnp.int32)
    out = sfpjax.filter_beliefs(p, toks)
    assert out.beliefs.shape == (2, 3, 7, 4)
    single = sfpjax.filter_beliefs(p, toks[1, 2])
    np.testing.assert_allclose(out.beliefs[1, 2], single.beliefs, rtol=1e-6)
    np.testing.assert_allclose(out.log_normalizers[1, 2], single.log_normalizers, rtol=1e-6)
    # vmap over a batch of single sequences equals the batched path
    vm = jax.vmap(lambda t: sfpjax.filter_beliefs(p, t))(toks[0])
    np.testing.assert_allclose(vm.beliefs, out.beliefs[0], rtol=1e-6)


def test_sequential_updates_agree_with_filter():
    rng = np.random.default_rng(2)
    T, eta0, right = random_ghmm(rng, 3, 3)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    toks = jnp.asarray(rng.integers(0, 3, 20), jnp.int32)
    out = sfpjax.filter_beliefs(p, toks)
    eta = p.eta0
    for t, x in enumerate(toks):
        eta, lp = sfpjax.belief_update(p, eta, x)
        np.testing.assert_allclose(eta, out.beliefs[t], atol=1e-10)
        np.testing.assert_allclose(lp, out.log_normalizers[t], atol=1e-10)


def test_long_sequences_stay_normalized_float32(getkey):
    rng = np.random.default_rng(3)
    T, eta0, right = random_ghmm(rng, 3, 3)
    p = sfpjax.GHMM(T, eta0, right)
    toks = sfpjax.sample(p, key=getkey(), batch_size=2, seq_len=100_000)
    out = sfpjax.filter_beliefs(p, toks)
    assert out.beliefs.dtype == jnp.float32
    assert bool(jnp.isfinite(out.beliefs).all())
    np.testing.assert_allclose(out.beliefs @ p.right, 1.0, atol=1e-4)
    assert bool(jnp.isfinite(out.log_prob).all())


def test_zero_probability_sequence_reported_without_nan():
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    out = sfpjax.filter_beliefs(p, jnp.array([[1, 1, 1, 0], [0, 1, 0, 0]]))
    assert not bool(out.is_possible[0]) and bool(out.is_possible[1])
    assert out.log_prob[0] == -jnp.inf
    assert bool(jnp.isfinite(out.beliefs).all())


def test_next_token_probs_match_word_probabilities():
    rng = np.random.default_rng(4)
    T, eta0, right = random_ghmm(rng, 3, 3)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    w = np.array([2, 0, 1])
    q = sfpjax.next_token_probs(p, sfpjax.filter_beliefs(p, jnp.asarray(w)).beliefs[-1])
    pw = word_prob_and_belief(T, eta0, right, w)[0]
    for x in range(3):
        pwx = word_prob_and_belief(T, eta0, right, np.append(w, x))[0]
        np.testing.assert_allclose(q[x], pwx / pw, rtol=1e-9)


def test_tokens_out_of_alphabet_rejected():
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    with pytest.raises(Exception, match=r"tokens outside the alphabet.*\[0, 2\)"):
        sfpjax.filter_beliefs(p, jnp.array([0, 1, 2]))
    with pytest.raises(Exception, match=r"tokens outside the alphabet"):
        sfpjax.filter_beliefs(p, jnp.array([0, -1]))


def test_structural_errors():
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    # Without runtime type checking our own ValueError fires; with it, jaxtyping's.
    with pytest.raises((ValueError, TypeError), match=r"integer array|Int\["):
        sfpjax.filter_beliefs(p, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least one token"):
        sfpjax.filter_beliefs(p, jnp.zeros((3, 0), jnp.int32))
    with pytest.raises(ValueError, match="single process"):
        stacked = jax.tree.map(lambda a: jnp.stack([a, a]), p)
        sfpjax.filter_beliefs(stacked, jnp.array([0, 1]))


def test_vmap_over_stacked_processes():
    rng = np.random.default_rng(5)
    Ts = np.stack([random_hmm(rng, 2, 3) for _ in range(4)])
    procs = jax.vmap(lambda T: sfpjax.GHMM(T, right=jnp.ones(3)))(jnp.asarray(Ts))
    toks = jnp.asarray(rng.integers(0, 2, (4, 5, 6)), jnp.int32)
    out = jax.vmap(sfpjax.filter_beliefs)(procs, toks)
    for k in range(4):
        ref = sfpjax.filter_beliefs(sfpjax.GHMM(Ts[k], hmm=True), toks[k])
        np.testing.assert_allclose(out.beliefs[k], ref.beliefs, rtol=1e-5, atol=1e-6)


def test_filter_does_not_retrace():
    import equinox as eqx

    p = sfpjax.GHMM(z1r_T(), hmm=True)
    f = eqx.debug.assert_max_traces(lambda t: sfpjax.filter_beliefs(p, t), max_traces=1)
    f = eqx.filter_jit(f)
    for seed in range(3):
        f(jnp.asarray(np.random.default_rng(seed).integers(0, 2, (4, 8)), jnp.int32))


def _factor(rng, kind):
    if kind == "hmm":
        return sfpjax.GHMM(random_hmm(rng, 2, 3, sparsity=0.4), hmm=True, dtype=jnp.float64)
    if kind == "ghmm":
        T, eta0, right = random_ghmm(rng, 3, 2)
        return sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    return sfpjax.GHMM(z1r_T(), hmm=True, dtype=jnp.float64)


@pytest.mark.parametrize("kinds", [("hmm", "z1r"), ("ghmm", "hmm"), ("z1r", "ghmm", "hmm")])
def test_factored_path_matches_joint_path(kinds):
    rng = np.random.default_rng(len(kinds))
    factors = [_factor(rng, k) for k in kinds]
    prod = sfpjax.product(*factors)
    assert prod.factors is not None and len(prod.factors) == len(kinds)
    joint = sfpjax.GHMM(prod.T, prod.eta0, prod.right, dtype=jnp.float64)
    assert joint.factors is None
    # 75 steps: two full time blocks and a remainder; random tokens hit impossible words
    toks = jnp.asarray(rng.integers(0, prod.vocab_size, (6, 75)), jnp.int32)
    toks = toks.at[0].set(sfpjax.sample(prod, key=jr.key(1), batch_size=1, seq_len=75)[0])
    fac = sfpjax.filter_beliefs(prod, toks)
    ref = sfpjax.filter_beliefs(joint, toks)
    np.testing.assert_allclose(fac.beliefs, ref.beliefs, atol=1e-9)
    np.testing.assert_array_equal(np.isneginf(fac.log_normalizers), np.isneginf(ref.log_normalizers))
    finite = np.isfinite(ref.log_normalizers)
    np.testing.assert_allclose(fac.log_normalizers[finite], ref.log_normalizers[finite], atol=1e-9)
    assert bool(fac.is_possible[0])
    if "z1r" in kinds:
        assert not bool(fac.is_possible.all())  # some impossible sequences were exercised
    assert bool(jnp.isfinite(fac.beliefs).all())


def test_factored_path_follows_the_initial_belief():
    rng = np.random.default_rng(7)
    a, b = _factor(rng, "hmm"), _factor(rng, "z1r")
    prod = sfpjax.product(a, b)
    joint = sfpjax.GHMM(prod.T, prod.eta0, prod.right, dtype=jnp.float64)
    toks = jnp.asarray(rng.integers(0, prod.vocab_size, (3, 40)), jnp.int32)
    # A correlated (non-product) start: the factors are dropped, the joint path runs.
    eta = np.zeros(9)
    eta[0] = eta[4] = 0.5
    entangled = prod.with_initial(eta)
    assert entangled.factors is None
    np.testing.assert_allclose(sfpjax.filter_beliefs(entangled, toks).beliefs,
                               sfpjax.filter_beliefs(joint.with_initial(eta), toks).beliefs, atol=1e-12)
    # An explicit non-product `initial` falls back to the joint update.
    out = sfpjax.filter_beliefs(prod, toks, initial=jnp.asarray(eta))
    np.testing.assert_allclose(out.beliefs, sfpjax.filter_beliefs(joint, toks, initial=jnp.asarray(eta)).beliefs,
                               atol=1e-12)
    # A product start keeps the factors, restarted from the marginals.
    start = np.kron([0.2, 0.3, 0.5], [1.0, 0.0, 0.0])
    moved = prod.with_initial(start)
    assert moved.factors is not None
    np.testing.assert_allclose(moved.factors[0].eta0, [0.2, 0.3, 0.5], atol=1e-12)
    np.testing.assert_allclose(sfpjax.filter_beliefs(moved, toks).beliefs,
                               sfpjax.filter_beliefs(joint.with_initial(start), toks).beliefs, atol=1e-12)
    assert prod.astype(jnp.float32).factors[1].dtype == jnp.float32


def test_vmap_over_stacked_product_processes():
    rng = np.random.default_rng(8)
    Ta = jnp.asarray(np.stack([random_hmm(rng, 2, 2) for _ in range(3)]))
    Tb = jnp.asarray(np.stack([random_hmm(rng, 3, 2) for _ in range(3)]))
    make = lambda ta, tb: sfpjax.product(sfpjax.GHMM(ta, right=jnp.ones(2)), sfpjax.GHMM(tb, right=jnp.ones(2)))
    procs = jax.vmap(make)(Ta, Tb)
    assert procs.factors[0].T.shape == (3, 2, 2, 2)
    toks = jnp.asarray(rng.integers(0, 6, (3, 4, 37)), jnp.int32)
    out = jax.vmap(sfpjax.filter_beliefs)(procs, toks)
    for k in range(3):
        p = make(Ta[k], Tb[k])
        ref = sfpjax.filter_beliefs(sfpjax.GHMM(p.T, p.eta0, p.right), toks[k])
        np.testing.assert_allclose(out.beliefs[k], ref.beliefs, atol=1e-5)
        np.testing.assert_allclose(out.log_normalizers[k], ref.log_normalizers, atol=1e-5)


@pytest.mark.parametrize("L", [5, 32, 70])
def test_reused_output_buffers(L):
    rng = np.random.default_rng(9)
    p = sfpjax.product(sfpjax.mess3(), sfpjax.z1r())
    toks = [jnp.asarray(rng.integers(0, p.vocab_size, (2, 3, L)), jnp.int32) for _ in range(3)]
    res = sfpjax.filter_beliefs(p, toks[0])
    for t in toks[1:]:
        old = res
        ptrs = (old.beliefs.unsafe_buffer_pointer(), old.log_normalizers.unsafe_buffer_pointer())
        res = sfpjax.filter_beliefs(p, t, out=old)
        assert old.beliefs.is_deleted()  # donated: the old result is no longer usable
        # written in place: the new result lives in the old buffers
        assert (res.beliefs.unsafe_buffer_pointer(), res.log_normalizers.unsafe_buffer_pointer()) == ptrs
        fresh = sfpjax.filter_beliefs(p, t)
        np.testing.assert_array_equal(res.beliefs, fresh.beliefs)
        np.testing.assert_array_equal(res.log_normalizers, fresh.log_normalizers)
    # the joint path and an explicit initial reuse buffers as well
    q = sfpjax.mess3()
    res = sfpjax.filter_beliefs(q, toks[0] % 3)
    res = sfpjax.filter_beliefs(q, toks[1] % 3, initial=jnp.array([1.0, 0.0, 0.0]), out=res)
    ref = sfpjax.filter_beliefs(q, toks[1] % 3, initial=jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(res.beliefs, ref.beliefs)


def test_bad_output_buffers_rejected():
    p = sfpjax.mess3()
    toks = jnp.zeros((4, 10), jnp.int32)
    res = sfpjax.filter_beliefs(p, toks)
    with pytest.raises(ValueError, match=r"out.beliefs must have shape \(4, 11, 3\)"):
        sfpjax.filter_beliefs(p, jnp.zeros((4, 11), jnp.int32), out=res)
    with pytest.raises(ValueError, match=r"dtype float64"):
        sfpjax.filter_beliefs(p.astype(jnp.float64), toks, out=res)
    with pytest.raises((ValueError, TypeError), match=r"FilterResult"):
        sfpjax.filter_beliefs(p, toks, out=(res.beliefs, res.log_normalizers))
    # Without runtime type checking our own ValueError fires; with it, jaxtyping's.
    with pytest.raises((ValueError, TypeError), match=r"does not broadcast|\*#batch d"):
        sfpjax.filter_beliefs(p, toks, initial=jnp.ones((3, 3)) / 3)


def _reference(process, tokens, initial=None):
    """The public per-sequence reference filter, vmapped over the leading axes of ``tokens``."""
    one = lambda t, i: sfpjax.filter_beliefs_reference(process, t, initial=i)
    if tokens.ndim == 1:
        return one(tokens, initial)
    return jax.vmap(one, in_axes=(0, None if initial is None or initial.ndim == 1 else 0))(tokens, initial)


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r"])
def test_reference_filter_matches_brute_force_on_every_prefix(kind):
    T, eta0, right = small_process(kind)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    V, n = T.shape[0], 5
    ws = np.stack(words(V, n))
    ref = _reference(p, jnp.asarray(ws))
    assert ref.beliefs.shape == (V**n, n, 3) and ref.log_normalizers.shape == (V**n, n)
    impossible = 0
    for i, w in enumerate(ws):
        for t in range(n):
            prob, belief = word_prob_and_belief(T, eta0, right, w[: t + 1])
            if prob > 1e-14:
                np.testing.assert_allclose(np.exp(ref.log_normalizers[i, : t + 1].sum()), prob, rtol=1e-9)
                np.testing.assert_allclose(ref.beliefs[i, t], belief, rtol=1e-8, atol=1e-10)
            else:
                impossible += 1
                assert ref.log_normalizers[i, : t + 1].sum() == -np.inf
    assert (impossible > 0) == (kind == "z1r")
    assert bool(jnp.isfinite(ref.beliefs).all())


def _reference_case(kind, rng):
    if kind == "product":
        return sfpjax.product(_factor(rng, "ghmm"), _factor(rng, "z1r"))
    T, eta0, right = small_process(kind)
    return sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)


@pytest.mark.parametrize("kind", ["hmm", "ghmm", "z1r", "product"])
def test_tuned_filter_matches_reference_filter(kind):
    # A length of one time block and a remainder; for the product (5 factor states) more
    # sequences than one batch chunk: every path of the tuned kernel is compared.
    rng = np.random.default_rng(11)
    p = _reference_case(kind, rng)
    B, L = 300, 40
    toks = jnp.asarray(rng.integers(0, p.vocab_size, (B, L)), jnp.int32)
    toks = toks.at[:8].set(sfpjax.sample(p, key=jr.key(4), batch_size=8, seq_len=L))
    fast, ref = sfpjax.filter_beliefs(p, toks), _reference(p, toks)
    np.testing.assert_allclose(fast.beliefs, ref.beliefs, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(np.isneginf(fast.log_normalizers), np.isneginf(ref.log_normalizers))
    finite = np.isfinite(ref.log_normalizers)
    np.testing.assert_allclose(fast.log_normalizers[finite], ref.log_normalizers[finite], rtol=1e-9, atol=1e-11)
    assert bool(ref.is_possible[:8].all())
    if kind in ("z1r", "product"):
        assert not bool(ref.is_possible.all())  # impossible steps were exercised
    if kind != "z1r":
        return  # (one case suffices for the next path: each costs a compilation)
    # one explicit initial belief per sequence: the joint path of the tuned kernel
    init = np.asarray(jr.dirichlet(jr.key(5), jnp.ones(p.num_states), (B,)), np.float64)
    init = jnp.asarray(init / (init @ np.asarray(p.right))[:, None])
    fast, ref = sfpjax.filter_beliefs(p, toks, initial=init), _reference(p, toks, init)
    np.testing.assert_allclose(fast.beliefs, ref.beliefs, rtol=1e-9, atol=1e-11)


def test_reference_filter_vmaps_over_stacked_processes_and_checks_its_input():
    rng = np.random.default_rng(12)
    Ts = jnp.asarray(np.stack([random_hmm(rng, 2, 3) for _ in range(3)]))
    procs = jax.vmap(lambda T: sfpjax.GHMM(T, right=jnp.ones(3)))(Ts)
    toks = jnp.asarray(rng.integers(0, 2, (3, 4, 11)), jnp.int32)
    ref = jax.vmap(lambda p, t: jax.vmap(lambda s: sfpjax.filter_beliefs_reference(p, s))(t))(procs, toks)
    fast = jax.vmap(sfpjax.filter_beliefs)(procs, toks)
    np.testing.assert_allclose(ref.beliefs, fast.beliefs, rtol=1e-6, atol=1e-7)
    p = sfpjax.GHMM(z1r_T(), hmm=True)
    with pytest.raises((ValueError, TypeError), match=r"one sequence of shape|'L'"):
        sfpjax.filter_beliefs_reference(p, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(Exception, match=r"tokens outside the alphabet"):
        jax.block_until_ready(sfpjax.filter_beliefs_reference(p, jnp.array([0, 2])))


@pytest.mark.parametrize("chunking", ["cpu", "accelerator"])
def test_many_sequences_match_a_numpy_loop(chunking, monkeypatch):
    # More sequences than one batch chunk, and a length that is not a whole number of blocks.
    # The accelerator chunking (all 1100 sequences in one chunk, what GPUs and TPUs run)
    # is checked here on CPU by giving the CPU program its chunk size.
    from sfpjax.inference import _batched_filter as _beliefs

    rng = np.random.default_rng(10)
    T, eta0, right = random_ghmm(rng, 3, 3)
    p = sfpjax.GHMM(T, eta0, right, dtype=jnp.float64)
    toks = np.asarray(sfpjax.sample(p, key=jr.key(2), batch_size=1100, seq_len=45))
    if chunking == "cpu":
        out = sfpjax.filter_beliefs(p, jnp.asarray(toks))
    else:
        monkeypatch.setattr(_beliefs, "_CHUNK_ENTRIES", _beliefs._ACCELERATOR_CHUNK_ENTRIES)
        out = sfpjax.FilterResult(*jax.jit(_beliefs.filter_batch)(p, jnp.asarray(toks), None, None))  # a fresh trace
    eta = np.broadcast_to(eta0, (1100, 3))
    for t in range(45):
        unnorm = np.einsum("bi,bij->bj", eta, T[toks[:, t]])
        norm = unnorm @ right
        eta = unnorm / norm[:, None]
        np.testing.assert_allclose(out.beliefs[:, t], eta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(out.log_normalizers[:, t], np.log(norm), rtol=1e-8, atol=1e-10)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")
import sfpjax

assert jax.local_device_count() == 4
mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
# Per-device batches split into different chunks, whose compiled loops may contract
# multiply-adds differently: equal up to float32 rounding.
close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
on_mesh = lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P("batch")))
m = sfpjax.mess3(0.15, 0.6)
for process in (m, sfpjax.product(m, sfpjax.z1r())):
    toks = sfpjax.sample(process, key=jax.random.key(1), batch_size=1100, seq_len=37)
    ref = sfpjax.filter_beliefs(process, toks)
    got = sfpjax.filter_beliefs(process, on_mesh(toks))
    assert got.beliefs.sharding.spec[0] == "batch", got.beliefs.sharding
    close(got.beliefs, ref.beliefs)
    close(got.log_normalizers, ref.log_normalizers)
    again = sfpjax.filter_beliefs(process, on_mesh(toks), out=got)  # donated, sharded buffers
    assert got.beliefs.is_deleted()
    close(again.beliefs, ref.beliefs)
    init = jax.random.dirichlet(jax.random.key(2), jnp.ones(process.num_states), (1100,))
    init = init.astype(process.dtype)
    ref = sfpjax.filter_beliefs(process, toks, initial=init)
    got = sfpjax.filter_beliefs(process, on_mesh(toks), initial=init)
    close(got.beliefs, ref.beliefs)
# A process placed on the mesh once with sfpjax.replicate is used as it is (no copy per
# call); one that is not placed is copied to every device on every call. Both equal the
# one-device result.
from sfpjax.inference import _filter as _public
copy_per_call = _public.replicate
calls = []
_public.replicate = lambda process, mesh: calls.append(1) or copy_per_call(process, mesh)
for process in (m, sfpjax.product(m, sfpjax.z1r())):
    toks = sfpjax.sample(process, key=jax.random.key(3), batch_size=64, seq_len=9)
    ref = sfpjax.filter_beliefs(process, toks)
    placed = sfpjax.replicate(process, mesh)
    for leaf in jax.tree.leaves(placed):
        assert leaf.sharding.is_fully_replicated and leaf.sharding.mesh == mesh, leaf.sharding
        assert len(leaf.sharding.device_set) == 4
    assert placed.factors is None or len(placed.factors) == 2  # the factor structure is kept
    del calls[:]
    got = sfpjax.filter_beliefs(placed, on_mesh(toks))
    assert not calls, "a replicated process was copied again"
    close(got.beliefs, ref.beliefs)
    close(got.log_normalizers, ref.log_normalizers)
    got = sfpjax.filter_beliefs(process, on_mesh(toks))
    assert calls, "a process on one device was not copied to the mesh"
    close(got.beliefs, ref.beliefs)
    # a process replicated over a different mesh (other devices) is copied, not trusted
    other = jax.sharding.Mesh(jax.devices()[:2], ("batch",))
    del calls[:]
    got = sfpjax.filter_beliefs(sfpjax.replicate(process, other), on_mesh(toks))
    assert calls
    close(got.beliefs, ref.beliefs)
_public.replicate = copy_per_call
bad = on_mesh(jnp.full((8, 5), 3, jnp.int32))
try:
    jax.block_until_ready(sfpjax.filter_beliefs(m, bad))
except Exception as e:
    assert "outside the alphabet" in str(e), e
else:
    raise AssertionError("tokens outside the alphabet were accepted on the sharded path")
print("ok")
"""


def test_tokens_sharded_over_devices_filter_per_device_and_match_one_device():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
